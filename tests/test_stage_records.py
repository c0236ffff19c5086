"""The driver's stage records, on a local folder and in a bucket (the GCS emulator), unchanged:
a finished stage is skipped, a stage whose outputs are gone runs again, a changed value of a
'refuse' stage is refused in one line and a 'rerun' stage runs again; a workdir that cannot be
written stops the run in one line naming --workdir before any stage runs."""

import os
import pathlib
import subprocess
import sys
import types

import pytest
from config_helpers import load_config

from gmail_jax import storage
from gmail_jax.errors import InputError, StageError
from gmail_jax.experiments import driver

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _stage(name: str, keys: tuple[str, ...], on_change: str, calls: list) -> types.ModuleType:
  """A stage (driver protocol) that writes WORKDIR/<name>/out.txt through storage."""
  mod = types.ModuleType(f"fake_stage_{name}")
  mod.KEYS, mod.ON_CHANGE, mod.ALL_PROCESSES = keys, on_change, False

  def run(config, workdir, inputs):
    calls.append(name)
    out = workdir / name / "out.txt"
    storage.write_text(out, f"{name}: seed {config.seed}, inputs {sorted(inputs)}")
    return {f"{name}_out": str(out)}

  mod.run = run
  mod.complete = lambda workdir, outputs: storage.path(outputs[f"{name}_out"]).is_file()
  return mod


@pytest.fixture
def calls(monkeypatch) -> list:
  """Registers stages 'first' (KEYS seed, refuse) and 'second' (KEYS total_steps, rerun); returns
  the names of the stages run, in order."""
  ran: list[str] = []
  for name, keys, on_change in (
    ("first", ("seed",), "refuse"),
    ("second", ("total_steps",), "rerun"),
  ):
    mod = _stage(name, keys, on_change, ran)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(driver.STAGES, name, mod.__name__)
  return ran


def _config():
  c = load_config("tiny")
  c.stages = ("first", "second")
  return c


def _record(workdir: str, name: str) -> bytes:
  return (storage.path(workdir) / driver.RECORDS / f"{name}.json").read_bytes()


def test_a_finished_stage_is_skipped_and_one_whose_outputs_are_gone_reruns(any_dir, calls):
  out = driver.run(_config(), any_dir)
  assert calls == ["first", "second"]
  assert out["second_out"] == storage.join(any_dir, "second", "out.txt")
  record = storage.read_json(storage.path(any_dir) / driver.RECORDS / "first.json")
  assert record == {"config": {"seed": 0}, "outputs": {"first_out": out["first_out"]}}
  before = {n: _record(any_dir, n) for n in ("first", "second")}
  assert driver.run(_config(), any_dir) == out  # complete and matching: skipped
  assert calls == ["first", "second"]
  assert {n: _record(any_dir, n) for n in before} == before
  storage.path(out["second_out"]).unlink()  # its outputs are gone: it runs again, alone
  assert driver.run(_config(), any_dir) == out
  assert calls == ["first", "second", "second"]
  assert storage.path(out["second_out"]).read_text() == "second: seed 0, inputs ['first_out']"


def test_a_changed_value_is_refused_in_one_line_or_rerun(any_dir, calls):
  driver.run(_config(), any_dir)
  before = {n: _record(any_dir, n) for n in ("first", "second")}
  c = _config()
  c.seed = 1
  with pytest.raises(StageError) as e:
    driver.run(c, any_dir)
  msg = str(e.value)
  assert "stage 'first' was run with other values of config.seed" in msg, msg
  assert "use a new --workdir" in msg and "\n" not in msg
  assert calls == ["first", "second"]  # nothing ran, nothing rewritten
  assert {n: _record(any_dir, n) for n in before} == before
  c = _config()
  c.total_steps += 1  # 'second' reruns on a change
  driver.run(c, any_dir)
  assert calls == ["first", "second", "second"]
  record = storage.read_json(storage.path(any_dir) / driver.RECORDS / "second.json")
  assert record["config"] == {"total_steps": c.total_steps}


@pytest.mark.parametrize("where", ["local", "gs"])
def test_an_unwritable_workdir_stops_in_one_line_before_any_stage(where, calls, tmp_path, request):
  if where == "local":
    (tmp_path / "file").write_text("a file, not a folder")
    workdir = str(tmp_path / "file" / "run")
  else:
    request.getfixturevalue("gcs")
    workdir = "gs://no-such-bucket/run"
  with pytest.raises(InputError) as e:
    driver.run(_config(), workdir)
  msg = str(e.value)
  assert msg.startswith(f"--workdir={workdir}: cannot write there") and "\n" not in msg, msg
  assert calls == []


def test_main_refuses_an_unwritable_workdir_in_one_line(tmp_path):
  (tmp_path / "file").write_text("a file, not a folder")
  env = {k: v for k, v in os.environ.items() if k != "GMAIL_TRACEBACK"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  workdir = tmp_path / "file" / "run"
  cmd = [sys.executable, "-m", "gmail_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}"]
  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 1, res.stderr[-3000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: InputError: --workdir={workdir}: cannot write there"), last
  assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == [last]
  assert "Traceback" not in res.stderr
  # Before any stage: the align stage (configs/tiny.py) never started training.
  assert "stage align" not in res.stderr and "Compiling" not in res.stderr


def test_splits_stage_in_a_bucket_writes_the_local_views(gcs_dir, tmp_path):
  """The 'splits' stage with a gs:// WORKDIR on class folders: the views are uploaded as files
  (links followed), byte-equal to a local run's; the outputs name the bucket; a rerun skips."""
  import numpy as np
  import PIL.Image

  source = tmp_path / "source"
  rng = np.random.default_rng(0)
  for kind in ("real", "generated"):
    for c in ("cat", "dog", "fox"):
      (source / kind / c).mkdir(parents=True)
      for i in range(5):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(source / kind / c / f"{i}.png")
  c = load_config("quickstart", "rendered,smoke")
  c.stages = ("splits",)
  c.splits.kind = "class_folders"
  c.splits.test_per_class, c.splits.train_per_class = 2, 0
  c.data.root = str(source)
  local = driver.run(c, tmp_path / "local")
  remote = driver.run(c, gcs_dir)
  assert remote == {s: storage.join(gcs_dir, "data", s) for s in ("train", "test")}
  for split in ("train", "test"):
    root = pathlib.Path(local[split])
    want = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    assert len(want) == 3 * (2 if split == "test" else 3) * 2
    fs, key = storage.filesystem(remote[split])
    got = {name[len(key) + 1 :]: name for name in fs.find(key)}
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for rel, local_file in want.items():
      assert fs.cat_file(got[rel]) == local_file.read_bytes(), rel
  assert driver.run(c, gcs_dir) == remote  # complete and matching: skipped
