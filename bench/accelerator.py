r"""One command for a lent H100 / H200: every device figure the project needs, inside its lease.

    python3 -m bench.accelerator                 # the device run (OUT=... or ./bench_out)
    .venv/bin/python -m bench.accelerator --smoke    # every part on the CPU at tiny sizes (~2 min)
    python3 -m bench.accelerator --parts=gen_jax,gen_diffusers   # rerun only these parts

How to run it on a lent device (the device tool's ``run``; ../shared/device/README.md). Once per
checkout, on the CPU machine, from the repository root (the input-pipeline part reads real COCO
photos, which the device machine does not have: 13 MB of them travel in ``carry``)::

    echo /.whl/ >> .git/info/exclude && mkdir -p .whl && cp ../shared/device/wheels/* .whl/
    echo /.data/ >> .git/info/exclude && mkdir -p .data/coco-mini \
      && cp -r ../shared/data/coco-mini/train2017 .data/coco-mini/

then one device call, ``carry=[".whl", ".data"]``, ``timeout_s=420``, command::

    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
      --no-cache-dir --target /tmp/site .whl/*.whl .whl/*.tar.gz \
      && export PYTHONPATH=/tmp/site:$PWD || exit 1
    export GMAIL_SHARED_DATA=$PWD/.data
    OUT=$OUT/smoke python3 -m bench.accelerator --smoke --budget-s 100
    OUT=$OUT python3 -m bench.accelerator

(the first device session runs the smoke first, on the device machine's CPU, as the README asks;
a rerun drops that line, and may name ``--parts``). Each part's JSON lands in ``$OUT`` the moment
it finishes (``$OUT/NAME.json``), with its log in ``$OUT/logs/``; ``$OUT/summary.json`` holds the
headline figures and is rewritten after every part. Exit status 0 when every part ran and every
check passed.

Sizing (lease: 15 minutes of device time per session, a 1-2 minute start and a rerun included):
the whole run is capped by ``--budget-s`` (240 s; smoke 300 s, a hang guard on loaded CPUs). Each
part runs in its own process group under its own timeout, so a hung or slow part costs only
itself, and a part is not started with less of the budget left than it needs (``min``): it is
recorded as skipped, for a rerun with ``--parts``. Parts of the ``shared`` stage compute no
timings and run side by side first (JAX with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``, so they share
the device's memory); then the ``alone`` parts, which time things, one at a time, in this order
(priority: the budget may end before the last). A smoke run overlaps all of them, two at a time
(``--jobs`` 2; 4 spent 13 % more CPU on 2 cores): its CPU figures mean nothing.

  part            issue  stage   timeout  min   what
  parity          1      shared   60 s    30 s  CLIP B/16 image embeddings of 8 images, device vs
                                                CPU backend (fp32, fp32 'highest', bf16)
  resume          3      shared   90 s    45 s  configs/tiny.py (20 steps) SIGKILLed at step 13
                                                (GMAIL_KILL_AT) and rerun, vs 2 uninterrupted runs
  precision       3      shared   90 s    45 s  configs/tiny.py 50 steps, fp32 vs bf16 loss curves
  memory          4      shared   90 s    60 s  L/14 bf16 remat, batch 256: allocator peak
  gen_prep        5      shared   90 s    45 s  random SD 2.1-base-shaped pipeline (host only)
  train_step      2      alone    75 s    40 s  LoRA step B/16 bf16 batch 256: pairs/s, XLA FLOPs,
                                                MFU vs the bf16 matmul peak measured in the same
                                                process, peak device memory
  peer_eager      2      alone    45 s    20 s  the PyTorch + PEFT peer: bf16 autocast, SDPA
  peer_compile    2      alone    90 s    45 s  the same under torch.compile (inductor)
  input_pipeline  6      alone    45 s    20 s  coco-mini JPEGs -> 224 px pairs, a worker a core
  gen_diffusers   5      alone    60 s    25 s  StableDiffusionPipeline bf16 SDPA, 512 px, 50 steps,
                                                batch 4
  gen_jax         5      alone    90 s    45 s  the JAX backend, same folder / dtype / steps / batch
  memory_noremat  4      alone    75 s    45 s  optional (--parts=memory_noremat or all): L/14
                                                without remat (may not fit: ``oom``)

Expected on an H100 (not measured yet): ~60 s for the shared stage, then ~40 + 20 + 60 + 20 + 25 +
60 s; if the budget ends first, the last parts are skipped and a second call runs them.

Every part's JSON: ``part``, ``ok`` (it ran to the end), ``date`` (UTC), ``versions`` (python,
jax, jaxlib, device kind, torch, transformers, diffusers, peft: those the process imported,
``bench.common.versions``), ``result`` and, for parts that check something, ``result.checks``.
Timings, FLOPs and MFU come from bench/train_step.py, bench/torch_peer.py, bench/matmul_peak.py,
bench/memory.py (``--measure``), bench/generate.py and bench/input_pipeline.py; this file only
sizes, isolates and collects them.

Tolerances. parity: min cosine of device vs CPU embeddings of >= 0.999999 at fp32 'highest',
>= 0.9999 at fp32 default precision (XLA:GPU may run fp32 dots in TF32: 10-bit mantissas),
>= 0.999 in bf16 (each backend rounds to 8 bits in its own order; bf16 vs fp32 on one CPU measured
0.99993 for B/32, tests/test_models_clip_parity.py). resume: bitwise equal to the uninterrupted
run; where two uninterrupted runs already differ (XLA:GPU may autotune to other GEMM algorithms
in another process, and may reduce with atomics), the resumed run must be no farther from the
reference (max |diff| over the LoRA weights) than 2x the second uninterrupted run: its steps
before the checkpoint are the reference's own, so it can only diverge later, while a resume that
lost state (optimizer moments, step, RNG, data position) moves every adapter weight.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_TIMEOUT_S = 180.0  # each part of a smoke run: it takes 3-60 s on a loaded 2-core machine
SMOKE_MIN_S = 5.0


@dataclasses.dataclass(frozen=True)
class Ctx:
  """What a part's process knows: sizes (smoke or not), where JSON goes, a scratch folder."""

  smoke: bool
  out: pathlib.Path
  work: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Part:
  name: str
  issue: int  # the numbered part of the issue it answers
  stage: str  # 'shared': no timings, side by side; 'alone': times something, one at a time
  timeout_s: float  # on the device (a smoke run: SMOKE_TIMEOUT_S, a hang guard)
  min_s: float  # on the device: with less of the budget left it would only time out: skipped
  run: Callable[[Ctx], dict]
  needs: tuple[str, ...] = ()
  env: tuple[tuple[str, str], ...] = ()
  optional: bool = False  # not in the default plan: --parts=NAME (or all)


