"""The diffusers backend: a PyTorch text-to-image pipeline (``pip install -e .[gen]``).

The generation module that imports torch or diffusers (lazily). A backend provides
``dtype_of(config, pipe)`` (the dtype the plan records), ``load(config, workdir)`` -> a pipeline,
and ``Engine(pipe, config)``: ``engine(prompts, seeds) -> (float32 [N, H, W, 3] images in [0, 1],
NSFW flags)``, ``engine.max_prompt_tokens`` (None: no limit) and ``engine.prompt_tokens(text)``
for the prompt-length check, and ``engine.out_of_memory(exception)``.

Starting noise: numpy's PCG64 per image (generation/seeds.py ``initial_latents``), passed to
the pipeline as ``latents``: the same on any device and for either backend.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
from typing import Any

import ml_collections
import numpy as np

from gmail_jax.errors import ConfigError, InputError, first_line
from gmail_jax.generation.config import RANDOM_SHAPES
from gmail_jax.generation.seeds import initial_latents


def write_clip_tokenizer(path: pathlib.Path) -> pathlib.Path:
  """OpenAI's CLIP BPE (shipped by ``openai-clip``) as ``vocab.json`` + ``merges.txt``."""
  from gmail_jax.models import tokenizer as tk

  vocab, merges = tk.vocab_from_bpe_gz(tk.default_bpe_path())
  path.mkdir(parents=True, exist_ok=True)
  (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  lines = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
  (path / "merges.txt").write_text(lines, encoding="utf-8")
  return path


def random_pipeline(shapes: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None):
  """A ``StableDiffusionPipeline`` with random weights, built offline: 'tiny' (for tests: 32-wide
  UNet / VAE / text encoder, latents at 1/2 resolution) or 'sd21' (SD 2.1's shapes: the real
  model's cost, random weights). Tokenizer: the CLIP BPE (SD's own vocabulary)."""
  import tempfile

  import diffusers
  import torch
  import transformers

  if shapes not in RANDOM_SHAPES:
    raise ConfigError(f"config.random.shapes: {shapes!r} not in {RANDOM_SHAPES}")
  sd = shapes == "sd21"
  with tempfile.TemporaryDirectory() as tmp:
    files = write_clip_tokenizer(pathlib.Path(tokenizer_dir or tmp))
    tokenizer = transformers.CLIPTokenizer(
      str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77
    )
  torch.manual_seed(seed)
  text = transformers.CLIPTextModel(
    transformers.CLIPTextConfig(
      vocab_size=49408,
      max_position_embeddings=77,
      hidden_size=1024 if sd else 32,
      intermediate_size=4096 if sd else 64,
      num_hidden_layers=23 if sd else 2,
      num_attention_heads=16 if sd else 4,
      hidden_act="gelu" if sd else "quick_gelu",
      projection_dim=512 if sd else 32,
    )
  )
  torch.manual_seed(seed + 1)
  if sd:
    unet = diffusers.UNet2DConditionModel(
      sample_size=64,
      block_out_channels=(320, 640, 1280, 1280),
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
      layers_per_block=2,
      cross_attention_dim=1024,
      attention_head_dim=(5, 10, 20, 20),
      use_linear_projection=True,
    )
  else:
    unet = diffusers.UNet2DConditionModel(
      sample_size=16,
      block_out_channels=(32, 64),
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      layers_per_block=1,
      cross_attention_dim=32,
      attention_head_dim=8,
    )
  torch.manual_seed(seed + 2)
  widths = (128, 256, 512, 512) if sd else (32, 64)
  vae = diffusers.AutoencoderKL(
    block_out_channels=widths,
    down_block_types=("DownEncoderBlock2D",) * len(widths),
    up_block_types=("UpDecoderBlock2D",) * len(widths),
    layers_per_block=2 if sd else 1,
    latent_channels=4,
    sample_size=512 if sd else 32,
  )
  scheduler = diffusers.DDIMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
  )
  return diffusers.StableDiffusionPipeline(
    vae=vae,
    text_encoder=text,
    tokenizer=tokenizer,
    unet=unet,
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )


def ensure_random_pipeline(path: pathlib.Path, shapes: str, seed: int) -> pathlib.Path:
  """``random_pipeline`` saved into local folder ``path`` once (temp folder + rename), then loaded
  from there."""
  if (path / "model_index.json").exists():
    return path
  quiet_loggers()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
  random_pipeline(shapes, seed).save_pretrained(tmp)
  try:
    os.rename(tmp, path)
  except OSError:  # another shard saved the same pipeline first
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def quiet_loggers() -> None:
  import diffusers
  import transformers

  diffusers.utils.logging.set_verbosity_error()
  diffusers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()


def resolve_device_dtype(config: ml_collections.ConfigDict) -> tuple[str, str]:
  import torch

  device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
  dtype = config.dtype
  if dtype == "auto":
    dtype = "float32" if device == "cpu" else "float16"
  return device, dtype


def dtype_of(config: ml_collections.ConfigDict, pipe: Any = None) -> str:
  """The compute dtype a run uses: the loaded ``pipe``'s, else what ``config.dtype`` resolves to."""
  if pipe is not None:
    return str(getattr(pipe, "dtype", config.dtype)).removeprefix("torch.")
  return resolve_device_dtype(config)[1]


