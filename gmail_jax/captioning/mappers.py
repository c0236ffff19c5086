"""Mapping networks: one CLIP embedding [B, C] -> a prefix of language-model embeddings [B, P, D].

ClipCap (Mokady et al. 2021, rmokady/CLIP_prefix_caption ``train.py``):

  mlp          C -> P·D/2 -> tanh -> P·D; prefix 10, used with a fine-tuned GPT-2
  transformer  C -> L·D (L "clip tokens"), concatenated with P learned constants, 8 pre-norm
               layers (8 heads, ReLU MLP ×2), the P constant positions are the prefix; prefix 40,
               used with a frozen GPT-2. Its self-attention is ClipCap's ``MultiHeadAttention``
               as ``TransformerLayer`` builds it (``bias=False``): ``to_queries`` and
               ``to_keys_values`` without bias, the output ``project`` with nn.Linear's default
               bias. (Read from ClipCap's train.py as we know it; not re-checked against the
               source here, which this environment cannot fetch.)

DeCap (Li et al. 2023) projects the embedding with one linear layer to a prefix of 1 (``linear``).
A mapper is chosen by name (``MAPPERS``); GMAIL's dual projection is two mappers of one kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLPMapper(nnx.Module):
  def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, *, rngs: nnx.Rngs):
    hidden = lm_dim * prefix_length // 2
    self.prefix_length, self.lm_dim = prefix_length, lm_dim
    self.fc1 = nnx.Linear(clip_dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, lm_dim * prefix_length, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc2(jnp.tanh(self.fc1(x)))
    return h.reshape(x.shape[0], self.prefix_length, self.lm_dim)


class LinearMapper(nnx.Module):
  def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, *, rngs: nnx.Rngs):
    self.prefix_length, self.lm_dim = prefix_length, lm_dim
    self.proj = nnx.Linear(clip_dim, lm_dim * prefix_length, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x).reshape(x.shape[0], self.prefix_length, self.lm_dim)


class _MapperAttention(nnx.Module):
  """ClipCap's ``MultiHeadAttention`` used as self-attention: q = to_queries(x), [k; v] =
  to_keys_values(x) (both without bias), softmax(q k^T / sqrt(d_head)) v, then ``project``."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"transformer mapper: width {dim} not divisible by {heads} heads")
    self.heads = heads
    self.to_queries = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.to_keys_values = nnx.Linear(dim, 2 * dim, use_bias=False, rngs=rngs)
    self.project = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    h, hd = self.heads, d // self.heads
    q = self.to_queries(x).reshape(b, n, h, hd)
    kv = self.to_keys_values(x).reshape(b, n, 2, h, hd)  # ClipCap's [k; v] layout
    k, v = kv[:, :, 0], kv[:, :, 1]
    att = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) * hd**-0.5, axis=-1)
    return self.project(jnp.einsum("bhnm,bmhd->bnhd", att, v).reshape(b, n, d))


class _MapperLayer(nnx.Module):
  """Pre-norm self-attention + ReLU MLP (ratio 2), as ClipCap's ``TransformerLayer``."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = _MapperAttention(dim, heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(jax.nn.relu(self.fc1(self.norm2(x))))


class TransformerMapper(nnx.Module):
  def __init__(
    self,
    clip_dim: int,
    lm_dim: int,
    prefix_length: int,
    *,
    clip_length: int | None = None,
    num_layers: int = 8,
    heads: int = 8,
    rngs: nnx.Rngs,
  ):
    self.prefix_length, self.lm_dim = prefix_length, lm_dim
    self.clip_length = clip_length or prefix_length
    self.linear = nnx.Linear(clip_dim, self.clip_length * lm_dim, rngs=rngs)
    self.prefix_const = nnx.Param(jax.random.normal(rngs.params(), (prefix_length, lm_dim)))
    self.layers = nnx.List([_MapperLayer(lm_dim, heads, rngs=rngs) for _ in range(num_layers)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b = x.shape[0]
    h = self.linear(x).reshape(b, self.clip_length, self.lm_dim)
    const = jnp.broadcast_to(self.prefix_const[...], (b, self.prefix_length, self.lm_dim))
    h = jnp.concatenate([h, const.astype(h.dtype)], axis=1)
    for layer in self.layers:
      h = layer(h)
    return h[:, self.clip_length :]


MAPPERS = {"mlp": MLPMapper, "transformer": TransformerMapper, "linear": LinearMapper}


def make_mapper(
  name: str, clip_dim: int, lm_dim: int, prefix_length: int, *, rngs: nnx.Rngs, **kw
) -> nnx.Module:
  if name not in MAPPERS:
    raise ValueError(f"mapper {name!r}: choose from {sorted(MAPPERS)}")
  return MAPPERS[name](clip_dim, lm_dim, prefix_length, rngs=rngs, **kw)
