"""Stage 'generate': captions -> generated images and their manifest (gmail_jax/generation/).

Reads ``config.generate`` (a generation config: ``schema.generation_config()``), writes
WORKDIR/generate/ (images, parts, manifest.parquet) and outputs {'manifest'}: the align stage then
trains on it (``data.source='manifest'``). Every process generates its share (shard = process
index); process 0 writes the manifest once all are done. A rerun resumes; a changed value that
defines the images is refused by the generator's own plan (WORKDIR/generate/generate.json).

In one process with JAX on a GPU, JAX preallocates most of the GPU memory before this stage runs:
either run ``python -m gmail_jax.generate`` first (launch/generate_multi_gpu.sh) or set
XLA_PYTHON_CLIENT_PREALLOCATE=false.

After a 'diffusion' stage (configs/quickstart.py:diffusion) the model and the captions are that
stage's outputs (``generator``, ``prompts``: one caption per real image of the splits), so
``generate.model`` and ``generate.captions`` stay ''; the images then replace the splits'
generated/ sets: the outputs are {'generated': the manifest, 'train', 'test': class-folder views
(data/splits.py ``generated_views``)}, which the align and report stages read as the splits'.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from gmail_jax import storage
from gmail_jax.data import splits
from gmail_jax.errors import ConfigError
from gmail_jax.experiments import driver
from gmail_jax.generation import config as generation_config
from gmail_jax.generation import importer, runner, store

KEYS = ("generate",)
ON_CHANGE = "rerun"  # the generator resumes, and refuses changes that would mix settings
ALL_PROCESSES = True
# Earlier stages' outputs that fill generation keys: the 'diffusion' stage's model and captions.
UPSTREAM = {"generator": "model", "prompts": "captions"}


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  del workdir
  return all(storage.path(p).exists() for p in outputs.values())


def fed(config: ml_collections.ConfigDict) -> bool:
  """True when a 'diffusion' stage before this one supplies the model and the captions."""
  names = list(config.stages)
  return "diffusion" in names[: names.index("generate")]


def generation(
  config: ml_collections.ConfigDict, inputs: dict[str, Any]
) -> ml_collections.ConfigDict:
  """``config.generate`` with the UPSTREAM outputs found in ``inputs`` filled in (a copy)."""
  gen = ml_collections.ConfigDict(config.generate.to_dict())
  for output, key in UPSTREAM.items():
    if output in inputs:
      gen[key] = inputs[output]
  return gen


def check(config: ml_collections.ConfigDict) -> None:
  gen = config.generate
  if fed(config):
    for key in UPSTREAM.values():
      if gen[key]:
        raise ConfigError(
          f"config.generate.{key}={gen[key]!r}: the 'diffusion' stage before 'generate' supplies"
          " it; leave it ''"
        )
    gen = generation(config, {k: "(stage diffusion)" for k in UPSTREAM})
  generation_config.check(gen)
  paths = {} if fed(config) else {"generate.captions": gen.captions}
  paths["generate.real_images"] = gen.real_images
  if gen.mode == "import":
    paths["generate.import_dir"] = gen.import_dir
  driver.require_paths(config, paths)


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  gen = generation(config, inputs)
  out = workdir / "generate"  # not pathlib.Path(workdir): that mangles a gs:// WORKDIR
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
  manifest = str(store.manifest_path(out))
  if "prompts" in inputs:
    # The captions are the splits' real images': the images become the splits' generated/ sets.
    # No 'manifest' output: the align stage would train on it, held-out rows included.
    views = splits.generated_views(manifest, out / "views") if index == 0 else {}
    if count > 1:  # the driver hands every process process 0's outputs
      multihost_utils.sync_global_devices("generate: views written")
    return {"generated": manifest, **views}
  if count > 1:
    multihost_utils.sync_global_devices("generate: manifest written")
  return {"manifest": manifest}
