"""data.prepare at pod scale: output shards split over processes (one after the other and at the
same time) give the bytes of a one-process run; a killed run resumes (into a local folder and into
a bucket); other flags are refused."""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile

import pytest
from data_helpers import assert_same_files as _assert_same
from data_helpers import jpeg as _jpeg
from data_helpers import jpeg_manifest

from gmail_jax import storage
from gmail_jax.data import prepare
from gmail_jax.data.rejects import BadInputError
from gmail_jax.data.sources import ArrayRecordSource
from gmail_jax.errors import ConfigError, InputError

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = dict(shard_size=3, resize_short=16, quality=80)  # 4 output shards: 3 + 3 + 3 + 1 rows
CLI_FLAGS = ["--shard_size=3", "--resize_short=16", "--quality=80"]
SHARDS = [f"pairs-{s:05d}-of-00004.array_record" for s in range(4)]


def _manifest(tmp_path: pathlib.Path, plan_reject: bool = True) -> str:
  return jpeg_manifest(tmp_path, plan_reject)


def _cli(src: str, out: str | os.PathLike, *flags: str, **env: str) -> subprocess.Popen:
  """``python -m gmail_jax.data.prepare`` in a fresh process (no JAX/SLURM process variables)."""
  base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "GMAIL_"))}
  return subprocess.Popen(
    [sys.executable, "-m", "gmail_jax.data.prepare", f"--src={src}", f"--out={out}", *flags],
    cwd=REPO,
    env={**base, **env},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_resolve_shard_rule():
  jax = {"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
  assert prepare.resolve_shard(environ={}) == (0, 1)
  assert prepare.resolve_shard(environ=slurm) == (5, 8)
  assert prepare.resolve_shard(environ={**slurm, **jax}) == (3, 4)  # JAX's first
  assert prepare.resolve_shard(2, 1, environ=jax) == (1, 2)  # the flags win
  with pytest.raises(ConfigError, match="give both or neither"):
    prepare.resolve_shard(2, None, environ={})
  with pytest.raises(ConfigError, match=r"--shard_index=2: must be in \[0, --num_shards=2\)"):
    prepare.resolve_shard(2, 2, environ={})


def test_two_processes_write_what_one_does(tmp_path):
  src = _manifest(tmp_path)
  one = prepare.prepare(src, str(tmp_path / "one"), **FLAGS)
  assert (one["num_records"], one["num_shards"], one["num_rejected"]) == (9, 4, 2)

  # one after the other: the first leaves the merge to the second
  seq = tmp_path / "seq"
  first = prepare.prepare(src, str(seq), num_shards=2, shard_index=0, num_workers=2, **FLAGS)
  assert first == {
    "complete": False,
    "shard_index": 0,
    "num_shards": 2,
    "shards_written": 2,
    "shards_skipped": 0,
    "shards_missing": 2,
  }
  assert not (seq / "index.npz").exists() and not (seq / "meta.json").exists()
  assert sorted(p.name for p in seq.glob("*.array_record")) == [SHARDS[0], SHARDS[2]]
  second = prepare.prepare(src, str(seq), num_shards=2, shard_index=1, **FLAGS)
  assert second.keys() == one.keys()
  _assert_same(tmp_path / "one", seq)

  # at the same time, as under srun (SLURM_NTASKS / SLURM_PROCID)
  both = tmp_path / "both"
  procs = [_cli(src, both, *CLI_FLAGS, SLURM_NTASKS="2", SLURM_PROCID=str(i)) for i in range(2)]
  for p in procs:
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
  _assert_same(tmp_path / "one", both)

  # training reads the shards, not the per-shard index / rejects files beside them
  ar = ArrayRecordSource(both, gens_per_caption=0)
  assert [os.path.basename(s) for s in ar.shards] == SHARDS
  assert [ar.get(i, 0).caption for i in range(len(ar))] == [
    f"pair {i}" for i in range(10) if i != 4
  ]


def _tar(path: pathlib.Path, members: dict[str, bytes]) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_two_processes_webdataset_numbering(tmp_path):
  """wds numbers real_id over all tars and groups by first appearance: the merge does it."""
  (tmp_path / "tars").mkdir()
  red = json.dumps({"group": "red"}).encode()
  pair = {"real.jpg": _jpeg((20, 12), (200, 0, 0)), "gen.jpg": _jpeg((20, 12), (190, 0, 0))}
  for t, keys in enumerate((["a", "b"], ["c"], ["d", "e", "f"])):
    members = {}
    for k in keys:
      members.update({f"{k}.{s}": b for s, b in pair.items()})
      members[f"{k}.txt"] = f"caption {k}".encode()
      if k in ("b", "e"):
        members[f"{k}.json"] = red  # one group across tars 0 and 2
    if t == 1:
      members["c.gen.jpg"] = b"corrupt"
    _tar(tmp_path / "tars" / f"{t:05d}.tar", members)
  src = str(tmp_path / "tars")
  one = prepare.prepare(src, str(tmp_path / "one"))
  assert (one["num_records"], one["num_rejected"]) == (5, 1)
  for i in (1, 0):  # the higher index first: the merge does not depend on who finishes last
    prepare.prepare(src, str(tmp_path / "two"), num_shards=2, shard_index=i)
  _assert_same(tmp_path / "one", tmp_path / "two")
  ar = ArrayRecordSource(tmp_path / "two", gens_per_caption=0)
  pairs = [ar.get(i, 0) for i in range(len(ar))]
  assert [p.real_id for p in pairs] == [0, 1, 3, 4, 5]  # c (2) rejected, its number kept
  assert [p.group for p in pairs] == [0, 1, 2, 1, 3]


def _version(path: str) -> tuple:
  """What changes when a file is rewritten: inode and mtime, or an object's generation."""
  if storage.is_remote(path):
    import fsspec

    fs, key = fsspec.core.url_to_fs(path)
    return (fs.info(key)["generation"],)
  st = os.stat(path)
  return st.st_ino, st.st_mtime_ns


def test_killed_run_resumes_and_other_flags_are_refused(tmp_path, any_dir, capsys):
  """Into a local folder or a bucket (each shard staged locally, then uploaded whole)."""
  src = _manifest(tmp_path)
  prepare.prepare(src, str(tmp_path / "ref"), **FLAGS)
  out = storage.path(any_dir)
  p = _cli(src, out, *CLI_FLAGS, GMAIL_KILL_AT="shard:2")
  _, stderr = p.communicate(timeout=60)
  assert p.returncode == -signal.SIGKILL, stderr
  done = [f"pairs-0000{s}-of-00004.{ext}" for s in (0, 1) for ext in ("array_record", "index.npz")]
  rejects = "pairs-00001-of-00004.rejects.jsonl"  # the corrupt image of row 4
  assert sorted(q.name for q in out.iterdir() if q.name.startswith("pairs-")) == sorted(
    [*done, rejects]
  )
  assert not (out / "meta.json").exists() and not (out / "index.npz").exists()
  # what a kill while writing would leave: a temp file (beside the shards, or in a bucket's local
  # staging folder), a shard (and rejects) without its index
  stage = prepare._OutDir(out).stage if storage.is_remote(out) else str(out)
  temp = pathlib.Path(stage, f"{SHARDS[2]}.tmp-otherhost-1")
  temp.parent.mkdir(exist_ok=True)
  temp.write_bytes(b"partial")
  storage.write_bytes(out / SHARDS[3], b"partial")
  storage.write_text(out / "pairs-00003-of-00004.rejects.jsonl", '{"path": "x", "reason": "s"}\n')
  storage.write_bytes(out / "pairs-00000-of-00007.array_record", b"an older run's")  # other plan
  versions = {n: _version(storage.join(out, n)) for n in done}

  meta = prepare.prepare(src, os.fspath(out), **FLAGS)
  assert meta["num_records"] == 9
  assert {n: _version(storage.join(out, n)) for n in done} == versions  # kept, not rewritten
  assert not temp.exists()
  _assert_same(tmp_path / "ref", out)

  # the plan is created once: a second create changes nothing
  plan = (out / "prepare.json").read_bytes()
  assert prepare._OutDir(out).create("prepare.json", b"{}") is False
  assert (out / "prepare.json").read_bytes() == plan

  # other flags, or other inputs, on the same --out: refused in one line, nothing touched
  flags = [f"--src={src}", f"--out={out}", *CLI_FLAGS]
  assert prepare.main([*flags, "--quality=85"]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "prepare.json was written with --quality=80, this run has --quality=85" in err
  rows = pathlib.Path(src).read_text().splitlines()
  pathlib.Path(src).write_text("\n".join(rows + rows[:1]) + "\n")
  changed = r"the inputs in --src=\S+ changed .*\(output shard 3: rows=1 then, rows=2 now\)"
  with pytest.raises(InputError, match=changed):
    prepare.prepare(src, os.fspath(out), **FLAGS)
  _assert_same(tmp_path / "ref", out)


def test_fail_policy_stops_at_the_first_reject(tmp_path):
  src = _manifest(tmp_path, plan_reject=False)
  with pytest.raises(BadInputError, match=r"g4\.jpg"):
    prepare.prepare(src, str(tmp_path / "out"), on_bad_input="fail", **FLAGS)
  out = tmp_path / "out"
  (reject,) = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
  assert reject["path"].endswith("g4.jpg") and reject["policy"] == "fail"
  assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
  assert SHARDS[1] not in {p.name for p in out.iterdir()}  # the shard that failed: not written
