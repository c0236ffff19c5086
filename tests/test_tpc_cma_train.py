"""TPC-CMA training mode: config checks, logged α curriculum and cap, α reduces the gap.

Tiny random CLIP on synthetic pairs (configs/tiny.py), image-text pairs (the paper's setting): a
large α_target must leave a smaller measured image-text centroid gap than α = 0 after a few steps.
"""

import json
import math

import numpy as np
import pytest

from configs import tiny
from gmail_jax import schema
from gmail_jax.training import train

STEPS = 8
ANCHOR, RAMP = 0.25, 0.25  # Anchor: updates 0-1, Ramp: 2-3, Stabilize: 4-7


def _config(alpha_target: float, pairs: str = "image_text", rho: float = 1.0):
  c = tiny.get_config()
  c.total_steps = STEPS
  c.log_every_steps = 1
  c.checkpoint_every_steps = STEPS
  c.async_checkpoints = False
  c.lora.train_proj = True
  c.optim.lr = 1e-2
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.loss.mode = "tpc_cma"
  c.cma.update(alpha_target=alpha_target, anchor_frac=ANCHOR, ramp_frac=RAMP, pairs=pairs, rho=rho)
  return c


def _rows(workdir) -> list[dict]:
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("loss.mode", "cma", "config.loss.mode"),
    ("cma.pairs", "text_text", "config.cma.pairs"),
    ("cma.kind", "mmd", "config.cma.kind"),
    ("cma.rho", -1.0, "config.cma.rho"),
    ("loss.text_weight", 0.5, "config.loss.text_weight"),
  ],
)
def test_bad_config_names_the_key(key, value, message):
  c = _config(0.5)
  group, name = key.split(".")
  c[group][name] = value
  with pytest.raises(ValueError, match=message):
    schema.validate(c)


def test_unknown_cma_key():
  c = _config(0.5)
  c.cma.alpha = 1.0
  with pytest.raises(ValueError, match=r"config\.cma\.alpha: unknown key"):
    schema.validate(c)


def test_tpc_cma_logs_curriculum_and_reduces_gap(tmp_path):
  alpha_target = 4.0
  rho = 4.0  # at rho = 1 the cap holds alpha_eff near 1 here: too weak to act within 8 steps
  train.train_and_evaluate(_config(alpha_target, rho=rho), str(tmp_path / "cma"))
  train.train_and_evaluate(_config(0.0), str(tmp_path / "base"))
  cma, base = _rows(tmp_path / "cma"), _rows(tmp_path / "base")
  assert [r["step"] for r in cma] == list(range(1, STEPS + 1))

  for r in cma:
    t = r["step"] - 1  # logged step s is update index s - 1
    u = min(max((t - ANCHOR * STEPS) / (RAMP * STEPS), 0.0), 1.0)
    assert r["train/alpha"] == pytest.approx(alpha_target * u, rel=1e-5, abs=1e-7)
    cap = rho * r["train/grad_norm_nce"] / (r["train/grad_norm_cma"] + 1e-8)
    assert r["train/alpha_eff"] == pytest.approx(min(r["train/alpha"], cap), rel=1e-4, abs=1e-7)
    assert r["train/grad_norm_nce"] > 0 and r["train/grad_norm_cma"] > 0
    # The logged batch gaps satisfy the exact decomposition G_raw² = G_C² + G_D².
    g_c, g_d = r["train/centroid_gap"], r["train/distribution_gap"]
    assert r["train/raw_gap"] == pytest.approx(math.hypot(g_c, g_d), rel=1e-4)
    assert r["train/loss"] == pytest.approx(
      r["train/nce_loss"] + r["train/alpha_eff"] * r["train/cma_loss"], rel=1e-4
    )
  # Anchor phase: α = 0 so both runs take identical updates.
  assert [r["train/alpha"] for r in cma[:2]] == [0.0, 0.0]
  assert cma[1]["train/centroid_gap"] == pytest.approx(base[1]["train/centroid_gap"], rel=1e-5)
  assert cma[-1]["train/alpha_eff"] > 0.5  # the cap did not switch alignment off
  assert all(r["train/alpha_eff"] == 0.0 for r in base)

  def tail(rows):
    return np.mean([r["train/centroid_gap"] for r in rows[-2:]])

  assert tail(cma) < 0.9 * tail(base), (tail(cma), tail(base))


def test_image_text_training_evals_follow_the_student(shared, tmp_path):
  """Image-text alignment trains f_g on real images: training-time evals must embed real images
  with the student (not the frozen teacher), so their numbers move as it trains."""
  coco = shared("coco-mini")
  c = _config(1.0)
  c.evals.gap = dict(
    type="gap",
    pairs="image_text",
    images_dir=str(coco / "val2017"),
    captions_json=str(coco / "annotations" / "captions_val2017.json"),
    max_pairs=16,
    batch_size=16,
    every_steps=4,
  )
  c.data.image_size = c.data.synthetic_image_size = 32
  train.train_and_evaluate(c, str(tmp_path))
  rows = [r for r in _rows(tmp_path) if "z/gap/raw" in r]
  assert [r["step"] for r in rows] == [4, 8]
  assert rows[0]["z/gap/raw"] != rows[1]["z/gap/raw"]


def test_cache_with_image_text_pairs_is_refused_before_building(tmp_path):
  c = _config(0.5)
  c.teacher_cache.enabled = True
  with pytest.raises(ValueError, match=r"config\.teacher_cache\.enabled"):
    train.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
