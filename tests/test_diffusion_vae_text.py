"""Stable Diffusion's VAE decoder and text encoder in NNX == diffusers / transformers (fp32 <= 1e-4
relative: max |ours - theirs| / max |theirs|), on random weights saved as safetensors and .bin;
SD's prompt tokenizer == transformers' CLIPTokenizer for both pad tokens on every COCO val2017
caption; strict loading and config errors are one line naming the key.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from flax import nnx
from hf_tiny import write_clip_tokenizer_files
from safetensors.numpy import load_file, save_file

from gmail_jax.errors import ConfigError
from gmail_jax.models.convert import CheckpointError
from gmail_jax.models.diffusion import text_encoder as te
from gmail_jax.models.diffusion import vae as vae_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# SD 1.x/2.x VAE config (block_out_channels 128/256/512/512, 32 groups) with the widths divided by
# 4 and 8 groups (group size 4-12), so both width changes (conv_shortcut) are exercised.
SD_VAE = dict(
  in_channels=3,
  out_channels=3,
  down_block_types=["DownEncoderBlock2D"] * 4,
  up_block_types=["UpDecoderBlock2D"] * 4,
  block_out_channels=[32, 64, 96, 96],
  layers_per_block=2,
  act_fn="silu",
  latent_channels=4,
  norm_num_groups=8,
  sample_size=64,
  scaling_factor=0.18215,
)


def _rel(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _perturb(model, seed: int) -> None:
  """Noise on every 1-D parameter: norms start at 1 / 0 and biases at 0, which would hide a
  scale <-> bias or weight <-> bias mix-up."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _hf_vae(config: dict, seed: int = 0):
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**config).eval()
  _perturb(model, seed)
  return model


def _save(model, path, safe: bool):
  model.save_pretrained(str(path), safe_serialization=safe)
  return path


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory):
  """(diffusers model, {"safetensors": vae dir, "bin": pipeline root whose vae/ holds a .bin})."""
  model = _hf_vae(SD_VAE)
  safe = _save(model, tmp_path_factory.mktemp("vae_st"), True)
  root = tmp_path_factory.mktemp("sd_root")
  _save(model, root / "vae", False)
  return model, {"safetensors": safe, "bin": root}


def _run(model, method: str, z):
  """``model.<method>(z)`` under jit (as the sampler will run it)."""
  fn = nnx.jit(lambda m, x: getattr(m, method)(x))
  return np.asarray(fn(model, jnp.asarray(z)))


def _diffusers_decode(model, z_nhwc, scale: float = 1.0):
  with torch.no_grad():
    z = torch.from_numpy(np.ascontiguousarray(z_nhwc.transpose(0, 3, 1, 2))) / scale
    return model.decode(z).sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_vae_decoder_matches_diffusers(sd_vae, fmt):
  model, dirs = sd_vae
  ours = vae_lib.load_vae_decoder(str(dirs[fmt]))
  cfg = ours.config
  assert cfg.downscale == 8 and cfg.scaling_factor == 0.18215 and cfg.layers_per_block == 2
  # Non-square latents, two rows: catches H/W and batch mix-ups of the NHWC layout.
  z = np.random.default_rng(1).standard_normal((2, 6, 5, 4)).astype(np.float32)
  ref = _diffusers_decode(model, z)
  out = _run(ours, "__call__", z)
  assert out.shape == (2, 48, 40, 3) and out.dtype == np.float32
  err = _rel(out, ref)
  # What the pipelines decode: the sampler's latents / scaling_factor.
  latents = z * 0.18215
  err_scaled = _rel(
    _run(ours, "decode_latents", latents), _diffusers_decode(model, latents, 0.18215)
  )
  assert max(err, err_scaled) <= 1e-4, (err, err_scaled)
  unit = np.asarray(vae_lib.to_unit_range(jnp.asarray(out)))
  np.testing.assert_allclose(unit, np.clip(out / 2 + 0.5, 0, 1), atol=1e-7)


