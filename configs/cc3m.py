r"""GMAIL scaled to CC3M captions (3.3M generated/real pairs, paper §4 scaling study).

Command (TPU pod; see launch/tpu_pod.sh; the evaluation, ClipCap and export stages follow):
  python -m gmail_jax.main --config=configs/cc3m.py:B/16 --workdir=gs://BUCKET/gmail_cc3m \
      --config.data.root=gs://BUCKET/cc3m_pairs
Data: the real images as webdataset tars (img2dataset), one generated image per caption
(``python -m gmail_jax.generate`` on the captions, or mode='import'), then ArrayRecord shards:
``python -m gmail_jax.data.prepare --src=TARS --gen_dir=GEN --out=gs://BUCKET/cc3m_pairs`` (the
README's "Reproduce GMAIL" and "Running on a pod" sections; a local --out works the same);
evaluations as configs/coco.py (configs/common.py DATASETS).
Hardware: TPU v4-64 (or 4 nodes x 8 A100 via launch/slurm_multinode.sbatch); ~1 day for 100k steps.
Expected: larger retrieval/captioning gains than COCO-only alignment (paper scaling table:
CC3M > COCO, CC12M > CC3M). Not run here (no accelerator, no weights).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.paper_config(arg, shards="/data/cc3m_pairs", total_steps=100_000)
