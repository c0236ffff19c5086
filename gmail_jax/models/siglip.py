"""SigLIP (Zhai et al., 2023) in Flax NNX, with the Hugging Face ``SiglipModel`` layout.

Vision (pixels ``[N, S, S, 3]`` normalised with mean = std = 0.5, NHWC), no class token:

    h = patch_embed(pixels) + bias + pos_embedding          # [N, (S/p)^2, D]
    h = h + attn(ln1(h)); h = h + mlp(ln2(h))               # per block, pre-norm, bidirectional
    h = ln_post(h)
    z = MAP head: a = attn(q = probe, k = v = h); z = a + mlp(ln(a))      # [N, D]

Text (ids ``[N, context]``, padded to the full context like ``padding="max_length"``):

    h = token_embedding(ids) + pos_embedding; bidirectional blocks; h = ln_final(h)
    z = head(h[:, -1])                                       # the LAST position, pad or not

    logits_per_text = exp(logit_scale) * norm(z_txt) @ norm(z_img)^T + logit_bias

MLPs use tanh-approximated GELU (HF ``gelu_pytorch_tanh``), LayerNorm eps 1e-6. The blocks are
clip.py's, so LoRA targets and the XLA:CPU residual loops carry over unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models import clip as clip_lib
from gmail_jax.models.clip import Block, LayerNorm, TextConfig, VisionConfig
from gmail_jax.models.layers import Dense
from gmail_jax.models.towers import default_residual_loops


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  vision: VisionConfig = dataclasses.field(
    default_factory=lambda: VisionConfig(224, 16, 768, 12, 12, 3072, "gelu_tanh", 1e-6)
  )
  text: TextConfig = dataclasses.field(
    default_factory=lambda: TextConfig(32000, 64, 768, 12, 12, 3072, "gelu_tanh", 1e-6, 1)
  )
  embed_dim: int = 768  # the text head's output; equals the vision width
  logit_scale_init: float = float(np.log(10.0))
  logit_bias_init: float = -10.0

  def __post_init__(self):
    if self.embed_dim != self.vision.width:
      raise ValueError(
        f"SiglipConfig: embed_dim {self.embed_dim} must equal the vision width "
        f"{self.vision.width} (SigLIP has no image projection)"
      )


VARIANTS: dict[str, SiglipConfig] = {
  "B/16": SiglipConfig(),
  # Test variant: tiny widths, a small vocabulary (a SentencePiece model trained on captions).
  "tiny": SiglipConfig(
    VisionConfig(32, 8, 64, 2, 4, 256, "gelu_tanh", 1e-6),
    TextConfig(1000, 16, 64, 2, 4, 256, "gelu_tanh", 1e-6, 1),
    embed_dim=64,
  ),
}


def siglip_config(variant: str, **overrides) -> SiglipConfig:
  """A named config; ``overrides`` as in :func:`clip.clip_config` (``vision_*``, ``text_*``)."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown SigLIP variant {variant!r}; known: {sorted(VARIANTS)}")
  cfg = VARIANTS[variant]
  vision = {k[7:]: v for k, v in overrides.items() if k.startswith("vision_")}
  text = {k[5:]: v for k, v in overrides.items() if k.startswith("text_")}
  top = {k: v for k, v in overrides.items() if not k.startswith(("vision_", "text_"))}
  try:
    return dataclasses.replace(
      cfg,
      vision=dataclasses.replace(cfg.vision, **vision),
      text=dataclasses.replace(cfg.text, **text),
      **top,
    )
  except (TypeError, ValueError) as e:
    raise ConfigError(f"siglip_config({variant!r}): bad override: {e}") from None


