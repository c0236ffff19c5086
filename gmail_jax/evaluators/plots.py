"""Figures: t-SNE of real vs generated embeddings (GMAIL Fig. 3 style), training curves, and task
quality against each modality gap with its least-squares line (the sweep's R² figure).

matplotlib with the Agg backend (no display needed); every function writes one PNG and returns
its path, a local path or a bucket URL (``gs://``): the figure is rendered in memory and written
whole (storage.write_bytes).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import matplotlib

from gmail_jax import storage
from gmail_jax.errors import InputError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gmail_jax.evaluators import common  # noqa: E402

EXACT_TSNE_MAX = 2500

# Training-curve panels: (title, predicate on a metric key). Keys follow metrics.py's namespaces.
_CURVE_PANELS = (
  ("loss", lambda k: k.endswith("loss") or "/loss" in k),
  ("pair accuracy", lambda k: "acc" in k),
  ("learning rate", lambda k: k.endswith("lr") or "learning_rate" in k),
  ("alignment α / gaps", lambda k: "alpha" in k or "gap" in k or "cma" in k),
)


def project_2d(
  z: np.ndarray, method: str = "tsne", seed: int = 0, perplexity: float = 30.0, max_iter: int = 1000
):
  """[N, 2] embedding of z [N, D]: t-SNE (sklearn, PCA init), or PCA when asked or N is tiny.

  t-SNE needs perplexity < N; with fewer than 4 points or method='pca' the top-2 principal
  components are used instead. max_iter (>= 250) bounds the t-SNE optimisation time.
  """
  z = common.to_numpy(z)
  if method not in ("tsne", "pca"):
    raise ValueError(f"project_2d: method must be 'tsne' or 'pca', got {method!r}")
  if method == "tsne" and len(z) >= 4:
    from sklearn.manifold import TSNE

    perp = min(perplexity, (len(z) - 1) / 3)
    return TSNE(
      2,
      perplexity=perp,
      init="pca",
      random_state=seed,
      max_iter=max_iter,
      # Exact gradients up to a few thousand points (GMAIL Fig. 3 uses 1000 pairs): no OpenMP
      # Barnes-Hut threads, which crawl on oversubscribed CPUs.
      method="exact" if len(z) <= EXACT_TSNE_MAX else "barnes_hut",
    ).fit_transform(z)
  zc = z - z.mean(0)
  _, _, vt = np.linalg.svd(zc, full_matrices=False)
  out = zc @ vt[:2].T
  return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def plot_embeddings(
  path: str,
  panels: Sequence[tuple[str, Any, Any]],
  *,
  method: str = "tsne",
  seed: int = 0,
  max_iter: int = 1000,
  labels: Sequence[str] = ("real", "generated"),
) -> str:
  """One scatter panel per (title, real_emb [N, D], gen_emb [M, D]), e.g. before/after alignment.

  Each panel runs its own projection of the L2-normalised union (GMAIL Fig. 3: one t-SNE per model).
  """
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
  for ax, (title, real, gen) in zip(axes[0], panels, strict=True):
    real = common.l2_normalize(common.to_numpy(real))
    gen = common.l2_normalize(common.to_numpy(gen))
    p = project_2d(np.concatenate([real, gen]), method=method, seed=seed, max_iter=max_iter)
    ax.scatter(p[: len(real), 0], p[: len(real), 1], s=6, alpha=0.6, c="tab:blue", label=labels[0])
    ax.scatter(p[len(real) :, 0], p[len(real) :, 1], s=6, alpha=0.6, c="tab:red", label=labels[1])
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=3)
  fig.tight_layout()
  _save(fig, path, dpi=120)
  return path


def _save(fig: Any, path: str, *, dpi: int) -> None:
  """``fig`` at ``path`` (any storage path; the format from its suffix, as savefig does), written
  whole; the figure is closed."""
  buf = io.BytesIO()
  fig.savefig(buf, format=storage.path(path).suffix.lstrip(".") or "png", dpi=dpi)
  plt.close(fig)
  storage.write_bytes(path, buf.getvalue())


def plot_alignment_tsne(
  path: str,
  real_before,
  gen_before,
  real_after,
  gen_after,
  *,
  method: str = "tsne",
  seed: int = 0,
  max_iter: int = 1000,
) -> str:
  """Two panels, 'before alignment' and 'after alignment', of real vs generated embeddings."""
  return plot_embeddings(
    path,
    [("before alignment", real_before, gen_before), ("after alignment", real_after, gen_after)],
    method=method,
    seed=seed,
    max_iter=max_iter,
  )


def read_metrics_jsonl(path: str) -> list[dict]:
  """Rows of a metrics.jsonl (any storage path); a malformed line raises naming the file and line
  number."""
  rows = []
  for i, line in enumerate(storage.path(path).read_text().split("\n"), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except ValueError as e:
        raise InputError(f"{path}:{i}: not JSON: {e}") from None
  return rows


def plot_training_curves(metrics_jsonl: str, path: str, step_key: str = "step") -> str:
  """Training curves PNG of a metrics.jsonl (``plot_curves``)."""
  return plot_curves(read_metrics_jsonl(metrics_jsonl), path, step_key, source=metrics_jsonl)


def plot_curves(
  rows: Sequence[dict], path: str, step_key: str = "step", *, source: str = "metrics"
) -> str:
  """Training curves PNG of metric rows: loss, pair accuracy, lr, and any α / gap / cma keys
  found. Panels without a matching numeric key are omitted; a key goes in the first panel it
  matches; ``source`` names the rows in the error when none can be plotted."""
  keys = sorted(
    {k for r in rows for k, v in r.items() if k != step_key and isinstance(v, int | float)}
  )
  used: set[str] = set()
  panels = []
  for title, match in _CURVE_PANELS:
    ks = [k for k in keys if k not in used and match(k.lower())]
    used.update(ks)
    if ks:
      panels.append((title, ks))
  if not panels:
    raise InputError(f"{source}: no loss/accuracy/lr/alpha/gap metrics to plot")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
  for ax, (title, ks) in zip(axes[0], panels, strict=True):
    for k in ks:
      pts = [
        (r.get(step_key, i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), int | float)
      ]
      xs, ys = zip(*pts, strict=True)
      ax.plot(xs, ys, label=k, marker="." if len(pts) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel(step_key)
    ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path, dpi=110)
  return path


def plot_gap_tsne(
  path: str,
  gap_ev: Any,
  teacher: Any,
  student: Any,
  *,
  max_points: int = 500,
  seed: int = 0,
  method: str = "tsne",
) -> str:
  """Before (teacher on both) / after (student on generated) t-SNE of a generated-real gap eval
  set (``gap_ev.x_items`` generated, ``y_items`` real; up to ``max_points`` pairs)."""
  real_t, gen_t, gen_s = gap_tsne_points(gap_ev, teacher, student, max_points=max_points, seed=seed)
  return plot_alignment_tsne(path, real_t, gen_t, real_t, gen_s, method=method, seed=seed)


def gap_tsne_points(
  gap_ev: Any, teacher: Any, student: Any, *, max_points: int = 500, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """What ``plot_gap_tsne`` draws: (real under the teacher, generated under the teacher,
  generated under the student) for up to ``max_points`` pairs drawn with ``seed``. With several
  processes the encoders embed collectively: every process calls this, one plots."""
  n = len(gap_ev.x_items)
  idx = np.sort(np.random.default_rng(seed).permutation(n)[:max_points])
  gen = [gap_ev.x_items[i] for i in idx]
  real = [gap_ev.y_items[i] for i in idx]
  bs = gap_ev.batch_size
  real_t = common.encode_in_batches(teacher.encode_images, real, bs)
  gen_t = common.encode_in_batches(lambda b: common.encode_generated(teacher, b), gen, bs)
  gen_s = common.encode_in_batches(lambda b: common.encode_generated(student, b), gen, bs)
  return real_t, gen_t, gen_s


def plot_task_vs_gap(
  rows: Sequence[dict],
  gap_keys: Sequence[str],
  task_keys: Sequence[str],
  path: str,
  *,
  color_key: str = "alpha_target",
  task_labels: Sequence[str] | None = None,
) -> str:
  """Grid PNG: task metric (row; ``task_labels`` names it, default its key) against gap metric
  (column). Each checkpoint is a small point (colour = ``color_key``; None, the teacher, black);
  the per-setting seed means (regression.seed_means, grouped by ``color_key``) are large markers,
  and the line and R² are the OLS fit over those means — the sweep's headline ``r2``."""
  from gmail_jax.evaluators import regression

  labels = list(task_labels) if task_labels is not None else list(task_keys)
  fig, axes = plt.subplots(
    len(task_keys),
    len(gap_keys),
    figsize=(3.2 * len(gap_keys), 2.8 * len(task_keys)),
    squeeze=False,
  )
  for i, tk in enumerate(task_keys):
    for j, gk in enumerate(gap_keys):
      ax = axes[i][j]
      pts = regression.complete_rows(rows, gk, tk)
      g = np.array([r[gk] for r in pts], np.float64)
      t = np.array([r[tk] for r in pts], np.float64)
      c = [r.get(color_key) for r in pts]
      learned = [k for k, v in enumerate(c) if v is not None]
      fixed = [k for k, v in enumerate(c) if v is None]
      vmin = min((c[k] for k in learned), default=0.0)
      vmax = max((c[k] for k in learned), default=1.0)
      if learned:
        sc = ax.scatter(
          g[learned],
          t[learned],
          c=[c[k] for k in learned],
          cmap="viridis",
          s=8,
          alpha=0.4,
          vmin=vmin,
          vmax=vmax,
        )
        if i == 0 and j == len(gap_keys) - 1:
          fig.colorbar(sc, ax=ax, label=color_key)
      if fixed:
        ax.scatter(g[fixed], t[fixed], c="black", marker="x", s=10, alpha=0.4)
      settings, gm, tm = regression.seed_means(pts, gk, tk, color_key)
      for setting, x, y in zip(settings, gm, tm, strict=True):
        if setting is None:
          ax.scatter([x], [y], c="black", marker="X", s=60)
        else:
          ax.scatter(
            [x], [y], c=[setting], cmap="viridis", vmin=vmin, vmax=vmax, s=60, edgecolors="black"
          )
      title = gk
      if gm.size >= 2:
        a, b, r2 = regression.ols_fit(gm, tm)
        xs = np.linspace(gm.min(), gm.max(), 2)
        ax.plot(xs, a + b * xs, "r-", lw=1)
        title = f"{gk}  R²(means)={r2:.3f}"
      ax.set_title(title, fontsize=9)
      ax.set_xlabel(gk, fontsize=8)
      ax.set_ylabel(labels[i], fontsize=8)
  fig.tight_layout()
  _save(fig, path, dpi=110)
  return path
