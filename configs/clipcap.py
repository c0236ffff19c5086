r"""ClipCap captioning with GMAIL's dual projection, on the aligned encoder of a GMAIL run.

Command (after configs/coco.py trained the run in $WORKDIR; the align stage is then complete and
skipped, the caption stage trains ClipCap on its embeddings):
  python -m gmail_jax.main --config=configs/clipcap.py:variant=B/32 --workdir=$WORKDIR \
      --config.data.manifest=/data/coco_gen/manifest.parquet \
      --config.caption.test.path=/data/coco/dataset_coco.json \
      --config.caption.test.images=/data/coco/images
  ``variant=B/16`` etc. picks the tower (ClipCap's own is ViT-B/32); ``lm=PATH`` a GPT-2
  directory (default: the hub's ``gpt2``).
Protocol (papers.md A.6 #5, ClipCap's train.py): MLP mapper, prefix 10, GPT-2 fine-tuned, AdamW
2e-5, 5000 warm-up steps, 10 epochs, batch 40. Trained on the generated pairs of the manifest
(caption, gen_path) through f_g into Proj-Gen; tested on the COCO Karpathy 5k test split through
f_r + Proj-Real (Proj-Real = Proj-Gen when no real pairs are given; add them with
``--config.caption.real.kind=karpathy`` and ``.path/.images/.split=train``). Views: the frozen
CLIP (``teacher``, ClipCap on generated data without alignment) and GMAIL (``student``).
Hardware: one GPU; ClipCap reports ~10 epochs of COCO in hours. Not run here (no GPU, no weights).

``configs/clipcap.py:mini`` (``:mini,short=True`` for the test suite) runs on 2 CPU cores in a
few minutes, offline: a seeded random tiny CLIP tower (no pretrained weights exist offline) and a
2-layer GPT-2 from scratch over CLIP's BPE, trained a few hundred steps on coco-mini's 80 real
photos × 5 captions, tested on its 159 val2017 photos with all their COCO captions as references.
It checks the wiring, not quality: a random encoder cannot describe a photo, so the captions are
the corpus's most frequent phrases. Writes WORKDIR/eval/captions.jsonl and captioning.json.
Measured (mini, seed 0, 2 shared CPU cores; ClipCap's defaults: GPT-2 dropout 0.1 in training,
AdamW weight decay 0 / eps 1e-6, raw prefixes): 26 s wall; 300 steps, loss 6.8 -> 2.2 (with
dropout); BLEU-4 0.035, METEOR 0.094, ROUGE-L 0.318, CIDEr 0.066 over the 159 photos — fluent
COCO-like captions ("a table with a table with many foods on it") unrelated to the photo, as a
random encoder must give.
"""

from __future__ import annotations

import os

import ml_collections

from configs import common

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def mini(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = common.get_base_config()
  c.stages = ("caption",)
  c.model.variant = "tiny"
  c.data.image_size = 32
  c.log_every_steps = 50
  coco = os.path.normpath(os.path.join(SHARED, "coco-mini"))
  full_val = os.path.normpath(
    os.path.join(SHARED, "coco-captions-val2017", "captions_val2017.json")
  )
  cc = c.caption
  cc.views = ("teacher",)
  cc.train = ml_collections.ConfigDict(
    {
      "kind": "coco",
      "captions": os.path.join(coco, "annotations", "captions_train2017.json"),
      "images": os.path.join(coco, "train2017"),
    }
  )
  cc.train_path = "real"  # coco-mini has no generated images: real photos, real captions
  cc.test = ml_collections.ConfigDict(
    {"kind": "coco", "captions": full_val, "images": os.path.join(coco, "val2017")}
  )
  cc.captioner = ml_collections.ConfigDict(
    {
      "lm_layers": 2,
      "lm_heads": 4,
      "lm_width": 128,
      "dual_projection": False,
      "lr": 1e-3,
      "warmup_steps": 30,
      "steps": 40 if arg.short else 300,
      "batch_size": 40,
      "max_len": 20,
    }
  )
  if arg.short:  # the test suite: fewer test images
    cc.test.max_images = 16
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, mode="full", variant="B/32", lm="gpt2", short=False, init="")
  if a.mode not in ("full", "mini"):
    raise ValueError(f"configs/clipcap.py:{a.mode}: expected 'full' or 'mini'")
  if a.mode == "mini":
    return mini(a)
  c = common.paper_config(
    f"variant={a.variant},init={a.init}",
    manifest="/data/coco_gen/manifest.parquet",
    total_steps=60_000,
  )
  c.stages = ("align", "caption")
  common.paper_clipcap(c, lm=a.lm)
  return c