class MAPHead(nnx.Module):
  """Multihead attention pooling: one learned probe attends over all tokens, then a residual MLP."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.width
    self.heads = cfg.heads
    self.probe = nnx.Param(d**-0.5 * jax.random.normal(rngs.params(), (d,), param_dtype))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj = Dense(d, d, **kw), Dense(d, d, **kw)
    self.v_proj, self.out_proj = Dense(d, d, **kw), Dense(d, d, **kw)
    self.ln = LayerNorm(d, cfg.ln_eps, param_dtype=param_dtype)
    self.mlp = clip_lib.MLP(d, cfg.mlp_dim, cfg.act, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, d = x.shape
    hd = d // self.heads
    q = self.q_proj(self.probe[...].astype(x.dtype)[None]).reshape(self.heads, hd)
    k = self.k_proj(x).reshape(n, t, self.heads, hd)
    v = self.v_proj(x).reshape(n, t, self.heads, hd)
    q = q * jnp.asarray(hd**-0.5, q.dtype)
    logits = jnp.einsum("hd,nkhd->nhk", q, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    a = self.out_proj(jnp.einsum("nhk,nkhd->nhd", probs, v).reshape(n, d))
    return a + self.mlp(self.ln(a))


class VisionTower(nnx.Module):
  """SigLIP ViT: ``__call__(pixels [N,S,S,3]) -> [N, width]`` (fp32, not normalised)."""

  def __init__(
    self,
    cfg: VisionConfig,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    remat: bool = False,
    residual_loops: bool = False,
    rngs: nnx.Rngs,
  ):
    self.config, self.dtype, self.remat, self.residual_loops = cfg, dtype, remat, residual_loops
    d, p = cfg.width, cfg.patch_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = nnx.Conv(3, d, kernel_size=(p, p), strides=(p, p), padding="VALID", **kw)
    grid = cfg.image_size // p
    self.pos_embedding = nnx.Param(
      d**-0.5 * jax.random.normal(rngs.params(), (grid * grid, d), param_dtype)
    )
    self.blocks = nnx.List([Block(cfg, **kw) for _ in range(cfg.layers)])
    self.ln_post = LayerNorm(d, cfg.ln_eps, param_dtype=param_dtype)
    self.head = MAPHead(cfg, **kw)

  check_pixels = clip_lib.VisionTower.check_pixels
  _patch_embed = clip_lib.VisionTower._patch_embed

  def __call__(self, pixels: jax.Array) -> jax.Array:
    self.check_pixels(tuple(pixels.shape))
    dtype = self.dtype or jnp.float32
    x = self._patch_embed(pixels.astype(dtype)) + self.patch_embed.bias[...].astype(dtype)
    x = x + self.pos_embedding[...].astype(dtype)
    x = clip_lib._run_blocks(
      self.blocks, x, causal=False, remat=self.remat, residual_loops=self.residual_loops
    )
    return self.head(self.ln_post(x)).astype(jnp.float32)


class TextTower(nnx.Module):
  """SigLIP text encoder: ``__call__(ids [N, context]) -> [N, embed_dim]`` (fp32)."""

  def __init__(
    self,
    cfg: TextConfig,
    embed_dim: int,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    remat: bool = False,
    residual_loops: bool = False,
    rngs: nnx.Rngs,
  ):
    self.config, self.dtype, self.remat, self.residual_loops = cfg, dtype, remat, residual_loops
    d = cfg.width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = nnx.Embed(
      cfg.vocab_size,
      d,
      embedding_init=nnx.initializers.normal(0.02),
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.pos_embedding = nnx.Param(
      0.01 * jax.random.normal(rngs.params(), (cfg.context_length, d), param_dtype)
    )
    self.blocks = nnx.List([Block(cfg, **kw) for _ in range(cfg.layers)])
    self.ln_final = LayerNorm(d, cfg.ln_eps, param_dtype=param_dtype)
    self.head = Dense(d, embed_dim, **kw)

  def __call__(self, ids: jax.Array) -> jax.Array:
    # The last position is pooled, so the ids must fill the whole context (max_length padding).
    if ids.ndim != 2 or ids.shape[1] != self.config.context_length:
      raise ValueError(
        f"SigLIP text tower expects token ids [N, {self.config.context_length}] (padded to the "
        f"full context), got shape {tuple(ids.shape)}"
      )
    dtype = self.dtype or jnp.float32
    x = self.token_embedding(ids.astype(jnp.int32)).astype(dtype)
    x = x + self.pos_embedding[...].astype(dtype)
    x = clip_lib._run_blocks(
      self.blocks, x, causal=False, remat=self.remat, residual_loops=self.residual_loops
    )
    return self.head(self.ln_final(x)[:, -1]).astype(jnp.float32)


class Siglip(clip_lib.DualEncoder):
  """Both towers, ``logit_scale`` (log-space) and ``logit_bias``; the interface of clip.CLIP
  (logits = exp(logit_scale) * cosines + logit_bias; pixels normalised with mean = std = 0.5)."""

  def __init__(
    self,
    config: SiglipConfig,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    remat: bool = False,
    residual_loops: bool | None = None,
    rngs: nnx.Rngs,
  ):
    self.config = config
    kw = clip_lib.tower_kwargs(
      residual_loops, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
    )
    self.vision = VisionTower(config.vision, **kw)
    self.text = TextTower(config.text, config.embed_dim, **kw)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, param_dtype))
    self.logit_bias = nnx.Param(jnp.asarray(config.logit_bias_init, param_dtype))


# ------------------------------------------------------------------------ Hugging Face import

_ACTS_HF = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_HF_DEFAULTS = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  hidden_act="gelu_pytorch_tanh",
  layer_norm_eps=1e-6,
)


def siglip_config_from_hf(hf_config: dict) -> SiglipConfig:
  """SiglipConfig from a HF ``SiglipConfig`` dict (``config.json``); missing keys: HF defaults."""
  from gmail_jax.models.convert import CheckpointError, _square

  if hf_config.get("model_type", "siglip") != "siglip":
    raise CheckpointError(f"config.json: model_type {hf_config.get('model_type')!r} is not siglip")
  text = {**_HF_DEFAULTS, "vocab_size": 32000, "max_position_embeddings": 64}
  text.update(hf_config.get("text_config") or {})
  vision = {**_HF_DEFAULTS, "image_size": 224, "patch_size": 16, "num_channels": 3}
  vision.update(hf_config.get("vision_config") or {})
  if not vision.get("vision_use_head", True) or int(vision["num_channels"]) != 3:
    raise CheckpointError("config.json: only SigLIP with the MAP head and 3 channels is supported")
  for tower in (text, vision):
    if tower["hidden_act"] not in _ACTS_HF:
      raise CheckpointError(f"config.json: unsupported hidden_act {tower['hidden_act']!r}")
  try:
    return SiglipConfig(
      vision=VisionConfig(
        image_size=_square(vision["image_size"], "vision_config.image_size"),
        patch_size=_square(vision["patch_size"], "vision_config.patch_size"),
        width=int(vision["hidden_size"]),
        layers=int(vision["num_hidden_layers"]),
        heads=int(vision["num_attention_heads"]),
        mlp_dim=int(vision["intermediate_size"]),
        act=_ACTS_HF[vision["hidden_act"]],
        ln_eps=float(vision["layer_norm_eps"]),
      ),
      text=TextConfig(
        vocab_size=int(text["vocab_size"]),
        context_length=int(text["max_position_embeddings"]),
        width=int(text["hidden_size"]),
        layers=int(text["num_hidden_layers"]),
        heads=int(text["num_attention_heads"]),
        mlp_dim=int(text["intermediate_size"]),
        act=_ACTS_HF[text["hidden_act"]],
        ln_eps=float(text["layer_norm_eps"]),
        eos_token_id=int(text.get("eos_token_id") or 1),
      ),
      embed_dim=int(text.get("projection_size") or text["hidden_size"]),
    )
  except (TypeError, KeyError, ValueError) as e:
    raise CheckpointError(f"config.json: bad SigLIP config ({type(e).__name__}: {e})") from None


def _scalar(a: np.ndarray) -> np.ndarray:
  return np.asarray(a).reshape(())


def _flat(a: np.ndarray) -> np.ndarray:
  return np.asarray(a).reshape(-1)


def _t(a: np.ndarray) -> np.ndarray:
  return a.T


def to_hf_layout(fn, value: np.ndarray) -> np.ndarray:
  """Inverse of ``fn`` from :func:`hf_key`: an NNX-layout array in the HF layout."""
  from gmail_jax.models import convert

  if fn is _scalar:
    return value.reshape(1)  # HF's logit_scale / logit_bias are [1]
  if fn is _flat:
    return value.reshape(1, 1, -1)  # the probe is [1, 1, D]
  if fn is _t:
    return value.T
  return convert.to_hf_layout(fn, value)


def hf_key(path: tuple):
  """(HF key, HF array -> NNX array) for a SigLIP NNX parameter path; blocks as in CLIP."""
  from gmail_jax.models import convert

  path = tuple(str(p) for p in path)
  if path in (("logit_scale",), ("logit_bias",)):
    return path[0], _scalar
  if path == ("vision", "patch_embed", "bias"):
    return "vision_model.embeddings.patch_embedding.bias", convert._IDENTITY
  if path[:2] == ("vision", "head"):
    head = "vision_model.head."
    if path[2] == "probe":
      return head + "probe", _flat
    if path[2] == "ln":
      return head + "layernorm." + convert._LN_PARAM[path[3]], convert._IDENTITY
    if path[2] == "mlp":
      return f"{head}mlp.{path[3]}.{'weight' if path[4] == 'kernel' else 'bias'}", (
        _t if path[4] == "kernel" else convert._IDENTITY
      )
    # q/k/v: rows of in_proj (split by split_in_proj); out_proj as is.
    kind = "weight" if path[3] == "kernel" else "bias"
    return f"{head}attention.{path[2]}.{kind}", _t if kind == "weight" else convert._IDENTITY
  if path[:2] == ("text", "head"):
    if path[2] == "kernel":
      return "text_model.head.weight", _t
    return "text_model.head.bias", convert._IDENTITY
  return convert.hf_key(path)


def split_in_proj(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The MAP head's ``in_proj_{weight,bias}`` (q, k, v stacked) as ``{q,k,v}_proj`` entries."""
  sd = dict(sd)
  for kind in ("weight", "bias"):
    key = f"vision_model.head.attention.in_proj_{kind}"
    if key in sd:
      for proj, chunk in zip("qkv", np.split(sd.pop(key), 3, axis=0), strict=True):
        sd[f"vision_model.head.attention.{proj}_proj.{kind}"] = chunk
  return sd


