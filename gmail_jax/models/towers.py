"""Model families by name: ``config.model.name`` -> a :class:`Tower` (how to build, load, feed it).

A new family (e.g. SigLIP) is one provider module defining ``TOWER`` plus one line in
:data:`TOWERS`. Providers are imported lazily, so naming one family never imports the others.

    tower = towers.get(config.model.name)
    cfg = tower.arch_config(config.model.variant)
    model = tower.make(cfg, rngs=nnx.Rngs(0), residual_loops=towers.default_residual_loops())
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import jax

from gmail_jax.errors import ConfigError

if TYPE_CHECKING:
  from flax import nnx

# name -> provider module (its ``TOWER`` attribute).
TOWERS: dict[str, str] = {
  "clip": "gmail_jax.models.clip_tower",
  "siglip": "gmail_jax.models.siglip_tower",
}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
  """What the host pipeline and ``preprocess.normalize`` need: ``(x / 255 - mean) / std``.

  ``resize``: "shortest_edge_crop" = bicubic resize of the short side, then center crop
  (``preprocess.resize_center_crop``, as HF's CLIPImageProcessor); "squash" = bicubic resize
  to SxS without a crop (``preprocess.resize_squash``, as HF's SiglipImageProcessor).
  """

  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resize: Literal["shortest_edge_crop", "squash"] = "shortest_edge_crop"


@dataclasses.dataclass(frozen=True)
class Tower:
  """One model family.

  ``arch_config(variant, **overrides)``: the architecture config of a named variant.
  ``make(cfg, *, rngs, dtype=None, remat=False, residual_loops=None) -> nnx.Module``: a fresh
  model (``dtype``: compute dtype, None = fp32; ``residual_loops``: see
  :func:`default_residual_loops`, None = that default).
  ``load_pretrained(src, *, dtype=None, remat=False, residual_loops=None) -> nnx.Module``: weights
  from a checkpoint directory or hub id.
  ``lora_targets``: named module-path regexes for ``lora.apply_lora`` (``"attn"`` is the default).
  """

  name: str
  variants: tuple[str, ...]
  arch_config: Callable[..., Any]
  make: Callable[..., nnx.Module]
  load_pretrained: Callable[..., nnx.Module]
  preprocess: PreprocessSpec
  lora_targets: Mapping[str, str]


def get(name: str) -> Tower:
  """The tower registered as ``name``; a one-line ValueError for an unknown name."""
  if name not in TOWERS:
    raise ConfigError(f"config.model.name: {name!r} not in {sorted(TOWERS)}")
  return importlib.import_module(TOWERS[name]).TOWER


def resize_mode(config) -> str:
  """``PreprocessSpec.resize`` of ``config.model.name``'s tower (CLIP's when the config names
  none): how host code resizes images for the run's model."""
  model = config.get("model") if hasattr(config, "get") else None
  name = model.get("name", "clip") if model is not None else "clip"
  return get(name).preprocess.resize


def default_residual_loops() -> bool:
  """Whether models should wrap each block input in a residual-stream loop: XLA:CPU only (it
  otherwise recomputes the stream inside every consumer fusion; elsewhere a loop costs a sync).
  Call it once when building a model, never while tracing."""
  return jax.default_backend() == "cpu"
