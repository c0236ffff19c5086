"""Ordinary least-squares R² of task quality on a gap metric (TPC-CMA's analysis, papers.md §B.3),
and the statistics a seeded α sweep reports with it.

For points (g_i, t_i), i = 1..n, the fitted line t = a + b·g has

    b = Σ (g_i − ḡ)(t_i − t̄) / Σ (g_i − ḡ)²,   a = t̄ − b·ḡ
    R² = 1 − Σ (t_i − a − b g_i)² / Σ (t_i − t̄)²

(the squared Pearson correlation). A constant gap fits only the mean (b = 0, R² = 0); a constant
task metric has no variance to explain (R² = nan).

A sweep's rows are checkpoints: per seed, one teacher row (``alpha_target`` None) and one row per
α. Pooling every row in one fit (``r2_table``) mixes the between-seed variance with the α effect
and gives the teacher rows, far from the students, high leverage. ``sweep_stats`` therefore
reports as its headline the R² over the per-setting seed means (one point for the teacher rows,
one per α, as the paper reports one point per checkpoint setting), and beside it the R² within
each seed, a bootstrap interval of the headline over seeds and Spearman's ρ of the means.

Missing values: a row whose gap or task value is None or nan is skipped for that (gap, task);
any fit over fewer than 2 points is nan.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

GROUP_KEY = "alpha_target"  # the setting a row belongs to (None = the teacher)
SEED_KEY = "seed"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


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


def _r2(gap: Any, task: Any) -> float:
  """ols_fit's R², nan under 2 points."""
  return ols_fit(gap, task)[2] if len(gap) >= 2 else float("nan")


def r2_table(
  rows: Sequence[dict], gap_keys: Sequence[str], task_keys: Sequence[str]
) -> dict[str, dict[str, float]]:
  """{gap: {task: R²}} pooled over every row that has both values (others skipped; < 2: nan) —
  one point per row, whatever its seed or setting (the sweep's ``pooled_r2``)."""
  out: dict[str, dict[str, float]] = {}
  for gk in gap_keys:
    out[gk] = {}
    for tk in task_keys:
      pts = complete_rows(rows, gk, tk)
      out[gk][tk] = _r2([r[gk] for r in pts], [r[tk] for r in pts])
  return out


def _has(value: Any) -> bool:
  return value is not None and not (isinstance(value, numbers.Real) and math.isnan(value))


def complete_rows(rows: Sequence[dict], gap_key: str, task_key: str) -> list[dict]:
  """The rows that have both a gap and a task value (not None, not nan)."""
  return [r for r in rows if _has(r.get(gap_key)) and _has(r.get(task_key))]


def seed_means(
  rows: Sequence[dict], gap_key: str, task_key: str, group_key: str = GROUP_KEY
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
  """(settings, ḡ [A], t̄ [A]): per setting α (``group_key``; None = the teacher rows), in order of
  first appearance, the means over its complete rows R_α (one per seed):

      ḡ_α = (1/|R_α|) Σ_{r ∈ R_α} g_r,   t̄_α = (1/|R_α|) Σ_{r ∈ R_α} t_r

  A setting with no complete row has no point."""
  groups: dict[Hashable, list[dict]] = {}
  for r in complete_rows(rows, gap_key, task_key):
    groups.setdefault(r.get(group_key), []).append(r)
  g = np.array([np.mean([r[gap_key] for r in rs]) for rs in groups.values()], np.float64)
  t = np.array([np.mean([r[task_key] for r in rs]) for rs in groups.values()], np.float64)
  return list(groups), g, t


def r2_of_means(
  rows: Sequence[dict], gap_key: str, task_key: str, group_key: str = GROUP_KEY
) -> float:
  """The headline: R² (module docstring) of the OLS line over the A points (ḡ_α, t̄_α) of
  ``seed_means`` — one per setting, so each seed counts once per setting and the teacher is one
  point, not one per seed. A < 2: nan."""
  _, g, t = seed_means(rows, gap_key, task_key, group_key)
  return _r2(g, t)


def within_seed_r2(
  rows: Sequence[dict], gap_key: str, task_key: str, seed_key: str = SEED_KEY
) -> dict[str, Any]:
  """R² within each seed and their mean ± sample std over seeds:

      R²_s = R² of the OLS line over seed s's complete rows (its teacher and each α)
      mean = (1/m) Σ_s R²_s,   std = sqrt(Σ_s (R²_s − mean)² / (m − 1))

  over the m seeds whose R²_s is defined (std 0 for m = 1; mean and std nan for m = 0).
  Returns {"mean", "std", "n" (= m), "per_seed": {str(seed): R²_s}} (str keys, as JSON has)."""
  by_seed: dict[Hashable, list[dict]] = {}
  for r in complete_rows(rows, gap_key, task_key):
    by_seed.setdefault(r.get(seed_key), []).append(r)
  per_seed = {
    str(s): _r2([r[gap_key] for r in rs], [r[task_key] for r in rs]) for s, rs in by_seed.items()
  }
  vals = np.array([v for v in per_seed.values() if not math.isnan(v)], np.float64)
  mean = float(vals.mean()) if vals.size else float("nan")
  std = float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else float("nan"))
  return {"mean": mean, "std": std, "n": int(vals.size), "per_seed": per_seed}