def join_in_proj(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of :func:`split_in_proj`: ``{q,k,v}_proj`` entries stacked into ``in_proj``."""
  sd = dict(sd)
  for kind in ("weight", "bias"):
    keys = [f"vision_model.head.attention.{p}_proj.{kind}" for p in "qkv"]
    if all(k in sd for k in keys):
      parts = [sd.pop(k) for k in keys]
      sd[f"vision_model.head.attention.in_proj_{kind}"] = np.concatenate(parts, axis=0)
  return sd


def hf_config(config: SiglipConfig) -> dict:
  """``config.json`` (transformers SiglipConfig); :func:`siglip_config_from_hf` maps it back to
  ``config`` (but for the init-only logit_scale_init / logit_bias_init)."""
  acts = {v: k for k, v in _ACTS_HF.items()}
  v, t = config.vision, config.text

  def tower(c) -> dict:
    return {
      "hidden_size": c.width,
      "intermediate_size": c.mlp_dim,
      "num_hidden_layers": c.layers,
      "num_attention_heads": c.heads,
      "hidden_act": acts[c.act],
      "layer_norm_eps": c.ln_eps,
      "attention_dropout": 0.0,
    }

  return {
    "architectures": ["SiglipModel"],
    "model_type": "siglip",
    "dtype": "float32",
    "initializer_factor": 1.0,
    "text_config": {
      "model_type": "siglip_text_model",
      **tower(t),
      "vocab_size": t.vocab_size,
      "max_position_embeddings": t.context_length,
      "projection_size": config.embed_dim,
      "pad_token_id": 1,  # SentencePiece </s>, as the tokenizer pads (unused by the model)
      "eos_token_id": t.eos_token_id,
    },
    "vision_config": {
      "model_type": "siglip_vision_model",
      **tower(v),
      "image_size": v.image_size,
      "patch_size": v.patch_size,
      "num_channels": 3,
      "vision_use_head": True,
    },
  }


def load_pretrained(
  src: str, *, dtype=None, remat: bool = False, residual_loops: bool | None = None
) -> Siglip:
  """A :class:`Siglip` from a HF ``SiglipModel`` directory or hub id (strict, like convert.py)."""
  import os

  from gmail_jax.models import convert

  ckpt_dir = convert.resolve_source(os.fspath(src))
  config = siglip_config_from_hf(convert.read_hf_config(ckpt_dir))
  files = convert._weight_files(ckpt_dir)
  state_dict: dict[str, np.ndarray] = {}
  for path in files:
    state_dict.update(convert.read_state_dict(path))
  source = files[0] if len(files) == 1 else ckpt_dir
  if residual_loops is None:
    residual_loops = default_residual_loops()

  def make() -> Siglip:
    return Siglip(config, dtype=dtype, remat=remat, residual_loops=residual_loops, rngs=nnx.Rngs(0))

  return convert.load_state_into(make, split_in_proj(state_dict), source, key_fn=hf_key)
