"""The sweep's R² statistics (evaluators/regression.py) against references built here from numpy
least squares and scipy: R² over the per-setting seed means, within-seed R², the seed bootstrap,
Spearman's ρ, and the missing-value rules — with a case where the pooled R² and the R² over the
means disagree, and why."""

import math

import numpy as np
import pytest
import scipy.stats

from gmail_jax.evaluators import regression

SETTINGS = (None, 0.0, 0.05, 0.2, 0.5, 1.0)  # None = the teacher rows


def _lstsq_r2(g, t):
  g, t = np.asarray(g, np.float64), np.asarray(t, np.float64)
  design = np.stack([np.ones_like(g), g], 1)
  coef, *_ = np.linalg.lstsq(design, t, rcond=None)
  resid = t - design @ coef
  return 1.0 - resid @ resid / np.sum((t - t.mean()) ** 2)


def _noisy_rows(seeds=(0, 1, 2), settings=SETTINGS, rng_seed=0):
  """Rows like a sweep's: gap falls with α, the task rises with a seed-level offset and noise."""
  rng = np.random.default_rng(rng_seed)
  rows = []
  for s in seeds:
    offset = rng.normal(0, 0.05)
    for i, a in enumerate(settings):
      g = 1.0 - 0.12 * i + rng.normal(0, 0.03)
      rows.append(
        {
          "seed": s,
          "alpha_target": a,
          "gap": g,
          "task": 0.4 - 0.3 * g + offset + rng.normal(0, 0.02),
        }
      )
  return rows


def _means_by_hand(rows, gk="gap", tk="task"):
  """Per setting, np.mean over its rows with both values (a plain dict, not seed_means)."""
  acc = {}
  for r in rows:
    g, t = r.get(gk), r.get(tk)
    if g is None or t is None or math.isnan(g) or math.isnan(t):
      continue
    acc.setdefault(r["alpha_target"], []).append((g, t))
  return (
    np.array([np.mean([p[0] for p in v]) for v in acc.values()]),
    np.array([np.mean([p[1] for p in v]) for v in acc.values()]),
  )


def test_r2_of_means_is_least_squares_over_the_per_setting_means():
  rows = _noisy_rows()
  rows[4]["task"] = None  # seed 0, α = 0.5: skipped, its setting's mean is over seeds 1, 2
  rows[7]["gap"] = float("nan")  # seed 1, α = 0: likewise
  g, t = _means_by_hand(rows)
  settings, gm, tm = regression.seed_means(rows, "gap", "task")
  assert settings == [None, 0.0, 0.05, 0.2, 1.0, 0.5]  # in order of first appearance
  np.testing.assert_allclose(gm, g, rtol=0, atol=1e-15)
  np.testing.assert_allclose(tm, t, rtol=0, atol=1e-15)
  r2 = regression.r2_of_means(rows, "gap", "task")
  assert r2 == pytest.approx(_lstsq_r2(g, t), abs=1e-12)
  assert r2 == pytest.approx(scipy.stats.linregress(g, t).rvalue ** 2, abs=1e-12)
  assert 0.5 < r2 < 1.0
  # A setting none of whose rows has both values has no point.
  for r in rows:
    if r["alpha_target"] == 1.0:
      r["task"] = None
  assert regression.cell_stats(rows, "gap", "task", n_resamples=10)["n_points"] == 5


def _orthogonal_to(g, base):
  """base with its component along g − ḡ removed: Σ (g − ḡ)(t − t̄) = 0 exactly, so R² = 0."""
  dg = g - g.mean()
  return base - (base - base.mean()) @ dg / (dg @ dg) * dg


def test_pooled_r2_measures_the_seeds_where_the_means_show_no_alpha_effect():
  """Per setting, the task does not follow the gap at all (R² over the means ≈ 0), but each seed
  shifts the gap and the task together (a better teacher: smaller gap, better task). Pooling the
  18 rows fits that between-seed shift — R² ≈ 0.90 — which says nothing about α; the means and each
  seed on its own (the shift is constant within a seed) both give ≈ 0."""
  g_alpha = np.array([1.0, 0.8, 0.5, 0.4, 0.35, 0.3])
  t_alpha = _orthogonal_to(g_alpha, np.array([0.3, 0.9, 0.1, 0.7, 0.2, 0.6]))
  rows = [
    {"seed": s, "alpha_target": a, "gap": g + 1.0 * d, "task": t - 3.0 * d}
    for s, d in ((0, -1.0), (1, 0.0), (2, 1.0))
    for a, g, t in zip(SETTINGS, g_alpha, t_alpha, strict=True)
  ]
  pooled = regression.r2_table(rows, ("gap",), ("task",))["gap"]["task"]
  assert pooled == pytest.approx(
    _lstsq_r2([r["gap"] for r in rows], [r["task"] for r in rows]), abs=1e-12
  )
  assert pooled > 0.85  # 0.899
  stats = regression.sweep_stats(rows, ("gap",), ("task",))["gap"]["task"]
  assert stats["pooled_r2"] == pytest.approx(pooled, abs=1e-12)
  assert stats["r2"] == pytest.approx(_lstsq_r2(*_means_by_hand(rows)), abs=1e-12)
  assert stats["r2"] < 1e-12
  assert stats["within_seed_r2"]["mean"] < 1e-12
  assert (stats["n_points"], stats["n_seeds"], stats["n_rows"]) == (6, 3, 18)


