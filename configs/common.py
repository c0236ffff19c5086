"""Shared defaults and helpers for the training configs (``get_config(arg)`` in each file).

Every key the trainer reads is defined here with its default; experiment files only change values.
Keys (see DESIGN.md §3 and train.py):

  seed, total_steps, batch_size (GLOBAL), log_every_steps, checkpoint_every_steps,
  keep_checkpoints, async_checkpoints, init (HF CLIP dir / hub id; empty = random init),
  mesh {data, fsdp} (-1 = the rest), model {variant, dtype, remat},
  lora {rank, alpha, dropout, targets, mlp, train_proj},
  loss {temperature, learn_temperature, symmetric, text_weight, mask_groups},
  optim {name, lr, weight_decay, b1, b2, eps, clip_norm, schedule, warmup_steps, restart_steps,
         restart_mult, min_lr_ratio, accum_steps},
  data {...}  (gmail_jax.data.config.default_data_config), evals {name: {type, every_steps, ...}}.
"""

from __future__ import annotations

import ml_collections

from gmail_jax.data.config import default_data_config

ATTN_TARGETS = r"vision/blocks/\d+/attn/(q_proj|k_proj|v_proj|out_proj)"


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


def get_base_config() -> ml_collections.ConfigDict:
  """Paper defaults (papers.md A.3 / A.6): rank 4, AdamW 1e-4, wd 0.01, SGDR, clip 1.0, tau 0.07."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 60_000
  c.batch_size = 256
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.init = ""  # HF CLIP dir or hub id for the frozen teacher; "" = random init (tests)

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.remat = False

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 4
  c.lora.alpha = 4.0
  c.lora.dropout = 0.0
  c.lora.targets = (ATTN_TARGETS,)
  c.lora.mlp = False  # also adapt vision MLP fc1/fc2
  c.lora.train_proj = False  # also train the student's vision projection

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.07
  c.loss.learn_temperature = False
  c.loss.symmetric = False
  c.loss.text_weight = 0.0  # lambda of the CLIP text term; 0 = Algorithm 1
  c.loss.mask_groups = True

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  c.optim.schedule = "cosine_restarts"  # constant | cosine | cosine_restarts
  c.optim.warmup_steps = 500
  c.optim.restart_steps = 10_000  # SGDR T_0 (papers.md A.6 #9, an assumption)
  c.optim.restart_mult = 1
  c.optim.min_lr_ratio = 0.0
  c.optim.accum_steps = 1  # microbatches per step (exact; see train_step.py)

  c.data = default_data_config()
  # Teacher-embedding cache (gmail_jax/teacher_cache.py): real images are not augmented, so
  # f_r(x_r) is computed once per real_id and the step skips the teacher forward.
  c.teacher_cache = ml_collections.ConfigDict()
  c.teacher_cache.enabled = False
  c.teacher_cache.path = ""  # "" = <data dir>/teacher_cache/<variant>-<dtype>-<size>
  c.teacher_cache.rebuild = False  # True: discard a stale cache instead of refusing it
  c.teacher_cache.precompute = True  # one pass before training (else fill on first sight)
  c.evals = ml_collections.ConfigDict()
  return c


# Paper settings shared by coco.py, cc3m.py and cc12m.py (GMAIL, papers.md A.3/A.6).
HF_IDS = {
  "B/32": "openai/clip-vit-base-patch32",
  "B/16": "openai/clip-vit-base-patch16",
  "L/14": "openai/clip-vit-large-patch14",
}


def paper_config(arg: str | None, *, manifest: str, total_steps: int) -> ml_collections.ConfigDict:
  """ViT variant by arg (``configs/coco.py:L/14``), batch 256, lr 1e-4, wd 0.01, rank 4,
  SGDR (T_0 = 10k), clip 1.0, tau 0.07, bf16 compute; data from a paired manifest."""
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
  c.data.source = "manifest"
  c.data.manifest = a.manifest
  c.data.image_size = 224
  c.data.num_workers = 8
  c.data.read_threads = 8
  c.data.prefetch = 4
  if a.runlocal:  # a few steps to check the wiring on one small machine
    c.total_steps, c.batch_size, c.log_every_steps, c.checkpoint_every_steps = 10, 16, 1, 5
    c.data.num_workers = 0
  return c


def class_pair_experiment(arg: str | None, name: str) -> tuple[ml_collections.ConfigDict, bool]:
  """Base of the small class-paired reproductions (configs/quickstart.py, configs/cifake.py).

  ``arg`` is ``full`` (default) or ``smoke`` (a short run for tests). Returns ``(config, smoke)``
  with what both share: a tiny CLIP teacher pretrained in stage 1 (``config.teacher_pretrain``),
  LoRA rank 4 on attention + MLP, same-class negatives masked, class-folder pairs materialised as
  train / held-out views (``config.splits``), and the stage-3 report (``config.report``).
  """
  a = parse_arg(arg, mode="full")
  if a.mode not in ("full", "smoke"):
    raise ValueError(f"configs/{name}.py:{a.mode}: expected 'full' or 'smoke'")
  smoke = a.mode == "smoke"
  c = get_base_config()
  c.seed = 0
  c.batch_size = 64 if smoke else 128
  c.keep_checkpoints = 1
  c.async_checkpoints = False

  c.model.variant = "tiny"
  c.lora.rank = 4
  c.lora.alpha = 4.0
  # The paper does not name its LoRA targets; on a width-64 ViT, attention-only rank 4 is too
  # little capacity (quickstart paired cosine 0.67 vs 0.74 with the MLPs too).
  c.lora.mlp = True
  c.loss.mask_groups = True  # class-level pairs: same-class reals are not negatives
  c.optim.lr = 2e-3  # tiny model, few steps (the paper's 1e-4 is for ViT-B/L)
  c.optim.schedule = "cosine"
  c.optim.min_lr_ratio = 0.1

  c.data.source = "class_folders"
  c.data.num_workers = 0
  c.data.read_threads = 2
  c.data.prefetch = 2

  # Train / held-out split views under WORKDIR/data (gmail_jax/data/splits.py).
  c.splits = ml_collections.ConfigDict()
  c.splits.seed = 0
  c.splits.source = ml_collections.config_dict.placeholder(str)

  # Stage 1 (gmail_jax/pretrain.py): the tiny CLIP teacher.
  c.teacher_pretrain = ml_collections.ConfigDict()
  c.teacher_pretrain.batch_size = 64 if smoke else 128
  c.teacher_pretrain.lr = 2e-3
  c.teacher_pretrain.weight_decay = 0.05

  # Stage 3 (gmail_jax/report.py).
  c.report = ml_collections.ConfigDict()
  c.report.probe_c = 1.0
  c.report.probe_seed = 0
  c.report.tsne_method = "pca" if smoke else "tsne"  # t-SNE takes ~10 s on 2 cores
  return c, smoke
