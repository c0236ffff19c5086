"""NNX UNet2DConditionModel (models/diffusion/unet.py) == diffusers' on the same random weights.

The published SD 1.5 and SD 2.1(-base) ``unet/config.json`` files, with only the widths scaled down
(block_out_channels, cross_attention_dim, norm_num_groups, sample_size): head counts, the linear
projection flag, upcast_attention, layers and block types as published. diffusers builds each
model from ``torch.manual_seed(0)`` (norm affines randomised too, so a swapped scale/bias shows) and
saves it (safetensors or legacy .bin); :func:`unet.load_unet` reads the folder.

Measured on CPU (jax 0.10.2, torch 2.13, diffusers 0.42.1), max abs err / max abs value of the
diffusers fp32 noise prediction: fp32 1.2e-6 (SD 1.5), 5.6e-7 (SD 2.1-base, .bin), 9.3e-7 (SD 2.1
768, upcast_attention, odd latents), asserted < 1e-4; bf16 compute 1.2e-2 (asserted < 3e-2).
"""

import copy
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models.diffusion import unet as unet_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# runwayml/stable-diffusion-v1-5 unet/config.json, as published.
SD15_UNET = {
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": False,
  "cross_attention_dim": 768,
  "down_block_types": _DOWN,
  "downsample_padding": 1,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": _UP,
}

# stabilityai/stable-diffusion-2-1-base unet/config.json, as published.
SD21_BASE_UNET = {
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.10.0.dev0",
  "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": False,
  "cross_attention_dim": 1024,
  "down_block_types": _DOWN,
  "downsample_padding": 1,
  "dual_cross_attention": False,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_class_embeds": None,
  "only_cross_attention": False,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": _UP,
  "upcast_attention": False,
  "use_linear_projection": True,
}

# stabilityai/stable-diffusion-2-1 (768, v-prediction): 2.1-base but for these two values.
SD21_768_UNET = {**SD21_BASE_UNET, "sample_size": 96, "upcast_attention": True}


def _scaled(cfg: dict, divide: int, cross: int, groups: int, sample: int) -> dict:
  """``cfg`` with only the widths scaled down (everything else as published)."""
  out = copy.deepcopy(cfg)
  out["block_out_channels"] = [c // divide for c in cfg["block_out_channels"]]
  out.update(cross_attention_dim=cross, norm_num_groups=groups, sample_size=sample)
  return out


# SD 1.5 / 10: channels (32, 64, 128, 128), 8 heads of 4/8/16/16. SD 2.x / 16: channels
# (20, 40, 80, 80), [5, 10, 20, 20] heads of 4 (the real models: 64). Groups divide every
# normalised width, the up blocks' concatenations (e.g. 40 + 20) included.
CONFIGS = {
  "sd15": _scaled(SD15_UNET, 10, 32, 8, 16),
  "sd21_base": _scaled(SD21_BASE_UNET, 16, 48, 4, 16),
  "sd21_768": _scaled(SD21_768_UNET, 16, 48, 4, 24),
  # No published model: every other value the config accepts, in 2 blocks.
  "other": {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 24],
    "layers_per_block": [1, 2],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 3],
    "cross_attention_dim": [20, 20],
    "norm_num_groups": 4,
    "norm_eps": 1e-6,
    "in_channels": 3,
    "out_channels": 5,
    "center_input_sample": True,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1.5,
    "time_embedding_dim": 40,
    "conv_in_kernel": 1,
    "conv_out_kernel": 5,
    "act_fn": "swish",
    "use_linear_projection": True,
    "sample_size": 8,
  },
}


def _diffusers_unet(cfg: dict):
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if k[0] != "_"})
  with torch.no_grad():  # norms start as (1, 0): randomise them so scale/bias mix-ups show
    for m in model.modules():
      if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        m.weight.normal_(1.0, 0.2)
        m.bias.normal_(0.0, 0.2)
  return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (unet folder, diffusers model); built and saved once per name."""

  @functools.cache
  def get(name: str, safetensors: bool = True):
    model = _diffusers_unet(CONFIGS[name])
    path = tmp_path_factory.mktemp(f"{name}_{'st' if safetensors else 'bin'}")
    model.save_pretrained(path, safe_serialization=safetensors)
    return path, model

  return get


def _inputs(cfg: dict, n: int, height: int, width: int, seed: int = 0):
  """NCHW latents and [N, 77, D] text states, different per row."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, cfg["in_channels"], height, width)).astype(np.float32)
  dim = np.max(cfg["cross_attention_dim"])  # an int, or a list of equal ints
  ctx = rng.standard_normal((n, 77, dim)).astype(np.float32)
  return x, ctx


