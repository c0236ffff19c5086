"""The GMAIL update step: pure, jitted with NamedShardings, LoRA-only gradients.

    z_real = stop_gradient(f_r(x_r))      teacher: frozen weights, outside the VJP
    z      = f_g(x) = f_r + LoRA          student: same frozen weights + trainable subtree
    parts  = objective.parts(z, targets)  L = Σ_p w_p parts_p  (objectives/: GMAIL, TPC-CMA, ...)

The train state is a plain dict (big_vision style), donated to the step:

    {'step': int32, 'params': {'lora': State, ['proj': State], ['log_scale': f32]},
     'opt': optax state of 'params', 'bad_step': int32 (first non-finite step, -1 if none)}

The frozen state (one copy, shared by teacher and student) is a separate, never donated argument.
Gradients, once for every objective: one forward and one VJP of the parts; the cotangent is the
objective's weights, or one unit vector per part when it needs per-part gradient norms (TPC-CMA's
cap). Gradient accumulation (``optim.accum_steps`` = k > 1) is exact for every objective: the step
first embeds all k microbatches without gradients, takes d parts/dz on the full global batch, then
back-propagates each microbatch's slice of the cotangent through the student (GradCache, Gao et
al. 2021), so activation memory is that of one microbatch and the negatives stay the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmail_jax import objectives
from gmail_jax.data import preprocess
from gmail_jax.models import towers
from gmail_jax.training import sharding as shd


@dataclasses.dataclass(frozen=True)
class Models:
  """Graphdefs of teacher (pre-LoRA) and student (post-LoRA) over one frozen state."""

  teacher: nnx.GraphDef
  student: nnx.GraphDef


# ---------------------------------------------------------------------------------------------
# Forward passes.
# ---------------------------------------------------------------------------------------------


def dropout_rngs(rng: nnx.State, index: jax.Array) -> nnx.State:
  """LoRA-dropout stream for one (step, microbatch): every key folded with ``index``, counts 0.

  Deriving it from the step (instead of carrying it) makes resume and GradCache replays exact.
  """

  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.fold_in(x, index)
    return jnp.zeros_like(x)

  return jax.tree.map(one, rng)


def is_proj(path, _value) -> bool:
  """Filter for the vision projection (``vision/proj/*``), trainable with lora.train_proj."""
  return tuple(str(p) for p in path[:2]) == ("vision", "proj")


def student_state(params: dict, frozen: nnx.State, rng: nnx.State) -> tuple[nnx.State, ...]:
  """The student's states: LoRA, dropout rngs, frozen weights (trained projection swapped in)."""
  if "proj" in params:
    _, rest = nnx.split_state(frozen, is_proj, ...)
    return params["lora"], rng, rest, params["proj"]
  return params["lora"], rng, frozen


def student_embed(models: Models, params: dict, frozen: nnx.State, rng: nnx.State, pixels):
  """f_g: frozen weights + LoRA (+ trained projection) on normalised pixels -> [N, D] fp32."""
  return nnx.merge(models.student, *student_state(params, frozen, rng)).vision(pixels)


def teacher_model(models: Models, frozen: nnx.State) -> nnx.Module:
  return nnx.merge(models.teacher, frozen)


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------


def _microbatches(x: jax.Array, k: int, mesh) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] with microbatch m = rows m, m+k, ... so every microbatch stays
  spread over all devices (a contiguous split would put each microbatch on a device subset)."""
  b = x.shape[0]
  y = x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
  spec = P(None, shd.AXES, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))


def _rows(y: jax.Array) -> jax.Array:
  """Inverse of ``_microbatches``: [k, B/k, ...] -> [B, ...] in the original row order."""
  k, bk = y.shape[:2]
  return y.swapaxes(0, 1).reshape(k * bk, *y.shape[2:])


def make_train_step(
  config: ml_collections.ConfigDict,
  models: Models,
  tx: optax.GradientTransformation,
  schedule: Callable[[jax.Array], jax.Array],
  mesh: jax.sharding.Mesh,
  *,
  state_shardings: Any,
  frozen_shardings: Any,
  rng_shardings: Any,
  objective: objectives.Objective | None = None,
):
  """Returns ``step(state, frozen, rng, batch) -> (state, metrics)``, jitted, state donated.

  ``batch``: global arrays sharded on ('data', 'fsdp'): ``gen_image``, ``real_image`` uint8
  [B,S,S,3], ``text`` int32 [B,L], ``group`` int32 [B], optional ``teacher_emb`` [B,D] (then the
  teacher forward is skipped). ``objective`` defaults to ``objectives.make(config)``.
  """
  objective = objective or objectives.make(config)
  spec = towers.get(config.model.name).preprocess
  normalize = lambda x: preprocess.normalize(x, spec.mean, spec.std)
  k = int(config.optim.accum_steps)
  names = objective.part_names

  def step_fn(state, frozen, rng, batch):
    step = state["step"]
    params = state["params"]

    # Frozen side (no gradient, outside the VJP): what the objective asked for.
    teacher = teacher_model(models, frozen)
    z_real = z_text = text_scale = None
    if objective.needs_real:
      if "teacher_emb" in batch:
        z_real = batch["teacher_emb"].astype(jnp.float32)
      else:
        z_real = teacher.vision(normalize(batch["real_image"]))
      z_real = jax.lax.stop_gradient(z_real)
    if objective.needs_text:
      z_text = jax.lax.stop_gradient(teacher.text(batch["text"]))
      text_scale = jax.lax.stop_gradient(jnp.exp(teacher.logit_scale[...].astype(jnp.float32)))
    targets = objectives.Targets(z_real, z_text, text_scale, batch.get("group"))
    key = "real_image" if objective.student_input == "real" else "gen_image"
    pixels = normalize(batch[key])

    enc = {key: v for key, v in params.items() if key in ("lora", "proj")}
    head = {key: v for key, v in params.items() if key not in enc}

    def embed(e, index, x):
      return student_embed(models, e, frozen, dropout_rngs(rng, index), x)

    def terms(z, h):
      return objective.parts(h, z, targets, step)

    # grads(cotangents [C, P]) -> C gradient pytrees {**g_enc, **g_head}, one per cotangent row.
    if k == 1:
      parts, vjp, aux = jax.vjp(
        lambda e, h: terms(embed(e, step, pixels), h), enc, head, has_aux=True
      )

      def grads(cots):
        return [{**g_e, **g_h} for g_e, g_h in (vjp(c) for c in cots)]

    else:
      micro = _microbatches(pixels, k, mesh)
      idx = step * k + jnp.arange(k)
      z = _rows(jax.lax.map(lambda m: embed(enc, m[0], m[1]), (idx, micro)))
      parts, vjp, aux = jax.vjp(terms, jax.lax.stop_gradient(z), head, has_aux=True)

      def grads(cots):
        g_z, g_h = zip(*(vjp(c) for c in cots), strict=True)
        g_micro = tuple(_microbatches(g, k, mesh) for g in g_z)

        def backprop(acc, m):
          i, x, gs = m
          _, vjp_e = jax.vjp(lambda e: embed(e, i, x), enc)
          return tuple(
            jax.tree.map(jnp.add, a, vjp_e(g)[0]) for a, g in zip(acc, gs, strict=True)
          ), None

        zeros = tuple(jax.tree.map(jnp.zeros_like, enc) for _ in cots)
        g_e, _ = jax.lax.scan(backprop, zeros, (idx, micro, g_micro))
        return [{**e, **h} for e, h in zip(g_e, g_h, strict=True)]

    if objective.needs_part_grads:
      per_part = grads(list(jnp.eye(len(names), dtype=parts.dtype)))
      norms = jnp.stack([optax.tree.norm(g) for g in per_part])
      w, w_aux = objective.weights(parts, step, norms)
      w = jax.lax.stop_gradient(w)
      g = jax.tree.map(lambda *gs: sum(w[i] * x for i, x in enumerate(gs)), *per_part)
      w_aux = {**w_aux, **{f"grad_norm_{n}": norms[i] for i, n in enumerate(names)}}
    else:
      w, w_aux = objective.weights(parts, step, None)
      w = jax.lax.stop_gradient(w)
      (g,) = grads([w])
    loss = jnp.sum(w * parts)
    if len(names) > 1:
      aux = {**aux, **{f"{n}_loss": parts[i] for i, n in enumerate(names)}}
    aux = {**aux, **w_aux}

    grads_tree = {key: g[key] for key in params}
    updates, opt = tx.update(grads_tree, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads_tree)

    # Non-finite guard: keep the last good params/opt and remember the first bad step.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    bad = state["bad_step"]
    new_state = {
      "step": step + 1,
      "params": keep(new_params, params),
      "opt": keep(opt, state["opt"]),
      "bad_step": jnp.where((bad < 0) & ~ok, step + 1, bad),
    }
    metrics = {
      "loss": loss,
      **aux,
      "lr": schedule(step),
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
    }
    return new_state, metrics

  batch_sh = shd.batch_sharding(mesh)
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, frozen_shardings, rng_shardings, batch_sh),
    out_shardings=(state_shardings, shd.replicated(mesh)),
    donate_argnums=(0,),
  )


def init_train_state(params: dict, tx: optax.GradientTransformation) -> dict:
  """The train state before step 1 (call under ``jax.set_mesh`` so scalars are replicated)."""
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt": tx.init(params),
    "bad_step": jnp.full((), -1, jnp.int32),
  }
