"""Quickstart: the digits dataset, the teacher's contrastive loss, the probe/report maths, and the
whole `python -m gmail_jax.main --config=configs/quickstart.py:rendered,smoke` run (subprocess)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smoke_env() -> dict:
  """One CPU device (faster than the 8 simulated ones here); the session's compilation cache
  (conftest.py) is inherited."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(1)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def report_fields():
  from gmail_jax.experiments.report import STAGE_FIELDS

  return STAGE_FIELDS


def run_cli(config: str, workdir: pathlib.Path, *flags: str):
  cmd = [sys.executable, "-m", "gmail_jax.main", f"--config={config}", f"--workdir={workdir}"]
  return subprocess.run([*cmd, *flags], cwd=ROOT, env=smoke_env(), capture_output=True, text=True)


def run_main(config: str, workdir: pathlib.Path, *flags: str) -> dict:
  proc = run_cli(config, workdir, *flags)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads((workdir / "report.json").read_text())


def test_rendered_digits_are_deterministic_scan_like():
  from gmail_jax.data import digits

  a, ya = digits.generated_digits(2, seed=3)
  b, yb = digits.generated_digits(2, seed=3)
  c, _ = digits.generated_digits(2, seed=4)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ya, np.repeat(np.arange(10), 2))
  assert not np.array_equal(a, c)
  assert a.shape == (20, 8, 8) and a.dtype == np.uint8
  # Like the UCI scans: ink counts 0..16 of 4x4 blocks, scaled to 0..255.
  levels = np.unique(np.rint(a.astype(np.float64) * 16 / 255))
  assert set(levels) <= set(range(17))
  real, y = digits.real_digits()
  assert real.shape == (1797, 8, 8) and set(np.unique(y)) == set(range(10))
  assert digits.caption(7) == "a photo of the digit seven."


def test_split_is_stratified_and_disjoint():
  from gmail_jax.data import digits

  y = np.repeat(np.arange(10), 20)
  test = digits.split_indices(y, 0.3, seed=0)
  assert np.all(np.bincount(y[test]) == 6)
  np.testing.assert_array_equal(test, digits.split_indices(y, 0.3, seed=0))


def test_group_clip_loss_reduces_to_clip_loss_and_handles_shared_groups():
  import jax.numpy as jnp

  from gmail_jax.training.contrastive import group_clip_loss

  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
  scale = math.log(10.0)

  def ref(img, txt, targets):
    i = img / np.linalg.norm(img, axis=1, keepdims=True)
    t = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = 10.0 * i @ t.T

    def ce(s):
      logp = s - np.log(np.exp(s).sum(1, keepdims=True))
      return -(targets * logp).sum(1).mean()

    return 0.5 * (ce(s) + ce(s.T))

  distinct = group_clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale), jnp.arange(5))
  np.testing.assert_allclose(float(distinct), ref(img, txt, np.eye(5)), rtol=1e-5)
  g = np.array([0, 0, 1, 2, 2])
  t = (g[:, None] == g[None, :]).astype(float)
  t /= t.sum(1, keepdims=True)
  shared = group_clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale), jnp.asarray(g))
  np.testing.assert_allclose(float(shared), ref(img, txt, t), rtol=1e-5)


def test_aggregate_mean_and_sample_std():
  from gmail_jax.experiments import report

  agg = report.aggregate([{"after": {"x": 1.0}, "seed": 0}, {"after": {"x": 3.0}, "seed": 1}])
  assert agg["after"]["x"]["mean"] == 2.0
  assert agg["after"]["x"]["std"] == pytest.approx(math.sqrt(2.0))
  assert agg["seeds"] == [0, 1]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> pathlib.Path:
  """The workdir of the quickstart smoke run, trained once (locally)."""
  root = tmp_path_factory.mktemp("quickstart")
  run_main("configs/quickstart.py:rendered,smoke", root / "qs")
  return root / "qs"


