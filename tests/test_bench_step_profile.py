"""bench/step_profile.py: a real jax.profiler trace of a compiled program, joined with its HLO."""

import collections
import subprocess
import sys

import numpy as np

from bench import step_profile

M, K, N, BATCH, HEADS, Q, D = 256, 192, 96, 4, 3, 20, 16
STEPS = 5

# The profiler is process-wide state (trace recorders, thread-pool listeners): it runs in a child
# process, as `python -m bench.step_profile` does, not in a test worker that goes on to other tests.
PROFILED = f"""
import pathlib, sys
import jax, jax.numpy as jnp, numpy as np

def program(x, w, qk):
  y = jnp.tanh(x @ w)  # a plain dot, then element-wise work
  s = jnp.einsum("bhqd,bhkd->bhqk", qk, qk)  # a batched dot (attention's shape)
  return jnp.sum(y * y, axis=0), jax.nn.softmax(s, axis=-1)

out = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
args = (
  rng.standard_normal(({M}, {K}), np.float32),
  rng.standard_normal(({K}, {N}), np.float32),
  rng.standard_normal(({BATCH}, {HEADS}, {Q}, {D}), np.float32),
)
compiled = jax.jit(program).lower(*args).compile()
(out / "hlo.txt").write_text(compiled.as_text())
jax.block_until_ready(compiled(*args))
with jax.profiler.trace(out / "trace", create_perfetto_trace=True):
  for _ in range({STEPS}):
    result = compiled(*args)
  jax.block_until_ready(result)
"""


