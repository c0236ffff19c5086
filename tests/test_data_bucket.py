"""Data in a bucket (the local GCS emulator): prepare writes gs:// shards equal to a local run's
(also from two processes at once, and from inputs in the bucket); training reads gs:// shards,
manifests, images and class folders as it reads local ones; a missing or unreadable shard or root
fails in one line naming it."""

import functools
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
from data_helpers import assert_same_files, data_config, eval_batches, jpeg, jpeg_manifest

from gmail_jax import storage
from gmail_jax.data import eval_sets, prepare
from gmail_jax.data.rejects import BadInputError
from gmail_jax.data.sources import ArrayRecordSource, ClassFolderSource, ManifestSource
from gmail_jax.errors import InputError

FLAGS = dict(shard_size=3, resize_short=16, quality=80)  # 4 output shards: 3 + 3 + 3 + 1 rows
make_config = functools.partial(data_config, seed=7, image_size=16)


def _cli(src: str, out: str, *more: str, **env: str) -> subprocess.Popen:
  """``python -m gmail_jax.data.prepare`` in a fresh process (inherits the emulator variables)."""
  base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "GMAIL_"))}
  flags = [f"--{k}={v}" for k, v in FLAGS.items()]
  return subprocess.Popen(
    [sys.executable, "-m", "gmail_jax.data.prepare", f"--src={src}", f"--out={out}", *flags, *more],
    env={**base, **env},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _same_batches(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b) > 0
  for x, y in zip(a, b, strict=True):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _records(source: ArrayRecordSource) -> list[tuple]:
  """What training reads of every record (not the names, which say where the inputs were)."""
  pairs = [source.get(i, 0) for i in range(len(source))]
  return [(p.caption, p.gen, p.real, p.group, p.real_id) for p in pairs]


@pytest.fixture
def shards(tmp_path, gcs_dir):
  """(local shards, the same shards in the bucket): 9 records in 4 shards."""
  src = jpeg_manifest(tmp_path)
  local = str(tmp_path / "local")
  prepare.prepare(src, local, **FLAGS)
  storage.upload_tree(local, storage.join(gcs_dir, "pairs"))
  return local, storage.join(gcs_dir, "pairs")


def test_prepare_into_a_bucket_equals_a_local_prepare(tmp_path, gcs_dir):
  src = jpeg_manifest(tmp_path)
  one = prepare.prepare(src, str(tmp_path / "local"), **FLAGS)
  assert (one["num_records"], one["num_shards"], one["num_rejected"]) == (9, 4, 2)
  # two processes at once, as under srun (one with 2 writer processes, each uploading its own
  # shards): the last to finish merges, in the bucket
  out = storage.join(gcs_dir, "pairs")
  workers = ["--num_workers=2"], []
  procs = [_cli(src, out, *workers[i], SLURM_NTASKS="2", SLURM_PROCID=str(i)) for i in range(2)]
  for p in procs:
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
  assert_same_files(tmp_path / "local", out)  # shards, indexes, rejects, prepare.json, meta.json
  local = ArrayRecordSource(tmp_path / "local", gens_per_caption=0)
  remote = ArrayRecordSource(out, gens_per_caption=0)
  assert remote.real_ids_fingerprint() == local.real_ids_fingerprint()
  assert _records(remote) == _records(local)
  assert not os.listdir(prepare._OutDir(out).stage)  # nothing left in the staging folder


def test_prepare_reads_its_inputs_from_a_bucket(tmp_path, gcs_dir):
  """A manifest naming bucket images, class folders and webdataset tars, all in the bucket."""
  for kind in ("manifest", "class_folders", "wds"):
    here, there = tmp_path / kind, storage.join(gcs_dir, kind)
    if kind == "manifest":
      local_src = jpeg_manifest(here / "src")
      remote_src = storage.join(there, "m.jsonl")
      rows = [json.loads(r) for r in (here / "src" / "m.jsonl").read_text().splitlines()]
      for r in rows:  # relative names: resolved against the manifest's bucket prefix
        for key in ("real_path", "gen_path"):
          if r[key].startswith(str(here)):
            r[key] = os.path.relpath(r[key], here / "src")
      storage.write_text(remote_src, "".join(json.dumps(r) + "\n" for r in rows))
      storage.upload_tree(here / "src" / "img", storage.join(there, "img"))
    elif kind == "class_folders":
      for split in ("real", "generated"):
        for c, cls in enumerate(("cat", "dog")):
          for i in range(3):
            data = jpeg((20 + i, 18), (80 * c, 40 * i, 10 if split == "real" else 90))
            storage.write_bytes(storage.join(here, "src", split, cls, f"{i}.jpg"), data)
      storage.upload_tree(here / "src", there)
      local_src, remote_src = str(here / "src"), there
    else:
      (here / "src").mkdir(parents=True)
      for t, keys in enumerate((["a", "b"], ["c"])):
        with tarfile.open(here / "src" / f"{t:05d}.tar", "w") as tar:
          for k in keys:
            members = {
              f"{k}.txt": f"caption {k}".encode(),
              f"{k}.real.jpg": jpeg((20, 12), (200, 0, 0)),
              f"{k}.gen.jpg": jpeg((20, 12), (190, 0, 0)),
            }
            for name, data in members.items():
              info = tarfile.TarInfo(name)
              info.size = len(data)
              tar.addfile(info, io.BytesIO(data))
      storage.upload_tree(here / "src", there)
      local_src, remote_src = str(here / "src"), there
    a = prepare.prepare(local_src, str(here / "out"), **FLAGS)
    b = prepare.prepare(remote_src, storage.join(there, "out"), **FLAGS)
    assert (b["kind"], b["num_records"]) == (kind, a["num_records"]) and a["num_records"] > 1
    local = ArrayRecordSource(here / "out", gens_per_caption=0)
    assert _records(ArrayRecordSource(storage.join(there, "out"), gens_per_caption=0)) == (
      _records(local)
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_pipeline_reads_bucket_shards_like_local_ones(shards, tmp_path, workers):
  local, remote = shards
  got = {}
  for name, root in (("local", local), ("gs", remote)):
    config = make_config(source="array_record", root=root, gens_per_caption=0, num_workers=workers)
    got[name] = eval_batches(config, tmp_path / f"wd-{name}", keep_index=True)
  _same_batches(got["local"], got["gs"])
  assert sum(len(b["real_id"]) for b in got["gs"]) == 9


@pytest.mark.parametrize("workers", [0, 1])
def test_manifest_and_images_in_a_bucket_feed_the_pipeline(tmp_path, gcs_dir, workers):
  import pyarrow as pa
  import pyarrow.parquet as pq

  local_manifest = jpeg_manifest(tmp_path / "local")
  jpeg_manifest(tmp_path / "remote", where=gcs_dir)  # the same images, in the bucket
  rows = [json.loads(r) for r in (tmp_path / "remote" / "m.jsonl").read_text().splitlines()]
  for r in rows:  # relative to the manifest's prefix; a URL stays as it is
    r["gen_path"] = r["gen_path"].removeprefix(gcs_dir + "/")
  with storage.path(storage.join(gcs_dir, "m.parquet")).open("wb") as f:
    pq.write_table(pa.Table.from_pylist(rows), f)
  remote_manifest = storage.join(gcs_dir, "m.parquet")
  assert ManifestSource(remote_manifest).row_fields(0)["gen_path"] == f"{gcs_dir}/img/g0.jpg"
  got = {}
  for name, manifest in (("local", local_manifest), ("gs", remote_manifest)):
    config = make_config(
      source="manifest", manifest=manifest, gens_per_caption=0, num_workers=workers
    )
    got[name] = eval_batches(config, tmp_path / f"wd-{name}", keep_index=True, keep_caption=True)
  _same_batches(got["local"], got["gs"])  # the corrupt g4.jpg rejected in both
  assert sum(len(b["real_id"]) for b in got["gs"]) == 9


def test_class_folders_in_a_bucket(tmp_path, gcs_dir):
  for c, cls in enumerate(("cat", "dog")):
    for split, n in (("real", 2), ("generated", 3)):
      for i in range(n):
        data = jpeg((20, 18), (80 * c, 40 * i, 10 if split == "real" else 90))
        storage.write_bytes(
          storage.join(tmp_path, "cf", split, cls, "sub" * (i == 2), f"{i}.jpg"), data
        )
  (tmp_path / "cf" / "real" / "notes.txt").write_text("not a class")
  storage.upload_tree(tmp_path / "cf", gcs_dir)
  a, b = ClassFolderSource(tmp_path / "cf", seed=1), ClassFolderSource(gcs_dir, seed=1)
  assert a.classes == b.classes == ["cat", "dog"]
  rel = lambda files, root: [os.path.relpath(f, root) for f in files]  # noqa: E731
  assert rel(a.gen_files, tmp_path / "cf") == [f.removeprefix(gcs_dir + "/") for f in b.gen_files]
  assert rel(a.real_files, tmp_path / "cf") == [f.removeprefix(gcs_dir + "/") for f in b.real_files]
  got = {}
  for name, root in (("local", str(tmp_path / "cf")), ("gs", gcs_dir)):
    config = make_config(source="class_folders", root=root)
    got[name] = eval_batches(config, tmp_path / f"wd-{name}", keep_index=True, keep_caption=True)
  _same_batches(got["local"], got["gs"])


def test_missing_or_unreadable_bucket_shards_fail_in_one_line(shards, gcs_dir):
  _, remote = shards

  def one_line(error, *, match: str) -> str:
    with pytest.raises(error, match=match) as e:
      ArrayRecordSource(remote_root, gens_per_caption=0)
    assert len(str(e.value).splitlines()) == 1
    return str(e.value)

  remote_root = storage.join(gcs_dir, "nothing-here")
  one_line(FileNotFoundError, match=f"no \\*.array_record shards in {remote_root} ")
  remote_root = remote
  missing = storage.join(remote, "pairs-00002-of-00004.array_record")
  data = storage.path(missing).read_bytes()
  storage.path(missing).unlink()
  one_line(
    FileNotFoundError, match=f"{missing} missing \\(1 of the 4 shards prepare wrote\\): rerun"
  )
  storage.write_bytes(missing, b"not an array_record file" * 8)  # what the reader cannot read
  msg = one_line(InputError, match=f"cannot read {missing} ")
  assert "Cloud Storage FUSE" in msg and "config.data.root=/gcs/BUCKET/" in msg
  storage.write_bytes(missing, data)
  storage.path(storage.join(remote, "index.npz")).unlink()
  one_line(FileNotFoundError, match=f"{remote}/index.npz missing")
  remote_root = "s3://some-bucket/pairs"  # a store array_record cannot read: said before listing
  one_line(
    InputError, match="array_record reads local files and gs:// only: .* mount the store with FUSE"
  )
  with pytest.raises(FileNotFoundError, match=f"manifest not found: {gcs_dir}/m.parquet"):
    ManifestSource(f"{gcs_dir}/m.parquet")


def test_a_reader_that_cannot_reach_the_bucket_fails_in_one_line(shards, monkeypatch):
  """array_record's own client pointed at a closed port (as a VM without credentials or a route
  to GCS): it would retry for minutes; the source gives up after OPEN_TIMEOUT_S, in one line."""
  from gmail_jax.data import sources

  _, remote = shards
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", closed)  # listing (gcsfs) still works
  monkeypatch.setattr(sources, "OPEN_TIMEOUT_S", 1)
  start = time.monotonic()
  with pytest.raises(
    InputError, match="pairs-00000-of-00004.array_record \\(no answer in 1 s\\)"
  ) as e:
    ArrayRecordSource(remote, gens_per_caption=0)
  assert time.monotonic() - start < 30
  assert len(str(e.value).splitlines()) == 1 and "/gcs/BUCKET" in str(e.value)


def test_fail_policy_into_a_bucket(tmp_path, gcs_dir):
  src = jpeg_manifest(tmp_path, plan_reject=False)
  with pytest.raises(BadInputError, match=r"g4\.jpg"):
    prepare.prepare(src, gcs_dir, on_bad_input="fail", **FLAGS)
  (reject,) = [
    json.loads(x)
    for x in storage.path(storage.join(gcs_dir, "rejects.jsonl")).read_text().splitlines()
  ]
  assert reject["path"].endswith("g4.jpg") and reject["policy"] == "fail"
  names = {p.name for p in storage.path(gcs_dir).iterdir()}
  assert "pairs-00001-of-00004.array_record" not in names  # the shard that failed: not written
  assert not os.listdir(prepare._OutDir(gcs_dir).stage)


def test_eval_sets_in_a_bucket(tmp_path, gcs_dir):
  """COCO captions + images, class folders and a class zip: read from the bucket as locally."""
  src = tmp_path / "sets"
  images, anns = [], []
  for i in range(4):
    storage.write_bytes(src / "images" / f"{i}.jpg", jpeg((24 + i, 20), (50 * i, 30, 90)))
    images.append({"id": 10 + i, "file_name": f"{i}.jpg"})
    anns += [
      {"id": 2 * i + k, "image_id": 10 + i, "caption": f"image {i}  caption {k}"} for k in (0, 1)
    ]
  images.append({"id": 99, "file_name": "absent.jpg"})  # not in images/: left out
  storage.write_text(src / "captions.json", json.dumps({"images": images, "annotations": anns}))
  for c, cls in enumerate(("cat", "dog")):
    for i in range(2):
      storage.write_bytes(src / "classes" / cls / f"{i}.png", jpeg((16, 16), (100 * c, 60 * i, 0)))
  with zipfile.ZipFile(src / "classes.zip", "w") as zf:
    for f in sorted((src / "classes").rglob("*.png")):
      zf.write(f, f"test/{f.parent.name}/{f.name}")
  storage.upload_tree(src, gcs_dir)
  here, there = str(src), gcs_dir
  a = eval_sets.load_coco_captions(f"{here}/captions.json", f"{here}/images", image_size=16)
  b = eval_sets.load_coco_captions(f"{there}/captions.json", f"{there}/images", image_size=16)
  assert (a.captions, a.text_to_image.tolist()) == (b.captions, b.text_to_image.tolist())
  assert len(b.paths) == 4 and b.paths[0] == f"{gcs_dir}/images/0.jpg"
  np.testing.assert_array_equal(np.stack(a.images), np.stack(b.images))
  for name in ("classes", "classes.zip"):
    a = eval_sets.load_class_set(f"{here}/{name}", image_size=16)
    b = eval_sets.load_class_set(f"{there}/{name}", image_size=16)
    assert (a.classnames, a.labels.tolist()) == (b.classnames, b.labels.tolist())
    assert b.classnames == ["cat", "dog"] and b.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(np.stack(a.images), np.stack(b.images))
  with pytest.raises(InputError, match=f"cannot read {gcs_dir}/nope.jpg: missing file"):
    eval_sets.load_images([f"{gcs_dir}/nope.jpg"])
