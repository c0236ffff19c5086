r"""GMAIL scaled to CC12M captions (12M generated/real pairs; the paper's largest setting).

Command (multi-host TPU pod; see launch/tpu_pod.sh):
  python -m gmail_jax.main --config=configs/cc12m.py:L/14 --workdir=gs://BUCKET/gmail_cc12m \
      --config.data.root=gs://BUCKET/cc12m_pairs --config.mesh.fsdp=4
Data: as configs/cc3m.py, with the shards written straight into the bucket (each staged
locally, uploaded whole; resumable, one share per host):
  srun --ntasks=16 python -m gmail_jax.data.prepare --src=TARS --gen_dir=GEN \
      --out=gs://BUCKET/cc12m_pairs
array_record reads the gs:// shards itself (Application Default Credentials; more
config.data.read_threads hide the per-record latency); where it cannot, mount the bucket with
Cloud Storage FUSE (gcsfuse BUCKET /gcs/BUCKET) and set --config.data.root=/gcs/BUCKET/cc12m_pairs.
The stages after training (evaluation, ClipCap, export): as configs/cc3m.py.
Hardware: TPU v4-128 or 8 nodes x 8 A100-80GB (launch/slurm_multinode.sbatch); ~2-3 days for
200k steps of ViT-L/14 (remat on, bf16, FSDP over 4 devices).
Expected: the best alignment of the scaling study (paper: CC12M > CC3M > COCO on retrieval and
zero-shot classification with the aligned encoder).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.paper_config(arg, shards="/data/cc12m_pairs", total_steps=200_000)
  c.checkpoint_every_steps = 2000
  return c
