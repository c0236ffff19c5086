"""Input-pipeline throughput: pairs/s of read + decode + resize_center_crop (+ tokenize).

  .venv/bin/python bench/input_pipeline.py --dataset=coco --workers=1,2 --image_size=224

``coco``: a manifest over coco-mini (239 COCO photos, ~640 px; generated := another photo) written
to a temp dir; ``cifake``: the CIFAKE sample as class folders (32 px, upsampled). ``--workers``
lists grain worker-process counts to time (0 = main process with ``--read_threads`` threads).
The first ``--warmup`` batches (worker start-up) are not timed. Last stdout line: JSON.
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

from gmail_jax.data import pipeline  # noqa: E402
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
  return {
    "workers": workers,
    "pairs": pairs,
    "seconds": round(t2 - t1, 3),
    "pairs_per_s": round(pairs / (t2 - t1), 1),
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
        "image_size": a.image_size,
        "batch_size": a.batch_size,
        "read_threads": a.read_threads,
        "tokenize": bool(a.tokenize),
        "cpu_count": os.cpu_count(),
        "results": results,
      }
    )
  )


if __name__ == "__main__":
  main()
