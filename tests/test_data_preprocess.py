"""CLIP preprocessing equals transformers' CLIPImageProcessor on real COCO photos."""

import numpy as np
import PIL.Image
import pytest
from conftest import shared_path

from gmail_jax.data import preprocess as pp

transformers = pytest.importorskip("transformers")
from transformers import CLIPImageProcessorPil  # noqa: E402


def _photos():
  root = shared_path("coco-mini")
  files = sorted(root.glob("train2017/*.jpg")) + sorted(root.glob("val2017/*.jpg"))
  assert len(files) >= 200, root
  return files


def _hf(proc, images):
  out = proc(images=images, return_tensors="np")["pixel_values"]
  return np.transpose(out, (0, 2, 3, 1))  # NCHW -> NHWC


def test_equal_to_clip_image_processor_on_all_coco_mini_photos():
  proc = CLIPImageProcessorPil()
  files = _photos()
  sizes, worst = set(), 0.0
  for i in range(0, len(files), 32):
    images = [PIL.Image.open(f) for f in files[i : i + 32]]
    sizes.update(im.size for im in images)
    ours = pp.preprocess(images, 224)
    ref = _hf(proc, images)
    assert ours.shape == ref.shape == (len(images), 224, 224, 3)
    assert ours.dtype == np.float32
    worst = max(worst, float(np.abs(ours - ref).max()))
  assert len(sizes) > 20  # many sizes and aspect ratios really were exercised
  assert worst <= 1e-5, worst


def test_non_default_size_and_odd_inputs():
  proc = CLIPImageProcessorPil(size={"shortest_edge": 97}, crop_size={"height": 97, "width": 97})
  files = _photos()[::20]
  rng = np.random.default_rng(0)
  images = [PIL.Image.open(f) for f in files]
  # Grayscale, RGBA with transparency, a tall thin numpy array, a tiny image (upsampled).
  images.append(images[0].convert("L"))
  rgba = rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)
  images.append(PIL.Image.fromarray(rgba, "RGBA"))
  images.append(rng.integers(0, 256, (301, 40, 3), dtype=np.uint8))
  images.append(PIL.Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)))
  ours = pp.preprocess(images, 97)
  ref = _hf(proc, images)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_resize_center_crop_is_uint8_and_normalize_runs_in_jit():
  import jax
  import jax.numpy as jnp

  im = PIL.Image.open(_photos()[0])
  crop = pp.resize_center_crop(im, 64)
  assert crop.dtype == np.uint8 and crop.shape == (64, 64, 3)
  host = pp.normalize(crop[None])
  dev = jax.jit(pp.normalize)(jnp.asarray(crop[None]))
  assert isinstance(dev, jax.Array) and dev.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dev), host, atol=1e-6)
  np.testing.assert_allclose(pp.preprocess([im], 64), host, atol=0)


def test_bad_inputs_raise_clearly():
  with pytest.raises(ValueError, match="uint8"):
    pp.resize_center_crop(np.zeros((8, 8, 3), np.float32), 4)
  with pytest.raises(ValueError, match="shape"):
    pp.resize_center_crop(np.zeros((8, 8, 5), np.uint8), 4)
  with pytest.raises(TypeError):
    pp.resize_center_crop("not an image", 4)


def test_draft_decode_stays_close_to_full_decode():
  """``decode_image(draft_short=S)`` (opt-in ``config.data.draft_decode``) on 40 COCO photos,
  resized to 64: the bound is what draft decoding costs, measured, not a claim of equality."""
  from gmail_jax.data.images import decode_image, draft_size

  assert draft_size(640, 480, 224) is None  # 480 < 4 x 224: full decode
  assert draft_size(640, 480, 64) == (171, 128)  # keeps >= 2 x 64 on the short side
  per_image = []
  for f in _photos()[:40]:
    data = f.read_bytes()
    full, draft = decode_image(data, str(f)), decode_image(data, str(f), draft_short=64)
    assert min(draft.size) >= 128 and max(draft.size) < max(full.size)  # decoded at 1/2 or 1/4
    assert decode_image(data, str(f), draft_short=224).size == full.size
    diff = pp.resize(full, 64).astype(np.int16) - pp.resize(draft, 64).astype(np.int16)
    per_image.append(np.abs(diff).mean())
  # measured: mean 1.0, worst image 8.1 (of 255); textured photos alias a little at 1/4 scale
  assert np.mean(per_image) < 1.5 and max(per_image) < 10
