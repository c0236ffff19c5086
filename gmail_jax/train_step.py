"""The GMAIL update step: pure, jitted with NamedShardings, LoRA-only gradients.

    z_real = stop_gradient(f_r(x_r))      teacher: frozen weights, OUTSIDE value_and_grad
    z_gen  = f_g(x_g) = f_r + LoRA        student: same frozen weights + trainable subtree
    L      = compose_loss(z_gen, z_real, ...)   (losses.gmail_loss [+ later alpha(t) * CMA])

The train state is a plain dict (big_vision style), donated to the step:

    {'step': int32, 'params': {'lora': State, ['proj': State], ['log_scale': f32]},
     'opt': optax state of 'params', 'bad_step': int32 (first non-finite step, -1 if none)}

The frozen state (one copy, shared by teacher and student) is a separate, never donated argument.
Gradient accumulation (``optim.accum_steps`` = k > 1) is exact for every loss variant: the step
first embeds all k microbatches without gradients, takes dL/dz on the full global batch, then
back-propagates each microbatch's slice of dL/dz through the student (GradCache, Gao et al. 2021),
so activation memory is that of one microbatch and the negatives stay the whole global batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmail_jax import losses, tpc_cma
from gmail_jax import sharding as shd
from gmail_jax.data import preprocess

MAX_LOG_SCALE = math.log(100.0)  # CLIP clamps 1/tau at 100


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


def temperature_of(params: dict, loss_cfg: ml_collections.ConfigDict) -> jax.Array:
  """tau = exp(-log_scale) if learned (clamped at 1/100), else the fixed config.loss.temperature."""
  if "log_scale" in params:
    return jnp.exp(-jnp.minimum(params["log_scale"], MAX_LOG_SCALE))
  return jnp.asarray(loss_cfg.temperature, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Loss composition: the ONE place that combines GMAIL terms (TPC-CMA: tpc_cma.loss_and_grads).
# ---------------------------------------------------------------------------------------------


def compose_loss(
  loss_cfg: ml_collections.ConfigDict,
  params: dict,
  z_gen: jax.Array,
  z_real: jax.Array,
  *,
  group: jax.Array | None,
  z_text: jax.Array | None,
  text_logit_scale: jax.Array | None,
  step: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total training loss and its metrics from the global-batch embeddings.

      L = L_align(z_gen, z_real; tau, mask) + lambda_text * L_CLIP(z_gen, z_text)

  ``step`` (the 0-based update index) is unused by GMAIL; it is here for curriculum terms
  (TPC-CMA's alpha(t)) so the signature does not change when they are added.
  """
  del step
  tau = temperature_of(params, loss_cfg)
  loss, aux = losses.gmail_loss(
    z_gen,
    z_real,
    temperature=tau,
    group=group if loss_cfg.mask_groups else None,
    symmetric=loss_cfg.symmetric,
    z_text=z_text,
    text_weight=loss_cfg.text_weight,
    text_logit_scale=text_logit_scale,
  )
  return loss, {**aux, "temperature": tau}


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
  loss_fn: Callable[..., tuple[jax.Array, dict]] | None = None,
):
  """Returns ``step(state, frozen, rng, batch) -> (state, metrics)``, jitted, state donated.

  ``batch``: global arrays sharded on ('data', 'fsdp'): ``gen_image``, ``real_image`` uint8
  [B,S,S,3], ``text`` int32 [B,77], ``group`` int32 [B], optional ``teacher_emb`` [B,D] (then the
  teacher forward is skipped). ``loss_fn`` defaults to ``compose_loss`` (looked up at call time).
  """
  loss_fn = loss_fn or compose_loss
  k = int(config.optim.accum_steps)
  loss_cfg = config.loss
  use_text = bool(loss_cfg.text_weight)
  # TPC-CMA mode (tpc_cma.py): L_NCE + alpha_eff(t) * L_CMA; image_text pairs need the text tower.
  cma = config.cma if tpc_cma.mode_of(config) == "tpc_cma" else None
  image_text = cma is not None and cma.pairs == "image_text"
  use_text = use_text or image_text

  def step_fn(state, frozen, rng, batch):
    step = state["step"]
    params = state["params"]
    gen = preprocess.normalize(batch["gen_image"])
    group = batch.get("group")

    # Teacher (frozen, no gradient, outside value_and_grad).
    teacher = teacher_model(models, frozen)
    if "teacher_emb" in batch:
      z_real = batch["teacher_emb"].astype(jnp.float32)
    else:
      z_real = teacher.vision(preprocess.normalize(batch["real_image"]))
    z_real = jax.lax.stop_gradient(z_real)
    z_text = text_scale = None
    if use_text:
      z_text = jax.lax.stop_gradient(teacher.text(batch["text"]))
      text_scale = jax.lax.stop_gradient(jnp.exp(teacher.logit_scale[...].astype(jnp.float32)))

    enc = {key: v for key, v in params.items() if key in ("lora", "proj")}
    head = {key: v for key, v in params.items() if key not in enc}

    def terms(z_gen, head):
      return loss_fn(
        loss_cfg,
        head,
        z_gen,
        z_real,
        group=group,
        z_text=z_text,
        text_logit_scale=text_scale,
        step=step,
      )

    if cma is not None:
      y = z_text if image_text else z_real
      mask = group if loss_cfg.mask_groups else None

      def cma_terms(z, head):
        return tpc_cma.loss_terms(cma, loss_cfg, temperature_of(head, loss_cfg), z, y, group=mask)

      loss, aux, g_enc, g_head = tpc_cma.loss_and_grads(
        config,
        cma_terms,
        lambda e, i, x: student_embed(models, e, frozen, dropout_rngs(rng, i), x),
        enc,
        head,
        preprocess.normalize(batch["real_image"]) if image_text else gen,
        step=step,
        split=lambda x: _microbatches(x, k, mesh),
        rows=_rows,
      )
      aux = {**aux, "temperature": temperature_of(head, loss_cfg)}
    elif k == 1:
      r = dropout_rngs(rng, step)

      def full_loss(enc, head):
        return terms(student_embed(models, enc, frozen, r, gen), head)

      (loss, aux), (g_enc, g_head) = jax.value_and_grad(full_loss, argnums=(0, 1), has_aux=True)(
        enc, head
      )
    else:
      micro = _microbatches(gen, k, mesh)
      idx = step * k + jnp.arange(k)

      def embed(m):
        i, x = m
        return student_embed(models, enc, frozen, dropout_rngs(rng, i), x)

      z_gen = _rows(jax.lax.map(embed, (idx, micro)))
      (loss, aux), (g_z, g_head) = jax.value_and_grad(terms, argnums=(0, 1), has_aux=True)(
        jax.lax.stop_gradient(z_gen), head
      )
      g_micro = _microbatches(g_z, k, mesh)

      def backprop(acc, m):
        i, x, g = m
        _, vjp = jax.vjp(lambda e: student_embed(models, e, frozen, dropout_rngs(rng, i), x), enc)
        return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

      zeros = jax.tree.map(jnp.zeros_like, enc)
      g_enc, _ = jax.lax.scan(backprop, zeros, (idx, micro, g_micro))

    grads = {**g_enc, **g_head}
    updates, opt = tx.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)

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
