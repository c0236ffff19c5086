"""GMAIL losses against a float64 numpy reference of Eq. 1 (and its variants)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmail_jax.objectives import losses


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nce_direction(s, group):
  """Mean over anchors i of -log softmax_j(s[i, j])[i]; j runs over i and non-group-mates of i."""
  n = len(s)
  total = 0.0
  for i in range(n):
    keep = [j for j in range(n) if j == i or group is None or group[j] != group[i]]
    total += -(s[i, i] - np.log(np.sum(np.exp(s[i, keep]))))
  return total / n


def ref_infonce(zg, zr, tau, group=None, symmetric=False):
  """Eq. 1 in float64, written as a loop over anchors (independent of the jnp code path)."""
  s = _norm(zg.astype(np.float64)) @ _norm(zr.astype(np.float64)).T / tau
  out = _nce_direction(s, group)
  if symmetric:
    out = 0.5 * (out + _nce_direction(s.T, group))
  return out


def ref_clip(zi, zt, scale, group=None):
  """Symmetric CLIP loss in float64."""
  s = scale * (_norm(zi.astype(np.float64)) @ _norm(zt.astype(np.float64)).T)
  return 0.5 * (_nce_direction(s, group) + _nce_direction(s.T, group))


@pytest.fixture
def emb():
  rng = np.random.default_rng(0)
  zg = rng.normal(size=(12, 16)).astype(np.float32)
  zr = (zg + 0.8 * rng.normal(size=(12, 16))).astype(np.float32)
  zt = rng.normal(size=(12, 16)).astype(np.float32)
  group = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6, 7], np.int32)
  return zg, zr, zt, group


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_infonce_matches_numpy_reference(emb, symmetric, masked):
  zg, zr, _, group = emb
  g = group if masked else None
  loss, aux = jax.jit(
    lambda a, b, g: losses.gen_real_infonce(a, b, 0.07, group=g, symmetric=symmetric)
  )(zg, zr, g)
  np.testing.assert_allclose(float(loss), ref_infonce(zg, zr, 0.07, g, symmetric), rtol=2e-5)
  assert 0.0 <= float(aux["pair_acc"]) <= 1.0


def test_masking_changes_loss_only_with_shared_groups(emb):
  zg, zr, _, group = emb
  plain, _ = losses.gen_real_infonce(zg, zr, 0.07)
  unique, _ = losses.gen_real_infonce(zg, zr, 0.07, group=jnp.arange(12))
  masked, _ = losses.gen_real_infonce(zg, zr, 0.07, group=group)
  np.testing.assert_allclose(float(plain), float(unique), rtol=1e-6)
  assert float(masked) < float(plain)  # fewer negatives -> smaller loss


def test_pair_accuracy_and_perfect_alignment():
  z = np.eye(8, 16, dtype=np.float32) * 3.0
  loss, aux = losses.gen_real_infonce(z, z, 0.07)
  assert float(aux["pair_acc"]) == 1.0
  np.testing.assert_allclose(float(loss), np.log1p(7 * np.exp(-1 / 0.07)), atol=1e-6)
  np.testing.assert_allclose(float(aux["pos_cos"]), 1.0, rtol=1e-6)
  shuffled = np.roll(z, 1, axis=0)
  _, aux = losses.gen_real_infonce(z, shuffled, 0.07)
  assert float(aux["pair_acc"]) == 0.0


def test_text_term_and_total(emb):
  zg, zr, zt, group = emb
  scale = 1 / 0.07
  clip, _ = losses.clip_loss(zg, zt, scale, group=group)
  np.testing.assert_allclose(float(clip), ref_clip(zg, zt, scale, group), rtol=2e-5)
  total, aux = losses.gmail_loss(
    zg, zr, temperature=0.07, group=group, z_text=zt, text_weight=0.5, text_logit_scale=scale
  )
  want = ref_infonce(zg, zr, 0.07, group) + 0.5 * ref_clip(zg, zt, scale, group)
  np.testing.assert_allclose(float(total), want, rtol=2e-5)
  assert set(aux) >= {"align_loss", "text_loss", "pair_acc", "text_acc"}
  alone, _ = losses.gmail_loss(zg, zr, temperature=0.07, z_text=zt, text_weight=0.0)
  np.testing.assert_allclose(float(alone), ref_infonce(zg, zr, 0.07), rtol=2e-5)


def test_learnable_temperature_gradient(emb):
  zg, zr, _, _ = emb
  g = jax.grad(lambda s: losses.gen_real_infonce(zg, zr, jnp.exp(-s))[0])(jnp.log(1 / 0.07))
  eps = 1e-3
  f = lambda s: ref_infonce(zg, zr, np.exp(-s))
  fd = (f(np.log(1 / 0.07) + eps) - f(np.log(1 / 0.07) - eps)) / (2 * eps)
  np.testing.assert_allclose(float(g), fd, rtol=1e-3)
