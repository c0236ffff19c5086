"""Training a small model in place on in-memory arrays: the loop shared by the teacher stage, the
"as if real" baseline (contrastive.py) and the captioners (captioning/captioner.py).

    losses = fit_arrays(model, nnx.LoRAParam, loss_fn, (images, ids), tx=tx, steps=300,
                        batch_size=128, seed=0)

One jitted step (split the ``wrt`` variables off, value_and_grad, optax update); batches are epochs
of a permutation drawn from ``seed`` (deterministic). Losses stay on device during the loop: the
host waits only at logged steps and once at the end. With ``rng`` the loss also gets a key per
step (``loss_fn(model, *batch, rng=fold_in(rng, step))``), for dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import optax
from flax import nnx


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Row indices of consecutive batches: epochs of seeded permutations, batches may span two."""
  rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  while True:
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:batch_size], order[batch_size:]
    yield idx


def fit_arrays(
  model: nnx.Module,
  wrt: nnx.filterlib.Filter,
  loss_fn: Callable[..., jax.Array],
  arrays: Sequence[np.ndarray],
  *,
  tx: optax.GradientTransformation,
  steps: int,
  batch_size: int,
  seed: int,
  log: Callable[[int, float], None] | None = None,
  log_every: int = 1,
  rng: jax.Array | None = None,
) -> list[float]:
  """Trains ``model``'s ``wrt`` variables with ``loss_fn(model, *batch) -> scalar`` over rows of
  ``arrays`` (same length); returns the per-step losses. ``log(step, loss)`` every ``log_every``
  steps and at the last. ``rng``: a key; step s calls ``loss_fn(..., rng=fold_in(rng, s))``."""
  graphdef, train_state, rest = nnx.split(model, wrt, ...)
  opt_state = tx.init(train_state)

  @jax.jit
  def step_fn(train_state, opt_state, rest, step, *batch):
    kw = {} if rng is None else {"rng": jax.random.fold_in(rng, step)}

    def objective(ts):
      return loss_fn(nnx.merge(graphdef, ts, rest), *batch, **kw)

    loss, grads = jax.value_and_grad(objective)(train_state)
    updates, opt_state = tx.update(grads, opt_state, train_state)
    return optax.apply_updates(train_state, updates), opt_state, loss

  losses = []
  batches = epoch_batches(len(arrays[0]), batch_size, seed)
  for step in range(1, steps + 1):
    idx = next(batches)
    batch = (a[idx] for a in arrays)
    train_state, opt_state, loss = step_fn(train_state, opt_state, rest, np.int32(step), *batch)
    losses.append(loss)
    if log is not None and (step % log_every == 0 or step == steps):
      log(step, float(loss))
  nnx.update(model, train_state)
  return [float(x) for x in jax.device_get(losses)]