# ---------------------------------------------------------------------------------------------
# Helpers run inside a part's process.
# ---------------------------------------------------------------------------------------------


def call_main(main: Callable[[list[str]], None], argv: list[str]) -> dict:
  """Runs an existing bench's ``main(argv)`` here and returns the JSON of its last stdout line
  (its stdout is still echoed, into the part's log)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    main(argv)
  text = buf.getvalue()
  sys.stdout.write(text)
  lines = [ln for ln in text.splitlines() if ln.strip()]
  if not lines:
    raise RuntimeError(f"{main.__module__}.main({argv}) printed nothing")
  return json.loads(lines[-1])


def jsonable(o: Any) -> Any:
  if hasattr(o, "tolist"):  # numpy scalars and arrays
    return o.tolist()
  if isinstance(o, pathlib.Path):
    return str(o)
  return repr(o)


def write_json(path: pathlib.Path, obj: dict) -> None:
  """Atomically (temp file + rename): a reader never sees half a file, even if we are killed."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=jsonable) + "\n")
  os.replace(tmp, path)


def utc_now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def check(name: str, value: float, op: str, bound: float) -> dict:
  ok = value >= bound if op == ">=" else value <= bound
  return {"name": name, "value": value, "bound": f"{op} {bound}", "pass": bool(ok)}


# ---------------------------------------------------------------------------------------------
# 1. CLIP parity, device vs CPU.
# ---------------------------------------------------------------------------------------------


