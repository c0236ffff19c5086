r"""Where a compiled step's time goes: matmuls (with their FLOPs and rate) vs everything else.

    python -m bench.step_profile --variant B/32 --batch 16            # the bench.train_step step
    python -m bench.step_profile --variant B/32 --batch 16 --cached   # ... with the teacher cache

Builds the GMAIL step exactly as ``bench.train_step`` does, warms it up, then traces ``--iters``
steps with ``jax.profiler`` and joins the trace with the compiled HLO: every traced op that is an
HLO instruction is a *matmul* when it computes a dot (a YNNPACK/oneDNN fusion around one, or a
bare dot; its FLOPs are 2 x output elements x contracted size, read from the HLO; its time
includes whatever XLA fused around the dot: a bias, an activation, a softmax) and *other*
otherwise (element-wise fusions, transposes, copies, reductions). XLA:CPU may run independent ops
side by side on its threads, so the step's wall time is split by what was running at each instant:

  matmul_alone_ms     one matmul, nothing else
  matmul_overlap_ms   a matmul beside another op (two matmuls share the cores: each runs slower)
  other_only_ms       no matmul, only other ops
  idle_ms             nothing traced (dispatch, synchronisation, the OS taking the core)

``matmul_ideal_ms`` is the step's dot FLOPs at ``--peak`` (or the measured n x n matmul peak):
what the step would take if it were nothing but dots at that rate (``mfu``: ideal / step).
``matmuls`` groups dots by shape (calls per step, ms per step, median rate); ``other_ops``: the
12 other op kinds (the HLO name without its number) with the most op time per step. Ops side by
side each count their own time, so these sums can exceed the wall time. Prints one JSON object;
``--trace DIR`` keeps the trace for TensorBoard / Perfetto. Written for XLA:CPU, whose trace names
each op by its HLO instruction (checked there only); a GPU trace may name kernels instead, and then
the join finds no op and says so.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import shutil
import statistics
import tempfile

# `%name = f32[800,768]{1,0} op(...)`; XLA prints the leading % in some versions only.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_SPANS = ("matmul_alone", "matmul_overlap", "other_only", "idle")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def matmul_flops(hlo_text: str) -> dict[str, float]:
  """FLOPs of every op of an HLO module's text that computes a dot: a bare ``dot`` (2 x output
  elements x contracted size) or a fusion whose computation contains dots."""
  shapes: dict[str, list[int]] = {}
  dots: list[tuple[str, str, list[int], str]] = []  # (computation, name, output dims, rest)
  fusions: list[tuple[str, str]] = []  # (fusion name, called computation)
  computation = ""
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      computation = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, _, dims, op, rest = m.groups()
    shapes[name] = _dims(dims)
    if op == "dot":
      dots.append((computation, name, _dims(dims), rest))
    elif op == "fusion" and (c := _CALLS.search(rest)):
      fusions.append((name, c.group(1)))
  per_computation: collections.Counter[str] = collections.Counter()
  flops: dict[str, float] = {}
  fused = {called for _, called in fusions}
  for computation, name, out, rest in dots:
    lhs = rest.split(",", 1)[0].strip().lstrip("%")
    contracting = _CONTRACTING.search(rest)
    k = 1
    for d in _dims(contracting.group(1)) if contracting else []:
      k *= shapes[lhs][d]
    n = 1
    for d in out:
      n *= d
    per_computation[computation] += 2.0 * n * k
    if computation not in fused:  # a dot of its own, not one inside a fusion's computation
      flops[name] = 2.0 * n * k
  for name, called in fusions:
    if per_computation[called]:
      flops[name] = float(per_computation[called])
  return flops


def trace_events(trace_dir: str | os.PathLike) -> list[dict]:
  """Complete events (``ph == "X"``: name, ts, dur in µs) of the Perfetto trace that
  ``jax.profiler.trace(..., create_perfetto_trace=True)`` wrote under ``trace_dir``."""
  found = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
  if not found:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(found[-1], "rt") as f:
    return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def breakdown(
  events: list[dict], flops: dict[str, float], instructions: set[str], steps: int, peak: float
) -> dict:
  """Split the traced ops' wall time per step by what ran at each instant (module docstring)."""
  ops = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e["name"] in instructions]
  if not ops:
    raise ValueError("the trace holds no op of the compiled step")
  edges = sorted([(a, 1, n in flops) for a, _, n in ops] + [(b, -1, n in flops) for _, b, n in ops])
  running = {True: 0, False: 0}  # matmuls, other ops
  spans: collections.Counter[str] = collections.Counter()
  last = edges[0][0]
  for t, delta, is_matmul in edges:
    mm, other = running[True], running[False]
    if mm:
      kind = "matmul_alone" if mm == 1 and not other else "matmul_overlap"
    else:
      kind = "other_only" if other else "idle"
    spans[kind] += t - last
    running[is_matmul] += delta
    last = t
  per_step = lambda us: us / 1e3 / steps  # µs in the window -> ms per step
  total_flops = sum(flops.get(n, 0.0) for _, _, n in ops) / steps
  step_ms = per_step(max(b for _, b, _ in ops) - min(a for a, _, _ in ops))
  by_shape: dict[float, list[float]] = collections.defaultdict(list)
  other: collections.Counter[str] = collections.Counter()
  for a, b, n in ops:
    if n in flops:
      by_shape[flops[n]].append(b - a)
    else:
      other[re.sub(r"\.\d+$", "", n)] += b - a
  matmuls = [
    {
      "gflop": f / 1e9,
      "calls_per_step": len(ds) / steps,
      "ms_per_step": per_step(sum(ds)),
      "median_gflop_per_s": f / (statistics.median(ds) / 1e6) / 1e9,
    }
    for f, ds in sorted(by_shape.items(), key=lambda kv: -sum(kv[1]))
  ]
  return {
    "step_ms": step_ms,
    "matmul_gflop_per_step": total_flops / 1e9,
    "matmul_ideal_ms": total_flops / peak * 1e3,
    "mfu": total_flops / peak * 1e3 / step_ms,  # the dots' FLOPs at the traced rate, over the peak
    **{f"{k}_ms": per_step(spans[k]) for k in _SPANS},
    "matmuls": matmuls,
    "other_ops": {k: per_step(v) for k, v in other.most_common(12)},
  }


