"""Modality-gap metrics for paired embedding sets (TPC-CMA reconstruction, papers.md §B.3, §C).

For pairs (x_i, y_i), i = 1..N, L2-normalised inside, μ = row means, Σ = covariances:

    centroid      G_C   = ||μ_x − μ_y||                               (Liang et al. 2022 ||Δ_gap||)
    distribution  G_D   = sqrt((1/N) Σ_i ||(x_i − μ_x) − (y_i − μ_y)||²)   (paired residual)
    raw           G_raw = sqrt((1/N) Σ_i ||x_i − y_i||²)              G_raw² = G_C² + G_D² exactly
    frechet       FD²   = ||μ_x − μ_y||² + Tr(Σ_x + Σ_y − 2 (Σ_x Σ_y)^½)   (squared, like FID)
    frechet_distribution  = Tr(Σ_x + Σ_y − 2 (Σ_x Σ_y)^½)            (Bures² term, FD² − G_C²)
    paired_cosine = (1/N) Σ_i <x_i, y_i>

Σ uses the unbiased 1/(N−1) normalisation (as FID implementations do). Tr((Σ_x Σ_y)^½) is computed
in float64 with the eigen-based symmetric form Tr((Σ_x^½ Σ_y Σ_x^½)^½) = Σ_k sqrt(λ_k) (λ_k the
eigenvalues of the PSD matrix Σ_x^½ Σ_y Σ_x^½, clipped at 0), which equals the trace of the
principal square root of Σ_x Σ_y (similar matrices) and avoids sqrtm's complex round-off.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gmail_jax.data import eval_sets
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.evaluators import common

GAP_KEYS = ("raw", "centroid", "distribution", "frechet", "frechet_distribution")


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma_x: np.ndarray, sigma_y: np.ndarray) -> float:
  """Tr((Σ_x Σ_y)^½) = Σ_k sqrt(eig_k(Σ_x^½ Σ_y Σ_x^½)) for PSD Σ_x, Σ_y."""
  sx = _psd_sqrt(np.asarray(sigma_x, np.float64))
  m = sx @ np.asarray(sigma_y, np.float64) @ sx
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0, None))))


def frechet_distance(mu_x, sigma_x, mu_y, sigma_y) -> float:
  """FD² = ||μ_x − μ_y||² + Tr(Σ_x + Σ_y − 2 (Σ_x Σ_y)^½) between two Gaussians (squared)."""
  mu_x, mu_y = np.asarray(mu_x, np.float64), np.asarray(mu_y, np.float64)
  d = mu_x - mu_y
  tr = np.trace(sigma_x) + np.trace(sigma_y) - 2.0 * trace_sqrt_product(sigma_x, sigma_y)
  return float(d @ d + tr)


def gap_metrics(x: Any, y: Any) -> dict[str, float]:
  """Gap metrics of paired embeddings x, y [N, D] (numpy or jax; L2-normalised inside).

  Returns plain floats: raw, centroid, distribution, frechet (FD², squared), frechet_distribution
  (its covariance term), paired_cosine. See the module docstring for the formulas.
  """
  x = common.l2_normalize(common.to_numpy(x))
  y = common.l2_normalize(common.to_numpy(y))
  if x.ndim != 2 or x.shape != y.shape:
    raise ValueError(f"gap_metrics: need paired [N, D] arrays, got {x.shape} and {y.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"gap_metrics: need at least 2 pairs, got {x.shape[0]}")
  mu_x, mu_y = x.mean(0), y.mean(0)
  d = mu_x - mu_y
  r = (x - mu_x) - (y - mu_y)
  centroid_sq = float(d @ d)
  distribution_sq = float(np.mean(np.sum(r * r, axis=1)))
  raw_sq = float(np.mean(np.sum((x - y) ** 2, axis=1)))
  sigma_x, sigma_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  fd = frechet_distance(mu_x, sigma_x, mu_y, sigma_y)
  return {
    "raw": float(np.sqrt(raw_sq)),
    "centroid": float(np.sqrt(centroid_sq)),
    "distribution": float(np.sqrt(distribution_sq)),
    "frechet": fd,
    "frechet_distribution": fd - centroid_sq,
    "paired_cosine": float(np.mean(np.sum(x * y, axis=1))),
  }


def gap_reduction(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
  """Percent reduction 100·(1 − after/before) for each gap key in both dicts (GAP_KEYS).

  paired_cosine is a similarity, not a gap, so it is not included; keys with before == 0 are
  skipped (undefined).
  """
  return {
    k: 100.0 * (1.0 - float(after[k]) / float(before[k]))
    for k in GAP_KEYS
    if k in before and k in after and float(before[k]) != 0.0
  }


def load_pairs_manifest(manifest: str, root: str | None = None, *, max_pairs: int | None = None):
  """(gen paths, real paths) from a manifest (CSV, JSONL or Parquet, as training reads them) with
  gen_path, real_path columns (DESIGN §3); relative paths are under ``root`` (default: the
  manifest's directory)."""
  from gmail_jax.data import sources

  root = root if root is not None else os.path.dirname(os.path.abspath(manifest))
  table = sources.read_manifest_table(manifest, columns=("gen_path", "real_path"))
  gen = table.column("gen_path").to_pylist()[:max_pairs]
  real = table.column("real_path").to_pylist()[:max_pairs]
  if len(gen) < 2:
    raise InputError(f"gap: manifest {manifest} has fewer than 2 pairs")
  return [os.path.join(root, g) for g in gen], [os.path.join(root, r) for r in real]


def class_pairs(x_labels: np.ndarray, y_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Indices (xi, yi) pairing the k-th x item with the k-th y item of each class,
  k < min(count_x(c), count_y(c)) (class-level pairing, as in CIFAKE)."""
  xi, yi = [], []
  for c in np.unique(np.concatenate([x_labels, y_labels])):
    a, b = np.flatnonzero(x_labels == c), np.flatnonzero(y_labels == c)
    k = min(len(a), len(b))
    xi.append(a[:k])
    yi.append(b[:k])
  xi, yi = np.concatenate(xi), np.concatenate(yi)
  if len(xi) < 2:
    raise ValueError("gap: fewer than 2 (x, y) pairs share a class")
  return xi, yi


def same_class_shift(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(a, b): each item a paired with the next item b of its class (cyclically)."""
  a, b = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) > 1:
      a.append(idx)
      b.append(np.roll(idx, -1))
  return np.concatenate(a), np.concatenate(b)


PAIRS = ("image_text", "gen_real", "class_gen_real", "class_real_real")


class GapEvaluator(common.Evaluator):
  """`config.evals.<name> = dict(type='gap', every_steps=..., pairs=..., ...)`.

  pairs='image_text': images_dir + captions_json (COCO format); x = image, y = its first caption.
  pairs='gen_real': manifest (CSV / JSONL / Parquet: gen_path, real_path[, root]);
  x = encode_generated(gen) (the student path when the encoder has one), y = encode_images(real).
  pairs='class_gen_real': root with generated/<class>/ and real/<class>/; the k-th generated
  image of a class is paired with the k-th real one (x = encode_generated, y = encode_images).
  pairs='class_real_real': root/real/<class>/; each real image with the next of its class (the
  reference gap of two real images that share only a class).
  ``image_size`` loads crops of that size, resized in mode ``resize`` (the run's tower's: training
  and ``evaluate`` pass it; else the encoder resizes).
  Reports gap_metrics (unprefixed keys raw, centroid, ...).
  """

  def __init__(
    self,
    name: str,
    *,
    pairs: str = "image_text",
    images_dir: str | None = None,
    captions_json: str | None = None,
    manifest: str | None = None,
    root: str | None = None,
    max_pairs: int | None = None,
    image_size: int | None = None,
    resize: str = "shortest_edge_crop",
    batch_size: int = 64,
    every_steps: int = 0,
    prefix: str | None = None,
  ):
    super().__init__(name, every_steps=every_steps, prefix=prefix)
    self.pairs, self.batch_size = pairs, batch_size
    if pairs in ("class_gen_real", "class_real_real"):
      if not root:
        raise ConfigError(f"config.evals.{name}: pairs={pairs!r} needs root")
      crops = dict(image_size=image_size, resize=resize)
      real = eval_sets.load_class_set(os.path.join(root, "real"), **crops)
      if pairs == "class_gen_real":
        gen = eval_sets.load_class_set(os.path.join(root, "generated"), **crops)
        if gen.classnames != real.classnames:
          raise ConfigError(f"config.evals.{name}: {root}: generated/ and real/ classes differ")
        xi, yi = class_pairs(gen.labels, real.labels)
        x_all = gen.images
      else:
        xi, yi = same_class_shift(real.labels)
        x_all = real.images
      xi, yi = xi[:max_pairs], yi[:max_pairs]
      self.x_items = [x_all[i] for i in xi]
      self.y_items = [real.images[i] for i in yi]
    elif pairs == "image_text":
      if not (images_dir and captions_json):
        raise ConfigError(
          f"config.evals.{name}: pairs='image_text' needs images_dir, captions_json"
        )
      paths, captions, t2i = eval_sets.coco_captions(
        captions_json, images_dir, max_images=max_pairs
      )
      first = np.searchsorted(t2i, np.arange(len(paths)))  # captions are grouped by image
      self.x_items = eval_sets.load_images(paths)
      self.y_items = [captions[i] for i in first]
    elif pairs == "gen_real":
      if not manifest:
        raise ConfigError(f"config.evals.{name}: pairs='gen_real' needs manifest")
      gen, real = load_pairs_manifest(manifest, root, max_pairs=max_pairs)
      self.x_items, self.y_items = eval_sets.load_images(gen), eval_sets.load_images(real)
    else:
      raise ConfigError(f"config.evals.{name}.pairs: one of {PAIRS}, got {pairs!r}")

  def compute(self, encoder) -> dict[str, float]:
    if self.pairs == "image_text":
      x = common.encode_in_batches(encoder.encode_images, self.x_items, self.batch_size)
      y = common.encode_in_batches(encoder.encode_texts, self.y_items, self.batch_size)
    elif self.pairs == "class_real_real":
      x = common.encode_in_batches(encoder.encode_images, self.x_items, self.batch_size)
      y = common.encode_in_batches(encoder.encode_images, self.y_items, self.batch_size)
    else:
      x = common.encode_in_batches(
        lambda b: common.encode_generated(encoder, b), self.x_items, self.batch_size
      )
      y = common.encode_in_batches(encoder.encode_images, self.y_items, self.batch_size)
    return gap_metrics(x, y)
