"""Joint image-text clustering ARI (TPC-CMA protocol, papers.md §B.4; ModGap's joint k-means).

k-means on the union of the two L2-normalised modalities, each point labelled with its pair's
class (labels duplicated), scored with the adjusted Rand index. Modalities that sit in separate
clusters (a large modality gap) score low even when each modality clusters by class on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans

from gmail_jax.data import eval_sets
from gmail_jax.errors import ConfigError
from gmail_jax.evaluators import common


def adjusted_rand_index(labels_true: Any, labels_pred: Any) -> float:
  """ARI (Hubert & Arabie 1985) from the contingency table n_ij, a_i = Σ_j n_ij, b_j = Σ_i n_ij:

      ARI = (Σ C(n_ij,2) − E) / (½(Σ C(a_i,2) + Σ C(b_j,2)) − E)
      E = Σ C(a_i,2) · Σ C(b_j,2) / C(n,2)

  1.0 when both labelings are identical up to renaming (including the degenerate one-cluster case).
  """
  _, t = np.unique(np.asarray(labels_true), return_inverse=True)
  _, p = np.unique(np.asarray(labels_pred), return_inverse=True)
  n = t.size
  table = np.zeros((t.max() + 1, p.max() + 1), np.int64)
  np.add.at(table, (t, p), 1)

  def comb2(v):
    v = np.asarray(v, np.float64)
    return float(np.sum(v * (v - 1) / 2))

  index = comb2(table)
  sum_a, sum_b = comb2(table.sum(1)), comb2(table.sum(0))
  expected = sum_a * sum_b / (n * (n - 1) / 2) if n > 1 else 0.0
  max_index = (sum_a + sum_b) / 2
  if max_index == expected:  # both labelings are one cluster / all singletons
    return 1.0
  return (index - expected) / (max_index - expected)


def joint_kmeans_labels(x: Any, y: Any, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
  """k-means cluster ids [2N] of concat(normalise(x), normalise(y)) (sklearn KMeans, lloyd)."""
  x = common.l2_normalize(common.to_numpy(x))
  y = common.l2_normalize(common.to_numpy(y))
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"joint_kmeans: need [N, D] and [M, D], got {x.shape} and {y.shape}")
  z = np.concatenate([x, y])
  if not 1 <= k <= len(z):
    raise ValueError(f"joint_kmeans: k={k} must be in [1, {len(z)}]")
  return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(z)


def joint_ari(x: Any, y: Any, labels: Any, k: int, seed: int = 0, n_init: int = 10) -> float:
  """ARI between joint k-means clusters of (x ∪ y) and concat(labels, labels).

  Args:
    x, y: paired embeddings [N, D] (image / text, or generated / real); L2-normalised inside.
    labels: int [N], class of pair i (given to both x_i and y_i).
    k: number of clusters (usually the number of classes).
    seed: KMeans random_state.
    n_init: KMeans restarts (fixed, so results are reproducible).
  """
  labels = np.asarray(labels).reshape(-1)
  if labels.shape[0] != np.shape(x)[0] or np.shape(x)[0] != np.shape(y)[0]:
    raise ValueError(
      f"joint_ari: need x, y, labels of equal length, got {np.shape(x)}, {np.shape(y)}, "
      f"{labels.shape}"
    )
  pred = joint_kmeans_labels(x, y, k, seed=seed, n_init=n_init)
  return adjusted_rand_index(np.concatenate([labels, labels]), pred)


class ClusteringEvaluator(common.Evaluator):
  """`config.evals.<name> = dict(type='clustering', every_steps=..., dataset=<class-folder dir/zip>,
  template='a photo of a {}.', per_class=None, max_images=None, k=None, seed=0, n_init=10,
  batch_size=64, prefix='z/<name>/')` -> {ari}.

  x_i = image i, y_i = the text template filled with image i's class (one text per image, so each
  class's text embedding repeats); k defaults to the number of classes.
  """

  def __init__(
    self,
    name: str,
    *,
    dataset: str,
    template: str = "a photo of a {}.",
    classnames: Sequence[str] | None = None,
    per_class: int | None = None,
    max_images: int | None = None,
    k: int | None = None,
    seed: int = 0,
    n_init: int = 10,
    batch_size: int = 64,
    every_steps: int = 0,
    prefix: str | None = None,
  ):
    super().__init__(name, every_steps=every_steps, prefix=prefix)
    data = eval_sets.load_class_set(dataset, per_class=per_class, max_images=max_images)
    self.images, self.labels, folders = data.images, data.labels, data.classnames
    names = list(classnames or [f.replace("_", " ") for f in folders])
    if len(names) != len(folders):
      raise ConfigError(f"config.evals.{name}.classnames: {len(names)} for {len(folders)} classes")
    self.class_texts = [template.format(c) for c in names]
    self.k = k or len(folders)
    self.seed, self.n_init, self.batch_size = seed, n_init, batch_size

  def compute(self, encoder) -> dict[str, float]:
    x = common.encode_in_batches(encoder.encode_images, self.images, self.batch_size)
    w = common.encode_in_batches(encoder.encode_texts, self.class_texts, self.batch_size)
    y = w[self.labels]
    return {"ari": joint_ari(x, y, self.labels, self.k, seed=self.seed, n_init=self.n_init)}
