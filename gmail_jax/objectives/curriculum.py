"""TPC-CMA three-phase curriculum for the alignment weight α(t), and the gradient-aware cap.

Liu et al., "The Geometry of Compromise" (arXiv 2604.00279) name the phases Anchor → Ramp →
Stabilize and a "gradient-aware" adjustment of the alignment strength. The paper body was not
available, so both functions below are reconstructions (shared/reference/papers.md §B.3), kept
pure and small so they are easy to change. Both are jnp-compatible: `step` and the gradient norms
may be traced values inside `jax.jit`.
"""

from __future__ import annotations

import jax.numpy as jnp

SHAPES = ("linear", "cosine")


def alpha_schedule(
  step,
  total_steps: int,
  alpha_target: float,
  anchor_frac: float = 0.15,
  ramp_frac: float = 0.45,
  shape: str = "linear",
):
  """Alignment weight α(t) of the three-phase curriculum (reconstruction, papers.md §B.3).

  With a = anchor_frac·T and r = ramp_frac·T (T = total_steps) and u = clip((t − a)/r, 0, 1):

      Anchor     t < a          α = 0                          (contrastive only)
      Ramp       a ≤ t < a + r  α = α_target · s(u)            s(u) = u  or  (1 − cos(π u))/2
      Stabilize  t ≥ a + r      α = α_target

  s is monotone non-decreasing with s(0)=0, s(1)=1, so α is continuous and monotone in t.
  A zero-length ramp (ramp_frac=0) is a step from 0 to α_target at t = a.

  Args:
    step: current step (int, or a traced integer/float scalar inside jit).
    total_steps: T > 0.
    alpha_target: α held in the Stabilize phase (e.g. 0.05 or 0.5 in the paper's abstract).
    anchor_frac: fraction of T spent in Anchor (paper's secondary sources: about 10-20%).
    ramp_frac: fraction of T spent in Ramp (about 40-50%); anchor_frac + ramp_frac ≤ 1.
    shape: 'linear' or 'cosine' ramp.

  Returns:
    α as a float32 jnp scalar.
  """
  if shape not in SHAPES:
    raise ValueError(f"alpha_schedule: shape must be one of {SHAPES}, got {shape!r}")
  if total_steps <= 0:
    raise ValueError(f"alpha_schedule: total_steps must be > 0, got {total_steps}")
  if anchor_frac < 0 or ramp_frac < 0 or anchor_frac + ramp_frac > 1 + 1e-9:
    raise ValueError(
      f"alpha_schedule: need anchor_frac, ramp_frac >= 0 with sum <= 1, got {anchor_frac}, "
      f"{ramp_frac}"
    )
  t = jnp.asarray(step, jnp.float32)
  anchor = anchor_frac * total_steps
  ramp = ramp_frac * total_steps
  if ramp > 0:
    u = jnp.clip((t - anchor) / ramp, 0.0, 1.0)
  else:
    u = (t >= anchor).astype(jnp.float32)
  s = u if shape == "linear" else 0.5 * (1.0 - jnp.cos(jnp.pi * u))
  return jnp.float32(alpha_target) * s


def capped_alpha(alpha, grad_norm_nce, grad_norm_cma, rho: float = 1.0, eps: float = 1e-8):
  """Gradient-aware cap on the alignment weight (reconstruction, papers.md §B.3).

      α_eff = min(α, ρ · g_NCE / (g_CMA + ε))

  g_NCE = ||∇θ L_NCE|| and g_CMA = ||∇θ L_CMA|| are global gradient norms over the shared
  trainable parameters. The cap keeps ||α_eff ∇L_CMA|| ≤ ρ ||∇L_NCE|| (up to ε), so the alignment
  gradient never dominates the contrastive one; if it spikes, the ramp effectively pauses. Callers
  should treat α_eff as a constant (stop_gradient) when it multiplies the loss.

  Args:
    alpha: scheduled α(t) (scalar; jnp or float).
    grad_norm_nce: g_NCE ≥ 0.
    grad_norm_cma: g_CMA ≥ 0.
    rho: ratio bound ρ (≈ 1).
    eps: ε, guards g_CMA = 0 (then the cap is ρ·g_NCE/ε, i.e. effectively inactive).

  Returns:
    α_eff as a jnp scalar.
  """
  alpha = jnp.asarray(alpha, jnp.float32)
  cap = (
    rho * jnp.asarray(grad_norm_nce, jnp.float32) / (jnp.asarray(grad_norm_cma, jnp.float32) + eps)
  )
  return jnp.minimum(alpha, cap)