def test_vae_without_post_quant_conv_and_mid_attention(tmp_path):
  config = dict(
    SD_VAE,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[16, 32],
    layers_per_block=1,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
    scaling_factor=0.5,
    shift_factor=0.25,
  )
  model = _hf_vae(config, seed=3)
  ours = vae_lib.load_vae_decoder(str(_save(model, tmp_path, True)))
  assert ours.post_quant_conv is None and len(ours.decoder.mid_block.attentions) == 0
  z = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
  assert _rel(_run(ours, "__call__", z), _diffusers_decode(model, z)) <= 1e-4
  # SD3 / Flux pipelines: latents / scaling_factor + shift_factor.
  expected = _run(ours, "__call__", z / 0.5 + 0.25)
  np.testing.assert_allclose(_run(ours, "decode_latents", z), expected, rtol=1e-6, atol=1e-6)


def test_vae_legacy_attention_names(sd_vae, tmp_path):
  """Pre-0.14 diffusers files name the mid attention query/key/value/proj_attn; diffusers renames
  them on load, and so do we."""
  model, dirs = sd_vae
  sd = load_file(str(dirs["safetensors"] / "diffusion_pytorch_model.safetensors"))
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for k, v in sd.items():
    for new, old in legacy.items():
      k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    renamed[k] = v
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
  save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text((dirs["safetensors"] / "config.json").read_text())
  ours = vae_lib.load_vae_decoder(str(tmp_path))
  z = np.random.default_rng(4).standard_normal((1, 4, 4, 4)).astype(np.float32)
  assert _rel(_run(ours, "__call__", z), _diffusers_decode(model, z)) <= 1e-4


def _vae_variant(src, dst, edit_sd=None, edit_config=None):
  dst.mkdir()
  sd = load_file(str(src / "diffusion_pytorch_model.safetensors"))
  config = json.loads((src / "config.json").read_text())
  if edit_sd:
    edit_sd(sd)
  if edit_config:
    edit_config(config)
  save_file(sd, str(dst / "diffusion_pytorch_model.safetensors"))
  (dst / "config.json").write_text(json.dumps(config))
  return str(dst)


def test_vae_strict_loading(sd_vae, tmp_path):
  src = sd_vae[1]["safetensors"]
  # The file's encoder is accounted for, not loaded: none of its keys is reported.
  keys = load_file(str(src / "diffusion_pytorch_model.safetensors"))
  assert any(k.startswith("encoder.") for k in keys) and "quant_conv.weight" in keys

  def drop(sd):
    del sd["post_quant_conv.weight"]

  def extra(sd):
    sd["decoder.mid_block.extra.weight"] = np.zeros(3, np.float32)

  def misshapen(sd):
    sd["decoder.conv_out.weight"] = np.zeros((3, 32, 1, 1), np.float32)

  cases = [
    (drop, r"missing key 'post_quant_conv\.weight'"),
    (extra, r"unexpected key 'decoder\.mid_block\.extra\.weight'"),
    (misshapen, r"shape mismatch for 'decoder\.conv_out\.weight'.*\(3, 32, 3, 3\)"),
  ]
  for i, (edit, match) in enumerate(cases):
    with pytest.raises(CheckpointError, match=match) as info:
      vae_lib.load_vae_decoder(_vae_variant(src, tmp_path / str(i), edit_sd=edit))
    assert "\n" not in str(info.value)

  # A config without post_quant_conv against a file that has one: the file's key is unexpected.
  def no_pqc(config):
    config["use_post_quant_conv"] = False

  with pytest.raises(CheckpointError, match=r"unexpected key 'post_quant_conv\.(bias|weight)'"):
    vae_lib.load_vae_decoder(_vae_variant(src, tmp_path / "pqc", edit_config=no_pqc))
  with pytest.raises(CheckpointError, match="no weights found"):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    vae_lib.load_vae_decoder(str(tmp_path / "empty"))
  with pytest.raises(CheckpointError, match="no config.json"):
    vae_lib.load_vae_decoder(str(tmp_path))


