r"""Tiny generation smoke run: a random StableDiffusionPipeline built offline, 40 COCO captions.

Command:
  python -m gmail_jax.generate --config=configs/generate/tiny.py --workdir=/tmp/gen_tiny
  python -m gmail_jax.main --config=configs/tiny.py --workdir=/tmp/gen_tiny_train \
      --config.data.source=manifest --config.data.manifest=/tmp/gen_tiny/manifest.parquet \
      --config.model.variant=mu --config.data.image_size=16
Hardware: any CPU. The pipeline (32-wide UNet, VAE and CLIP text encoder with SD's CLIP BPE, DDIM;
random weights, nothing downloaded) is saved into WORKDIR/pipeline on the first run and loaded
from there. Expected: 80 images of 32 px (40 captions of the COCO val2017 photos in
../shared/data/coco-mini, K=2, 2 steps) in ~4 s once torch is loaded (~20 images/s with
OMP_NUM_THREADS=1; on a busy 2-core machine torch's default 2 threads are ~10x slower); the
manifest trains as is (real_path points at the COCO photos).
"""

from __future__ import annotations

import pathlib

import ml_collections

from gmail_jax import schema

SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = schema.generation_config()
  c.captions = str(SHARED / "coco-captions-val2017" / "captions_val2017.json")
  c.real_images = str(SHARED / "coco-mini" / "val2017")
  c.only_with_real = True
  c.max_captions = 40
  c.images_per_caption = 2
  c.model = "random"
  c.random.shapes = "tiny"
  c.steps = 2
  c.resolution = 32  # latents of 16 px (the tiny VAE halves)
  c.dtype = "float32"
  c.device = "cpu"
  c.batch_size = 4
  c.chunk_size = 16
  return c
