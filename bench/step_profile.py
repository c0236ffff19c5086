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
``dot_floor_ms``: every dot of the compiled step timed on its own (same shapes and dimension
numbers, a jitted ``lax.dot_general`` each) and summed: the step if it were nothing but its dots,
each as fast as it runs alone; ``dot_floor_mfu`` (ideal / floor) is the MFU of a step that ran
these dots one after another at that speed and nothing else; ``dots_alone`` lists the 12 dearest.
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
import dataclasses
import gzip
import json
import math
import os
import pathlib
import re
import shutil
import statistics
import tempfile

# `%name = f32[800,768]{1,0} op(...)`; XLA prints the leading % in some versions only.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_DOT_DIMS = re.compile(r"([lr]hs_(?:batch|contracting)_dims)=\{([\d,]*)\}")
_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}
_SPANS = ("matmul_alone", "matmul_overlap", "other_only", "idle")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _instructions(hlo_text: str):
  """(computation, name, dtype, dims, op, rest) of every instruction line of an HLO module."""
  computation = ""
  for line in hlo_text.splitlines():
    if m := _COMPUTATION.match(line):
      computation = m.group(1)
    elif m := _INSTR.match(line):
      name, dtype, dims, op, rest = m.groups()
      yield computation, name, dtype, tuple(_dims(dims)), op, rest


def _operands(rest: str) -> list[str]:
  inner = rest[: rest.index(")")]
  if "%" in inner:
    return re.findall(r"%([\w.\-]+)", inner)
  return [t.strip() for t in inner.split(",")]


def matmul_flops(hlo_text: str) -> dict[str, float]:
  """FLOPs of every op of an HLO module's text that computes a dot: a bare ``dot`` (2 x output
  elements x contracted size) or a fusion whose computation contains dots."""
  shapes: dict[str, tuple[int, ...]] = {}
  dots: list[tuple[str, str, tuple[int, ...], str]] = []  # (computation, name, output dims, rest)
  fusions: list[tuple[str, str]] = []  # (fusion name, called computation)
  for computation, name, _, dims, op, rest in _instructions(hlo_text):
    shapes[name] = dims
    if op == "dot":
      dots.append((computation, name, dims, rest))
    elif op == "fusion" and (c := _CALLS.search(rest)):
      fusions.append((name, c.group(1)))
  per_computation: collections.Counter[str] = collections.Counter()
  flops: dict[str, float] = {}
  fused = {called for _, called in fusions}
  for computation, name, out, rest in dots:
    lhs = _operands(rest)[0]
    contracting = dict(_DOT_DIMS.findall(rest)).get("lhs_contracting_dims", "")
    k = math.prod(shapes[lhs][d] for d in _dims(contracting))
    per_computation[computation] += 2.0 * math.prod(out) * k
    if computation not in fused:  # a dot of its own, not one inside a fusion's computation
      flops[name] = 2.0 * math.prod(out) * k
  for name, called in fusions:
    if per_computation[called]:
      flops[name] = float(per_computation[called])
  return flops


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot of an HLO module: operand shapes and dtypes, dimension numbers, result dtype."""

  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_dtype: str
  rhs_dtype: str
  out_dtype: str
  lhs_contracting: tuple[int, ...]
  rhs_contracting: tuple[int, ...]
  lhs_batch: tuple[int, ...] = ()
  rhs_batch: tuple[int, ...] = ()

  @property
  def flops(self) -> float:
    k = math.prod(self.lhs[d] for d in self.lhs_contracting)
    out = math.prod(self.lhs) * math.prod(self.rhs) // k // k
    out //= math.prod(self.lhs[d] for d in self.lhs_batch)
    return 2.0 * out * k


def hlo_dots(hlo_text: str) -> collections.Counter[Dot]:
  """Every dot of an HLO module's text (bare or inside a fusion's computation), with how many
  times one run of the module executes it (a fused dot: once per fusion calling it; a dot inside a
  loop body counts once, so loops over microbatches are undercounted)."""
  shapes: dict[str, tuple[tuple[int, ...], str]] = {}
  found: list[tuple[str, str, str, str, dict]] = []  # (computation, lhs, rhs, dtype, dim numbers)
  callers: collections.Counter[str] = collections.Counter()
  for computation, name, dtype, dims, op, rest in _instructions(hlo_text):
    shapes[name] = (dims, dtype)
    if op == "fusion" and (c := _CALLS.search(rest)):
      callers[c.group(1)] += 1
    elif op == "dot":
      lhs, rhs = _operands(rest)[:2]
      numbers = {k: tuple(_dims(v)) for k, v in _DOT_DIMS.findall(rest)}
      found.append((computation, lhs, rhs, dtype, numbers))
  dots: collections.Counter[Dot] = collections.Counter()
  for computation, lhs, rhs, dtype, numbers in found:
    dot = Dot(
      lhs=shapes[lhs][0],
      rhs=shapes[rhs][0],
      lhs_dtype=shapes[lhs][1],
      rhs_dtype=shapes[rhs][1],
      out_dtype=dtype,
      lhs_contracting=numbers.get("lhs_contracting_dims", ()),
      rhs_contracting=numbers.get("rhs_contracting_dims", ()),
      lhs_batch=numbers.get("lhs_batch_dims", ()),
      rhs_batch=numbers.get("rhs_batch_dims", ()),
    )
    dots[dot] += callers.get(computation, 1)
  return dots


def dot_floor(dots: collections.Counter[Dot], window_s: float = 0.05, repeats: int = 3) -> dict:
  """Times each distinct dot on its own (a jitted ``lax.dot_general`` of its shapes and dimension
  numbers on random operands, best of ``repeats`` windows) and sums them by their counts: what a
  step made of nothing but its dots, each as fast as it runs alone, would take."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bench import common

  rng = np.random.default_rng(0)
  rows = []
  for dot, count in dots.items():
    lhs = jnp.asarray(rng.standard_normal(dot.lhs, np.float32), _DTYPES[dot.lhs_dtype])
    rhs = jnp.asarray(rng.standard_normal(dot.rhs, np.float32), _DTYPES[dot.rhs_dtype])
    numbers = ((dot.lhs_contracting, dot.rhs_contracting), (dot.lhs_batch, dot.rhs_batch))
    f = jax.jit(
      lambda a, b, n=numbers, t=_DTYPES[dot.out_dtype]: jax.lax.dot_general(
        a, b, n, preferred_element_type=t
      )
    )
    best = common.best_call_seconds(
      lambda f=f, lhs=lhs, rhs=rhs: f(lhs, rhs),
      lambda r: r.block_until_ready(),
      window_s=window_s,
      repeats=repeats,
    )
    rows.append({"gflop": dot.flops / 1e9, "count": count, "ms_alone": best * 1e3})
  rows.sort(key=lambda r: -r["count"] * r["ms_alone"])
  return {"dot_floor_ms": sum(r["count"] * r["ms_alone"] for r in rows), "dots_alone": rows}


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
  return {name for _, name, *_ in _instructions(hlo_text)}


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
  floor = dot_floor(hlo_dots(hlo))
  result["dot_floor_ms"] = floor["dot_floor_ms"]
  result["dot_floor_mfu"] = result["matmul_ideal_ms"] / floor["dot_floor_ms"]
  result["dots_alone"] = floor["dots_alone"][:12]
  common.emit(result)


if __name__ == "__main__":
  main()