@pytest.mark.parametrize(
  ("edit", "match"),
  [
    ({"norm_type": "spatial"}, r"unsupported keys \['norm_type'\]"),
    ({"up_block_types": ["AttnUpDecoderBlock2D"] * 4}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"norm_num_groups": 7}, "not divisible by norm_num_groups=7"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
    ({"latents_mean": [0.0] * 4}, "latents_mean and latents_std"),
    ({"layers_per_block": "two"}, "bad value"),
  ],
)
def test_vae_config_errors(edit, match):
  with pytest.raises(ConfigError, match=match) as info:
    vae_lib.VAEConfig.from_diffusers({**SD_VAE, "_diffusers_version": "0.42.1", **edit})
  assert "\n" not in str(info.value)


def test_vae_config_from_sd_file():
  """SD 1.x's vae/config.json (diffusers 0.2.x era: no scaling_factor) takes diffusers' defaults."""
  config = vae_lib.VAEConfig.from_diffusers(
    {
      "_class_name": "AutoencoderKL",
      "_diffusers_version": "0.2.2",
      "act_fn": "silu",
      "block_out_channels": [128, 256, 512, 512],
      "down_block_types": ["DownEncoderBlock2D"] * 4,
      "in_channels": 3,
      "latent_channels": 4,
      "layers_per_block": 2,
      "out_channels": 3,
      "sample_size": 256,
      "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
  )
  assert config.scaling_factor == 0.18215 and config.norm_num_groups == 32
  assert config.downscale == 8 and config.use_post_quant_conv and config.mid_block_add_attention


# ---------------------------------------------------------------------------- text encoder

# SD 2.x's tokenizer: tokenizer_config.json says <|endoftext|>, special_tokens_map.json says "!";
# transformers reads the map last (no added_tokens_decoder in these old files), so it pads with 0.
_SD2_SPECIAL_MAP = {
  "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False},
  "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False},
  "pad_token": "!",
  "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False},
}
_SD2_CONFIG = {
  "add_prefix_space": False,
  "do_lower_case": True,
  "errors": "replace",
  "model_max_length": 77,
  "pad_token": "<|endoftext|>",
  "tokenizer_class": "CLIPTokenizer",
}
_SD1_CONFIG = {**_SD2_CONFIG}  # SD 1.x: <|endoftext|> everywhere (its map agrees)
_SD1_SPECIAL_MAP = {**_SD2_SPECIAL_MAP, "pad_token": "<|endoftext|>"}

HARD = [
  "a photo of a cat",
  "wow!",
  "hello!!! x ?! !?! a!b ! !",
  "<|endoftext|> literal! specials <|startoftext|>",
  "Ünïcödé café ＦＵＬＬ-width！ 数字 12345 emoji 🐱!",
  "",
  "A very long caption! " + "with many repeated words and 123 numbers, " * 20,
  "!" * 100,
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
  dirs = {}
  for name, config, special in (
    ("sd1", _SD1_CONFIG, _SD1_SPECIAL_MAP),
    ("sd2", _SD2_CONFIG, _SD2_SPECIAL_MAP),
  ):
    d = write_clip_tokenizer_files(tmp_path_factory.mktemp(name))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps(special))
    dirs[name] = d
  return dirs


@pytest.fixture(scope="module")
def coco_captions():
  path = shared_path("coco-captions-val2017", "captions_val2017.json")
  return [a["caption"] for a in json.loads(path.read_text())["annotations"]]


def _hf_tokenize(hf, texts):
  ids = hf(list(texts), padding="max_length", max_length=77, truncation=True)["input_ids"]
  return np.asarray(ids, np.int32)


@pytest.mark.parametrize(("name", "pad_id"), [("sd1", 49407), ("sd2", 0)])
def test_sd_tokenizer_matches_transformers(tokenizer_dirs, coco_captions, name, pad_id):
  hf = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dirs[name]))
  assert hf.pad_token_id == pad_id
  ours = te.load_sd_tokenizer(str(tokenizer_dirs[name]))
  assert (ours.pad_id, ours.context_length) == (pad_id, 77)
  texts = HARD + coco_captions  # all 25,014 captions (3 contain a "!")
  ref = _hf_tokenize(hf, texts)
  got = ours(texts)
  bad = [texts[i] for i in np.flatnonzero((got != ref).any(axis=1))]
  assert not bad, (len(bad), bad[:3])
  # The functional form, on the same vocabulary.
  np.testing.assert_array_equal(te.sd_tokenize(HARD, pad_id, tokenizer=ours.tokenizer), ref[:8])
  if pad_id == 0:  # the quirk: every "!" is the special pad token
    assert got[1, :4].tolist() == [49406, 2781, 0, 49407] and got[1, 4:].max() == 0


