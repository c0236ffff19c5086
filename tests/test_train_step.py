"""The jitted GMAIL step: LoRA-only updates, 1 vs 8 devices, exact gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from config_helpers import load_config
from flax import nnx

from gmail_jax import objectives
from gmail_jax.data import preprocess
from gmail_jax.models import towers
from gmail_jax.training import build, sharding, train_step


def tiny_config(**loss):
  c = load_config("tiny")
  c.model.variant = "mu"
  c.data.image_size = 16
  c.optim.lr = 3e-3
  c.loss.update(loss)
  return c


def batches(n, b=16, s=16, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    real = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
    noise = rng.integers(-20, 21, real.shape)
    gen = np.clip(real.astype(np.int64) + noise, 0, 255).astype(np.uint8)
    out.append(
      {
        "gen_image": gen,
        "real_image": real,
        "text": rng.integers(1, 1000, (b, 77)).astype(np.int32),
        "group": (np.arange(b) // 2).astype(np.int32),  # pairs share a real image
        "real_id": np.arange(b, dtype=np.int32),
      }
    )
  return out


def full_batch_grad_norm(config, built, params, batch, step: int) -> float:
  """||dL/dparams|| by plain jax.grad on one device: L = sum_p w_p * part_p of the whole batch,
  the weights held fixed (from per-part gradient norms when the objective asks for them). No mesh,
  no VJP cotangents, no microbatches: the reference the jitted step's gradient must equal."""
  objective = objectives.make(config)
  spec = towers.get(config.model.name).preprocess
  one = jax.devices()[0]
  frozen, rng, params = (
    jax.device_put(jax.device_get(x), one) for x in (built["frozen"], built["rng"], params)
  )
  models = built["models"]
  pixels = lambda key: preprocess.normalize(jnp.asarray(batch[key]), spec.mean, spec.std)
  teacher = nnx.merge(models.teacher, frozen)
  z_real = teacher.vision(pixels("real_image")) if objective.needs_real else None
  z_text = text_scale = None
  if objective.needs_text:
    z_text = teacher.text(jnp.asarray(batch["text"]))
    text_scale = jnp.exp(teacher.logit_scale[...].astype(jnp.float32))
  targets = objectives.Targets(z_real, z_text, text_scale, jnp.asarray(batch["group"]))
  x = pixels("real_image" if objective.student_input == "real" else "gen_image")
  drop = train_step.dropout_rngs(rng, jnp.int32(step))

  def parts(p):
    enc = {k: v for k, v in p.items() if k in ("lora", "proj")}
    head = {k: v for k, v in p.items() if k not in enc}
    z = train_step.student_embed(models, enc, frozen, drop, x)
    return objective.parts(head, z, targets, jnp.int32(step))[0]

  @jax.jit
  def grad_norm(p):
    values = parts(p)
    per_part = [jax.grad(lambda q, i=i: parts(q)[i])(p) for i in range(len(objective.part_names))]
    norms = jnp.stack([optax.tree.norm(g) for g in per_part])
    w, _ = objective.weights(values, jnp.int32(step), norms if objective.needs_part_grads else None)
    return optax.tree.norm(
      jax.tree.map(lambda *gs: sum(w[i] * g for i, g in enumerate(gs)), *per_part)
    )

  return float(grad_norm(params))


def run(config, mesh, data, tmp_path, reference_steps: int = 0):
  """Trains on ``data``; the first ``reference_steps`` steps' grad_norm are checked against
  ``full_batch_grad_norm`` (after the run, outside the mesh)."""
  checks = []
  with jax.set_mesh(mesh):
    built = build.build(config, mesh)
    state, frozen, rng = built["state"], built["frozen"], built["rng"]
    step = build.make_step(config, built, mesh)
    frozen_before = [np.asarray(x).copy() for x in jax.tree.leaves(frozen)]
    lora_before = [np.asarray(x).copy() for x in jax.tree.leaves(state["params"])]
    losses = []
    for i, b in enumerate(data):
      params = jax.device_get(state["params"]) if i < reference_steps else None
      glob = {k: sharding.put_global(v, sharding.batch_sharding(mesh)) for k, v in b.items()}
      state, m = step(state, frozen, rng, glob)
      losses.append(float(m["loss"]))
      if params is not None:
        checks.append((params, b, i, float(m["grad_norm"])))
  for params, b, i, got in checks:
    want = full_batch_grad_norm(config, built, params, b, i)
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"grad_norm of step {i}")
  return {
    "losses": np.array(losses),
    "state": jax.device_get(state),
    "frozen": frozen,
    "frozen_before": frozen_before,
    "lora_before": lora_before,
    "built": built,
  }


