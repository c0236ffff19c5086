"""GPT-2 (Radford et al., 2019) in Flax NNX for captioning: ClipCap (pretrained GPT-2) and DeCap
(a small GPT-2 trained from scratch over the CLIP BPE vocabulary).

    h = embeds + wpe[pos]                                   # embeds = wte[ids] or a given prefix
    h = h + attn(ln_1(h)); h = h + mlp(ln_2(h))             # per block, pre-norm, causal
    logits = ln_f(h) @ wte^T                                # lm_head tied to wte

    attn(x) = c_proj(softmax(q k^T / sqrt(d_head) + mask) v),  [q;k;v] = c_attn(x)
    mlp(x) = c_proj(gelu_new(c_fc(x)))                      # gelu_new = tanh-approximate GELU

Padding: ``attention_mask`` [B, T] (1 = real, 0 = pad) hides pad keys from every query, and the
default positions count real tokens only (``cumsum(mask) - 1``, as HF ``generate`` does), so left
and right padding (and pad gaps, e.g. a padded prefix followed by generated tokens) all give the
unpadded result at the real positions. Rows of pad queries are garbage and must be ignored.

KV cache (:meth:`GPT2.init_cache`): fixed-shape ``k``/``v`` [n_layer, B, S, H, d_head], ``mask``
[B, S] (which slots hold real tokens) and ``index`` (slots filled). A cached call writes its T
tokens at slots ``[index, index + T)`` and attends over all S slots (causal in slot order, pad
slots masked), so one jitted step serves every position.

Training (ClipCap): ``embeds = concat([prefix, model.embed(ids)], 1)``; ``logits, _ =
model(inputs_embeds=embeds, attention_mask=mask)``; the token at ``ids[:, t]`` is predicted by
``logits[:, P - 1 + t]``, so :func:`lm_loss` takes ``logits[:, P - 1:-1]`` against ``ids``.

Dropout (training only): ``model(..., dropout_rng=key)`` drops at HF's three sites with the
config's rates (``embd_pdrop`` after adding the positions, ``attn_pdrop`` on the attention
probabilities, ``resid_pdrop`` on each attention / MLP output before the residual add), scaling
kept units by 1 / (1 - rate), as ``GPT2LMHeadModel`` in train mode (ClipCap fine-tunes GPT-2 in
train mode). Without a key (evaluation, every decoding function) nothing is dropped.

Precision: ``dtype`` is the compute dtype of the matmuls and the cache; params stay
``param_dtype``. LayerNorm and the attention softmax run in fp32; logits are returned in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmail_jax.models.clip import LayerNorm
from gmail_jax.models.convert import CheckpointError
from gmail_jax.models.layers import Dense

Cache = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  # HF GPT2Config's defaults; used only by a call given a ``dropout_rng`` (training).
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT2Config: n_embd {self.n_embd} not divisible by n_head {self.n_head}")

  @classmethod
  def from_hf(cls, hf_config: Any) -> GPT2Config:
    """From a ``transformers.GPT2Config`` (or its ``to_dict()``); rejects variants we do not
    implement (untied heads, other activations, a non-default MLP width, attention rescaling)."""
    get = (hf_config if isinstance(hf_config, dict) else hf_config.to_dict()).get
    n_embd = int(get("n_embd", 768))
    checks = {
      "activation_function": (get("activation_function", "gelu_new"), ("gelu_new",)),
      "n_inner": (get("n_inner"), (None, 4 * n_embd)),
      "tie_word_embeddings": (get("tie_word_embeddings", True), (True,)),
      "scale_attn_weights": (get("scale_attn_weights", True), (True,)),
      "scale_attn_by_inverse_layer_idx": (get("scale_attn_by_inverse_layer_idx", False), (False,)),
      "add_cross_attention": (get("add_cross_attention", False), (False,)),
    }
    for key, (value, ok) in checks.items():
      if value not in ok:
        raise CheckpointError(f"GPT-2 config: unsupported {key}={value!r} (supported: {ok})")

    def token(key):  # HF allows None or a list (eos)
      value = get(key)
      value = value[0] if isinstance(value, (list, tuple)) else value
      return 50256 if value is None else int(value)

    return cls(
      vocab_size=int(get("vocab_size", 50257)),
      n_positions=int(get("n_positions", 1024)),
      n_embd=n_embd,
      n_layer=int(get("n_layer", 12)),
      n_head=int(get("n_head", 12)),
      layer_norm_epsilon=float(get("layer_norm_epsilon", 1e-5)),
      bos_token_id=token("bos_token_id"),
      eos_token_id=token("eos_token_id"),
      embd_pdrop=float(get("embd_pdrop", 0.1)),
      attn_pdrop=float(get("attn_pdrop", 0.1)),
      resid_pdrop=float(get("resid_pdrop", 0.1)),
    )


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout (``torch.nn.Dropout`` in train mode): zero each unit with probability
  ``rate``, scale the kept ones by 1 / (1 - rate); ``x`` itself when ``key`` is None or rate 0."""
  if key is None or rate <= 0:
    return x
  if rate >= 1:
    return jnp.zeros_like(x)
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _site_keys(key: jax.Array | None, n: int) -> list:
  """``n`` independent keys (or Nones) for the dropout sites of one forward pass."""
  return [None] * n if key is None else list(jax.random.split(key, n))


