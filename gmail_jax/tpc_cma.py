"""TPC-CMA training mode (``config.loss.mode = 'tpc_cma'``): controllable modality alignment.

Liu et al., "The Geometry of Compromise" (arXiv 2604.00279), as reconstructed in
shared/reference/papers.md §B.3 (the paper body was not available):

    L      = L_InfoNCE(x, y) + α_eff(t) · L_CMA(x, y)
    L_CMA  = ||μ_x^B − μ_y^B||² + λ_D · L_D^B                  (losses.cma_loss; kind gram|residual)
    α(t)   = Anchor (0) → Ramp (0 → α_target) → Stabilize (α_target)   (curriculum.alpha_schedule)
    α_eff  = min(α(t), ρ · ||∇θ L_NCE|| / (||∇θ L_CMA|| + ε))          (curriculum.capped_alpha)

θ = the trainable params (LoRA [+ projection] [+ log 1/τ]); the two gradient norms come from two
backward passes over one forward (a VJP with cotangents e_NCE, e_CMA), α_eff is a constant
(stop_gradient), and the update uses ∇L = ∇L_NCE + α_eff ∇L_CMA, i.e. exactly the gradient of L.

Pairs (``config.cma.pairs``):
  gen_real    x = student f_g(x_g), y = teacher f_r(x_r);  L_InfoNCE = GMAIL Eq. 1 (gen → real,
              ``loss.symmetric``/``loss.mask_groups`` apply)
  image_text  x = student f_g(x_r) (real images), y = frozen text tower h(caption);
              L_InfoNCE = symmetric CLIP loss with scale 1/τ (the paper's setting)

``config.cma`` keys (defaults in ``default_config``): alpha_target, anchor_frac, ramp_frac, shape
(linear|cosine), lambda_d, kind (gram|residual), rho, eps, pairs (gen_real|image_text).
Logged per step (train/…): alpha, alpha_eff, grad_norm_nce, grad_norm_cma, nce_loss, cma_loss, and
the batch gaps centroid_gap = G_C, distribution_gap = G_D (paired residual), raw_gap = G_raw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gmail_jax import curriculum, losses

MODES = ("gmail", "tpc_cma")
PAIRS = ("gen_real", "image_text")


def default_config() -> ml_collections.ConfigDict:
  """``config.cma`` with every key the TPC-CMA mode reads (papers.md §B.3 defaults)."""
  return ml_collections.ConfigDict(
    {
      "alpha_target": 0.5,
      "anchor_frac": 0.15,
      "ramp_frac": 0.45,
      "shape": "linear",
      "lambda_d": 1.0,
      "kind": "gram",
      "rho": 1.0,
      "eps": 1e-8,
      "pairs": "gen_real",
    }
  )


def mode_of(config: ml_collections.ConfigDict) -> str:
  return config.loss.get("mode", "gmail")


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ValueErrors naming the key (called by train.validate_config)."""
  mode = mode_of(config)
  if mode not in MODES:
    raise ValueError(f"config.loss.mode: {mode!r} not in {MODES}")
  if mode != "tpc_cma":
    return
  if "cma" not in config:
    raise ValueError("config.cma: missing (needed by config.loss.mode='tpc_cma')")
  known = set(default_config().keys())
  unknown = sorted(set(config.cma.keys()) - known)
  if unknown:
    raise ValueError(f"config.cma.{unknown[0]}: unknown key (known: {sorted(known)})")
  missing = sorted(known - set(config.cma.keys()))
  if missing:
    raise ValueError(f"config.cma.{missing[0]}: missing")
  c = config.cma
  if c.pairs not in PAIRS:
    raise ValueError(f"config.cma.pairs: {c.pairs!r} not in {PAIRS}")
  if c.kind not in losses.DISTRIBUTION_KINDS:
    raise ValueError(f"config.cma.kind: {c.kind!r} not in {losses.DISTRIBUTION_KINDS}")
  if c.shape not in curriculum.SHAPES:
    raise ValueError(f"config.cma.shape: {c.shape!r} not in {curriculum.SHAPES}")
  for key in ("alpha_target", "anchor_frac", "ramp_frac", "lambda_d", "rho", "eps"):
    if not float(c[key]) >= 0:
      raise ValueError(f"config.cma.{key}: must be >= 0, got {c[key]}")
  if c.anchor_frac + c.ramp_frac > 1 + 1e-9:
    raise ValueError(
      f"config.cma: anchor_frac + ramp_frac must be <= 1, got {c.anchor_frac} + {c.ramp_frac}"
    )
  if config.loss.text_weight:
    raise ValueError(
      "config.loss.text_weight: must be 0 with loss.mode='tpc_cma' (use cma.pairs='image_text'"
      " for the text-aligned objective)"
    )


# ---------------------------------------------------------------------------------------------
# Pure terms.
# ---------------------------------------------------------------------------------------------


