"""Decoding (with reasons for bad files) and the generated-image augmentation."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import PIL.Image

from gmail_jax.data.preprocess import to_rgb
from gmail_jax.data.rejects import BadInput

# A draft-decoded JPEG keeps at least DRAFT_GAP x the wanted short side, so the bicubic resize that
# follows still does most of the downscaling (Pillow's ``thumbnail`` uses the same 2x gap): the
# 1/2, 1/4, 1/8 DCT scaling alone is a box-like filter, visibly softer/aliased than bicubic.
DRAFT_GAP = 2


def draft_size(width: int, height: int, short: int) -> tuple[int, int] | None:
  """The size to ask ``PIL.JpegImagePlugin.draft`` for so the decoded short side stays >=
  ``DRAFT_GAP * short``; None when no 1/2, 1/4 or 1/8 scale fits (decode at full size)."""
  need = DRAFT_GAP * short
  if short < 1 or min(width, height) < 2 * need:
    return None
  s = min(width, height)
  return -(-width * need // s), -(-height * need // s)


def decode_image(
  data: bytes | np.ndarray | PIL.Image.Image, name: str, *, draft_short: int | None = None
) -> PIL.Image.Image:
  """A fully loaded RGB PIL image, or :class:`BadInput` naming ``name`` and why it is unusable.

  ``draft_short``: a JPEG whose short side is at least ``2 * DRAFT_GAP * draft_short`` is decoded
  at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, much cheaper than a full decode), keeping its short
  side >= ``DRAFT_GAP * draft_short``. Pixels then differ slightly from a full decode followed by
  the same resize (tests/test_data_preprocess.py bounds by how much); None = always full size.
  """
  if isinstance(data, PIL.Image.Image | np.ndarray):
    try:
      return to_rgb(data)
    except (ValueError, TypeError) as e:
      raise BadInput(name, f"bad image array: {e}") from None
  if data is None or len(data) == 0:
    raise BadInput(name, "empty file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
      image = PIL.Image.open(io.BytesIO(data))
      if draft_short and image.format == "JPEG":
        size = draft_size(image.width, image.height, draft_short)
        if size is not None:
          image.draft("RGB", size)
      image.load()  # decode now: truncation only shows up here
    if image.width < 1 or image.height < 1:
      raise BadInput(name, f"empty image {image.width}x{image.height}")
    return to_rgb(image)
  except BadInput:
    raise
  except PIL.UnidentifiedImageError:
    raise BadInput(name, "not an image: cannot identify image file") from None
  except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
    raise BadInput(name, f"image too large: {e}") from None
  except OSError as e:
    msg = str(e)
    kind = "truncated image" if "truncat" in msg.lower() else "corrupt image"
    raise BadInput(name, f"{kind}: {msg}") from None
  except Exception as e:  # any other decoder failure is still one bad file, never a crash
    raise BadInput(name, f"corrupt image: {type(e).__name__}: {e}") from None


def random_resized_crop_flip(
  image: PIL.Image.Image,
  size: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.5, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """uint8 [size,size,3]: Inception-style random resized crop, then a horizontal flip w.p. 1/2.

  Area fraction ~ U(scale), log aspect ~ U(log ratio); 10 tries, then the central max-ratio crop
  (torchvision's RandomResizedCrop rule). Deterministic given ``rng``.
  """
  width, height = image.size
  area = width * height
  box = None
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      box = (left, top, left + w, top + h)
      break
  if box is None:
    in_ratio = width / height
    if in_ratio < ratio[0]:
      w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
      w, h = int(round(height * ratio[1])), height
    else:
      w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    box = (left, top, left + w, top + h)
  out = image.resize((size, size), resample=PIL.Image.Resampling.BICUBIC, box=box)
  if rng.uniform() < 0.5:
    out = out.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
  return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))
