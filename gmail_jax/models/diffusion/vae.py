"""The decoder of diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE) in Flax NNX.

Only what sampling needs: ``post_quant_conv`` and ``decoder`` (the encoder and ``quant_conv`` of
the checkpoint are read and deliberately left unused). Layout: NHWC everywhere, unlike diffusers'
NCHW; ``z [N, h, w, latent_channels] -> images [N, f*h, f*w, out_channels]`` with
``f = 2 ** (len(block_out_channels) - 1)`` (8 for SD), pixel values in about ``[-1, 1]``
(unclipped, as ``AutoencoderKL.decode(z).sample``).

    VAEDecoder(z)            = decoder(post_quant_conv(z))                  diffusers vae.decode(z)
    decode_latents(latents)  = VAEDecoder(latents / scaling_factor)         what SD pipelines call:
                               (+ shift_factor; SDXL-style latents_mean/std when the config has
                               them: latents * std / scaling_factor + mean)
    to_unit_range(images)    = clip(images / 2 + 0.5, 0, 1)                 VaeImageProcessor

    decoder(z) = conv_out(silu(conv_norm_out(up_blocks(mid_block(conv_in(z))))))
    mid_block  = resnet -> attention -> resnet   (attention: mid_block_add_attention)
    up_blocks[i] = (layers_per_block + 1) resnets [-> upsample]; widths: reversed
                   block_out_channels; every block but the last upsamples
    resnet(x)  = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))   shortcut: 1x1 conv when
                                                                           the width changes
    upsample(x) = conv(nearest_2x(x))
    attention(x) = x + to_out(softmax(q k^T / sqrt(C)) v),  q, k, v = to_q/k/v(group_norm(x))
                   one head over the h*w positions (diffusers: attention_head_dim = width)

Every norm is a GroupNorm (``norm_num_groups``, eps 1e-6) and, like the attention softmax, runs in
fp32 whatever the compute ``dtype``; params are ``param_dtype`` (fp32) and the output is fp32. The
attention is materialised: ``N * (h*w)^2`` fp32 logits (64x64 latents, SD 512px: 64 MiB per image).

Parameter paths mirror the diffusers state-dict keys (``decoder/up_blocks/0/resnets/1/conv1/kernel``
<- ``decoder.up_blocks.0.resnets.1.conv1.weight``): conv kernels OIHW -> HWIO, linear weights
transposed, GroupNorm ``weight`` -> ``scale``. Pre-0.14 names of the attention (``query``, ``key``,
``value``, ``proj_attn``) are accepted, as diffusers renames them on load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models import convert
from gmail_jax.models.diffusion import weights
from gmail_jax.models.layers import Dense


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The decoder's part of a diffusers ``AutoencoderKL`` config (defaults: diffusers')."""

  latent_channels: int = 4
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True  # diffusers: run the VAE in fp32 under fp16 pipelines (advice only)

  def __post_init__(self):
    if not self.block_out_channels:
      raise ConfigError("vae config: block_out_channels is empty")
    for width in self.block_out_channels:
      if width % self.norm_num_groups:
        raise ConfigError(
          f"vae config: block_out_channels {list(self.block_out_channels)} not divisible by "
          f"norm_num_groups={self.norm_num_groups}"
        )
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None and len(value) != self.latent_channels:
        raise ConfigError(
          f"vae config: {name} has {len(value)} values, latent_channels={self.latent_channels}"
        )
    if (self.latents_mean is None) != (self.latents_std is None):
      raise ConfigError("vae config: latents_mean and latents_std must both be set or both null")

  @property
  def downscale(self) -> int:
    """Pixels per latent along each side (8 for Stable Diffusion)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: dict) -> VAEConfig:
    """From an ``AutoencoderKL`` ``config.json`` dict; one-line :class:`ConfigError` naming every
    key or value this decoder does not implement. Encoder-only keys are accepted and ignored."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
    if unknown:
      raise ConfigError(f"vae config: unsupported keys {unknown} (AutoencoderKL decoder only)")
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ConfigError(f"vae config: _class_name={name!r} is not supported (AutoencoderKL only)")
    act = config.get("act_fn", "silu")
    if act not in ("silu", "swish"):
      raise ConfigError(f"vae config: act_fn={act!r} is not supported (silu / swish)")
    widths = config.get("block_out_channels", cls.block_out_channels)
    up = config.get("up_block_types", ["UpDecoderBlock2D"] * len(widths))
    if list(up) != ["UpDecoderBlock2D"] * len(widths):
      raise ConfigError(
        f"vae config: up_block_types={list(up)} is not supported (one UpDecoderBlock2D per "
        f"block_out_channels entry, {len(widths)})"
      )
    optional = lambda k: None if config.get(k) is None else tuple(float(v) for v in config[k])
    shift = config.get("shift_factor")
    try:
      return cls(
        latent_channels=int(config.get("latent_channels", cls.latent_channels)),
        out_channels=int(config.get("out_channels", cls.out_channels)),
        block_out_channels=tuple(int(w) for w in widths),
        layers_per_block=int(config.get("layers_per_block", cls.layers_per_block)),
        norm_num_groups=int(config.get("norm_num_groups", cls.norm_num_groups)),
        scaling_factor=float(config.get("scaling_factor", cls.scaling_factor)),
        shift_factor=None if shift is None else float(shift),
        latents_mean=optional("latents_mean"),
        latents_std=optional("latents_std"),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
        force_upcast=bool(config.get("force_upcast", True)),
      )
    except (TypeError, ValueError) as e:
      if isinstance(e, ConfigError):
        raise
      raise ConfigError(f"vae config: bad value ({type(e).__name__}: {e})") from None