def batch_gaps(x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Batch estimates of the eval gaps (evaluators/gap.py) on L2-normalised rows of x, y [B, D].

  G_C = ||μ_x − μ_y||,  G_D = sqrt(mean_i ||(x_i − μ_x) − (y_i − μ_y)||²),
  G_raw = sqrt(G_C² + G_D²) = sqrt(mean_i ||x_i − y_i||²)
  """
  c2 = losses.centroid_loss(x, y)
  d2 = losses.distribution_loss(x, y, kind="residual")
  return {
    "centroid_gap": jnp.sqrt(c2),
    "distribution_gap": jnp.sqrt(d2),
    "raw_gap": jnp.sqrt(c2 + d2),
  }


def loss_terms(
  cma: ml_collections.ConfigDict,
  loss_cfg: ml_collections.ConfigDict,
  temperature: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  group: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """([L_InfoNCE, L_CMA], metrics) for paired global-batch embeddings x (student), y (frozen).

  gen_real: L_InfoNCE = losses.gen_real_infonce(x, y, τ) (GMAIL Eq. 1); image_text:
  losses.clip_loss(x, y, 1/τ) (symmetric CLIP). L_CMA = losses.cma_loss(x, y, λ_D, kind).
  ``group`` masks false negatives (pass None to disable).
  """
  if cma.pairs == "gen_real":
    nce, aux = losses.gen_real_infonce(
      x, y, temperature, group=group, symmetric=bool(loss_cfg.symmetric)
    )
  else:
    nce, aux = losses.clip_loss(x, y, 1.0 / temperature, group=group)
    aux = {"pair_acc": aux["text_acc"]}
  cma_term = losses.cma_loss(x, y, lambda_d=float(cma.lambda_d), kind=cma.kind)
  aux = {**aux, **batch_gaps(x, y), "nce_loss": nce, "cma_loss": cma_term}
  return jnp.stack([nce, cma_term]), aux


def effective_alpha(
  cma: ml_collections.ConfigDict, total_steps: int, step: jax.Array, g_nce, g_cma
) -> tuple[jax.Array, jax.Array]:
  """(α(t), α_eff) with α_eff = stop_gradient(min(α(t), ρ g_NCE / (g_CMA + ε)))."""
  alpha = curriculum.alpha_schedule(
    step,
    total_steps,
    float(cma.alpha_target),
    anchor_frac=float(cma.anchor_frac),
    ramp_frac=float(cma.ramp_frac),
    shape=cma.shape,
  )
  alpha_eff = curriculum.capped_alpha(alpha, g_nce, g_cma, rho=float(cma.rho), eps=float(cma.eps))
  return alpha, jax.lax.stop_gradient(alpha_eff)


# ---------------------------------------------------------------------------------------------
# Gradients (called from train_step.make_train_step).
# ---------------------------------------------------------------------------------------------

_E_NCE = (1.0, 0.0)
_E_CMA = (0.0, 1.0)


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def loss_and_grads(
  config: ml_collections.ConfigDict,
  terms_fn: Callable[[jax.Array, Any], tuple[jax.Array, dict]],
  embed_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
  enc: Any,
  head: Any,
  pixels: jax.Array,
  *,
  step: jax.Array,
  split: Callable[[jax.Array], jax.Array] | None = None,
  rows: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
  """TPC-CMA loss, metrics and gradients (g_enc, g_head) of L = L_NCE + α_eff L_CMA.

  Args:
    config: the run config (uses cma, total_steps, optim.accum_steps).
    terms_fn: (z_student [B, D], head params) -> ([L_NCE, L_CMA], aux) (see loss_terms).
    embed_fn: (enc params, dropout index, pixels) -> z_student.
    enc, head: trainable encoder params (LoRA [+ proj]) and loss-head params (log_scale).
    pixels: normalised student input [B, S, S, 3] (generated or real images, by cma.pairs).
    step: the 0-based update index (traced).
    split, rows: with accum_steps = k > 1, train_step's microbatch split [B] -> [k, B/k] and its
      inverse; the gradients are then exact GradCache gradients as in the GMAIL step.

  Both per-term gradients come from one forward pass (one VJP, two cotangents); with k > 1 each
  microbatch is back-propagated once per term.
  """
  k = int(config.optim.accum_steps)
  e_nce, e_cma = jnp.asarray(_E_NCE, jnp.float32), jnp.asarray(_E_CMA, jnp.float32)
  if k == 1:

    def full(e, h):
      return terms_fn(embed_fn(e, step, pixels), h)

    parts, vjp, aux = jax.vjp(full, enc, head, has_aux=True)
    g_nce, g_cma = vjp(e_nce), vjp(e_cma)
  else:
    micro = split(pixels)
    idx = step * k + jnp.arange(k)
    z = rows(jax.lax.map(lambda m: embed_fn(enc, m[0], m[1]), (idx, micro)))
    parts, vjp, aux = jax.vjp(terms_fn, jax.lax.stop_gradient(z), head, has_aux=True)
    (gz_nce, gh_nce), (gz_cma, gh_cma) = vjp(e_nce), vjp(e_cma)

    def backprop(acc, m):
      i, x, gn, gc = m
      _, vjp_e = jax.vjp(lambda e: embed_fn(e, i, x), enc)
      return (_tree_add(acc[0], vjp_e(gn)[0]), _tree_add(acc[1], vjp_e(gc)[0])), None

    zeros = jax.tree.map(jnp.zeros_like, enc)
    (ge_nce, ge_cma), _ = jax.lax.scan(
      backprop, (zeros, zeros), (idx, micro, split(gz_nce), split(gz_cma))
    )
    g_nce, g_cma = (ge_nce, gh_nce), (ge_cma, gh_cma)

  gn_nce, gn_cma = optax.tree.norm(g_nce), optax.tree.norm(g_cma)
  alpha, alpha_eff = effective_alpha(config.cma, config.total_steps, step, gn_nce, gn_cma)
  g_enc, g_head = jax.tree.map(lambda a, b: a + alpha_eff * b, g_nce, g_cma)
  loss = parts[0] + alpha_eff * parts[1]
  aux = {
    **aux,
    "alpha": alpha,
    "alpha_eff": alpha_eff,
    "grad_norm_nce": gn_nce,
    "grad_norm_cma": gn_cma,
  }
  return loss, aux, g_enc, g_head
