"""GMAIL's objective (Mo & Yun, ICML 2025, Eq. 1): one part.

    L = L_align(z_gen, z_real; tau, mask) + lambda_text * L_CLIP(z_gen, z_text)

z_gen = student f_g on generated images, z_real = frozen teacher f_r on the paired real images;
``loss.symmetric`` adds the real -> generated direction, ``loss.mask_groups`` removes same-group
false negatives, ``loss.text_weight`` > 0 adds the CLIP text term (losses.gmail_loss), or with
``loss.text_loss='sigmoid'`` SigLIP's sigmoid term with a learned bias (head param ``text_bias``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from gmail_jax.errors import ConfigError
from gmail_jax.objectives import losses
from gmail_jax.objectives.base import Objective, Targets, temperature_of

TEXT_LOSSES = ("softmax", "sigmoid")


class GMAIL(Objective):
  part_names = ("loss",)
  student_input = "generated"
  needs_real = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.needs_text = bool(config.loss.text_weight)

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    super().validate(config)
    loss = config.loss
    if loss.text_weight < 0:
      raise ConfigError(f"config.loss.text_weight: must be >= 0, got {loss.text_weight}")
    if loss.text_loss not in TEXT_LOSSES:
      raise ConfigError(f"config.loss.text_loss: {loss.text_loss!r} not in {TEXT_LOSSES}")

  def parts(
    self, head: dict, z: jax.Array, targets: Targets, step: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del step
    loss_cfg = self.config.loss
    tau = temperature_of(head, loss_cfg)
    loss, aux = losses.gmail_loss(
      z,
      targets.real,
      temperature=tau,
      group=targets.group if loss_cfg.mask_groups else None,
      symmetric=loss_cfg.symmetric,
      z_text=targets.text,
      text_weight=loss_cfg.text_weight,
      text_logit_scale=targets.text_logit_scale,
      text_loss=loss_cfg.text_loss,
      text_bias=head.get("text_bias", -10.0),
    )
    return jnp.stack([loss]), {**aux, "temperature": tau}


OBJECTIVE = GMAIL
