"""The seed of image k of a caption: any single image can be regenerated from it.

seed = mix64(config.seed, key(caption_id), k) >> 1      (splitmix64 chain, data/pairing.py)
key(id) = int(id) for a canonical decimal id, else the first 8 bytes of sha256(id), big-endian
"""

from __future__ import annotations

import hashlib

import numpy as np

from gmail_jax.data.pairing import mix64


def caption_key(caption_id: str) -> int:
  """The integer a caption id stands for in the seed (see the module docstring)."""
  if caption_id.isdigit() and str(int(caption_id)) == caption_id:
    return int(caption_id)
  return int.from_bytes(hashlib.sha256(caption_id.encode()).digest()[:8], "big")


def image_seed(seed: int, caption_id: str, k: int) -> int:
  """Seed of image ``k`` of ``caption_id``: 63 bits (an int64 column, torch's manual_seed)."""
  return mix64(seed, caption_key(caption_id), k) >> 1


NOISE = "numpy-pcg64"  # the starting-noise source every backend draws from (recorded in the plan)


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> np.ndarray:
  """Standard-normal starting latents, float32 ``[N, *shape]`` (``shape`` = C, h, w: diffusers'
  NCHW), one numpy PCG64 stream per image seeded with its seed: the same numbers on every device
  and for every backend, so a JAX run and a diffusers run start from the same noise."""
  return (
    np.stack(
      [np.random.Generator(np.random.PCG64(s)).standard_normal(shape, np.float32) for s in seeds]
    )
    if seeds
    else np.zeros((0, *shape), np.float32)
  )
