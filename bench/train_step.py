r"""GMAIL training-step throughput: gmail_jax vs the PyTorch + PEFT peer, with FLOPs and MFU.

    python -m bench.train_step --variant B/32 --batch 16                 # CPU, fp32
    python -m bench.train_step --variant tiny --batch 16 --repeats 2     # smoke
    python -m bench.train_step --variant L/14 --batch 128 --dtype bfloat16 --remat --gpu   # GPU

Both steps: frozen CLIP ViT teacher on the real image (no gradient), the same weights + LoRA
(rank r, alpha r, q/k/v/out of every vision block) on the generated image, one-directional InfoNCE
(τ 0.07) over the batch, AdamW on the LoRA parameters only. Random weights (no download).

gmail_jax: ``build.build`` + ``build.make_step`` exactly as ``train.py`` runs them
(the state is donated; no host sync inside the timed loop). ``--cached`` also times the step with
a precomputed ``teacher_emb`` (gmail_jax/training/teacher_cache.py: the teacher forward is skipped).
Peer: transformers ``CLIPVisionModelWithProjection`` + peft ``LoraConfig``, eager and
``torch.compile`` (bench/torch_peer.py), each with its best thread count (--torch-threads).
Everything is built and warmed up first; then timing windows run round-robin (gmail_jax, cached,
peer eager per thread count, peer compile ...), one at a time, so each contender has every core
while it runs and all see the same background load. On a shared machine, oversubscribed OpenMP
threads spin: torch at 2 threads can be 10-30x slower than at 1 under load, hence --torch-threads
1,2 (its best is reported). XLA's own pool is not configurable per run.

FLOPs per pair: analytic (bench/common.gmail_step_flops_per_pair; ≈ 3× the ViT forward) and
XLA's ``cost_analysis()`` of the compiled step, reported side by side. MFU = achieved FLOP/s /
the measured matmul peak of this machine (bench/matmul_peak.py) in the same dtype (the best of
n×n matmuls, n in ``--peak-sizes``; on a GPU give 4096,8192). ``device_peak_gib``: the most the JAX
allocator held (GPU/TPU; None on CPU).
XLA:CPU notes (jax 0.10.2, jax.profiler traces of the B/32 step, batch 16; s/step):
  * 5.4 -> 3.0: the LoRA product has its own VJP (models/layers.lora_product). Autodiff's
    dA = x^T (g B^T) contracts x's row axis; XLA:CPU materialised x^T in a copy fusion that also
    recomputed the whole residual-stream chain producing x, so its cost grew with depth
    (12 -> 370 ms per block, 2.3 s in all). dA^T = (g B^T)^T x reads x in place.
  * 3.0 -> 2.85: the last vision block computes the class-token row only (-6.7% FLOPs).
  * 2.85 -> 2.6: each block input (and its cotangent) goes through a loop XLA cannot remove
    (models/clip._materialize), so the residual stream is written once instead of being
    recomputed by every consumer fusion (LayerNorm-backward fusions: 340 -> 50 ms).
  * the rest is matmul time: YNNPACK dots at ~120-180 GFLOP/s for these shapes (M = 800), vs
    ~190 for a 2048² dot. Eigen or oneDNN dots (--xla-flags=--xla_cpu_experimental_ynn_fusion_type=
    [--xla_cpu_experimental_onednn_fusion_type=dot]), fused q/k/v projections, optimization
    barriers (removed by XLA:CPU) and the scheduler/fusion flags changed nothing beyond noise.
  * a stride-p convolution for the patch embedding ran as a YNNPACK fusion at ~13 GFLOP/s;
    models/clip.py patchifies and runs one matmul.
  * +1-2 % pairs/s (jax 0.10.x, AMD): the LoRA A-gradient stays the row-major [r, in] product
    (an optimization barrier; folded, XLA made x the dot's transposed lhs, ~8x slower alone).
    ``bench.step_profile``'s dot floor: the step's dots alone would reach MFU 0.93; the rest is
    element-wise work and dots slowed by what runs beside them (README, CPU MFU).
Input pipeline (``--pipeline``, default ``train``; ``none`` skips it): this config's input pipeline
(its ``data``, the variant's ``image_size``, the step's batch, CLIP tokenizer) over coco-mini
prepared by ``gmail_jax.data.prepare`` per listed store (``train``: the crops, ``resized``: 256 px
short side), with ``--pipeline-workers`` grain workers (default 1) of ``--pipeline-threads`` read
threads; cache off (both images decoded) and, with ``--cached``, a full teacher cache (only the
generated image). Timed in the same round-robin windows (``--pipeline-batches`` batches each, the
prefetched ones drained first). ``pipeline.<store>``: pairs/s and ``over_step`` = pipeline / step
pairs/s (>= 1: it feeds the step); ``gmail_jax_fed_pairs_per_s``: the step fed by the first
store's pipeline (``next`` + ``global_batch`` + step per iteration), as a training loop runs.
Throughput is the best of ``--repeats`` windows of ``--iters`` steps (the machine is shared:
median, spread and every window are reported too). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--variant", default="B/32", help="tiny | B/32 | B/16 | L/14 | L/14-336")
  ap.add_argument("--batch", type=int, default=16, help="global batch (pairs per step)")
  ap.add_argument("--rank", type=int, default=4)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--remat", action="store_true", help="rematerialise blocks (gmail_jax)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=3, help="steps per timed window")
  ap.add_argument("--repeats", type=int, default=3, help="timed windows (best is reported)")
  ap.add_argument("--peer", default="eager,compile", help="peer modes: eager,compile or none")
  ap.add_argument("--torch-threads", default="", help="e.g. 1,2 (default: all cores)")
  ap.add_argument("--cached", action="store_true", help="also time the cached-teacher step")
  ap.add_argument("--gpu", action="store_true", help="peer on cuda; jax on its default backend")
  ap.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax starts")
  ap.add_argument("--peak", default="", help="skip the matmul-peak measurement: FLOP/s value")
  ap.add_argument(
    "--peak-sizes",
    default="1024,2048",
    help="n of the n×n matmuls the peak is the best of (GPU: 4096,8192 reach tensor-core rates)",
  )
  ap.add_argument("--pipeline", default="train", help="prepare stores: train,resized | none")
  ap.add_argument("--pipeline-workers", type=int, default=1, help="grain worker processes")
  ap.add_argument("--pipeline-threads", type=int, default=1, help="read threads per process")
  ap.add_argument("--pipeline-batches", type=int, default=30, help="batches per pipeline window")
  return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# gmail_jax side.
# ---------------------------------------------------------------------------------------------


def gmail_config(args):
  """The training config of the benchmarked step (configs/common.py defaults, peer-matched)."""
  from configs import common as cfg_common

  c = cfg_common.get_base_config()
  c.model.variant = args.variant
  c.model.dtype = args.dtype
  c.model.remat = bool(args.remat)
  c.batch_size = args.batch
  c.lora.rank = args.rank
  c.lora.alpha = float(args.rank)  # PEFT lora_alpha = r -> scale 1
  c.loss.mask_groups = False  # the peer has no group masking
  c.optim.clip_norm = 0.0  # the peer does not clip
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.mesh = {"data": -1, "fsdp": 1}
  return c


class Runner:
  """A warmed-up step: ``window(iters)`` runs ``iters`` steps, syncs once, returns s/step."""

  def __init__(self, name: str, run, sync, before=None, iters: int | None = None):
    self.name, self._run, self._sync, self._before = name, run, sync, before
    self.iters = iters  # iterations per window, instead of --iters
    self.times: list[float] = []

  def window(self, iters: int) -> float:
    iters = self.iters or iters
    if self._before is not None:
      self._before()
    t0 = time.perf_counter()
    r = None
    for _ in range(iters):
      r = self._run()
    self._sync(r)
    dt = (time.perf_counter() - t0) / iters
    self.times.append(dt)
    return dt


def gmail_runners(
  args, workdir: str, feed=None, keep_hlo: bool = False
) -> tuple[list[Runner], dict]:
  """The gmail_jax step (and its cached-teacher variant) built as train.py builds it, warmed up.
  ``feed``: an input-pipeline iterator of this config; adds the step fed by it. ``keep_hlo``:
  ``info["hlo_text"]`` maps each runner to its compiled HLO (bench/step_profile.py)."""
  import jax
  import numpy as np

  from gmail_jax.models import clip as clip_lib
  from gmail_jax.training import build
  from gmail_jax.training import sharding as shd

  config = gmail_config(args)
  cfg = clip_lib.clip_config(args.variant)
  config.data.image_size = cfg.vision.image_size
  mesh = shd.make_mesh(config.mesh)
  info: dict = {"devices": jax.device_count(), "backend": jax.default_backend()}
  ctx = jax.set_mesh(mesh)
  ctx.__enter__()  # the runners execute later, inside the same mesh context
  t0 = time.perf_counter()
  built = build.build(config, mesh)
  state, frozen, rng = built["state"], built["frozen"], built["rng"]
  step = build.make_step(config, built, mesh)
  s = cfg.vision.image_size
  r = np.random.default_rng(0)
  put = lambda v: shd.put_global(v, shd.batch_sharding(mesh))

  def make_batch(i):
    return {
      "gen_image": put(r.integers(0, 256, (args.batch, s, s, 3), dtype=np.uint8)),
      "real_image": put(r.integers(0, 256, (args.batch, s, s, 3), dtype=np.uint8)),
      "group": put(np.arange(args.batch, dtype=np.int32)),
      "real_id": put(np.arange(args.batch, dtype=np.int32) + i * args.batch),
    }

  batches = [make_batch(i) for i in range(2)]
  compiled = step.lower(state, frozen, rng, batches[0]).compile()
  info["compile_s"] = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  info["xla_flops_per_pair"] = float(cost.get("flops", float("nan"))) / args.batch
  mem = compiled.memory_analysis()
  if mem is not None:
    info["temp_bytes"] = int(mem.temp_size_in_bytes)
    # XLA's estimate per device (as bench/memory.py adds it up), next to what the allocator held.
    info["memory_analysis_gib"] = {
      "arguments": mem.argument_size_in_bytes / 2**30,
      "outputs": mem.output_size_in_bytes / 2**30,
      "aliased": mem.alias_size_in_bytes / 2**30,
      "temp": mem.temp_size_in_bytes / 2**30,
      "total": (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
      )
      / 2**30,
    }

  holder = {"state": state, "k": 0}

  def run_one(batch_list):
    holder["k"] += 1
    holder["state"], m = step(holder["state"], frozen, rng, batch_list[holder["k"] % 2])
    return m["loss"]

  sync = lambda x: x.block_until_ready()
  variants = {"gmail_jax": batches}
  if args.cached:
    # Teacher embeddings exactly as the cache delivers them (gmail_jax/training/teacher_cache.py).
    from gmail_jax.training import teacher_cache

    embed = teacher_cache.make_teacher_embed(built["models"], frozen, mesh)
    variants["gmail_jax_cached"] = [
      {k: v for k, v in b.items() if k != "real_image"}
      | {"teacher_emb": put(embed(np.asarray(jax.device_get(b["real_image"]))))}
      for b in batches
    ]
  if keep_hlo:
    compile_for = lambda b: step.lower(state, frozen, rng, b).compile()
    info["hlo_text"] = {
      name: (compiled if bl is batches else compile_for(bl[0])).as_text()
      for name, bl in variants.items()
    }
  runners = []
  for name, bl in variants.items():
    for _ in range(args.warmup):
      loss = run_one(bl)
    info[f"{name}_loss_after_warmup"] = float(loss)
    runners.append(Runner(name, lambda bl=bl: run_one(bl), sync))
  if feed is not None:
    from gmail_jax.data import pipeline

    def run_fed():
      local = {k: v for k, v in next(feed).items() if k in batches[0]}  # text: unused here
      holder["state"], m = step(holder["state"], frozen, rng, pipeline.global_batch(local, mesh))
      return m["loss"]

    for _ in range(args.warmup):
      run_fed()
    runners.append(Runner("gmail_jax_fed", run_fed, sync))
  info["executables"] = step._cache_size()  # 1 per batch signature: no recompiles in the loop
  return runners, info


def pipeline_runners(args, image_size: int, workdir: str) -> tuple[list[Runner], dict, list]:
  """Runners of the input pipeline of the step's config (bench.input_pipeline.step_feeds), one
  batch per iteration; + the iterator that feeds the fed step (first store, cache off), or None,
  and every iterator (to close)."""
  from bench import input_pipeline

  stores = [s for s in args.pipeline.split(",") if s and s != "none"]
  if not stores:
    return [], {}, [None]
  config = gmail_config(args)
  config.data.image_size = image_size
  kw = dict(workers=args.pipeline_workers, threads=args.pipeline_threads, workdir=workdir)
  feeds, info = input_pipeline.step_feeds(config, stores=stores, cached=args.cached, **kw)
  fed, _ = input_pipeline.step_feeds(config, stores=stores[:1], cached=False, **kw)
  runners = []
  for name, it, prefetched in feeds:

    def drain(it=it, n=prefetched):  # each window starts with nothing made in advance
      for _ in range(n):
        next(it)

    runners.append(
      Runner(
        name, lambda it=it: next(it), lambda _: None, before=drain, iters=args.pipeline_batches
      )
    )
  return runners, info, [fed[0][1], *(it for _, it, _ in feeds)]


def peer_runners(args, pcfg, modes: list[str], threads: list[int]) -> tuple[list[Runner], dict]:
  """The torch peer, eager and/or compiled, one runner per (mode, thread count), warmed up."""
  import torch

  from bench import torch_peer as peer_lib

  device = "cuda" if args.gpu else "cpu"
  runners, info = [], {}
  for mode in modes:
    step, make_batch, pinfo = peer_lib.build_peer(pcfg, compile=mode == "compile", device=device)
    batches = [make_batch(i) for i in range(2)]
    k = [0]

    def run(step=step, batches=batches, k=k):
      k[0] += 1
      return step(*batches[k[0] % 2])

    sync = (lambda r: (torch.cuda.synchronize(), r.item())) if args.gpu else (lambda r: r.item())
    torch.set_num_threads(max(threads))
    t0 = time.perf_counter()
    for _ in range(args.warmup + (1 if mode == "compile" else 0)):
      loss = run()
    info[f"{mode}_warmup_s"] = time.perf_counter() - t0
    info[f"{mode}_loss_after_warmup"] = float(loss.item())
    info.update(pinfo)
    for th in threads:
      runners.append(
        Runner(f"peer_{mode}_t{th}", run, sync, before=lambda th=th: torch.set_num_threads(th))
      )
  return runners, info


def peer_config(variant: str, *, batch: int, rank: int, dtype: str):
  """The PyTorch + PEFT peer (bench/torch_peer.py) of the gmail_jax step on ``variant``."""
  from bench import torch_peer as peer_lib
  from gmail_jax.models import clip as clip_lib

  cfg = clip_lib.clip_config(variant)
  v = cfg.vision
  return peer_lib.PeerConfig(
    image_size=v.image_size,
    patch_size=v.patch_size,
    width=v.width,
    layers=v.layers,
    heads=v.heads,
    mlp_dim=v.mlp_dim,
    embed_dim=cfg.embed_dim,
    batch=batch,
    rank=rank,
    alpha=float(rank),
    dtype=dtype,
    act=v.act,
  )


def vit_dims(variant: str, rank: int) -> dict:
  """``common.vit_forward_flops`` keyword arguments of ``variant``'s vision tower."""
  from gmail_jax.models import clip as clip_lib

  cfg = clip_lib.clip_config(variant)
  v = cfg.vision
  return dict(
    image_size=v.image_size,
    patch_size=v.patch_size,
    width=v.width,
    layers=v.layers,
    mlp_dim=v.mlp_dim,
    embed_dim=cfg.embed_dim,
    lora_rank=rank,
  )


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  if not args.gpu:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import tempfile

  from bench import common, matmul_peak
  from gmail_jax.models import clip as clip_lib

  v = clip_lib.clip_config(args.variant).vision
  vit = vit_dims(args.variant, args.rank)
  # gmail_jax computes only the class-token row of the last block; the HF peer computes all rows.
  flops = common.gmail_step_flops_per_pair(**vit, pooled_last_block=True)
  peer_flops = common.gmail_step_flops_per_pair(**vit)
  result: dict = {
    "variant": args.variant,
    "batch": args.batch,
    "rank": args.rank,
    "dtype": args.dtype,
    "image_size": v.image_size,
    "remat": bool(args.remat),
    "cpu_count": common.cpu_count(),
    "load_average_1m_start": common.load_average(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }

  # Build and warm up everything first, then time windows round-robin (gmail_jax, peer eager,
  # peer compile, ...) so every contender sees the same background load; best window wins.
  modes = [m for m in args.peer.split(",") if m and m != "none"]
  threads = [int(t) for t in args.torch_threads.split(",") if t] or [common.cpu_count()]
  pcfg = peer_config(args.variant, batch=args.batch, rank=args.rank, dtype=args.dtype)
  peak_sizes = tuple(int(n) for n in args.peak_sizes.split(","))
  peak_start = (
    0.0
    if args.peak
    else matmul_peak.jax_matmul_peak(args.dtype, peak_sizes, repeats=5)["peak_flops"]
  )
  data_dir = tempfile.TemporaryDirectory()
  pl_runners, pl_info, iterators = pipeline_runners(args, v.image_size, data_dir.name)
  with tempfile.TemporaryDirectory() as wd:
    g_runners, g_info = gmail_runners(args, wd, feed=iterators[0])
  print(f"gmail_jax built: {g_info}", file=sys.stderr, flush=True)
  p_runners, p_info = peer_runners(args, pcfg, modes, threads) if modes else ([], {})
  print(f"peer built: {p_info}", file=sys.stderr, flush=True)
  runners = g_runners + pl_runners + p_runners
  for rep in range(args.repeats):
    for r in runners:
      dt = r.window(args.iters)
      print(f"[{rep}] {r.name}: {dt:.3f} s/step", file=sys.stderr, flush=True)
  stats = {
    r.name: {
      "pairs_per_s": args.batch / min(r.times),
      "best_s": min(r.times),
      "median_s": statistics.median(r.times),
      "spread": max(r.times) / min(r.times) - 1,
    }
    for r in runners
  }
  peer = {}
  for mode in modes:
    mine = {n: st for n, st in stats.items() if n.startswith(f"peer_{mode}_")}
    best_name = max(mine, key=lambda n: mine[n]["pairs_per_s"])
    peer[mode] = {**mine[best_name], "threads": int(best_name.rsplit("_t", 1)[1])}
  g = {**g_info, **stats["gmail_jax"]}
  # What the allocator held at most (weights, state, batches, temporaries; None on CPU). Read
  # before the second peak measurement, whose matrices would otherwise count.
  peak_bytes = common.jax_peak_bytes()
  g["device_peak_gib"] = peak_bytes / 2**30 if peak_bytes is not None else None
  if args.gpu and modes:
    import torch

    p_info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
  if "gmail_jax_cached" in stats:
    g["cached_pairs_per_s"] = stats["gmail_jax_cached"]["pairs_per_s"]
    g["cached"] = stats["gmail_jax_cached"]
  for it in iterators:
    if it is not None:
      it.close()
  data_dir.cleanup()
  pipe = dict(pl_info)  # pipeline pairs/s next to the step's (cached: next to the cached step's)
  for name in (r.name for r in pl_runners):
    store, cached = name.removeprefix("pipeline_").removesuffix("_cached"), name.endswith("_cached")
    step_name, key = ("gmail_jax_cached", "cached_") if cached else ("gmail_jax", "")
    pipe[store][f"{key}pairs_per_s"] = stats[name]["pairs_per_s"]
    pipe[store][f"{key}median_pairs_per_s"] = args.batch / stats[name]["median_s"]
    pipe[store][f"{key}over_step"] = stats[name]["pairs_per_s"] / stats[step_name]["pairs_per_s"]

  # 3. Peak and MFU.
  # The peak is the best matmul rate ever observed in this run (measured before and after the
  # step windows): on a loaded machine one measurement can land in a bad moment.
  if args.peak:
    peak = float(args.peak)
  else:
    peak = max(peak_start, matmul_peak.jax_matmul_peak(args.dtype, peak_sizes)["peak_flops"])
  achieved = g["pairs_per_s"] * flops["total"]
  peer_best = max(peer.values(), key=lambda x: x["pairs_per_s"]) if peer else None
  result.update(
    gmail_jax_pairs_per_s=g["pairs_per_s"],
    peer_pairs_per_s=peer_best["pairs_per_s"] if peer_best else None,
    peer_eager_pairs_per_s=peer.get("eager", {}).get("pairs_per_s"),
    peer_compile_pairs_per_s=peer.get("compile", {}).get("pairs_per_s"),
    ratio=g["pairs_per_s"] / peer_best["pairs_per_s"] if peer_best else None,
    flops_per_pair=flops["total"],
    flops_per_pair_xla=g["xla_flops_per_pair"],
    flops_breakdown=flops,
    achieved_flops=achieved,
    matmul_peak_flops=peak,
    matmul_peak_sizes=list(peak_sizes),
    device_peak_gib=g["device_peak_gib"],
    mfu=achieved / peak,
    peer_flops_per_pair=peer_flops["total"],
    peer_mfu=peer_best["pairs_per_s"] * peer_flops["total"] / peak if peer_best else None,
    gmail_jax=g,
    pipeline=pipe or None,
    gmail_jax_fed_pairs_per_s=stats.get("gmail_jax_fed", {}).get("pairs_per_s"),
    peer=peer,
    peer_info=p_info,
    windows={r.name: r.times for r in runners},
    load_average_1m_end=common.load_average(),
  )
  if "cached_pairs_per_s" in g:
    result.update(
      gmail_jax_cached_pairs_per_s=g["cached_pairs_per_s"],
      cache_speedup=g["cached_pairs_per_s"] / g["pairs_per_s"],
      cached_mfu=g["cached_pairs_per_s"] * flops["total_cached_teacher"] / peak,
    )
  common.emit(result)


if __name__ == "__main__":
  main()
