"""Stage 'splits': train / held-out views of a class-folder dataset under WORKDIR/data.

``config.splits.kind = 'digits'`` renders the quickstart's data; ``'class_folders'`` splits
``config.data.root`` (real/ and generated/ class folders) per class with ``config.splits.seed``
(gmail_jax/data/splits.py). Outputs {'train', 'test'}: later stages train on ``train`` (the align
stage's ``data.root``, the teacher's real images) and measure on ``test`` only.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections

from gmail_jax.data import splits

KEYS = ("splits", "data.root")
ON_CHANGE = "refuse"  # the teacher and the aligned student were trained on this split
ALL_PROCESSES = False  # files only (numpy, PIL): process 0 writes them, the others wait


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  del workdir
  return all(pathlib.Path(outputs[k]).is_dir() for k in ("train", "test"))


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  del inputs
  out = splits.materialize(config.splits, config.data.root, workdir)
  return {"train": out["train"], "test": out["test"]}
