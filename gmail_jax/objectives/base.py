"""The objective interface: a loss returns named parts; the objective says how they combine.

    parts, aux = objective.parts(head, z, targets, step)        [P] scalars, pure jnp
    w, aux     = objective.weights(parts, step, part_grad_norms) [P], treated as constants
    L          = Σ_p w_p · parts_p,   ∇L = Σ_p w_p ∇parts_p

The update step (train_step.py) owns the gradients: one forward, one VJP, and one cotangent per
part when the objective asks for per-part gradient norms (TPC-CMA's gradient-aware cap), else the
single cotangent ``w``. Gradient accumulation lives there too, once, for every objective.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from gmail_jax.errors import ConfigError

MAX_LOG_SCALE = math.log(100.0)  # CLIP clamps 1/tau at 100
TEMPERATURE_FROM = ("auto", "config", "teacher")


@dataclasses.dataclass(frozen=True)
class Targets:
  """The frozen side of a global batch (fp32, under stop_gradient), as the objective asked.

  real: teacher f_r(x_r) [B, D] (or cached); text: frozen text tower h(caption) [B, D] with its
  learned ``text_logit_scale``; group: int [B], rows with equal group are not negatives.
  """

  real: jax.Array | None
  text: jax.Array | None
  text_logit_scale: jax.Array | None
  group: jax.Array | None


def temperature_of(
  head: dict, loss_cfg: ml_collections.ConfigDict, teacher_scale: jax.Array | None = None
) -> jax.Array:
  """tau = exp(-log_scale) if learned (clamped at 1/100); else 1/teacher_scale when given (the
  teacher's own exp(logit_scale), as its forward uses it); else config.loss.temperature."""
  if "log_scale" in head:
    return jnp.exp(-jnp.minimum(head["log_scale"], MAX_LOG_SCALE))
  if teacher_scale is not None:
    return 1.0 / jnp.asarray(teacher_scale, jnp.float32)
  return jnp.asarray(loss_cfg.temperature, jnp.float32)


class Objective(abc.ABC):
  """One training objective; subclasses set the class attributes and the two methods."""

  part_names: tuple[str, ...] = ("loss",)
  # Which pixels the student embeds: 'generated' (GMAIL) or 'real' (image-text alignment).
  student_input: str = "generated"
  needs_real: bool = True  # the step computes (or reads from the cache) f_r(x_r)
  needs_text: bool = False  # the step runs the frozen text tower on the captions
  needs_part_grads: bool = False  # weights() receives the per-part gradient norms

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @classmethod
  def temperature_from(cls, config: ml_collections.ConfigDict) -> str:
    """'config' or 'teacher': config.loss.temperature_from with 'auto' resolved (here 'config';
    objectives that align to the teacher's own text tower override this)."""
    src = config.loss.temperature_from
    return "config" if src == "auto" else src

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    """One-line ConfigErrors naming the key, before anything is built (subclasses extend it)."""
    loss = config.loss
    if loss.temperature_from not in TEMPERATURE_FROM:
      raise ConfigError(
        f"config.loss.temperature_from: {loss.temperature_from!r} not in {TEMPERATURE_FROM}"
      )
    if cls.temperature_from(config) == "teacher" and not cls.teacher_temperature_ok(config):
      raise ConfigError(
        f"config.loss.temperature_from: 'teacher' needs image-text pairs (loss.mode='tpc_cma',"
        f" cma.pairs='image_text'), got loss.mode={loss.mode!r}"
      )
    if not loss.learn_temperature and not loss.temperature > 0:
      raise ConfigError(f"config.loss.temperature: must be > 0, got {loss.temperature}")

  @classmethod
  def teacher_temperature_ok(cls, config: ml_collections.ConfigDict) -> bool:
    """Whether the NCE term compares to the teacher's text tower, whose logit scale then applies."""
    del config
    return False

  @abc.abstractmethod
  def parts(
    self, head: dict, z: jax.Array, targets: Targets, step: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """([P] loss parts, metrics) from the student embeddings z [B, D] of the global batch."""

  def weights(
    self, parts: jax.Array, step: jax.Array, part_grad_norms: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """[P] weights of the parts (constants for the gradient) and metrics; default all ones."""
    del step, part_grad_norms
    return jnp.ones_like(parts), {}
