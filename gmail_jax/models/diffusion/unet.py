"""diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x) in Flax NNX, NHWC.

Layout: NHWC everywhere, public boundary included:

    UNet(sample [N, H, W, C_in], timesteps [] or [N], encoder_hidden_states [N, L, D_ctx])
      -> noise / v prediction [N, H, W, C_out], fp32

(diffusers' NCHW latents: ``sample.transpose(0, 2, 3, 1)`` in, ``.transpose(0, 3, 1, 2)`` out).
Channels-last is what XLA wants for convolutions on GPU/TPU, makes GroupNorm a reshape of the last
axis, makes a 1x1 conv the same matmul as a linear layer, and needs no transposes around the
attention blocks, where diffusers permutes NCHW <-> [N, HW, C] twice per block; a sampler that
keeps its latents NHWC never transposes between steps.

Forward pass (``c0 = block_out_channels[0]``, ``emb`` the time embedding):

    t_emb = sinusoidal(t)                                           # [N, c0], fp32 (diffusers'
    emb   = linear_2(silu(linear_1(t_emb)))                         #  get_timestep_embedding)
    h = conv_in(2x - 1 if center_input_sample else x); skips = [h]
    down block i: (resnet -> [transformer]) x layers_per_block[i]   each output appended to skips
                  then Downsample2D (conv 3x3, stride 2, pad 1)      its output appended to skips
    mid:          resnet -> transformer -> resnet
    up block i:   (h = concat([h, skips.pop()], channels); resnet -> [transformer])
                      x (layers_per_block[-1 - i] + 1)
                  then Upsample2D (nearest to the next skip's size, 2x when divisible; conv 3x3)
    out = conv_out(silu(GroupNorm(h)))

    ResnetBlock2D(x, emb) = shortcut(x) + conv2(silu(GN2(conv1(silu(GN1(x))) + W_t silu(emb))))
                            (/ mid_block_scale_factor in the mid block; shortcut = 1x1 conv when
                             the channel count changes, else identity)
    Transformer2DModel(x) = x + proj_out(blocks(proj_in(GN(x))))     GN eps 1e-6 (fixed, sic)
        proj_in/out: linear (use_linear_projection, SD 2.x) or 1x1 conv (SD 1.x): the same matmul
        on NHWC, only the checkpoint shapes differ ([O, I] vs [O, I, 1, 1]).
    BasicTransformerBlock(h, ctx) = h += attn1(LN1(h)); h += attn2(LN2(h), ctx); h += ff(LN3(h))
        attn(x, c) = to_out(softmax(q k^T / sqrt(d_head)) v),  q = to_q x, k = to_k c, v = to_v c
        ff(x)      = W_2 (a * gelu(g)),  [a, g] = W_1 x  (GEGLU, exact erf GELU, inner 4 * dim)
        LN eps 1e-5 (Transformer2DModel's default; the unet's norm_eps is not passed down, sic)

Heads: diffusers' ``attention_head_dim`` is, for these models, the NUMBER of heads per block
(``num_attention_heads = num_attention_heads or attention_head_dim``, diffusers issue #2011):
down block i has ``attention_head_dim[i]`` heads of ``block_out_channels[i] // heads`` channels,
the mid block ``attention_head_dim[-1]``, up block i the reversed list's i-th entry. SD 1.5: 8 heads
(head dims 40/80/160); SD 2.x: [5, 10, 20, 20] heads (head dim 64 everywhere).

Precision: ``dtype`` is the compute dtype of every conv and matmul; params stay ``param_dtype``
(fp32). GroupNorm and LayerNorm run in fp32 and cast back. Attention is
``jax.nn.dot_product_attention``: its XLA path accumulates q k^T in fp32 and takes the softmax in
fp32 for any input dtype, and cuDNN's fused kernel (``attention_impl='cudnn'``, GPU, bf16/fp16)
keeps logits and softmax in fp32 as well, so ``upcast_attention`` (diffusers: logits in fp32) holds
whatever its value (diffusers' default SDPA processor ignores the flag altogether). The output is
fp32. Measured on CPU against diffusers' fp32 output (max abs err / max abs value, SD 1.5 and 2.x
configs at 1/10-1/16 width, tests/test_diffusion_unet.py): fp32 compute <= 1.2e-6, bf16 1.2e-2.

Weights: :func:`load_unet` reads a diffusers ``unet/`` folder through convert.read_state_dict /
convert.load_state_into (strict; one-line CheckpointError naming the first missing, unexpected or
misshapen key). NNX paths mirror diffusers' names; :func:`diffusers_key` maps them:

    .../kernel of a conv           <- .../weight   OIHW -> HWIO
    .../kernel of a linear         <- .../weight   [out, in] -> [in, out]
    .../scale (GroupNorm, LN)      <- .../weight;   .../bias <- .../bias
    */downsampler, */upsampler     <- */downsamplers.0.conv, */upsamplers.0.conv
    attn{1,2}/to_out               <- attn{1,2}.to_out.0
    ff/proj, ff/out                <- ff.net.0.proj (GEGLU), ff.net.2
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models import convert
from gmail_jax.models.clip import LayerNorm
from gmail_jax.models.layers import Dense

CheckpointError = convert.CheckpointError

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_ACTS = ("silu", "swish")  # the same function in diffusers' get_activation

# Transformer2DModel's own norms: not taken from the unet config (diffusers hard-codes them).
_TRANSFORMER_GROUPNORM_EPS = 1e-6
_TRANSFORMER_LAYERNORM_EPS = 1e-5

AttentionImpl = str | None  # jax.nn.dot_product_attention's implementation: None, 'xla', 'cudnn'


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """What this UNet implements; per-block fields are tuples over the down blocks (diffusers'
  int-or-list values expanded). Defaults: SD 1.5's ``unet/config.json``."""

  in_channels: int = 4
  out_channels: int = 4
  sample_size: int | tuple[int, ...] | None = 64  # latent size the model was trained at (info)
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  num_heads: tuple[int, ...] = (8, 8, 8, 8)  # diffusers' attention_head_dim (sic), per block
  cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False  # always satisfied: attention logits are fp32 (module doc)
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  def __post_init__(self):
    n = len(self.block_out_channels)
    if n < 1:
      raise ConfigError("unet config block_out_channels: empty")
    for key in (
      "down_block_types",
      "up_block_types",
      "layers_per_block",
      "transformer_layers_per_block",
      "num_heads",
      "cross_attention_dim",
    ):
      if len(getattr(self, key)) != n:
        name = "attention_head_dim" if key == "num_heads" else key
        raise ConfigError(
          f"unet config {name}: {len(getattr(self, key))} entries for {n} block_out_channels"
        )
    for t in self.down_block_types:
      if t not in _DOWN_TYPES:
        raise ConfigError(f"unet config down_block_types: {t!r} not implemented ({_DOWN_TYPES})")
    for t in self.up_block_types:
      if t not in _UP_TYPES:
        raise ConfigError(f"unet config up_block_types: {t!r} not implemented ({_UP_TYPES})")
    for k in ("conv_in_kernel", "conv_out_kernel"):
      if getattr(self, k) % 2 != 1:
        raise ConfigError(f"unet config {k}={getattr(self, k)}: only odd kernels are implemented")
    # Attention widths: heads * (C // heads) must be C (diffusers floors; no SD config needs it).
    for c, heads, where in self._attention_blocks():
      if heads < 1 or c % heads:
        raise ConfigError(
          f"unet config attention_head_dim: {heads} heads do not divide the {c} channels of {where}"
        )
    for c, where in self._normalized_channels():
      if c % self.norm_num_groups:
        raise ConfigError(
          f"unet config norm_num_groups={self.norm_num_groups} does not divide the {c} channels "
          f"of {where}"
        )

  @property
  def time_embed_dim(self) -> int:
    """Width of the time embedding fed to every resnet: ``time_embedding_dim or 4 * c0``."""
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  def up_index(self, i: int) -> int:
    """Up block i takes its per-block settings from down block ``n - 1 - i`` (reversed lists)."""
    return len(self.block_out_channels) - 1 - i

  def up_channels(self, i: int) -> tuple[int, int, list[int]]:
    """(prev_output_channel, out_channels, skip channels per resnet) of up block i, as diffusers:
    the last resnet of a block takes the skip of the previous (lower-resolution) down block."""
    rev = self.block_out_channels[::-1]
    out, prev = rev[i], rev[max(i - 1, 0)]
    into = rev[min(i + 1, len(rev) - 1)]
    layers = self.layers_per_block[self.up_index(i)] + 1
    return prev, out, [into if j == layers - 1 else out for j in range(layers)]

  def _attention_blocks(self):
    n = len(self.block_out_channels)
    for i in range(n):
      if self.down_block_types[i] == "CrossAttnDownBlock2D":
        yield self.block_out_channels[i], self.num_heads[i], f"down block {i}"
      if self.up_block_types[i] == "CrossAttnUpBlock2D":
        j = self.up_index(i)
        yield self.block_out_channels[j], self.num_heads[j], f"up block {i}"
    yield self.block_out_channels[-1], self.num_heads[-1], "the mid block"

  def _normalized_channels(self):
    c = self.block_out_channels
    yield c[0], "conv_norm_out"
    for i in range(len(c)):
      yield (c[i - 1] if i else c[0]), f"down block {i}"
      yield c[i], f"down block {i}"
      prev, out, skips = self.up_channels(i)
      for j, skip in enumerate(skips):
        yield (prev if j == 0 else out) + skip, f"up block {i} resnet {j}"
      yield out, f"up block {i}"

  def to_diffusers(self) -> dict[str, Any]:
    """diffusers' ``unet/config.json`` for this config: :meth:`from_diffusers` maps it back to
    ``self``, and ``diffusers.UNet2DConditionModel.from_config`` builds the same network."""
    cross = self.cross_attention_dim
    size = self.sample_size
    return {
      "_class_name": "UNet2DConditionModel",
      "_diffusers_version": "0.42.1",  # the version this mapping is tested against
      "sample_size": list(size) if isinstance(size, tuple) else size,
      "in_channels": self.in_channels,
      "out_channels": self.out_channels,
      "center_input_sample": self.center_input_sample,
      "flip_sin_to_cos": self.flip_sin_to_cos,
      "freq_shift": self.freq_shift,
      "down_block_types": list(self.down_block_types),
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "up_block_types": list(self.up_block_types),
      "block_out_channels": list(self.block_out_channels),
      "layers_per_block": list(self.layers_per_block),
      "transformer_layers_per_block": list(self.transformer_layers_per_block),
      "attention_head_dim": list(self.num_heads),  # diffusers' name for the head count (sic)
      # One int when every block agrees (the published configs' form).
      "cross_attention_dim": cross[0] if len(set(cross)) == 1 else list(cross),
      "downsample_padding": 1,
      "mid_block_scale_factor": self.mid_block_scale_factor,
      "act_fn": "silu",
      "norm_num_groups": self.norm_num_groups,
      "norm_eps": self.norm_eps,
      "use_linear_projection": self.use_linear_projection,
      "upcast_attention": self.upcast_attention,
      "time_embedding_dim": self.time_embedding_dim,
      "conv_in_kernel": self.conv_in_kernel,
      "conv_out_kernel": self.conv_out_kernel,
    }

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> UNetConfig:
    """From a diffusers ``UNet2DConditionModel`` ``config.json`` dict; missing keys take diffusers'
    defaults. Any key or value this implementation does not cover raises a one-line ConfigError
    naming the key (unknown keys too: their meaning cannot be checked)."""
    return _config_from_diffusers(d)


