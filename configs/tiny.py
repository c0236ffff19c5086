r"""Tiny CPU smoke run: a 2-layer 32x32 CLIP, synthetic pairs, 20 steps in seconds.

Command:
  python -m gmail_jax.main --config=configs/tiny.py --workdir=/tmp/gmail_tiny
Hardware: any CPU (tests run it with 8 simulated devices).
Expected: finishes in well under a minute on 2 cores; train/loss falls from ~log(16)=2.77 and
train/pair_acc rises; a rerun with the same --workdir resumes and ends bitwise equal.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = common.get_base_config()
  c.total_steps = 20
  c.batch_size = 16
  c.log_every_steps = 5
  c.checkpoint_every_steps = 5
  c.keep_checkpoints = 2
  c.model.variant = "tiny"
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 2
  c.data.source = "synthetic"
  c.data.synthetic_size = 64
  c.data.synthetic_image_size = 32
  c.data.image_size = 32
  c.data.read_threads = 1
  c.data.prefetch = 1
  return c
