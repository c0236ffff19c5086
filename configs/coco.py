r"""GMAIL on COCO, the paper's recipe as one experiment: generate -> prepare -> align -> evaluate ->
caption -> export.

Command (one 8-GPU host; see launch/local_gpu.sh; every stage resumes and is skipped when done):
  python -m gmail_jax.main --config=configs/coco.py:B/16 --workdir=$WORKDIR
  (``:L/14`` for ViT-L/14; ``:variant=B/16,manifest=/data/coco_gen/manifest.parquet`` trains on
  images generated beforehand (launch/generate_multi_gpu.sh) and skips generate and prepare.)
Stages: SD 2.1 base images for the Karpathy train+restval captions (configs/generate/coco_sd21.py)
-> ArrayRecord shards -> GMAIL alignment of CLIP (openai/clip-vit-base-patch16) -> COCO-5k
(Karpathy test) and Flickr30k-1k retrieval, ImageNet zero-shot (CLIP's 1,000 class names and 80
prompts) -> ClipCap on the aligned encoder (Karpathy test) -> WORKDIR/export/{hf,peft}.
Data: configs/common.py DATASETS (paths and how to get them; a missing one is named in one line
before anything is built). Hardware: 8x A100-80GB or a TPU v4-32 slice; ~10 h for 60k steps at
batch 256 (paper Table 12), plus ~5 GPU-days of generation.
Expected: held-out gen->real pair accuracy well above the frozen CLIP's, and the COCO/Flickr
retrieval gains of GMAIL Table 3 (paper: CLIP ViT-B/16 COCO I2T R@1 +~3 points). Not run here (no
GPU, no weights).

``configs/coco.py:mini`` is the same chain offline on 2 CPU cores (the test suite runs it): a
random tiny CLIP saved as a transformers checkpoint (stage 'init', standing in for the download),
the tiny random diffusion pipeline generating one 32 px image for each of the first 100 captions
of coco-mini's train photos, those pairs as shards, 40 alignment steps, retrieval on coco-mini's
159 val photos with all their COCO captions and CIFAR-10 zero-shot (200 photos), ClipCap trained
on the generated pairs and tested on 16 val photos, and both exports. It checks the wiring, not
quality: random towers and a random generator give chance-level numbers.
Measured (mini, seed 0, a quiet 2-core machine): 29 s wall (32 s with METEOR); loss 3.64 -> 3.56
over 40 steps; COCO-mini I2T R@10 0.050, CIFAR-10 top-1 0.080 (chance 0.1); ClipCap BLEU-1 0.276,
CIDEr 0.017.
"""

from __future__ import annotations

import os

import ml_collections

from configs import common

SHARED = os.path.normpath(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
)


def mini() -> ml_collections.ConfigDict:
  coco = os.path.join(SHARED, "coco-mini")
  val_captions = os.path.join(SHARED, "coco-captions-val2017", "captions_val2017.json")
  c = common.get_base_config()
  c.stages = ("init", "generate", "prepare", "align", "evaluate", "caption", "export")
  c.seed = 0
  c.model.variant = "tiny"
  c.data.image_size = 32
  c.lora.targets = ("attn", "mlp")
  c.total_steps, c.batch_size = 40, 32
  c.log_every_steps, c.checkpoint_every_steps, c.keep_checkpoints = 10, 20, 1
  c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-3, "cosine", 5
  c.data.num_workers, c.data.read_threads = 0, 2

  g = c.generate
  g.captions = os.path.join(coco, "annotations", "captions_train2017.json")
  g.real_images = os.path.join(coco, "train2017")
  g.only_with_real, g.max_captions, g.images_per_caption = True, 100, 1
  g.model, g.random.shapes = "random", "tiny"
  g.steps, g.resolution, g.dtype, g.device = 2, 32, "float32", "cpu"
  g.batch_size, g.chunk_size, g.progress_every_s = 10, 40, 30.0

  c.prepare.resize_short = 48  # the 640 px photos stored small: training only decodes
  c.prepare.shard_size = 100

  val = os.path.join(coco, "val2017")
  c.evals.coco_mini = dict(type="retrieval", images_dir=val, captions_json=val_captions)
  c.evals.cifar10 = dict(
    type="zeroshot",
    dataset=os.path.join(SHARED, "cifar10-test-jpeg", "cifar10_test_jpeg.zip"),
    templates="cifar10",
    classnames="cifar10",
    max_images=200,
  )

  cc = c.caption
  cc.views = ("student",)
  cc.train = ml_collections.ConfigDict({"kind": "manifest", "path": "", "column": "gen_path"})
  cc.train_path = "generated"
  cc.test = ml_collections.ConfigDict(
    {"kind": "coco", "captions": val_captions, "images": val, "max_images": 16}
  )
  cc.captioner = ml_collections.ConfigDict(
    {
      "lm_layers": 2,
      "lm_heads": 4,
      "lm_width": 64,
      "dual_projection": False,
      "lr": 1e-3,
      "warmup_steps": 10,
      "steps": 40,
      "batch_size": 40,
      "max_len": 20,
    }
  )
  # METEOR's JVM and paraphrase table would be ~4 s of this ~25 s chain, per scoring process; the
  # metric itself is checked against pycocoevalcap in tests/test_eval_captioning_metrics.py.
  cc.meteor = False
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg == "mini":
    return mini()
  return common.paper_config(arg, total_steps=60_000, generation="coco")
