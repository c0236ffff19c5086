"""Ordinary least-squares R² of task quality on a gap metric (TPC-CMA's analysis, papers.md §B.3).

For points (g_i, t_i), i = 1..n (one per checkpoint: teacher, each α, each seed), the fitted line
t = a + b·g has

    b = Σ (g_i − ḡ)(t_i − t̄) / Σ (g_i − ḡ)²,   a = t̄ − b·ḡ
    R² = 1 − Σ (t_i − a − b g_i)² / Σ (t_i − t̄)²

(the squared Pearson correlation). A constant gap fits only the mean (b = 0, R² = 0); a constant
task metric has no variance to explain (R² = nan).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def ols_fit(gap: Any, task: Any) -> tuple[float, float, float]:
  """(a, b, R²) of the least-squares line task = a + b·gap over paired 1-D arrays (n >= 2)."""
  g = np.asarray(gap, np.float64).reshape(-1)
  t = np.asarray(task, np.float64).reshape(-1)
  if g.shape != t.shape or g.size < 2:
    raise ValueError(
      f"ols_fit: need two equal-length arrays of >= 2 points, got {g.size}, {t.size}"
    )
  dg, dt = g - g.mean(), t - t.mean()
  sxx = float(dg @ dg)
  b = float(dg @ dt) / sxx if sxx > 0 else 0.0
  a = float(t.mean()) - b * float(g.mean())
  ss_tot = float(dt @ dt)
  resid = t - a - b * g
  constant = bool(np.all(t == t[0]))  # (ss_tot may be round-off, not 0)
  r2 = float("nan") if constant else 1.0 - float(resid @ resid) / ss_tot
  return a, b, r2


def r2_table(
  rows: Sequence[dict], gap_keys: Sequence[str], task_keys: Sequence[str]
) -> dict[str, dict[str, float]]:
  """{gap: {task: R²}} over the rows that have both values (others skipped; < 2 rows: nan)."""
  out: dict[str, dict[str, float]] = {}
  for gk in gap_keys:
    out[gk] = {}
    for tk in task_keys:
      pts = [(r[gk], r[tk]) for r in rows if r.get(gk) is not None and r.get(tk) is not None]
      out[gk][tk] = ols_fit(*zip(*pts, strict=True))[2] if len(pts) >= 2 else float("nan")
  return out
