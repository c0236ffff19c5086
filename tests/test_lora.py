"""LoRA on the CLIP vision tower: targeting, shared frozen state, step-0 identity, merge/unmerge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmail_jax.models import clip, lora


@pytest.fixture
def model():
  return clip.CLIP(clip.clip_config("mu"), rngs=nnx.Rngs(0))


def _pixels(n=3, s=16):
  return jnp.asarray(np.random.default_rng(0).normal(size=(n, s, s, 3)), jnp.float32)


def test_default_targets_are_vision_attention(model):
  paths = lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  assert paths == [f"vision/blocks/0/attn/{p}" for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
  assert lora.adapted_paths(model) == paths
  layer = model.vision.blocks[0].attn.q_proj
  assert layer.lora_a[...].shape == (32, 2) and layer.lora_b[...].shape == (2, 32)
  assert layer.lora_scale == 2.0
  assert not np.any(np.asarray(layer.lora_b[...]))
  bound = 1 / np.sqrt(32)
  assert np.abs(np.asarray(layer.lora_a[...])).max() <= bound
  assert model.text.blocks[0].attn.q_proj.lora_a is None


def test_mlp_targets_and_bad_regex(model):
  paths = lora.apply_lora(
    model, rank=2, targets=(lora.ATTN_TARGETS, lora.MLP_TARGETS), rngs=nnx.Rngs(1)
  )
  assert "vision/blocks/0/mlp/fc1" in paths and len(paths) == 6
  fresh = clip.CLIP(clip.clip_config("mu"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="matches no Dense"):
    lora.apply_lora(fresh, targets=(r"vision/blocks/\d+/attn/qkv",), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="rank"):
    lora.apply_lora(fresh, rank=0, rngs=nnx.Rngs(1))


def test_student_shares_frozen_state_and_equals_teacher_at_step0(model):
  teacher_def, teacher_state = nnx.split(model)
  lora.apply_lora(model, rank=4, alpha=4.0, dropout=0.1, rngs=nnx.Rngs(params=1, dropout=2))
  student_def, lora_state, rng, frozen = lora.split_student(model)
  # Frozen paths of the student == the teacher's: one copy serves both.
  assert jax.tree.structure(frozen) == jax.tree.structure(teacher_state)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(teacher_state), strict=True):
    assert a is b
  assert all(
    isinstance(v, nnx.LoRAParam)
    for v in jax.tree.leaves(lora_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  )
  x = _pixels()
  t = nnx.merge(teacher_def, frozen).vision(x)
  s = nnx.view(nnx.merge(student_def, lora_state, rng, frozen), deterministic=True).vision(x)
  np.testing.assert_array_equal(np.asarray(t), np.asarray(s))  # B = 0: exactly equal


def test_merge_equals_unmerged_and_unmerge_restores(model):
  teacher_def, _ = nnx.split(model)
  lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  # Give B non-zero values so the adapter matters.
  for i, (_, layer) in enumerate(sorted(lora.dense_layers(model).items())):
    if layer.lora_b is not None:  # a seed per layer that is the same in every process
      layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), (4, 32))
  x = _pixels()
  unmerged = np.asarray(model.vision(x))
  kernel0 = np.asarray(model.vision.blocks[0].attn.q_proj.kernel[...])
  adapters = lora.merge_lora(model)
  assert len(adapters) == 4 and lora.adapted_paths(model) == []
  assert nnx.split(model)[0] == teacher_def  # a plain CLIP again
  merged = np.asarray(model.vision(x))
  np.testing.assert_allclose(merged, unmerged, atol=1e-5)
  lora.unmerge_lora(model, adapters)
  np.testing.assert_allclose(model.vision.blocks[0].attn.q_proj.kernel[...], kernel0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(model.vision(x)), unmerged, atol=1e-5)


def test_dropout_changes_output_only_in_training_mode(model):
  lora.apply_lora(model, rank=4, dropout=0.5, rngs=nnx.Rngs(params=1, dropout=2))
  for layer in lora.dense_layers(model).values():
    if layer.lora_b is not None:
      layer.lora_b[...] = jnp.ones_like(layer.lora_b[...])
  x = _pixels()
  a = np.asarray(nnx.view(model, deterministic=True).vision(x))
  b = np.asarray(nnx.view(model, deterministic=True).vision(x))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(np.asarray(model.vision(x)), a)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(9, 16), (3, 5, 16)])
def test_lora_product_gradients_equal_autodiff(shape, dtype):
  # layers.lora_product has a hand-written VJP (a layout choice for XLA:CPU); it must equal the
  # autodiff gradient of (x @ a) @ b for every operand, any leading dims, in the compute dtype.
  from gmail_jax.models.layers import lora_product

  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], shape, dtype)
  a = jax.random.normal(k[1], (16, 3), dtype)
  b = jax.random.normal(k[2], (3, 11), dtype)
  w = jax.random.normal(k[3], shape[:-1] + (11,))

  def loss(fn, x, a, b):
    return (fn(x, a, b).astype(jnp.float32) * w).sum()

  mine = jax.grad(loss, argnums=(1, 2, 3))(lora_product, x, a, b)
  ref = jax.grad(loss, argnums=(1, 2, 3))(lambda x, a, b: (x @ a) @ b, x, a, b)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for m, r in zip(mine, ref, strict=True):
    assert m.dtype == r.dtype == dtype and m.shape == r.shape
    scale = float(jnp.abs(r.astype(jnp.float32)).max())
    np.testing.assert_allclose(
      np.asarray(m, np.float32), np.asarray(r, np.float32), atol=tol * scale
    )


def test_lora_a_gradient_is_computed_as_a_row_major_r_by_in_product():
  # dA = x^T (g B^T): computed as [r, in] = (g B^T)^T x and transposed, it reads x in place; XLA
  # folds a plain transpose into the dot, giving an [in, r] dot with x as its transposed lhs that
  # runs ~3x slower on XLA:CPU. What must hold: the dot behind dA writes a row-major [r, in]
  # result (an [r, in]{1,0} dot, or an [in, r]{0,1} one: the same bytes).
  import re

  from gmail_jax.models.layers import lora_product

  m, d_in, r, d_out = 64, 32, 4, 24
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (m, d_in))
  a = jax.random.normal(k[1], (d_in, r))
  b = jax.random.normal(k[2], (r, d_out))
  w = jax.random.normal(k[3], (m, d_out))
  grad_a = jax.jit(jax.grad(lambda a, x, b, w: (lora_product(x, a, b) * w).sum()))
  hlo = grad_a.lower(a, x, b, w).compile().as_text()
  dots = re.findall(r"= f32\[(\d+),(\d+)\]\{([\d,]+)\} dot\(", hlo)
  written = [
    (int(rows), int(cols), layout)
    for rows, cols, layout in dots
    if {int(rows), int(cols)} == {d_in, r}
  ]
  assert written, dots
  assert all(w in [(r, d_in, "1,0"), (d_in, r, "0,1")] for w in written), written
