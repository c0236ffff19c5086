"""gmail_jax/storage.py on a local folder and on a bucket (the local GCS emulator): the same
meaning on both — whole writes, create-only-if-absent, appends, staged and fetched folders."""

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

from gmail_jax import storage
from gmail_jax.errors import InputError


def test_whole_writes_and_reads(any_dir):
  d = storage.path(any_dir)
  storage.write_json(d / "a" / "record.json", {"x": 1})
  storage.write_bytes(d / "b.bin", b"\x00\x01", durable=True)
  assert storage.read_json(d / "a" / "record.json") == {"x": 1}
  assert (d / "b.bin").read_bytes() == b"\x00\x01"
  storage.write_text(d / "b.bin", "replaced")
  assert (d / "b.bin").read_text() == "replaced"
  assert sorted(p.name for p in d.iterdir()) == ["a", "b.bin"]  # no temp names left behind
  storage.rmtree(d)
  assert not d.exists()
  storage.rmtree(d)  # nothing there is fine


def test_create_exclusive_has_one_winner(any_dir):
  target = storage.path(any_dir) / "plan.json"
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    won = list(pool.map(lambda i: storage.create_exclusive(target, f"{i}".encode()), range(6)))
  assert won.count(True) == 1
  assert target.read_text() == str(won.index(True))
  assert not storage.create_exclusive(target, b"late")
  assert target.read_text() == str(won.index(True))


def test_append_text_keeps_every_line(any_dir):
  log = storage.path(any_dir) / "history.jsonl"
  for i in range(3):
    storage.append_text(log, json.dumps({"i": i}) + "\n")
  assert [json.loads(x)["i"] for x in log.read_text().splitlines()] == [0, 1, 2]


def test_append_shared_from_several_processes(any_dir):
  log = storage.join(any_dir, "rejects.jsonl")
  code = (
    "import sys; from gmail_jax import storage\n"
    "for i in range(5): storage.append_shared(sys.argv[1], f'{sys.argv[2]}-{i}')\n"
  )
  procs = [subprocess.Popen([sys.executable, "-c", code, log, str(w)]) for w in range(3)]
  assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
  storage.append_shared(log, "main-0")
  lines = storage.read_shared(log)
  assert sorted(lines) == sorted([f"{w}-{i}" for w in range(3) for i in range(5)] + ["main-0"])
  storage.remove_shared(log)
  assert storage.read_shared(log) == []


def test_staged_dir_uploads_only_a_finished_block(any_dir):
  out = storage.path(any_dir) / "export"
  with storage.staged_dir(out) as local:
    (local / "sub").mkdir()
    (local / "sub" / "w.bin").write_bytes(b"w")
  assert (out / "sub" / "w.bin").read_bytes() == b"w"
  if storage.is_remote(any_dir):  # a failed block uploads nothing
    failed = storage.path(any_dir) / "failed"
    with pytest.raises(RuntimeError), storage.staged_dir(failed) as local:
      (local / "x").write_bytes(b"x")
      raise RuntimeError("writer failed")
    assert not failed.exists()


def test_fetch_dir_copies_once_and_again_when_changed(any_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("GMAIL_JAX_CACHE", str(tmp_path / "cache"))
  src = storage.path(any_dir) / "model"
  storage.write_text(src / "config.json", "{}")
  storage.write_bytes(src / "weights" / "w.bin", b"1")
  local = storage.fetch_dir(src)
  assert (local / "weights" / "w.bin").read_bytes() == b"1"
  assert json.loads((local / "config.json").read_text()) == {}
  assert storage.fetch_dir(src) == local
  if storage.is_remote(any_dir):
    assert str(local).startswith(str(tmp_path / "cache"))
    storage.write_bytes(src / "weights" / "w.bin", b"22")
    again = storage.fetch_dir(src)
    assert again != local and (again / "weights" / "w.bin").read_bytes() == b"22"
  else:
    assert local == pathlib_of(src)


def pathlib_of(p):
  import pathlib

  return pathlib.Path(os.fspath(p))


def test_check_writable(any_dir, tmp_path):
  storage.check_writable(any_dir)
  d = storage.path(any_dir)
  assert not d.exists() or list(d.iterdir()) == []  # the probe is removed (a bucket: no folder)
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  with pytest.raises(InputError, match=r"^--workdir=.*a-file/run: cannot write there"):
    storage.check_writable(blocker / "run")


def test_check_writable_names_a_missing_bucket(gcs):
  with pytest.raises(InputError, match=r"^--workdir=gs://no-such-bucket/run: cannot write there"):
    storage.check_writable("gs://no-such-bucket/run")
