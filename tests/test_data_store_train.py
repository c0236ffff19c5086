"""prepare --store=train (the training crops stored once: training only decodes) and the teacher
cache's skipped real images (cached_real): records, meta.json, pipeline, attach, training."""

import functools
import io
import json

import numpy as np
import PIL.Image
import PIL.JpegImagePlugin
import pytest
from data_helpers import coco_captions, data_config

from gmail_jax.data import pipeline, prepare, preprocess
from gmail_jax.data.images import decode_image
from gmail_jax.data.sources import ArrayRecordSource
from gmail_jax.errors import ConfigError, InputError

SIZE = 48
make_config = functools.partial(data_config, seed=7, image_size=SIZE)


def _coco_manifest(shared, tmp_path, n=6):
  """``n`` coco-mini photos paired with the next one, + a 20x12 JPEG (smaller than the crop)."""
  coco, images, caps = coco_captions(shared, "val2017", n)
  small = tmp_path / "small.jpg"
  PIL.Image.new("RGB", (20, 12), (200, 30, 60)).save(small, "JPEG")
  paths = [str(coco / "val2017" / im["file_name"]) for im in images] + [str(small)]
  rows = [
    {"caption": f"photo {i}", "real_path": p, "gen_path": paths[(i + 1) % len(paths)]}
    for i, p in enumerate(paths)
  ]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(tmp_path / "m.jsonl")


