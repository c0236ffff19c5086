"""bench/step_profile.py: a real jax.profiler trace of a compiled program, joined with its HLO."""

import jax
import jax.numpy as jnp
import numpy as np

from bench import step_profile


def test_breakdown_finds_each_matmul_with_its_flops_and_accounts_for_the_wall_time(tmp_path):
  m, k, n, batch, heads, q, d = 256, 192, 96, 4, 3, 20, 16

  def program(x, w, qk):
    y = jnp.tanh(x @ w)  # a plain dot, then element-wise work
    s = jnp.einsum("bhqd,bhkd->bhqk", qk, qk)  # a batched dot (attention's shape)
    return jnp.sum(y * y, axis=0), jax.nn.softmax(s, axis=-1)

  rng = np.random.default_rng(0)
  args = (
    rng.standard_normal((m, k), np.float32),
    rng.standard_normal((k, n), np.float32),
    rng.standard_normal((batch, heads, q, d), np.float32),
  )
  compiled = jax.jit(program).lower(*args).compile()
  hlo = compiled.as_text()
  flops = step_profile.matmul_flops(hlo)
  assert sorted(flops.values()) == [2.0 * batch * heads * q * q * d, 2.0 * m * k * n]

  steps = 5
  jax.block_until_ready(compiled(*args))
  with jax.profiler.trace(tmp_path, create_perfetto_trace=True):
    for _ in range(steps):
      out = compiled(*args)
    jax.block_until_ready(out)
  got = step_profile.breakdown(
    step_profile.trace_events(tmp_path), flops, step_profile.hlo_instructions(hlo), steps, 1e11
  )
  calls = sorted((r["gflop"], r["calls_per_step"]) for r in got["matmuls"])
  assert calls == sorted((f / 1e9, 1.0) for f in flops.values())
  assert got["matmul_gflop_per_step"] == sum(flops.values()) / 1e9
  assert got["matmul_ideal_ms"] == sum(flops.values()) / 1e11 * 1e3
  assert got["other_ops"], "tanh, the reduction and the softmax ran as other ops"
  spans = sum(got[f"{s}_ms"] for s in ("matmul_alone", "matmul_overlap", "other_only", "idle"))
  np.testing.assert_allclose(spans, got["step_ms"], rtol=1e-6)
  assert got["matmul_alone_ms"] + got["matmul_overlap_ms"] > 0