# diffusers' UNet2DConditionModel.__init__ defaults, for keys that select what we implement.
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
  sample_size=None,
  in_channels=4,
  out_channels=4,
  center_input_sample=False,
  flip_sin_to_cos=True,
  freq_shift=0,
  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
  block_out_channels=(320, 640, 1280, 1280),
  layers_per_block=2,
  mid_block_scale_factor=1,
  act_fn="silu",
  norm_num_groups=32,
  norm_eps=1e-5,
  cross_attention_dim=1280,
  transformer_layers_per_block=1,
  attention_head_dim=8,
  use_linear_projection=False,
  upcast_attention=False,
  time_embedding_dim=None,
  conv_in_kernel=3,
  conv_out_kernel=3,
  mid_block_type="UNetMidBlock2DCrossAttn",
  downsample_padding=1,
)

# Keys whose value must be one of these (diffusers' default, or an equivalent spelling): anything
# else selects a layer or an input this module does not implement.
_ONLY: dict[str, tuple] = dict(
  mid_block_type=("UNetMidBlock2DCrossAttn",),
  downsample_padding=(1,),
  act_fn=_ACTS,
  only_cross_attention=(False,),
  mid_block_only_cross_attention=(None, False),
  dual_cross_attention=(False,),
  num_attention_heads=(None,),  # diffusers itself refuses it (issue #2011)
  encoder_hid_dim=(None,),
  encoder_hid_dim_type=(None,),
  class_embed_type=(None,),
  num_class_embeds=(None,),
  class_embeddings_concat=(False,),
  projection_class_embeddings_input_dim=(None,),
  addition_embed_type=(None,),
  addition_time_embed_dim=(None,),
  time_embedding_type=("positional",),
  time_embedding_act_fn=(None,),
  timestep_post_act=(None,),
  time_cond_proj_dim=(None,),
  resnet_time_scale_shift=("default",),
  resnet_skip_time_act=(False,),
  resnet_out_scale_factor=(1, 1.0),
  attention_type=("default",),
  cross_attention_norm=(None,),
  reverse_transformer_layers_per_block=(None,),
)
# Keys accepted with any value: inference-only (dropout) or unused without a refused feature.
_IGNORED = ("dropout", "addition_embed_type_num_heads")