def part_parity(ctx: Ctx) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from gmail_jax.models import clip as clip_lib

  variant = "tiny" if ctx.smoke else "B/16"
  cfg = clip_lib.clip_config(variant)
  device, cpu = jax.devices()[0], jax.devices("cpu")[0]
  # The weights are drawn once, on the CPU, and copied bit for bit: jax.random's normal goes
  # through float transcendentals that two backends need not round alike.
  with jax.default_device(cpu):
    model = clip_lib.VisionTower(cfg.vision, cfg.embed_dim, residual_loops=True, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  s = cfg.vision.image_size
  pixels = np.random.default_rng(0).standard_normal((8, s, s, 3)).astype(np.float32)

  def embed(dev, dtype, precision: str | None) -> np.ndarray:
    # Each backend as gmail_jax builds it for itself (towers.default_residual_loops: the loops
    # are XLA:CPU-only; numerically they are the identity).
    abstract = nnx.eval_shape(
      lambda: clip_lib.VisionTower(
        cfg.vision,
        cfg.embed_dim,
        dtype=dtype,
        residual_loops=dev.platform == "cpu",
        rngs=nnx.Rngs(0),
      )
    )
    gdef = nnx.graphdef(abstract)
    f = jax.jit(lambda st, x: nnx.merge(gdef, st)(x))
    args = jax.device_put((state, pixels), dev)  # committed: f runs on ``dev``
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
      return np.asarray(f(*args), np.float64)

  def compare(a: np.ndarray, b: np.ndarray) -> dict:
    an = a / np.linalg.norm(a, axis=-1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return {
      "max_abs": float(np.abs(a - b).max()),
      "max_abs_rel": float(np.abs(a - b).max() / np.abs(b).max()),
      "max_abs_normalized": float(np.abs(an - bn).max()),
      "min_cosine": float((an * bn).sum(-1).min()),
      "bitwise_equal": bool(np.array_equal(a, b)),
    }

  t0 = time.perf_counter()
  cpu32 = embed(cpu, None, None)
  cpu16 = embed(cpu, jnp.bfloat16, None)
  rows = {
    "float32": compare(embed(device, None, None), cpu32),
    "float32_highest": compare(embed(device, None, "highest"), cpu32),
    "bfloat16": compare(dev16 := embed(device, jnp.bfloat16, None), cpu16),
    # How far the device's bf16 is from the fp32 truth (context for the row above).
    "bfloat16_vs_cpu_float32": compare(dev16, cpu32),
  }
  bounds = {"float32_highest": 0.999999, "float32": 0.9999, "bfloat16": 0.999}
  return {
    "variant": variant,
    "images": int(pixels.shape[0]),
    "image_size": s,
    "weights": "random (nnx.Rngs(0), drawn on the CPU)",
    "device": str(device),
    "cpu": str(cpu),
    "embed_dim": int(cpu32.shape[-1]),
    "seconds": time.perf_counter() - t0,
    "rows": rows,
    "checks": [check(f"{k} min_cosine", rows[k]["min_cosine"], ">=", b) for k, b in bounds.items()],
  }


# ---------------------------------------------------------------------------------------------
# 2. The LoRA step and its PyTorch + PEFT peer.
# ---------------------------------------------------------------------------------------------

STEP = {"variant": "B/16", "batch": 256, "dtype": "bfloat16", "rank": 4}
STEP_SMOKE = {"variant": "tiny", "batch": 8, "dtype": "bfloat16", "rank": 4}


def part_train_step(ctx: Ctx) -> dict:
  from bench import train_step

  s = STEP_SMOKE if ctx.smoke else STEP
  argv = ["--variant", s["variant"], "--batch", str(s["batch"]), "--dtype", s["dtype"]]
  argv += ["--rank", str(s["rank"]), "--peer", "none"]
  if hasattr(train_step.parse_args([]), "pipeline"):
    # The step alone, on the device: the host's pipeline is part 6 (and needs no device time).
    argv += ["--pipeline", "none"]
  if ctx.smoke:
    argv += ["--warmup", "1", "--iters", "2", "--repeats", "2", "--peak-sizes", "128,256"]
  else:  # ~50 ms steps: 5-step windows; 4096² / 8192² bf16 dots reach the tensor-core rate
    argv += ["--gpu", "--warmup", "2", "--iters", "5", "--repeats", "3"]
    argv += ["--peak-sizes", "4096,8192"]
  return call_main(train_step.main, argv)


def _peer(ctx: Ctx, compile: bool) -> dict:
  from bench import common, train_step
  from bench import torch_peer as peer_lib

  s = STEP_SMOKE if ctx.smoke else STEP
  pcfg = train_step.peer_config(s["variant"], batch=s["batch"], rank=s["rank"], dtype=s["dtype"])
  r = peer_lib.bench_peer(
    pcfg,
    compile=compile,
    # One thread on a small shared CPU: torch's OpenMP pool spins when oversubscribed.
    threads=1 if ctx.smoke else None,
    warmup=2 + int(compile),
    iters=2 if ctx.smoke else 5,
    repeats=2 if ctx.smoke else 3,
    device="cpu" if ctx.smoke else "cuda",
    # aot_eager: dynamo + AOTAutograd as on the GPU, without minutes of C++ code generation.
    compile_backend="aot_eager" if ctx.smoke else "inductor",
  )
  # The HF model computes every row of the last block (gmail_jax: the class token's only).
  flops = common.gmail_step_flops_per_pair(**train_step.vit_dims(s["variant"], s["rank"]))
  return {
    **s,
    **r,
    "attention": "sdpa",
    "autocast": s["dtype"],
    "flops_per_pair": flops["total"],
    "achieved_flops": r["pairs_per_s"] * flops["total"],
  }


def part_peer_eager(ctx: Ctx) -> dict:
  return _peer(ctx, compile=False)


def part_peer_compile(ctx: Ctx) -> dict:
  return _peer(ctx, compile=True)


# ---------------------------------------------------------------------------------------------
# 3. Correctness through ``python -m gmail_jax.main``: kill + resume, fp32 vs bf16.
# ---------------------------------------------------------------------------------------------


def _train_flags(ctx: Ctx, steps: int) -> list[str]:
  flags = [
    "--config=configs/tiny.py",
    "--config.log_every_steps=1",
    f"--config.total_steps={steps}",
  ]
  flags.append(f"--platform={'cpu' if ctx.smoke else 'gpu'}")  # never silently on the CPU
  if ctx.smoke:
    flags += [
      "--config.model.variant=mu",
      "--config.data.image_size=16",
      "--config.data.synthetic_image_size=16",
      "--config.checkpoint_every_steps=2",
    ]
  return flags


def _start_run(
  ctx: Ctx, part: str, name: str, flags: list[str], kill_at: str | None = None, log: str = ""
) -> tuple[subprocess.Popen, pathlib.Path, pathlib.Path]:
  """``python -m gmail_jax.main`` on workdir WORK/part/name, output in OUT/logs; returns
  (process, log, workdir). Runs of a part share the device; the part's own timeout bounds them
  (its process group, these runs included, is killed)."""
  from gmail_jax import faults

  env = {k: v for k, v in os.environ.items() if k not in (faults.KILL_AT, faults.TERM_AT)}
  env["GMAIL_TRACEBACK"] = "1"
  if kill_at:
    env[faults.KILL_AT] = kill_at
  workdir = ctx.work / part / name
  workdir.parent.mkdir(parents=True, exist_ok=True)
  log_path = ctx.out / "logs" / f"{part}-{log or name}.log"
  cmd = [sys.executable, "-m", "gmail_jax.main", *flags, f"--workdir={workdir}"]
  with open(log_path, "w") as f:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
  return proc, log_path, workdir


def _finish(
  run: tuple[subprocess.Popen, pathlib.Path, pathlib.Path], rc: int
) -> tuple[str, pathlib.Path]:
  """Waits for a run; its (log text, workdir), or an error naming it when it exited otherwise."""
  proc, log_path, workdir = run
  got = proc.wait()
  text = log_path.read_text(errors="replace")
  if got != rc:
    raise RuntimeError(f"{log_path.name}: exited {got}, expected {rc}: {text[-2000:]}")
  return text, workdir


def _device() -> str:
  """The device the training runs used, as this process sees it (same machine, same JAX). Starts
  JAX's backend here, so that this part's ``versions`` name the device kind too."""
  import jax

  return f"{jax.devices()[0].device_kind} x{jax.device_count()}"


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _final_params(workdir: pathlib.Path) -> tuple[int, list]:
  import numpy as np
  import orbax.checkpoint as ocp

  from gmail_jax.training import checkpointing

  mgr = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir))
  step = mgr.latest_step()
  r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  import jax

  return step, [np.asarray(x) for x in jax.tree.leaves(r["state"]["params"])]


