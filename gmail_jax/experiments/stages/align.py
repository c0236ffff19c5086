"""Stage 'align': GMAIL / TPC-CMA training of the LoRA student (training/train.py) in WORKDIR.

Earlier stages' outputs become this stage's config: a teacher directory (``model_dir``, from the
'teacher' or 'init' stage) is its ``config.init``, a train split (``train``) its
``config.data.root``, prepared shards (``shards``) or else a generated manifest (``manifest``) its
data. The
config it trains with is written to WORKDIR/config.json, which is what ``run.load_run`` reads.
Resuming is the trainer's: a rerun continues from WORKDIR/checkpoints.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections

from gmail_jax.training import checkpointing, train

KEYS = None  # the whole config
ON_CHANGE = "rerun"  # the trainer resumes (and refuses what it cannot honour)
ALL_PROCESSES = True


def stage_config(
  config: ml_collections.ConfigDict, inputs: dict[str, Any]
) -> ml_collections.ConfigDict:
  """``config`` with the earlier stages' outputs wired in (a copy; ``config`` is not changed)."""
  c = ml_collections.ConfigDict(config.to_dict())
  if "model_dir" in inputs:
    c.init = inputs["model_dir"]
  if "train" in inputs:
    c.data.root = inputs["train"]
  if "shards" in inputs:  # the prepare stage's ArrayRecord shards of the manifest
    c.data.source, c.data.root = "array_record", inputs["shards"]
  elif "manifest" in inputs:
    c.data.source, c.data.manifest = "manifest", inputs["manifest"]
  return c


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    return ckpt.latest_step() == outputs["step"]
  finally:
    ckpt.close()


def check(config: ml_collections.ConfigDict) -> None:
  train.check(config)


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  train.train_and_evaluate(stage_config(config, inputs), str(workdir))
  return {"run": str(workdir), "step": int(config.total_steps)}