def load(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """The diffusers pipeline of ``config.model`` on ``config.device``, ready to call."""
  try:
    import diffusers
    import torch
  except ImportError as e:
    raise ConfigError(
      f"mode='generate' needs the 'gen' extra (pip install -e .[gen]): {e}"
    ) from None
  quiet_loggers()
  device, dtype = resolve_device_dtype(config)
  path = config.model
  if path == "random":
    path = str(
      ensure_random_pipeline(workdir / "pipeline", config.random.shapes, config.random.seed)
    )
  kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
  if config.revision and not os.path.isdir(path):  # a hub id: the pinned snapshot
    kwargs["revision"] = config.revision
  checker = config.safety_checker
  if checker == "none":
    kwargs.update(safety_checker=None, requires_safety_checker=False)
  elif checker != "pipeline":
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    try:
      kwargs["safety_checker"] = StableDiffusionSafetyChecker.from_pretrained(
        checker, dtype=kwargs["dtype"]
      )
      kwargs["feature_extractor"] = transformers.CLIPImageProcessor.from_pretrained(checker)
    except OSError as e:
      raise InputError(f"config.safety_checker: cannot load {checker!r}: {first_line(e)}") from None
  try:
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, **kwargs)
  except OSError as e:
    raise InputError(f"config.model: cannot load {path!r}: {first_line(e)}") from None
  unet = getattr(pipe, "unet", None)
  if unet is not None and unet.dtype != kwargs["dtype"]:  # diffusers versions differ in the keyword
    raise ConfigError(
      f"config.dtype={dtype!r}: {path!r} loaded with {str(unet.dtype).removeprefix('torch.')}"
      " weights (the installed diffusers ignored the dtype keyword); use the pinned diffusers"
    )
  if checker == "pipeline" and getattr(pipe, "safety_checker", None) is None:
    raise ConfigError(f"config.safety_checker='pipeline': {path!r} ships no safety checker")
  if config.scheduler:
    cls = getattr(diffusers, config.scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
      raise ConfigError(f"config.scheduler: {config.scheduler!r} is not a diffusers scheduler")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
  pipe = pipe.to(device)
  pipe.set_progress_bar_config(disable=True)
  if config.compile:
    pipe.unet = torch.compile(pipe.unet)
  return pipe


class Engine:
  """The pipeline on a batch: ``engine(prompts, seeds) -> (images float32 [N, H, W, 3] in [0, 1],
  NSFW flags)``; the runner turns them into images or caption rejects. Starting noise: the
  numpy latents of generation/seeds.py (the same on every device and backend), passed as
  ``latents``. An exception propagates (the runner retries the batch, then stops)."""

  def __init__(self, pipe: Any, config: ml_collections.ConfigDict):
    import torch

    self.pipe, self.config, self.torch = pipe, config, torch
    tokenizer = getattr(pipe, "tokenizer", None)
    self._tokenizer = tokenizer
    self.max_prompt_tokens = None if tokenizer is None else int(tokenizer.model_max_length)

  def prompt_tokens(self, text: str) -> int:
    """Tokens of ``text`` with SOT / EOT, untruncated (the prompt-length check)."""
    return len(self._tokenizer(text, truncation=False).input_ids)

  def latent_shape(self) -> tuple[int, int, int]:
    c = self.config
    vae = getattr(self.pipe, "vae_scale_factor", 8)
    channels = self.pipe.unet.config.in_channels if hasattr(self.pipe, "unet") else 4
    return (channels, c.resolution // vae, c.resolution // vae)

  def __call__(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, list[bool]]:
    c = self.config
    kwargs = {}
    if c.negative_prompt:
      kwargs["negative_prompt"] = [c.negative_prompt] * len(prompts)
    latents = self.torch.from_numpy(initial_latents(seeds, self.latent_shape()))
    dtype = getattr(self.pipe, "dtype", None)
    out = self.pipe(
      prompt=prompts,
      num_inference_steps=c.steps,
      guidance_scale=c.guidance,
      height=c.resolution,
      width=c.resolution,
      latents=latents.to(dtype) if dtype is not None else latents,
      output_type="np",
      **kwargs,
    )
    images = np.asarray(out.images, np.float32)
    nsfw = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
    return images, [bool(x) for x in nsfw]

  @staticmethod
  def out_of_memory(e: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError: not retried (a lower batch_size is the fix)."""
    return type(e).__name__ == "OutOfMemoryError"


def weights_fingerprint(pipe: Any) -> str | None:
  """sha256 of every weight of the pipeline's models (name, dtype, shape, bytes), in name order:
  what the images were generated with, whatever the path or revision said (None: not a
  diffusers pipeline, e.g. a stand-in in tests)."""
  import hashlib

  import torch

  components = getattr(pipe, "components", None)
  if not isinstance(components, dict):
    return None
  h = hashlib.sha256()
  for name in sorted(components):
    module = components[name]
    if not isinstance(module, torch.nn.Module):
      continue
    for key, t in sorted(module.state_dict().items()):
      t = t.detach().to("cpu").contiguous()
      h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
      h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
  return h.hexdigest()