def _param_diff(a: list, b: list) -> dict:
  import numpy as np

  equal = all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  diff = max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b, strict=True))
  scale = max(float(np.abs(x).max()) for x in a)
  return {"bitwise_equal": equal, "max_abs_diff": diff, "max_abs_param": scale}


def part_resume(ctx: Ctx) -> dict:
  steps, kill_at = (8, "step:5") if ctx.smoke else (20, "step:13")
  flags = _train_flags(ctx, steps)
  # The references run beside the killed run and its rerun (which needs only the kill).
  refs = [_start_run(ctx, "resume", n, flags) for n in ("reference", "reference2")]
  _finish(_start_run(ctx, "resume", "run", flags, kill_at), -signal.SIGKILL)
  text, run_dir = _finish(_start_run(ctx, "resume", "run", flags, log="rerun"), 0)  # resumes
  ref_dir, ref2_dir = (_finish(r, 0)[1] for r in refs)
  found = re.search(r"resumed from step (\d+)", text)
  ref_step, ref = _final_params(ref_dir)
  _, ref2 = _final_params(ref2_dir)
  end_step, resumed = _final_params(run_dir)
  vs_ref = _param_diff(ref, resumed)
  floor = _param_diff(ref, ref2)
  lref, lres = _losses(ref_dir), _losses(run_dir)
  if vs_ref["bitwise_equal"]:
    verdict, ok = "bitwise equal", True
  elif not floor["bitwise_equal"]:
    ok = vs_ref["max_abs_diff"] <= 2 * floor["max_abs_diff"]
    verdict = "within 2x the run-to-run difference" if ok else "beyond 2x the run-to-run difference"
  else:
    verdict, ok = "differs, while two uninterrupted runs are bitwise equal", False
  return {
    "config": "configs/tiny.py" + (" (mu, 16 px)" if ctx.smoke else ""),
    "device": _device(),
    "steps": steps,
    "kill_at": kill_at,
    "resumed_from": int(found.group(1)) if found else None,
    "final_step": {"reference": ref_step, "resumed": end_step},
    "resumed_vs_reference": vs_ref,
    "reference2_vs_reference": floor,
    "loss_steps_logged": sorted(lres) == list(range(1, steps + 1)),
    "loss_max_abs_diff": max(abs(lref[k] - lres[k]) for k in lref),
    "verdict": verdict,
    "checks": [
      {"name": "resumed run ends equal", "value": verdict, "bound": "see docstring", "pass": ok},
      {
        "name": "resumed from a checkpoint",
        "value": found.group(0) if found else None,
        "bound": "present",
        "pass": found is not None,
      },
      {
        "name": "metrics.jsonl: one row per step",
        "value": len(lres),
        "bound": f"== {steps}",
        "pass": sorted(lres) == list(range(1, steps + 1)),
      },
    ],
  }


