"""`python -m gmail_jax.evaluate`: teacher + student of a tiny run -> eval/metrics.json + plots."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from configs import tiny
from gmail_jax import run as run_lib
from gmail_jax.experiments import evaluation as evaluate
from gmail_jax.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
N_PAIRS = 16


def _gen_real_manifest(root: pathlib.Path) -> str:
  """N_PAIRS random 32x32 real images and noisy 'generated' copies, as a gen_path/real_path CSV."""
  rng = np.random.default_rng(0)
  (root / "img").mkdir(parents=True)
  rows = []
  for i in range(N_PAIRS):
    real = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    gen = np.clip(real.astype(int) + rng.integers(-60, 61, real.shape), 0, 255).astype(np.uint8)
    PIL.Image.fromarray(real).save(root / "img" / f"r{i}.png")
    PIL.Image.fromarray(gen).save(root / "img" / f"g{i}.png")
    rows.append({"caption": f"im {i}", "real_path": f"img/r{i}.png", "gen_path": f"img/g{i}.png"})
  path = root / "pairs.csv"
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return str(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run(
    [sys.executable, "-m", "gmail_jax.evaluate", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  c = tiny.get_config()
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 2, 4
  c.async_checkpoints = False
  manifest = _gen_real_manifest(root)
  c.evals.pairs = dict(type="gap", pairs="gen_real", manifest=manifest, batch_size=8)
  workdir = root / "run"
  train.train_and_evaluate(c, str(workdir))
  return c, workdir


@pytest.fixture(scope="module")
def cli_metrics(run) -> dict:
  """DIR/eval/metrics.json as the CLI wrote it on the local run (config read from config.json)."""
  _, workdir = run
  res = _cli(f"--workdir={workdir}", "--tsne_points=12")
  assert res.returncode == 0, res.stderr[-2000:]
  return json.loads((workdir / "eval" / "metrics.json").read_text())


@pytest.mark.slow
def test_cli_writes_metrics_and_plots(run, cli_metrics):
  _, workdir = run
  out = cli_metrics
  assert out["step"] == 4
  assert set(out["encoders"]) == set(evaluate.ENCODERS)
  keys = {f"z/pairs/{k}" for k in ("raw", "centroid", "distribution", "frechet", "paired_cosine")}
  for name, metrics in out["encoders"].items():
    assert keys <= set(metrics), name
    m = {k: metrics[f"z/pairs/{k}"] for k in ("raw", "centroid", "distribution")}
    assert m["raw"] ** 2 == pytest.approx(m["centroid"] ** 2 + m["distribution"] ** 2, rel=1e-6)
  # 'student' differs from 'teacher' only in the generated images' tower (trained LoRA).
  assert out["encoders"]["student"] != out["encoders"]["teacher"]
  t, s = out["encoders"]["teacher"]["z/pairs/raw"], out["encoders"]["student"]["z/pairs/raw"]
  assert out["gap_reduction"]["student"]["pairs"]["raw"] == pytest.approx(100 * (1 - s / t))
  for png in ("tsne_gen_real.png", "training_curves.png"):
    p = workdir / "eval" / png
    assert p.stat().st_size > 1000 and str(p) in out["plots"]


@pytest.mark.slow
def test_in_process_matches_cli_and_restores_checkpoint(run):
  """The CLI (config read back from config.json, checkpoint restored in a fresh process) and an
  in-process call with the original config give the same numbers: compared with the bytes the
  CLI wrote, read before the in-process call rewrites the file."""
  c, workdir = run
  loaded = run_lib.load_run(str(workdir), config=c)
  assert loaded.step == 4
  res = _cli(f"--workdir={workdir}", "--encoders=teacher,student", "--noplots")
  assert res.returncode == 0, res.stderr[-2000:]
  cli = json.loads((workdir / "eval" / "metrics.json").read_bytes())
  out = evaluate.evaluate(c, str(workdir), which=("teacher", "student"), plots=False)
  assert set(cli["encoders"]) == {"teacher", "student"} and cli["step"] == out["step"] == 4
  for name in ("teacher", "student"):
    assert set(out["encoders"][name]) == set(cli["encoders"][name]), name
    for k, v in out["encoders"][name].items():
      assert v == pytest.approx(cli["encoders"][name][k], rel=1e-5, abs=1e-7), (name, k)


def test_cli_errors_are_one_line(tmp_path):
  res = _cli(f"--workdir={tmp_path}")
  assert res.returncode == 1
  assert "config.json: missing" in res.stderr.strip().splitlines()[-1]
  res = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}")
  assert res.returncode == 1
  assert "config.evals: empty" in res.stderr.strip().splitlines()[-1]


def _upload_run(workdir: pathlib.Path, dst: str) -> None:
  """The run's config, metrics and checkpoints (not eval/) copied to ``dst`` (a bucket)."""
  from gmail_jax import storage

  for name in ("checkpoints", "config.json", "metrics.jsonl"):
    if (workdir / name).is_dir():
      storage.upload_tree(workdir / name, f"{dst}/{name}")
    else:
      storage.write_bytes(f"{dst}/{name}", (workdir / name).read_bytes())


@pytest.mark.slow
def test_load_run_and_api_on_a_bucket_workdir(run, gcs_dir):
  """The run in a bucket: a run (config.json read there), and ``api.load_clip`` (``load_run``:
  Orbax restores from the bucket) gives the student it gives locally."""
  from gmail_jax import api

  c, workdir = run
  _upload_run(workdir, gcs_dir)
  assert run_lib.is_run(gcs_dir) and not run_lib.is_run(f"{gcs_dir}/checkpoints")
  assert run_lib.read_config(gcs_dir) == run_lib.read_config(str(workdir))
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
    api.load_clip(gcs_dir).encode_images(images), api.load_clip(str(workdir)).encode_images(images)
  )


@pytest.mark.slow
def test_cli_on_a_bucket_workdir_writes_there_what_it_writes_locally(run, cli_metrics, gcs_dir):
  from gmail_jax import storage

  _, workdir = run
  _upload_run(workdir, gcs_dir)
  res = _cli(f"--workdir={gcs_dir}", "--tsne_points=12")
  assert res.returncode == 0, res.stderr[-2000:]
  assert f"wrote {gcs_dir}/eval/metrics.json" in res.stdout
  out = storage.read_json(f"{gcs_dir}/eval/metrics.json")
  assert out["workdir"] == gcs_dir and out["step"] == cli_metrics["step"] == 4
  assert out["plots"] == [
    f"{gcs_dir}/eval/tsne_gen_real.png",
    f"{gcs_dir}/eval/training_curves.png",
  ]
  for p in out["plots"]:
    local = workdir / "eval" / storage.path(p).name
    assert storage.path(p).read_bytes() == local.read_bytes(), p
  assert out["encoders"] == cli_metrics["encoders"]
  assert out["gap_reduction"] == cli_metrics["gap_reduction"]
  # Nothing went to a local folder named after the URL (what os.path makes of gs://).
  assert not (REPO / "gs:").exists()
