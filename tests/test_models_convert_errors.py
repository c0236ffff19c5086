"""Strict HF CLIP loading: every tensor accounted for, one-line errors naming file and key.

No torch needed: the checkpoint is written from the model's own parameter shapes with
safetensors.numpy, in HF layout (the name/transpose table of gmail_jax.models.convert).
"""

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from gmail_jax.models import clip as clip_lib
from gmail_jax.models import convert

HF_CONFIG = {
  "architectures": ["CLIPModel"],
  "model_type": "clip",
  "projection_dim": 32,
  "logit_scale_init_value": 2.6592,
  "text_config": {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
  },
  "vision_config": {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 8,
  },
}


def _hf_state_dict(config: clip_lib.CLIPConfig) -> dict[str, np.ndarray]:
  abstract = nnx.eval_shape(lambda: clip_lib.CLIP(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  sd = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    key, fn = convert.hf_key(path)
    shape = convert._hf_shape(fn, tuple(var.shape))
    sd[key] = rng.standard_normal(shape).astype(np.float32)
  return sd


@pytest.fixture
def ckpt(tmp_path):
  config = convert.clip_config_from_hf(HF_CONFIG)
  # The HF dict above is the 'mu' test variant.
  assert config == clip_lib.clip_config("mu", logit_scale_init=2.6592)
  (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
  sd = _hf_state_dict(config)
  sd["vision_model.embeddings.position_ids"] = np.arange(5, dtype=np.int64)[None]  # ignored
  save_file(sd, str(tmp_path / "model.safetensors"))
  return tmp_path


def _one_line_error(ckpt_dir, *match):
  with pytest.raises(convert.CheckpointError) as info:
    convert.load_pretrained(str(ckpt_dir))
  msg = str(info.value)
  assert "\n" not in msg, msg
  for m in match:
    assert m in msg, (m, msg)
  return msg


def _rewrite(ckpt_dir, edit):
  path = ckpt_dir / "model.safetensors"
  sd = load_file(str(path))
  edit(sd)
  save_file(sd, str(path))


def test_valid_checkpoint_loads_every_tensor(ckpt):
  model = convert.load_pretrained(str(ckpt))
  sd = load_file(str(ckpt / "model.safetensors"))
  q = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
  np.testing.assert_array_equal(model.vision.blocks[0].attn.q_proj.kernel[...], sd[q].T)
  patch = sd["vision_model.embeddings.patch_embedding.weight"]
  np.testing.assert_array_equal(model.vision.patch_embed.kernel[...], patch.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
    model.vision.ln_pre.scale[...], sd["vision_model.pre_layrnorm.weight"]
  )
  np.testing.assert_array_equal(model.text.proj.kernel[...], sd["text_projection.weight"].T)
  assert float(model.logit_scale[...]) == float(sd["logit_scale"])
  n_params = len(list(nnx.to_flat_state(nnx.state(model, nnx.Param))))
  assert n_params == len(sd) - 1  # everything but the position_ids buffer


def test_corrupt_file(ckpt):
  path = ckpt / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # truncated
  _one_line_error(ckpt, str(path), "corrupt or truncated")
  path.write_bytes(b"\x00garbage" * 10)
  _one_line_error(ckpt, str(path), "corrupt or truncated")


def test_corrupt_bin_file(ckpt):
  (ckpt / "model.safetensors").unlink()
  (ckpt / "pytorch_model.bin").write_bytes(b"not a torch pickle")
  _one_line_error(ckpt, "pytorch_model.bin")


def test_missing_key(ckpt):
  key = "text_model.encoder.layers.0.mlp.fc2.bias"
  _rewrite(ckpt, lambda sd: sd.pop(key))
  _one_line_error(ckpt, "missing key", key, "model.safetensors")


def test_unexpected_key(ckpt):
  _rewrite(ckpt, lambda sd: sd.update({"vision_model.extra_head.weight": np.zeros(3, np.float32)}))
  _one_line_error(ckpt, "unexpected key", "vision_model.extra_head.weight")


def test_wrong_shape(ckpt):
  key = "vision_model.encoder.layers.0.mlp.fc1.weight"  # HF (out=64, in=32)
  _rewrite(ckpt, lambda sd: sd.update({key: np.zeros((64, 31), np.float32)}))
  msg = _one_line_error(ckpt, "shape mismatch", key)
  assert "(64, 31)" in msg and "(64, 32)" in msg


def test_bad_directory_and_config(tmp_path, ckpt):
  with pytest.raises(convert.CheckpointError, match="config.json: not found"):
    convert.load_pretrained(str(ckpt.parent))  # a directory without config.json
  with pytest.raises(convert.CheckpointError, match="no such directory"):
    convert.load_pretrained(str(tmp_path / "nope" / "deeper"))
  (ckpt / "model.safetensors").unlink()
  _one_line_error(ckpt, "no model.safetensors or pytorch_model.bin")
  (ckpt / "config.json").write_text("{not json")
  _one_line_error(ckpt, "config.json", "invalid JSON")
  bad = dict(HF_CONFIG, vision_config=dict(HF_CONFIG["vision_config"], hidden_act="relu"))
  with pytest.raises(convert.CheckpointError, match="unsupported hidden_act 'relu'"):
    convert.clip_config_from_hf(bad)
