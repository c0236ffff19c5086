"""Stage 'init': a randomly initialised transformers CLIP of ``config.model``, as a checkpoint.

Offline wiring runs (``configs/coco.py:mini``) need what a downloaded checkpoint is elsewhere: a
transformers CLIP directory that the align stage loads as its ``config.init`` through the same
importer as ``openai/clip-vit-base-patch16``. This stage writes one with transformers itself
(``CLIPModel(config)`` seeded by ``config.seed``, ``save_pretrained``: safetensors) plus the CLIP
BPE tokenizer and preprocessor files, at WORKDIR/init/model. The architecture is ``config.model``'s
variant and overrides at ``data.image_size``. Needs torch (the ``gen`` / ``torch`` extra).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from gmail_jax import storage
from gmail_jax.errors import ConfigError
from gmail_jax.export import hf_dir
from gmail_jax.models import tokenizer as tk
from gmail_jax.training import build

KEYS = ("seed", "model.name", "model.variant", "model.overrides", "data.image_size")
ON_CHANGE = "refuse"
ALL_PROCESSES = False  # torch on the host, no JAX computation: process 0 writes, the others wait


def model_dir(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "init" / "model"


def check(config: ml_collections.ConfigDict) -> None:
  if config.model.name != "clip":
    raise ConfigError(f"config.model.name={config.model.name!r}: the init stage writes CLIP only")
  if config.init:
    raise ConfigError(f"config.init={config.init!r}: the init stage provides it; leave it empty")


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  d = storage.path(outputs["model_dir"])
  return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  """Writes the random checkpoint; returns {'model_dir'} (the align stage's ``config.init``)."""
  del inputs
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ConfigError(f"the init stage needs torch (pip install -e .[torch]): {e}") from None
  overrides = config.model.overrides.to_dict()
  overrides.setdefault("vision_image_size", config.data.image_size)
  arch = build.tower(config).arch_config(config.model.variant, **overrides)
  vocab, merges = tk.vocab_from_bpe_gz(tk.default_bpe_path())
  torch.manual_seed(int(config.seed))
  hf_config = transformers.CLIPConfig(**hf_dir.hf_config(arch, bos_token_id=vocab[tk.SOT]))
  model = transformers.CLIPModel(hf_config)
  out = model_dir(workdir)
  files = {
    **hf_dir.tokenizer_files(vocab, merges, arch.text.context_length),
    "preprocessor_config.json": json.dumps(hf_dir.preprocessor_config(arch.vision.image_size)),
  }

  def fill(tmp: str) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    for name, text in files.items():
      (pathlib.Path(tmp) / name).write_text(text, encoding="utf-8")

  # Built in a local folder, then renamed (or uploaded) over an interrupted earlier attempt.
  hf_dir.write_dir(str(out), fill)
  return {"model_dir": str(out)}
