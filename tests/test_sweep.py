"""TPC-CMA sweep pieces: OLS R², the teacher's logit scale as the image-text default, the convex /
additive forms and the re-weighted InfoNCE, the sweep table's statistics (headline R² over the
per-setting means, not pooled), its retrieval-labelled task, atomic writes and re-deriving the
statistics from a sweep.json, and the sweep's smoke mode end to end."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from gmail_jax import objectives
from gmail_jax import run as run_lib
from gmail_jax.captioning import decap
from gmail_jax.evaluators import plots, regression
from gmail_jax.experiments import sweep
from gmail_jax.objectives import losses
from gmail_jax.training import train


def _lstsq_r2(g, t):
  design = np.stack([np.ones_like(g), g], 1)
  coef, *_ = np.linalg.lstsq(design, t, rcond=None)
  resid = t - design @ coef
  return 1.0 - resid @ resid / np.sum((t - t.mean()) ** 2)


def test_r2_equals_numpy_least_squares():
  rng = np.random.default_rng(0)
  rows = [
    {"raw": g, "distribution": 0.5 * g + rng.normal(0, 0.3), "acc": 1.0 - g + rng.normal(0, 0.2)}
    for g in rng.uniform(0, 1, 12)
  ]
  rows.append({"raw": 0.3, "distribution": None, "acc": 0.9})  # skipped for distribution only
  table = regression.r2_table(rows, ("raw", "distribution"), ("acc",))
  for gk, r2 in ((gk, table[gk]["acc"]) for gk in ("raw", "distribution")):
    pts = [(r[gk], r["acc"]) for r in rows if r[gk] is not None]
    g, t = (np.array(v) for v in zip(*pts, strict=True))
    assert r2 == pytest.approx(_lstsq_r2(g, t), abs=1e-9)
    assert 0.0 < r2 < 1.0
  a, b, r2 = regression.ols_fit([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
  assert (a, b, r2) == pytest.approx((1.0, 2.0, 1.0), abs=1e-12)
  assert math.isnan(regression.ols_fit([0.0, 1.0], [2.0, 2.0])[2])


def _tpc_config(**cma):
  c = tiny.get_config()
  c.loss.mode = "tpc_cma"
  c.cma.update(pairs="image_text", anchor_frac=0.0, ramp_frac=0.0, **cma)
  c.total_steps = 4
  return c


def _loss_and_grad(config, z, targets, step=3):
  obj = objectives.make(config)

  def total(z):
    parts, _ = obj.parts({}, z, targets, jnp.asarray(step))
    w, _ = obj.weights(parts, jnp.asarray(step), jnp.asarray([1.0, 1.0]))
    return jnp.sum(jax.lax.stop_gradient(w) * parts)

  return jax.value_and_grad(total)(z)


def test_convex_form_is_its_formula_and_equals_additive_at_alpha_zero():
  kz, kt = jax.random.split(jax.random.key(0))
  z = jax.random.normal(kz, (8, 16))
  targets = objectives.Targets(
    None, jax.random.normal(kt, (8, 16)), jnp.float32(30.0), jnp.arange(8)
  )
  out = {
    (form, a): _loss_and_grad(_tpc_config(form=form, alpha_target=a), z, targets)
    for form in ("additive", "convex")
    for a in (0.0, 0.5)
  }
  (l_add, g_add), (l_cvx, g_cvx) = out["additive", 0.0], out["convex", 0.0]
  assert float(l_add) == float(l_cvx)
  np.testing.assert_array_equal(np.asarray(g_add), np.asarray(g_cvx))
  # At α = 0.5 (stabilize phase, cap ρ·|∇NCE|/|∇CMA| = 1 with unit part norms): additive is
  # L_NCE + 0.5·L_CMA and convex (1 − 0.5)·L_NCE + 0.5·L_CMA, so they differ by 0.5·L_NCE.
  (l_add, g_add), (l_cvx, g_cvx) = out["additive", 0.5], out["convex", 0.5]
  obj = objectives.make(_tpc_config(form="convex", alpha_target=0.5))
  nce, cma = (lambda z, i=i: obj.parts({}, z, targets, jnp.asarray(3))[0][i] for i in (0, 1))
  assert float(l_cvx) == pytest.approx(0.5 * float(nce(z)) + 0.5 * float(cma(z)), rel=1e-6)
  assert float(l_add) == pytest.approx(float(nce(z)) + 0.5 * float(cma(z)), rel=1e-6)
  assert float(l_add) - float(l_cvx) == pytest.approx(0.5 * float(nce(z)), rel=1e-5)
  g_nce, g_cma = np.asarray(jax.grad(nce)(z)), np.asarray(jax.grad(cma)(z))
  np.testing.assert_allclose(np.asarray(g_cvx), 0.5 * g_nce + 0.5 * g_cma, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_add - g_cvx), 0.5 * g_nce, rtol=1e-4, atol=1e-7)
  assert np.abs(g_nce).max() > 1e-3  # the difference is not trivially zero


def test_reweighted_infonce_matches_its_formula():
  kx, ky = jax.random.split(jax.random.key(1))
  x, y = jax.random.normal(kx, (5, 6)), jax.random.normal(ky, (5, 6))
  plain, _ = losses.clip_loss(x, y, 10.0)
  assert float(losses.clip_loss(x, y, 10.0, neg_beta=0.0)[0]) == pytest.approx(float(plain))
  beta, scale = 2.0, 10.0
  got, _ = losses.gen_real_infonce(x, y, 1.0 / scale, neg_beta=beta)
  s = np.asarray(losses.l2_normalize(x) @ losses.l2_normalize(y).T, np.float64)
  want = []
  for i in range(5):
    neg = [j for j in range(5) if j != i]
    w = np.exp(beta * s[i, neg]) / np.mean(np.exp(beta * s[i, neg]))
    den = np.exp(scale * s[i, i]) + np.sum(w * np.exp(scale * s[i, neg]))
    want.append(np.log(den) - scale * s[i, i])
  assert float(got) == pytest.approx(np.mean(want), rel=1e-5)
  assert abs(float(got) - float(losses.gen_real_infonce(x, y, 1.0 / scale)[0])) > 1e-4


@pytest.mark.slow
def test_image_text_default_temperature_is_the_teachers(tmp_path):
  teacher_scale = 20.0  # not CLIP's init 1/0.07, so the source is visible
  c = _tpc_config(alpha_target=0.5)
  c.total_steps = c.checkpoint_every_steps = c.log_every_steps = 2
  c.async_checkpoints = False
  c.model.overrides.logit_scale_init = math.log(teacher_scale)
  train.train_and_evaluate(c, str(tmp_path / "auto"))
  run = run_lib.load_run(tmp_path / "auto")
  exp_scale = float(np.exp(np.asarray(run.teacher.logit_scale[...])))
  assert exp_scale == pytest.approx(teacher_scale, rel=1e-6)
  logged = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").open()]
  assert logged[-1]["train/temperature"] == pytest.approx(1.0 / exp_scale, rel=1e-6)
  row = sweep.trained_with(run, student=True)
  assert row["temperature_from"] == "teacher"
  assert row["logit_scale"] == pytest.approx(exp_scale, rel=1e-6)
  # gen_real keeps GMAIL's fixed 0.07; 'teacher' there is refused by name.
  c.cma.pairs = "gen_real"
  assert objectives.get("tpc_cma").temperature_from(c) == "config"
  c.loss.temperature_from = "teacher"
  with pytest.raises(ValueError, match=r"config\.loss\.temperature_from"):
    objectives.validate(c)


def _table(rows, tasks=sweep.TASKS["image_text"]):
  """A sweep table as run_sweep builds it, before add_stats."""
  return {
    "config": "configs/tpc_cma.py",
    "extra_arg": "",
    "pairs": "image_text",
    "form": "additive",
    "nce": "infonce",
    "seeds": sorted({r["seed"] for r in rows}),
    "alphas": sorted({r["alpha_target"] for r in rows if r["alpha_target"] is not None}),
    "n_pairs": 40,
    "gap_metrics": list(sweep.GAPS),
    "task_metrics": list(tasks),
    "rows": rows,
    "summary": sweep.summarize(rows, (*sweep.GAPS, *tasks)),
  }


def _seed_shifted_rows():
  """3 seeds × (teacher + 5 α): per setting the tasks are orthogonal to every gap (R² over the
  means 0), but each seed shifts gaps and tasks together, so the pooled rows fit that shift."""
  g = np.array([1.0, 0.8, 0.5, 0.4, 0.35, 0.3])
  dg = g - g.mean()
  base = np.array([0.3, 0.9, 0.1, 0.7, 0.2, 0.6])
  t = base - (base - base.mean()) @ dg / (dg @ dg) * dg
  rows = []
  for seed, d in ((0, -1.0), (1, 0.0), (2, 1.0)):
    for i, a in enumerate((None, 0.0, 0.05, 0.2, 0.5, 1.0)):
      row = {"run": f"seed_{seed}/alpha_{a}", "seed": seed, "alpha_target": a}
      row.update({gk: g[i] + d + 0.01 * k for k, gk in enumerate(sweep.GAPS)})
      row.update({tk: t[i] - 3.0 * d + 0.1 * k for k, tk in enumerate(sweep.TASKS["image_text"])})
      row["reduction_vs_teacher"] = row["reduction_vs_alpha0"] = None
      rows.append(row)
  return rows


def test_sweep_r2_is_over_the_per_setting_means_not_the_pooled_rows():
  rows = _seed_shifted_rows()
  table = sweep.add_stats(_table(rows))
  pooled = regression.r2_table(rows, sweep.GAPS, sweep.TASKS["image_text"])  # the earlier r2
  for gk in sweep.GAPS:
    for tk in sweep.TASKS["image_text"]:
      means = {}
      for r in rows:
        means.setdefault(r["alpha_target"], []).append((r[gk], r[tk]))
      g, t = (np.array([np.mean([p[i] for p in v]) for v in means.values()]) for i in (0, 1))
      assert table["r2"][gk][tk] == pytest.approx(_lstsq_r2(g, t), abs=1e-9)
      assert table["r2"][gk][tk] < 1e-9 < 0.85 < pooled[gk][tk]
      cell = table["stats"][gk][tk]
      assert cell["r2"] == table["r2"][gk][tk]
      assert cell["pooled_r2"] == pytest.approx(pooled[gk][tk], abs=1e-12)
      assert (cell["n_points"], cell["n_seeds"], cell["n_rows"]) == (6, 3, 18)
  assert table["stats_bootstrap"] == {"resamples": 2000, "rng_seed": 0}
  md = sweep.markdown(table)
  assert "over the per-setting seed means" in md and "2000 resamples of the seeds" in md
  assert "Within-seed R²" in md and "Spearman ρ" in md and "Pooled R² over all 18 rows" in md
  cell = table["stats"]["raw"]["zeroshot_top1"]
  lo, hi = cell["bootstrap_ci95"]
  within = cell["within_seed_r2"]
  assert f"| raw | {cell['r2']:.3f} [{lo:.3f}, {hi:.3f}] |" in md
  assert f"| raw | {within['mean']:.3f} ± {within['std']:.3f} |" in md
  assert f"| raw | {cell['spearman']:.3f} |" in md
  assert f"| raw | {cell['pooled_r2']:.3f} |" in md


def test_decap_proj_cider_is_labelled_retrieval_and_not_counted():
  assert decap.PROJECTION_TAU == 0.01  # the τ TASK_NOTES states
  rows = _seed_shifted_rows()
  table = sweep.add_stats(_table(rows))
  assert "decap_proj_cider" in table["task_metrics"] and "decap_proj_cider" in rows[0]
  assert table["independent_task_metrics"] == [
    "zeroshot_top1",
    "joint_ari",
    "probe_acc",
    "decap_cider",
  ]
  assert "retrieval at τ = 0.01" in table["task_notes"]["decap_proj_cider"]
  md = sweep.markdown(table)
  headers = [line for line in md.splitlines() if line.startswith("| α_target") or "| gap |" in line]
  assert len(headers) == 5
  for line in headers:
    cells = [c.strip() for c in line.split("|")]
    assert "decap_proj_cider (retrieval)" in cells and "decap_proj_cider" not in cells
  assert "Independent task metrics (4): zeroshot_top1, joint_ari, probe_acc, decap_cider." in md
  assert "decap_proj_cider (retrieval): " in md
  assert sweep.task_label("decap_cider") == "decap_cider"
  gen_real = sweep.add_stats({**_table(rows), "task_metrics": list(sweep.TASKS["gen_real"])})
  assert gen_real["independent_task_metrics"] == list(sweep.TASKS["gen_real"])
  assert gen_real["task_notes"] == {}


def test_write_outputs_is_atomic(tmp_path, monkeypatch):
  old = sweep.add_stats(_table(_seed_shifted_rows()[:12]), n_resamples=50)
  sweep.write_outputs(old, str(tmp_path), plot=False)
  before = {n: (tmp_path / n).read_bytes() for n in ("sweep.json", "sweep.md")}
  assert json.loads(before["sweep.json"])["rows"] == old["rows"]
  new = sweep.add_stats(_table(_seed_shifted_rows()), n_resamples=50)
  real_dump = json.dump

  def crash(obj, f, **kw):  # part of the file, then the process dies
    f.write(json.dumps(obj, **kw)[:100])
    raise KeyboardInterrupt("killed during json.dump")

  monkeypatch.setattr(sweep.json, "dump", crash)
  with pytest.raises(KeyboardInterrupt):
    sweep.write_outputs(new, str(tmp_path), plot=False)
  assert {n: (tmp_path / n).read_bytes() for n in before} == before
  assert sorted(os.listdir(tmp_path)) == ["sweep.json", "sweep.md"]  # no temporary file left
  monkeypatch.setattr(sweep.json, "dump", real_dump)
  sweep.write_outputs(new, str(tmp_path))
  assert len(json.loads((tmp_path / "sweep.json").read_text())["rows"]) == 18
  assert (tmp_path / "sweep.md").read_text() == sweep.markdown(new)
  assert sorted(os.listdir(tmp_path)) == ["sweep.json", "sweep.md", "sweep_r2.png"]


def test_write_outputs_to_a_bucket(gcs_dir):
  from gmail_jax import storage

  table = sweep.add_stats(_table(_seed_shifted_rows()), n_resamples=50)
  sweep.write_outputs(table, gcs_dir)
  assert sorted(p.name for p in storage.path(gcs_dir).iterdir()) == [
    "sweep.json",
    "sweep.md",
    "sweep_r2.png",
  ]
  assert storage.path(f"{gcs_dir}/sweep.md").read_text() == sweep.markdown(table)
  again = sweep.stats_from_sweep_json(f"{gcs_dir}/sweep.json", n_resamples=50)
  assert _same(again["stats"], table["stats"])


def _same(a, b) -> bool:
  """Equal nested JSON values, nan equal to nan (json writes both as NaN)."""
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_stats_from_sweep_json_rederives_the_statistics(tmp_path):
  rows = _seed_shifted_rows()
  rows[5]["decap_cider"] = None  # a missing value survives the JSON round trip as null
  # A sweep.json of the earlier layout: rows, metrics lists and the pooled r2, no stats.
  legacy = {**_table(rows), "r2": regression.r2_table(rows, sweep.GAPS, sweep.TASKS["image_text"])}
  (tmp_path / "sweep.json").write_text(json.dumps(legacy, indent=2))
  got = sweep.stats_from_sweep_json(str(tmp_path / "sweep.json"))
  tasks = sweep.TASKS["image_text"]
  assert _same(got["stats"], regression.sweep_stats(rows, sweep.GAPS, tasks))
  assert got["r2"]["raw"]["zeroshot_top1"] == got["stats"]["raw"]["zeroshot_top1"]["r2"]
  assert got["r2"]["raw"]["zeroshot_top1"] != legacy["r2"]["raw"]["zeroshot_top1"]
  assert got["independent_task_metrics"] == [t for t in tasks if t != "decap_proj_cider"]
  assert got["stats"]["raw"]["decap_cider"]["n_rows"] == 17
  assert "Within-seed R²" in sweep.markdown(got)
  # What a sweep writes is what re-deriving from its rows gives, to the bit.
  sweep.write_outputs(sweep.add_stats(_table(rows)), str(tmp_path), plot=False)
  saved = json.loads((tmp_path / "sweep.json").read_text())
  again = sweep.stats_from_sweep_json(str(tmp_path / "sweep.json"))
  assert _same(again["stats"], saved["stats"]) and _same(again["r2"], saved["r2"])
  # Tables without the metrics lists: GAPS and the known tasks the rows have.
  bare = tmp_path / "bare.json"
  bare.write_text(json.dumps({"rows": rows}))
  got = sweep.stats_from_sweep_json(str(bare))
  assert got["gap_metrics"] == list(sweep.GAPS) and got["task_metrics"] == list(tasks)


def test_task_vs_gap_figure_fits_the_means_and_labels_retrieval(tmp_path, monkeypatch):
  rows = _seed_shifted_rows()
  figs = []
  monkeypatch.setattr(plots.plt, "close", figs.append)
  tasks = ["zeroshot_top1", "decap_proj_cider"]
  plots.plot_task_vs_gap(
    rows, ["raw"], tasks, str(tmp_path / "f.png"), task_labels=[sweep.task_label(t) for t in tasks]
  )
  axes = figs[0].axes
  assert [ax.get_ylabel() for ax in axes[:2]] == ["zeroshot_top1", "decap_proj_cider (retrieval)"]
  r2 = regression.r2_of_means(rows, "raw", "decap_proj_cider")
  assert axes[1].get_title() == f"raw  R²(means)={r2:.3f}"
  assert (tmp_path / "f.png").stat().st_size > 0


@pytest.mark.slow
def test_sweep_smoke_writes_rows_and_r2(tmp_path, fit_devices):
  table = sweep.run_sweep(
    "configs/tpc_cma.py",
    [0.0, 1.0],
    str(tmp_path),
    extra_arg="mode=smoke",
    max_per_class=10,
    seeds=[0],
    decap_steps=40,
  )
  # The teacher's pretraining, then the seed's DeCap decoder: each on one device, not replicated
  # over the 8 of the runs' mesh.
  assert jax.device_count() == 8 and fit_devices == [{jax.devices()[0]}] * 2
  saved = json.loads((tmp_path / "sweep.json").read_text())
  for gk, by_task in table["r2"].items():
    assert saved["r2"][gk] == pytest.approx(by_task, nan_ok=True)
  rows = saved["rows"]
  assert [(r["seed"], r["alpha_target"]) for r in rows] == [(0, None), (0, 0.0), (0, 1.0)]
  teacher, *students = rows
  for r in students:
    assert r["form"] == "additive" and r["nce"] == "infonce"
    assert r["logit_scale"] == pytest.approx(teacher["logit_scale"], rel=1e-6)  # the default
    assert r["reduction_vs_alpha0"] is not None
  assert set(saved["r2"]) == set(sweep.GAPS)
  tasks = sweep.TASKS["image_text"]
  assert _same(saved["stats"], regression.sweep_stats(rows, sweep.GAPS, tasks))
  for gk in sweep.GAPS:
    for tk in tasks:
      # One seed: each setting's mean is its one row, so r2 is the fit over the 3 rows.
      g = np.array([r[gk] for r in rows])
      t = np.array([r[tk] for r in rows])
      if np.ptp(t) > 0:
        assert saved["r2"][gk][tk] == pytest.approx(_lstsq_r2(g, t), abs=1e-9)
      cell = saved["stats"][gk][tk]
      assert (cell["n_points"], cell["n_seeds"], cell["n_rows"]) == (3, 1, 3)
      assert cell["bootstrap_ci95"] == [None, None] or all(map(math.isnan, cell["bootstrap_ci95"]))
  assert (tmp_path / "seed_0" / "alpha_1" / "stages").is_dir()
  assert (tmp_path / "sweep_r2.png").stat().st_size > 0
  md = (tmp_path / "sweep.md").read_text()
  assert md == sweep.markdown(saved) and "decap_proj_cider (retrieval)" in md
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
