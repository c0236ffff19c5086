r"""GMAIL on COCO: align SD-v2 images generated from COCO (Karpathy train) captions to real ones.

Command (one 8-GPU host; see launch/local_gpu.sh):
  python -m gmail_jax.main --config=configs/coco.py:B/16 --workdir=$WORKDIR \
      --config.data.manifest=/data/coco_gen/manifest.parquet
  (``:L/14`` for ViT-L/14; ``:variant=B/16,runlocal=True`` for a 10-step wiring check.)
Hardware: 8x A100-80GB or a TPU v4-32 slice; ~10 h for 60k steps at batch 256 (paper Table 12).
Expected: held-out gen->real pair accuracy well above the frozen CLIP's, and the COCO/Flickr
retrieval gains of GMAIL Table 3 when the aligned encoder is used downstream (paper: CLIP ViT-B/16
COCO I2T R@1 +~3 points). Manifest columns: caption, real_path, gen_path, group (= real image id,
so the 5 captions of one image are never each other's negatives).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.paper_config(arg, manifest="/data/coco_gen/manifest.parquet", total_steps=60_000)
