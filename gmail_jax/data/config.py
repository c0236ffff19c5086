"""Defaults of ``config.data`` (the training config puts this ConfigDict under ``data``)."""

from __future__ import annotations

import ml_collections

from gmail_jax.errors import ConfigError

SOURCES = ("manifest", "class_folders", "array_record", "tfds", "synthetic")
POLICIES = ("skip", "fail")


def default_data_config() -> ml_collections.ConfigDict:
  """``config.data`` with every key the input pipeline reads.

  source:            manifest | class_folders | array_record | tfds | synthetic
  manifest:          CSV / JSONL / Parquet with ``caption, real_path, gen_path[, group]``
  root:              base dir: class-folder root (``real/<cls>``, ``generated/<cls>``), ArrayRecord
                     dir written by ``gmail_jax.data.prepare``, or the base of relative manifest
                     paths (default: the manifest's own directory). Manifest, images, class
                     folders and shards may be in a bucket (``gs://…``; data/sources.py)
  on_bad_input:      skip (log to WORKDIR/rejects.jsonl, go on) | fail (stop, one-line error)
  num_workers:       grain worker processes (0 = decode in the main process with threads)
  read_threads:      threads per process that read + decode (PIL decodes and resizes without the
                     GIL: threads use several cores; workers also cost a process and a hand-over).
                     From a bucket every record or image is one request, so more threads hide
                     its latency
  prefetch:          batches buffered per worker (or elements per thread without workers)
  image_size:        side of the uint8 center crops shipped to the device
  gens_per_caption:  generated images used per (real image, caption) item and epoch; the others
                     rotate in on later epochs. 0 = all of them every epoch
  augment_generated: random resized crop + horizontal flip on generated images only
  draft_decode:      decode JPEGs >= 4x image_size (short side) at 1/2-1/8 scale (libjpeg DCT
                     scaling) before the resize; faster, but pixels differ from the exact CLIP
                     preprocessing (coco-mini at 64 px: mean |diff| ~1/255, up to ~8/255 on
                     textured photos). Off by default; not applied to augmented generated images.
                     Prefer ``gmail_jax.data.prepare`` (stores images resized once), or its
                     ``--store=train`` (stores the crops: training only decodes a 224 px JPEG)
  caption_template:  class-folder captions, ``{class}`` is the folder name (underscores -> spaces)
  synthetic_size / synthetic_image_size: the synthetic source (tests, benchmarks)
  tfds_*:            TFDS ``data_source`` name/split/data_dir and the feature keys to read
  """
  c = ml_collections.ConfigDict()
  c.source = "manifest"
  c.manifest = ml_collections.config_dict.placeholder(str)
  c.root = ml_collections.config_dict.placeholder(str)
  c.on_bad_input = "skip"
  c.num_workers = 0
  c.read_threads = 4
  c.prefetch = 2
  c.image_size = 224
  c.gens_per_caption = 1
  c.augment_generated = False
  c.augment_scale = (0.5, 1.0)
  c.draft_decode = False
  c.caption_template = "a photo of a {class}."
  c.synthetic_size = 256
  c.synthetic_image_size = 64
  c.tfds_name = ml_collections.config_dict.placeholder(str)
  c.tfds_split = "train"
  c.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  c.tfds_gen_key = "generated_image"
  c.tfds_real_key = "image"
  c.tfds_caption_key = "caption"
  c.tfds_group_key = ml_collections.config_dict.placeholder(str)
  return c


def validate(data: ml_collections.ConfigDict) -> None:
  """One-line errors for impossible settings (before any worker starts)."""
  if data.source not in SOURCES:
    raise ConfigError(f"config.data.source={data.source!r}: expected one of {', '.join(SOURCES)}")
  if data.on_bad_input not in POLICIES:
    raise ConfigError(f"config.data.on_bad_input={data.on_bad_input!r}: expected skip or fail")
  if data.source == "manifest" and not data.manifest:
    raise ConfigError("config.data.source='manifest' needs config.data.manifest=PATH")
  if data.source in ("class_folders", "array_record") and not data.root:
    raise ConfigError(f"config.data.source={data.source!r} needs config.data.root=DIR")
  if data.source == "tfds" and not data.tfds_name:
    raise ConfigError("config.data.source='tfds' needs config.data.tfds_name=NAME")
  if data.image_size < 1 or data.gens_per_caption < 0 or data.num_workers < 0:
    raise ConfigError("config.data: image_size >= 1, gens_per_caption >= 0, num_workers >= 0")
