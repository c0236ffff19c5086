r"""Per-device memory of the GMAIL train step from XLA's ``memory_analysis()`` (no execution).

    python -m bench.memory                                  # B/16 and L/14, batch 256, 8 devices
    python -m bench.memory --variants L/14 --dtypes bfloat16 --remat both --devices 8

The step (``build.abstract_train_state`` + ``build.make_step``, exactly what train.py
compiles) is lowered on abstract arrays for a mesh of ``--devices`` simulated CPU devices, under
pure data parallel (``{data: N}``: frozen weights replicated) and FSDP (``{data: N/f, fsdp: f}``:
every large weight sharded on ``fsdp``), then compiled; nothing is allocated or run.

Per device:  total = arguments + outputs − aliased (donated state) + temporaries
(arguments = frozen weights + LoRA/optimizer state + the batch shard). XLA:CPU's buffer
assignment is a proxy for TPU/GPU (same HLO, different fusion and layout decisions): treat the
numbers as indicative only. The XLA:CPU-only residual-stream loops of models/clip.py (the
``residual_loops`` model option) are off unless ``--cpu-residual-loops`` (TPU/GPU build without
them). Without them XLA:CPU merges the rematerialised forward back into the original (remat
changed L/14's temporaries by ~7%); with them remat takes effect (L/14 bf16 DP: 26.7 -> 9.1 GiB),
at +16% without remat. ``fits_16GiB`` compares the total with a 16 GiB TPU v4/v5e core (no
headroom subtracted). Prints one JSON object.

``--measure`` (on the machine's own devices, e.g. one GPU): builds the real state and runs
``--steps`` steps of exactly what bench/train_step.py times (``gmail_runners``), then reports the
most the JAX allocator held (``peak_bytes_in_use``: weights, optimizer state, batches,
temporaries; not the CUDA context or cuBLAS/cuDNN workspaces) next to XLA's estimate for the same
compiled step, and ``bytes_limit``. Out of memory is a result (``oom``), not a crash. The peak
cannot be reset, so one variant / dtype / remat per process:

    python -m bench.memory --measure --variants L/14 --dtypes bfloat16 --remat on --batch 256

On CPU there are no allocator statistics: the process's peak RSS stands in (``source``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

GIB = 2**30


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--variants", default="B/16,L/14")
  ap.add_argument("--batch", type=int, default=256, help="global batch")
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--fsdp", type=int, default=0, help="fsdp axis size for the FSDP row (0 = all)")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--remat", default="both", choices=("off", "on", "both"))
  ap.add_argument("--cached", action="store_true", help="also the cached-teacher step")
  ap.add_argument("--budget-gib", type=float, default=16.0)
  ap.add_argument(
    "--cpu-residual-loops",
    action="store_true",
    help="build with the XLA:CPU-only residual-stream loops (CLIP's residual_loops option);\n"
    "off by default, so the compiled step is the one TPU/GPU run",
  )
  ap.add_argument("--measure", action="store_true", help="run the step on this machine's devices")
  ap.add_argument("--steps", type=int, default=2, help="--measure: steps run before reading")
  return ap.parse_args(argv)


def measure(variant: str, *, batch: int, dtype: str, remat: bool, steps: int) -> dict:
  """The allocator's peak over building and running ``steps`` train steps on this machine."""
  import resource
  import tempfile

  import jax

  from bench import common, train_step

  argv = ["--variant", variant, "--batch", str(batch), "--dtype", dtype, "--peer", "none"]
  argv += ["--warmup", str(steps)] + (["--remat"] if remat else [])
  args = train_step.parse_args(argv)
  out: dict = {"variant": variant, "global_batch": batch, "dtype": dtype, "remat": remat}
  out["devices"] = jax.device_count()
  stats = jax.local_devices()[0].memory_stats() or {}
  out["bytes_limit_gib"] = stats["bytes_limit"] / GIB if "bytes_limit" in stats else None
  t0 = time.perf_counter()
  try:
    with tempfile.TemporaryDirectory() as wd:
      _, info = train_step.gmail_runners(args, wd)
    out["oom"] = False
    out["estimate_gib"] = info.get("memory_analysis_gib")
    out["compile_s"] = info["compile_s"]
  except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED: the answer is "does not fit"
    text = f"{type(e).__name__}: {e}"
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise
    out["oom"] = True
    out["error"] = text.splitlines()[0][:500]
  out["seconds"] = time.perf_counter() - t0
  peak = common.jax_peak_bytes()
  if peak is not None:
    out["peak_gib"], out["source"] = peak / GIB, "jax allocator peak_bytes_in_use (device 0..n max)"
  else:  # CPU: ru_maxrss is KiB on Linux
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["peak_gib"], out["source"] = rss / GIB, "host peak RSS (no allocator statistics on CPU)"
  if out["bytes_limit_gib"]:
    out["fits"] = not out["oom"] and out["peak_gib"] <= out["bytes_limit_gib"]
  return out