def _dense(n_in, n_out, std, *, dtype, param_dtype, rngs) -> Dense:
  """A :class:`Dense` with GPT-2's N(0, std) kernel init (HF ``_init_weights``), zero bias."""
  layer = Dense(n_in, n_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  layer.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (n_in, n_out), param_dtype))
  return layer


class Attention(nnx.Module):
  def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.n_embd
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = cfg.n_head
    self.c_attn = _dense(d, 3 * d, 0.02, **kw)
    # GPT-2 scales residual-output projections by 1/sqrt(2 n_layer) at init.
    self.c_proj = _dense(d, d, 0.02 / math.sqrt(2 * cfg.n_layer), **kw)

  def __call__(
    self,
    x: jax.Array,
    allowed: jax.Array,
    cache: Cache | None,
    layer: int,
    drop: tuple[float, jax.Array | None] = (0.0, None),
  ) -> tuple[jax.Array, Cache | None]:
    """``allowed`` [B, T, K]: which keys each query sees (K = T, or the S cache slots);
    ``drop``: (rate, key) of the dropout on the attention probabilities (training)."""
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = (split(y) for y in jnp.split(self.c_attn(x), 3, axis=-1))
    if cache is not None:
      at = (layer, 0, cache["index"], 0, 0)
      ck = jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), at)
      cv = jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), at)
      cache = dict(cache, k=ck, v=cv)
      k, v = ck[layer].astype(q.dtype), cv[layer].astype(q.dtype)
    q = q * jnp.asarray((d // self.heads) ** -0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    # finfo.min, not -inf: a query with no visible key (a left pad) gets a finite uniform row.
    logits = jnp.where(allowed[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1), *drop).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return self.c_proj(out), cache


class MLP(nnx.Module):
  def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.n_embd
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.c_fc = _dense(d, 4 * d, 0.02, **kw)
    self.c_proj = _dense(4 * d, d, 0.02 / math.sqrt(2 * cfg.n_layer), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
  def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, **kw)
    self.attn = Attention(cfg, dtype=dtype, **kw)
    self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, **kw)
    self.mlp = MLP(cfg, dtype=dtype, **kw)

  def __call__(self, x, allowed, cache, layer, key=None, attn_rate=0.0, resid_rate=0.0):
    k_attn, k_res1, k_res2 = _site_keys(key, 3)
    h, cache = self.attn(self.ln_1(x), allowed, cache, layer, (attn_rate, k_attn))
    x = x + dropout(h, resid_rate, k_res1)
    return x + dropout(self.mlp(self.ln_2(x)), resid_rate, k_res2), cache


class GPT2(nnx.Module):
  """GPT-2 LM; ``__call__(ids | inputs_embeds, ...) -> (logits [B, T, V] fp32, cache)``."""

  def __init__(
    self,
    config: GPT2Config,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    self.config = config
    self.dtype = dtype
    d = config.n_embd
    normal = lambda shape: nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, param_dtype))
    self.wte = normal((config.vocab_size, d))  # N(0, 0.02) like HF's _init_weights
    self.wpe = normal((config.n_positions, d))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.h = nnx.List([Block(config, **kw) for _ in range(config.n_layer)])
    self.ln_f = LayerNorm(d, config.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)

  def embed(self, ids: jax.Array) -> jax.Array:
    """Token embeddings ``wte[ids]`` [B, T, D] in the compute dtype."""
    return self.wte[...][ids].astype(self.dtype)

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """An empty KV cache for ``batch`` rows and ``max_len`` tokens in all (prefix included)."""
    cfg = self.config
    if max_len > cfg.n_positions:
      raise ValueError(f"GPT-2 cache of {max_len} tokens exceeds n_positions={cfg.n_positions}")
    shape = (cfg.n_layer, batch, max_len, cfg.n_head, cfg.n_embd // cfg.n_head)
    return {
      "k": jnp.zeros(shape, self.dtype),
      "v": jnp.zeros(shape, self.dtype),
      "mask": jnp.zeros((batch, max_len), bool),
      "index": jnp.zeros((), jnp.int32),
    }

  def __call__(
    self,
    ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    cache: Cache | None = None,
    positions: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """Logits [B, T, V] (fp32) and the updated cache (None when none was given).

    ``attention_mask`` [B, T] covers the T tokens of this call (with a cache, earlier tokens'
    mask lives in the cache); ``positions`` [B, T] or [T] overrides the mask-derived positions.
    ``dropout_rng``: train mode (dropout at the config's rates, see the module doc); None = eval.
    """
    if (ids is None) == (inputs_embeds is None):
      raise ValueError("GPT2: pass exactly one of ids / inputs_embeds")
    x = self.embed(ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    b, t, _ = x.shape
    if cache is None and t > self.config.n_positions:
      raise ValueError(f"GPT-2: {t} tokens exceed n_positions={self.config.n_positions}")
    new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    past = 0 if cache is None else cache["mask"].sum(-1, keepdims=True)
    if positions is None:
      # Real tokens are numbered 0, 1, ... whatever padding precedes them (HF generate's rule).
      positions = jnp.maximum(past + jnp.cumsum(new, axis=-1) - 1, 0)
    x = x + self.wpe[...][positions].astype(x.dtype)
    cfg = self.config
    keys = _site_keys(dropout_rng, 1 + len(self.h))
    x = dropout(x, cfg.embd_pdrop, keys[0])
    if cache is None:
      allowed = jnp.tril(jnp.ones((t, t), bool))[None] & new[:, None, :]
    else:
      index = cache["index"]
      mask = jax.lax.dynamic_update_slice(cache["mask"], new, (0, index))
      slots = jnp.arange(mask.shape[1])
      causal = slots[None, :] <= index + jnp.arange(t)[:, None]  # [T, S]
      allowed = causal[None] & mask[:, None, :]
      cache = dict(cache, mask=mask)
    for i, block in enumerate(self.h):
      x, cache = block(x, allowed, cache, i, keys[1 + i], cfg.attn_pdrop, cfg.resid_pdrop)
    if cache is not None:
      cache = dict(cache, index=cache["index"] + t)
    h = self.ln_f(x)
    logits = h @ self.wte[...].astype(h.dtype).T
    return logits.astype(jnp.float32), cache


# ---------------------------------------------------------------------------------------------
# Hugging Face import.
# ---------------------------------------------------------------------------------------------

# Causal-mask buffers that old transformers versions saved with the weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch tensor; .float() because numpy has no bfloat16
    value = value.detach().cpu()
    value = value.float() if value.is_floating_point() else value
    return value.numpy()
  return np.asarray(value)


def from_torch_state_dict(state_dict: dict, config: GPT2Config, *, dtype=jnp.float32) -> GPT2:
  """A :class:`GPT2` from a HF ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict.

  HF ``Conv1D`` weights are already [in, out], so kernels are copied as is. Strict: every
  parameter must be present and every tensor used (old causal-mask buffers excepted); an
  ``lm_head.weight`` must equal ``wte`` (the head is tied).
  """
  sd = {k.removeprefix("transformer."): _to_numpy(v) for k, v in state_dict.items()}
  head = sd.pop("lm_head.weight", None)
  if head is not None and not np.array_equal(head, sd.get("wte.weight")):
    raise CheckpointError("GPT-2 state dict: lm_head.weight differs from wte (untied head)")
  for k in [k for k in sd if k.endswith(_IGNORED_SUFFIXES)]:
    del sd[k]
  model = nnx.eval_shape(lambda: GPT2(config, rngs=nnx.Rngs(0), dtype=dtype))
  state = nnx.state(model, nnx.Param)
  flat = {}
  for path, var in nnx.to_flat_state(state):
    names = [str(p) for p in path]
    # NNX path -> HF key: h/3/attn/c_attn/kernel -> h.3.attn.c_attn.weight; ln scale -> weight.
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(names[-1])
    key = ".".join(names[:-1] + [leaf]) if leaf else ".".join(names) + ".weight"
    if key not in sd:
      raise CheckpointError(f"GPT-2 state dict: missing {key!r} (for {'/'.join(names)})")
    value = sd.pop(key)
    if value.shape != var.shape:
      raise CheckpointError(
        f"GPT-2 state dict: {key!r} has shape {value.shape}, model expects {var.shape}"
      )
    flat[path] = var.replace(jnp.asarray(value, var.dtype))
  if sd:
    raise CheckpointError(f"GPT-2 state dict: unused tensors {sorted(sd)[:5]}")
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def from_pretrained(path_or_id: str, *, dtype=jnp.float32) -> GPT2:
  """A transformers GPT-2 checkpoint (directory or hub id), loaded with torch and converted."""
  import transformers  # torch-backed; imported lazily so the rest of the module needs neither

  hf = transformers.GPT2LMHeadModel.from_pretrained(path_or_id)
  return from_torch_state_dict(hf.state_dict(), GPT2Config.from_hf(hf.config), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Decoding and loss.
# ---------------------------------------------------------------------------------------------


def lm_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean token cross-entropy over ``mask`` (no shift: ``logits[:, t]`` predicts
  ``targets[:, t]``); with smoothing the target is ``(1 - s) one_hot + s / V``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
  mask = mask.astype(jnp.float32)
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _prefill(model: GPT2, prefix: jax.Array, prefix_mask: jax.Array, extra: int):
  """Run the prefix into a fresh cache; log-probs of the next token at each row's last real
  prefix position (the last slot for left padding, earlier for right padding)."""
  b, p, _ = prefix.shape
  cache = model.init_cache(b, p + extra)
  logits, cache = model(inputs_embeds=prefix, attention_mask=prefix_mask, cache=cache)
  last = jnp.max(jnp.where(prefix_mask, jnp.arange(p), 0), axis=-1)
  return jax.nn.log_softmax(logits[jnp.arange(b), last], axis=-1), cache


# eos_id (and length_normalize below) are traced, not static: one compile per shape serves all.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _greedy(graphdef, state, prefix, prefix_mask, eos_id, *, max_len: int):
  model = nnx.merge(graphdef, state)
  b = prefix.shape[0]
  logp, cache = _prefill(model, prefix, prefix_mask, max_len)

  def body(carry):
    i, logp, cache, done, out = carry
    tok = jnp.where(done, eos_id, jnp.argmax(logp, axis=-1).astype(jnp.int32))
    out = out.at[:, i].set(tok)
    done = done | (tok == eos_id)
    logits, cache = model(tok[:, None], cache=cache)
    return i + 1, jax.nn.log_softmax(logits[:, -1], axis=-1), cache, done, out

  carry = (
    jnp.int32(0),
    logp,
    cache,
    jnp.zeros((b,), bool),
    jnp.full((b, max_len), eos_id, jnp.int32),
  )
  cond = lambda c: (c[0] < max_len) & ~jnp.all(c[3])
  return jax.lax.while_loop(cond, body, carry)[-1]


def _check_prefix(model: GPT2, prefix_embeds, prefix_mask, max_len: int):
  prefix_embeds = jnp.asarray(prefix_embeds)
  if prefix_embeds.ndim != 3 or prefix_embeds.shape[-1] != model.config.n_embd:
    raise ValueError(
      f"prefix_embeds must be [B, P, {model.config.n_embd}], got {prefix_embeds.shape}"
    )
  b, p, _ = prefix_embeds.shape
  if prefix_mask is None:
    prefix_mask = jnp.ones((b, p), bool)
  if p + max_len > model.config.n_positions:
    raise ValueError(
      f"prefix {p} + max_len {max_len} exceeds n_positions={model.config.n_positions}"
    )
  return prefix_embeds, jnp.asarray(prefix_mask, bool)


def greedy_decode(
  model: GPT2,
  prefix_embeds: jax.Array,
  *,
  max_len: int,
  eos_id: int,
  prefix_mask: jax.Array | None = None,
) -> np.ndarray:
  """Greedy tokens int32 [B, max_len] after the prefix [B, P, D]; the first EOS is kept and
  everything after it is ``eos_id``. ``prefix_mask`` [B, P]: 1 = real (any padding pattern)."""
  prefix_embeds, prefix_mask = _check_prefix(model, prefix_embeds, prefix_mask, max_len)
  graphdef, state = nnx.split(model)
  out = _greedy(graphdef, state, prefix_embeds, prefix_mask, jnp.int32(eos_id), max_len=max_len)
  return np.asarray(out)


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_size", "max_len"))
def _beam(graphdef, state, prefix, prefix_mask, eos_id, length_normalize, *, beam_size, max_len):
  model = nnx.merge(graphdef, state)
  b, k = prefix.shape[0], beam_size
  logp, cache = _prefill(model, prefix, prefix_mask, max_len)
  vocab = logp.shape[-1]
  scores, tok = jax.lax.top_k(logp, k)  # [B, K] first tokens of the K beams
  tok = tok.astype(jnp.int32)
  # Beams are rows b * K + j of the cache; k/v carry the batch on axis 1.
  cache = {
    "k": jnp.repeat(cache["k"], k, axis=1),
    "v": jnp.repeat(cache["v"], k, axis=1),
    "mask": jnp.repeat(cache["mask"], k, axis=0),
    "index": cache["index"],
  }
  out = jnp.full((b, k, max_len), eos_id, jnp.int32).at[:, :, 0].set(tok)
  done = tok == eos_id
  lengths = jnp.ones((b, k), jnp.int32)
  # A finished beam's only continuation is eos_id at log-prob 0: it keeps its score and length.
  frozen = jnp.full((vocab,), -jnp.inf).at[eos_id].set(0.0)

  def gather(x, src, axis):  # x[..., b*K + j, ...] <- x[..., b*K + src[b, j], ...]
    shape = x.shape
    x = x.reshape(shape[:axis] + (b, k) + shape[axis + 1 :])
    idx = src.reshape((1,) * axis + (b, k) + (1,) * (x.ndim - axis - 2))
    return jnp.take_along_axis(x, idx, axis=axis + 1).reshape(shape)

  def body(carry):
    i, tok, scores, lengths, done, out, cache = carry
    logits, cache = model(tok.reshape(b * k, 1), cache=cache)
    logp = jax.nn.log_softmax(logits[:, -1], axis=-1).reshape(b, k, vocab)
    logp = jnp.where(done[..., None], frozen, logp)
    scores, flat = jax.lax.top_k((scores[..., None] + logp).reshape(b, k * vocab), k)
    src, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, src, axis=1)
    lengths = take(lengths) + ~take(done)
    done = take(done) | (tok == eos_id)
    out = jnp.take_along_axis(out, src[..., None], axis=1).at[:, :, i].set(tok)
    cache = dict(
      cache,
      k=gather(cache["k"], src, 1),
      v=gather(cache["v"], src, 1),
      mask=gather(cache["mask"], src, 0),
    )
    return i + 1, tok, scores, lengths, done, out, cache

  carry = (jnp.int32(1), tok, scores, lengths, done, out, cache)
  cond = lambda c: (c[0] < max_len) & ~jnp.all(c[4])
  _, _, scores, lengths, _, out, _ = jax.lax.while_loop(cond, body, carry)
  final = jnp.where(length_normalize, scores / lengths, scores)
  return out[jnp.arange(b), jnp.argmax(final, axis=-1)]


def beam_search(
  model: GPT2,
  prefix_embeds: jax.Array,
  *,
  beam_size: int,
  max_len: int,
  eos_id: int,
  length_normalize: bool = True,
  prefix_mask: jax.Array | None = None,
) -> np.ndarray:
  """Best beam int32 [B, max_len] per example (ClipCap's beam search, batched and jitted).

  A beam's score is the sum of its token log-probs; finished beams (EOS emitted, kept) keep
  their score; the final choice ranks ``score / length`` (tokens up to and including EOS) with
  ``length_normalize``, else the raw sum. ``beam_size=1`` gives :func:`greedy_decode`'s tokens.
  """
  if not 1 <= beam_size <= model.config.vocab_size:
    raise ValueError(f"beam_size must be in [1, vocab_size], got {beam_size}")
  prefix_embeds, prefix_mask = _check_prefix(model, prefix_embeds, prefix_mask, max_len)
  graphdef, state = nnx.split(model)
  out = _beam(
    graphdef,
    state,
    prefix_embeds,
    prefix_mask,
    jnp.int32(eos_id),
    jnp.bool_(length_normalize),
    beam_size=beam_size,
    max_len=max_len,
  )
  return np.asarray(out)
