"""CLIP (Radford et al., 2021) in Flax NNX, with the OpenAI / Hugging Face layout.

Vision tower (pixels ``[N, S, S, 3]``, CLIP-normalised NHWC):

    h = [class_embedding; patch_embed(pixels)] + pos_embedding        # [N, 1 + (S/p)^2, D]
    h = ln_pre(h)                                                      # HF ``pre_layrnorm``
    h = h + attn(ln1(h)); h = h + mlp(ln2(h))                          # per block, pre-norm
    z = proj(ln_post(h[:, 0]))                                         # class token, [N, embed_dim]

Text tower (ids ``[N, L]``, L <= context_length):

    h = token_embedding(ids) + pos_embedding[:L]; causal blocks; h = ln_final(h)
    z = proj(h[n, eot_n])   eot_n = argmax(ids == eos_token_id)   (first EOT, HF >= #24773)
                            eot_n = argmax(ids)                   (legacy HF, eos_token_id == 2)
    TextTower.hidden_states(ids) = h [N, L, D] (HF CLIPTextModel's last_hidden_state); a tower
    built with embed_dim=None has no proj and pools z = h[n, eot_n] (HF's pooler_output).

    attn(x) = out_proj(softmax(q k^T / sqrt(d_head) + mask) v),   mlp(x) = fc2(act(fc1(x)))
    quick_gelu(x) = x * sigmoid(1.702 x);  gelu = exact (erf) GELU as HF's "gelu"
    logits_per_image = exp(logit_scale) * norm(z_img) @ norm(z_txt)^T

Precision: ``dtype`` is the compute dtype (e.g. bf16) of every matmul; params stay ``param_dtype``
(fp32). LayerNorm and the attention softmax always run in fp32 and the projected embeddings are
returned in fp32. Measured for random-init B/32, batch 2, on CPU (tests/test_models_clip_parity.py):
bf16 vs fp32 normalised embeddings have min cosine 0.99993 and max abs diff ~2e-3; the test
asserts cosine > 0.999 and max abs diff < 2e-2.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models.layers import Dense
from gmail_jax.models.towers import default_residual_loops


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  ln_eps: float = 1e-5

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(
        f"VisionConfig: image_size {self.image_size} is not a multiple of patch_size "
        f"{self.patch_size}"
      )
    if self.width % self.heads:
      raise ValueError(f"VisionConfig: width {self.width} not divisible by heads {self.heads}")
    _check_act(self.act)

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  eos_token_id: int = 49407

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"TextConfig: width {self.width} not divisible by heads {self.heads}")
    _check_act(self.act)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  embed_dim: int = 512
  logit_scale_init: float = math.log(1 / 0.07)


_ACTS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # HF gelu_pytorch_tanh (SigLIP)
}


def _check_act(act: str) -> None:
  if act not in _ACTS:
    raise ValueError(f"unknown activation {act!r}; expected one of {sorted(_ACTS)}")


def _vit(image, patch, width, layers, heads):
  return VisionConfig(image, patch, width, layers, heads, 4 * width)


VARIANTS: dict[str, CLIPConfig] = {
  # OpenAI widths/depths/heads (HF openai/clip-vit-*).
  "B/32": CLIPConfig(_vit(224, 32, 768, 12, 12), TextConfig(), 512),
  "B/16": CLIPConfig(_vit(224, 16, 768, 12, 12), TextConfig(), 512),
  "L/14": CLIPConfig(
    _vit(224, 14, 1024, 24, 16), TextConfig(width=768, heads=12, mlp_dim=3072), 768
  ),
  "L/14-336": CLIPConfig(
    _vit(336, 14, 1024, 24, 16), TextConfig(width=768, heads=12, mlp_dim=3072), 768
  ),
  # Test variants: real vocabulary and context length (so the real tokenizer works), tiny widths.
  "tiny": CLIPConfig(
    VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256),
    TextConfig(width=64, layers=2, heads=4, mlp_dim=256),
    embed_dim=64,
  ),
  "mu": CLIPConfig(
    VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
    TextConfig(width=32, layers=1, heads=2, mlp_dim=64),
    embed_dim=32,
  ),
}


def clip_config(variant: str, **overrides) -> CLIPConfig:
  """A named config; ``overrides`` replace top-level fields, ``vision_*`` / ``text_*`` tower fields.

  ``clip_config('B/32', vision_layers=2, text_layers=1, embed_dim=256)``
  """
  if variant not in VARIANTS:
    raise ConfigError(f"unknown CLIP variant {variant!r}; known: {sorted(VARIANTS)}")
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
  except TypeError as e:
    raise ConfigError(f"clip_config({variant!r}): bad override: {e}") from None


class LayerNorm(nnx.Module):
  """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, computed in fp32 and cast
  back to the input dtype (params ``scale``/``bias`` as in ``nnx.LayerNorm``; eps 1e-5 like HF)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, rngs=None):
    del rngs  # deterministic init; kept for a uniform constructor signature
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.eps)
    h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return h.astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention; softmax in fp32."""

  def __init__(self, width: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.heads = heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Dense(width, width, **kw)
    self.k_proj = Dense(width, width, **kw)
    self.v_proj = Dense(width, width, **kw)
    self.out_proj = Dense(width, width, **kw)

  def __call__(self, x: jax.Array, causal: bool, queries: int | None = None) -> jax.Array:
    """Attention of every token, or only of the first ``queries`` tokens (over all keys)."""
    n, t, d = x.shape
    tq = t if queries is None else queries
    split = lambda y: y.reshape(n, -1, self.heads, d // self.heads)
    q = split(self.q_proj(x[:, :tq]))
    k, v = split(self.k_proj(x)), split(self.v_proj(x))
    q = q * jnp.asarray((d // self.heads) ** -0.5, q.dtype)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32)
    if causal:
      mask = jnp.tril(jnp.ones((t, t), bool))[:tq]
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, tq, d)
    return self.out_proj(out)


class MLP(nnx.Module):
  def __init__(self, width: int, mlp_dim: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.act = act
    self.fc1 = Dense(width, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = Dense(mlp_dim, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(_ACTS[self.act](self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm residual block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, cfg: VisionConfig | TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.ln1 = LayerNorm(cfg.width, cfg.ln_eps, **kw)
    self.attn = Attention(cfg.width, cfg.heads, dtype=dtype, **kw)
    self.ln2 = LayerNorm(cfg.width, cfg.ln_eps, **kw)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.act, dtype=dtype, **kw)

  def __call__(
    self,
    x: jax.Array,
    causal: bool = False,
    queries: int | None = None,
    residual_loops: bool = False,
  ) -> jax.Array:
    """All tokens, or (``queries=q``) only the first q output tokens, which are all a pooled
    readout of the last block needs: the rest of its attention and MLP rows are never read.
    ``residual_loops``: pass the input through :func:`_residual_boundary` (an XLA:CPU aid)."""
    if residual_loops:
      x = _residual_boundary(x)
    h = self.ln1(x)
    if queries is not None:
      x = x[:, :queries]
    x = x + self.attn(h, causal, queries)
    return x + self.mlp(self.ln2(x))


def _materialize(x: jax.Array) -> jax.Array:
  """Identity that XLA:CPU cannot fuse through: a while loop whose trip count (always 1) it cannot
  prove. Without it XLA:CPU never writes the residual stream to memory: it recomputes the chain
  of residual adds (and, in the backward, of cotangent sums and LayerNorm terms) inside every
  consumer fusion, so each block re-reads the outputs of all blocks below it (ViT-B/32 LoRA step,
  batch 16: 2.85 -> 2.61 s). Other backends fuse well and skip it (a loop costs a sync on GPU):
  models enable it with ``residual_loops`` (towers.default_residual_loops), fixed at build time."""
  # Always 1 (NaN or not), but the compiler cannot tell. One feature per row is read, so a
  # batch-sharded x reduces locally plus one scalar all-reduce.
  probe = x[..., 0]
  trips = jnp.any(probe != probe).astype(jnp.int32) | 1

  def body(carry):
    i, y = carry
    return i + 1, jnp.where(i >= 0, y, -y)  # always y; a loop-variant carry keeps the loop

  return jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), x))[1]


@jax.custom_vjp
def _residual_boundary(x: jax.Array) -> jax.Array:
  """Materialise a block's input in the forward pass and its cotangent in the backward pass."""
  return _materialize(x)


