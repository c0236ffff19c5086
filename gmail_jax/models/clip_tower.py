"""The CLIP :class:`~gmail_jax.models.towers.Tower`: wires clip.py, the checkpoint importers
(convert.py: HF; openai_ckpt.py: OpenAI / OpenCLIP), the CLIP preprocessing constants and the
LoRA target regexes (defined in lora.py)."""

from __future__ import annotations

import os
import types

from flax import nnx

from gmail_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from gmail_jax.models import clip, convert, lora, openai_ckpt
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


def load_pretrained(
  src: str, *, dtype=None, remat: bool = False, residual_loops: bool | None = None
) -> clip.CLIP:
  """A :class:`CLIP` from a HF CLIP directory or hub id, or an OpenAI / OpenCLIP checkpoint file
  or OpenCLIP directory."""
  kw = dict(dtype=dtype, remat=remat, residual_loops=residual_loops)
  if openai_ckpt.is_openai_source(os.fspath(src)):
    return openai_ckpt.load_pretrained(src, **kw)
  return convert.load_pretrained(src, **kw)


TOWER = Tower(
  name="clip",
  variants=tuple(clip.VARIANTS),
  arch_config=clip.clip_config,
  make=make,
  load_pretrained=load_pretrained,
  preprocess=PreprocessSpec(mean=CLIP_MEAN, std=CLIP_STD, resize="shortest_edge_crop"),
  lora_targets=types.MappingProxyType({"attn": lora.ATTN_TARGETS, "mlp": lora.MLP_TARGETS}),
)
