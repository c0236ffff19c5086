"""The JAX generation backend (generation/jax_backend.py, models/diffusion/pipeline.py) against
diffusers' StableDiffusionPipeline on the same tiny random pipeline, and through the whole stage
into a bucket. The stage's crash safety and shards with this backend: test_generate.py (its bucket
half), which also compares a whole run with the diffusers backend's.

The tiny pipeline is diffusers' (built offline once per session); the JAX side loads its folder."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmail_jax.faults import KILL_AT
from gmail_jax.generation import seeds
from gmail_jax.models.diffusion import pipeline as sd_pipeline

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["a cat on a mat", "two dogs running in the snow", "a red car", "a bowl of fruit"]
SCHEDULERS = (
  "DDIMScheduler",
  "PNDMScheduler",
  "EulerDiscreteScheduler",
  "DPMSolverMultistepScheduler",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from gmail_jax.generation import diffusers_backend

  path = tmp_path_factory.mktemp("sd") / "tiny"
  return diffusers_backend.ensure_random_pipeline(path, "tiny", 0)


@pytest.fixture(scope="module")
def sd(tiny):
  return sd_pipeline.load_pipeline(str(tiny))


def _jax_images(sd, prompts, seed_list, *, steps=10, guidance=7.5, mesh=None):
  sample = sd_pipeline.make_sampler(sd, steps=steps, guidance=guidance)
  if mesh is not None:
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("rows"))
    fn = jax.jit(sample, in_shardings=(rep, split, split, split), out_shardings=split)
  else:
    fn = jax.jit(sample)
  lat = seeds.initial_latents(seed_list, sd.latent_shape(32)).transpose(0, 2, 3, 1)
  neg = sd.tokenizer([""] * len(prompts))
  return np.asarray(fn(sd.params, sd.tokenizer(prompts), neg, jnp.asarray(lat)))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.slow
def test_sampler_equals_stable_diffusion_pipeline(tiny, sd, scheduler):
  """10 steps, guidance 7.5, 4 different captions in one batch, the same starting latents:
  decoded pixels equal diffusers' to 1e-3 (measured ~1.5e-6)."""
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny))
  pipe.set_progress_bar_config(disable=True)
  cls = getattr(diffusers, scheduler)
  pipe.scheduler = cls.from_config(pipe.scheduler.config, skip_prk_steps=True)
  sd.scheduler_config.update(_class_name=scheduler, skip_prk_steps=True)
  seed_list = [11, 12, 13, 14]
  lat = seeds.initial_latents(seed_list, sd.latent_shape(32))
  ref = pipe(
    prompt=PROMPTS,
    num_inference_steps=10,
    guidance_scale=7.5,
    height=32,
    width=32,
    latents=torch.from_numpy(lat),
    output_type="np",
  ).images
  got = _jax_images(sd, PROMPTS, seed_list)
  assert got.shape == ref.shape == (4, 32, 32, 3)
  assert np.abs(got - ref).max() <= 1e-3, np.abs(got - ref).max()
  assert np.abs(got[0] - got[1]).max() > 0.05  # different captions, different images


def test_row_i_depends_only_on_caption_i(sd):
  sd.scheduler_config.update(_class_name="DDIMScheduler")
  a = _jax_images(sd, PROMPTS, [1, 2, 3, 4], steps=4)
  b = _jax_images(sd, PROMPTS[::-1], [4, 3, 2, 1], steps=4)  # reordering the batch
  np.testing.assert_allclose(b[::-1], a, atol=1e-6)
  c = _jax_images(sd, ["another caption"] + PROMPTS[1:], [9, 2, 3, 4], steps=4)
  np.testing.assert_allclose(c[1:], a[1:], atol=1e-6)  # changing row 0 changes only row 0
  assert np.abs(c[0] - a[0]).max() > 0.05


@pytest.mark.slow
def test_batch_split_over_eight_devices_equals_one_device(sd):
  sd.scheduler_config.update(_class_name="DDIMScheduler")
  prompts = PROMPTS * 2
  seed_list = list(range(8))
  eight = jax.make_mesh((8,), ("rows",), devices=jax.devices()[:8])
  one = jax.make_mesh((1,), ("rows",), devices=jax.devices()[:1])
  a = _jax_images(sd, prompts, seed_list, steps=3, mesh=eight)
  b = _jax_images(sd, prompts, seed_list, steps=3, mesh=one)
  # 1 row per device vs 8 on one: XLA's kernels round differently (measured max 2.7e-6).
  np.testing.assert_allclose(a, b, atol=1e-5)


def _env():
  # One CPU device (the split over 8 is test_batch_split_over_eight_devices_equals_one_device's).
  e = dict(os.environ, GMAIL_TRACEBACK="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
  e["XLA_FLAGS"] = xla_flags(1)
  for key in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "SLURM_PROCID", KILL_AT):
    e.pop(key, None)
  return e


def _generate(workdir, *flags):
  cmd = [sys.executable, "-m", "gmail_jax.generate", "--config=configs/generate/tiny.py"]
  return subprocess.run(
    [*cmd, f"--workdir={workdir}", *flags],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_jax_backend_generates_into_a_bucket(gcs_dir, tmp_path, monkeypatch):
  """backend jax, model='random', --workdir=gs://...: every file of the run is in the bucket but
  the random pipeline, built once into the local cache (the backend loads local files)."""
  from gmail_jax import storage
  from gmail_jax.generation import store

  monkeypatch.setenv("GMAIL_JAX_CACHE", str(tmp_path / "cache"))
  flags = ("--config.backend=jax", "--config.max_captions=4")
  res = _generate(gcs_dir, *flags)
  assert res.returncode == 0, res.stderr[-2000:]
  got = store.read_parquet(storage.path(gcs_dir) / "manifest.parquet").to_pylist()
  assert len(got) == 8 and all((storage.path(gcs_dir) / r["gen_path"]).is_file() for r in got)
  assert not (storage.path(gcs_dir) / "pipeline").exists()
  (pipeline,) = (tmp_path / "cache" / "generate").glob("*/pipeline")
  assert (pipeline / "model_index.json").is_file()
  res = _generate(gcs_dir, *flags)  # a rerun finds every chunk done in the bucket
  assert res.returncode == 0 and "0 images to go" in res.stdout, res.stderr[-2000:]


def test_generation_bench_runs_the_jax_backend_without_torch(tiny):
  """``python -m bench.generate --backend=jax --model=DIR`` on a host without torch (a TPU VM):
  torch made unimportable, it times the JAX sampler and reports no torch."""
  code = "import sys; sys.modules['torch'] = None; from bench import generate; "
  code += "generate.main(sys.argv[1:])"
  flags = [f"--model={tiny}", "--backend=jax", "--batch_sizes=1", "--steps=2", "--repeats=1"]
  run = lambda *extra: subprocess.run(
    [sys.executable, "-c", code, *flags, *extra],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  # --gpu with JAX on the CPU is refused, not timed at 512 px and 50 steps there.
  refused = run("--gpu")
  assert refused.returncode == 1 and "--gpu: no GPU visible to JAX" in refused.stderr
  proc = run()
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["torch"] is None and out["device"] == "cpu"
  (row,) = out["results"]
  assert row["backend"] == "jax" and row["images_per_s"] > 0