def _reference(model, x, timesteps, ctx) -> np.ndarray:
  t = torch.as_tensor(timesteps) if isinstance(timesteps, np.ndarray) else timesteps
  with torch.no_grad():
    return model(torch.from_numpy(x), t, torch.from_numpy(ctx)).sample.numpy()


def _ours(model, x, timesteps, ctx, mesh=None) -> np.ndarray:
  """Our UNet, jitted, on diffusers' NCHW inputs; the output back in NCHW. ``mesh``: rows
  sharded over its ``data`` axis (as the generation backend runs it), parameters replicated."""
  graphdef, state = nnx.split(model)
  args = [state, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), jnp.asarray(ctx)]
  if mesh is not None:
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    args = [jax.device_put(args[0], rows.update(spec=jax.sharding.PartitionSpec()))] + [
      jax.device_put(a, rows) for a in args[1:]
    ]
  lowered = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(*args)
  # LLVM -O0: the same HLO, compiled in half the time (~4 s instead of ~8 s on 2 shared cores).
  compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  out = compiled(*args)
  if mesh is not None:
    assert out.sharding.is_equivalent_to(rows, out.ndim)
  return np.asarray(out).transpose(0, 3, 1, 2)  # NHWC -> diffusers' NCHW


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
  assert out.shape == ref.shape and np.isfinite(out).all()
  return float(np.abs(out - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# Parity


def test_sd15_safetensors_per_row_timesteps(saved):
  path, ref_model = saved("sd15")
  model = unet_lib.load_unet(path)
  assert model.config.num_heads == (8, 8, 8, 8)
  assert not model.config.use_linear_projection
  x, ctx = _inputs(CONFIGS["sd15"], 3, 16, 16)
  ts = np.array([1, 500, 999], np.int64)  # one timestep per row
  assert _rel_err(_ours(model, x, ts, ctx), _reference(ref_model, x, ts, ctx)) < 1e-4


def test_sd21_base_legacy_bin_scalar_timestep(saved):
  path, ref_model = saved("sd21_base", safetensors=False)
  assert (path / "diffusion_pytorch_model.bin").exists()
  model = unet_lib.load_unet(path)
  assert model.config.num_heads == (5, 10, 20, 20) and model.config.use_linear_projection
  x, ctx = _inputs(CONFIGS["sd21_base"], 2, 16, 16, seed=1)
  assert _rel_err(_ours(model, x, 981, ctx), _reference(ref_model, x, 981, ctx)) < 1e-4


def test_sd21_768_upcast_fractional_timesteps_odd_latents(saved):
  """upcast_attention=True; float timesteps per row; 12x20 latents, not multiples of 8, so the
  upsamplers resize to the skips' sizes (diffusers' upsample_size: 2x3 -> 3x5 -> 6x10 -> 12x20)."""
  path, ref_model = saved("sd21_768")
  model = unet_lib.load_unet(path)
  assert model.config.upcast_attention
  x, ctx = _inputs(CONFIGS["sd21_768"], 2, 12, 20, seed=2)
  ts = np.array([0.5, 750.25], np.float32)
  assert _rel_err(_ours(model, x, ts, ctx), _reference(ref_model, x, ts, ctx)) < 1e-4


def test_other_config_values_rows_sharded(saved):
  """Per-block layer / transformer-layer / head lists, blocks without attention first, the time
  embedding options, mid_block_scale_factor, centred input, other conv kernels, 3 -> 5 channels;
  one row per device of a mesh (8 simulated CPU devices, tests/conftest.py)."""
  path, ref_model = saved("other")
  model = unet_lib.load_unet(path)
  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as ours
  x, ctx = _inputs(CONFIGS["other"], n, 8, 6, seed=4)
  ts = np.linspace(0, 999, n).astype(np.int64)
  assert _rel_err(_ours(model, x, ts, ctx, mesh), _reference(ref_model, x, ts, ctx)) < 1e-4


def test_bf16_close(saved):
  """bf16 compute, fp32 params. Measured: max abs err / max abs value 1.2e-2 vs diffusers fp32
  (SD 1.5 widths / 10, batch 2); asserted < 3e-2."""
  path, ref_model = saved("sd15")
  model = unet_lib.load_unet(path, dtype=jnp.bfloat16)
  x, ctx = _inputs(CONFIGS["sd15"], 2, 16, 16, seed=3)
  ts = np.array([20, 700], np.int64)
  out = _ours(model, x, ts, ctx)
  assert out.dtype == np.float32
  assert _rel_err(out, _reference(ref_model, x, ts, ctx)) < 3e-2


def test_timestep_embedding_matches_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding

  t = np.array([0, 1, 17.5, 500, 999], np.float32)
  for dim, flip, shift in [(32, True, 0), (32, False, 1), (33, True, 1), (320, True, 0)]:
    ref = get_timestep_embedding(
      torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    ).numpy()
    out = unet_lib.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    # sin(t f) at t f ~ 1000 rad: one ulp of f (our fp32 exp is within 1 ulp of torch's) moves it
    # by up to ~6e-5. Measured max abs diff: 5.9e-5 (t = 999, dim 320), 2.7e-5 (t = 500),
    # 1.9e-6 (t = 17.5).
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, err_msg=f"{dim} {flip} {shift}")
    np.testing.assert_allclose(np.asarray(out)[:3], ref[:3], atol=5e-6)


def test_upsample_nearest_matches_torch():
  x = np.arange(2 * 5 * 7 * 3, dtype=np.float32).reshape(2, 5, 7, 3)  # NHWC
  for size in [(10, 14), (9, 13), (11, 7), (5, 20)]:
    ref = torch.nn.functional.interpolate(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode="nearest"
    ).numpy()
    out = np.asarray(unet_lib.upsample_nearest(jnp.asarray(x), size)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(out, ref, err_msg=str(size))


@pytest.mark.parametrize("name", ["sd15", "sd21_base"])
def test_full_size_keys_and_shapes(name):
  """The published configs at full width: every diffusers tensor maps to one NNX parameter of the
  right shape and back (diffusers built on the meta device, ours abstractly: nothing allocated)."""
  published = {"sd15": SD15_UNET, "sd21_base": SD21_BASE_UNET}[name]
  config = unet_lib.UNetConfig.from_diffusers(published)
  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in published.items() if k[0] != "_"})
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  abstract = nnx.eval_shape(lambda: unet_lib.UNet(config, rngs=nnx.Rngs(0)))
  ours = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    key, fn = unet_lib.diffusers_key(path, linear_projection=config.use_linear_projection)
    assert key in ref_shapes, key
    shape = fn(np.empty(ref_shapes[key], np.float32)).shape  # abstract would do; cheap enough
    assert shape == tuple(var.shape), key
    ours[key] = shape
  assert sorted(ours) == sorted(ref_shapes)


