"""Joint k-means ARI: own ARI vs sklearn, joint protocol, toy models."""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from gmail_jax.evaluators import clustering


@pytest.mark.parametrize("seed", range(5))
def test_ari_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 1 + seed, size=50)
  b = np.where(rng.random(50) < 0.6, a, rng.integers(0, 4, size=50))
  assert clustering.adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)


def test_ari_edge_cases_match_sklearn():
  cases = [
    ([0, 0, 0], [1, 1, 1]),
    ([0, 1, 2], [2, 0, 1]),
    ([0, 0, 1, 1], [0, 1, 2, 3]),
    ([0, 0, 0, 0], [0, 0, 1, 1]),
  ]
  for a, b in cases:
    assert clustering.adjusted_rand_index(a, b) == pytest.approx(
      adjusted_rand_score(a, b), abs=1e-12
    )


def _classes(n_per=20, k=4, d=16, gap=0.0, noise=0.05, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(k, d)) * 3
  labels = np.repeat(np.arange(k), n_per)
  x = centers[labels] + noise * rng.normal(size=(len(labels), d))
  offset = np.zeros(d)
  offset[0] = gap
  y = centers[labels] + offset + noise * rng.normal(size=(len(labels), d))
  return x, y, labels


def test_joint_ari_is_sklearn_ari_of_joint_kmeans():
  """Overlapping classes (0 < ARI < 1), a modality offset and random row norms; the reference is
  built here from clustering.py's documented protocol: L2-normalise x and y, concatenate,
  sklearn KMeans(k, n_init=10, random_state=seed), ARI against the labels given to both halves."""
  x, y, labels = _classes(noise=4.0, gap=3.0, seed=1)
  rng = np.random.default_rng(5)
  x = x * np.exp(rng.normal(size=(len(x), 1)))
  y = y * np.exp(rng.normal(size=(len(y), 1)))
  l2 = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  z = np.concatenate([l2(x), l2(y)])
  pred = KMeans(n_clusters=4, n_init=10, random_state=3).fit_predict(z)
  want = adjusted_rand_score(np.concatenate([labels, labels]), pred)
  assert 0.0 < want < 1.0, want
  got = clustering.joint_ari(x, y, labels, 4, seed=3)
  assert got == pytest.approx(want, abs=1e-12)
  assert clustering.joint_ari(x, y, labels, 4, seed=3) == got  # deterministic for a seed
  assert clustering.joint_kmeans_labels(x, y, 4, seed=3).shape == (2 * len(labels),)


def test_joint_ari_perfect_and_gapped_models():
  x, y, labels = _classes()
  assert clustering.joint_ari(x, y, labels, 4, seed=0) == pytest.approx(1.0)
  # A large modality offset: k-means splits by modality, not class.
  xg, yg, _ = _classes(gap=200.0)
  assert clustering.joint_ari(xg, yg, labels, 4, seed=0) < 0.6
  with pytest.raises(ValueError, match="equal length"):
    clustering.joint_ari(x, y, labels[:-1], 4)
