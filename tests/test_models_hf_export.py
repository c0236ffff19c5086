"""hf_dir.save_pretrained: NNX CLIP -> transformers CLIP directory -> back, bit for bit.

Offline: a random tiny NNX CLIP (16-token context, 32px images in 4px patches, gelu vision and
quick_gelu text) is exported; convert.load_pretrained must give back the same state and config,
and transformers' CLIPModel / CLIPTokenizer / CLIPImageProcessor must load the directory and agree
with the NNX model (features <= 1e-5, identical token ids).
"""

import json
import pathlib

import hf_tiny
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from conftest import shared_path
from flax import nnx

from gmail_jax.data import preprocess
from gmail_jax.export import hf_dir
from gmail_jax.models import clip as clip_lib
from gmail_jax.models import convert, lora
from gmail_jax.models import tokenizer as tk

CONTEXT = 16
CAPTIONS = [
  "a photo of a cat",
  "Two dogs playing with a frisbee on the beach at sunset!",
  "",
  "an extremely long caption that is truncated " * 5,
  "émoji 🐱 &amp; <|ENDOFTEXT|> stuff",
]


def _config(**overrides) -> clip_lib.CLIPConfig:
  return clip_lib.clip_config(
    "tiny",
    text_context_length=CONTEXT,
    text_act="quick_gelu",
    vision_image_size=32,
    vision_patch_size=4,
    vision_act="gelu",
    **overrides,
  )


