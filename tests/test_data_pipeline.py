"""Grain pipeline: exactly-once delivery across simulated processes, resume through Orbax, pairing,
augmentation, global batches."""

import functools
import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest
from data_helpers import coco_captions, data_config, link_cifake

from gmail_jax.data import pipeline
from gmail_jax.data.preprocess import resize_center_crop
from gmail_jax.data.sources import ClassFolderSource, ManifestSource
from gmail_jax.models import towers

CLASSES = ("airplane", "cat", "ship")


class ByteTokenizer:
  """Picklable stand-in for the CLIP tokenizer: caption bytes, zero padded to 77."""

  def __call__(self, texts):
    out = np.zeros((len(texts), 77), np.int32)
    for i, t in enumerate(texts):
      b = list(t.encode()[:77])
      out[i, : len(b)] = b
    return out


make_config = functools.partial(data_config, seed=3, image_size=32)


@pytest.fixture
def cifake_subset(shared, tmp_path):
  """3 classes x (8 generated, 4 real) symlinked from the CIFAKE sample (fast; same layout)."""
  return link_cifake(shared, tmp_path / "cifake", CLASSES, {"generated": 8, "real": 4})


def coco_manifest(shared, tmp_path, n_images=12, captions_per_image=2):
  """Manifest over coco-mini train2017: rows = (caption, image i, generated := image i+1)."""
  coco, images, caps = coco_captions(shared, "train2017", n_images)
  rows = []
  for i, im in enumerate(images):
    gen = images[(i + 1) % len(images)]
    for cap in caps[im["id"]][:captions_per_image]:
      rows.append(
        {
          "caption": cap,
          "real_path": str(coco / "train2017" / im["file_name"]),
          "gen_path": str(coco / "train2017" / gen["file_name"]),
        }
      )
  path = tmp_path / "coco.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path, rows


def take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("count", [1, 2, 4])
def test_class_folders_every_pair_once_per_epoch(cifake_subset, tmp_path, count):
  config = make_config(source="class_folders", root=str(cifake_subset))
  n = 24  # generated images = pairs per epoch
  per_process_batches = n // (count * 2)
  seen = {0: [], 1: []}
  for p in range(count):
    it = pipeline.make_train_iterator(
      config,
      tokenizer=ByteTokenizer(),
      workdir=tmp_path / "wd",
      process_index=p,
      process_count=count,
      batch_size=2,
      keep_index=True,
    )
    for b in take(it, 2 * per_process_batches):  # two epochs
      assert set(b) == {*pipeline.BATCH_KEYS, "slot", "epoch"}
      for e, s in zip(b["epoch"], b["slot"], strict=True):
        seen[int(e)].append(int(s))
    it.close()
  for e in (0, 1):
    assert sorted(seen[e]) == list(range(n)), f"epoch {e}: not every pair exactly once"


def test_class_folder_pairs_content(cifake_subset, tmp_path):
  config = make_config(source="class_folders", root=str(cifake_subset))
  source = ClassFolderSource(cifake_subset, seed=config.seed)
  it = pipeline.make_eval_iterator(
    config, tokenizer=ByteTokenizer(), workdir=tmp_path, batch_size=5, keep_index=True
  )
  batches = list(it)
  assert [len(b["slot"]) for b in batches] == [5, 5, 5, 5, 4]
  for b in batches:
    for k, slot in enumerate(b["slot"]):
      gen_path, real_path, c, real_id = source.pair_paths(int(slot), 0)
      assert b["group"][k] == c and b["real_id"][k] == real_id
      np.testing.assert_array_equal(
        b["gen_image"][k], resize_center_crop(PIL.Image.open(gen_path), 32)
      )
      np.testing.assert_array_equal(
        b["real_image"][k], resize_center_crop(PIL.Image.open(real_path), 32)
      )
      assert os.path.basename(os.path.dirname(real_path)) == CLASSES[c]
      caption = bytes(b["text"][k][b["text"][k] > 0].astype(np.uint8)).decode()
      assert caption == f"a photo of a {CLASSES[c]}."
  # the same-class real image is redrawn each epoch, reproducibly
  draws = [source.pair_paths(0, e)[3] for e in range(8)]
  assert len(set(draws)) > 1
  assert draws == [
    ClassFolderSource(cifake_subset, seed=config.seed).pair_paths(0, e)[3] for e in range(8)
  ]


