"""Stage 'diffusion': a small text-to-image model trained here, written as a diffusers folder.

GMAIL's generated modality comes from a text-to-image model trained on another domain than the
real images (Stable Diffusion on web data, COCO photos as the real side). The quickstart can run
that chain offline: this stage trains a tiny text-conditioned diffusion model on the train split's
generated/ images (the rendered digits: its "web data"), and the 'generate' stage then makes one
image per caption of the real scans with it (``configs/quickstart.py:diffusion``).

Model: our ``UNet2DConditionModel`` (models/diffusion/unet.py) in pixel space (at 8 px a VAE has
nothing to compress), conditioned through cross-attention on the last hidden states of the
teacher's CLIP text tower (``inputs['model_dir']``), frozen as Stable Diffusion's CLIP text
encoder is, on captions from ``config.diffusion.templates``.
Objective: epsilon prediction (DDPM, Ho et al. 2020): ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``,
``t ~ U{0..T-1}``, loss ``|eps_theta(x_t, t, c) - eps|^2``, where ``a_t`` is the alphas_cumprod of
the scheduler config written with the model (so training and sampling share one schedule). A
caption is replaced by the empty prompt with probability ``uncond_prob``, so sampling can use
classifier-free guidance (Ho & Salimans 2022; ``config.generate.guidance``). The weights written
are an exponential moving average of the trained ones (``ema_decay``; 0 = the last step's).

Outputs:
  WORKDIR/diffusion/pipeline/  model_index.json (StableDiffusionPipeline, ``"vae": [null, null]``),
      unet/ (config.json, diffusion_pytorch_model.safetensors: ``UNet2DConditionModel.
      from_pretrained`` loads it), text_encoder/ (the teacher's text tower as a transformers
      CLIPTextModel), tokenizer/, scheduler/scheduler_config.json;
  WORKDIR/diffusion/prompts.csv  one caption per real scan of both splits (caption_id, caption,
      real_path, group = class), a template drawn from ``config.seed``: what 'generate' makes;
  WORKDIR/diffusion/{metrics.jsonl, info.json}.
Stage outputs {'generator': pipeline dir, 'prompts': prompts.csv}; the generate stage takes them
as its ``model`` and ``captions``.

Resume: every ``checkpoint_every_steps`` the train state (params, Adam, EMA, losses so far) goes
to WORKDIR/diffusion/checkpoint.npz (temp + rename) with the values of KEYS; a rerun after a kill
continues from it, and a checkpoint made under other values is discarded. Each step's batch,
captions, timesteps and noise are drawn from ``fold_in(seed, step)``, so a resumed run equals an
uninterrupted one bit for bit. Crash point ``diffusion_step:n`` (gmail_jax/faults.py). Process 0
alone, plain jit on its own default device (as the teacher stage).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gmail_jax import faults, schema, storage
from gmail_jax.errors import ConfigError
from gmail_jax.experiments.stages import teacher as teacher_stage
from gmail_jax.models.diffusion import schedulers
from gmail_jax.models.diffusion import unet as unet_lib
from gmail_jax.models.diffusion.text_encoder import load_sd_tokenizer, load_text_encoder

# The text encoder and the data are the teacher's and the splits': their keys define the model too.
KEYS = (*teacher_stage.KEYS, "diffusion")
ON_CHANGE = "refuse"  # the generated images (and everything after) come from this model
ALL_PROCESSES = False  # process 0 alone, plain jit on its local device (as 'teacher')

_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def stage_dir(workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / "diffusion"


def unet_config(d: ml_collections.ConfigDict, cross_attention_dim: int) -> unet_lib.UNetConfig:
  """The UNet of ``config.diffusion``: up blocks mirror the down blocks (diffusers' layout)."""
  down = tuple(d.down_block_types)
  n = len(down)
  return unet_lib.UNetConfig(
    in_channels=d.channels,
    out_channels=d.channels,
    sample_size=d.resolution,
    down_block_types=down,
    up_block_types=tuple(_UP.get(b, b) for b in reversed(down)),
    block_out_channels=tuple(d.block_out_channels),
    layers_per_block=(d.layers_per_block,) * n,
    transformer_layers_per_block=(1,) * n,
    num_heads=(d.heads,) * n,
    cross_attention_dim=(cross_attention_dim,) * n,
    norm_num_groups=d.norm_num_groups,
  )


def scheduler_config(d: ml_collections.ConfigDict) -> dict[str, Any]:
  """scheduler/scheduler_config.json: the training noise schedule and the default sampler."""
  return {
    "_class_name": d.scheduler,
    "_diffusers_version": "0.42.1",
    "num_train_timesteps": d.train_timesteps,
    "beta_schedule": d.beta_schedule,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": True,  # DDIM's last step lands on x_0
    "steps_offset": 0,
    "timestep_spacing": "trailing",  # the first step starts from t = T - 1 (pure noise)
  }


def check(config: ml_collections.ConfigDict) -> None:
  d = config.diffusion
  names = list(config.stages)
  before = names[: names.index("diffusion")]
  if "splits" not in before and not d.source:
    raise ConfigError("config.stages: 'diffusion' needs 'splits' before it (or diffusion.source)")
  if not {"teacher", "init"} & set(before):
    raise ConfigError("config.stages: 'diffusion' needs a text encoder: 'teacher' before it")
  if d.channels not in (1, 3):
    raise ConfigError(f"config.diffusion.channels: 1 (grayscale) or 3 (RGB), got {d.channels}")
  if not d.templates:
    raise ConfigError("config.diffusion.templates: empty; captions need at least one template")
  bad = [b for b in d.down_block_types if b not in _UP]
  if bad:
    raise ConfigError(f"config.diffusion.down_block_types: {bad[0]!r} not in {sorted(_UP)}")
  levels = len(d.down_block_types)
  if d.resolution % 2 ** (levels - 1):
    raise ConfigError(
      f"config.diffusion.resolution={d.resolution}: {levels} levels halve it {levels - 1} times"
    )
  unet_config(d, 64)  # widths, heads and groups: the UNet's own one-line errors
  schedulers.resolve_config(scheduler_config(d))
  for key in ("steps", "batch_size", "checkpoint_every_steps", "train_timesteps"):
    if int(d[key]) < 1:
      raise ConfigError(f"config.diffusion.{key}: must be >= 1, got {d[key]}")
  if not 0.0 <= d.uncond_prob < 1.0 or not 0.0 <= d.ema_decay < 1.0:
    raise ConfigError("config.diffusion.uncond_prob and ema_decay: in [0, 1)")
  if "generate" in names[names.index("diffusion") :]:
    g = config.generate
    if g.backend != "jax":  # diffusers' StableDiffusionPipeline needs a VAE
      raise ConfigError(
        f"config.generate.backend={g.backend!r}: the 'diffusion' stage's model has no VAE;"
        " only backend 'jax' samples pixel-space models"
      )
    if g.resolution != d.resolution:
      raise ConfigError(
        f"config.generate.resolution={g.resolution}: the 'diffusion' stage trains at"
        f" {d.resolution} px (config.diffusion.resolution)"
      )


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  del workdir
  d = pathlib.Path(outputs["generator"])
  files = (
    "model_index.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
  )
  return all((d / f).is_file() for f in files) and pathlib.Path(outputs["prompts"]).is_file()


# ---------------------------------------------------------------------------------------------
# The pipeline folder: text encoder and tokenizer from the teacher, then the trained UNet.
# ---------------------------------------------------------------------------------------------


def write_text_encoder(teacher_dir: str | os.PathLike, out: pathlib.Path) -> None:
  """OUT/text_encoder/ (a transformers CLIPTextModel: the teacher's text tower, its weights as
  saved) and OUT/tokenizer/ (the teacher's tokenizer files)."""
  from safetensors.numpy import load_file, save_file

  teacher_dir = pathlib.Path(teacher_dir)
  hf = json.loads((teacher_dir / "config.json").read_text())
  text = {**hf["text_config"], "architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
  (out / "text_encoder").mkdir(parents=True, exist_ok=True)
  (out / "text_encoder" / "config.json").write_text(json.dumps(text, indent=2))
  weights = load_file(str(teacher_dir / "model.safetensors"))
  tower = {k: v for k, v in weights.items() if k.startswith("text_model.")}
  save_file(tower, str(out / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
  (out / "tokenizer").mkdir(parents=True, exist_ok=True)
  for name in _TOKENIZER_FILES:
    shutil.copyfile(teacher_dir / name, out / "tokenizer" / name)


def model_index() -> dict[str, Any]:
  """A StableDiffusionPipeline without VAE and safety checker (``[null, null]``: not there)."""
  return {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "vae": [None, None],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
  }


def caption_table(
  pipe_dir: pathlib.Path, names: list[str], templates: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
  """(float32 [classes, templates, L, D] hidden states of every (class, template) caption,
  [L, D] of the empty prompt), by the text encoder and tokenizer exactly as sampling loads them."""
  encoder = load_text_encoder(str(pipe_dir / "text_encoder"))
  tokenizer = load_sd_tokenizer(str(pipe_dir / "tokenizer"))
  texts = [
    t.format(name=n.replace("_", " "), index=i) for i, n in enumerate(names) for t in templates
  ]
  ctx = np.asarray(jax.jit(encoder)(tokenizer(texts + [""])))
  table = ctx[:-1].reshape(len(names), len(templates), *ctx.shape[1:])
  return table, ctx[-1]


# ---------------------------------------------------------------------------------------------
# Training: epsilon-prediction DDPM, one jitted step, resumable.
# ---------------------------------------------------------------------------------------------


def init_unet(cfg: unet_lib.UNetConfig, seed: int) -> unet_lib.UNet:
  """A fresh UNet with parameters drawn on the host (numpy, ``seed``): kernels normal with std
  1 / sqrt(fan in) (LeCun; fan in = every axis but the last, HWIO or [in, out]), biases 0, norm
  scales 1. JAX's initializers compile one program per shape: ~12 of the smoke run's CPU-s."""
  abstract = nnx.eval_shape(lambda: unet_lib.UNet(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  filled = []
  for path, var in nnx.to_flat_state(params):
    shape, leaf = tuple(var.shape), str(path[-1])
    if leaf == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif leaf in ("scale", "bias"):
      value = np.full(shape, 1.0 if leaf == "scale" else 0.0)
    else:
      raise ValueError(f"init_unet: no initializer for {'/'.join(map(str, path))}")
    filled.append((path, var.replace(jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


def _save_checkpoint(path: pathlib.Path, state: Any, step: int, losses: list, keys: dict) -> None:
  leaves = jax.device_get(jax.tree_util.tree_leaves(state))
  arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
  meta = json.dumps({"step": step, "keys": keys}, sort_keys=True)
  tmp = path.with_suffix(".tmp.npz")
  with open(tmp, "wb") as f:
    np.savez(f, meta=np.asarray(meta), losses=np.asarray(losses, np.float32), **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _load_checkpoint(path: pathlib.Path, state: Any, keys: dict) -> tuple[Any, int, list] | None:
  """(state, step, losses) from ``path`` when it was saved under the same ``keys`` and for the
  same tree; None otherwise (no checkpoint, other values, unreadable: start from step 0)."""
  if not path.is_file():
    return None
  leaves, treedef = jax.tree_util.tree_flatten(state)
  try:
    with np.load(path) as z:
      meta = json.loads(str(z["meta"]))
      saved = [z[f"leaf_{i:05d}"] for i in range(len(leaves))]
      losses = z["losses"].tolist()
  except (OSError, ValueError, KeyError) as e:
    print(f"diffusion: {path} unreadable ({type(e).__name__}), training from step 0", flush=True)
    return None
  if meta["keys"] != keys or any(
    a.shape != np.shape(b) or a.dtype != np.asarray(b).dtype
    for a, b in zip(saved, leaves, strict=True)
  ):
    print(f"diffusion: {path} was made under other values, training from step 0", flush=True)
    return None
  return (
    jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in saved]),
    meta["step"],
    losses,
  )


@functools.lru_cache(maxsize=4)
def _step_fn(
  graphdef: nnx.GraphDef,
  d: tuple[tuple[str, Any], ...],
  seed: int,
) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, jitted step) for ``config.diffusion`` values ``d``; cached, so a stage run again
  in one process (a test's resume) reuses the compiled step."""
  d = dict(d)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, d["lr"], min(d["warmup_steps"], d["steps"] - 1), d["steps"], end_value=0.1 * d["lr"]
  )
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
  base, batch = jax.random.key(seed), d["batch_size"]

  @jax.jit
  def step_fn(state, step, images, labels, table, uncond, ac):
    k_row, k_tpl, k_drop, k_t, k_eps = jax.random.split(jax.random.fold_in(base, step), 5)
    rows = jax.random.randint(k_row, (batch,), 0, images.shape[0])
    x0 = images[rows]
    ctx = table[labels[rows], jax.random.randint(k_tpl, (batch,), 0, table.shape[1])]
    drop = jax.random.bernoulli(k_drop, d["uncond_prob"], (batch, 1, 1))
    ctx = jnp.where(drop, uncond[None], ctx)
    t = jax.random.randint(k_t, (batch,), 0, ac.shape[0])
    eps = jax.random.normal(k_eps, x0.shape)
    a = ac[t][:, None, None, None]
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps

    def loss_fn(p):
      return jnp.mean(jnp.square(nnx.merge(graphdef, p)(xt, t, ctx) - eps))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    p = optax.apply_updates(state["params"], updates)
    # EMA with diffusers' warm-up: early steps average over fewer steps.
    decay = jnp.minimum(d["ema_decay"], (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, q: e + (1.0 - decay) * (q - e), state["ema"], p)
    return {"params": p, "opt": opt, "ema": ema}, loss

  return tx, step_fn


def train(
  unet: unet_lib.UNet,
  images: np.ndarray,
  labels: np.ndarray,
  table: np.ndarray,
  uncond: np.ndarray,
  alphas_cumprod: np.ndarray,
  d: ml_collections.ConfigDict,
  *,
  seed: int,
  checkpoint: pathlib.Path,
  keys: dict,
) -> tuple[Any, list[float]]:
  """Trains ``unet`` (see the module docstring); returns (the weights to write: EMA or last, the
  per-step losses). ``images`` float32 [N, H, W, C] in [-1, 1], ``labels`` [N] rows of ``table``."""
  graphdef, params = nnx.split(unet, nnx.Param)
  values = ("lr", "warmup_steps", "steps", "batch_size", "uncond_prob", "ema_decay")
  tx, step_fn = _step_fn(graphdef, tuple((k, d[k]) for k in values), seed)
  state = {"params": params, "opt": tx.init(params), "ema": params}
  first, losses = 1, []
  resumed = _load_checkpoint(checkpoint, state, keys)
  if resumed is not None:
    state, done, losses = resumed
    first = done + 1
    print(f"diffusion: resumed from step {done} ({checkpoint})", flush=True)
  args = [jnp.asarray(a) for a in (images, labels, table, uncond, alphas_cumprod)]
  pending = []  # losses stay on device between checkpoints: no host sync per step
  for step in range(first, d.steps + 1):
    state, loss = step_fn(state, jnp.int32(step), *args)
    pending.append(loss)
    faults.kill_point("diffusion_step", step)
    if step % d.checkpoint_every_steps == 0 or step == d.steps:
      losses += [float(x) for x in jax.device_get(pending)]
      pending = []
      _save_checkpoint(checkpoint, state, step, losses, keys)
  return state["ema" if d.ema_decay > 0 else "params"], losses


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------


def write_prompts(
  path: pathlib.Path, roots: dict[str, str], templates, seed: int, per_class: int = 0
) -> int:
  """prompts.csv: one caption per real image of each split root (module docstring), or of the
  first ``per_class`` of each class when > 0; returns the number of rows. real_path is relative
  to the file, so the workdir can move."""
  rows = []
  for split, root in roots.items():
    paths, classes = teacher_stage.list_class_folder(pathlib.Path(root) / "real")
    seen: dict[str, int] = {}
    for p, c in zip(paths, classes, strict=True):
      seen[c] = seen.get(c, 0) + 1
      if not per_class or seen[c] <= per_class:
        rows.append((split, p, c))
  names = sorted({c for _, _, c in rows})
  captions = teacher_stage.class_captions([c for *_, c in rows], names, tuple(templates), seed)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["caption_id", "caption", "real_path", "group"])
    for (split, p, c), text in zip(rows, captions, strict=True):
      w.writerow([f"{split}-{c}-{p.stem}", text, os.path.relpath(p, path.parent), c])
  return len(rows)


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  d = config.diffusion
  if storage.is_remote(workdir):  # npz checkpoints, the pipeline folder, the views: local files
    raise ConfigError(f"--workdir={workdir}: the 'diffusion' stage needs a local WORKDIR")
  out = stage_dir(workdir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  source = pathlib.Path(d.source or pathlib.Path(inputs["train"]) / "generated")
  paths, classes = teacher_stage.list_class_folder(source)
  names = sorted(set(classes))
  rgb = teacher_stage.load_images(paths, d.resolution).astype(np.float32) / 127.5 - 1.0
  images = rgb[..., : d.channels]  # grayscale files decode to R = G = B
  labels = np.asarray([names.index(c) for c in classes], np.int32)

  tmp = out / "pipeline.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  write_text_encoder(inputs["model_dir"], tmp)
  table, uncond = caption_table(tmp, names, tuple(d.templates))
  sched = scheduler_config(d)
  ac = schedulers.alphas_cumprod(schedulers.resolve_config(sched)[1])
  cfg = unet_config(d, table.shape[-1])
  unet = init_unet(cfg, config.seed)
  flat = schema.flat(config)
  keys = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in KEYS)}
  weights, losses = train(
    unet, images, labels, table, uncond, ac, d,
    seed=config.seed, checkpoint=out / "checkpoint.npz", keys=keys,
  )  # fmt: skip
  nnx.update(unet, weights)
  unet_lib.save_unet(unet, tmp / "unet")
  (tmp / "scheduler").mkdir()
  (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
  (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2))
  pipe = out / "pipeline"
  shutil.rmtree(pipe, ignore_errors=True)
  os.replace(tmp, pipe)

  roots = {k: inputs[k] for k in ("train", "test") if k in inputs}
  n_prompts = write_prompts(
    out / "prompts.csv", roots, d.templates, config.seed, d.prompts_per_class
  )
  log_every = max(1, d.steps // 50)
  with open(out / "metrics.jsonl", "w") as f:
    for step, loss in enumerate(losses, 1):
      if step % log_every == 0 or step == len(losses):
        f.write(json.dumps({"step": step, "diffusion_loss": loss}) + "\n")
  tail = losses[-max(1, len(losses) // 10) :]
  info = {
    "images": len(images),
    "classes": names,
    "steps": d.steps,
    "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(unet, nnx.Param)))),
    "first_loss": losses[0],
    "final_loss": float(np.mean(tail)),
    "prompts": n_prompts,
    "seconds": round(time.time() - t0, 1),
  }
  (out / "info.json").write_text(json.dumps(info, indent=2))
  print(
    f"diffusion: {info['params']:,}-parameter UNet trained on {len(images)} images, loss"
    f" {losses[0]:.3f} -> {info['final_loss']:.3f} in {info['seconds']}s",
    flush=True,
  )
  return {"generator": str(pipe), "prompts": str(out / "prompts.csv")}