def _random_model(config: clip_lib.CLIPConfig, seed: int) -> clip_lib.CLIP:
  """Every parameter random (biases, LayerNorms, logit_scale too), so each mapping is exercised."""
  model = clip_lib.CLIP(config, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = 0.05 * rng.standard_normal(tuple(var.shape)).astype(np.float32)
    if path[-1] == "scale":
      value += 1.0
    elif path[-1] == "logit_scale":
      value = np.float32(3.1)
    flat.append((path, var.replace(jnp.asarray(value))))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def _assert_same_state(a: nnx.Module, b: nnx.Module) -> None:
  flat_a, flat_b = dict(nnx.to_flat_state(nnx.state(a))), dict(nnx.to_flat_state(nnx.state(b)))
  assert flat_a.keys() == flat_b.keys()
  for path, var in flat_a.items():
    x, y = np.asarray(var[...]), np.asarray(flat_b[path][...])
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(x, y), path


def _temp_leftovers(parent: pathlib.Path) -> list[str]:
  return [p.name for p in parent.iterdir() if p.name.startswith(".")]


_encode_image = nnx.jit(lambda m, px: m.encode_image(px))
_encode_text = nnx.jit(lambda m, ids: m.encode_text(ids))


def _hf_features(hf, pixels_nhwc: np.ndarray, ids: np.ndarray):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    img = hf.get_image_features(
      pixel_values=torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
    )
    txt = hf.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
  # transformers 5 returns a ModelOutput whose pooler_output is the projected feature.
  return (getattr(x, "pooler_output", x).numpy() for x in (img, txt))


def _load_hf(out: str):
  transformers = pytest.importorskip("transformers")
  hf, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return hf.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  model = _random_model(_config(), seed=0)
  out = hf_dir.save_pretrained(model, str(tmp_path_factory.mktemp("export") / "clip"))
  return model, pathlib.Path(out)


def test_files_and_bitwise_roundtrip(exported):
  model, out = exported
  assert sorted(p.name for p in out.iterdir()) == sorted(
    [
      "config.json",
      "model.safetensors",
      "vocab.json",
      "merges.txt",
      "tokenizer_config.json",
      "special_tokens_map.json",
      "preprocessor_config.json",
    ]
  )
  assert _temp_leftovers(out.parent) == []
  hf_cfg = json.loads((out / "config.json").read_text())
  assert hf_cfg["model_type"] == "clip" and hf_cfg["text_config"]["max_position_embeddings"] == 16
  assert hf_cfg["text_config"]["eos_token_id"] == 49407
  assert convert.clip_config_from_hf(hf_cfg) == model.config
  sd = convert.read_state_dict(str(out / "model.safetensors"))
  assert all(v.dtype == np.float32 for v in sd.values())
  assert sd["logit_scale"].shape == ()
  assert sd["vision_model.embeddings.patch_embedding.weight"].shape == (64, 3, 4, 4)  # OIHW
  loaded = convert.load_pretrained(str(out))
  assert loaded.config == model.config
  _assert_same_state(loaded, model)


def test_transformers_loads_and_agrees(exported):
  transformers = pytest.importorskip("transformers")
  model, out = exported
  hf = _load_hf(str(out))
  assert hf.config.text_config.max_position_embeddings == CONTEXT
  assert hf.config.vision_config.hidden_act == "gelu"
  assert hf.config.text_config.hidden_act == "quick_gelu"
  hf_tok = transformers.CLIPTokenizer.from_pretrained(str(out))
  assert hf_tok.model_max_length == CONTEXT
  ref_ids = np.asarray(
    hf_tok(CAPTIONS, padding="max_length", truncation=True)["input_ids"], np.int32
  )
  ids = tk.Tokenizer(str(out), context_length=CONTEXT)(CAPTIONS)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(tk.Tokenizer(context_length=CONTEXT)(CAPTIONS), ids)
  pixels = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  ref_img, ref_txt = _hf_features(hf, pixels, ids)
  img = np.asarray(_encode_image(model, jnp.asarray(pixels)))
  txt = np.asarray(_encode_text(model, jnp.asarray(ids)))
  assert np.abs(img - ref_img).max() <= 1e-5 and np.abs(txt - ref_txt).max() <= 1e-5


def test_image_processor_on_coco_photos(exported):
  transformers = pytest.importorskip("transformers")
  model, out = exported
  val = shared_path("coco-mini", "val2017")
  photos = [PIL.Image.open(p).convert("RGB") for p in sorted(val.glob("*.jpg"))[:2]]
  proc = transformers.CLIPImageProcessor.from_pretrained(str(out))
  assert proc.size["shortest_edge"] == 32 and proc.crop_size["height"] == 32
  assert tuple(proc.image_mean) == preprocess.CLIP_MEAN and proc.resample == 3
  px = proc(images=photos, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = preprocess.preprocess(photos, 32)  # normalised NHWC
  np.testing.assert_allclose(px, ours, atol=1e-5)
  ref_img, _ = _hf_features(_load_hf(str(out)), px, np.zeros((1, CONTEXT), np.int32) + 49407)
  assert np.abs(np.asarray(_encode_image(model, jnp.asarray(px))) - ref_img).max() <= 1e-5


def test_legacy_eos_pools_at_argmax_in_both(tmp_path):
  # eos_token_id == 2 is HF's legacy marker: pool at argmax(ids), not at the first EOT.
  model = _random_model(_config(text_eos_token_id=2, text_layers=1, vision_layers=1), seed=3)
  out = hf_dir.save_pretrained(model, str(tmp_path / "legacy"))
  hf_cfg = json.loads((tmp_path / "legacy" / "config.json").read_text())
  assert hf_cfg["text_config"]["eos_token_id"] == 2
  assert convert.load_pretrained(out).config.text.eos_token_id == 2
  ids = np.random.default_rng(3).integers(0, 1000, (2, CONTEXT)).astype(np.int32)
  ids[:, 3], ids[:, 9] = 2, 49406  # "first eos" would read 3; legacy argmax reads 9
  pixels = np.zeros((1, 32, 32, 3), np.float32)
  _, ref_txt = _hf_features(_load_hf(out), pixels, ids)
  assert np.abs(np.asarray(_encode_text(model, jnp.asarray(ids))) - ref_txt).max() <= 1e-5


def test_lora_refused_until_merged(tmp_path):
  model = _random_model(_config(text_layers=1), seed=1)
  base_q = np.asarray(model.vision.blocks[0].attn.q_proj.kernel[...])
  lora.apply_lora(model, rank=2, targets=(lora.ATTN_TARGETS, lora.MLP_TARGETS), rngs=nnx.Rngs(2))
  rng = np.random.default_rng(2)
  for layer in lora.dense_layers(model).values():
    if layer.lora_b is not None:  # B = 0 at init would make the merge a no-op
      layer.lora_b[...] = jnp.asarray(rng.standard_normal(layer.lora_b.shape), jnp.float32)
  out = tmp_path / "merged"
  with pytest.raises(ValueError, match="merge_lora") as e:
    hf_dir.save_pretrained(model, str(out))
  assert "\n" not in str(e.value) and not out.exists() and _temp_leftovers(tmp_path) == []
  lora.merge_lora(model)
  hf_dir.save_pretrained(model, str(out))
  loaded = convert.load_pretrained(str(out))
  _assert_same_state(loaded, model)
  assert not np.array_equal(np.asarray(loaded.vision.blocks[0].attn.q_proj.kernel[...]), base_q)


def test_existing_out_dir(exported, tmp_path):
  model, first = exported
  out = tmp_path / "dst"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty") as e:
    hf_dir.save_pretrained(model, str(out))
  assert "\n" not in str(e.value) and (out / "keep.txt").read_text() == "mine"
  # overwrite=True replaces it; tokenizer_dir gives the same files as openai-clip's BPE.
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  hf_tiny.write_clip_tokenizer_files(tok_dir)
  hf_dir.save_pretrained(model, str(out), tokenizer_dir=str(tok_dir), overwrite=True)
  assert not (out / "keep.txt").exists()
  for name in ("vocab.json", "merges.txt", "config.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (first / name).read_bytes(), name
  # An existing empty directory is simply filled.
  (tmp_path / "empty").mkdir()
  hf_dir.save_pretrained(model, str(tmp_path / "empty"))
  assert (tmp_path / "empty" / "model.safetensors").exists()
  assert _temp_leftovers(tmp_path) == []
  # A tokenizer whose EOT is not the model's eos_token_id would pool the wrong token.
  bad = _random_model(_config(text_eos_token_id=49406, text_layers=1, vision_layers=1), seed=4)
  with pytest.raises(ValueError, match="eos_token_id"):
    hf_dir.save_pretrained(bad, str(tmp_path / "bad"))