@pytest.mark.parametrize("count", [1, 2, 4])
def test_coco_manifest_every_row_once(shared, tmp_path, count):
  from gmail_jax.models.tokenizer import Tokenizer

  manifest, rows = coco_manifest(shared, tmp_path)
  config = make_config(source="manifest", manifest=str(manifest))
  tok = Tokenizer()
  delivered = []
  for p in range(count):
    for b in pipeline.make_eval_iterator(
      config,
      tokenizer=tok,
      workdir=tmp_path / "wd",
      shuffle=True,
      process_index=p,
      process_count=count,
      batch_size=3,
      keep_caption=True,
    ):
      assert b["gen_image"].dtype == np.uint8 and b["gen_image"].shape[1:] == (32, 32, 3)
      assert b["text"].dtype == np.int32 and b["text"].shape[1] == 77
      np.testing.assert_array_equal(b["text"], tok(list(b["caption"])))
      delivered += [(int(r), str(c)) for r, c in zip(b["real_id"], b["caption"], strict=True)]
  reals = list(dict.fromkeys(r["real_path"] for r in rows))
  expected = sorted((reals.index(r["real_path"]), r["caption"]) for r in rows)
  assert sorted(delivered) == expected  # union = all rows, no duplicates
  assert not (tmp_path / "wd" / "rejects.jsonl").exists()


def test_gens_per_caption_rotates_generated_images(tmp_path):
  for i in range(6):
    PIL.Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"g{i}.png")
  PIL.Image.new("RGB", (8, 8)).save(tmp_path / "r.png")
  rows = ["caption,real_path,gen_path"]
  rows += [f"cap A,r.png,g{i}.png" for i in range(3)] + [f"cap B,r.png,g{i}.png" for i in (3, 4, 5)]
  (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
  for k, slots in ((1, 2), (2, 4), (0, 6)):
    src = ManifestSource(tmp_path / "m.csv", gens_per_caption=k)
    assert len(src) == slots
    used = [src.index.row(s, e) for e in range(3 if k == 1 else 1) for s in range(len(src))]
    if k == 1:  # three epochs cycle through all three generated images of each caption
      assert sorted(used) == list(range(6))
    assert len(set(src.group)) == 1 and len(set(src.real_id)) == 1  # same real image: one group
    assert len(set(src.item)) == 2


def test_resume_through_orbax(cifake_subset, tmp_path):
  config = make_config(source="class_folders", root=str(cifake_subset), augment_generated=True)

  def new_iter():
    return pipeline.make_train_iterator(config, tokenizer=ByteTokenizer(), workdir=tmp_path / "wd")

  reference = new_iter()
  expected = take(reference, 10)  # crosses the epoch boundary (24 pairs = 6 batches)
  reference.close()

  it = new_iter()
  take(it, 4)
  mgr = ocp.CheckpointManager(tmp_path / "ckpt")
  mgr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  take(it, 3)  # progress after the save must not leak into the restore
  it.close()

  restored = new_iter()
  mgr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  mgr.close()
  for want, got in zip(expected[4:], take(restored, 6), strict=True):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)
  restored.close()


def test_workers_match_and_resume(tmp_path):
  """num_workers=2 (grain worker processes): get_state/set_state resumes exactly."""
  config = make_config(
    source="synthetic", synthetic_size=40, synthetic_image_size=16, num_workers=2
  )

  def new_iter():
    return pipeline.make_train_iterator(
      config, tokenizer=ByteTokenizer(), workdir=tmp_path, keep_index=True
    )

  it = new_iter()
  first = take(it, 3)
  state = it.get_state()
  rest = take(it, 12)
  it.close()
  slots = np.concatenate([b["slot"] for b in first + rest])
  epochs = np.concatenate([b["epoch"] for b in first + rest])
  assert sorted(slots[epochs == 0]) == list(range(40))  # one epoch, exactly once
  again = new_iter()
  again.set_state(state)
  for want, got in zip(rest[:4], take(again, 4), strict=True):
    np.testing.assert_array_equal(want["gen_image"], got["gen_image"])
    np.testing.assert_array_equal(want["slot"], got["slot"])
  again.close()