def test_within_seed_r2_against_numpy_per_seed():
  rows = _noisy_rows(seeds=(3, 5, 7, 9), rng_seed=1)
  rows.append({"seed": 11, "alpha_target": None, "gap": 0.5, "task": 0.1})  # 1 point: nan
  got = regression.within_seed_r2(rows, "gap", "task")
  want = {}
  for s in (3, 5, 7, 9):
    mine = [r for r in rows if r["seed"] == s]
    want[str(s)] = _lstsq_r2([r["gap"] for r in mine], [r["task"] for r in mine])
  assert set(got["per_seed"]) == {"3", "5", "7", "9", "11"}
  assert math.isnan(got["per_seed"]["11"])
  for s, v in want.items():
    assert got["per_seed"][s] == pytest.approx(v, abs=1e-12)
  vals = np.array(list(want.values()))
  assert got["n"] == 4
  assert got["mean"] == pytest.approx(vals.mean(), abs=1e-12)
  assert got["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
  assert got["std"] > 0
  one = regression.within_seed_r2([r for r in rows if r["seed"] == 3], "gap", "task")
  assert (one["n"], one["std"]) == (1, 0.0)


def _bootstrap_by_loop(rows, n_resamples, rng_seed):
  """The documented procedure, one resample at a time, with scipy's linregress."""
  seeds = sorted({r["seed"] for r in rows})
  draws = np.random.default_rng(rng_seed).integers(0, len(seeds), size=(n_resamples, len(seeds)))
  vals = []
  for k in draws:
    resample = [r for i in k for r in rows if r["seed"] == seeds[i]]
    g, t = _means_by_hand(resample)
    if np.ptp(t) == 0:
      continue
    vals.append(scipy.stats.linregress(g, t).rvalue ** 2)
  return np.percentile(vals, [2.5, 97.5]), len(vals)


def test_bootstrap_r2_resamples_seeds_as_documented():
  rows = _noisy_rows(seeds=(0, 1, 2, 3), rng_seed=2)
  got = regression.bootstrap_r2(rows, "gap", "task", n_resamples=2000, rng_seed=7)
  (lo, hi), n = _bootstrap_by_loop(rows, 2000, 7)
  assert (got.lo, got.hi, got.n_valid) == (
    pytest.approx(lo, abs=1e-12),
    pytest.approx(hi, abs=1e-12),
    n,
  )
  assert got.lo < got.hi
  assert regression.bootstrap_r2(rows, "gap", "task", n_resamples=2000, rng_seed=7) == got
  assert regression.bootstrap_r2(rows, "gap", "task", n_resamples=2000, rng_seed=8) != got
  # α = 1 measured in seed 0 only, α = 0.5 in seeds 0, 1: resamples without them have fewer points.
  for r in rows:
    if (r["alpha_target"] == 1.0 and r["seed"] > 0) or (r["alpha_target"] == 0.5 and r["seed"] > 1):
      r["task"] = None
  got = regression.bootstrap_r2(rows, "gap", "task", n_resamples=2000, rng_seed=7)
  (lo, hi), n = _bootstrap_by_loop(rows, 2000, 7)
  assert (got.lo, got.hi, got.n_valid) == (
    pytest.approx(lo, abs=1e-12),
    pytest.approx(hi, abs=1e-12),
    n,
  )
  # Identical seeds: every resample has the same means, so the interval is the headline.
  same = [{**r, "seed": s} for s in (0, 1, 2) for r in rows if r["seed"] == 0]
  head = regression.r2_of_means(same, "gap", "task")
  ci = regression.bootstrap_r2(same, "gap", "task", n_resamples=50)
  assert ci.lo == pytest.approx(head, abs=1e-12) and ci.hi == pytest.approx(head, abs=1e-12)
  # One seed: nothing to resample.
  ci = regression.bootstrap_r2(rows[:6], "gap", "task")
  assert math.isnan(ci.lo) and math.isnan(ci.hi) and ci.n_valid == 0


def test_bootstrap_r2_drops_resamples_without_an_r2():
  """Seed 1 alone has a constant task: resamples drawing only seed 1 have no R² and are left out
  of the interval (n_valid counts the rest)."""
  rows = _noisy_rows(seeds=(0, 1), rng_seed=3)
  for r in rows:
    if r["seed"] == 1:
      r["task"] = 0.5
  got = regression.bootstrap_r2(rows, "gap", "task", n_resamples=400, rng_seed=0)
  (lo, hi), n = _bootstrap_by_loop(rows, 400, 0)
  assert 0 < n < 400 and got.n_valid == n
  assert (got.lo, got.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_spearman_equals_scipy_on_the_means(rng_seed):
  rows = _noisy_rows(rng_seed=rng_seed)
  g, t = _means_by_hand(rows)
  want = scipy.stats.spearmanr(g, t).statistic
  assert regression.spearman(rows, "gap", "task") == pytest.approx(want, abs=1e-12)
  # Ties in both: two settings with the same mean gap, three with the same mean task.
  tied = [
    {"seed": 0, "alpha_target": a, "gap": g, "task": t}
    for a, g, t in zip(
      SETTINGS, [0.9, 0.5, 0.5, 0.3, 0.2, 0.1], [0.1, 0.4, 0.4, 0.4, 0.8, 0.7], strict=True
    )
  ]
  g, t = _means_by_hand(tied)
  want = scipy.stats.spearmanr(g, t).statistic
  assert regression.spearman(tied, "gap", "task") == pytest.approx(want, abs=1e-12)
  assert -1 < want < 0


def test_missing_values_are_skipped_and_under_two_points_is_nan():
  rows = [
    {"seed": 0, "alpha_target": None, "gap": 1.0, "task": 0.1},
    {"seed": 0, "alpha_target": 0.0, "gap": None, "task": 0.3},
    {"seed": 0, "alpha_target": 1.0, "gap": 0.5, "task": float("nan")},
    {"seed": 1, "alpha_target": None, "gap": 0.8, "task": 0.2},
  ]
  s = regression.sweep_stats(rows, ("gap",), ("task",), n_resamples=20)["gap"]["task"]
  assert (s["n_points"], s["n_seeds"], s["n_rows"]) == (1, 2, 2)  # only the teacher setting
  for v in (s["r2"], s["spearman"], *s["bootstrap_ci95"], s["within_seed_r2"]["mean"]):
    assert math.isnan(v)
  assert s["pooled_r2"] == pytest.approx(1.0)  # two rows, two different points
  assert s["within_seed_r2"]["n"] == 0 and math.isnan(s["within_seed_r2"]["std"])
  assert math.isnan(regression.r2_of_means([], "gap", "task"))
  # A constant task has no variance to explain: nan, as ols_fit; a constant gap explains none.
  flat = [
    {"seed": 0, "alpha_target": a, "gap": g, "task": 0.5}
    for a, g in zip(SETTINGS, range(6), strict=True)
  ]
  assert math.isnan(regression.r2_of_means(flat, "gap", "task"))
  assert math.isnan(regression.spearman(flat, "gap", "task"))
  flat = [
    {"seed": 0, "alpha_target": a, "gap": 0.5, "task": t}
    for a, t in zip(SETTINGS, range(6), strict=True)
  ]
  assert regression.r2_of_means(flat, "gap", "task") == 0.0


def test_sweep_stats_is_the_functions_per_gap_and_task():
  rows = _noisy_rows(rng_seed=4)
  for r in rows:
    r["gap2"] = r["gap"] ** 2
  table = regression.sweep_stats(rows, ("gap", "gap2"), ("task",), n_resamples=300, rng_seed=3)
  assert set(table) == {"gap", "gap2"}
  for gk in ("gap", "gap2"):
    s = table[gk]["task"]
    assert set(s) == {
      "r2",
      "bootstrap_ci95",
      "bootstrap_valid",
      "within_seed_r2",
      "spearman",
      "pooled_r2",
      "n_points",
      "n_seeds",
      "n_rows",
    }
    ci = regression.bootstrap_r2(rows, gk, "task", n_resamples=300, rng_seed=3)
    assert s["r2"] == regression.r2_of_means(rows, gk, "task")
    assert s["bootstrap_ci95"] == [ci.lo, ci.hi] and s["bootstrap_valid"] == ci.n_valid
    assert s["within_seed_r2"] == regression.within_seed_r2(rows, gk, "task")
    assert s["spearman"] == regression.spearman(rows, gk, "task")
    assert s["pooled_r2"] == regression.r2_table(rows, (gk,), ("task",))[gk]["task"]
    assert (s["n_points"], s["n_seeds"], s["n_rows"]) == (6, 3, 18)
  assert table["gap"]["task"]["r2"] != table["gap2"]["task"]["r2"]
