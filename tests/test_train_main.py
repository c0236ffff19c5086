"""End to end via ``python -m gmail_jax.main``: resume after SIGKILL, multi-process, NaN stop.

The crash-safety tests run twice, in a local workdir and in a ``gs://`` one (the GCS emulator of
tests/conftest.py), and compare bitwise with the same local reference."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest
from config_helpers import load_config
from conftest import built_once, xla_flags

from gmail_jax import faults, objectives, storage
from gmail_jax.objectives.gmail import GMAIL
from gmail_jax.training import checkpointing, train
from gmail_jax.training import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
FLAGS = [
  "--config=configs/tiny.py",
  f"--config.total_steps={STEPS}",
  "--config.checkpoint_every_steps=2",
  "--config.log_every_steps=1",
  "--config.model.variant=mu",
  "--config.data.image_size=16",
  "--config.data.synthetic_image_size=16",
]


def env(devices: int, kill_at=None, term_at=None, pause_s: float | None = None) -> dict:
  drop = (faults.KILL_AT, faults.TERM_AT, faults.PAUSE)
  e = {k: v for k, v in os.environ.items() if k not in drop}
  e.update(
    XLA_FLAGS=xla_flags(devices),
    JAX_PLATFORMS="cpu",
    GMAIL_TRACEBACK="1",
  )
  if kill_at:
    e[faults.KILL_AT] = kill_at
  if term_at:
    e[faults.TERM_AT] = term_at
  if pause_s:
    e[faults.PAUSE] = str(pause_s)
  return e


def start(workdir, devices=8, extra=(), kill_at=None, term_at=None, pause_s=None):
  cmd = [sys.executable, "-m", "gmail_jax.main", *FLAGS, f"--workdir={workdir}", *extra]
  return subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=env(devices, kill_at, term_at, pause_s),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def final_params(workdir, like=None) -> list[np.ndarray]:
  """Final trainable params as numpy; ``like`` (a restored tree) for another device topology."""
  mgr = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir))
  assert mgr.latest_step() == STEPS
  args = ocp.args.StandardRestore(like)
  r = mgr.restore(STEPS, args=ocp.args.Composite(state=args))
  mgr.close()
  return r["state"]


def leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree["params"])]


def rows(workdir) -> list[dict]:
  """metrics.jsonl of a local or bucket workdir."""
  text = (storage.path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines()]


def losses(workdir, key: str = "train/loss") -> dict[int, float]:
  return {r["step"]: r[key] for r in rows(workdir)}


@pytest.fixture(params=["local", pytest.param("gs", marks=pytest.mark.slow)])
def any_dir(request, tmp_path) -> str:
  """A fresh workdir, local and in a bucket (the emulator; slow: ~45 s per test on 2 cores)."""
  return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("gcs_dir")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return built_once(tmp_path_factory, "train_reference", lambda workdir: finish(start(workdir)))


# Crash points in the order one run meets them over its reruns, with the checkpoints that may be
# the latest then.
KILLS = (
  ("async_save:4", (2, 4)),  # during the async write of checkpoint 4
  ("step:5", (2, 4)),  # mid-run: step 5 computed, nothing logged; checkpoint 4 maybe in flight
  ("checkpoint:6", (6,)),  # right after checkpoint 6 committed
)


@pytest.mark.slow
def test_sigkill_at_every_crash_point_then_rerun_is_bitwise_equal(reference, any_dir):
  """The run SIGKILLs itself at a named point (gmail_jax/faults.py), so a failure replays; each
  rerun resumes from the last checkpoint committed and is killed at the next point; the run that
  finishes equals the uninterrupted one bit for bit, with one metrics row per step."""
  workdir = any_dir
  latest = None
  for kill_at, committed in KILLS:
    proc = start(workdir, kill_at=kill_at)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (kill_at, out[-3000:])
    if latest is not None:
      assert f"resumed from step {latest}" in out, kill_at
    latest = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir)).latest_step()
    assert latest in committed, (kill_at, latest)
  out = finish(start(workdir))
  assert f"resumed from step {latest}" in out
  # metrics.jsonl: one row per step; the killed attempts' rows after their checkpoint are dropped.
  steps = [r["step"] for r in rows(workdir)]
  assert steps == list(range(1, STEPS + 1)), steps
  for a, b in zip(leaves(final_params(reference)), leaves(final_params(workdir)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert storage.read_json(storage.path(workdir) / "config.json")["lora"]["rank"] == 4
  assert not (ROOT / "gs:").exists()  # a bucket workdir never lands in a local folder "gs:"


def test_metric_rows_in_a_bucket_are_stored_whole_at_each_sync(gcs_dir):
  """A bucket has no append: rows stay in memory until ``sync`` (the loop calls it before each
  checkpoint save) rewrites metrics.jsonl whole; a resume drops the rows after its step."""
  w = metrics_lib.MetricWriter(gcs_dir, total_steps=4)
  for step in (1, 2):
    w.write(step, {"train/loss": float(step)}, console=False)
  w.sync()  # checkpoint 2 is saved after this
  w.write(3, {"train/loss": 3.0}, console=False)  # then killed: row 3 is lost with step 3
  assert [r["step"] for r in rows(gcs_dir)] == [1, 2]
  assert [p.name for p in (storage.path(gcs_dir) / "tb").iterdir()][0].startswith("events.")
  w = metrics_lib.MetricWriter(gcs_dir, total_steps=4, first_step=1)  # resumed from step 1
  assert [r["step"] for r in rows(gcs_dir)] == [1]
  w.write(2, {"train/loss": 2.5}, console=False)
  w.close()
  assert [(r["step"], r["train/loss"]) for r in rows(gcs_dir)] == [(1, 1.0), (2, 2.5)]


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_resumes_bitwise(reference, any_dir):
  """A preemption notice (SIGTERM at step 5, between checkpoints 4 and 6): the run saves step 5,
  exits 0 saying where to resume, and the rerun continues from step 5 with no step lost."""
  workdir = any_dir
  out = finish(start(workdir, term_at="step:5"))  # exit code 0
  assert "preempted: checkpoint of step 5 saved" in out, out[-3000:]
  assert ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir)).latest_step() == 5
  assert [r["step"] for r in rows(workdir)][-1] == 5
  out = finish(start(workdir))
  assert "resumed from step 5" in out
  steps = [r["step"] for r in rows(workdir)]
  assert steps == list(range(1, STEPS + 1)), steps
  for a, b in zip(leaves(final_params(reference)), leaves(final_params(workdir)), strict=True):
    np.testing.assert_array_equal(a, b)


def start_pair(workdir, *, kill_at=(None, None), term_at=(None, None), extra=(), pause_s=None):
  """Two processes x 4 CPU devices on localhost (gloo), process i with its own crash point."""
  port = portpicker.pick_unused_port()
  return [
    start(
      workdir,
      devices=4,
      extra=[
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *extra,
      ],
      kill_at=kill_at[i],
      term_at=term_at[i],
      pause_s=pause_s,
    )
    for i in range(2)
  ]


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory):
  def build(workdir):
    for p in start_pair(workdir):
      finish(p)

  return built_once(tmp_path_factory, "train_two_process_reference", build)


@pytest.mark.slow
def test_two_processes_match_one_process(reference, two_process_reference):
  tmp_path = two_process_reference
  ref, got = losses(reference), losses(tmp_path)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], atol=1e-5, rtol=0
  )
  # The gradient itself (before clipping and AdamW, which hide a constant factor): 2 processes x
  # 4 devices = 1 process x 8 devices, whose step is checked against jax.grad in test_train_step.
  ref, got = losses(reference, "train/grad_norm"), losses(tmp_path, "train/grad_norm")
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-4
  )
  ref_state = jax.tree.map(np.asarray, final_params(reference))
  got = final_params(tmp_path, like=ref_state)
  for a, b in zip(leaves(ref_state), leaves(got), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_saves_the_same_step_on_both(
  reference, two_process_reference, tmp_path
):
  """Preemption on a pod: one process gets SIGTERM at step 3; JAX's preemption service makes
  both agree on a step, both save it and exit 0; rerunning both resumes bitwise."""
  # Each step waits 1 s (faults.PAUSE): the notice spreads through JAX's coordination service
  # long before step 8 even on a loaded machine, so the run must stop early.
  procs = start_pair(tmp_path, term_at=(None, "step:3"), pause_s=1.0)
  outs = [finish(p) for p in procs]  # both exit 0
  saved = ocp.CheckpointManager(checkpointing.checkpoint_dir(tmp_path)).latest_step()
  # JAX agrees on a step after the notice spreads (a later step both reach): the same step on
  # both, saved, both stopped with exit code 0.
  assert 3 <= saved < STEPS and all(f"checkpoint of step {saved} saved" in o for o in outs), saved
  outs = [finish(p) for p in start_pair(tmp_path)]
  assert f"resumed from step {saved}" in outs[0]  # process 0 writes the notes
  like = jax.tree.map(np.asarray, final_params(reference))  # host arrays: any topology
  ref = final_params(two_process_reference, like=like)
  got = final_params(tmp_path, like=like)
  for a, b in zip(leaves(ref), leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_lost_process_stops_the_other_and_both_resume(reference, two_process_reference, tmp_path):
  """Process 1 dies (SIGKILL at step 5): process 0 must not hang in its next collective; it stops
  non-zero within 2 minutes, naming the lost task; rerunning both resumes bitwise."""
  t0 = time.monotonic()
  procs = start_pair(tmp_path, kill_at=(None, "step:5"), extra=("--heartbeat_timeout_s=20",))
  out1, _ = procs[1].communicate(timeout=300)
  assert procs[1].returncode == -signal.SIGKILL, out1[-2000:]
  killed = time.monotonic()
  out0, _ = procs[0].communicate(timeout=300)
  assert procs[0].returncode != 0 and time.monotonic() - killed < 120, (t0, out0[-3000:])
  assert "stopped sending heartbeats" in out0 or "Task 1 heartbeat timeout" in out0, out0[-3000:]
  latest = ocp.CheckpointManager(checkpointing.checkpoint_dir(tmp_path)).latest_step()
  assert latest in (2, 4), latest
  outs = [finish(p) for p in start_pair(tmp_path)]
  assert f"resumed from step {latest}" in outs[0]  # process 0 writes the notes
  like = jax.tree.map(np.asarray, final_params(reference))  # host arrays: any topology
  ref = final_params(two_process_reference, like=like)
  got = final_params(tmp_path, like=like)
  for a, b in zip(leaves(ref), leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)


class Poisoned(GMAIL):
  """GMAIL whose loss turns NaN from update 4 (logged step 5) on."""

  def parts(self, head, z, targets, step):
    parts, aux = super().parts(head, z, targets, step)
    return jnp.where(step >= 4, jnp.nan, parts), aux


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  """In-process: a registered objective whose loss turns NaN from step 5 on."""
  monkeypatch.setitem(objectives.REGISTRY, "poisoned", Poisoned)
  cfg = load_config("tiny")
  cfg.loss.mode = "poisoned"
  cfg.total_steps, cfg.checkpoint_every_steps, cfg.log_every_steps = STEPS, 2, 3
  cfg.model.variant, cfg.data.image_size, cfg.data.synthetic_image_size = "mu", 16, 16
  with pytest.raises(FloatingPointError, match="non-finite loss at step 5"):
    train.train_and_evaluate(cfg, str(tmp_path))
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  assert ckpt.latest_step() == 4
  mgr = ckpt.manager
  r = mgr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  leaves = jax.tree.leaves(r["state"]["params"])
  assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
  ckpt.close()


def test_load_student_merges_lora(reference):
  from gmail_jax import api

  student = api.load_student(reference)
  teacher_like = api.load_student(reference, step=STEPS - 2)
  x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  a, b = student.encode_images(x), teacher_like.encode_images(x)
  assert a.shape == (4, 32)
  np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(a, b)  # different steps -> different adapters merged
  assert student.model.vision.blocks[0].attn.q_proj.lora_a is None  # plain CLIP


def test_load_clip_of_a_workdir_is_the_student(reference):
  from gmail_jax import api

  clip, student = api.load_clip(reference), api.load_student(reference)
  x = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  np.testing.assert_array_equal(clip.encode_images(x), student.encode_images(x))
  texts = ["a photo of a cat", "two dogs"]
  np.testing.assert_array_equal(clip.encode_texts(texts), student.encode_texts(texts))
