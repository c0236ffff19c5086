"""Stage 'splits': train / held-out views of a class-folder dataset under WORKDIR/data.

``config.splits.kind = 'digits'`` renders the quickstart's data; ``'class_folders'`` splits
``config.data.root`` (real/ and generated/ class folders) per class with ``config.splits.seed``
(gmail_jax/data/splits.py). Outputs {'train', 'test'}: later stages train on ``train`` (the align
stage's ``data.root``, the teacher's real images) and measure on ``test`` only.

A bucket WORKDIR (``gs://``): the views are built in a local temp folder (as files, not links) and
uploaded, so later stages read them from the bucket like any dataset there.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

import ml_collections

from gmail_jax import storage
from gmail_jax.data import splits

KEYS = ("splits", "data.root")
ON_CHANGE = "refuse"  # the teacher and the aligned student were trained on this split
ALL_PROCESSES = False  # files only (numpy, PIL): process 0 writes them, the others wait


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  del workdir
  return all(storage.path(outputs[k]).is_dir() for k in ("train", "test"))


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  del inputs
  root = config.data.root
  if root and storage.is_remote(root):  # class folders in a bucket: split a local copy
    root = os.fspath(storage.fetch_dir(root))
  if not storage.is_remote(workdir):
    out = splits.materialize(config.splits, root, workdir)
    return {"train": out["train"], "test": out["test"]}
  with tempfile.TemporaryDirectory(prefix="gmail_jax-splits-") as tmp:
    splits.materialize(config.splits, root, tmp)
    storage.upload_tree(pathlib.Path(tmp) / "data", workdir / "data")
  return {split: storage.join(workdir, "data", split) for split in ("train", "test")}
