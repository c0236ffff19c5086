"""Retrieval Recall@K wall time: ``evaluators.retrieval.recall_at_k`` on random embeddings.

    .venv/bin/python -m bench.retrieval [--images 5000 --captions_per_image 5 --dim 512]

COCO-5k sized by default: 5k images × 25k captions (5 per image, shuffled), L2-normalised float32
Gaussian embeddings, ks = 1, 5, 10. One warm-up call (jit compile), then ``--repeats`` timed calls
(host arrays in, Python floats out); reports the median and best, and the score matmul's share
(2·Ni·Nt·D FLOPs) at the measured time. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from bench import common  # noqa: E402


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=5000)
  p.add_argument("--captions_per_image", type=int, default=5)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args(argv)

  from gmail_jax.evaluators import retrieval

  rng = np.random.default_rng(0)
  img = rng.normal(size=(a.images, a.dim)).astype(np.float32)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  t2i = rng.permutation(np.repeat(np.arange(a.images), a.captions_per_image))
  txt = img[t2i] + rng.normal(scale=0.08, size=(len(t2i), a.dim)).astype(np.float32)  # noisy match
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)

  def call():
    return retrieval.recall_at_k(img, txt, t2i, (1, 5, 10), chunk=a.chunk)

  recall = call()  # compile
  times = []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  flops = 2.0 * a.images * len(t2i) * a.dim
  common.emit(
    {
      "bench": "retrieval",
      "images": a.images,
      "captions": len(t2i),
      "dim": a.dim,
      "chunk": a.chunk,
      "median_s": round(statistics.median(times), 3),
      "best_s": round(min(times), 3),
      "times_s": [round(t, 3) for t in times],
      "matmul_gflop": flops / 1e9,
      "gflops_at_median": round(flops / statistics.median(times) / 1e9, 1),
      "recall": {k: round(v, 4) for k, v in recall.items()},
      "cpu_count": os.cpu_count(),
      "cpu_affinity": common.cpu_count(),
      "load_average": common.load_average(),
    }
  )


if __name__ == "__main__":
  main()
