"""Eval sets: COCO captions (coco-mini), Karpathy JSON, class folders and the CIFAR-10 zip."""

import json
import zipfile

import numpy as np
import PIL.Image
import pytest

from gmail_jax.data import eval_sets, preprocess


def test_coco_mini_captions(shared):
  coco = shared("coco-mini")
  s = eval_sets.load_coco_captions(
    coco / "annotations" / "captions_train2017.json",
    coco / "train2017",
    image_size=32,
    max_images=6,
  )
  assert len(s.images) == 6 and s.images[0].shape == (32, 32, 3) and s.images[0].dtype == np.uint8
  assert len(s.captions) == len(s.text_to_image) == 30  # 5 captions each
  assert [len(t) for t in s.image_to_texts] == [5] * 6
  ann = json.loads((coco / "annotations" / "captions_train2017.json").read_text())
  first = min(ann["images"], key=lambda im: im["id"])
  assert s.paths[0].endswith(first["file_name"])
  want = sorted(a["caption"].strip() for a in ann["annotations"] if a["image_id"] == first["id"])
  assert sorted(s.captions[j] for j in s.image_to_texts[0]) == [" ".join(c.split()) for c in want]
  # A SigLIP tower's mode squashes the whole image (no crop); CLIP's centre crop is the default.
  squashed = eval_sets.load_images(s.paths[:2], image_size=32, resize="squash")
  for path, crop, sq in zip(s.paths[:2], s.images[:2], squashed, strict=True):
    with PIL.Image.open(path) as im:
      np.testing.assert_array_equal(crop, preprocess.resize_center_crop(im, 32))
      np.testing.assert_array_equal(sq, preprocess.resize_squash(im, 32))


def test_karpathy_json(shared, tmp_path):
  coco = shared("coco-mini")
  files = sorted(p.name for p in (coco / "val2017").glob("*.jpg"))[:3]
  data = {
    "images": [
      {
        "filename": f,
        "split": "test" if i < 2 else "train",
        "sentences": [{"raw": f"c{i}a"}, {"raw": f"c{i}b"}],
      }
      for i, f in enumerate(files)
    ]
  }
  (tmp_path / "k.json").write_text(json.dumps(data))
  s = eval_sets.load_karpathy(tmp_path / "k.json", coco / "val2017")
  assert s.captions == ["c0a", "c0b", "c1a", "c1b"] and s.text_to_image.tolist() == [0, 0, 1, 1]


def test_cifar10_zip_read_in_place(shared):
  z = shared("cifar10-test-jpeg", "cifar10_test_jpeg.zip")
  s = eval_sets.load_class_set(z, per_class=3, image_size=32)
  assert s.classnames[:3] == ["airplane", "automobile", "bird"] and len(s.classnames) == 10
  assert s.labels.tolist() == [c for c in range(10) for _ in range(3)]
  with zipfile.ZipFile(z) as zf:
    assert s.paths[0].endswith(
      sorted(n for n in zf.namelist() if "/airplane/" in n and n.endswith(".jpg"))[0]
    )
  assert eval_sets.class_prompts(["aircraft_carrier"]) == ["a photo of a aircraft carrier."]


def test_class_folders_and_bad_file(shared, tmp_path):
  real = shared("cifake-sd14-test-sample", "real")
  s = eval_sets.load_class_set(real, per_class=2)
  assert len(s.images) == 20 and s.images[0].mode == "RGB"
  (tmp_path / "cat").mkdir()
  (tmp_path / "cat" / "x.jpg").write_text("not an image")
  with pytest.raises(ValueError, match=r"x\.jpg: not an image"):
    eval_sets.load_class_set(tmp_path)
