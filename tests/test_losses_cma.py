"""TPC-CMA loss terms (objectives/losses.py, TPC-CMA) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmail_jax.objectives import losses


def _norm(a):
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def _ref(x, y, lambda_d, kind):
  x, y = _norm(x.astype(np.float64)), _norm(y.astype(np.float64))
  lc = np.sum((x.mean(0) - y.mean(0)) ** 2)
  if kind == "gram":
    ld = np.linalg.norm(x @ x.T - y @ y.T, "fro") ** 2 / len(x) ** 2
  else:
    ld = np.mean(np.sum(((x - x.mean(0)) - (y - y.mean(0))) ** 2, axis=1))
  return lc, ld, lc + lambda_d * ld


@pytest.mark.parametrize("kind", ["gram", "residual"])
def test_cma_terms_match_numpy(kind):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 7)).astype(np.float32)
  y = (x + 0.8 * rng.normal(size=(12, 7)) + 0.5).astype(np.float32)
  lc, ld, total = _ref(x, y, 0.7, kind)
  np.testing.assert_allclose(float(losses.centroid_loss(x, y)), lc, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(losses.distribution_loss(x, y, kind)), ld, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(losses.cma_loss(x, y, 0.7, kind)), total, rtol=1e-5, atol=1e-7)
  assert lc > 1e-3 and ld > 1e-3


@pytest.mark.parametrize("kind", ["gram", "residual"])
def test_cma_zero_when_equal_and_scale_invariant(kind):
  x = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
  assert float(losses.cma_loss(x, x, 1.0, kind)) == pytest.approx(0.0, abs=1e-10)
  # Row scaling does not matter: inputs are L2-normalised inside.
  assert float(losses.cma_loss(x, 3.0 * x, 1.0, kind)) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("kind", ["gram", "residual"])
def test_cma_gradients_finite_and_jittable(kind):
  rng = np.random.default_rng(2)
  x, y = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), jnp.asarray(rng.normal(size=(8, 6)))
  f = jax.jit(jax.grad(lambda a, b, lam: losses.cma_loss(a, b, lam, kind), argnums=(0, 1)))
  gx, gy = f(x, y, jnp.float32(1.0))  # traced lambda_d works
  assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gy)).all()
  assert float(jnp.abs(gx).sum()) > 0
  # At x == y the gradient is zero (a minimum).
  gx0, _ = f(x, x, jnp.float32(1.0))
  np.testing.assert_allclose(np.asarray(gx0), 0.0, atol=1e-6)


def test_distribution_loss_rejects_unknown_kind():
  with pytest.raises(ValueError, match="kind"):
    losses.distribution_loss(np.ones((2, 2)), np.ones((2, 2)), kind="mmd")
