"""Stage 'generate': captions -> generated images and their manifest (gmail_jax/generation/).

Reads ``config.generate`` (a generation config: ``schema.generation_config()``), writes
WORKDIR/generate/ (images, parts, manifest.parquet) and outputs {'manifest'}: the align stage then
trains on it (``data.source='manifest'``). Every process generates its share (shard = process
index); process 0 writes the manifest once all are done. A rerun resumes; a changed value that
defines the images is refused by the generator's own plan (WORKDIR/generate/generate.json).

In one process with JAX on a GPU, JAX preallocates most of the GPU memory before this stage runs:
either run ``python -m gmail_jax.generate`` first (launch/generate_multi_gpu.sh) or set
XLA_PYTHON_CLIENT_PREALLOCATE=false.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from gmail_jax.experiments import driver
from gmail_jax.generation import config as generation_config
from gmail_jax.generation import importer, runner, store

KEYS = ("generate",)
ON_CHANGE = "rerun"  # the generator resumes, and refuses changes that would mix settings
ALL_PROCESSES = True


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  del workdir
  return pathlib.Path(outputs["manifest"]).is_file()


def check(config: ml_collections.ConfigDict) -> None:
  gen = config.generate
  generation_config.check(gen)
  paths = {"generate.captions": gen.captions, "generate.real_images": gen.real_images}
  if gen.mode == "import":
    paths["generate.import_dir"] = gen.import_dir
  driver.require_paths(config, paths)


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  del inputs
  gen = config.generate
  out = pathlib.Path(workdir) / "generate"
  index, count = jax.process_index(), jax.process_count()
  if gen.mode == "import":
    if index == 0:
      importer.import_images(gen, out)
  else:
    runner.generate(gen, out, shard_index=index, num_shards=count, finalize_when_done=count == 1)
    if count > 1:
      multihost_utils.sync_global_devices("generate: every shard done")
      if index == 0 and runner.finalize(gen, out) is None:
        raise RuntimeError(f"{out}: chunks missing after every shard finished")
  if count > 1:
    multihost_utils.sync_global_devices("generate: manifest written")
  return {"manifest": str(store.manifest_path(out))}
