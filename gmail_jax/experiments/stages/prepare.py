"""Stage 'prepare': the generated pairs as ArrayRecord shards (``gmail_jax.data.prepare``).

Reads the generate stage's manifest (``inputs['manifest']``: caption, real_path, gen_path, group)
and writes WORKDIR/shards/ (pairs-*.array_record, index.npz, meta.json, rejects.jsonl), which the
align stage then trains on (``data.source='array_record'``, ``data.root``). Images are stored
resized once (``config.prepare``: short side, JPEG quality), so training only decodes small JPEGs.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from gmail_jax import storage
from gmail_jax.data import prepare
from gmail_jax.errors import StageError

KEYS = ("prepare",)
ON_CHANGE = "refuse"
ALL_PROCESSES = False  # host work (worker processes, no collective): process 0 writes the shards


def shards_dir(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "shards"


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  meta = storage.path(outputs["shards"]) / "meta.json"
  return meta.is_file() and json.loads(meta.read_text()).get("num_records") == outputs["records"]


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  if "manifest" not in inputs:
    raise StageError("stage 'prepare': no manifest to prepare (list 'generate' before it)")
  p = config.prepare
  out = shards_dir(workdir)
  meta = prepare.prepare(
    inputs["manifest"],
    str(out),
    kind="manifest",
    shard_size=int(p.shard_size),
    num_workers=int(p.num_workers),
    resize_short=int(p.resize_short),
    quality=int(p.quality),
  )
  return {"shards": str(out), "records": int(meta["num_records"])}