# ---------------------------------------------------------------------------------------------
# Strict loading


@pytest.mark.parametrize(
  "mutation, key, words",
  [
    ("remove", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "missing"),
    ("add", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias", "unexpected"),
    # A linear-projection (SD 2.x) proj_in under an SD 1.x config, which wants a 1x1 conv.
    ("reshape", "mid_block.attentions.0.proj_in.weight", "shape mismatch"),
  ],
)
def test_strict_loader_names_the_key(saved, tmp_path, mutation, key, words):
  from safetensors.numpy import load_file, save_file

  path, _ = saved("sd15")
  sd = load_file(str(path / "diffusion_pytorch_model.safetensors"))
  if mutation == "remove":
    del sd[key]
  elif mutation == "add":
    sd[key] = np.zeros((128,), np.float32)
  else:
    sd[key] = sd[key][:, :, 0, 0]
  save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  shutil.copy(path / "config.json", tmp_path / "config.json")
  with pytest.raises(unet_lib.CheckpointError) as e:
    unet_lib.load_unet(tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and repr(key) in msg and words in msg, msg


def test_load_from_pipeline_folder_or_weights_file(saved, tmp_path):
  path, ref_model = saved("sd15")
  shutil.copytree(path, tmp_path / "unet")
  for source in (tmp_path, tmp_path / "unet" / "diffusion_pytorch_model.safetensors"):
    model = unet_lib.load_unet(source)
    kernel = np.asarray(model.conv_in.kernel[...])  # HWIO
    np.testing.assert_array_equal(
      kernel, ref_model.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0)
    )


def test_loader_file_errors(tmp_path):
  with pytest.raises(unet_lib.CheckpointError, match="no such file"):
    unet_lib.load_unet(tmp_path / "nope")
  with pytest.raises(unet_lib.CheckpointError, match="config.json: not found"):
    unet_lib.load_unet(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(CONFIGS["sd15"]))
  with pytest.raises(unet_lib.CheckpointError, match="no diffusion_pytorch_model.safetensors"):
    unet_lib.load_unet(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(unet_lib.CheckpointError, match="invalid JSON"):
    unet_lib.load_unet(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**SD15_UNET, "class_embed_type": "timestep"}))
  with pytest.raises(ConfigError, match=r"config\.json: unet config class_embed_type='timestep'"):
    unet_lib.load_unet(tmp_path)


