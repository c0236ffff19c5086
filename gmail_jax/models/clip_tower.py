"""The CLIP :class:`~gmail_jax.models.towers.Tower`: wires clip.py, convert.py, the CLIP
preprocessing constants and the LoRA target regexes (defined in lora.py)."""

from __future__ import annotations

import types

from flax import nnx

from gmail_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from gmail_jax.models import clip, convert, lora
from gmail_jax.models.towers import PreprocessSpec, Tower


def make(
  cfg: clip.CLIPConfig,
  *,
  rngs: nnx.Rngs,
  dtype=None,
  remat: bool = False,
  residual_loops: bool | None = None,
) -> clip.CLIP:
  return clip.CLIP(cfg, dtype=dtype, remat=remat, residual_loops=residual_loops, rngs=rngs)


TOWER = Tower(
  name="clip",
  variants=tuple(clip.VARIANTS),
  arch_config=clip.clip_config,
  make=make,
  load_pretrained=convert.load_pretrained,
  preprocess=PreprocessSpec(mean=CLIP_MEAN, std=CLIP_STD, resize="shortest_edge_crop"),
  lora_targets=types.MappingProxyType({"attn": lora.ATTN_TARGETS, "mlp": lora.MLP_TARGETS}),
)
