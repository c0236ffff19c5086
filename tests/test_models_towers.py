"""Model families by name (models/towers.py): the CLIP tower, and residual loops as an option."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from gmail_jax.data import preprocess
from gmail_jax.models import clip as clip_lib
from gmail_jax.models import clip_tower, convert, lora, towers


def test_clip_tower_provides_everything():
  tower = towers.get("clip")
  assert tower.name == "clip"
  assert {"B/32", "B/16", "L/14", "tiny", "mu"} <= set(tower.variants)
  cfg = tower.arch_config("B/32", vision_layers=2)
  assert cfg == clip_lib.clip_config("B/32", vision_layers=2)
  model = tower.make(tower.arch_config("mu"), rngs=nnx.Rngs(0), residual_loops=False)
  assert isinstance(model, clip_lib.CLIP) and model.residual_loops is False
  assert tower.load_pretrained is clip_tower.load_pretrained
  assert tower.preprocess.mean == preprocess.CLIP_MEAN
  assert tower.preprocess.std == preprocess.CLIP_STD
  assert tower.preprocess.resize == "shortest_edge_crop"
  assert tower.lora_targets["attn"] == lora.ATTN_TARGETS
  assert tower.lora_targets["mlp"] == lora.MLP_TARGETS
  assert (lora.ATTN_TARGETS,) == lora.DEFAULT_TARGETS
  with pytest.raises(TypeError):
    tower.lora_targets["attn"] = "x"  # read-only: one definition, shared


def test_unknown_tower_is_one_line():
  with pytest.raises(ValueError) as info:
    towers.get("vit")
  assert str(info.value) == "config.model.name: 'vit' not in ['clip', 'siglip']"


def test_default_residual_loops_follows_the_backend():
  assert towers.default_residual_loops() == (jax.default_backend() == "cpu")
  model = nnx.eval_shape(lambda: clip_lib.CLIP(clip_lib.clip_config("mu"), rngs=nnx.Rngs(0)))
  assert model.residual_loops == towers.default_residual_loops()
  assert model.text.residual_loops == model.vision.residual_loops


def test_attn_targets_select_q_k_v_out_of_every_vision_block():
  tower = towers.get("clip")
  cfg = tower.arch_config("tiny")
  model = nnx.eval_shape(lambda: tower.make(cfg, rngs=nnx.Rngs(0)))
  got = lora.select_targets(model, tower.lora_targets["attn"])
  want = [
    f"vision/blocks/{i}/attn/{p}"
    for i in range(cfg.vision.layers)
    for p in ("q_proj", "k_proj", "v_proj", "out_proj")
  ]
  assert sorted(got) == sorted(want) and cfg.vision.layers == 2


def _value_and_grad(model):
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 49000, size=(3, 7)), jnp.int32).at[:, -1].set(49407)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    logits, _ = m(pixels, ids)
    return jnp.mean(jnp.sin(logits)) + jnp.mean(m.encode_text(ids) ** 2)

  return jax.value_and_grad(loss), params


def _assert_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _lax_while_loops(hlo_text: str) -> list[str]:
  """The compiled module's while loops that come from a ``lax.while_loop`` (the residual loops):
  not those XLA:CPU may itself make of a scatter (an embedding's gradient) for its older fusion
  emitters, which the test processes use (conftest.XLA_TEST_FLAGS)."""
  return re.findall(r" while\(.*op_name=\"[^\"]*/while\"", hlo_text)


@pytest.mark.parametrize("remat", [False, True])
def test_residual_loops_change_no_value_or_gradient(remat):
  tower = towers.get("clip")
  cfg = tower.arch_config("mu")
  fns = {
    on: _value_and_grad(tower.make(cfg, rngs=nnx.Rngs(0), remat=remat, residual_loops=on))
    for on in (False, True)
  }
  # The option (not the backend) decides whether the loops XLA:CPU cannot remove are there; they
  # move fusion boundaries, so gradients differ by fp32 rounding (measured <= 7e-6). That the
  # boundary itself is an exact identity is tested op by op in test_models_clip_parity.py.
  compiled = {}
  for on, (fn, params) in fns.items():
    compiled_fn = jax.jit(fn).lower(params).compile()
    assert bool(_lax_while_loops(compiled_fn.as_text())) is on
    compiled[on] = compiled_fn(params)
  _assert_close(compiled[True], compiled[False], 1e-4)


def test_load_pretrained_takes_the_option(tmp_path):
  # A HF-layout checkpoint written from a random 'mu' model (no torch needed).
  cfg = clip_lib.clip_config("mu", logit_scale_init=2.6592)
  src = clip_lib.CLIP(cfg, rngs=nnx.Rngs(3))
  inverse = {"LINEAR_T": lambda a: a.T, "OIHW_TO_HWIO": lambda a: a.transpose(3, 2, 0, 1)}
  sd = {}
  for path, var in nnx.to_flat_state(nnx.state(src, nnx.Param)):
    key, fn = convert.hf_key(path)
    name = {convert._LINEAR_T: "LINEAR_T", convert._OIHW_TO_HWIO: "OIHW_TO_HWIO"}.get(fn)
    value = np.asarray(var[...])
    sd[key] = np.array(inverse[name](value) if name else value, order="C")
  save_file(sd, str(tmp_path / "model.safetensors"))
  width = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  hf = {
    "projection_dim": 32,
    "text_config": width,
    "vision_config": dict(width, image_size=16, patch_size=8),
  }
  (tmp_path / "config.json").write_text(json.dumps(hf))
  for on in (False, True):
    model = towers.get("clip").load_pretrained(str(tmp_path), residual_loops=on)
    assert model.residual_loops is on and model.text.residual_loops is on
    assert model.config == cfg
    pairs = zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(src)), strict=True)
    for a, b in pairs:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_normalize_takes_a_tower_spec():
  spec = towers.get("clip").preprocess
  x = np.random.default_rng(0).integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
    preprocess.normalize(x, spec.mean, spec.std), preprocess.normalize(x)
  )
  half = (0.5, 0.5, 0.5)
  np.testing.assert_allclose(preprocess.normalize(x, half, half), x / 127.5 - 1.0, atol=1e-6)
  got = preprocess.normalize(jnp.asarray(x), mean=half, std=half)
  assert isinstance(got, jax.Array)
  np.testing.assert_allclose(np.asarray(got), x / 127.5 - 1.0, atol=1e-6)
