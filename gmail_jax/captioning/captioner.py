"""A prefix captioner: CLIP embedding -> mapper head -> prefix embeddings -> GPT-2 -> caption.

ClipCap and DeCap are both this model. ClipCap maps an image embedding to a 10- or 40-vector
prefix of a (pretrained) GPT-2; DeCap maps a text embedding to a 1-vector prefix of a small GPT-2
trained from scratch. GMAIL's dual projection (papers.md A.6 #5) is two heads over one language
model: ``gen`` (Proj-Gen) fed by f_g(generated image), ``real`` (Proj-Real) fed by f_r(real image).

    cap = Captioner(lm, mapper="mlp", clip_dim=512, prefix_length=10, heads=("gen", "real"), rngs=…)
    losses = fit(cap, feats, head, ids, mask, steps=…, batch_size=40, lr=2e-5, warmup_steps=5000)
    ids = generate(cap, feats, head="real", max_len=30, beam_size=1)

Training: the prefix is followed by the caption's token embeddings; position P-1+t predicts token
t (teacher forcing), the loss is the mean token cross-entropy over the caption and its EOS. As
ClipCap's train.py: transformers' ``AdamW`` (:func:`hf_adamw`: its defaults weight decay 0,
eps 1e-6, eps added before the bias correction) under ``get_linear_schedule_with_warmup``
(:func:`linear_warmup_schedule`), and the language model in train mode (GPT-2 dropout, see
gpt2.py) when it is trained; with the language model frozen (``trainable='prefix'``) it runs in
eval mode, as ClipCap's ``ClipCaptionPrefix.train`` puts its GPT-2 in ``eval()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmail_jax.captioning import gpt2
from gmail_jax.captioning.mappers import make_mapper
from gmail_jax.training import fit as fit_lib


class Captioner(nnx.Module):
  def __init__(
    self,
    lm: gpt2.GPT2,
    *,
    mapper: str,
    clip_dim: int,
    prefix_length: int,
    heads: Sequence[str] = ("shared",),
    rngs: nnx.Rngs,
    **mapper_kwargs,
  ):
    if not heads or len(set(heads)) != len(heads):
      raise ValueError(f"Captioner: heads must be distinct names, got {heads}")
    self.lm = lm
    self.head_names = tuple(heads)
    self.prefix_length = prefix_length
    self.heads = nnx.List(
      [
        make_mapper(mapper, clip_dim, lm.config.n_embd, prefix_length, rngs=rngs, **mapper_kwargs)
        for _ in heads
      ]
    )

  def head_index(self, head: str) -> int:
    if head not in self.head_names:
      raise ValueError(f"Captioner: no head {head!r} (heads: {self.head_names})")
    return self.head_names.index(head)

  def prefix(self, feats: jax.Array, head: jax.Array) -> jax.Array:
    """[B, C] embeddings, int [B] head index per row -> [B, P, D] prefix embeddings."""
    if len(self.heads) == 1:
      return self.heads[0](feats)
    every = jnp.stack([h(feats) for h in self.heads])  # [H, B, P, D]; the heads are small
    return every[head, jnp.arange(feats.shape[0])]

  def __call__(
    self, feats: jax.Array, head: jax.Array, ids: jax.Array, dropout_rng: jax.Array | None = None
  ) -> jax.Array:
    """Teacher-forced logits [B, T, V]: position t predicts ids[:, t]. ``dropout_rng``: the
    language model in train mode (gpt2.py); None = eval mode."""
    prefix = self.prefix(feats, head)
    tokens = self.lm.embed(ids[:, :-1]).astype(prefix.dtype)
    embeds = jnp.concatenate([prefix, tokens], axis=1)
    logits, _ = self.lm(inputs_embeds=embeds, dropout_rng=dropout_rng)
    return logits[:, self.prefix_length - 1 :]


def trainable_filter(trainable: str) -> nnx.filterlib.Filter:
  """'prefix': the mapper heads only (ClipCap --only_prefix, GPT-2 frozen); 'all': everything."""
  if trainable == "prefix":
    return nnx.All(nnx.Param, nnx.PathContains("heads"))
  if trainable == "all":
    return nnx.Param
  raise ValueError(f"trainable: 'prefix' or 'all', got {trainable!r}")


def linear_warmup_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """transformers' ``get_linear_schedule_with_warmup``: lr · step / warmup while step < warmup,
  then lr · (total - step) / (total - warmup), floored at 0; update n (from 0) uses step n. A run
  shorter than its warm-up never reaches ``lr`` (as in transformers)."""
  warm, total = float(max(1, warmup_steps)), float(max(1, total_steps - warmup_steps))

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    rise, fall = step / warm, jnp.maximum(0.0, (total_steps - step) / total)
    return lr * jnp.where(step < warmup_steps, rise, fall)

  return schedule


class HFAdamWState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def hf_adamw(
  learning_rate: optax.Schedule,
  *,
  weight_decay: float = 0.0,
  eps: float = 1e-6,
  b1: float = 0.9,
  b2: float = 0.999,
) -> optax.GradientTransformation:
  """transformers' ``AdamW`` (the v4 class ClipCap imports; ``correct_bias=True``), step t >= 1:

      m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g²
      p -= lr_t · sqrt(1 - b2^t) / (1 - b1^t) · m / (sqrt(v) + eps)
      p -= lr_t · weight_decay · p                     (decoupled, on the updated p)

  eps is added to sqrt(v) before the bias correction, unlike ``optax.adamw`` / ``torch.optim.
  AdamW`` (sqrt(v̂) + eps); the two differ where sqrt(v̂) is near eps. Defaults: its own."""

  def init(params: optax.Params) -> HFAdamWState:
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return HFAdamWState(jnp.zeros((), jnp.int32), zeros(), zeros())

  def update(grads, state, params=None):
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    lr = learning_rate(state.count)
    t = count.astype(jnp.float32)
    step_size = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)

    def one(m, v, p):
      u = -step_size * m / (jnp.sqrt(v) + eps)
      if weight_decay:
        u = u - lr * weight_decay * (p + u)
      return u.astype(p.dtype)

    if weight_decay and params is None:
      raise ValueError("hf_adamw: weight decay needs the params in update()")
    updates = jax.tree.map(one, mu, nu, params if params is not None else mu)
    return updates, HFAdamWState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def fit(
  captioner: Captioner,
  feats: np.ndarray,
  head: np.ndarray,
  ids: np.ndarray,
  mask: np.ndarray,
  *,
  steps: int,
  batch_size: int,
  lr: float,
  warmup_steps: int,
  weight_decay: float = 0.0,
  eps: float = 1e-6,
  label_smoothing: float = 0.0,
  trainable: str = "all",
  seed: int = 0,
  log: Callable[[int, float], None] | None = None,
  log_every: int = 1,
) -> list[float]:
  """Trains ``captioner`` in place (``fit.fit_arrays``); returns the per-step losses.

  ClipCap's optimiser (:func:`hf_adamw` under :func:`linear_warmup_schedule` to 0 at ``steps``);
  batches are epochs of a permutation drawn from ``seed`` (deterministic), and so are the dropout
  masks: the language model trains in train mode (its config's dropout rates) unless it is frozen.
  feats: float [N, C]; head: int [N] (index into captioner.head_names); ids / mask: int [N, T].
  """
  n = len(feats)
  if not (len(head) == len(ids) == len(mask) == n) or n == 0:
    raise ValueError(f"fit: need aligned non-empty rows, got {n}/{len(head)}/{len(ids)}")
  cfg = captioner.lm.config
  rates = (cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop)
  # A frozen language model runs in eval mode (ClipCaptionPrefix.train sets gpt.eval()).
  rng = jax.random.key(seed) if trainable == "all" and any(rates) else None

  def loss_fn(model: Captioner, f, h, t, m, rng=None) -> jax.Array:
    logits = model(f, h, t, dropout_rng=rng)
    return gpt2.lm_loss(logits, t, m, label_smoothing=label_smoothing)

  arrays = (np.asarray(feats, np.float32), *(np.asarray(a, np.int32) for a in (head, ids, mask)))
  return fit_lib.fit_arrays(
    captioner,
    trainable_filter(trainable),
    loss_fn,
    arrays,
    tx=hf_adamw(
      linear_warmup_schedule(lr, warmup_steps, steps), weight_decay=weight_decay, eps=eps
    ),
    steps=steps,
    batch_size=min(batch_size, n),
    seed=seed,
    log=log,
    log_every=log_every,
    rng=rng,
  )


@nnx.jit
def _prefix(captioner: Captioner, feats: jax.Array, head: jax.Array) -> jax.Array:
  return captioner.prefix(feats, head)


def generate(
  captioner: Captioner,
  feats: np.ndarray,
  *,
  head: str,
  eos_id: int,
  max_len: int,
  beam_size: int = 1,
  batch_size: int = 64,
) -> np.ndarray:
  """Token ids int32 [N, max_len] (EOS-terminated) of captions for ``feats`` through ``head``.

  Batches are padded to ``batch_size`` so every batch reuses one compiled decoder."""
  feats = np.asarray(feats, np.float32)
  idx = captioner.head_index(head)
  out = []
  for lo in range(0, len(feats), batch_size):
    chunk = feats[lo : lo + batch_size]
    n = len(chunk)
    padded = np.concatenate([chunk, np.zeros((batch_size - n, chunk.shape[1]), np.float32)])
    prefix = _prefix(captioner, jnp.asarray(padded), jnp.full((batch_size,), idx, jnp.int32))
    if beam_size == 1:
      ids = gpt2.greedy_decode(captioner.lm, prefix, max_len=max_len, eos_id=eos_id)
    else:
      ids = gpt2.beam_search(
        captioner.lm, prefix, beam_size=beam_size, max_len=max_len, eos_id=eos_id
      )
    out.append(np.asarray(ids)[:n])
  return np.concatenate(out) if out else np.zeros((0, max_len), np.int32)