def test_only_lora_moves_and_frozen_is_bitwise_unchanged(tmp_path):
  config = tiny_config(text_weight=0.5, learn_temperature=True)
  config.lora.train_proj = True
  mesh = sharding.make_mesh(config.mesh)
  out = run(config, mesh, batches(4), tmp_path)
  # Frozen weights: bitwise identical after training, and never donated (still readable).
  after = [np.asarray(x) for x in jax.tree.leaves(out["frozen"])]
  for a, b in zip(out["frozen_before"], after, strict=True):
    np.testing.assert_array_equal(a, b)
  # Trainable: LoRA (+ the projection copy, + log-scale) moved.
  moved = [
    not np.array_equal(a, np.asarray(b))
    for a, b in zip(out["lora_before"], jax.tree.leaves(out["state"]["params"]), strict=True)
  ]
  assert all(moved)
  # Optimizer state exists only for the trainable pytree.
  n_params = sum(x.size for x in jax.tree.leaves(out["state"]["params"]))
  n_opt = sum(np.size(x) for x in jax.tree.leaves(out["state"]["opt"]))
  assert n_opt <= 2 * n_params + 8
  assert set(out["state"]["params"]) == {"lora", "proj", "log_scale"}
  assert np.all(np.isfinite(out["losses"]))
  assert int(out["state"]["step"]) == 4 and int(out["state"]["bad_step"]) == -1


def test_student_equals_teacher_at_step0(tmp_path):
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    built = build.build(config, mesh)
    models, frozen = built["models"], built["frozen"]
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
    t = nnx.merge(models.teacher, frozen).vision(x)
    s = train_step.student_embed(models, built["state"]["params"], frozen, built["rng"], x)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(s))


@pytest.mark.slow
def test_one_vs_eight_devices_same_losses(tmp_path):
  config = tiny_config(symmetric=True)
  data = batches(2)
  one = run(config, sharding.make_mesh(config.mesh, jax.devices()[:1]), data, tmp_path / "a", 2)
  eight = run(config, sharding.make_mesh(config.mesh), data, tmp_path / "b", 2)
  np.testing.assert_allclose(one["losses"], eight["losses"], atol=1e-5, rtol=0)
  for a, b in zip(
    jax.tree.leaves(one["state"]["params"]), jax.tree.leaves(eight["state"]["params"]), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_grad_accumulation_is_exact_under_fsdp(tmp_path):
  fsdp = 2
  data = batches(2)
  base = tiny_config(symmetric=True, text_weight=0.5)
  base.mesh.fsdp = fsdp
  acc = tiny_config(symmetric=True, text_weight=0.5)
  acc.mesh.fsdp = fsdp
  acc.optim.accum_steps = 2
  a = run(base, sharding.make_mesh(base.mesh), data, tmp_path / "a", 1)
  b = run(acc, sharding.make_mesh(acc.mesh), data, tmp_path / "b", 2)
  np.testing.assert_allclose(a["losses"], b["losses"], atol=1e-5, rtol=0)
  for x, y in zip(
    jax.tree.leaves(a["state"]["params"]), jax.tree.leaves(b["state"]["params"]), strict=True
  ):
    np.testing.assert_allclose(x, y, atol=2e-5)


class ToyObjective(objectives.Objective):
  """A test-only loss in two parts: pull z onto the teacher embedding (cosine) and spread the batch
  (mean pairwise cosine), combined with a weight that depends on both parts' gradient norms."""

  part_names = ("pull", "spread")
  needs_part_grads = True

  def parts(self, head, z, targets, step):
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    y = targets.real / jnp.linalg.norm(targets.real, axis=-1, keepdims=True)
    pull = 1.0 - jnp.mean(jnp.sum(z * y, axis=-1))
    spread = jnp.mean(z @ z.T)
    return jnp.stack([pull, spread]), {"pull_cos": 1.0 - pull}

  def weights(self, parts, step, part_grad_norms):
    w = 0.5 * part_grad_norms[0] / (part_grad_norms[1] + 1e-8)
    return jnp.stack([jnp.float32(1.0), jnp.minimum(w, 1.0)]), {"spread_weight": w}


@pytest.mark.slow
def test_registered_toy_loss_trains_and_accumulates_exactly(tmp_path, monkeypatch):
  monkeypatch.setitem(objectives.REGISTRY, "toy", ToyObjective)
  data = batches(3)
  configs = []
  for k in (1, 2):
    c = tiny_config()
    c.loss.mode = "toy"
    c.optim.accum_steps = k
    configs.append(c)
  a = run(configs[0], sharding.make_mesh(configs[0].mesh), data, tmp_path / "a", 1)
  b = run(configs[1], sharding.make_mesh(configs[1].mesh), data, tmp_path / "b", 2)
  moved = [
    not np.array_equal(x, np.asarray(y))
    for x, y in zip(a["lora_before"], jax.tree.leaves(a["state"]["params"]), strict=True)
  ]
  assert all(moved) and np.all(np.isfinite(a["losses"]))  # it trains through the standard step
  np.testing.assert_allclose(a["losses"], b["losses"], atol=1e-5, rtol=0)
  for x, y in zip(
    jax.tree.leaves(a["state"]["params"]), jax.tree.leaves(b["state"]["params"]), strict=True
  ):
    np.testing.assert_allclose(x, y, atol=1e-5)