def _per_block(d: Mapping[str, Any], key: str, n: int) -> tuple[int, ...]:
  value = d[key]
  if isinstance(value, bool):
    raise ConfigError(f"unet config {key}={value!r}: expected an int or a list of {n} ints")
  if isinstance(value, int):
    return (value,) * n
  if not isinstance(value, (list, tuple)) or not all(
    isinstance(v, int) and not isinstance(v, bool) for v in value
  ):
    raise ConfigError(f"unet config {key}={value!r}: expected an int or a list of {n} ints")
  if len(value) != n:
    raise ConfigError(f"unet config {key}={list(value)}: {len(value)} entries for {n} blocks")
  return tuple(value)


def _block_types(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
  value = d[key]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise ConfigError(f"unet config {key}={value!r}: expected a list of block type names")
  # diffusers' get_down_block / get_up_block strip this legacy prefix.
  return tuple(v[7:] if v.startswith("UNetRes") else v for v in value)


def _config_from_diffusers(d: Mapping[str, Any]) -> UNetConfig:
  if not isinstance(d, Mapping):
    raise ConfigError(f"unet config: expected a JSON object, got {type(d).__name__}")
  cls_name = d.get("_class_name", "UNet2DConditionModel")
  if cls_name != "UNet2DConditionModel":
    raise ConfigError(f"unet config _class_name={cls_name!r}: expected 'UNet2DConditionModel'")
  known = {*_DIFFUSERS_DEFAULTS, *_ONLY, *_IGNORED}
  for key in d:
    if not key.startswith("_") and key not in known:
      raise ConfigError(f"unet config {key}={d[key]!r}: unknown key, not implemented")
  for key, allowed in _ONLY.items():
    given = d.get(key, allowed[0])
    value = given
    if isinstance(value, list) and key == "only_cross_attention":  # per-block flags
      value = any(value)
    # ``is`` for booleans: True == 1 would pass for a numeric default.
    if value not in allowed or (isinstance(value, bool) and not any(a is value for a in allowed)):
      raise ConfigError(
        f"unet config {key}={given!r}: not implemented (supported: "
        f"{', '.join(repr(a) for a in allowed)})"
      )
  cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in _DIFFUSERS_DEFAULTS}}
  if cfg["norm_num_groups"] is None:
    raise ConfigError("unet config norm_num_groups=None: not implemented (no output GroupNorm)")
  channels = cfg["block_out_channels"]
  if not isinstance(channels, (list, tuple)) or not all(
    isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels
  ):
    raise ConfigError(f"unet config block_out_channels={channels!r}: expected positive ints")
  n = len(channels)
  if isinstance(cfg["transformer_layers_per_block"], (list, tuple)) and any(
    isinstance(v, (list, tuple)) for v in cfg["transformer_layers_per_block"]
  ):
    raise ConfigError(
      f"unet config transformer_layers_per_block={cfg['transformer_layers_per_block']!r}: "
      "per-layer (nested) lists are not implemented"
    )
  sample_size = cfg["sample_size"]
  try:
    return UNetConfig(
      in_channels=int(cfg["in_channels"]),
      out_channels=int(cfg["out_channels"]),
      sample_size=tuple(sample_size) if isinstance(sample_size, list) else sample_size,
      center_input_sample=bool(cfg["center_input_sample"]),
      flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
      freq_shift=float(cfg["freq_shift"]),
      down_block_types=_block_types(cfg, "down_block_types"),
      up_block_types=_block_types(cfg, "up_block_types"),
      block_out_channels=tuple(channels),
      layers_per_block=_per_block(cfg, "layers_per_block", n),
      transformer_layers_per_block=_per_block(cfg, "transformer_layers_per_block", n),
      num_heads=_per_block(cfg, "attention_head_dim", n),
      cross_attention_dim=_per_block(cfg, "cross_attention_dim", n),
      mid_block_scale_factor=float(cfg["mid_block_scale_factor"]),
      norm_num_groups=int(cfg["norm_num_groups"]),
      norm_eps=float(cfg["norm_eps"]),
      use_linear_projection=bool(cfg["use_linear_projection"]),
      upcast_attention=bool(cfg["upcast_attention"]),
      time_embedding_dim=(
        None if cfg["time_embedding_dim"] is None else int(cfg["time_embedding_dim"])
      ),
      conv_in_kernel=int(cfg["conv_in_kernel"]),
      conv_out_kernel=int(cfg["conv_out_kernel"]),
    )
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"unet config: bad value ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# Layers


