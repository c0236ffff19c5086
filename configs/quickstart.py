r"""Quickstart: GMAIL end to end on an embedded dataset, no download, a few minutes on 2 CPU cores.

Command:
  python -m gmail_jax.main --config=configs/quickstart.py --workdir=/tmp/gmail_quickstart
  (``configs/quickstart.py:smoke`` = a much shorter run for tests.)

Data (gmail_jax/data/digits.py, materialised under WORKDIR/data by gmail_jax/data/splits.py):
  real      = sklearn's bundled UCI handwritten digit scans (8x8, 1,797 images);
  generated = digits rendered from matplotlib's TrueType fonts with affine jitter, stroke width,
              blur and pixel noise, downsampled like the scans (a documented stand-in for a
              generator); pairs share the class ("a photo of the digit seven.").
  30% of each is held out (WORKDIR/data/test) and never used to train anything.
Stages (``config.stages``, gmail_jax/experiments/driver.py), in one run:
  splits   train / held-out views under WORKDIR/data (gmail_jax/experiments/stages/splits.py);
  teacher  f_r: a tiny CLIP (ViT 16px/4, width 64, 2+2 layers) pretrained with the CLIP loss on
           the real train-split scans and template captions, saved as a HF CLIP directory
           WORKDIR/teacher/model (gmail_jax/experiments/stages/teacher.py);
  align    GMAIL: LoRA (rank 4, attention + MLP) student f_g aligned with L_align on
           generated->real pairs of the same class (the regular trainer, same-class negatives
           masked; config.init = the teacher directory);
  report   WORKDIR/report.json, report.md, tsne.png, curves.png (experiments/stages/report.py).
Measured (seeds 0, 1, 2, mean ± std; report.md per seed, ``gmail_jax.report --aggregate``):
paired gen-real cosine 0.468 ± 0.021 -> 0.669 ± 0.014 (ceiling for class-level pairs, two real
scans of one class under f_r: 0.854); probe transfer accuracy on held-out real scans
0.798 ± 0.010 (teacher on both) -> 0.965 ± 0.002 (GMAIL: f_g on generated, f_r on real), vs
0.749 ± 0.036 for fine-tuning the same LoRA (same targets, rank, steps) on generated images as if
real and 0.966 ± 0.004 for a probe trained on real scans.
Cost: 102-113 s wall, ~155 CPU-seconds in total (user + sys) on 2 cores.
"""

from __future__ import annotations

import ml_collections

from configs import common
from gmail_jax.data import digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c, smoke = common.class_pair_experiment(arg, "quickstart")
  c.total_steps = 40 if smoke else 300
  c.log_every_steps = 10
  c.checkpoint_every_steps = c.total_steps

  c.optim.warmup_steps = 10 if smoke else 20

  c.data.image_size = 8 if smoke else 16
  c.data.caption_template = "a photo of the digit {class}."

  c.splits.kind = "digits"
  c.splits.generated_per_class = 60 if smoke else 150
  c.splits.test_fraction = 0.3

  # The tiny CLIP teacher (stage 'teacher') on the real train-split scans.
  c.model.overrides = ml_collections.ConfigDict({"vision_patch_size": 4, "text_context_length": 16})
  c.teacher_pretrain.source = "folder"
  c.teacher_pretrain.path = ""  # "" = WORKDIR/data/train/real
  c.teacher_pretrain.templates = digits.CAPTION_TEMPLATES
  c.teacher_pretrain.steps = 60 if smoke else 250
  c.teacher_pretrain.warmup_steps = 10 if smoke else 25
  c.teacher_pretrain.max_per_class = 0  # 0 = all

  c.report.title = "GMAIL quickstart: handwritten scans (real) vs rendered digits (generated)"
  c.report.batch_size = 256
  c.report.synthetic_baseline = not smoke  # (tests/test_cifake.py covers it)
  c.report.tsne_points = 200 if smoke else 300
  return c