def _seed_key_order(s: Hashable) -> tuple:
  return (s is None, s)


def _batched_r2_of_means(gsum: np.ndarray, tsum: np.ndarray, count: np.ndarray) -> np.ndarray:
  """[B] R² of the OLS line over the per-setting means gsum/count, tsum/count ([B, A]); settings
  with count 0 have no point. Same values as ols_fit: R² = S_gt² / (S_gg·S_tt) (0 if S_gg = 0;
  nan under 2 points or for a constant task)."""
  w = count > 0
  n = w.sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    gm = np.where(w, gsum / np.where(w, count, 1), 0.0)
    tm = np.where(w, tsum / np.where(w, count, 1), 0.0)
    dg = np.where(w, gm - (gm.sum(-1) / np.maximum(n, 1))[:, None], 0.0)
    dt = np.where(w, tm - (tm.sum(-1) / np.maximum(n, 1))[:, None], 0.0)
    sxx, sxy, syy = (dg * dg).sum(-1), (dg * dt).sum(-1), (dt * dt).sum(-1)
    r2 = np.where(sxx > 0, sxy**2 / (sxx * syy), 0.0)
  constant = np.where(w, tm, -np.inf).max(-1) == np.where(w, tm, np.inf).min(-1)
  return np.where((n < 2) | constant, np.nan, r2)


class BootstrapCI(NamedTuple):
  lo: float
  hi: float
  n_valid: int  # resamples whose R² was defined (the interval is over these)