# AutoencoderKL.__init__'s arguments. The encoder's (in_channels, down_block_types, use_quant_conv)
# and sample_size (only sizes diffusers' tiling) do not change the decoder.
_DIFFUSERS_KEYS = frozenset(
  {
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
  }
)


class GroupNorm(nnx.Module):
  """torch ``GroupNorm`` over NHWC (or [N, T, C]): channels split into ``groups`` contiguous runs,
  statistics over positions x channels of a group, two-pass variance, in fp32; cast back."""

  def __init__(self, channels: int, groups: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
    self.groups = groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    h = x.astype(jnp.float32).reshape(shape[0], -1, self.groups, shape[-1] // self.groups)
    mean = h.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(h - mean).mean(axis=(1, 3), keepdims=True)
    h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return h.astype(x.dtype)


def _conv(cin: int, cout: int, k: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Conv:
  pad = (k - 1) // 2  # torch's padding=1 for 3x3, 0 for 1x1
  return nnx.Conv(
    cin,
    cout,
    kernel_size=(k, k),
    padding=((pad, pad), (pad, pad)),
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class ResnetBlock2D(nnx.Module):
  """diffusers ``ResnetBlock2D`` without a time embedding (``temb_channels=None``)."""

  def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = GroupNorm(cin, groups, param_dtype=param_dtype)
    self.conv1 = _conv(cin, cout, 3, **kw)
    self.norm2 = GroupNorm(cout, groups, param_dtype=param_dtype)
    self.conv2 = _conv(cout, cout, 3, **kw)
    self.conv_shortcut = _conv(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))  # dropout 0: sampling only
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return shortcut + h  # output_scale_factor is 1 in the VAE


class Attention(nnx.Module):
  """diffusers ``Attention`` as the VAE's mid block builds it: GroupNorm, one head of width C over
  the h*w positions, biased projections, residual connection, softmax in fp32."""

  def __init__(self, channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.group_norm = GroupNorm(channels, groups, param_dtype=param_dtype)
    self.to_q = Dense(channels, channels, **kw)
    self.to_k = Dense(channels, channels, **kw)
    self.to_v = Dense(channels, channels, **kw)
    self.to_out = nnx.List([Dense(channels, channels, **kw)])  # diffusers: to_out.0 (+ dropout)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, hgt, wid, c = x.shape
    h = self.group_norm(x).reshape(n, hgt * wid, c)
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
    q = q * jnp.asarray(c**-0.5, q.dtype)
    logits = jnp.einsum("nqc,nkc->nqk", q, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.to_out[0](jnp.einsum("nqk,nkc->nqc", probs, v))
    return x + out.reshape(n, hgt, wid, c).astype(x.dtype)


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x (each pixel repeated 2x2), then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class UNetMidBlock2D(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c, g = cfg.block_out_channels[-1], cfg.norm_num_groups
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(c, c, g, **kw) for _ in range(2)])
    self.attentions = nnx.List([Attention(c, g, **kw)] if cfg.mid_block_add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class UpDecoderBlock2D(nnx.Module):
  def __init__(
    self, cin: int, cout: int, cfg: VAEConfig, upsample: bool, *, dtype, param_dtype, rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    g = cfg.norm_num_groups
    self.resnets = nnx.List(
      [
        ResnetBlock2D(cin if i == 0 else cout, cout, g, **kw)
        for i in range(cfg.layers_per_block + 1)
      ]
    )
    self.upsamplers = nnx.List([Upsample2D(cout, **kw)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for up in self.upsamplers:
      x = up(x)
    return x


class Decoder(nnx.Module):
  """diffusers ``Decoder`` (``norm_type="group"``): latents NHWC -> images NHWC."""

  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    widths = list(reversed(cfg.block_out_channels))
    self.conv_in = _conv(cfg.latent_channels, widths[0], 3, **kw)
    self.mid_block = UNetMidBlock2D(cfg, **kw)
    self.up_blocks = nnx.List(
      [
        UpDecoderBlock2D(widths[max(i - 1, 0)], w, cfg, i < len(widths) - 1, **kw)
        for i, w in enumerate(widths)
      ]
    )
    self.conv_norm_out = GroupNorm(widths[-1], cfg.norm_num_groups, param_dtype=param_dtype)
    self.conv_out = _conv(widths[-1], cfg.out_channels, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class VAEDecoder(nnx.Module):
  """``post_quant_conv`` + ``decoder`` of an ``AutoencoderKL``; see the module docstring.

  ``dtype``: compute dtype of the convs and projections (None: fp32); ``param_dtype``: params.
  """

  def __init__(
    self, config: VAEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
  ) -> None:
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = config.latent_channels
    self.post_quant_conv = _conv(c, c, 1, **kw) if config.use_post_quant_conv else None
    self.decoder = Decoder(config, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    """Unscaled latents ``[N, h, w, latent_channels]`` -> images ``[N, f*h, f*w, out_channels]``
    (fp32, about [-1, 1], unclipped); equals diffusers ``vae.decode(z_nchw).sample`` in NHWC."""
    c = self.config.latent_channels
    if z.ndim != 4 or z.shape[-1] != c:
      raise ValueError(f"VAE decoder expects latents [N, h, w, {c}] (NHWC), got {tuple(z.shape)}")
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """The sampler's latents -> images: undo the VAE's latent scaling, then decode (as diffusers'
    Stable Diffusion pipelines do before ``vae.decode``); NHWC in and out, fp32, about [-1, 1]."""
    cfg = self.config
    z = latents.astype(jnp.float32)
    if cfg.latents_mean is not None:  # SDXL-style pipelines
      mean = jnp.asarray(cfg.latents_mean, jnp.float32)
      std = jnp.asarray(cfg.latents_std, jnp.float32)
      z = z * std / cfg.scaling_factor + mean
    else:
      z = z / cfg.scaling_factor
    if cfg.shift_factor is not None:  # SD3 / Flux pipelines
      z = z + cfg.shift_factor
    return self(z)


def to_unit_range(images: jax.Array) -> jax.Array:
  """Decoded images about [-1, 1] -> [0, 1], clipped (diffusers ``VaeImageProcessor``)."""
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


# Checkpoint tensors that sampling never reads: accounted for, not loaded.
UNUSED_PREFIXES = ("encoder.", "quant_conv.")
# diffusers < 0.14 attention names -> current ones (modeling_utils._fix_state_dict_keys_on_load).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LINEARS = ("to_q", "to_k", "to_v", "to_out")


def vae_key(path: tuple) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """(diffusers key, diffusers array -> NNX array) for a :class:`VAEDecoder` parameter path."""
  names = [str(p) for p in path]
  leaf = names.pop()
  module = ".".join(names)
  if leaf == "bias":
    return f"{module}.bias", convert._IDENTITY
  if leaf == "scale":  # GroupNorm
    return f"{module}.weight", convert._IDENTITY
  if leaf == "kernel":
    linear = any(n in _LINEARS for n in names)
    return f"{module}.weight", convert._LINEAR_T if linear else convert._OIHW_TO_HWIO
  raise KeyError(f"no diffusers name for NNX parameter {'/'.join(map(str, path))}")


def _renamed_legacy_attention(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Pre-0.14 attention names renamed (only where the new name is absent, as diffusers does)."""
  out = dict(state_dict)
  for key in state_dict:
    if ".attentions." not in key:
      continue
    module, name, leaf = key.rsplit(".", 2)
    if name in _LEGACY_ATTENTION:
      new = f"{module}.{_LEGACY_ATTENTION[name]}.{leaf}"
      if new not in out:
        out[new] = out.pop(key)
  return out


def load_vae_decoder(
  path: str, *, dtype=None, param_dtype=jnp.float32, variant: str | None = None
) -> VAEDecoder:
  """A :class:`VAEDecoder` from a diffusers ``vae/`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors`` or ``.bin``) or a pipeline root holding one.

  Strict: every decoder parameter must be in the file with its shape, and every tensor of the file
  must be a decoder parameter or under :data:`UNUSED_PREFIXES` (the encoder); anything else is a
  one-line :class:`~gmail_jax.models.convert.CheckpointError` naming the key.
  """
  folder = weights.component_dir(path, "vae")
  config = VAEConfig.from_diffusers(weights.read_config(folder))
  state_dict, source = weights.read_weights(folder, weights.DIFFUSERS_STEMS, variant)
  state_dict = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED_PREFIXES)}
  state_dict = _renamed_legacy_attention(state_dict)

  def make() -> VAEDecoder:
    return VAEDecoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))

  return convert.load_state_into(make, state_dict, source, key_fn=vae_key)