def test_breakdown_finds_each_matmul_with_its_flops_and_accounts_for_the_wall_time(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-c", PROFILED, str(tmp_path)], capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  hlo = (tmp_path / "hlo.txt").read_text()
  flops = step_profile.matmul_flops(hlo)
  assert sorted(flops.values()) == [2.0 * BATCH * HEADS * Q * Q * D, 2.0 * M * K * N]

  got = step_profile.breakdown(
    step_profile.trace_events(tmp_path / "trace"),
    flops,
    step_profile.hlo_instructions(hlo),
    STEPS,
    1e11,
  )
  dots = step_profile.hlo_dots(hlo)
  assert sum(n * dot.flops for dot, n in dots.items()) == sum(flops.values())
  floor = step_profile.dot_floor(dots, window_s=0.01, repeats=1)
  assert sorted((r["gflop"], r["count"]) for r in floor["dots_alone"]) == sorted(
    (f / 1e9, 1) for f in flops.values()
  )
  assert all(r["ms_alone"] > 0 for r in floor["dots_alone"])
  np.testing.assert_allclose(
    floor["dot_floor_ms"], sum(r["ms_alone"] for r in floor["dots_alone"]), rtol=1e-12
  )
  calls = sorted((r["gflop"], r["calls_per_step"]) for r in got["matmuls"])
  assert calls == sorted((f / 1e9, 1.0) for f in flops.values())
  assert got["matmul_gflop_per_step"] == sum(flops.values()) / 1e9
  assert got["matmul_ideal_ms"] == sum(flops.values()) / 1e11 * 1e3
  assert got["other_ops"], "the softmax's division ran as other ops"
  spans = sum(got[f"{s}_ms"] for s in ("matmul_alone", "matmul_overlap", "other_only", "idle"))
  np.testing.assert_allclose(spans, got["step_ms"], rtol=1e-6)
  assert got["matmul_alone_ms"] + got["matmul_overlap_ms"] > 0


def test_a_bare_dot_counts_its_own_flops_and_a_fused_one_counts_for_its_fusion():
  hlo = """
%fused_computation (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.2 = f32[8,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[8,4], b: f32[4,2], c: f32[3,8,5]) -> f32[8,2] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %c = f32[3,8,5]{2,1,0} parameter(2)
  %dot.1 = f32[3,8,8]{2,1,0} dot(%c, %c), lhs_batch_dims={0}, lhs_contracting_dims={2}, \
rhs_batch_dims={0}, rhs_contracting_dims={2}
  %ynn_fusion.3 = f32[8,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation
  ROOT %tanh.4 = f32[8,2]{1,0} tanh(%ynn_fusion.3)
}
"""
  assert step_profile.matmul_flops(hlo) == {
    "dot.1": 2.0 * 3 * 8 * 8 * 5,
    "ynn_fusion.3": 2.0 * 8 * 2 * 4,
  }
  assert {"dot.1", "ynn_fusion.3", "tanh.4", "dot.2"} <= step_profile.hlo_instructions(hlo)


def test_wall_time_is_split_by_what_ran_at_each_instant():
  """µs: matmul A [0, 10) and other op B [5, 15), nothing [15, 20), other op C [20, 25), matmul D
  [25, 30) beside matmul E [25, 35); two steps."""
  events = [
    {"name": n, "ts": a, "dur": b - a}
    for n, a, b in [("A", 0, 10), ("B", 5, 15), ("C", 20, 25), ("D", 25, 30), ("E", 25, 35)]
  ]
  events.append({"name": "$python frame", "ts": 0, "dur": 100})  # not an op of the program
  flops = {"A": 2e6, "D": 1e6, "E": 1e6}
  got = step_profile.breakdown(events, flops, {"A", "B", "C", "D", "E"}, 2, 1e12)
  ms = lambda us: us / 1e3 / 2
  assert got["matmul_alone_ms"] == ms(5 + 5)  # A before B starts, E after D ends
  assert got["matmul_overlap_ms"] == ms(5 + 5)  # A beside B, D beside E
  assert got["other_only_ms"] == ms(5 + 5)  # B after A, C
  assert got["idle_ms"] == ms(5)
  assert got["step_ms"] == ms(35)
  assert got["matmul_gflop_per_step"] == 4e6 / 2 / 1e9
  assert got["matmul_ideal_ms"] == 2e6 / 1e12 * 1e3
  assert got["mfu"] == got["matmul_ideal_ms"] / ms(35)
  assert [(r["gflop"], r["calls_per_step"], r["ms_per_step"]) for r in got["matmuls"]] == [
    (1e-3, 1.0, ms(15)),  # D and E: 1 MFLOP each, 5 + 10 µs
    (2e-3, 0.5, ms(10)),
  ]
  assert got["other_ops"] == {"B": ms(10), "C": ms(5)}


def test_each_dot_is_read_with_its_shapes_dimension_numbers_and_how_often_it_runs():
  """A fused computation called by two fusions runs twice; a bare batched dot once."""
  hlo = """
%fused_computation (p0: f32[8,4], p1: f32[4,2]) -> f32[2,8] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.2 = f32[2,8]{1,0} dot(%p1, %p0), lhs_contracting_dims={0}, rhs_contracting_dims={1}
}

ENTRY %main (a: f32[8,4], b: f32[4,2], c: bf16[3,8,5]) -> f32[3,8,8] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %c = bf16[3,8,5]{2,1,0} parameter(2)
  %ynn_fusion.3 = f32[2,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation
  %ynn_fusion.4 = f32[2,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation
  ROOT %dot.1 = f32[3,8,8]{2,1,0} dot(%c, %c), lhs_batch_dims={0}, lhs_contracting_dims={2}, \
rhs_batch_dims={0}, rhs_contracting_dims={2}
}
"""
  Dot = step_profile.Dot
  transposed = Dot((4, 2), (8, 4), "f32", "f32", "f32", (0,), (1,))
  batched = Dot((3, 8, 5), (3, 8, 5), "bf16", "bf16", "f32", (2,), (2,), (0,), (0,))
  assert step_profile.hlo_dots(hlo) == collections.Counter({transposed: 2, batched: 1})
  assert (transposed.flops, batched.flops) == (2.0 * 2 * 8 * 4, 2.0 * 3 * 8 * 8 * 5)
  assert sum(step_profile.matmul_flops(hlo).values()) == 2 * transposed.flops + batched.flops
  floor = step_profile.dot_floor(step_profile.hlo_dots(hlo), window_s=0.001, repeats=1)
  assert sorted((r["gflop"], r["count"]) for r in floor["dots_alone"]) == [
    (transposed.flops / 1e9, 2),
    (batched.flops / 1e9, 1),
  ]