def test_read_pad_token_precedence(tmp_path, tokenizer_dirs):
  """A tokenizer_config.json with added_tokens_decoder (saved by transformers >= 4.34) is read
  alone: its pad token wins over special_tokens_map.json, in transformers and here."""
  d = write_clip_tokenizer_files(tmp_path)
  added = {"49406": {"content": "<|startoftext|>", "special": True}}
  (d / "tokenizer_config.json").write_text(
    json.dumps({**_SD2_CONFIG, "added_tokens_decoder": added})
  )
  (d / "special_tokens_map.json").write_text(json.dumps(_SD2_SPECIAL_MAP))
  hf = transformers.CLIPTokenizer.from_pretrained(str(d))
  assert te.read_pad_token(str(d)) == hf.pad_token == "<|endoftext|>"
  assert te.read_pad_token(str(tokenizer_dirs["sd2"])) == "!"


# SD 2.x's text encoder (OpenCLIP-H cut to 23 layers, gelu, 1024 wide, eos_token_id 2 as in its
# config.json) and SD 1.x's (ViT-L/14, quick_gelu), widths and depths scaled down.
TEXT_CONFIGS = {
  "sd2_gelu": dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="gelu",
    projection_dim=32,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
  ),
  "sd1_quick_gelu": dict(
    hidden_size=48,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=3,
    hidden_act="quick_gelu",
    eos_token_id=2,
  ),
}


