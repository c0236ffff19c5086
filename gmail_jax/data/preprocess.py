"""CLIP image preprocessing, identical to transformers' ``CLIPImageProcessor``.

Per image (HF ``PilBackend``, ``size={"shortest_edge": S}``, ``crop_size=S``):

  1. convert to RGB; transparency is composited onto white (HF ``convert_to_rgb``);
  2. resize with PIL bicubic so the short side is S and the long side is
     ``int(S * long / short)`` (HF ``get_resize_output_image_size`` truncates, it does not round);
  3. center crop S x S with ``top = (h - S) // 2``, ``left = (w - S) // 2``;
  4. ``x / 255`` then ``(x - CLIP_MEAN) / CLIP_STD`` per channel (other towers pass their own).

SigLIP (``mode="squash"``, HF ``SiglipImageProcessorPil``, ``size={"height": S, "width": S}``)
replaces steps 2-3 by one PIL bicubic resize to S x S (no crop; the aspect ratio is not kept).
:func:`resize` dispatches on a tower's ``PreprocessSpec.resize`` mode.

Steps 1-3 run on the host and give uint8 (what data pipelines ship to the device);
step 4 is :func:`normalize`, which also runs on ``jax.Array`` inside a jitted step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import PIL.Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["shortest_edge_crop", "squash"]
RESIZE_MODES: tuple[str, ...] = ("shortest_edge_crop", "squash")


def to_rgb(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
  """An RGB PIL image; alpha (or palette transparency) is composited onto white like HF."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"numpy images must be uint8 [H,W], [H,W,3] or [H,W,4], got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
      raise ValueError(f"numpy images must be [H,W], [H,W,3] or [H,W,4], got shape {image.shape}")
    image = PIL.Image.fromarray(image)
  elif not isinstance(image, PIL.Image.Image):
    raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
  elif image.mode == "RGB" and image.info.get("transparency") is None:
    # Already RGB: ``convert`` would only copy it (twice per image in the input pipeline: decode,
    # then resize). Loaded here as ``convert`` would, so a file-backed image is read now.
    image.load()
    return image
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def resize_output_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(new_h, new_w): short side -> ``size``, long side -> ``int(size * long / short)`` (HF)."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def resize_center_crop(image: PIL.Image.Image | np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size, 3] RGB: HF shortest-edge bicubic resize, then center crop."""
  rgb = to_rgb(image)
  width, height = rgb.size
  if width < 1 or height < 1:
    raise ValueError(f"empty image of size {width}x{height}")
  new_h, new_w = resize_output_size(height, width, size)
  out = rgb.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  # Crop in PIL: one copy of the crop into numpy, not of the whole resized image, then the crop.
  # (Resizing only the crop with ``resize(box=...)`` would be ~30% cheaper but is not bit-exact:
  # +-1 on ~1e-4 of pixels vs CLIPImageProcessor, which tests hold to equality.)
  return np.asarray(out.crop((left, top, left + size, top + size)))


def resize_squash(image: PIL.Image.Image | np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size, 3] RGB: one PIL bicubic resize to size x size, no crop (HF SigLIP)."""
  rgb = to_rgb(image)
  width, height = rgb.size
  if width < 1 or height < 1:
    raise ValueError(f"empty image of size {width}x{height}")
  return np.asarray(rgb.resize((size, size), resample=PIL.Image.Resampling.BICUBIC))


def resize(
  image: PIL.Image.Image | np.ndarray, size: int, mode: ResizeMode = "shortest_edge_crop"
) -> np.ndarray:
  """uint8 [size, size, 3] RGB by a tower's resize ``mode`` (``PreprocessSpec.resize``)."""
  if mode == "shortest_edge_crop":
    return resize_center_crop(image, size)
  if mode == "squash":
    return resize_squash(image, size)
  raise ValueError(f"resize mode {mode!r} not in {list(RESIZE_MODES)}")


def normalize(images, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
  """``(x / 255 - mean) / std`` in float32, channels last; numpy in -> numpy out,
  ``jax.Array`` in -> ``jax.Array`` out (so it can run on device inside jit). ``mean``/``std``:
  per channel, CLIP's by default (a tower's ``preprocess`` spec gives its own)."""
  if isinstance(images, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # lazily: host-only pipelines need not import jax
  mean = xp.asarray(mean, dtype=xp.float32)
  std = xp.asarray(std, dtype=xp.float32)
  x = xp.asarray(images).astype(xp.float32) * xp.float32(1.0 / 255.0)
  return (x - mean) / std


def preprocess(
  images: Sequence[PIL.Image.Image | np.ndarray],
  size: int,
  mean: Sequence[float] = CLIP_MEAN,
  std: Sequence[float] = CLIP_STD,
  mode: ResizeMode = "shortest_edge_crop",
) -> np.ndarray:
  """float32 [N, size, size, 3], normalised NHWC (``mean``/``std``/``mode``: CLIP's by default,
  then equal to CLIPImageProcessor, NCHW there)."""
  if len(images) == 0:
    return np.zeros((0, size, size, 3), np.float32)
  crops = np.stack([resize(im, size, mode) for im in images])
  return normalize(crops, mean, std)
