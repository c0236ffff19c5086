r"""Quickstart: GMAIL's whole chain on an embedded dataset, no download, ~2 minutes on 2 CPU cores.

Command:
  python -m gmail_jax.main --config=configs/quickstart.py --workdir=/tmp/gmail_quickstart
  ``:rendered``       the rendered digits themselves as the generated modality (no generator);
  ``:smoke``          a much shorter run for tests (``:rendered,smoke`` for the rendered one).

Data (gmail_jax/data/digits.py, materialised under WORKDIR/data by gmail_jax/data/splits.py):
  real      = sklearn's bundled UCI handwritten digit scans (8x8, 1,797 images);
  rendered  = digits rendered from matplotlib's TrueType fonts with affine jitter, stroke width,
              blur and pixel noise, downsampled like the scans: the diffusion model's training
              data ("web data", another domain than the scans);
  generated = one image per caption of every real scan, drawn by that diffusion model
              (``:rendered``: the rendered digits); pairs share the class.
  30% of each is held out (WORKDIR/data/test) and never used to train anything.
Stages (``config.stages``, gmail_jax/experiments/driver.py), in one run:
  splits    train / held-out views under WORKDIR/data (experiments/stages/splits.py);
  teacher   f_r: a tiny CLIP (ViT 16px/4, width 64, 2+2 layers) pretrained with the CLIP loss on
            the real train-split scans and template captions, saved as a HF CLIP directory
            WORKDIR/teacher/model (experiments/stages/teacher.py);
  diffusion a pixel-space UNet2DConditionModel (8 px, 16/32 channels, 261k parameters, epsilon
            DDPM, 800 steps) on the rendered train digits, conditioned on the teacher's frozen
            text tower, written as a diffusers folder (experiments/stages/diffusion.py);
  generate  backend jax, DDIM 20 steps, guidance 3: one image per real scan's caption; they become
            both splits' generated sets (experiments/stages/generate.py);
  align     GMAIL: LoRA (rank 4, attention + MLP) student f_g aligned with L_align on
            generated->real pairs of the same class (the regular trainer, same-class negatives
            masked; config.init = the teacher directory);
  report    WORKDIR/report.json, report.md, tsne.png, curves.png, samples.png.
Measured (seeds 0, 1, 2, mean ± std; ``gmail_jax.report --aggregate``; results/quickstart/):
  default: paired gen-real cosine 0.543 ± 0.007 -> 0.778 ± 0.007; probe transfer accuracy on
  held-out real scans 0.774 ± 0.016 (teacher on both) -> 0.962 ± 0.003 (GMAIL), vs 0.724 ± 0.028
  fine-tuning the same LoRA on generated images as if real and 0.964 ± 0.003 for a probe trained
  on real scans; a real-image probe names the captioned class of 0.565 ± 0.011 of the generated
  images (chance 0.1). 125-150 s wall on 2 cores.
  :rendered: cosine 0.468 ± 0.021 -> 0.669 ± 0.014; transfer 0.798 ± 0.010 -> 0.965 ± 0.002, as if
  real 0.749 ± 0.036, real probe 0.966 ± 0.004. 102-113 s wall, ~155 CPU-seconds.
"""

from __future__ import annotations

import ml_collections

from configs import common
from gmail_jax.data import digits

GENERATORS = ("diffusion", "rendered")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # The generator combines with the mode: ``:rendered``, ``:smoke`` (diffusion, short),
  # ``:rendered,smoke``; ``diffusion`` is the default.
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  generators = [p for p in parts if p in GENERATORS]
  if len(generators) > 1:
    raise ValueError(f"configs/quickstart.py:{arg}: one generator of {GENERATORS}")
  generator = generators[0] if generators else "diffusion"
  mode = ",".join(p for p in parts if p not in GENERATORS) or None
  c, smoke = common.class_pair_experiment(mode, "quickstart")
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
  if generator == "diffusion":
    with_diffusion(c, smoke)
  return c


def with_diffusion(c: ml_collections.ConfigDict, smoke: bool) -> None:
  """The default generator: the generated modality drawn by a text-to-image model trained here.

  Stage 'diffusion' trains a pixel-space UNet2DConditionModel (8 px, 16/32 channels, ~260k
  parameters) on the train split's rendered digits (its "web data"), conditioned on the teacher's
  frozen text tower; 'generate' (backend jax) draws one image per caption of every real scan
  (a template drawn from the seed), and those images replace the rendered ones in both splits.
  """
  c.stages = ("splits", "teacher", "diffusion", "generate", "align", "report")
  d = c.diffusion
  d.templates = digits.CAPTION_TEMPLATES
  d.block_out_channels = (16, 32)
  d.steps = 20 if smoke else 800
  d.batch_size = 64
  d.warmup_steps = 10 if smoke else 50
  d.checkpoint_every_steps = 10 if smoke else 200
  d.prompts_per_class = 10 if smoke else 0  # 0 = one image per real scan (1,797)
  g = c.generate
  g.backend = "jax"
  g.model = g.captions = g.revision = ""  # model and captions: the diffusion stage's
  g.resolution = d.resolution
  g.steps = 4 if smoke else 20
  g.guidance = 3.0
  g.dtype = "float32"
  g.batch_size, g.chunk_size = 256, 512
  g.image_format = "png"  # 8 px digits: lossless
  g.progress_every_s = 30.0
  c.report.title = (
    "GMAIL quickstart: handwritten scans (real) vs digits drawn by a diffusion model trained here"
  )