def hlo_instructions(hlo_text: str) -> set[str]:
  """Names of every instruction in an HLO module's text."""
  return {m.group(1) for line in hlo_text.splitlines() if (m := _INSTR.match(line))}


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--variant", default="B/32")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--cached", action="store_true", help="profile the cached-teacher step")
  ap.add_argument("--iters", type=int, default=3, help="steps traced")
  ap.add_argument("--peak", type=float, default=0.0, help="FLOP/s (default: measured)")
  ap.add_argument("--trace", default="", help="keep the trace in this folder")
  return ap.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from bench import common, matmul_peak
  from bench import train_step as ts

  step_args = ts.parse_args(
    [f"--variant={args.variant}", f"--batch={args.batch}", "--peer=none", "--pipeline=none"]
    + (["--cached"] if args.cached else [])
  )
  with tempfile.TemporaryDirectory() as wd:
    runners, info = ts.gmail_runners(step_args, wd, keep_hlo=True)
  runner = {r.name: r for r in runners}["gmail_jax_cached" if args.cached else "gmail_jax"]
  runner.window(args.iters)  # warm: the trace should hold steady-state steps only
  sizes = tuple(int(n) for n in step_args.peak_sizes.split(","))  # bench.train_step's
  peak = args.peak or matmul_peak.jax_matmul_peak(step_args.dtype, sizes)["peak_flops"]
  trace_dir = args.trace or tempfile.mkdtemp(prefix="step_profile-")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    seconds = runner.window(args.iters)
  events = trace_events(trace_dir)
  if not args.trace:
    shutil.rmtree(trace_dir)
  hlo = info.pop("hlo_text")[runner.name]
  result = {
    "variant": args.variant,
    "batch": args.batch,
    "step": runner.name,
    "cpu_count": common.cpu_count(),
    "load_average_1m": common.load_average(),
    "s_per_step_traced": seconds,
    "matmul_peak_flops": peak,
    "trace_dir": args.trace or None,
    **breakdown(events, matmul_flops(hlo), hlo_instructions(hlo), args.iters, peak),
  }
  common.emit(result)


if __name__ == "__main__":
  main()
