"""Stable Diffusion text-to-image in JAX: a diffusers pipeline folder -> one jitted sampler.

    sd = load_pipeline(path)                                  # unet, vae, text_encoder, tokenizer
    sample = make_sampler(sd, steps=50, guidance=7.5)         # a pure function of arrays
    images = jax.jit(sample)(sd.params, ids, neg_ids, latents)  # [N, H, W, 3] float32 in [0, 1]

One row per caption: the prompt ids ``[N, 77]`` (and the negative prompt's) are *arguments*, so a
batch holds N different captions. Inside the one function: the text encoder on both prompt sets,
the whole denoising loop (``jax.lax.fori_loop`` over the scheduler's steps, a pure function of
arrays: schedulers.py), classifier-free guidance ``eps_u + g (eps_c - eps_u)`` (as diffusers for
g > 1; g <= 1 runs the conditional branch only), the VAE decoder, and diffusers' output transform
``clip(x / 2 + 0.5, 0, 1)``. ``latents`` are the starting noise ``[N, h, w, C]`` (NHWC, before
``init_noise_sigma``), drawn by the caller: generation/seeds.py draws them per image with numpy,
so a row depends only on its own caption and seed. Sharding is the caller's (``jax.jit`` in/out
shardings): rows are independent, so the batch may be split over any mesh axis.

Pixel space: a folder without a VAE (``model_index.json`` has ``"vae": [null, null]`` or no
``vae`` entry, as the quickstart's diffusion stage writes) samples images directly: the UNet's
``in_channels`` are the image channels, the final sample goes through the same
``clip(x / 2 + 0.5, 0, 1)`` (diffusers' ``DDPMPipeline``), and one channel is repeated to RGB.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models.convert import CheckpointError
from gmail_jax.models.diffusion import schedulers
from gmail_jax.models.diffusion.text_encoder import (
  SDTokenizer,
  load_sd_tokenizer,
  load_text_encoder,
)
from gmail_jax.models.diffusion.unet import load_unet
from gmail_jax.models.diffusion.vae import load_vae_decoder, to_unit_range

PIPELINES = ("StableDiffusionPipeline",)


@dataclasses.dataclass
class StableDiffusion:
  """The parts of a Stable Diffusion pipeline that sampling needs; ``graphdefs`` + ``params``
  (nnx states, a pytree) are what a jitted sampler takes."""

  graphdefs: dict[str, nnx.GraphDef]
  params: dict[str, Any]
  tokenizer: SDTokenizer
  scheduler_config: dict
  latent_channels: int
  downscale: int  # pixels per latent (1: pixel space, no VAE)
  path: str

  def latent_shape(self, resolution: int) -> tuple[int, int, int]:
    """Starting-noise shape of one image, diffusers' NCHW ``(C, h, w)``."""
    if resolution % self.downscale:
      raise ConfigError(f"resolution {resolution}: a multiple of {self.downscale} for {self.path}")
    h = resolution // self.downscale
    return (self.latent_channels, h, h)


def read_model_index(path: str) -> dict:
  index = os.path.join(path, "model_index.json")
  try:
    with open(index) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{index}: not found (not a diffusers pipeline folder)") from None
  except ValueError as e:
    raise CheckpointError(f"{index}: invalid JSON ({e})") from None
  if data.get("_class_name") not in PIPELINES:
    raise ConfigError(f"{index}: _class_name {data.get('_class_name')!r} not in {PIPELINES}")
  return data


def load_pipeline(
  path: str, *, dtype=None, scheduler: str = "", variant: str | None = None
) -> StableDiffusion:
  """The UNet, VAE decoder, text encoder, tokenizer and scheduler config of a diffusers
  ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``; safetensors or .bin). ``dtype``: compute dtype of the UNet and
  text encoder (None: fp32); the VAE decodes in fp32 (in bf16 it is ~3 % off, as diffusers'
  ``force_upcast`` knows). ``scheduler``: a scheduler class name to swap in (schedulers.py).
  No VAE in ``model_index.json``: a pixel-space pipeline (module docstring)."""
  path = os.fspath(path)
  index = read_model_index(path)
  unet = load_unet(path, dtype=dtype, variant=variant)
  vae = load_vae_decoder(path, variant=variant) if has_vae(index) else None
  text = load_text_encoder(path, dtype=dtype, variant=variant)
  sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
  try:
    with open(sched_path) as f:
      sched = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{sched_path}: cannot read ({e})") from None
  if scheduler:
    sched["_class_name"] = scheduler
  schedulers.resolve_config(sched, sched.get("_class_name"))  # refuse what we cannot run, now
  graphdefs, params = {}, {}
  for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
    if module is not None:
      graphdefs[name], params[name] = nnx.split(module)
  return StableDiffusion(
    graphdefs=graphdefs,
    params=params,
    tokenizer=load_sd_tokenizer(path),
    scheduler_config=sched,
    latent_channels=vae.config.latent_channels if vae else unet.config.in_channels,
    downscale=vae.config.downscale if vae else 1,
    path=path,
  )


def has_vae(model_index: dict) -> bool:
  """False for a pixel-space pipeline: ``"vae"`` absent or ``[null, null]`` (diffusers' way of
  writing a component that is not there)."""
  entry = model_index.get("vae")
  return isinstance(entry, list) and bool(entry) and entry[0] is not None


def make_sampler(
  sd: StableDiffusion, *, steps: int, guidance: float
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
  """``sample(params, ids, neg_ids, latents) -> images``: ids / neg_ids int32 ``[N, 77]``, latents
  ``[N, h, w, C]`` (standard normal), images float32 ``[N, H, W, 3]`` in [0, 1]. Pure: jit it."""
  schedule = schedulers.make_schedule(sd.scheduler_config, steps)
  guided = guidance > 1.0  # diffusers' do_classifier_free_guidance
  g = sd.graphdefs

  def sample(params, ids, neg_ids, latents):
    text = nnx.merge(g["text_encoder"], params["text_encoder"])
    unet = nnx.merge(g["unet"], params["unet"])
    vae = nnx.merge(g["vae"], params["vae"]) if "vae" in g else None
    ctx = text(ids)
    if guided:
      ctx = jnp.concatenate([text(neg_ids), ctx])  # [2N, L, D]: unconditional rows first
    x = latents.astype(jnp.float32) * schedule.init_noise_sigma
    state = schedulers.init_state(schedule, x.shape)

    def body(i, carry):
      x, state = carry
      inp = schedulers.scale_model_input(schedule, x, i)
      t = schedulers.timestep(schedule, i)
      if guided:
        uncond, cond = jnp.split(unet(jnp.concatenate([inp, inp]), t, ctx), 2)
        out = uncond + guidance * (cond - uncond)
      else:
        out = unet(inp, t, ctx)
      return schedulers.step(schedule, state, out, i, x)

    x, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (x, state))
    images = to_unit_range(vae.decode_latents(x) if vae is not None else x)
    if images.shape[-1] == 1:  # a grayscale pixel-space model: RGB like every other pipeline
      images = jnp.repeat(images, 3, axis=-1)
    return images

  return sample
