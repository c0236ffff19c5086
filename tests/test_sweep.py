"""TPC-CMA sweep pieces: OLS R², the teacher's logit scale as the image-text default, the convex /
additive forms and the re-weighted InfoNCE, and the sweep's smoke mode end to end."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from gmail_jax import objectives
from gmail_jax import run as run_lib
from gmail_jax.evaluators import regression
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


def test_sweep_smoke_writes_rows_and_r2(tmp_path):
  table = sweep.run_sweep(
    "configs/tpc_cma.py",
    [0.0, 1.0],
    str(tmp_path),
    extra_arg="mode=smoke",
    max_per_class=10,
    seeds=[0],
    decap_steps=40,
  )
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
  for gk in sweep.GAPS:
    for tk in sweep.TASKS["image_text"]:
      g = np.array([r[gk] for r in rows])
      t = np.array([r[tk] for r in rows])
      if np.ptp(t) > 0:
        assert saved["r2"][gk][tk] == pytest.approx(_lstsq_r2(g, t), abs=1e-9)
  assert (tmp_path / "seed_0" / "alpha_1" / "stages").is_dir()
  assert (tmp_path / "sweep_r2.png").stat().st_size > 0
  assert "R²" in (tmp_path / "sweep.md").read_text()