def _hf_text_encoder(name: str, seed: int = 0):
  config = transformers.CLIPTextConfig(
    vocab_size=49408, max_position_embeddings=77, **TEXT_CONFIGS[name]
  )
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(config).eval()
  _perturb(model, seed)
  return model


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
  """name -> (model, {fmt: dir}). "safetensors" / "bin": the layout of every SD release (written
  by transformers 4: keys ``text_model.*``), the .bin under a pipeline root's text_encoder/;
  "safetensors_v5": ``save_pretrained`` of transformers 5 (keys without ``text_model.``)."""
  out = {}
  for i, name in enumerate(TEXT_CONFIGS):
    model = _hf_text_encoder(name, seed=i)
    state = {f"text_model.{k}": v for k, v in model.state_dict().items()}
    safe = tmp_path_factory.mktemp(f"{name}_st")
    model.config.to_json_file(str(safe / "config.json"))
    save_file({k: v.numpy() for k, v in state.items()}, str(safe / "model.safetensors"))
    # transformers 5 has no safe_serialization=False any more: torch.save the .bin.
    root = tmp_path_factory.mktemp(f"{name}_root")
    (root / "text_encoder").mkdir()
    model.config.to_json_file(str(root / "text_encoder" / "config.json"))
    torch.save(state, str(root / "text_encoder" / "pytorch_model.bin"))
    v5 = tmp_path_factory.mktemp(f"{name}_v5")
    model.save_pretrained(str(v5))
    out[name] = model, {"safetensors": safe, "bin": root, "safetensors_v5": v5}
  return out


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "safetensors_v5"])
@pytest.mark.parametrize("name", list(TEXT_CONFIGS))
def test_text_encoder_matches_transformers(text_encoders, tokenizer_dirs, name, fmt):
  model, dirs = text_encoders[name]
  if fmt == "safetensors_v5":
    keys = load_file(str(dirs[fmt] / "model.safetensors"))
    assert "final_layer_norm.weight" in keys and not any(k.startswith("text_model.") for k in keys)
  if fmt == "bin":  # transformers reads the SD layout too (and strips text_model.)
    hf_loaded = transformers.CLIPTextModel.from_pretrained(str(dirs[fmt] / "text_encoder"))
    for k, v in model.state_dict().items():
      assert torch.equal(hf_loaded.state_dict()[k], v), k
  ours = te.load_text_encoder(str(dirs[fmt]))
  tok = te.load_sd_tokenizer(str(tokenizer_dirs["sd2" if name.startswith("sd2") else "sd1"]))
  texts = [HARD[0], HARD[2], "Two dogs playing with a frisbee on the beach at sunset.", HARD[6]]
  ids = tok(texts)
  assert len({tuple(r) for r in ids.tolist()}) == len(texts)
  with torch.no_grad():
    hf = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    ref = hf.last_hidden_state.numpy()
    # diffusers' clip_skip=1: the penultimate layer's output through final_layer_norm.
    ref_skip = model.final_layer_norm(hf.hidden_states[-2]).numpy()
  out = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids)))
  out_skip = np.asarray(nnx.jit(lambda m, x: m(x, clip_skip=1))(ours, jnp.asarray(ids)))
  assert out.shape == (4, 77, TEXT_CONFIGS[name]["hidden_size"]) and out.dtype == np.float32
  err, err_skip = _rel(out, ref), _rel(out_skip, ref_skip)
  assert max(err, err_skip) <= 1e-4, (err, err_skip)


def test_text_encoder_strict_loading(text_encoders, tmp_path):
  src = text_encoders["sd1_quick_gelu"][1]["safetensors"]
  sd = load_file(str(src / "model.safetensors"))
  config = json.loads((src / "config.json").read_text())

  def write(name, state, cfg=config):
    d = tmp_path / name
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)

  key = "text_model.encoder.layers.1.mlp.fc2.weight"
  missing = {k: v for k, v in sd.items() if k != key}
  with pytest.raises(CheckpointError, match=rf"missing key '{key}'") as info:
    te.load_text_encoder(write("missing", missing))
  assert "\n" not in str(info.value)
  # A transformers-5 file (no prefix): the error names the key as the file does.
  v5 = {k.removeprefix("text_model."): v for k, v in missing.items()}
  with pytest.raises(CheckpointError, match=r"missing key 'encoder\.layers\.1\.mlp\.fc2\.weight'"):
    te.load_text_encoder(write("missing_v5", v5))
  misshapen = {**sd, key: np.zeros((192, 48), np.float32)}  # fc2 is [out 48, in 192]
  with pytest.raises(CheckpointError, match=rf"mismatch for '{key}'.*\(192, 48\).*\(48, 192\)"):
    te.load_text_encoder(write("misshapen", misshapen))
  # SDXL's text_encoder_2 (CLIPTextModelWithProjection) is not this model.
  projected = {**sd, "text_projection.weight": np.zeros((32, 48), np.float32)}
  with pytest.raises(CheckpointError, match=r"unexpected key 'text_projection\.weight'"):
    te.load_text_encoder(write("projected", projected))
  # An old file's position_ids buffer is accounted for.
  ids = {**sd, "text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]}
  te.load_text_encoder(write("position_ids", ids))
  with pytest.raises(ConfigError, match="model_type='clip'"):
    te.load_text_encoder(write("clip", sd, {**config, "model_type": "clip"}))
  with pytest.raises(ConfigError, match="use_attention_mask"):
    te.load_text_encoder(write("mask", sd, {**config, "use_attention_mask": True}))
