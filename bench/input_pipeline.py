"""Input-pipeline throughput: pairs/s of read + decode + resize_center_crop (+ tokenize).

  .venv/bin/python -m bench.input_pipeline --dataset=coco --workers=0,1,2 --image_size=224
  .venv/bin/python -m bench.input_pipeline --dataset=coco --source=array_record --resize_short=256

``coco``: a manifest over coco-mini (239 COCO photos, ~640 px; generated := another photo) written
to a temp dir; ``cifake``: the CIFAKE sample as class folders (32 px, upsampled). ``--source``:
``raw`` reads those files; ``array_record`` first runs ``gmail_jax.data.prepare`` on them into the
temp dir (``--resize_short``, ``--quality``; 0 keeps the original bytes; not timed) and reads the
shards. ``--workers`` lists grain worker-process counts to time (0 = main process with
``--read_threads`` threads). The first ``--warmup`` batches (worker start-up) are not timed.
``pairs_per_s_per_core`` divides by the cores the decoding can use: min(affinity, workers) with
workers (the main process only collates), min(affinity, read_threads) without. Last stdout line:
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (google/grain#1355)

import ml_collections  # noqa: E402

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


def run(config, tokenizer, workers: int, batches: int, warmup: int, workdir: str) -> dict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.num_workers = workers
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(config, tokenizer=tokenizer, workdir=workdir)
  for _ in range(warmup):
    next(it)
  t1 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  t2 = time.perf_counter()
  it.close()
  pairs = batches * b["gen_image"].shape[0]
  cores = cores_used(workers, config.data.read_threads)
  return {
    "workers": workers,
    "pairs": pairs,
    "seconds": round(t2 - t1, 3),
    "pairs_per_s": round(pairs / (t2 - t1), 1),
    "cores": cores,
    "pairs_per_s_per_core": round(pairs / (t2 - t1) / cores, 1),
    "startup_s": round(t1 - t0, 2),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--dataset", default="coco", choices=["coco", "cifake"])
  p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--batches", type=int, default=12)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--read_threads", type=int, default=1)
  p.add_argument("--tokenize", type=int, default=1)
  p.add_argument("--source", default="raw", choices=["raw", "array_record"])
  p.add_argument("--resize_short", type=int, default=prepare.DEFAULT_RESIZE_SHORT)
  p.add_argument("--quality", type=int, default=prepare.DEFAULT_QUALITY)
  a = p.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = a.batch_size
    config.data = default_data_config()
    config.data.image_size = a.image_size
    config.data.read_threads = a.read_threads
    if a.dataset == "coco":
      config.data.source = "manifest"
      config.data.manifest = str(coco_manifest(pathlib.Path(tmp)))
    else:
      config.data.source = "class_folders"
      config.data.root = str(SHARED / "cifake-sd14-test-sample")
    prepared = None
    if a.source == "array_record":
      src = config.data.manifest if a.dataset == "coco" else config.data.root
      out = os.path.join(tmp, "shards")
      prepared = prepare.prepare(src, out, resize_short=a.resize_short, quality=a.quality)
      config.data.source, config.data.root = "array_record", out
      print(f"prepared {prepared['num_records']} pairs in {prepared['seconds']} s", file=sys.stderr)
    tokenizer = None
    if a.tokenize:
      from gmail_jax.models.tokenizer import Tokenizer

      tokenizer = Tokenizer()
    results = []
    for w in (int(x) for x in a.workers.split(",")):
      r = run(config, tokenizer, w, a.batches, a.warmup, tmp)
      print(f"workers={w}: {r['pairs_per_s']} pairs/s", file=sys.stderr)
      results.append(r)
  print(
    json.dumps(
      {
        "bench": "input_pipeline",
        "dataset": a.dataset,
        "source": a.source,
        "resize_short": a.resize_short if a.source == "array_record" else None,
        "quality": a.quality if a.source == "array_record" and a.resize_short else None,
        "image_size": a.image_size,
        "batch_size": a.batch_size,
        "read_threads": a.read_threads,
        "tokenize": bool(a.tokenize),
        "cpu_count": {"os": os.cpu_count(), "affinity": common.cpu_count()},
        "load_average": common.load_average(),
        "results": results,
      }
    )
  )


if __name__ == "__main__":
  main()