def part_precision(ctx: Ctx) -> dict:
  steps = 8 if ctx.smoke else 50
  flags = _train_flags(ctx, steps)
  runs = [
    _start_run(ctx, "precision", d, flags + [f"--config.model.dtype={d}"])
    for d in ("float32", "bfloat16")
  ]
  f32, b16 = (_losses(_finish(r, 0)[1]) for r in runs)
  idx = sorted(f32)
  diff = [abs(f32[k] - b16[k]) for k in idx]
  worst = max(range(len(diff)), key=diff.__getitem__)
  return {
    "config": "configs/tiny.py" + (" (mu, 16 px)" if ctx.smoke else ""),
    "device": _device(),
    "steps": steps,
    "loss_float32": [f32[k] for k in idx],
    "loss_bfloat16": [b16[k] for k in idx],
    "abs_diff": diff,
    "max_abs_diff": diff[worst],
    "max_abs_diff_step": idx[worst],
    "max_rel_diff": max(d / abs(f32[k]) for d, k in zip(diff, idx, strict=True)),
    "final": {"float32": f32[idx[-1]], "bfloat16": b16[idx[-1]]},
  }


# ---------------------------------------------------------------------------------------------
# 4. L/14 memory at batch 256, measured.
# ---------------------------------------------------------------------------------------------


def _memory(ctx: Ctx, remat: bool) -> dict:
  from bench import memory

  variant, batch = ("tiny", 8) if ctx.smoke else ("L/14", 256)
  argv = ["--measure", "--variants", variant, "--dtypes", "bfloat16", "--batch", str(batch)]
  argv += ["--remat", "on" if remat else "off", "--steps", "2"]
  return call_main(memory.main, argv)


def part_memory(ctx: Ctx) -> dict:
  return _memory(ctx, remat=True)


def part_memory_noremat(ctx: Ctx) -> dict:
  return _memory(ctx, remat=False)


# ---------------------------------------------------------------------------------------------
# 5. Generation images/s, both backends, on one random pipeline folder.
# ---------------------------------------------------------------------------------------------


def _pipeline_dir(ctx: Ctx) -> pathlib.Path:
  return ctx.work / ("pipeline-tiny" if ctx.smoke else "pipeline-sd21")


def part_gen_prep(ctx: Ctx) -> dict:
  from gmail_jax.generation import diffusers_backend

  t0 = time.perf_counter()
  shapes = "tiny" if ctx.smoke else "sd21"
  path = diffusers_backend.ensure_random_pipeline(_pipeline_dir(ctx), shapes, 0)
  size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
  return {"shapes": shapes, "seed": 0, "gib": size / 2**30, "seconds": time.perf_counter() - t0}


def _gen(ctx: Ctx, backend: str) -> dict:
  from bench import generate

  argv = [f"--backend={backend}", f"--model={_pipeline_dir(ctx)}", "--repeats=1"]
  if ctx.smoke:  # CPU: 32 px, the tiny pipeline
    argv += ["--batch_sizes=1", "--steps=2"]
  else:  # 512 px, 50 steps (generate's GPU defaults); one row: bf16, SDPA, batch 4, eager.
    # bf16 on both backends: the same dtype, and the one the JAX sampler has run in (its fp16
    # dots, f16 x f16 -> f32, are refused by XLA:CPU, so fp16 was never run anywhere yet).
    argv += ["--gpu", "--batch_sizes=4", "--dtypes=bfloat16", "--attention=sdpa", "--no_compile"]
  r = call_main(generate.main, argv)
  r["pipeline"] = f"random weights, {'tiny' if ctx.smoke else 'SD 2.1-base'} shapes (gen_prep)"
  return r


def part_gen_jax(ctx: Ctx) -> dict:
  return _gen(ctx, "jax")


def part_gen_diffusers(ctx: Ctx) -> dict:
  return _gen(ctx, "diffusers")


# ---------------------------------------------------------------------------------------------
# 6. The input pipeline on the host's cores.
# ---------------------------------------------------------------------------------------------


def part_input_pipeline(ctx: Ctx) -> dict:
  from bench import common, input_pipeline

  if os.environ.get("GMAIL_SHARED_DATA"):  # a lent machine has no ../shared: the carried copy
    input_pipeline.SHARED = pathlib.Path(os.environ["GMAIL_SHARED_DATA"])
  if ctx.smoke:
    argv = ["--workers=0", "--batch_size=4", "--batches=2", "--repeats=1", "--warmup=1"]
    argv += ["--image_size=32"]
  else:  # one worker a core: how many pairs/s the host can feed the device
    argv = [f"--workers={common.cpu_count()}", "--batch_size=64", "--batches=4", "--repeats=3"]
    argv += ["--warmup=2", "--image_size=224"]
  return call_main(input_pipeline.main, ["--dataset=coco", *argv])


# ---------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------