def test_augmentation_generated_only_and_deterministic(cifake_subset, tmp_path):
  plain = make_config(source="class_folders", root=str(cifake_subset))
  aug = make_config(source="class_folders", root=str(cifake_subset), augment_generated=True)

  def first(config):
    it = pipeline.make_train_iterator(config, tokenizer=ByteTokenizer(), workdir=tmp_path)
    b = take(it, 2)
    it.close()
    return b

  p, a, a2 = first(plain), first(aug), first(aug)
  for bp, ba, ba2 in zip(p, a, a2, strict=True):
    np.testing.assert_array_equal(bp["real_image"], ba["real_image"])
    assert not np.array_equal(bp["gen_image"], ba["gen_image"])
    np.testing.assert_array_equal(ba["gen_image"], ba2["gen_image"])


@pytest.mark.parametrize("axes", [{"data": 4, "fsdp": 2}, {"data": 8}, {"fsdp": 2, "model": 4}])
def test_global_batch_shards_over_data_axes(axes):
  names, sizes = tuple(axes), tuple(axes.values())
  mesh = jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
  local = {
    "gen_image": np.arange(8 * 4 * 4 * 3, dtype=np.uint8).reshape(8, 4, 4, 3),
    "text": np.arange(8 * 77, dtype=np.int32).reshape(8, 77),
    "group": np.arange(8, dtype=np.int32),
    "caption": np.asarray(["x"] * 8),
  }
  out = pipeline.global_batch(local, mesh)
  assert set(out) == {"gen_image", "text", "group"}
  batch_axes = tuple(a for a in ("data", "fsdp") if a in names)
  n_shards = int(np.prod([axes[a] for a in batch_axes]))
  for key, arr in out.items():
    np.testing.assert_array_equal(np.asarray(arr), local[key])
    assert arr.sharding.spec[0] in (batch_axes, batch_axes[0])
    assert len({str(s.index) for s in arr.addressable_shards}) == n_shards


def test_config_errors():
  with pytest.raises(ValueError, match="config.data.manifest"):
    pipeline.make_dataset(make_config(source="manifest"), tokenizer=None, workdir=None)
  with pytest.raises(ValueError, match="on_bad_input"):
    pipeline.make_dataset(
      make_config(source="synthetic", on_bad_input="ignore"), tokenizer=None, workdir=None
    )
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_dataset(
      make_config(source="synthetic"),
      tokenizer=None,
      workdir=None,
      process_index=0,
      process_count=3,
    )


def test_seeds_do_not_share_a_batch_sequence():
  """The shuffle key is hash(seed, epoch): seed 1 is not seed 0 shifted by an epoch."""
  n = 40

  def order(seed: int, epoch: int) -> list[int]:
    idx = pipeline.GlobalOrder(n, seed=seed, shuffle=True)
    return [idx[g][2] for g in range(epoch * n, (epoch + 1) * n)]

  for epoch in range(3):
    a, b = order(0, epoch), order(1, epoch)
    assert sorted(a) == sorted(b) == list(range(n))  # each a permutation: exactly once
    assert a != b, f"epoch {epoch}: seeds 0 and 1 give the same order"
  assert order(1, 0) != order(0, 1)
  assert order(0, 2) == order(0, 2)  # deterministic


def test_siglip_run_squashes_images(shared, tmp_path):
  """config.model.name=siglip: real and generated images are squashed to SxS (no crop), like HF's
  SiglipImageProcessor; the default (CLIP) keeps the short-side resize + centre crop."""
  from gmail_jax.data.preprocess import resize_squash

  manifest, rows = coco_manifest(shared, tmp_path, n_images=4, captions_per_image=1)
  by_caption = {r["caption"]: r for r in rows}
  for name, resize in (("siglip", resize_squash), ("clip", resize_center_crop)):
    config = make_config(source="manifest", manifest=str(manifest))
    config.model = {"name": name}
    for b in pipeline.make_eval_iterator(
      config, tokenizer=None, workdir=tmp_path / name, shuffle=False, batch_size=2,
      keep_caption=True, resize=towers.resize_mode(config),
    ):  # fmt: skip
      for k, caption in enumerate(b["caption"]):
        row = by_caption[str(caption)]
        for key, path in (("real_image", row["real_path"]), ("gen_image", row["gen_path"])):
          with PIL.Image.open(path) as im:
            assert im.size[0] != im.size[1]
            np.testing.assert_array_equal(b[key][k], resize(im, 32))
