"""TPC-CMA objective (``config.loss.mode = 'tpc_cma'``): controllable modality alignment.

Liu et al., "The Geometry of Compromise" (arXiv 2604.00279), as reconstructed in
shared/reference/papers.md §B.3 (the paper body was not available):

    L      = L_InfoNCE(x, y) + α_eff(t) · L_CMA(x, y)              cma.form='additive' (default)
    L      = (1 − α_eff(t)) · L_InfoNCE + α_eff(t) · L_CMA         cma.form='convex' (same at α=0)
    L_CMA  = ||μ_x^B − μ_y^B||² + λ_D · L_D^B                  (losses.cma_loss; kind gram|residual)
    α(t)   = Anchor (0) → Ramp (0 → α_target) → Stabilize (α_target)   (curriculum.alpha_schedule)
    α_eff  = min(α(t), ρ · ||∇θ L_NCE|| / (||∇θ L_CMA|| + ε))          (curriculum.capped_alpha)

θ = the trainable params (LoRA [+ projection] [+ log 1/τ]). The objective has two parts
(nce, cma) and asks the step for their gradient norms (objectives/base.py: one forward, one VJP
with cotangents e_NCE, e_CMA); α_eff is a constant and the update uses ∇L = ∇L_NCE + α_eff ∇L_CMA,
i.e. exactly the gradient of L.

Pairs (``config.cma.pairs``):
  gen_real    x = student f_g(x_g), y = teacher f_r(x_r);  L_InfoNCE = GMAIL Eq. 1 (gen → real,
              ``loss.symmetric``/``loss.mask_groups`` apply)
  image_text  x = student f_g(x_r) (real images), y = frozen text tower h(caption);
              L_InfoNCE = symmetric CLIP loss with scale 1/τ (the paper's setting); τ defaults
              to the teacher's learned 1/exp(logit_scale) (loss.temperature_from='auto'), so
              α = 0 is the teacher's own loss and moves no gap by temperature alone
cma.nce='reweighted' weights each negative by exp(β·cos) / mean (β = cma.nce_beta; papers.md §B.3,
losses.negative_log_weights). The τ in use is logged as train/temperature.

``config.cma`` keys (defaults in gmail_jax/schema.py): alpha_target, anchor_frac, ramp_frac, shape
(linear|cosine), lambda_d, kind (gram|residual), rho, eps, pairs (gen_real|image_text), form
(additive|convex), nce (infonce|reweighted), nce_beta.
Logged per step (train/…): alpha, alpha_eff, grad_norm_nce, grad_norm_cma, nce_loss, cma_loss, and
the batch gaps centroid_gap = G_C, distribution_gap = G_D (paired residual), raw_gap = G_raw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from gmail_jax.errors import ConfigError
from gmail_jax.objectives import curriculum, losses
from gmail_jax.objectives.base import Objective, Targets, temperature_of

PAIRS = ("gen_real", "image_text")
FORMS = ("additive", "convex")
NCE_KINDS = ("infonce", "reweighted")


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigErrors naming the ``config.cma`` / ``config.loss`` key."""
  c = config.cma
  if c.pairs not in PAIRS:
    raise ConfigError(f"config.cma.pairs: {c.pairs!r} not in {PAIRS}")
  if c.kind not in losses.DISTRIBUTION_KINDS:
    raise ConfigError(f"config.cma.kind: {c.kind!r} not in {losses.DISTRIBUTION_KINDS}")
  if c.shape not in curriculum.SHAPES:
    raise ConfigError(f"config.cma.shape: {c.shape!r} not in {curriculum.SHAPES}")
  if c.form not in FORMS:
    raise ConfigError(f"config.cma.form: {c.form!r} not in {FORMS}")
  if c.nce not in NCE_KINDS:
    raise ConfigError(f"config.cma.nce: {c.nce!r} not in {NCE_KINDS}")
  if c.form == "convex" and not c.alpha_target <= 1:
    raise ConfigError(
      f"config.cma.alpha_target: must be <= 1 with cma.form='convex', got {c.alpha_target}"
    )
  for key in ("alpha_target", "anchor_frac", "ramp_frac", "lambda_d", "rho", "eps", "nce_beta"):
    if not float(c[key]) >= 0:
      raise ConfigError(f"config.cma.{key}: must be >= 0, got {c[key]}")
  if c.anchor_frac + c.ramp_frac > 1 + 1e-9:
    raise ConfigError(
      f"config.cma: anchor_frac + ramp_frac must be <= 1, got {c.anchor_frac} + {c.ramp_frac}"
    )
  if config.loss.text_weight:
    raise ConfigError(
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
  losses.clip_loss(x, y, 1/τ) (symmetric CLIP); cma.nce='reweighted' re-weights the negatives by
  exp(cma.nce_beta · cos) (losses.negative_log_weights). L_CMA = losses.cma_loss(x, y, λ_D, kind).
  ``group`` masks false negatives (pass None to disable).
  """
  beta = float(cma.nce_beta) if cma.nce == "reweighted" else None
  if cma.pairs == "gen_real":
    nce, aux = losses.gen_real_infonce(
      x, y, temperature, group=group, symmetric=bool(loss_cfg.symmetric), neg_beta=beta
    )
  else:
    nce, aux = losses.clip_loss(x, y, 1.0 / temperature, group=group, neg_beta=beta)
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


def part_weights(form: str, alpha_eff: jax.Array) -> jax.Array:
  """[w_NCE, w_CMA]: (1, α_eff) additive, (1 − α_eff, α_eff) convex; both (1, 0) at α_eff = 0."""
  w_nce = 1.0 - alpha_eff if form == "convex" else jnp.ones_like(alpha_eff)
  return jnp.stack([w_nce, alpha_eff])


# ---------------------------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------------------------


class TPCCMA(Objective):
  """Parts (nce, cma), weights part_weights(cma.form, α_eff), α_eff from the per-part grad norms."""

  part_names = ("nce", "cma")
  needs_part_grads = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    image_text = config.cma.pairs == "image_text"
    self.student_input = "real" if image_text else "generated"
    self.needs_real = not image_text
    self.needs_text = image_text
    self.teacher_temperature = self.temperature_from(config) == "teacher"

  @classmethod
  def teacher_temperature_ok(cls, config: ml_collections.ConfigDict) -> bool:
    return config.cma.pairs == "image_text"

  @classmethod
  def temperature_from(cls, config: ml_collections.ConfigDict) -> str:
    """'auto': the teacher's learned logit scale for image_text pairs (the InfoNCE is then the
    teacher's own CLIP loss, so α = 0 does not move the gap by a temperature change alone, Liang
    et al.); GMAIL's fixed τ for gen_real."""
    src = config.loss.temperature_from
    if src == "auto":
      return "teacher" if cls.teacher_temperature_ok(config) else "config"
    return src

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    super().validate(config)
    validate(config)

  def parts(
    self, head: dict, z: jax.Array, targets: Targets, step: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del step
    loss_cfg = self.config.loss
    tau = temperature_of(
      head, loss_cfg, targets.text_logit_scale if self.teacher_temperature else None
    )
    y = targets.text if self.needs_text else targets.real
    group = targets.group if loss_cfg.mask_groups else None
    parts, aux = loss_terms(self.config.cma, loss_cfg, tau, z, y, group=group)
    return parts, {**aux, "temperature": tau}

  def weights(
    self, parts: jax.Array, step: jax.Array, part_grad_norms: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    g_nce, g_cma = part_grad_norms[0], part_grad_norms[1]
    alpha, alpha_eff = effective_alpha(self.config.cma, self.config.total_steps, step, g_nce, g_cma)
    return part_weights(self.config.cma.form, alpha_eff), {
      "alpha": alpha,
      "alpha_eff": alpha_eff,
    }


OBJECTIVE = TPCCMA
