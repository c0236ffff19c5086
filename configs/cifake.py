r"""GMAIL on CIFAKE: real CIFAR-10 photos vs Stable Diffusion 1.4 images of the same class.

Command (3 seeds, then mean ± std):
  for s in 0 1 2; do
    python -m gmail_jax.main --config=configs/cifake.py --workdir=/tmp/gmail_cifake_s$s \
        --config.seed=$s --config.data.root=../shared/data/cifake-sd14-test-sample \
        --config.teacher_pretrain.path=../shared/data/cifar10-test-jpeg/cifar10_test_jpeg.zip
  done
  python -m gmail_jax.report --aggregate /tmp/gmail_cifake_s0 /tmp/gmail_cifake_s1 \
      /tmp/gmail_cifake_s2 --out /tmp/gmail_cifake_3seeds.json
  (``configs/cifake.py:smoke`` = a short run on a subset, used by tests/test_cifake.py.)
  ``teacher_pretrain.path`` may be omitted when the zip sits at
  ``<data.root>/../cifar10-test-jpeg/cifar10_test_jpeg.zip`` (the shared data layout).

Data: ``data.root`` holds real/<class>/NNNN.jpg (CIFAR-10 test photos) and generated/<class>/
NNNN.jpg (SD 1.4, CIFAKE), 32x32, paired by class. splits.py holds out 100 real + 100 generated
images per class (fixed split seed, the same for every --config.seed) as the test set; the rest
is the alignment / probe training split. The teacher is pretrained on the CIFAR-10 test photos in
the zip that are NOT under data.root/real (same class + file name = byte-identical image), so no
image is used both to train and to evaluate.
Stages: tiny CLIP teacher (ViT 32px/8, width 64, 2+2 layers) pretrained with the CLIP loss on
those photos and "a photo of a {class}." templates -> GMAIL LoRA alignment -> report.
Hardware: CPU, ~7 min per seed on 2 quiet cores (~390 CPU-s). Deterministic: the same seed gives
the same report.json, byte for byte.
Measured (3 seeds, mean ± std): the from-scratch tiny teacher is weak (zero-shot 0.37 on real,
0.39 on generated; probe trained on real 0.390) and shows no class-level gen-real gap: paired
gen-real cosine 0.435 ± 0.033 vs 0.426 ± 0.027 for two real photos of a class. L_align then has
no signal and collapses the student (paired cosine 0.160 ± 0.027, centroid gap 0.12 -> 0.99);
transfer is unchanged within noise (0.362 ± 0.016 -> 0.350 ± 0.011; fine-tuning the same LoRA on
generated as if real 0.351 ± 0.016). This does NOT reproduce GMAIL Table 14; a meaningful CIFAKE
test needs a pretrained CLIP teacher.
"""

from __future__ import annotations

import ml_collections

from configs import common

CIFAR_TEMPLATES = (
  "a photo of a {name}.",
  "a blurry photo of a {name}.",
  "a low resolution photo of a {name}.",
  "a photo of the {name}.",
  "a close-up photo of a {name}.",
  "a bright photo of a {name}.",
  "a cropped photo of a {name}.",
  "a photo of a small {name}.",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c, smoke = common.class_pair_experiment(arg, "cifake")
  c.total_steps = 20 if smoke else 400
  c.log_every_steps = 10 if smoke else 25
  c.checkpoint_every_steps = c.total_steps

  c.optim.warmup_steps = 5 if smoke else 30

  c.data.image_size = 16 if smoke else 32
  c.data.caption_template = "a photo of a {class}."

  c.splits.kind = "class_folders"
  c.splits.test_per_class = 10 if smoke else 100
  c.splits.train_per_class = 30 if smoke else 0  # 0 = all the rest

  c.model.overrides = ml_collections.ConfigDict(
    {"vision_patch_size": 8 if not smoke else 4, "text_context_length": 16}
  )
  c.teacher_pretrain.source = "zip"
  c.teacher_pretrain.path = ""  # "" = <data.root>/../cifar10-test-jpeg/cifar10_test_jpeg.zip
  c.teacher_pretrain.zip_prefix = "test"
  c.teacher_pretrain.templates = CIFAR_TEMPLATES
  c.teacher_pretrain.steps = 30 if smoke else 600
  c.teacher_pretrain.warmup_steps = 5 if smoke else 50
  c.teacher_pretrain.max_per_class = 40 if smoke else 0

  c.report.title = "GMAIL on CIFAKE: CIFAR-10 photos (real) vs Stable Diffusion 1.4 (generated)"
  c.report.batch_size = 250
  c.report.synthetic_baseline = True
  c.report.tsne_points = 100 if smoke else 1000
  return c
