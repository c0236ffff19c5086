"""Modality-gap metrics: exact decomposition, Fréchet vs scipy and a closed form, reductions."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from gmail_jax.evaluators import gap


def _pairs(n=300, d=16, shift=0.7, noise=0.5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x + noise * rng.normal(size=(n, d)) + shift * np.eye(d)[0] * np.sqrt(d)
  return x, y


def _norm(a):
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_exact_decomposition_and_definitions():
  x, y = _pairs()
  m = gap.gap_metrics(x, jnp.asarray(y))
  assert set(m) == {
    "raw",
    "centroid",
    "distribution",
    "frechet",
    "frechet_distribution",
    "paired_cosine",
  }
  assert all(isinstance(v, float) for v in m.values())
  assert m["raw"] ** 2 == pytest.approx(m["centroid"] ** 2 + m["distribution"] ** 2, abs=1e-6)
  xn, yn = _norm(x), _norm(y)
  assert m["centroid"] == pytest.approx(np.linalg.norm(xn.mean(0) - yn.mean(0)), abs=1e-6)
  assert m["raw"] == pytest.approx(np.sqrt(np.mean(np.sum((xn - yn) ** 2, 1))), abs=1e-6)
  assert m["paired_cosine"] == pytest.approx(np.mean(np.sum(xn * yn, 1)), abs=1e-6)
  # For unit vectors ||x - y||^2 = 2 - 2 cos: a second route to the raw gap.
  assert m["raw"] ** 2 == pytest.approx(2 - 2 * m["paired_cosine"], abs=1e-6)
  assert m["centroid"] > 0.1 and m["distribution"] > 0.1


def test_frechet_matches_scipy_sqrtm():
  x, y = _pairs(n=200, d=8, seed=3)
  m = gap.gap_metrics(x, y)
  xn, yn = _norm(x), _norm(y)
  sx, sy = np.cov(xn, rowvar=False), np.cov(yn, rowvar=False)
  covmean = scipy.linalg.sqrtm(sx @ sy).real
  want = np.sum((xn.mean(0) - yn.mean(0)) ** 2) + np.trace(sx + sy - 2 * covmean)
  assert m["frechet"] == pytest.approx(want, rel=1e-7, abs=1e-9)
  assert m["frechet_distribution"] == pytest.approx(want - m["centroid"] ** 2, abs=1e-9)
  assert m["frechet_distribution"] >= 0


def test_frechet_closed_form_for_commuting_gaussians():
  # Σx = Q diag(a) Qᵀ, Σy = Q diag(b) Qᵀ  =>  Tr(Σx + Σy − 2(ΣxΣy)^½) = Σ_k (√a_k − √b_k)².
  rng = np.random.default_rng(0)
  d = 12
  q = ortho_group.rvs(d, random_state=1)
  a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  mu_x, mu_y = rng.normal(size=d), rng.normal(size=d)
  fd = gap.frechet_distance(mu_x, q @ np.diag(a) @ q.T, mu_y, q @ np.diag(b) @ q.T)
  want = np.sum((mu_x - mu_y) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fd == pytest.approx(want, rel=1e-10)
  # Non-commuting case against sqrtm (rank-deficient Σx, as with N < D embeddings).
  lx = rng.normal(size=(d, 5))
  ly = rng.normal(size=(d, d))
  sx, sy = lx @ lx.T, ly @ ly.T
  ref = np.trace(sx + sy - 2 * scipy.linalg.sqrtm(sx @ sy).real)
  assert gap.frechet_distance(np.zeros(d), sx, np.zeros(d), sy) == pytest.approx(ref, rel=1e-6)


def test_identical_sets_have_zero_gap_and_reduction():
  x, _ = _pairs()
  m = gap.gap_metrics(x, 2.0 * x)  # row scale is removed by the normalisation
  for k in ("raw", "centroid", "distribution"):
    assert m[k] == pytest.approx(0.0, abs=1e-7)
  assert m["frechet"] == pytest.approx(0.0, abs=1e-6)
  assert m["paired_cosine"] == pytest.approx(1.0)
  before = {"raw": 2.0, "centroid": 0.8, "distribution": 1.0, "frechet": 0.0, "paired_cosine": 0.3}
  after = {"raw": 0.5, "centroid": 0.2, "distribution": 1.2, "frechet": 0.0, "paired_cosine": 0.9}
  red = gap.gap_reduction(before, after)
  assert red == pytest.approx({"raw": 75.0, "centroid": 75.0, "distribution": -20.0})
  with pytest.raises(ValueError, match="paired"):
    gap.gap_metrics(x, x[:-1])


def test_gap_evaluator_gen_real_manifest(tmp_path, shared):
  root = shared("cifake-sd14-test-sample")
  rows = ["gen_path,real_path"]
  for c in ("cat", "ship", "truck"):
    gen = sorted(os.listdir(root / "generated" / c))[:4]
    real = sorted(os.listdir(root / "real" / c))[:4]
    rows += [f"generated/{c}/{g},real/{c}/{r}" for g, r in zip(gen, real, strict=True)]
  (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
  from gmail_jax.evaluators import common

  (ev,) = common.from_config(
    {"g": dict(type="gap", pairs="gen_real", manifest=str(tmp_path / "m.csv"), root=str(root))}
  )
  assert len(ev.x_items) == 12

  def mean_color(images):
    return np.stack([np.asarray(im, np.float64).mean((0, 1)) + 1.0 for im in images])

  m = ev.run({"images": mean_color}, step=0)
  assert set(m) == {f"z/g/{k}" for k in gap.GAP_KEYS + ("paired_cosine",)}
  assert m["z/g/raw"] > 0
  # A student path that maps generated images onto the real ones closes the gap.
  real = {np.asarray(g).tobytes(): r for g, r in zip(ev.x_items, ev.y_items, strict=True)}
  m2 = ev.run(
    {
      "images": mean_color,
      "generated": lambda ims: mean_color([real[np.asarray(i).tobytes()] for i in ims]),
    }
  )
  assert m2["z/g/raw"] == pytest.approx(0.0, abs=1e-7)


def test_gap_manifest_reads_csv_jsonl_and_parquet_alike(tmp_path, shared):
  """The gap evaluator reads the manifest formats training reads."""
  import json

  import pyarrow as pa
  import pyarrow.parquet as pq

  root = shared("cifake-sd14-test-sample")
  pairs = [
    (f"generated/{c}/{g}", f"real/{c}/{r}")
    for c in ("cat", "ship")
    for g, r in zip(
      sorted(os.listdir(root / "generated" / c))[:3],
      sorted(os.listdir(root / "real" / c))[:3],
      strict=True,
    )
  ]
  (tmp_path / "m.csv").write_text("gen_path,real_path\n" + "".join(f"{g},{r}\n" for g, r in pairs))
  (tmp_path / "m.jsonl").write_text(
    "".join(json.dumps({"gen_path": g, "real_path": r, "caption": "x"}) + "\n" for g, r in pairs)
  )
  pq.write_table(
    pa.table({"gen_path": [g for g, _ in pairs], "real_path": [r for _, r in pairs]}),
    tmp_path / "m.parquet",
  )
  loaded = [
    gap.load_pairs_manifest(str(tmp_path / f"m.{ext}"), str(root))
    for ext in ("csv", "jsonl", "parquet")
  ]
  assert loaded[0] == loaded[1] == loaded[2]
  assert loaded[0][0][0] == str(root / pairs[0][0])
