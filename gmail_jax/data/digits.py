"""Quickstart dataset: real handwritten digit scans vs procedurally rendered ("generated") digits.

Real images are sklearn's bundled UCI handwritten digits (``sklearn.datasets.load_digits``, 1,797
real 8x8 scans, no download). The UCI scans were made by binarising 32x32 handwriting bitmaps and
counting the ink pixels in each 4x4 block, so every pixel is an integer 0..16.

The "generated" images are a documented stand-in for an image generator: each digit is rendered
from a TrueType font that ships with matplotlib (DejaVu Sans/Serif/Mono, STIX, Computer Modern),
with a random affine jitter (scale, aspect, rotation, shear, shift), stroke width and blur, then
binarised at 32x32 with pixel noise and downsampled exactly like the scans (4x4 ink counts, 0..16).
They share the class (and therefore captions such as "a photo of the digit seven") with the real
scans but not the pixel statistics: typeset strokes vs handwriting, the same kind of gap as
generated vs real photos.

:func:`materialize` writes both as class folders that the regular ``class_folders`` data source
reads (``real/<class>/NNNN.png``, ``generated/<class>/NNNN.png``), with a held-out real (and
generated) test split that is never used for training the teacher, the alignment or the probes::

    ROOT/train/real/<class>/NNNN.png       teacher pretraining, alignment real side, probe (c)
    ROOT/train/generated/<class>/NNNN.png  alignment generated side, probes (a, b, GMAIL)
    ROOT/test/real/<class>/NNNN.png        held out: probe test set and gap pairs
    ROOT/test/generated/<class>/NNNN.png   held out: gap pairs
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import PIL.ImageFont

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CAPTION_TEMPLATES = (
  "a photo of the digit {name}.",
  "a scan of a handwritten {name}.",
  "the number {name}, written by hand.",
  "a small grayscale image of the digit {name}.",
  "a {name}.",
)

# Font files shipped in matplotlib's mpl-data/fonts/ttf (all have the ten ASCII digits).
FONT_FILES = (
  "DejaVuSans.ttf",
  "DejaVuSans-Bold.ttf",
  "DejaVuSans-Oblique.ttf",
  "DejaVuSerif.ttf",
  "DejaVuSerif-Italic.ttf",
  "DejaVuSerif-Bold.ttf",
  "DejaVuSansMono.ttf",
  "DejaVuSansMono-Oblique.ttf",
  "STIXGeneral.ttf",
  "STIXGeneralItalic.ttf",
  "STIXGeneralBol.ttf",
  "cmr10.ttf",
  "cmss10.ttf",
  "cmtt10.ttf",
)

_SCAN = 32  # UCI bitmaps are 32x32 before the 4x4 block counts
_BLOCK = 4
_GLYPH = 96  # glyphs are rendered large, then warped and reduced to the 32x32 bitmap


def caption(label: int, template: int = 0) -> str:
  """Caption of class ``label`` from template ``template`` (index into CAPTION_TEMPLATES)."""
  t = CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)]
  return t.format(name=CLASS_NAMES[label])


def real_digits() -> tuple[np.ndarray, np.ndarray]:
  """sklearn's bundled scans as (uint8 [N, 8, 8] ink in 0..255, int64 labels [N]); ink = bright."""
  from sklearn.datasets import load_digits

  d = load_digits()
  images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
  return images, d.target.astype(np.int64)


def font_paths() -> list[pathlib.Path]:
  """The matplotlib TrueType files used for rendering (those present in this install)."""
  import matplotlib

  ttf = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"
  paths = [ttf / name for name in FONT_FILES if (ttf / name).exists()]
  if not paths:
    raise FileNotFoundError(f"no TrueType fonts found under {ttf}")
  return paths


