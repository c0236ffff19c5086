"""Three-phase α(t) curriculum and the gradient-aware cap (gmail_jax/objectives/curriculum.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmail_jax.objectives import curriculum


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_three_phases(shape):
  total, target = 1000, 0.5
  a = np.array(
    [float(curriculum.alpha_schedule(t, total, target, 0.2, 0.5, shape)) for t in range(total + 1)]
  )
  assert np.all(a[:200] == 0.0)  # anchor
  ramp = a[200:700]
  assert np.all(np.diff(ramp) >= 0) and ramp[0] == 0.0 and 0 < ramp[250] < target  # monotone
  assert np.all(np.diff(ramp) > 0)  # strictly rising inside the ramp
  np.testing.assert_allclose(a[700:], target, rtol=1e-7)  # stabilize
  if shape == "linear":
    assert a[450] == pytest.approx(target / 2, rel=1e-6)
  else:
    assert a[450] == pytest.approx(target / 2, rel=1e-6)  # cosine midpoint is also 1/2
    assert a[250] < target * 0.1 * 1.01  # cosine starts slower than linear


def test_traced_step_matches_python():
  f = jax.jit(lambda t: curriculum.alpha_schedule(t, 100, 0.05, 0.1, 0.4, "cosine"))
  for t in (0, 9, 10, 25, 49, 50, 99):
    assert float(f(jnp.int32(t))) == pytest.approx(
      float(curriculum.alpha_schedule(t, 100, 0.05, 0.1, 0.4, "cosine")), abs=1e-8
    )


def test_zero_length_ramp_is_a_step_and_bad_args_raise():
  assert float(curriculum.alpha_schedule(9, 100, 0.3, 0.1, 0.0)) == 0.0
  assert float(curriculum.alpha_schedule(10, 100, 0.3, 0.1, 0.0)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="shape"):
    curriculum.alpha_schedule(0, 10, 0.1, shape="exp")
  with pytest.raises(ValueError, match="sum"):
    curriculum.alpha_schedule(0, 10, 0.1, 0.6, 0.6)


def test_cap_engages_only_when_alignment_gradient_dominates():
  # CMA gradient small: the scheduled alpha passes through.
  assert float(curriculum.capped_alpha(0.5, 2.0, 1.0, rho=1.0)) == pytest.approx(0.5)
  # CMA gradient 10x the NCE gradient: alpha_eff = rho * g_nce / g_cma = 0.1 < 0.5.
  a = float(curriculum.capped_alpha(0.5, 1.0, 10.0, rho=1.0, eps=0.0))
  assert a == pytest.approx(0.1)
  # The capped alignment gradient is then no larger than rho * the contrastive one.
  assert a * 10.0 <= 1.0 + 1e-6
  # Zero CMA gradient: no cap; jit-compatible.
  f = jax.jit(curriculum.capped_alpha)
  assert float(f(0.05, 1.0, 0.0)) == pytest.approx(0.05)