@pytest.mark.parametrize("mode", ["shortest_edge_crop", "squash"])
def test_store_train_round_trip(shared, tmp_path, mode):
  src, out = _coco_manifest(shared, tmp_path), tmp_path / "ar"
  flags = [f"--src={src}", f"--out={out}", "--store=train", f"--image_size={SIZE}"]
  assert prepare.main([*flags, f"--resize={mode}"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  assert meta["store"] == "train" and meta["num_records"] == 7
  assert (meta["image_size"], meta["resize"], meta["quality"]) == (SIZE, mode, 95)
  assert meta["subsampling"] == "4:4:4" and meta["resize_short"] is None

  source = ArrayRecordSource(out, gens_per_caption=0)
  assert source.stored_crop == (SIZE, mode)
  for i in range(len(source)):
    pair = source.get(i, 0)
    for data, name in ((pair.real, pair.real_name), (pair.gen, pair.gen_name)):
      with PIL.Image.open(io.BytesIO(data)) as im:  # small images too: every image is a crop
        assert (im.format, im.size) == ("JPEG", (SIZE, SIZE))
        assert PIL.JpegImagePlugin.get_sampling(im) == 0  # 4:4:4
      path = name.rsplit(":", 1)[1]
      with open(path, "rb") as f:
        exact = preprocess.resize(decode_image(f.read(), path), SIZE, mode)
      diff = np.abs(np.asarray(decode_image(data, name), np.int16) - exact)
      # JPEG q95 4:4:4 of the exact crop; measured on coco-mini (32-224 px): worst image mean
      # 3.3, max 28 (prepare's docstring)
      assert diff.mean() < 4 and diff.max() <= 32, (path, diff.mean(), diff.max())

  # training decodes the stored crops and nothing else: batches are the records' pixels
  config = make_config(source="array_record", root=str(out))
  it = pipeline.make_eval_iterator(
    config, tokenizer=None, workdir=tmp_path, batch_size=4, keep_index=True, resize=mode
  )
  rows = 0
  for batch in it:
    for k, slot in enumerate(batch["slot"]):
      pair = source.get(int(slot), 0)
      for key, data in (("real_image", pair.real), ("gen_image", pair.gen)):
        want = np.asarray(decode_image(data, "x"))
        np.testing.assert_array_equal(batch[key][k], want)
      rows += 1
  assert rows == 7

  # the store is part of the plan: the same --out with the other store is refused by name
  with pytest.raises(InputError, match="written with --store=train, this run has --store=resized"):
    prepare.prepare(src, str(out))
  with pytest.raises(InputError, match="--image_size=48, this run has --image_size=32"):
    prepare.prepare(src, str(out), store="train", image_size=32, resize=mode)


def test_stored_crops_of_another_size_or_mode_are_refused(shared, tmp_path):
  src, out = _coco_manifest(shared, tmp_path, n=2), tmp_path / "ar"
  prepare.prepare(src, str(out), store="train", image_size=SIZE)
  plan = json.loads((out / "prepare.json").read_text())
  assert (plan["store"], plan["image_size"], plan["resize"]) == (
    "train",
    SIZE,
    "shortest_edge_crop",
  )
  # the default store's plan has no store keys: a run from before --store existed still resumes
  prepare.prepare(src, str(tmp_path / "resized"), resize_short=32)
  assert "store" not in json.loads((tmp_path / "resized" / "prepare.json").read_text())
  assert json.loads((tmp_path / "resized" / "meta.json").read_text())["store"] == "resized"

  other = make_config(source="array_record", root=str(out), image_size=64)
  with pytest.raises(ConfigError, match="crops of 48 px by shortest_edge_crop; this run needs 64"):
    pipeline.make_dataset(other, tokenizer=None, workdir=tmp_path, process_index=0, process_count=1)
  same = make_config(source="array_record", root=str(out))
  with pytest.raises(ConfigError, match="--resize=squash"):
    pipeline.make_dataset(
      same, tokenizer=None, workdir=tmp_path, process_index=0, process_count=1, resize="squash"
    )


def test_augmented_generated_images_crop_inside_the_stored_crop(shared, tmp_path):
  src, out = _coco_manifest(shared, tmp_path, n=3), tmp_path / "ar"
  prepare.prepare(src, str(out), store="train", image_size=SIZE)
  plain = make_config(source="array_record", root=str(out))
  aug = make_config(source="array_record", root=str(out), augment_generated=True)

  def batches(config):
    kw = dict(tokenizer=None, workdir=tmp_path, batch_size=2, keep_index=True)
    return list(pipeline.make_eval_iterator(config, **kw))

  for p, a in zip(batches(plain), batches(aug), strict=True):
    np.testing.assert_array_equal(p["real_image"], a["real_image"])  # reals: never augmented
    assert a["gen_image"].shape == p["gen_image"].shape == (len(p["slot"]), SIZE, SIZE, 3)
    assert not np.array_equal(p["gen_image"], a["gen_image"])


def test_cached_real_images_are_not_decoded(tmp_path):
  config = make_config(source="synthetic", synthetic_size=16, synthetic_image_size=SIZE)
  kw = dict(tokenizer=None, workdir=tmp_path, batch_size=4, keep_index=True)
  full = list(pipeline.make_eval_iterator(config, **kw))
  half = np.arange(16) % 2 == 0  # synthetic: real_id = slot
  part = list(pipeline.make_eval_iterator(config, cached_real=half, **kw))
  none = list(pipeline.make_eval_iterator(config, cached_real=np.ones(32, bool), **kw))
  for f, p, n in zip(full, part, none, strict=True):
    np.testing.assert_array_equal(f["gen_image"], p["gen_image"])
    np.testing.assert_array_equal(f["gen_image"], n["gen_image"])
    assert "real_image" not in n and "real_decoded" not in n
    np.testing.assert_array_equal(p["real_decoded"], ~half[f["real_id"]])
    np.testing.assert_array_equal(
      p["real_image"][p["real_decoded"]], f["real_image"][p["real_decoded"]]
    )
    assert not p["real_image"][~p["real_decoded"]].any()  # zero rows where cached

  # a worker process hands its batches over in shared memory (no copy), the same pixels
  config.data.num_workers = 1
  it = pipeline.make_eval_iterator(config, cached_real=half, **kw)
  first = next(it)
  assert type(first["gen_image"]).__name__ == "SharedMemoryArray"
  np.testing.assert_array_equal(first["gen_image"], full[0]["gen_image"])
  np.testing.assert_array_equal(first["real_image"], part[0]["real_image"])
  it.close()


def test_attach_reads_skipped_rows_from_the_cache(tmp_path):
  from gmail_jax.training import teacher_cache

  cache = teacher_cache.TeacherCache.open(tmp_path / "c", key="k", data={}, dim=3, writer=True)
  cache.put(np.array([0, 1]), np.array([[1.0, 0, 0], [0, 1.0, 0]]))
  calls = []

  def embed(real):  # a stand-in teacher: the first 3 pixels of each image
    calls.append(real.copy())
    return real.reshape(len(real), -1)[:, :3].astype(np.float32)

  gen = np.zeros((3, 2, 2, 3), np.uint8)
  real = np.zeros((3, 2, 2, 3), np.uint8)
  real[2] = 7  # row 2 decoded (real_id 5: a miss); rows 0, 1 skipped as cached (zeros)
  local = {
    "gen_image": gen,
    "real_image": real,
    "real_decoded": np.array([False, False, True]),
    "real_id": np.array([1, 0, 5], np.int32),
  }
  out = teacher_cache.attach(local, cache, embed)
  assert set(out) == {"gen_image", "real_id", "teacher_emb"} and len(calls) == 1
  np.testing.assert_array_equal(out["teacher_emb"], [[0, 1, 0], [1, 0, 0], [7, 7, 7]])
  emb, hit = cache.lookup(np.arange(6))
  assert list(hit) == [True, True, False, False, False, True]  # zero rows never written back
  np.testing.assert_array_equal(emb[:2], [[1, 0, 0], [0, 1, 0]])

  # every real image cached: no real_image, no teacher call
  cached = {"gen_image": gen, "real_id": np.array([0, 5, 1], np.int32)}
  out = teacher_cache.attach(cached, cache, embed)
  assert len(calls) == 1
  np.testing.assert_array_equal(out["teacher_emb"], [[1, 0, 0], [7, 7, 7], [0, 1, 0]])
  with pytest.raises(RuntimeError, match="skipped as cached is not in the cache"):
    teacher_cache.attach({"gen_image": gen, "real_id": np.array([0, 1, 3], np.int32)}, cache, embed)


def test_train_on_store_train_shards_with_augmentation(shared, tmp_path):
  from config_helpers import load_config

  from gmail_jax.training import train

  config = load_config("tiny")
  src, out = _coco_manifest(shared, tmp_path, n=7), tmp_path / "ar"
  prepare.prepare(src, str(out), store="train", image_size=config.data.image_size)
  config.total_steps, config.checkpoint_every_steps, config.log_every_steps = 2, 2, 1
  config.async_checkpoints = False
  config.batch_size = 8
  config.data.source, config.data.root = "array_record", str(out)
  config.data.augment_generated = True
  train.train_and_evaluate(config, str(tmp_path / "run"))
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  steps = {json.loads(x)["step"]: json.loads(x) for x in lines}
  assert 2 in steps and np.isfinite(steps[2]["train/loss"])
