"""Losses as pure jnp functions on (global) embedding batches.

GMAIL (Mo & Yun, ICML 2025, Eq. 1) and TPC-CMA (Liu et al., arXiv 2604.00279; our reconstruction,
see DESIGN.md §1). Computed inside jit on globally sharded arrays: XLA inserts the all-gather, so
the negatives are the whole global batch and the gradient flows through the gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# GMAIL: gen->real InfoNCE, symmetric variant, CLIP text term, false-negative masking.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# TPC-CMA: centroid and distribution alignment terms.
# ---------------------------------------------------------------------------------------------
# Reconstruction (papers.md §B.3): L_CMA = L_C + λ_D·L_D on L2-normalised paired embeddings of one
# (global) batch; the training mode is L = L_InfoNCE + α(t)·L_CMA (gmail_jax/curriculum.py).

DISTRIBUTION_KINDS = ("gram", "residual")


def _cma_l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| per row, in float32 (the CMA terms are squared differences of small numbers)."""
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def centroid_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Centroid term L_C = ||mean_B(x̂) − mean_B(ŷ)||², x̂, ŷ the L2-normalised rows of x, y [B, D].

  The squared batch estimate of the centroid gap G_C (Liang et al. 2022's ||Δ_gap||).
  """
  x, y = _cma_l2_normalize(x), _cma_l2_normalize(y)
  d = jnp.mean(x, axis=0) - jnp.mean(y, axis=0)
  return jnp.sum(d * d)


def distribution_loss(x: jax.Array, y: jax.Array, kind: str = "gram") -> jax.Array:
  """Distribution term L_D on L2-normalised rows x̂, ŷ of x, y [B, D].

  kind='gram' (intra-modal geometry matching, unpaired within each modality):
      L_D = (1/B²) · ||X̂X̂ᵀ − ŶŶᵀ||_F²
  kind='residual' (paired; the batch estimate of G_D² in gmail_jax/evaluators/gap.py):
      L_D = (1/B) Σ_i ||(x̂_i − μ_x) − (ŷ_i − μ_y)||²
  """
  if kind not in DISTRIBUTION_KINDS:
    raise ValueError(f"distribution_loss: kind must be one of {DISTRIBUTION_KINDS}, got {kind!r}")
  x, y = _cma_l2_normalize(x), _cma_l2_normalize(y)
  if kind == "gram":
    diff = x @ x.T - y @ y.T
    return jnp.mean(diff * diff)  # mean over B² entries = (1/B²)·||·||_F²
  r = (x - jnp.mean(x, axis=0)) - (y - jnp.mean(y, axis=0))
  return jnp.mean(jnp.sum(r * r, axis=-1))


def cma_loss(x: jax.Array, y: jax.Array, lambda_d: float = 1.0, kind: str = "gram") -> jax.Array:
  """Cross-modal alignment loss L_CMA = L_C + λ_D · L_D (see centroid_loss, distribution_loss).

  Zero when x̂ == ŷ; scale-invariant per row (inputs are L2-normalised inside).
  """
  return centroid_loss(x, y) + lambda_d * distribution_loss(x, y, kind=kind)
