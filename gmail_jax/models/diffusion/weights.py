"""Files of a diffusers pipeline component: its ``config.json`` and its weight file(s).

A Stable Diffusion directory (``save_pretrained`` / a hub snapshot) holds one folder per component:

    model_index.json
    text_encoder/  config.json  model.safetensors | pytorch_model.bin          (transformers)
    tokenizer/     vocab.json merges.txt special_tokens_map.json tokenizer_config.json
    unet/ vae/     config.json  diffusion_pytorch_model.safetensors | .bin       (diffusers)

Every loader takes either the component folder itself or the pipeline root (then its
``subfolder``). Weights: a ``*.safetensors.index.json`` / ``*.bin.index.json`` shard index, else one
file, ``.safetensors`` before ``.bin``; ``variant="fp16"`` reads ``<stem>.fp16.safetensors``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gmail_jax.models.convert import CheckpointError, read_state_dict

# Weight-file stems: diffusers models, then transformers models (safetensors, .bin).
DIFFUSERS_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model")
TRANSFORMERS_STEMS = ("model", "pytorch_model")


def component_dir(path: str, subfolder: str) -> str:
  """``path`` if it holds a ``config.json``, else ``path/subfolder`` if that does (a pipeline
  root); a one-line :class:`CheckpointError` otherwise."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  sub = os.path.join(path, subfolder)
  if os.path.isfile(os.path.join(sub, "config.json")):
    return sub
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such directory (expected a diffusers {subfolder}/ folder)")
  raise CheckpointError(
    f"{path}: no config.json here nor in {subfolder}/ (not a {subfolder} folder)"
  )


def read_config(path: str) -> dict:
  """``path/config.json`` as a dict (one-line :class:`CheckpointError` if missing or invalid)."""
  file = os.path.join(path, "config.json")
  try:
    with open(file) as f:
      config = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{file}: not found") from None
  except ValueError as e:
    raise CheckpointError(f"{file}: invalid JSON ({type(e).__name__}: {e})") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
  return config


def weight_files(path: str, stems: tuple[str, str], variant: str | None = None) -> list[str]:
  """The weight files of a component folder (see the module docstring for the search order)."""
  infix = f".{variant}" if variant else ""
  safetensors_stem, bin_stem = stems
  for index in (f"{safetensors_stem}.safetensors.index.json", f"{bin_stem}.bin.index.json"):
    if variant:  # transformers / diffusers name a variant's index <stem>.<ext>.index.<variant>.json
      index = index.replace(".index.json", f".index.{variant}.json")
    file = os.path.join(path, index)
    if os.path.exists(file):
      try:
        with open(file) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {file}: {type(e).__name__}: {e}") from None
      return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
  names = (f"{safetensors_stem}{infix}.safetensors", f"{bin_stem}{infix}.bin")
  for name in names:
    if os.path.exists(os.path.join(path, name)):
      return [os.path.join(path, name)]
  raise CheckpointError(f"{path}: no weights found (looked for {' / '.join(names)})")


def read_weights(
  path: str, stems: tuple[str, str], variant: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
  """(state dict of every weight file, the source to name in errors: the file, or the folder)."""
  files = weight_files(path, stems, variant)
  state_dict: dict[str, np.ndarray] = {}
  for file in files:
    state_dict.update(read_state_dict(file))
  return state_dict, files[0] if len(files) == 1 else path