_residual_boundary.defvjp(lambda x: (_materialize(x), None), lambda _, g: (_materialize(g),))


def _run_blocks(
  blocks: nnx.List,
  x: jax.Array,
  causal: bool,
  remat: bool,
  last_queries: int | None = None,
  residual_loops: bool = False,
) -> jax.Array:
  """The residual stream through ``blocks``; the last block keeps only ``last_queries`` tokens."""
  for i, block in enumerate(blocks):
    queries = last_queries if i == len(blocks) - 1 else None
    if remat:
      # jax.checkpoint over (graphdef, state): nnx.remat writes state back into the block, which
      # fails ("Cannot mutate Param from a different trace level") when the block was merged
      # inside jit/grad, as in the train step. RNG counts (LoRA dropout) are carried out.
      gdef, state = nnx.split(block)

      def run(s, y, gdef=gdef, queries=queries):
        b = nnx.merge(gdef, s)
        return b(y, causal, queries, residual_loops), nnx.state(b, nnx.RngState)

      x, rng_state = jax.checkpoint(run)(state, x)
      nnx.update(block, rng_state)
    else:
      x = block(x, causal, queries, residual_loops)
  return x


class VisionTower(nnx.Module):
  """ViT image encoder; ``__call__(pixels [N,S,S,3]) -> [N, embed_dim]`` (fp32, not normalised)."""

  def __init__(
    self,
    cfg: VisionConfig,
    embed_dim: int,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    remat: bool = False,
    residual_loops: bool = False,
    rngs: nnx.Rngs,
  ):
    self.config = cfg
    self.dtype = dtype
    self.remat = remat
    self.residual_loops = residual_loops
    d, p = cfg.width, cfg.patch_size
    self.patch_embed = nnx.Conv(
      3,
      d,
      kernel_size=(p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    std = d**-0.5
    self.class_embedding = nnx.Param(std * jax.random.normal(rngs.params(), (d,), param_dtype))
    self.pos_embedding = nnx.Param(
      std * jax.random.normal(rngs.params(), (cfg.num_positions, d), param_dtype)
    )
    self.ln_pre = LayerNorm(d, cfg.ln_eps, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List(
      [Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.layers)]
    )
    self.ln_post = LayerNorm(d, cfg.ln_eps, param_dtype=param_dtype, rngs=rngs)
    self.proj = Dense(d, embed_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def check_pixels(self, shape: tuple[int, ...]) -> None:
    """Raise a one-line ValueError unless ``shape == [N, S, S, 3]`` with S = config.image_size."""
    s = self.config.image_size
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f"CLIP vision tower expects pixels [N,{s},{s},3] (NHWC), got shape {shape}")
    if shape[1] != shape[2]:
      raise ValueError(
        f"CLIP vision tower expects square images of {s}x{s}, got non-square {shape[1]}x{shape[2]}"
        " (resize/center-crop first, e.g. gmail_jax.data.preprocess.preprocess)"
      )
    if shape[1] != s:
      raise ValueError(
        f"CLIP vision tower was built for {s}x{s} images, got {shape[1]}x{shape[2]}"
        " (resize/center-crop first, e.g. gmail_jax.data.preprocess.preprocess)"
      )

  def _patch_embed(self, pixels: jax.Array) -> jax.Array:
    """The stride-p conv as patchify + one matmul: ``[N,S,S,3] -> [N, (S/p)^2, D]``.

    ``patches[n, i*g+j, (a*p+b)*3+c] = pixels[n, i*p+a, j*p+b, c]`` (g = S/p) against the HWIO
    kernel reshaped to ``[p*p*3, D]``: the same sum as ``patch_embed(pixels)``, but a plain dot
    (XLA:CPU lowers this conv to a slow YNNPACK fusion, ~13 GFLOP/s on B/32).
    """
    n, s, _, c = pixels.shape
    p = self.config.patch_size
    g = s // p
    x = pixels.reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p * c)
    kernel = self.patch_embed.kernel[...]
    return x @ kernel.reshape(p * p * c, kernel.shape[-1]).astype(x.dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    self.check_pixels(tuple(pixels.shape))
    dtype = self.dtype or jnp.float32
    x = self._patch_embed(pixels.astype(dtype))  # [N, (S/p)^2, D]
    n, d = x.shape[0], x.shape[-1]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(x.dtype)
    x = self.ln_pre(x)
    # Only the class token is pooled: the last block computes that row alone (-7% FLOPs on B/32).
    x = _run_blocks(
      self.blocks,
      x,
      causal=False,
      remat=self.remat,
      last_queries=1,
      residual_loops=self.residual_loops,
    )
    return self.proj(self.ln_post(x[:, 0])).astype(jnp.float32)


class TextTower(nnx.Module):
  """Causal text transformer; ``__call__(ids [N,L]) -> [N, embed_dim]`` (fp32, not normalised).

  ``embed_dim=None``: no ``proj`` (HF ``CLIPTextModel``, e.g. Stable Diffusion's text encoder);
  ``__call__`` then returns the pooled ``[N, width]`` features unprojected.
  """

  def __init__(
    self,
    cfg: TextConfig,
    embed_dim: int | None,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    remat: bool = False,
    residual_loops: bool = False,
    rngs: nnx.Rngs,
  ):
    self.config = cfg
    self.dtype = dtype
    self.remat = remat
    self.residual_loops = residual_loops
    d = cfg.width
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
    self.blocks = nnx.List(
      [Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.layers)]
    )
    self.ln_final = LayerNorm(d, cfg.ln_eps, param_dtype=param_dtype, rngs=rngs)
    self.proj = (
      None
      if embed_dim is None
      else Dense(d, embed_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    )

  def hidden_states(self, ids: jax.Array, skip_layers: int = 0) -> jax.Array:
    """``ln_final`` of the residual stream, ``[N, L, width]`` in the compute dtype: HF
    ``CLIPTextModel(ids).last_hidden_state`` (causal mask only, no padding mask).

    ``skip_layers=k`` stops after the first ``layers - k`` blocks and applies ``ln_final`` there:
    diffusers' ``clip_skip=k`` (``hidden_states[-(k + 1)]`` through ``final_layer_norm``).
    """
    if ids.ndim != 2 or not 0 < ids.shape[1] <= self.config.context_length:
      raise ValueError(
        f"CLIP text tower expects token ids [N, L<={self.config.context_length}], "
        f"got shape {tuple(ids.shape)}"
      )
    if not 0 <= skip_layers < len(self.blocks):
      raise ValueError(f"skip_layers must be in [0, {len(self.blocks)}), got {skip_layers}")
    dtype = self.dtype or jnp.float32
    ids = ids.astype(jnp.int32)
    length = ids.shape[1]
    x = self.token_embedding(ids).astype(dtype) + self.pos_embedding[:length].astype(dtype)
    blocks = self.blocks if skip_layers == 0 else self.blocks[: len(self.blocks) - skip_layers]
    x = _run_blocks(blocks, x, causal=True, remat=self.remat, residual_loops=self.residual_loops)
    return self.ln_final(x)

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = self.hidden_states(ids)
    ids = ids.astype(jnp.int32)
    if self.config.eos_token_id == 2:  # legacy HF configs: EOT has the largest id
      eot = jnp.argmax(ids, axis=-1)
    else:
      eot = jnp.argmax(ids == self.config.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    if self.proj is None:
      return pooled.astype(jnp.float32)
    return self.proj(pooled).astype(jnp.float32)


def tower_kwargs(residual_loops: bool | None, **kw) -> dict:
  """Constructor arguments every tower of a dual encoder gets; ``residual_loops=None`` takes
  :func:`~gmail_jax.models.towers.default_residual_loops` (on for CPU), decided here, never while
  tracing."""
  if residual_loops is None:
    residual_loops = default_residual_loops()
  return {**kw, "residual_loops": bool(residual_loops)}


class DualEncoder(nnx.Module):
  """What every tower pair shares (CLIP, SigLIP): ``vision``, ``text``, ``logit_scale`` (log-space)
  and an optional ``logit_bias``; encoders return projected, NOT L2-normalised embeddings."""

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  @property
  def residual_loops(self) -> bool:
    return self.vision.residual_loops

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """[N,S,S,3] normalised NHWC pixels -> [N, embed_dim]."""
    return self.vision(pixels)

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """int [N, context_length] -> [N, embed_dim]."""
    return self.text(ids)

  def __call__(self, pixels: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits_per_image [Ni,Nt], logits_per_text [Nt,Ni]) = exp(logit_scale) * cosines
    [+ logit_bias]."""
    img = l2_normalize(self.encode_image(pixels))
    txt = l2_normalize(self.encode_text(ids))
    logits_per_text = jnp.exp(self.logit_scale[...].astype(jnp.float32)) * (txt @ img.T)
    bias = getattr(self, "logit_bias", None)
    if bias is not None:
      logits_per_text = logits_per_text + bias[...].astype(jnp.float32)
    return logits_per_text.T, logits_per_text


class CLIP(DualEncoder):
  """Both towers plus ``logit_scale`` (log-space, like HF).

  ``residual_loops``: wrap each block's input in :func:`_residual_boundary`, which only XLA:CPU
  needs. A static attribute of each tower, fixed here so that tracing never asks which backend it
  runs on; ``None`` takes :func:`~gmail_jax.models.towers.default_residual_loops` (on for CPU).
  """

  def __init__(
    self,
    config: CLIPConfig,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    remat: bool = False,
    residual_loops: bool | None = None,
    rngs: nnx.Rngs,
  ):
    self.config = config
    kw = tower_kwargs(residual_loops, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    self.vision = VisionTower(config.vision, config.embed_dim, **kw)
    self.text = TextTower(config.text, config.embed_dim, **kw)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, param_dtype))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)