def _glyph(digit: int, font: PIL.ImageFont.FreeTypeFont, stroke: int) -> np.ndarray:
  """Tight-cropped float [h, w] ink mask of one glyph rendered at ~_GLYPH px."""
  canvas = PIL.Image.new("L", (2 * _GLYPH, 2 * _GLYPH), 0)
  draw = PIL.ImageDraw.Draw(canvas)
  draw.text(
    (_GLYPH // 2, _GLYPH // 4),
    str(digit),
    fill=255,
    font=font,
    stroke_width=stroke,
    stroke_fill=255,
  )
  box = canvas.getbbox()
  if box is None:
    raise ValueError(f"font {font.path} rendered an empty glyph for {digit}")
  return np.asarray(canvas.crop(box), np.float32) / 255.0


def render_digit(digit: int, rng: np.random.Generator, fonts: list[pathlib.Path]) -> np.ndarray:
  """One rendered digit as uint8 [8, 8] (ink counts 0..16 scaled to 0..255, like real_digits).

  Font, stroke width, height (80-100% of the frame, like the size-normalised scans), aspect,
  rotation (±12°), shear (±0.3), shift (±2 px of 32), Gaussian blur, binarisation at 32x32 with
  0.8% pixel flips, then 4x4 ink counts.
  """
  path = fonts[rng.integers(len(fonts))]
  font = PIL.ImageFont.truetype(str(path), size=_GLYPH)
  glyph = _glyph(digit, font, stroke=int(rng.integers(0, 7)))
  h, w = glyph.shape
  height = _SCAN * rng.uniform(0.8, 1.0)
  width = min(_SCAN * 0.95, w * height / h * rng.uniform(0.75, 1.25))
  # Inverse affine map from the 32x32 output grid into glyph pixel coordinates.
  angle = np.deg2rad(rng.uniform(-12.0, 12.0))
  shear = rng.uniform(-0.3, 0.3)
  scale = np.diag([w / width, h / height])
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  sh = np.array([[1.0, shear], [0.0, 1.0]])
  a = scale @ sh @ rot  # output offset (x, y) from centre -> glyph offset
  centre_out = np.array([_SCAN / 2, _SCAN / 2]) + rng.uniform(-2.0, 2.0, size=2)
  centre_in = np.array([w / 2, h / 2])
  offset = centre_in - a @ centre_out
  img = PIL.Image.fromarray(np.uint8(glyph * 255))
  warped = img.transform(
    (_SCAN, _SCAN),
    PIL.Image.Transform.AFFINE,
    (a[0, 0], a[0, 1], offset[0], a[1, 0], a[1, 1], offset[1]),
    resample=PIL.Image.Resampling.BILINEAR,
  )
  warped = warped.filter(PIL.ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.2))))
  bits = np.asarray(warped, np.float32) > 255 * rng.uniform(0.35, 0.6)
  bits ^= rng.random(bits.shape) < 0.008
  counts = bits.reshape(8, _BLOCK, 8, _BLOCK).sum(axis=(1, 3))
  return np.rint(counts * (255.0 / 16.0)).astype(np.uint8)


def generated_digits(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [10 * n_per_class, 8, 8], labels) rendered deterministically from ``seed``."""
  rng = np.random.default_rng(seed)
  fonts = font_paths()
  labels = np.repeat(np.arange(10), n_per_class)
  images = np.stack([render_digit(int(d), rng, fonts) for d in labels])
  return images, labels


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
  """Boolean [N] test mask, stratified by class, deterministic in ``seed``."""
  rng = np.random.default_rng(seed)
  test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    n_test = int(round(test_fraction * len(idx)))
    test[rng.permutation(idx)[:n_test]] = True
  return test


def _write(root: pathlib.Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
  for image, label, i in zip(images, labels, ids, strict=True):
    d = root / CLASS_NAMES[label]
    d.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(image, mode="L").save(d / f"{i:04d}.png")


def materialize(
  root: str | pathlib.Path,
  *,
  generated_per_class: int = 150,
  test_fraction: float = 0.3,
  seed: int = 0,
) -> dict:
  """Write the quickstart class folders under ``root`` (layout in the module docstring).

  Returns a summary dict (also written to ROOT/dataset.json). Idempotent: if ROOT/dataset.json
  already describes the same arguments, nothing is rewritten.
  """
  root = pathlib.Path(root)
  meta = {
    "real": "sklearn.datasets.load_digits (UCI handwritten digits, 8x8 scans)",
    "generated": "procedural font rendering, gmail_jax.data.digits.render_digit",
    "generated_per_class": generated_per_class,
    "test_fraction": test_fraction,
    "seed": seed,
    "classes": list(CLASS_NAMES),
  }
  marker = root / "dataset.json"
  if marker.exists():
    old = json.loads(marker.read_text())
    if {k: old.get(k) for k in meta} == meta:
      return old
  real, real_y = real_digits()
  gen, gen_y = generated_digits(generated_per_class, seed)
  real_test = split_indices(real_y, test_fraction, seed)
  gen_test = split_indices(gen_y, test_fraction, seed + 1)
  for split, rmask, gmask in (("train", ~real_test, ~gen_test), ("test", real_test, gen_test)):
    _write(root / split / "real", real[rmask], real_y[rmask], np.flatnonzero(rmask))
    _write(root / split / "generated", gen[gmask], gen_y[gmask], np.flatnonzero(gmask))
  meta["counts"] = {
    "train/real": int((~real_test).sum()),
    "train/generated": int((~gen_test).sum()),
    "test/real": int(real_test.sum()),
    "test/generated": int(gen_test.sum()),
  }
  marker.write_text(json.dumps(meta, indent=2))
  return meta
