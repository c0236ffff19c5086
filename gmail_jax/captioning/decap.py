"""DeCap (Li et al., ICLR 2023): a caption decoder trained from scratch on CLIP *text* embeddings.

papers.md B.4 and dhg-wei/DeCap: a small GPT-2 (4 layers, 4 heads) over CLIP's BPE, trained in
train mode (GPT-2's dropout 0.1) on captions up to 20 tokens, label smoothing 0.1, 1000 warm-up
steps, fed one linearly projected, L2-normalised CLIP text embedding of the caption it must
reconstruct; decoding runs up to 30 tokens. At inference an image embedding v is fed either

  direct      as is — TPC-CMA's measure of how interchangeable the modalities are: a decoder that
              only ever saw text embeddings captions images well only if the gap is small;
  projection  v_proj = Σ_i w_i t_i,  w = softmax(cos(v, t_i) / τ) over a memory of text
              embeddings t_i (DeCap's training captions), re-normalised — DeCap's own decoding.

The captioner, its training and decoding are ``captioning/clipcap.py``'s, with these settings
(the optimiser is ClipCap's transformers AdamW, weight decay 0, eps 1e-6, which DeCap's train.py
is assumed to share; not re-checked against its source here). One deviation, for speed on CPU:
the decoder predicts over the tokens of its training captions (``compact_vocab``; the others never
get a positive target); ``compact_vocab=False`` restores DeCap's softmax over all 49,408.

The projection runs over the memory in chunks of queries (``chunk_size``; by default as many as
keep one chunk's similarities under ``MAX_SIMILARITIES`` elements): the full N x M similarity of
COCO's 5k test images against 560k training captions would be 11 GB in fp32. Each query's row is
computed alone, so the chunking does not change the result beyond float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gmail_jax.captioning import clipcap

SETTINGS = dict(
  lm="",
  tokenizer="clip_bpe",
  lm_layers=4,
  lm_heads=4,
  lm_width=768,
  mapper="linear",
  prefix_length=1,
  trainable="all",
  dual_projection=False,
  normalize_prefix=True,  # DeCap feeds L2-normalised embeddings (text in training, image at test)
  max_len=20,
  decode_len=30,
  label_smoothing=0.1,
  lr=1e-5,
  warmup_steps=1000,
  batch_size=64,
  epochs=10,
)
PROJECTION_TAU = 0.01  # DeCap's softmax(100 · cos) over the memory
MAX_SIMILARITIES = 1 << 25  # elements of one chunk's [chunk, M] similarities (128 MiB in fp32)


def settings(overrides: dict | None = None) -> dict:
  return clipcap.settings({**SETTINGS, **dict(overrides or {})})


def train(s: dict, text_feats: np.ndarray, captions: list[str], **kw) -> clipcap.Trained:
  """Decoder trained to reconstruct each caption from its own text embedding."""
  return clipcap.train(s, (text_feats, captions), None, **kw)


def default_chunk(n: int, m: int) -> int:
  """Queries per chunk: as many as keep [chunk, m] within ``MAX_SIMILARITIES``, at most n."""
  return max(1, min(n, MAX_SIMILARITIES // max(m, 1)))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _project(v: jax.Array, memory: jax.Array, tau: float, *, chunk: int) -> jax.Array:
  norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  m = norm(memory)

  def rows(q: jax.Array) -> jax.Array:  # [chunk, C] -> [chunk, C]
    w = jax.nn.softmax((q @ m.T) / tau, axis=-1)
    return norm(w @ m)

  n, c = v.shape
  # Zero rows pad the last chunk (their softmax is uniform, finite) and are dropped.
  q = jnp.pad(norm(v), ((0, -n % chunk), (0, 0))).reshape(-1, chunk, c)
  return jax.lax.map(rows, q).reshape(-1, c)[:n]


def project(
  v: np.ndarray, memory: np.ndarray, tau: float = PROJECTION_TAU, *, chunk_size: int | None = None
) -> np.ndarray:
  """Image embeddings [N, C] -> convex combinations of the text memory [M, C], L2-normalised:
  softmax(cos(v, t_i) / tau)-weighted, computed ``chunk_size`` queries at a time."""
  n, m = len(v), len(memory)
  chunk = default_chunk(n, m) if chunk_size is None else max(1, min(int(chunk_size), n))
  v32, m32 = jnp.asarray(v, jnp.float32), jnp.asarray(memory, jnp.float32)
  return np.asarray(_project(v32, m32, tau, chunk=chunk))