def timestep_embedding(
  timesteps: jax.Array,
  dim: int,
  *,
  flip_sin_to_cos: bool,
  freq_shift: float,
  max_period: float = 10000.0,
) -> jax.Array:
  """diffusers' ``get_timestep_embedding`` (scale 1), fp32 ``[N] -> [N, dim]``:

      f_k  = exp(-ln(max_period) * k / (dim/2 - freq_shift)),   k = 0 .. dim/2 - 1
      emb  = [sin(t f), cos(t f)]   ([cos, sin] with flip_sin_to_cos), zero-padded to odd dim

  t * f reaches ~1000 rad, where one ulp of f moves sin(t f) by up to ~6e-5, so f is a numpy
  constant: the exponent in diffusers' order and fp32 rounding (bit-equal to torch's), its exp
  rounded from fp64 (within 1 ulp of torch's expf; XLA:CPU's division and exp were up to 12 ulps
  off); t * f is one fp32 multiply, as in diffusers.
  """
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - freq_shift)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GroupNorm(nnx.Module):
  """torch ``GroupNorm`` on NHWC (or [N, L, C]): channels split into ``groups`` contiguous groups,
  each normalised over (spatial, its channels) with the biased variance, in fp32; then the
  per-channel ``scale``/``bias`` (diffusers ``weight``/``bias``); cast back to the input dtype."""

  def __init__(self, channels: int, groups: int, eps: float, *, param_dtype=jnp.float32):
    if channels % groups:
      raise ConfigError(f"GroupNorm: {groups} groups do not divide {channels} channels")
    self.groups = groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    # Only the channel axis is split (no merge of the spatial axes), a reshape that explicitly
    # sharded (batch) meshes accept without an out_sharding.
    h = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
    axes = (*range(1, x.ndim - 1), x.ndim)  # all but batch and group
    mean = h.mean(axis=axes, keepdims=True)
    var = jnp.square(h - mean).mean(axis=axes, keepdims=True)
    h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return h.astype(x.dtype)


