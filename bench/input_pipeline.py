"""Input-pipeline throughput: pairs/s of read + decode + crop (+ tokenize), per core.

  .venv/bin/python -m bench.input_pipeline --dataset=coco --source=array_record \\
      --store=resized,train --cache=off,on --workers=0,1,2
  .venv/bin/python -m bench.input_pipeline --dataset=coco --workers=0 --read_threads=2   # threads

``coco``: a manifest over coco-mini (239 COCO photos, ~640 px; generated := another photo) written
to a temp dir; ``cifake``: the CIFAKE sample as class folders (32 px, upsampled). ``--source``:
``raw`` reads those files; ``array_record`` first runs ``gmail_jax.data.prepare`` on them into the
temp dir once per ``--store`` (``resized``: ``--resize_short``, ``--quality``; ``train``: the
``--image_size`` crops; not timed) and reads the shards. ``--cache``: ``off`` decodes both images
of a pair; ``on`` passes the pipeline a full teacher cache (``cached_real``), so only the
generated image is decoded (its figure is generated images/s). ``--workers`` lists grain worker
process counts to time (0 = the main process with ``--read_threads`` threads). The first
``--warmup`` batches are not timed: worker start-up, and what was decoded in advance meanwhile
(up to ``2 * prefetch`` batches per worker: its read-thread buffer and its output buffer), which
would flatter a window; then ``--repeats`` windows of ``--batches`` batches each, best and median
reported.

Per core, two ways: ``pairs_per_s_per_core`` divides wall-clock pairs/s by the cores the decoding
can use (min(affinity, workers) with workers, min(affinity, read_threads) without);
``pairs_per_cpu_s`` divides pairs by the CPU seconds the pipeline's processes (main + workers)
spent in the window, which a loaded machine does not deflate (the wall figure can only be as good
as the share of a core the scheduler gives). ``exactness`` (coco, array_record): per store, how far
the crops training gets are from CLIPImageProcessor's crops of the original files (|diff| in
0..255 over every pixel of every real image: mean, max, worst image's mean). The load average is
recorded before and after. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (google/grain#1355)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from gmail_jax.data import pipeline, prepare  # noqa: E402
from gmail_jax.data.config import default_data_config  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def coco_manifest(out: pathlib.Path) -> pathlib.Path:
  coco = SHARED / "coco-mini"
  rows = []
  for split in ("train2017", "val2017"):
    files = sorted((coco / split).glob("*.jpg"))
    for i, f in enumerate(files):
      rows.append(
        {"caption": f"photo {f.stem}", "real_path": str(f), "gen_path": str(files[i - 1])}
      )
  path = out / "coco.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def cores_used(workers: int, read_threads: int) -> int:
  return max(1, min(common.cpu_count(), workers if workers > 0 else read_threads))


def cpu_seconds() -> float:
  """CPU time (user + system) of this process and its live children (grain's workers)."""
  import psutil

  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:  # exited meanwhile
      pass
  return total


def full_cache_mask(config) -> np.ndarray:
  """``cached_real`` of a teacher cache holding every real image of the source."""
  from gmail_jax.data.sources import make_source

  source = make_source(config.data, seed=int(config.seed), primary=False)
  n = len(source.real_files) if hasattr(source, "real_files") else int(np.max(source.real_id)) + 1
  return np.ones((n,), bool)


def run(
  config, tokenizer, workers: int, batches: int, warmup: int, repeats: int, workdir: str, cached
) -> dict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.num_workers = workers
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(
    config, tokenizer=tokenizer, workdir=workdir, cached_real=cached
  )
  for _ in range(warmup):
    next(it)
  startup = time.perf_counter() - t0
  walls, cpus, pairs = [], [], 0
  for _ in range(repeats):
    c1, t1 = cpu_seconds(), time.perf_counter()
    pairs = 0
    for _ in range(batches):
      b = next(it)
      pairs += b["gen_image"].shape[0]
    walls.append(time.perf_counter() - t1)
    cpus.append(cpu_seconds() - c1)
  decoded_real = "real_image" in b
  it.close()
  cores = cores_used(workers, config.data.read_threads)
  rates = [pairs / w for w in walls]
  return {
    "workers": workers,
    "read_threads": config.data.read_threads,
    "real_images_decoded": decoded_real,
    "pairs_per_window": pairs,
    "windows_s": [round(w, 3) for w in walls],
    "pairs_per_s": round(max(rates), 1),
    "pairs_per_s_median": round(statistics.median(rates), 1),
    "cores": cores,
    "pairs_per_s_per_core": round(max(rates) / cores, 1),
    "pairs_per_s_per_core_median": round(statistics.median(rates) / cores, 1),
    "cpu_s_per_window": [round(c, 3) for c in cpus],
    # None: a window too short for the CPU clock (10 ms ticks) to see
    "pairs_per_cpu_s": round(pairs / min(cpus), 1) if min(cpus) > 0 else None,
    "pairs_per_cpu_s_median": (
      round(pairs / statistics.median(cpus), 1) if statistics.median(cpus) > 0 else None
    ),
    "startup_s": round(startup, 2),
  }


def exactness(out: str, image_size: int) -> dict:
  """|diff| of the train-time crops of every real image in ``out`` vs the exact crops of the
  original files (CLIPImageProcessor's resize + centre crop of a full decode)."""
  from gmail_jax.data.images import decode_image
  from gmail_jax.data.preprocess import resize_center_crop
  from gmail_jax.data.sources import ArrayRecordSource

  source = ArrayRecordSource(out, gens_per_caption=0)
  seen, means, worst = set(), [], 0
  for i in range(len(source)):
    pair = source.get(i, 0)
    path = pair.real_name.rsplit(":", 1)[1]
    if path in seen:
      continue
    seen.add(path)
    with open(path, "rb") as f:
      exact = resize_center_crop(decode_image(f.read(), path), image_size)
    got = decode_image(pair.real, pair.real_name)
    got = np.asarray(got) if source.stored_crop else resize_center_crop(got, image_size)
    diff = np.abs(got.astype(np.int16) - exact)
    means.append(float(diff.mean()))
    worst = max(worst, int(diff.max()))
  return {
    "images": len(means),
    "mean_abs_diff": round(float(np.mean(means)), 3),
    "max_abs_diff": worst,
    "worst_image_mean_abs_diff": round(max(means), 3),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--dataset", default="coco", choices=["coco", "cifake"])
  p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--batches", type=int, default=30, help="batches per timed window")
  p.add_argument("--repeats", type=int, default=3, help="timed windows per configuration")
  p.add_argument("--warmup", type=int, default=12, help=">= 2 * prefetch * workers")
  p.add_argument("--read_threads", type=int, default=1)
  p.add_argument("--tokenize", type=int, default=1)
  p.add_argument("--augment", type=int, default=0, help="random resized crop of generated images")
  p.add_argument("--source", default="raw", choices=["raw", "array_record"])
  p.add_argument("--store", default="resized", help="array_record: resized,train (comma list)")
  p.add_argument("--cache", default="off", help="off,on: teacher cache off / full (comma list)")
  p.add_argument("--resize_short", type=int, default=prepare.DEFAULT_RESIZE_SHORT)
  p.add_argument("--quality", type=int, default=None, help="default: prepare's per store")
  a = p.parse_args(argv)
  stores = [s for s in a.store.split(",") if s] if a.source == "array_record" else [None]
  caches = [c == "on" for c in a.cache.split(",") if c]
  load_start = common.load_average()

  with tempfile.TemporaryDirectory() as tmp:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = a.batch_size
    config.data = default_data_config()
    config.data.image_size = a.image_size
    config.data.read_threads = a.read_threads
    config.data.augment_generated = bool(a.augment)
    if a.dataset == "coco":
      config.data.source = "manifest"
      config.data.manifest = str(coco_manifest(pathlib.Path(tmp)))
    else:
      config.data.source = "class_folders"
      config.data.root = str(SHARED / "cifake-sd14-test-sample")
    tokenizer = None
    if a.tokenize:
      from gmail_jax.models.tokenizer import Tokenizer

      tokenizer = Tokenizer()
    results, prepared = [], {}
    for store in stores:
      cfg = ml_collections.ConfigDict(config.to_dict())
      if store is not None:
        src = config.data.manifest if a.dataset == "coco" else config.data.root
        out = os.path.join(tmp, f"shards-{store}")
        meta = prepare.prepare(
          src,
          out,
          resize_short=a.resize_short,
          quality=a.quality,
          store=store,
          image_size=a.image_size,
        )
        cfg.data.source, cfg.data.root = "array_record", out
        prepared[store] = {k: meta.get(k) for k in ("resize_short", "quality", "image_size")}
        prepared[store]["seconds"] = meta["seconds"]
        prepared[store]["bytes"] = sum(
          f.stat().st_size for f in pathlib.Path(out).glob("*.array_record")
        )
        if a.dataset == "coco":
          prepared[store]["exactness"] = exactness(out, a.image_size)
        print(f"prepared {store}: {prepared[store]}", file=sys.stderr)
      for cached in caches:
        mask = full_cache_mask(cfg) if cached else None
        for w in (int(x) for x in a.workers.split(",")):
          r = run(cfg, tokenizer, w, a.batches, a.warmup, a.repeats, tmp, mask)
          r = {"store": store, "cache": "on" if cached else "off", **r}
          print(
            f"store={store} cache={r['cache']} workers={w}: {r['pairs_per_s_per_core']} pairs/s"
            f" per core (wall), {r['pairs_per_cpu_s']} per CPU s",
            file=sys.stderr,
          )
          results.append(r)
  print(
    json.dumps(
      {
        "bench": "input_pipeline",
        "dataset": a.dataset,
        "source": a.source,
        "prepared": prepared or None,
        "image_size": a.image_size,
        "batch_size": a.batch_size,
        "read_threads": a.read_threads,
        "tokenize": bool(a.tokenize),
        "augment_generated": bool(a.augment),
        "cpu_count": {"os": os.cpu_count(), "affinity": common.cpu_count()},
        "load_average": load_start,
        "load_average_end": common.load_average(),
        "results": results,
      }
    )
  )


if __name__ == "__main__":
  main()


def step_feeds(
  config, *, stores: list[str], workers: int, threads: int, cached: bool, workdir: str
) -> tuple[list[tuple[str, object, int]], dict]:
  """Input pipelines of a training ``config`` (its ``data``, ``image_size`` and ``batch_size``)
  over coco-mini prepared per store in ``workdir``, for bench/train_step.py: a list of
  ``(name, iterator, prefetched batches)`` (``pipeline_<store>``, + ``pipeline_<store>_cached``
  with a full teacher cache when ``cached``), started and warmed up, and what was prepared."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.num_workers, config.data.read_threads = workers, threads
  manifest = str(coco_manifest(pathlib.Path(workdir)))
  from gmail_jax.models.tokenizer import Tokenizer

  tokenizer = Tokenizer()
  feeds, info = [], {"dataset": "coco-mini", "workers": workers, "read_threads": threads}
  for store in stores:
    out = os.path.join(workdir, f"shards-{store}")
    meta = prepare.prepare(manifest, out, store=store, image_size=config.data.image_size)
    info[store] = {"records": meta["num_records"], "quality": meta["quality"]}
    config.data.source, config.data.root = "array_record", out
    for suffix, mask in (("", None), ("_cached", full_cache_mask(config) if cached else None)):
      if suffix and mask is None:
        continue
      it = pipeline.make_train_iterator(
        config, tokenizer=tokenizer, workdir=workdir, cached_real=mask
      )
      for _ in range(3):  # worker start-up
        next(it)
      # batches made in advance: each worker's read-thread buffer + output buffer
      ahead = 2 * config.data.prefetch * max(1, workers)
      feeds.append((f"pipeline_{store}{suffix}", it, ahead))
  return feeds, info
