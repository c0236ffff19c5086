"""t-SNE / PCA alignment figure and training curves PNGs."""

import json

import numpy as np
import pytest

from gmail_jax.evaluators import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_alignment_tsne_png(tmp_path):
  rng = np.random.default_rng(0)
  real = rng.normal(size=(40, 8))
  gen_before, gen_after = rng.normal(size=(40, 8)) + 3, real + 0.1 * rng.normal(size=(40, 8))
  out = plots.plot_alignment_tsne(
    str(tmp_path / "a" / "tsne.png"), real, gen_before, real, gen_after
  )
  data = open(out, "rb").read()
  assert data.startswith(PNG) and len(data) > 5000


def test_pca_fallback_and_projection():
  z = np.random.default_rng(0).normal(size=(3, 5))
  p = plots.project_2d(z)  # too few points for t-SNE -> PCA
  assert p.shape == (3, 2)
  zc = z - z.mean(0)
  # PCA keeps the pairwise geometry of a 2-D-rank set exactly.
  np.testing.assert_allclose(np.linalg.norm(p[0] - p[1]), np.linalg.norm(zc[0] - zc[1]), rtol=1e-9)
  assert plots.project_2d(
    np.random.default_rng(1).normal(size=(30, 4)), method="tsne", max_iter=250
  ).shape == (
    30,
    2,
  )
  with pytest.raises(ValueError, match="method"):
    plots.project_2d(z, method="umap")


def test_training_curves_png(tmp_path):
  rows = [
    {
      "step": s,
      "train/loss": 2.0 / (s + 1),
      "train/pair_acc": s / 10,
      "train/lr": 1e-4,
      "train/alpha": 0.01 * s,
    }
    for s in range(10)
  ]
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  out = plots.plot_training_curves(str(path), str(tmp_path / "curves.png"))
  assert open(out, "rb").read().startswith(PNG)
  path.write_text(json.dumps(rows[0]) + "\n{oops\n")
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    plots.plot_training_curves(str(path), str(tmp_path / "c2.png"))
  path.write_text(json.dumps({"step": 1, "foo": 2}) + "\n")
  with pytest.raises(ValueError, match="no loss"):
    plots.plot_training_curves(str(path), str(tmp_path / "c3.png"))


def test_figures_read_and_write_a_bucket(gcs_dir, tmp_path):
  """metrics.jsonl read from a bucket and PNGs written there: the bytes of the local figures."""
  from gmail_jax import storage

  rows = [{"step": s, "train/loss": 2.0 / (s + 1), "train/lr": 1e-4} for s in range(10)]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  storage.write_text(f"{gcs_dir}/metrics.jsonl", text)
  (tmp_path / "metrics.jsonl").write_text(text)
  out = plots.plot_training_curves(f"{gcs_dir}/metrics.jsonl", f"{gcs_dir}/eval/curves.png")
  assert out == f"{gcs_dir}/eval/curves.png"
  local = plots.plot_training_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "c.png"))
  assert storage.path(out).read_bytes() == open(local, "rb").read()
  rng = np.random.default_rng(0)
  real, gen = rng.normal(size=(20, 8)), rng.normal(size=(20, 8)) + 3
  out = plots.plot_alignment_tsne(f"{gcs_dir}/tsne.png", real, gen, real, gen, method="pca")
  assert storage.path(out).read_bytes().startswith(PNG)
