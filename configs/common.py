"""Shared helpers for the configs (``get_config(arg)`` in each file).

The base config is the schema (gmail_jax/schema.py: every key with its default and meaning);
experiment files start from ``get_base_config()`` and only change values — a key the base does not
define is rejected before anything is built. See DESIGN.md §3 and gmail_jax/schema.py for the keys.
"""

from __future__ import annotations

import ml_collections

from gmail_jax import schema

get_base_config = schema.base_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``'variant=L/14,runlocal=True'`` (the part after ``configs/x.py:``) over typed defaults.

  A bare value without ``=`` sets the first default (``configs/coco.py:L/14``).
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  first = next(iter(defaults), None)
  for item in arg.split(","):
    key, eq, value = item.partition("=")
    if not eq:
      key, value = first, item
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config arg: unknown key {key!r}; known {sorted(defaults)}")
    typ = type(defaults[key])
    if typ is bool:
      out[key] = value.strip().lower() in ("1", "true", "yes")
    else:
      out[key] = typ(value.strip())
  return out


# Paper settings shared by coco.py, cc3m.py and cc12m.py (GMAIL, papers.md A.3/A.6).
HF_IDS = {
  "B/32": "openai/clip-vit-base-patch32",
  "B/16": "openai/clip-vit-base-patch16",
  "L/14": "openai/clip-vit-large-patch14",
}

# The datasets of the paper's evaluations: where the configs expect them, and how to get them
# (quoted by the one-line error a stage gives when one is missing, before anything is built).
KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
DATASETS = {
  "coco_karpathy": "/data/coco/dataset_coco.json",
  "coco_images": "/data/coco/images",
  "flickr_karpathy": "/data/flickr30k/dataset_flickr30k.json",
  "flickr_images": "/data/flickr30k/images",
  "imagenet_val": "/data/imagenet/val",
}
DOWNLOADS = (
  (
    "/data/coco",
    f"COCO: dataset_coco.json from {KARPATHY}; train2014/ and val2014/ from"
    " https://cocodataset.org/#download, unzipped under /data/coco/images",
  ),
  (
    "/data/flickr30k",
    f"Flickr30k: dataset_flickr30k.json from {KARPATHY}; the images (flickr30k-images/, by"
    " request at https://shannon.cs.illinois.edu/DenotationGraph/) as /data/flickr30k/images",
  ),
  (
    "/data/imagenet",
    "ImageNet-1k: the ILSVRC2012 validation images (https://image-net.org, after login) in one"
    " folder per WordNet id, e.g. with valprep.sh of github.com/soumith/imagenetloader.torch",
  ),
)


def paper_evals(batch_size: int = 256) -> ml_collections.ConfigDict:
  """The paper's evaluations: COCO-5k (Karpathy test) and Flickr30k-1k retrieval, ImageNet
  zero-shot with CLIP's 1,000 class names and 80 prompts (evaluators/zeroshot.py)."""
  d = DATASETS
  return ml_collections.ConfigDict(
    {
      "coco5k": dict(
        type="retrieval",
        karpathy_json=d["coco_karpathy"],
        images_dir=d["coco_images"],
        split="test",
        batch_size=batch_size,
      ),
      "flickr1k": dict(
        type="retrieval",
        karpathy_json=d["flickr_karpathy"],
        images_dir=d["flickr_images"],
        split="test",
        batch_size=batch_size,
      ),
      "imagenet": dict(
        type="zeroshot",
        dataset=d["imagenet_val"],
        templates="imagenet",
        classnames="imagenet",
        batch_size=batch_size,
      ),
    }
  )


def paper_clipcap(c: ml_collections.ConfigDict, lm: str = "gpt2") -> None:
  """ClipCap on the aligned encoder (papers.md A.6 #5): trained on the generated pairs GMAIL
  aligned on (through f_g into Proj-Gen), tested on the Karpathy COCO test split."""
  cc = c.caption
  cc.views = ("teacher", "student")
  # path '' = the pairs the run aligned on (the generate stage's manifest or config.data.manifest)
  cc.train = ml_collections.ConfigDict({"kind": "manifest", "path": "", "column": "gen_path"})
  cc.train_path = "generated"
  cc.test = ml_collections.ConfigDict(
    {
      "kind": "karpathy",
      "path": DATASETS["coco_karpathy"],
      "images": DATASETS["coco_images"],
      "split": "test",
    }
  )
  cc.captioner = ml_collections.ConfigDict({"lm": lm})  # ClipCap's defaults otherwise