def bootstrap_r2(
  rows: Sequence[dict],
  gap_key: str,
  task_key: str,
  *,
  n_resamples: int = BOOTSTRAP_RESAMPLES,
  rng_seed: int = BOOTSTRAP_SEED,
  group_key: str = GROUP_KEY,
  seed_key: str = SEED_KEY,
) -> BootstrapCI:
  """95 % percentile bootstrap interval of ``r2_of_means``, resampling seeds with replacement.

  With the m distinct seeds of the complete rows sorted, s_0 < … < s_{m−1}, draw at once
  K = np.random.default_rng(rng_seed).integers(0, m, size=(n_resamples, m)); resample b holds the
  rows of seeds s_{K[b,0]}, …, s_{K[b,m−1]} (a seed drawn twice counts twice) and

      R²*_b = R² of the OLS line over resample b's per-setting means (seed_means)
      CI = (P_2.5, P_97.5) of the defined R²*_b   (np.percentile, linear interpolation)

  Deterministic for a given rng_seed. Fewer than 2 seeds (nothing to resample) or no defined
  R²*_b: (nan, nan)."""
  pts = complete_rows(rows, gap_key, task_key)
  seeds = sorted({r.get(seed_key) for r in pts}, key=_seed_key_order)
  if len(seeds) < 2:
    return BootstrapCI(float("nan"), float("nan"), 0)
  settings = list(dict.fromkeys(r.get(group_key) for r in pts))
  si = {s: i for i, s in enumerate(seeds)}
  ai = {a: i for i, a in enumerate(settings)}
  # Per (seed, setting) sums and counts, so a resample's means are sums over its drawn seeds.
  count, gsum, tsum = (np.zeros((len(seeds), len(settings))) for _ in range(3))
  for r in pts:
    i, j = si[r.get(seed_key)], ai[r.get(group_key)]
    count[i, j] += 1
    gsum[i, j] += r[gap_key]
    tsum[i, j] += r[task_key]
  k = np.random.default_rng(rng_seed).integers(0, len(seeds), size=(n_resamples, len(seeds)))
  r2 = _batched_r2_of_means(gsum[k].sum(1), tsum[k].sum(1), count[k].sum(1))
  r2 = r2[~np.isnan(r2)]
  if not r2.size:
    return BootstrapCI(float("nan"), float("nan"), 0)
  lo, hi = np.percentile(r2, [2.5, 97.5])
  return BootstrapCI(float(lo), float(hi), int(r2.size))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n of x, ties given the mean of the ranks they span."""
  ranks = np.empty(x.size, np.float64)
  ranks[np.argsort(x, kind="stable")] = np.arange(1, x.size + 1)
  _, inv = np.unique(x, return_inverse=True)
  return (np.bincount(inv, ranks) / np.bincount(inv))[inv]


def spearman(
  rows: Sequence[dict], gap_key: str, task_key: str, group_key: str = GROUP_KEY
) -> float:
  """Spearman's ρ over the per-setting means (ḡ_α, t̄_α) of ``seed_means``: the Pearson
  correlation of their ranks P_α = rank(ḡ_α), Q_α = rank(t̄_α) (ties: mean rank),

      ρ = Σ (P_α − P̄)(Q_α − Q̄) / sqrt(Σ (P_α − P̄)² · Σ (Q_α − Q̄)²)

  (= 1 − 6 Σ (P_α − Q_α)² / (A (A² − 1)) without ties). nan under 2 points or when either side is
  constant."""
  _, g, t = seed_means(rows, gap_key, task_key, group_key)
  if g.size < 2:
    return float("nan")
  p, q = _average_ranks(g), _average_ranks(t)
  dp, dq = p - p.mean(), q - q.mean()
  den = float(np.sqrt((dp @ dp) * (dq @ dq)))
  return float(dp @ dq) / den if den > 0 else float("nan")


def cell_stats(
  rows: Sequence[dict],
  gap_key: str,
  task_key: str,
  *,
  n_resamples: int = BOOTSTRAP_RESAMPLES,
  rng_seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
  """Every statistic of one (gap, task) — the keys ``sweep_stats`` documents."""
  pts = complete_rows(rows, gap_key, task_key)
  settings, _, _ = seed_means(pts, gap_key, task_key)
  ci = bootstrap_r2(pts, gap_key, task_key, n_resamples=n_resamples, rng_seed=rng_seed)
  return {
    "r2": r2_of_means(pts, gap_key, task_key),
    "bootstrap_ci95": [ci.lo, ci.hi],
    "bootstrap_valid": ci.n_valid,
    "within_seed_r2": within_seed_r2(pts, gap_key, task_key),
    "spearman": spearman(pts, gap_key, task_key),
    "pooled_r2": _r2([r[gap_key] for r in pts], [r[task_key] for r in pts]),
    "n_points": len(settings),
    "n_seeds": len({r.get(SEED_KEY) for r in pts}),
    "n_rows": len(pts),
  }


def sweep_stats(
  rows: Sequence[dict],
  gap_keys: Sequence[str],
  task_keys: Sequence[str],
  *,
  n_resamples: int = BOOTSTRAP_RESAMPLES,
  rng_seed: int = BOOTSTRAP_SEED,
) -> dict[str, dict[str, dict[str, Any]]]:
  """{gap: {task: stats}} of a sweep's rows (each with ``seed``, ``alpha_target`` and the values),
  stats over the complete rows of that (gap, task):

    r2               the headline, ``r2_of_means``: R² over the n_points per-setting seed means
    bootstrap_ci95   [lo, hi], ``bootstrap_r2`` (seeds resampled n_resamples times, rng_seed);
                     bootstrap_valid: how many resamples had a defined R²
    within_seed_r2   ``within_seed_r2``: {mean, std, n, per_seed: {seed: R²}}
    spearman         ``spearman``: ρ over the same per-setting means
    pooled_r2        R² over all n_rows rows in one fit (``r2_table``; the earlier headline)
    n_points         number of per-setting means (teacher + each α present)
    n_seeds, n_rows  distinct seeds, and rows, that have both values
  """
  return {
    gk: {
      tk: cell_stats(rows, gk, tk, n_resamples=n_resamples, rng_seed=rng_seed) for tk in task_keys
    }
    for gk in gap_keys
  }
