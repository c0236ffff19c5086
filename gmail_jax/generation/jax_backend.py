"""The JAX backend: Stable Diffusion sampled in JAX (models/diffusion/), for TPU pods and GPUs.

``config.backend = 'jax'``. The same plan, store, journal, manifest, sharding and rejects as the
diffusers backend (runner.py); this module only turns prompts and seeds into images:

* weights: a diffusers pipeline folder or hub id (``model`` at ``revision``; fetched with
  huggingface_hub, no torch), or ``model='random'`` (the tiny / SD 2.1-shaped random pipeline, built
  once with diffusers: the one case that needs the ``gen`` extra);
* one jitted sampler per run (models/diffusion/pipeline.py): the prompt ids of a batch are
  arguments, one caption per row, so the compiled function serves every batch; the text encoder,
  the whole denoising loop with classifier-free guidance and the VAE decoder run inside it (a
  pixel-space folder without a VAE, as the quickstart's 'diffusion' stage writes, returns the
  final sample itself);
* the batch is split over this process's devices (``jax.local_devices()``: on a pod each process
  owns its chunks, as with diffusers), the weights replicated; a batch is padded to a multiple of
  the devices, so every call has the same shapes;
* the starting noise is numpy's, per image (seeds.py), exactly what the diffusers backend feeds
  its pipeline: the same caption and seed give the same image on either backend (to float
  rounding: tests/test_generate_jax.py).
``dtype`` 'auto' is float32 on the CPU and bfloat16 on accelerators (UNet and text encoder; the
VAE decodes in float32). There is no safety checker in JAX: ``safety_checker`` must be 'none'.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmail_jax.errors import ConfigError
from gmail_jax.generation.seeds import initial_latents
from gmail_jax.models.diffusion import pipeline as sd_pipeline

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def check(config: ml_collections.ConfigDict) -> None:
  if config.safety_checker != "none":
    raise ConfigError(
      f"config.safety_checker={config.safety_checker!r}: the jax backend has no safety checker"
      " (use 'none', or backend 'diffusers')"
    )


def dtype_of(config: ml_collections.ConfigDict, pipe: Any = None) -> str:
  """The compute dtype of the UNet and text encoder (what the plan records)."""
  del pipe
  if config.dtype != "auto":
    return config.dtype
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _local_path(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
  if config.model == "random":
    from gmail_jax.generation import diffusers_backend  # builds the random pipeline once

    return str(
      diffusers_backend.ensure_random_pipeline(
        workdir / "pipeline", config.random.shapes, config.random.seed
      )
    )
  if os.path.isdir(config.model):
    return config.model
  from huggingface_hub import snapshot_download

  return snapshot_download(config.model, revision=config.revision or None)


def load(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> sd_pipeline.StableDiffusion:
  check(config)
  return sd_pipeline.load_pipeline(
    _local_path(config, pathlib.Path(workdir)),
    dtype=DTYPES[dtype_of(config)],
    scheduler=config.scheduler,
  )


def weights_fingerprint(pipe: Any) -> str | None:
  """sha256 of every weight of the pipeline's models (name, dtype, shape, bytes), in name order."""
  import hashlib

  if not isinstance(pipe, sd_pipeline.StableDiffusion):
    return None
  h = hashlib.sha256()
  for name in sorted(pipe.params):
    leaves = jax.tree_util.tree_leaves_with_path(pipe.params[name])
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
      x = np.asarray(jax.device_get(leaf))
      h.update(f"{name}{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape}\n".encode())
      h.update(x.tobytes())
  return h.hexdigest()


class Engine:
  """``engine(prompts, seeds) -> (float32 [N, H, W, 3] in [0, 1], NSFW flags: all False)``."""

  def __init__(self, pipe: sd_pipeline.StableDiffusion, config: ml_collections.ConfigDict):
    self.pipe, self.config = pipe, config
    self.max_prompt_tokens = pipe.tokenizer.context_length
    devices = jax.local_devices()
    self.mesh = jax.make_mesh((len(devices),), ("rows",), devices=devices)
    self.rows = -(-config.batch_size // len(devices)) * len(devices)  # a multiple of devices
    replicated, split = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("rows"))
    self.params = jax.device_put(pipe.params, replicated)
    sample = sd_pipeline.make_sampler(pipe, steps=config.steps, guidance=config.guidance)
    self.sample = jax.jit(
      sample,
      in_shardings=(replicated, split, split, split),
      out_shardings=split,
    )
    self.neg_ids = pipe.tokenizer([config.negative_prompt])[0]
    self.shape = pipe.latent_shape(config.resolution)

  def prompt_tokens(self, text: str) -> int:
    """Tokens of ``text`` with SOT / EOT, untruncated (the prompt-length check)."""
    return len(self.pipe.tokenizer.encode(text)) + 2

  def __call__(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, list[bool]]:
    n = len(prompts)
    if not 0 < n <= self.rows:
      raise ValueError(f"jax engine: {n} prompts for batches of {self.rows}")
    pad = self.rows - n  # repeat the first row: its image is dropped
    ids = self.pipe.tokenizer(list(prompts) + [prompts[0]] * pad)
    neg = np.repeat(self.neg_ids[None], self.rows, axis=0)
    latents = initial_latents(list(seeds) + [seeds[0]] * pad, self.shape).transpose(0, 2, 3, 1)
    images = self.sample(self.params, ids, neg, latents)
    return np.asarray(jax.device_get(images))[:n], [False] * n

  @staticmethod
  def out_of_memory(e: BaseException) -> bool:
    """XLA's RESOURCE_EXHAUSTED: not retried (a lower batch_size is the fix)."""
    return "RESOURCE_EXHAUSTED" in str(e)