def analyse(
  variant: str,
  *,
  batch: int,
  mesh_cfg: dict,
  dtype: str,
  remat: bool,
  cached: bool,
  budget: float,
  residual_loops: bool,
) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding

  from bench.train_step import gmail_config
  from gmail_jax.models import clip as clip_lib
  from gmail_jax.training import build, optim
  from gmail_jax.training import sharding as shd

  args = argparse.Namespace(variant=variant, dtype=dtype, remat=remat, batch=batch, rank=4)
  config = gmail_config(args)
  config.mesh = mesh_cfg
  config.model.cpu_residual_loops = residual_loops
  cfg = clip_lib.clip_config(variant)
  config.data.image_size = cfg.vision.image_size
  mesh = shd.make_mesh(config.mesh)
  fsdp = mesh.shape["fsdp"] > 1
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    ab = build.abstract_train_state(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)

    def place(tree, fsdp_rule: bool):
      shards = shd.param_shardings(tree, mesh, fsdp=fsdp_rule)
      return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shards
      )

    frozen = place(ab["frozen"], fsdp)
    rng = place(ab["rng"], False)
    state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.replicated(mesh)),
      ab["state"],
    )
    state["params"] = place(ab["state"]["params"], fsdp)
    models = ab["models"]
    built = dict(models=models, tx=tx, schedule=schedule, state=state, frozen=frozen, rng=rng)
    step = build.make_step(config, built, mesh)
    s = cfg.vision.image_size
    bsh: NamedSharding = shd.batch_sharding(mesh)
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=bsh)
    batch_in = {
      "gen_image": sds((batch, s, s, 3), jnp.uint8),
      "real_image": sds((batch, s, s, 3), jnp.uint8),
      "group": sds((batch,), jnp.int32),
    }
    rows = []
    kinds = [("teacher", batch_in)]
    if cached:
      b2 = {k: v for k, v in batch_in.items() if k != "real_image"}
      kinds.append(("cached", b2 | {"teacher_emb": sds((batch, cfg.embed_dim), jnp.float32)}))
    for kind, b in kinds:
      m = step.lower(state, frozen, rng, b).compile().memory_analysis()
      total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
      )
      rows.append(
        {
          "step": kind,
          "arguments_gib": m.argument_size_in_bytes / GIB,
          "outputs_gib": m.output_size_in_bytes / GIB,
          "aliased_gib": m.alias_size_in_bytes / GIB,
          "temp_gib": m.temp_size_in_bytes / GIB,
          "total_gib": total / GIB,
          "fits_16GiB": total / GIB <= budget,
        }
      )
  frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ab["frozen"]))
  return {
    "variant": variant,
    "global_batch": batch,
    "mesh": dict(mesh.shape),
    "dtype": dtype,
    "remat": remat,
    "frozen_gib_total": frozen_bytes / GIB,
    "compile_s": time.perf_counter() - t0,
    "per_device": rows,
  }


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.measure:
    remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    combos = [
      (v, d, r) for v in args.variants.split(",") for d in args.dtypes.split(",") for r in remats
    ]
    if len(combos) != 1:
      raise SystemExit(f"--measure: one variant, dtype and remat per process, got {combos}")
    from bench import common

    v, d, r = combos[0]
    common.emit(measure(v, batch=args.batch, dtype=d, remat=r, steps=args.steps))
    return
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from bench import common

  n, f = args.devices, args.fsdp or args.devices
  meshes = {"data_parallel": {"data": n, "fsdp": 1}, "fsdp": {"data": n // f, "fsdp": f}}
  remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
  out = []
  for variant in args.variants.split(","):
    for dtype in args.dtypes.split(","):
      for remat in remats:
        for name, mesh_cfg in meshes.items():
          r = analyse(
            variant,
            batch=args.batch,
            mesh_cfg=mesh_cfg,
            dtype=dtype,
            remat=remat,
            cached=args.cached,
            budget=args.budget_gib,
            residual_loops=args.cpu_residual_loops,
          )
          r["parallelism"] = name
          print(f"{r}", file=sys.stderr, flush=True)
          out.append(r)
  common.emit(
    {
      "devices": args.devices,
      "budget_gib": args.budget_gib,
      "cpu_residual_loops": args.cpu_residual_loops,
      "results": out,
    }
  )


if __name__ == "__main__":
  main()