def paper_config(
  arg: str | None,
  *,
  total_steps: int,
  manifest: str = "",
  shards: str = "",
  generation: str = "",
) -> ml_collections.ConfigDict:
  """The paper's experiment: ViT variant by arg (``configs/coco.py:L/14``), batch 256, lr 1e-4,
  wd 0.01, rank 4, SGDR (T_0 = 10k), clip 1.0, tau 0.07, bf16 compute; then the paper's
  evaluations, ClipCap and both exports.

  Data, in order of precedence: ``manifest=PATH`` (arg) trains on pairs generated beforehand;
  ``generation='coco'`` generates them as stages (generate -> prepare); ``shards`` trains on
  prepared ArrayRecord shards (``python -m gmail_jax.data.prepare``)."""
  a = parse_arg(arg, variant="B/16", init="", manifest=manifest, runlocal=False)
  if a.variant not in HF_IDS:
    raise ValueError(f"config arg variant={a.variant!r}: expected one of {sorted(HF_IDS)}")
  c = get_base_config()
  c.model.variant = a.variant
  c.model.dtype = "bfloat16"
  c.model.remat = a.variant == "L/14"
  c.init = a.init or HF_IDS[a.variant]
  c.total_steps = total_steps
  c.batch_size = 256
  c.data.image_size = 224
  c.data.num_workers = 8
  c.data.read_threads = 8
  c.data.prefetch = 4
  c.stages = ("align", "evaluate", "caption", "export")
  if a.manifest:
    c.data.source, c.data.manifest = "manifest", a.manifest
  elif generation == "coco":
    from configs.generate import coco_sd21

    c.stages = ("generate", "prepare", *c.stages)
    c.generate = coco_sd21.get_config()
  else:
    c.data.source, c.data.root = "array_record", shards
  c.evals = paper_evals()
  paper_clipcap(c)
  c.downloads = DOWNLOADS
  if a.runlocal:  # a few steps to check the wiring on one small machine
    c.total_steps, c.batch_size, c.log_every_steps, c.checkpoint_every_steps = 10, 16, 1, 5
    c.data.num_workers = 0
  return c


def class_pair_experiment(arg: str | None, name: str) -> tuple[ml_collections.ConfigDict, bool]:
  """Base of the small class-paired reproductions (configs/quickstart.py, configs/cifake.py).

  ``arg`` is ``full`` (default) or ``smoke`` (a short run for tests). Returns ``(config, smoke)``
  with what both share: four stages — train / held-out split views (``splits``), a tiny CLIP
  teacher pretrained on real images (``teacher``), GMAIL alignment (``align``: LoRA rank 4 on
  attention + MLP, same-class negatives masked) and the ``report``.
  """
  a = parse_arg(arg, mode="full")
  if a.mode not in ("full", "smoke"):
    raise ValueError(f"configs/{name}.py:{a.mode}: expected 'full' or 'smoke'")
  smoke = a.mode == "smoke"
  c = get_base_config()
  c.stages = ("splits", "teacher", "align", "report")
  c.seed = 0
  c.batch_size = 64 if smoke else 128
  c.keep_checkpoints = 1
  c.async_checkpoints = False

  c.model.variant = "tiny"
  c.lora.rank = 4
  c.lora.alpha = 4.0
  # The paper does not name its LoRA targets; on a width-64 ViT, attention-only rank 4 is too
  # little capacity (quickstart paired cosine 0.67 vs 0.74 with the MLPs too).
  c.lora.targets = ("attn", "mlp")
  c.loss.mask_groups = True  # class-level pairs: same-class reals are not negatives
  c.optim.lr = 2e-3  # tiny model, few steps (the paper's 1e-4 is for ViT-B/L)
  c.optim.schedule = "cosine"
  c.optim.min_lr_ratio = 0.1

  c.data.source = "class_folders"
  c.data.num_workers = 0
  c.data.read_threads = 2
  c.data.prefetch = 2

  c.teacher_pretrain.batch_size = 64 if smoke else 128
  c.teacher_pretrain.lr = 2e-3
  c.teacher_pretrain.weight_decay = 0.05

  c.report.tsne_method = "pca" if smoke else "tsne"  # t-SNE takes ~10 s on 2 cores
  return c, smoke