SHARE = (("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)  # several JAX processes on one device
PARTS: tuple[Part, ...] = (
  Part("parity", 1, "shared", 60, 30, part_parity, env=SHARE),
  Part("resume", 3, "shared", 90, 45, part_resume, env=SHARE),
  Part("precision", 3, "shared", 90, 45, part_precision, env=SHARE),
  Part("memory", 4, "shared", 90, 60, part_memory, env=SHARE),
  Part("gen_prep", 5, "shared", 90, 45, part_gen_prep, env=SHARE),
  Part("train_step", 2, "alone", 75, 40, part_train_step),
  # torch only; jax may be imported, never used: keep it from grabbing the device's memory.
  Part("peer_eager", 2, "alone", 45, 20, part_peer_eager, env=SHARE),
  Part("peer_compile", 2, "alone", 90, 45, part_peer_compile, env=SHARE),
  Part("input_pipeline", 6, "alone", 45, 20, part_input_pipeline),
  Part("gen_diffusers", 5, "alone", 60, 25, part_gen_diffusers, ("gen_prep",), SHARE),
  Part("gen_jax", 5, "alone", 90, 45, part_gen_jax, ("gen_prep",)),
  # configs/common.py trains L/14 with remat; this answers whether it has to.
  Part("memory_noremat", 4, "alone", 75, 45, part_memory_noremat, optional=True),
)
BY_NAME = {p.name: p for p in PARTS}


def child_env(smoke: bool, part: Part) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    PYTHONUNBUFFERED="1",
  )
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
  if smoke:
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", "1")  # torch's pool oversubscribes a small shared CPU
  env.update(dict(part.env))
  return env


# ---------------------------------------------------------------------------------------------
# Summary: the headline figures of whatever parts have finished.
# ---------------------------------------------------------------------------------------------


def _get(d: Any, *keys: str) -> Any:
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def merged_versions(records: dict[str, dict]) -> dict:
  """Every part's versions in one place: a value, or the sorted list where parts differ (the
  input pipeline's JAX runs on the host: device_kind ['NVIDIA H100 ...', 'cpu'])."""
  seen: dict[str, dict[str, Any]] = {}
  for rec in records.values():
    for k, v in (rec.get("versions") or {}).items():
      seen.setdefault(k, {})[repr(v)] = v
  return {
    k: next(iter(v.values())) if len(v) == 1 else [v[r] for r in sorted(v)] for k, v in seen.items()
  }


def safe_headline(records: dict[str, dict]) -> dict:
  """The headline, or why there is none: a part's odd JSON must not stop the run."""
  try:
    return headline(records)
  except Exception as e:
    return {"error": f"{type(e).__name__}: {e}"}


def headline(records: dict[str, dict]) -> dict:
  r = {name: rec.get("result") or {} for name, rec in records.items() if rec.get("ok")}
  h: dict[str, Any] = {}
  if "parity" in r:
    h["parity_min_cosine"] = {k: v["min_cosine"] for k, v in r["parity"]["rows"].items()}
    h["parity_max_abs"] = {k: v["max_abs"] for k, v in r["parity"]["rows"].items()}
  if "train_step" in r:
    t = r["train_step"]
    h["lora_step"] = {
      "variant": t["variant"],
      "batch": t["batch"],
      "dtype": t["dtype"],
      "gmail_jax_pairs_per_s": t["gmail_jax_pairs_per_s"],
      "flops_per_pair_xla": t["flops_per_pair_xla"],
      "flops_per_pair_analytic": t["flops_per_pair"],
      "matmul_peak_flops": t["matmul_peak_flops"],
      "mfu": t["mfu"],
      "device_peak_gib": t.get("device_peak_gib"),
    }
    peak = t["matmul_peak_flops"]
    peers = {m: r[f"peer_{m}"] for m in ("eager", "compile") if f"peer_{m}" in r}
    for m, p in peers.items():
      h["lora_step"][f"peer_{m}_pairs_per_s"] = p["pairs_per_s"]
      h["lora_step"][f"peer_{m}_peak_gib"] = p.get("peak_memory_gib")
    if peers:
      best = max(peers, key=lambda m: peers[m]["pairs_per_s"])
      h["lora_step"]["peer_best"] = best
      h["lora_step"]["peer_mfu"] = peers[best]["achieved_flops"] / peak
      h["lora_step"]["ratio_vs_best_peer"] = t["gmail_jax_pairs_per_s"] / peers[best]["pairs_per_s"]
  if "resume" in r:
    h["resume"] = {
      "verdict": r["resume"]["verdict"],
      "max_abs_diff": r["resume"]["resumed_vs_reference"]["max_abs_diff"],
      "run_to_run_max_abs_diff": r["resume"]["reference2_vs_reference"]["max_abs_diff"],
    }
  if "precision" in r:
    h["bf16_vs_fp32_loss_max_abs_diff"] = r["precision"]["max_abs_diff"]
  for name in ("memory", "memory_noremat"):
    if name in r:
      m = r[name]
      h[f"{name}_peak_gib"] = None if m.get("oom") else m["peak_gib"]
      h[f"{name}_oom"] = m.get("oom")
  for name in ("gen_jax", "gen_diffusers"):
    rows = _get(r, name, "results") or []
    if rows:
      h[f"{name}_images_per_s"] = {
        f"{x['dtype']} b{x['batch_size']}": x["images_per_s"] for x in rows
      }
  rows = _get(r, "input_pipeline", "results") or []
  if rows:
    h["input_pairs_per_s"] = {f"workers={x['workers']}": x["pairs_per_s"] for x in rows}
    h["input_pairs_per_s_per_core"] = {
      f"workers={x['workers']}": x["pairs_per_s_per_core"] for x in rows
    }
  return h


# ---------------------------------------------------------------------------------------------
# The orchestrating process: starts each part's process, enforces its timeout, records it.
# ---------------------------------------------------------------------------------------------


class Running:
  def __init__(self, part: Part, ctx: Ctx, timeout: float):
    self.part, self.timeout, self.t0 = part, timeout, time.monotonic()
    self.log = ctx.out / "logs" / f"{part.name}.log"
    cmd = [sys.executable, "-m", "bench.accelerator", "--part", part.name]
    cmd += ["--out", str(ctx.out), "--work", str(ctx.work)] + (["--smoke"] if ctx.smoke else [])
    with open(self.log, "w") as f:
      # Its own session: a timeout kills the part's whole process group (training runs, grain
      # workers, torch's compile workers), never anything else.
      self.proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env(ctx.smoke, part),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
    print(f"[accelerator] {part.name}: started, timeout {timeout:.0f} s", flush=True)

  def elapsed(self) -> float:
    return time.monotonic() - self.t0

  def exited(self) -> bool:
    """Whether the part's own process ended, without reaping it: until ``end`` reaps it, its
    zombie keeps the process-group id from being reused, so ``end`` can only reach its group."""
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    return os.waitid(os.P_PID, self.proc.pid, flags) is not None

  def end(self) -> None:
    """SIGKILL to the part's process group (on a timeout, and after a normal exit: a part that
    failed early may have left training runs going on the device), then reap it. SIGKILL, not
    SIGTERM: gmail_jax.main takes SIGTERM as a preemption notice and goes on to its next
    checkpoint, and nothing a timed-out part could still write is worth waiting for."""
    with contextlib.suppress(ProcessLookupError):
      os.killpg(self.proc.pid, signal.SIGKILL)
    self.proc.wait()


def finalize(run: Running, ctx: Ctx, timed_out: bool) -> dict:
  """The part's JSON as its process wrote it, plus what only the orchestrator knows; a record of
  the failure where it wrote none (killed, crashed before writing)."""
  path = ctx.out / f"{run.part.name}.json"
  rec: dict = {}
  if path.exists():
    with contextlib.suppress(json.JSONDecodeError):
      rec = json.loads(path.read_text())
  if not rec:
    tail = run.log.read_text(errors="replace")[-3000:] if run.log.exists() else ""
    rec = {"part": run.part.name, "issue_part": run.part.issue, "ok": False, "date": utc_now()}
    rec["error"] = ("timed out; " if timed_out else "") + f"log tail: {tail}"
  rec.update(
    timed_out=timed_out,
    rc=run.proc.returncode,
    timeout_s=round(run.timeout, 1),
    process_wall_s=round(run.elapsed(), 2),
    log=str(run.log.relative_to(ctx.out)),
  )
  write_json(path, rec)
  state = ("ok" if rec.get("ok") else "FAILED") + (" (timed out)" if timed_out else "")
  print(f"[accelerator] {run.part.name}: {state} in {run.elapsed():.1f} s", flush=True)
  return rec


def orchestrate(args: argparse.Namespace) -> int:
  t_start = time.monotonic()
  deadline = t_start + args.budget_s
  out = pathlib.Path(args.out).resolve()
  (out / "logs").mkdir(parents=True, exist_ok=True)
  names = [n for n in args.parts.split(",") if n]
  if names == ["all"]:
    names = [p.name for p in PARTS]
  elif not names:
    names = [p.name for p in PARTS if not p.optional]
  unknown = sorted(set(names) - set(BY_NAME))
  if unknown:
    raise SystemExit(f"unknown parts {unknown}; known: {[p.name for p in PARTS]}")
  for n in list(names):  # a part's prerequisites run too
    names += [d for d in BY_NAME[n].needs if d not in names]
  selected = [p for p in PARTS if p.name in names]
  work = pathlib.Path(tempfile.mkdtemp(prefix="bench_accelerator_", dir=args.work or None))
  ctx = Ctx(smoke=args.smoke, out=out, work=work)
  records: dict[str, dict] = {}

  def write_summary() -> None:
    write_json(
      out / "summary.json",
      {
        "smoke": args.smoke,
        "date": utc_now(),
        "budget_s": args.budget_s,
        "wall_s": round(time.monotonic() - t_start, 1),
        "versions": merged_versions(records),
        "parts": {
          n: {
            k: rec.get(k)
            for k in ("issue_part", "ok", "timed_out", "skipped", "process_wall_s", "timeout_s")
          }
          | {"checks_pass": all(c["pass"] for c in _get(rec, "result", "checks") or [])}
          for n, rec in records.items()
        },
        "headline": safe_headline(records),
      },
    )

  def skip(part: Part, why: str) -> None:
    records[part.name] = {
      "part": part.name,
      "issue_part": part.issue,
      "ok": False,
      "skipped": why,
      "date": utc_now(),
    }
    write_json(out / f"{part.name}.json", records[part.name])
    print(f"[accelerator] {part.name}: skipped ({why})", flush=True)

  def start(part: Part) -> Running | None:
    failed = [d for d in part.needs if not records[d].get("ok")]
    if failed:
      skip(part, f"needs {failed}")
      return None
    own = (SMOKE_TIMEOUT_S if args.smoke else part.timeout_s) * args.timeout_scale
    left = deadline - time.monotonic()
    if left < (SMOKE_MIN_S if args.smoke else part.min_s):
      skip(part, f"budget: {left:.0f} s left of --budget-s {args.budget_s:.0f}")
      return None
    return Running(part, ctx, min(own, left))

  def exclusive(part: Part) -> bool:
    # A part that times something has the device (and the host) to itself. Not in a smoke run:
    # its CPU figures mean nothing, and overlapping the parts keeps it short.
    return part.stage == "alone" and not args.smoke

  try:
    # Shared parts first, side by side (at most --jobs at once); then each 'alone' part by
    # itself, in the order of PARTS (priority: the budget may run out before the last).
    pending, running = list(selected), []
    while pending or running:
      for part in list(pending):
        if any(d not in records for d in part.needs):
          continue  # waits for its prerequisite (a smoke run overlaps them)
        if running and (exclusive(part) or any(exclusive(r.part) for r in running)):
          break
        if len(running) >= args.jobs:
          break
        pending.remove(part)
        r = start(part)
        if r is None:
          write_summary()
        else:
          running.append(r)
      time.sleep(0.2)
      for r in list(running):
        done = r.exited()
        timed_out = not done and r.elapsed() > r.timeout
        if done or timed_out:
          r.end()
          running.remove(r)
          records[r.part.name] = finalize(r, ctx, timed_out)
          write_summary()
  finally:
    shutil.rmtree(work, ignore_errors=True)  # the SD-shaped pipeline alone is ~5 GB
  write_summary()
  failed = [n for n, rec in records.items() if not rec.get("ok")]
  failed += [
    f"{n}: {c['name']}"
    for n, rec in records.items()
    for c in _get(rec, "result", "checks") or []
    if not c["pass"]
  ]
  wall = time.monotonic() - t_start
  print(f"[accelerator] done in {wall:.1f} s; {out / 'summary.json'}", flush=True)
  if failed:
    print(f"[accelerator] not ok: {failed}", flush=True)
  return 1 if failed else 0


def run_part(args: argparse.Namespace) -> int:
  """Inside a part's own process: run it, write its JSON (versions and date included) at once."""
  part = BY_NAME[args.part]
  ctx = Ctx(smoke=args.smoke, out=pathlib.Path(args.out), work=pathlib.Path(args.work))
  t0 = time.perf_counter()
  rec: dict = {"part": part.name, "issue_part": part.issue, "smoke": args.smoke}
  try:
    rec["result"] = part.run(ctx)
    rec["ok"] = True
  except BaseException as e:  # SystemExit from a bench's main too; the orchestrator decides
    traceback.print_exc()
    rec["ok"] = False
    rec["error"] = f"{type(e).__name__}: {e}"[:3000]
  from bench import common

  rec["wall_s"] = round(time.perf_counter() - t0, 2)
  rec["date"] = utc_now()
  rec["versions"] = common.versions()
  write_json(ctx.out / f"{part.name}.json", rec)
  sys.stdout.flush()
  return 0 if rec["ok"] else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes")
  ap.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="default: $OUT")
  ap.add_argument(
    "--parts",
    default="",
    help="comma list, or all (default: all but optional ones); prerequisites added",
  )
  ap.add_argument("--budget-s", type=float, default=None, help="whole run (240; smoke 300)")
  ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies every timeout")
  ap.add_argument("--jobs", type=int, default=0, help="parts at once (default 8; smoke 2)")
  ap.add_argument("--work", default="", help="scratch folder parent (default: the temp dir)")
  ap.add_argument("--part", default="", help=argparse.SUPPRESS)  # inside a part's process
  args = ap.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = 300.0 if args.smoke else 240.0
  args.jobs = args.jobs or (2 if args.smoke else 8)
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if not args.part:
    return orchestrate(args)
  rc = run_part(args)
  sys.stdout.flush()
  sys.stderr.flush()
  # Its JSON is written: leave now. Interpreter teardown (torch's and inductor's worker pools,
  # grain's and orbax's threads) can take seconds, or hang, and would count against the timeout.
  os._exit(rc)


if __name__ == "__main__":
  sys.exit(main())