class Conv2d(nnx.Module):
  """``k x k`` convolution on NHWC with an HWIO ``kernel`` (torch OIHW transposed) and a bias;
  symmetric zero padding ``(k - 1) // 2`` like diffusers' convs. A 1x1 stride-1 conv is computed
  as the matmul it is (XLA:CPU lowers convolutions far slower than dots)."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    init = nnx.initializers.lecun_normal()
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
    self.stride = stride
    self.padding = (kernel_size - 1) // 2
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    w = self.kernel[...].astype(dtype)
    if w.shape[:2] == (1, 1) and self.stride == 1:
      y = x @ w[0, 0]
    else:
      p = self.padding
      y = jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(self.stride, self.stride),
        padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    return y + self.bias[...].astype(dtype)


class TimestepEmbedding(nnx.Module):
  """``linear_2(silu(linear_1(t_emb)))``: [N, c0] -> [N, time_embed_dim]."""

  def __init__(self, in_features: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = Dense(in_features, dim, **kw)
    self.linear_2 = Dense(dim, dim, **kw)

  def __call__(self, t_emb: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(t_emb)))


class ResnetBlock2D(nnx.Module):
  """``(shortcut(x) + conv2(silu(GN2(conv1(silu(GN1(x))) + time_emb_proj(silu(emb)))))) / s``."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    temb_channels: int,
    *,
    groups: int,
    eps: float,
    output_scale_factor: float = 1.0,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = GroupNorm(in_channels, groups, eps, param_dtype=param_dtype)
    self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
    self.time_emb_proj = Dense(temb_channels, out_channels, **kw)
    self.norm2 = GroupNorm(out_channels, groups, eps, param_dtype=param_dtype)
    self.conv2 = Conv2d(out_channels, out_channels, 3, **kw)
    self.conv_shortcut = (
      Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
    )
    self.output_scale_factor = output_scale_factor

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = h + self.time_emb_proj(jax.nn.silu(emb))[:, None, None, :].astype(h.dtype)
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / jnp.asarray(self.output_scale_factor, out.dtype)
    return out


