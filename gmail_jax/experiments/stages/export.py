"""Stage 'export': the trained student as a transformers directory and as a PEFT adapter.

Reads the align stage's run in WORKDIR and writes WORKDIR/export/hf (the student with LoRA merged:
``CLIPModel.from_pretrained``) and WORKDIR/export/peft (the LoRA adapter over the teacher:
``PeftModel.from_pretrained``), as ``python -m gmail_jax.export`` does (export/exporter.py), for
each format of ``config.export.formats``.

The run is loaded once, by every process (Orbax restores collectively), each onto its own local
device (the export does not depend on the topology); process 0 alone writes the directories.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

from gmail_jax import storage
from gmail_jax.errors import ConfigError
from gmail_jax.export import exporter

KEYS = ("export", "total_steps")
ON_CHANGE = "rerun"
ALL_PROCESSES = True  # load_run restores on every process; process 0 writes


def check(config: ml_collections.ConfigDict) -> None:
  unknown = [f for f in config.export.formats if f not in exporter.FORMATS]
  if unknown or not config.export.formats:
    raise ConfigError(
      f"config.export.formats: {list(config.export.formats)}; choose from {exporter.FORMATS}"
    )


def out_dir(workdir: pathlib.Path, fmt: str) -> pathlib.Path:
  return workdir / "export" / fmt


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  dirs = [storage.path(d) for d in outputs["dirs"].values() if d]
  # is_dir first: iterating a missing folder raises (and a bucket has no empty folders).
  return all(d.is_dir() and any(d.iterdir()) for d in dirs)


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  del inputs
  loaded = exporter.load(workdir)
  dirs = {}
  for fmt in config.export.formats:
    out = out_dir(workdir, fmt)
    if jax.process_index() == 0:
      exporter.write(loaded, out, format=fmt, force=True)
    dirs[fmt] = str(out)
  return {"dirs": dirs}
