"""The SigLIP :class:`~gmail_jax.models.towers.Tower`: siglip.py (model and HF import), its
preprocessing constants (mean = std = 0.5) and the CLIP LoRA target regexes (same block paths)."""

from __future__ import annotations

import types

from flax import nnx

from gmail_jax.models import lora, siglip
from gmail_jax.models.towers import PreprocessSpec, Tower

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def make(
  cfg: siglip.SiglipConfig,
  *,
  rngs: nnx.Rngs,
  dtype=None,
  remat: bool = False,
  residual_loops: bool | None = None,
) -> siglip.Siglip:
  return siglip.Siglip(cfg, dtype=dtype, remat=remat, residual_loops=residual_loops, rngs=rngs)


TOWER = Tower(
  name="siglip",
  variants=tuple(siglip.VARIANTS),
  arch_config=siglip.siglip_config,
  make=make,
  load_pretrained=siglip.load_pretrained,
  # HF's SiglipImageProcessor squashes to SxS without a crop.
  preprocess=PreprocessSpec(mean=SIGLIP_MEAN, std=SIGLIP_STD, resize="squash"),
  lora_targets=types.MappingProxyType({"attn": lora.ATTN_TARGETS, "mlp": lora.MLP_TARGETS}),
)