class Attention(nnx.Module):
  """Multi-head attention of ``x`` over ``context`` (itself when None): bias-free q/k/v, biased
  ``to_out``; ``jax.nn.dot_product_attention`` (fp32 logits and softmax; module doc)."""

  def __init__(
    self,
    query_dim: int,
    context_dim: int,
    heads: int,
    head_dim: int,
    *,
    attention_impl: AttentionImpl,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    inner = heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.attention_impl = attention_impl
    self.to_q = Dense(query_dim, inner, use_bias=False, **kw)
    self.to_k = Dense(context_dim, inner, use_bias=False, **kw)
    self.to_v = Dense(context_dim, inner, use_bias=False, **kw)
    self.to_out = Dense(inner, query_dim, **kw)

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # [N, T, heads, head_dim]
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    return self.to_out(out.reshape(*x.shape[:2], -1))


class FeedForward(nnx.Module):
  """GEGLU feed-forward: ``out(a * gelu(g))`` with ``[a, g] = proj(x)`` split in halves."""

  def __init__(self, dim: int, *, mult: int = 4, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = Dense(dim, 2 * mult * dim, **kw)
    self.out = Dense(mult * dim, dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    a, gate = jnp.split(self.proj(x), 2, axis=-1)
    return self.out(a * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
  """Pre-LN: self-attention, cross-attention on the text states, GEGLU feed-forward."""

  def __init__(
    self,
    dim: int,
    context_dim: int,
    heads: int,
    *,
    attention_impl: AttentionImpl,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ln = functools.partial(LayerNorm, dim, _TRANSFORMER_LAYERNORM_EPS, param_dtype=param_dtype)
    head_dim = dim // heads
    self.norm1 = ln()
    self.attn1 = Attention(dim, dim, heads, head_dim, attention_impl=attention_impl, **kw)
    self.norm2 = ln()
    self.attn2 = Attention(dim, context_dim, heads, head_dim, attention_impl=attention_impl, **kw)
    self.norm3 = ln()
    self.ff = FeedForward(dim, **kw)

  def __call__(self, h: jax.Array, context: jax.Array) -> jax.Array:
    h = h + self.attn1(self.norm1(h))
    h = h + self.attn2(self.norm2(h), context)
    return h + self.ff(self.norm3(h))


class Transformer2DModel(nnx.Module):
  """``x + proj_out(blocks(proj_in(GN(x)), ctx))`` over the H*W tokens of an NHWC map."""

  def __init__(
    self,
    channels: int,
    context_dim: int,
    heads: int,
    layers: int,
    *,
    groups: int,
    linear_projection: bool,
    attention_impl: AttentionImpl,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = GroupNorm(channels, groups, _TRANSFORMER_GROUPNORM_EPS, param_dtype=param_dtype)
    # A 1x1 conv and a linear layer are the same matmul on NHWC; the module kind only fixes the
    # parameter shape, so checkpoints load (and shape errors read) as diffusers has them.
    proj = Dense if linear_projection else functools.partial(Conv2d, kernel_size=1)
    self.proj_in = proj(channels, channels, **kw)
    self.transformer_blocks = nnx.List(
      [
        BasicTransformerBlock(channels, context_dim, heads, attention_impl=attention_impl, **kw)
        for _ in range(layers)
      ]
    )
    self.proj_out = proj(channels, channels, **kw)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    n, height, width, c = x.shape
    h = self.proj_in(self.norm(x)).reshape(n, height * width, c)
    for block in self.transformer_blocks:
      h = block(h, context)
    h = self.proj_out(h.reshape(n, height, width, c))
    return h + x.astype(h.dtype)


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
  """torch ``F.interpolate(mode='nearest', size=...)`` source rows: ``min(floor(j * s), in - 1)``
  with ``s = in / out`` in fp32 (exactly ``j // 2`` for the usual 2x)."""
  if size_out == 2 * size_in:
    return np.arange(size_out) // 2
  scale = np.float32(size_in) / np.float32(size_out)
  j = np.arange(size_out, dtype=np.float32)
  return np.minimum(np.floor(j * scale).astype(np.int64), size_in - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC nearest-neighbour resize to ``size`` (H, W), as torch's; 2x is a repeat."""
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  x = jnp.take(x, jnp.asarray(_nearest_index(h, size[0])), axis=1)
  return jnp.take(x, jnp.asarray(_nearest_index(w, size[1])), axis=2)


class DownBlock(nnx.Module):
  """CrossAttnDownBlock2D (``attentions`` set) or DownBlock2D; returns (h, skip outputs)."""

  def __init__(
    self,
    cfg: UNetConfig,
    i: int,
    *,
    attention_impl: AttentionImpl,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = cfg.block_out_channels
    out = c[i]
    layers = cfg.layers_per_block[i]
    res = functools.partial(
      ResnetBlock2D, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps
    )
    self.resnets = nnx.List(
      [res(c[i - 1] if i and j == 0 else out, out, **kw) for j in range(layers)]
    )
    self.attentions = nnx.data(None)
    if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
      self.attentions = nnx.List(
        [
          Transformer2DModel(
            out,
            cfg.cross_attention_dim[i],
            cfg.num_heads[i],
            cfg.transformer_layers_per_block[i],
            groups=cfg.norm_num_groups,
            linear_projection=cfg.use_linear_projection,
            attention_impl=attention_impl,
            **kw,
          )
          for _ in range(layers)
        ]
      )
    last = i == len(c) - 1
    self.downsampler = None if last else Conv2d(out, out, 3, stride=2, **kw)

  def __call__(
    self, h: jax.Array, emb: jax.Array, context: jax.Array
  ) -> tuple[jax.Array, list[jax.Array]]:
    skips = []
    for j, resnet in enumerate(self.resnets):
      h = resnet(h, emb)
      if self.attentions is not None:
        h = self.attentions[j](h, context)
      skips.append(h)
    if self.downsampler is not None:
      h = self.downsampler(h)
      skips.append(h)
    return h, skips


class MidBlock(nnx.Module):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) once."""

  def __init__(
    self,
    cfg: UNetConfig,
    *,
    attention_impl: AttentionImpl,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = cfg.block_out_channels[-1]
    res = functools.partial(
      ResnetBlock2D,
      c,
      c,
      cfg.time_embed_dim,
      groups=cfg.norm_num_groups,
      eps=cfg.norm_eps,
      output_scale_factor=cfg.mid_block_scale_factor,
    )
    self.resnets = nnx.List([res(**kw), res(**kw)])
    self.attentions = nnx.List(
      [
        Transformer2DModel(
          c,
          cfg.cross_attention_dim[-1],
          cfg.num_heads[-1],
          cfg.transformer_layers_per_block[-1],
          groups=cfg.norm_num_groups,
          linear_projection=cfg.use_linear_projection,
          attention_impl=attention_impl,
          **kw,
        )
      ]
    )

  def __call__(self, h: jax.Array, emb: jax.Array, context: jax.Array) -> jax.Array:
    h = self.resnets[0](h, emb)
    h = self.attentions[0](h, context)
    return self.resnets[1](h, emb)


class UpBlock(nnx.Module):
  """CrossAttnUpBlock2D (``attentions`` set) or UpBlock2D. Each resnet takes
  ``concat([h, skip], channels)``, h first, skips consumed from the last one back."""

  def __init__(
    self,
    cfg: UNetConfig,
    i: int,
    *,
    attention_impl: AttentionImpl,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    prev, out, skip_channels = cfg.up_channels(i)
    k = cfg.up_index(i)  # the down block whose per-block settings this block mirrors
    res = functools.partial(
      ResnetBlock2D, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps
    )
    self.resnets = nnx.List(
      [res((prev if j == 0 else out) + s, out, **kw) for j, s in enumerate(skip_channels)]
    )
    self.attentions = nnx.data(None)
    if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
      self.attentions = nnx.List(
        [
          Transformer2DModel(
            out,
            cfg.cross_attention_dim[k],
            cfg.num_heads[k],
            cfg.transformer_layers_per_block[k],
            groups=cfg.norm_num_groups,
            linear_projection=cfg.use_linear_projection,
            attention_impl=attention_impl,
            **kw,
          )
          for _ in skip_channels
        ]
      )
    last = i == len(cfg.block_out_channels) - 1
    self.upsampler = None if last else Conv2d(out, out, 3, **kw)

  def __call__(
    self,
    h: jax.Array,
    skips: Sequence[jax.Array],
    emb: jax.Array,
    context: jax.Array,
    upsample_size: tuple[int, int] | None,
  ) -> jax.Array:
    skips = list(skips)
    for j, resnet in enumerate(self.resnets):
      skip = skips.pop()
      h = resnet(jnp.concatenate([h, skip.astype(h.dtype)], axis=-1), emb)
      if self.attentions is not None:
        h = self.attentions[j](h, context)
    if self.upsampler is not None:
      h = self.upsampler(upsample_nearest(h, upsample_size))
    return h


class UNet(nnx.Module):
  """``UNet2DConditionModel`` forward (module doc): NHWC in, fp32 NHWC out.

  ``dtype``: compute dtype (None = the input's, i.e. fp32); ``param_dtype``: parameter storage.
  ``attention_impl``: ``jax.nn.dot_product_attention``'s ``implementation``: None lets JAX pick
  (XLA today), 'xla' anywhere, 'cudnn' for the fused kernel on GPU with bf16/fp16 compute (head
  dims must be multiples of 8 and <= 256 on Hopper, <= 128 before: SD 1.5's 160-wide heads in its
  two lowest-resolution levels then need 'xla'; SD 2.x's are all 64).
  """

  def __init__(
    self,
    config: UNetConfig,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    attention_impl: AttentionImpl = None,
    rngs: nnx.Rngs,
  ):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    blk = dict(attention_impl=attention_impl, **kw)
    c = config.block_out_channels
    self.conv_in = Conv2d(config.in_channels, c[0], config.conv_in_kernel, **kw)
    self.time_embedding = TimestepEmbedding(c[0], config.time_embed_dim, **kw)
    self.down_blocks = nnx.List([DownBlock(config, i, **blk) for i in range(len(c))])
    self.mid_block = MidBlock(config, **blk)
    self.up_blocks = nnx.List([UpBlock(config, i, **blk) for i in range(len(c))])
    self.conv_norm_out = GroupNorm(
      c[0], config.norm_num_groups, config.norm_eps, param_dtype=param_dtype
    )
    self.conv_out = Conv2d(c[0], config.out_channels, config.conv_out_kernel, **kw)

  def __call__(
    self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array
  ) -> jax.Array:
    """``sample`` [N, H, W, in_channels]; ``timesteps`` a scalar or [N] (int or float);
    ``encoder_hidden_states`` [N, L, cross_attention_dim] -> [N, H, W, out_channels] fp32."""
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(
        f"UNet expects sample [N, H, W, {cfg.in_channels}] (NHWC), got {tuple(sample.shape)}"
      )
    n = sample.shape[0]
    ctx = encoder_hidden_states
    if ctx.ndim != 3 or ctx.shape[0] != n:
      raise ValueError(f"UNet expects encoder_hidden_states [{n}, L, D], got {tuple(ctx.shape)}")
    t = jnp.asarray(timesteps)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (n,))
    if t.shape != (n,):
      raise ValueError(f"UNet expects timesteps as a scalar or [{n}], got {tuple(t.shape)}")
    dtype = self.dtype or jnp.float32
    x = sample.astype(dtype)
    if cfg.center_input_sample:
      x = 2 * x - 1
    t_emb = timestep_embedding(
      t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
    )
    emb = self.time_embedding(t_emb.astype(dtype))
    ctx = ctx.astype(dtype)

    h = self.conv_in(x)
    skips = [h]
    for block in self.down_blocks:
      h, res = block(h, emb, ctx)
      skips += res
    h = self.mid_block(h, emb, ctx)
    for block in self.up_blocks:
      k = len(block.resnets)
      res, skips = skips[-k:], skips[:-k]
      # Upsample to the next skip's size: 2x, or diffusers' upsample_size when H or W is not a
      # multiple of 2 ** (number of upsamplers) (the stride-2 convs rounded up).
      size = tuple(skips[-1].shape[1:3]) if skips else None
      h = block(h, res, emb, ctx, size)
    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
    return h.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Weights


_IDENTITY = convert._IDENTITY
_LINEAR_T = convert._LINEAR_T
_OIHW_TO_HWIO = convert._OIHW_TO_HWIO
_CONVS = ("conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "downsampler", "upsampler")
_RENAMES = {
  "downsampler": "downsamplers.0.conv",
  "upsampler": "upsamplers.0.conv",
  "to_out": "to_out.0",
}
_FF = {"proj": "net.0.proj", "out": "net.2"}


def diffusers_key(
  path: tuple, *, linear_projection: bool
) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """(diffusers state-dict key, diffusers array -> NNX array) for an NNX parameter path.

  ``linear_projection``: the config's ``use_linear_projection`` (proj_in/proj_out are linear
  layers, else 1x1 convs)."""
  path = tuple(str(p) for p in path)
  *owner, leaf = path
  names = [_RENAMES.get(a, a) for a in owner]
  if len(owner) >= 2 and owner[-2] == "ff":
    names[-1] = _FF[owner[-1]]
  key = ".".join(names)
  module = owner[-1] if owner else ""
  if leaf == "kernel":
    conv = module in _CONVS or (module in ("proj_in", "proj_out") and not linear_projection)
    return f"{key}.weight", _OIHW_TO_HWIO if conv else _LINEAR_T
  if leaf == "scale":
    return f"{key}.weight", _IDENTITY
  if leaf == "bias":
    return f"{key}.bias", _IDENTITY
  raise KeyError(f"no diffusers name for NNX parameter {'/'.join(path)}")


_WEIGHTS = "diffusion_pytorch_model"


def _unet_dir(path: str) -> str:
  """The folder holding config.json: ``path`` itself, the folder of a weights file, or the
  ``unet/`` folder of a pipeline."""
  if os.path.isfile(path):
    return os.path.dirname(path) or "."
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such file or directory (expected a diffusers unet/ folder)")
  if not os.path.exists(os.path.join(path, "config.json")) and os.path.isfile(
    os.path.join(path, "unet", "config.json")
  ):
    return os.path.join(path, "unet")
  return path


def _weight_files(unet_dir: str, path: str, variant: str | None) -> list[str]:
  if os.path.isfile(path):
    return [path]
  stem = _WEIGHTS if variant is None else f"{_WEIGHTS}.{variant}"
  for ext in ("safetensors", "bin"):
    index = os.path.join(unet_dir, f"{stem}.{ext}.index.json")
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {index}: {convert._first_line(e)}") from None
      return [os.path.join(unet_dir, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(unet_dir, f"{stem}.{ext}")
    if os.path.exists(single):
      return [single]
  raise CheckpointError(f"{unet_dir}: no {stem}.safetensors or {stem}.bin found")


def read_unet_config(unet_dir: str) -> UNetConfig:
  """:class:`UNetConfig` from ``unet_dir/config.json`` (CheckpointError when missing/invalid)."""
  path = os.path.join(unet_dir, "config.json")
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: not found (not a diffusers unet folder)") from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: invalid JSON ({convert._first_line(e)})") from None
  try:
    return UNetConfig.from_diffusers(d)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None


class _ConstantKey:
  """Stands in for ``nnx.Rngs`` where every parameter is overwritten by the checkpoint: one
  constant key for every init. Inside load_state_into's eval_shape each nnx.Rngs draw updates a
  traced counter, and flax 0.12 then probes ``tracer.sharding``, whose error message walks the
  whole trace: quadratic, 3 s of a 3.5 s abstract build of SD 1.5 (0.45 s with this)."""

  def params(self) -> jax.Array:
    return jax.random.key(0)


def load_unet(
  path_or_dir: str | os.PathLike,
  *,
  dtype=None,
  param_dtype=jnp.float32,
  attention_impl: AttentionImpl = None,
  variant: str | None = None,
) -> UNet:
  """A :class:`UNet` from a diffusers ``unet/`` folder (config.json +
  diffusion_pytorch_model[.variant].safetensors, or the legacy .bin, or a sharded index), a
  pipeline folder holding ``unet/``, or a weights file next to its config.json. Strict: every
  parameter filled and every tensor used, else a one-line CheckpointError naming the key."""
  path = os.fspath(path_or_dir)
  unet_dir = _unet_dir(path)
  config = read_unet_config(unet_dir)
  files = _weight_files(unet_dir, path, variant)
  state_dict: dict[str, np.ndarray] = {}
  for f in files:
    state_dict.update(convert.read_state_dict(f))
  source = files[0] if len(files) == 1 else unet_dir

  def make() -> UNet:
    return UNet(
      config,
      dtype=dtype,
      param_dtype=param_dtype,
      attention_impl=attention_impl,
      rngs=_ConstantKey(),
    )

  def key_fn(path: tuple) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    key, fn = diffusers_key(path, linear_projection=config.use_linear_projection)
    # load_state_into compares shapes after the layout map, which cannot transpose a tensor of
    # the wrong rank (e.g. a [O, I] linear proj_in where a 1x1 conv's [O, I, 1, 1] belongs).
    rank = 4 if fn is _OIHW_TO_HWIO else 2 if fn is _LINEAR_T else 1
    if key in state_dict and np.ndim(state_dict[key]) != rank:
      raise CheckpointError(
        f"{source}: shape mismatch for {key!r}: checkpoint has "
        f"{tuple(np.shape(state_dict[key]))}, model expects a {rank}-D tensor"
      )
    return key, fn

  return convert.load_state_into(make, state_dict, source, key_fn=key_fn)


def unet_state_dict(unet: UNet) -> dict[str, np.ndarray]:
  """The inverse of :func:`load_unet`'s mapping: every parameter as a float32 numpy array under
  its diffusers key, in diffusers' layout (OIHW convs, [out, in] linears)."""
  out: dict[str, np.ndarray] = {}
  linear = unet.config.use_linear_projection
  for path, var in nnx.to_flat_state(nnx.state(unet, nnx.Param)):
    key, fn = diffusers_key(path, linear_projection=linear)
    value = np.asarray(jax.device_get(var[...]), np.float32)
    out[key] = convert.to_hf_layout(fn, value).copy(order="C")
  return out


def save_unet(unet: UNet, out_dir: str | os.PathLike) -> str:
  """Writes ``out_dir/config.json`` + ``diffusion_pytorch_model.safetensors`` (float32): a
  diffusers ``unet/`` folder that :func:`load_unet` and ``UNet2DConditionModel.from_pretrained``
  both read. Returns ``out_dir``."""
  from safetensors.numpy import save_file

  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  # diffusers (like transformers) refuses safetensors files without format metadata.
  save_file(
    unet_state_dict(unet),
    os.path.join(out_dir, f"{_WEIGHTS}.safetensors"),
    metadata={"format": "pt"},
  )
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(unet.config.to_diffusers(), f, indent=2)
  return out_dir
