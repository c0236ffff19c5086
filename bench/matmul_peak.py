"""Measured matmul peak of this machine (the denominator of MFU).

    python -m bench.matmul_peak [--sizes 1024,2048,4096] [--dtypes float32,bfloat16] [--torch]

For each dtype: a jitted ``jnp.dot`` of two n×n matrices for several n, each timed as the best of
several windows (2·n³ FLOPs per call); the peak is the best over sizes. On a shared CPU the best
window is the least-disturbed one, so best-of is the right statistic for a *peak*.
Prints JSON: {"jax": {"float32": {"peak_flops": ..., "by_size": {...}}, ...}, "torch": ...}.
"""

from __future__ import annotations

import argparse

from bench import common


def jax_matmul_peak(
  dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5
) -> dict:
  """Best FLOP/s of a jitted n×n @ n×n matmul on jax's default device, over sizes and repeats."""
  import jax
  import jax.numpy as jnp

  by_size = {}
  f = jax.jit(jnp.dot)
  for n in sizes:
    ka, kb = jax.random.split(jax.random.key(n))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    best = common.best_call_seconds(
      lambda a=a, b=b: f(a, b), lambda r: r.block_until_ready(), window_s=0.2, repeats=repeats
    )
    by_size[str(n)] = 2.0 * n**3 / best
  return {"peak_flops": max(by_size.values()), "by_size": by_size, "device": str(jax.devices()[0])}


def torch_matmul_peak(
  dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5
) -> dict:
  """Same measurement with ``torch.mm`` under torch's current thread setting."""
  import torch

  tdtype = getattr(torch, dtype)
  by_size = {}
  for n in sizes:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g).to(tdtype)
    b = torch.randn(n, n, generator=g).to(tdtype)
    best = common.best_call_seconds(
      lambda a=a, b=b: torch.mm(a, b), lambda r: r, window_s=0.2, repeats=repeats
    )
    by_size[str(n)] = 2.0 * n**3 / best
  return {
    "peak_flops": max(by_size.values()),
    "by_size": by_size,
    "threads": torch.get_num_threads(),
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--sizes", default="1024,2048,4096")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--torch", action="store_true", help="also measure torch.mm")
  args = ap.parse_args()
  sizes = tuple(int(s) for s in args.sizes.split(","))
  dtypes = args.dtypes.split(",")
  out = {"cpu_count": common.cpu_count(), "load_average_1m": common.load_average()}
  out["jax"] = {d: jax_matmul_peak(d, sizes, args.repeats) for d in dtypes}
  if args.torch:
    import torch

    torch.set_num_threads(common.cpu_count())
    out["torch"] = {d: torch_matmul_peak(d, sizes, args.repeats) for d in dtypes}
  common.emit(out)


if __name__ == "__main__":
  main()
