"""The generation config family: value checks, and the plan that pins what the images mean.

Every key and its default is in ``schema.generation_config()`` (``configs/generate/*.py`` start
from it). ``check`` refuses unknown keys and values that cannot work, before anything loads.
``plan`` / ``check_plan``: DIR/generate.json records the values that define the images (PLAN_KEYS)
and the captions' fingerprint; a rerun with other values is refused by name.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import ml_collections

from gmail_jax import schema, storage
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.generation.captions import Captions
from gmail_jax.generation.seeds import NOISE
from gmail_jax.generation.store import num_chunks

MODES = ("generate", "import")
DTYPES = ("auto", "float32", "float16", "bfloat16")
IMAGE_FORMATS = {"jpeg": "jpg", "png": "png"}
RANDOM_SHAPES = ("tiny", "sd21")
PLAN = "generate.json"
# config.backend -> the module that runs the text-to-image model (one module per backend).
BACKENDS = {
  "diffusers": "gmail_jax.generation.diffusers_backend",
  "jax": "gmail_jax.generation.jax_backend",
}
WEIGHTS = "weights.json"
# Values that define the images (a resumed run must use the same ones). Paths are left out: the
# captions are compared by content, and real_path / group are joined when the manifest is written.
# batch_size is not one: the noise is drawn per image, so a rerun may use another (the OOM fix).
PLAN_KEYS = (
  "split", "only_with_real", "max_captions", "images_per_caption", "model", "random", "scheduler",
  "steps", "guidance", "resolution", "negative_prompt", "dtype", "chunk_size", "seed",
  "safety_checker", "long_prompt", "image_format", "jpeg_quality",
)  # fmt: skip


def check(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for an unknown or missing key or a value that cannot work."""
  base = schema.generation_config()
  for group, node, ref in (("", config, base), ("random.", config.get("random"), base.random)):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"config.{group or 'random'}: expected a group of keys")
    for key in node:
      if key not in ref:
        raise ConfigError(
          f"config.{group}{key}: unknown key of a generation config (known: {sorted(ref)})"
        )
    for key in ref:
      if key not in node:
        raise ConfigError(f"config.{group}{key}: missing (start from schema.generation_config())")
  if config.backend not in BACKENDS:
    raise ConfigError(f"config.backend: {config.backend!r} not in {sorted(BACKENDS)}")
  backend_check = getattr(importlib.import_module(BACKENDS[config.backend]), "check", None)
  if backend_check is not None and config.mode == "generate":
    backend_check(config)
  if config.mode not in MODES:
    raise ConfigError(f"config.mode: {config.mode!r} not in {MODES}")
  if not config.captions:
    raise ConfigError("config.captions: empty; name a COCO / Karpathy JSON or a CSV/JSONL/Parquet")
  for key in ("images_per_caption", "steps", "batch_size", "chunk_size"):
    if int(config[key]) < 1:
      raise ConfigError(f"config.{key}: must be >= 1, got {config[key]}")
  if config.retries < 0:
    raise ConfigError(f"config.retries: must be >= 0, got {config.retries}")
  if config.max_captions < 0:
    raise ConfigError(f"config.max_captions: must be >= 0 (0 = all), got {config.max_captions}")
  if config.resolution < 8 or config.resolution % 8:
    raise ConfigError(f"config.resolution: a multiple of 8, got {config.resolution}")
  if config.dtype not in DTYPES:
    raise ConfigError(f"config.dtype: {config.dtype!r} not in {DTYPES}")
  if config.image_format not in IMAGE_FORMATS:
    raise ConfigError(f"config.image_format: {config.image_format!r} not in jpeg, png")
  if not 1 <= config.jpeg_quality <= 100:
    raise ConfigError(f"config.jpeg_quality: 1..100, got {config.jpeg_quality}")
  if config.long_prompt not in ("truncate", "reject"):
    raise ConfigError(f"config.long_prompt: {config.long_prompt!r} not in truncate, reject")
  if not config.safety_checker:
    raise ConfigError("config.safety_checker: empty; use 'none', 'pipeline' or a checker path")
  if config.model == "random" and config.random.shapes not in RANDOM_SHAPES:
    raise ConfigError(f"config.random.shapes: {config.random.shapes!r} not in {RANDOM_SHAPES}")
  if config.mode == "import" and not config.import_dir:
    raise ConfigError("config.import_dir: empty; mode='import' reads images from it")


# ---------------------------------------------------------------------------------------- plan


def make_plan(config: ml_collections.ConfigDict, captions: Captions, dtype: str) -> dict:
  values = json.loads(config.to_json_best_effort())
  plan = {k: values[k] for k in PLAN_KEYS}
  plan["dtype"] = dtype  # resolved: 'auto' means float16 on a GPU and float32 on a CPU
  folder = storage.is_remote(config.model) or pathlib.Path(config.model).is_dir()
  if config.revision and not folder and config.model != "random":
    plan["revision"] = config.revision  # a hub id's snapshot (a local directory has none)
  n_items = len(captions) * config.images_per_caption
  return {
    "config": plan,
    "noise": NOISE,  # where the starting latents come from: part of what defines the images
    "captions": {"count": len(captions), "sha256": captions.fingerprint()},
    "items": n_items,
    "chunks": num_chunks(n_items, config.chunk_size),
  }


def check_plan(workdir: storage.Path, plan: dict) -> None:
  """Writes DIR/generate.json (exclusively: of shards starting together, one writes it), or
  refuses values that differ from the recorded ones."""
  path = workdir / PLAN
  if storage.create_exclusive(path, json.dumps(plan, indent=2, sort_keys=True).encode()):
    return
  old = json.loads(path.read_text())
  # Workdirs of earlier versions drew torch's per-image CPU generator: other images, never mixed.
  old_noise = old.get("noise", "torch-cpu-generator")
  if old_noise != plan["noise"]:
    raise ConfigError(
      f"{path}: the images there started from {old_noise} noise, this version draws"
      f" {plan['noise']}; finish them with the version that started them, or use a new --workdir"
    )
  changed = [k for k in plan["config"] if old["config"].get(k) != plan["config"][k]]
  if changed:
    k = changed[0]
    raise ConfigError(
      f"config.{k}: {plan['config'][k]!r} differs from {old['config'].get(k)!r} that {path}"
      " records for the images already there; use the original value or a new --workdir"
    )
  if old["captions"] != plan["captions"]:
    raise InputError(
      f"config.captions: not the captions {path} was generated for ({old['captions']['count']}"
      f" then, {plan['captions']['count']} now, or changed text); use a new --workdir"
    )


def check_weights(workdir: storage.Path, model: str, fingerprint: str) -> None:
  """Records the loaded weights' fingerprint in DIR/weights.json on first load; refuses weights
  that differ from those the images already there were generated with (a changed upload, another
  snapshot or directory under the same name)."""
  path = workdir / WEIGHTS
  record = {"model": model, "sha256": fingerprint}
  if storage.create_exclusive(path, json.dumps(record, indent=2).encode()):
    return
  old = json.loads(path.read_text())
  if old["sha256"] != fingerprint:
    raise ConfigError(
      f"config.model: the weights loaded from {model!r} (sha256 {fingerprint[:12]}...) are not"
      f" those {path} records for the images already there ({old['model']!r}, sha256"
      f" {old['sha256'][:12]}...); pin the original revision or use a new --workdir"
    )