@pytest.mark.slow
def test_quickstart_smoke_runs_main_and_alignment_raises_paired_cosine(quickstart, tmp_path):
  workdir = quickstart
  r = json.loads((workdir / "report.json").read_text())
  for stage in ("before", "after"):
    for key in report_fields():
      assert math.isfinite(r[stage][key]), (stage, key)
  for name in ("teacher_direct", "real_upper"):
    assert math.isfinite(r["baselines"][name]["transfer_accuracy"])
  assert r["after"]["paired_cosine"] > r["before"]["paired_cosine"] + 0.02
  assert r["after"]["raw_gap"] < r["before"]["raw_gap"]
  # The teacher learned something from its real scans (10 classes: chance = 0.1).
  assert r["teacher_zeroshot_real"] > 0.3
  files = ("report.md", "tsne.png", "curves.png", "metrics.jsonl", "teacher/model/config.json")
  for f in files:
    assert (workdir / f).exists(), f
  assert r["after"]["lora_targets"] and r["after"]["trainable_params"] > 0
  # Held-out images never reach the training view.
  train = {p.name for p in (workdir / "data" / "train" / "real").rglob("*.png")}
  test = {p.name for p in (workdir / "data" / "test" / "real").rglob("*.png")}
  assert train and test and not train & test
  # Aggregation CLI over runs.
  from gmail_jax import report

  out = tmp_path / "a.json"
  assert report.main(["--aggregate", str(workdir), str(workdir), "--out", str(out)]) == 0
  agg = json.loads(out.read_text())
  assert agg["after"]["paired_cosine"]["std"] == 0.0

  # Rerun: every stage's outputs are complete and match the config -> all skipped, same bytes.
  before = (workdir / "report.json").read_bytes()
  proc = run_cli("configs/quickstart.py:rendered,smoke", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("splits", "teacher", "align", "report"):
    assert f"stage {stage}: complete, skipped" in proc.stderr
  assert (workdir / "report.json").read_bytes() == before
  # A teacher that no longer matches its recorded config is refused, in one line.
  proc = run_cli(
    "configs/quickstart.py:rendered,smoke",
    workdir,
    "--config.teacher_pretrain.steps=7",
  )
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert "stage 'teacher' was run with other values of config.teacher_pretrain.steps" in last


@pytest.mark.slow
def test_report_stage_and_stage_records_in_a_bucket(quickstart, gcs_dir, tmp_path):
  """The quickstart run in a bucket (uploaded: training a gs:// workdir is the trainer's test):
  the report stage run there writes what it wrote locally, byte for byte; a rerun skips every
  stage; a changed teacher value is refused in one line; the aggregation reads the bucket."""
  from gmail_jax import report, storage

  workdir = quickstart
  # The run without its split images (thousands of small objects): the splits record keeps naming
  # the local folders, as a dataset outside the workdir; every other record names the bucket.
  for entry in workdir.iterdir():
    dst = f"{gcs_dir}/{entry.name}"
    if entry.is_dir() and entry.name not in ("data", "tb"):
      storage.upload_tree(entry, dst)
    elif entry.is_file():
      storage.write_bytes(dst, entry.read_bytes())
  bucket = storage.path(gcs_dir)
  for record in (bucket / "stages").iterdir():
    if record.name != "splits.json":
      storage.write_text(record, record.read_text().replace(str(workdir), gcs_dir))
  outputs = ("report.json", "report.md", "tsne.png", "curves.png")
  for name in ("stages/report.json", *outputs):
    (bucket / name).unlink()
  proc = run_cli("configs/quickstart.py:rendered,smoke", gcs_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("splits", "teacher", "align"):
    assert f"stage {stage}: complete, skipped" in proc.stderr
  assert "stage report: done" in proc.stderr
  for name in outputs:
    assert (bucket / name).read_bytes() == (workdir / name).read_bytes(), name
  assert storage.read_json(bucket / "stages" / "report.json")["outputs"] == {
    "report": f"{gcs_dir}/report.json"
  }
  # Rerun: every stage skipped, same bytes.
  before = (bucket / "report.json").read_bytes()
  proc = run_cli("configs/quickstart.py:rendered,smoke", gcs_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("splits", "teacher", "align", "report"):
    assert f"stage {stage}: complete, skipped" in proc.stderr
  assert (bucket / "report.json").read_bytes() == before
  # A teacher that no longer matches its recorded config is refused, in one line.
  proc = run_cli(
    "configs/quickstart.py:rendered,smoke",
    gcs_dir,
    "--config.teacher_pretrain.steps=7",
  )
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert "stage 'teacher' was run with other values of config.teacher_pretrain.steps" in last
  # Aggregation CLI over bucket runs, written to the bucket.
  out = f"{gcs_dir}/agg/a.json"
  assert report.main(["--aggregate", gcs_dir, str(workdir), "--out", out]) == 0
  agg = storage.read_json(out)
  assert agg["after"]["paired_cosine"]["std"] == 0.0
  assert (bucket / "agg" / "a.md").read_text().startswith("# GMAIL small-scale reproduction")