# ---------------------------------------------------------------------------------------------
# Config


def test_config_from_published(saved):
  sd15 = unet_lib.UNetConfig.from_diffusers(SD15_UNET)
  assert sd15 == unet_lib.UNetConfig()  # the dataclass defaults are SD 1.5's
  sd21 = unet_lib.UNetConfig.from_diffusers(SD21_768_UNET)
  assert sd21.num_heads == (5, 10, 20, 20)  # heads (sic: attention_head_dim); head dim 64
  assert sd21.cross_attention_dim == (1024,) * 4 and sd21.sample_size == 96
  assert sd21.use_linear_projection and sd21.upcast_attention and sd21.time_embed_dim == 1280
  # diffusers' save_pretrained writes every __init__ argument: all of them are understood.
  full = json.loads((saved("sd15")[0] / "config.json").read_text())
  assert len(full) > 40
  assert unet_lib.UNetConfig.from_diffusers(full) == unet_lib.UNetConfig.from_diffusers(
    CONFIGS["sd15"]
  )


@pytest.mark.parametrize(
  "override, key",
  [
    ({"down_block_types": ["AttnDownBlock2D"] + _DOWN[1:]}, "down_block_types"),
    ({"up_block_types": _UP[:3] + ["SimpleCrossAttnUpBlock2D"]}, "up_block_types"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"encoder_hid_dim": 512}, "encoder_hid_dim"),
    ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"attention_type": "gated"}, "attention_type"),
    ({"only_cross_attention": [False, True, False, False]}, "only_cross_attention"),
    ({"dual_cross_attention": True}, "dual_cross_attention"),
    ({"num_attention_heads": 8}, "num_attention_heads"),
    ({"act_fn": "mish"}, "act_fn"),
    ({"downsample_padding": 0}, "downsample_padding"),
    ({"norm_num_groups": None}, "norm_num_groups"),
    ({"norm_num_groups": 24}, "norm_num_groups"),
    ({"attention_head_dim": [5, 10, 20]}, "attention_head_dim"),
    ({"attention_head_dim": 7}, "attention_head_dim"),
    ({"transformer_layers_per_block": [[1, 1], [1, 1], [1, 1], [1, 1]]}, "transformer_layers"),
    ({"some_future_key": 1}, "some_future_key"),
    ({"_class_name": "UNet2DModel"}, "_class_name"),
  ],
)
def test_config_refuses_what_it_does_not_implement(override, key):
  with pytest.raises(ConfigError) as e:
    unet_lib.UNetConfig.from_diffusers({**SD21_BASE_UNET, **override})
  msg = str(e.value)
  assert "\n" not in msg and key in msg, msg
