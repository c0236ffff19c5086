"""DeCap (Li et al., ICLR 2023): a caption decoder trained from scratch on CLIP *text* embeddings.

papers.md B.4: a small GPT-2 (4 layers, 4 heads) over CLIP's BPE, captions up to 20 tokens, label
smoothing 0.1, fed one linearly projected, L2-normalised CLIP text embedding of the caption it must
reconstruct. At inference an image embedding v is fed either

  direct      as is — TPC-CMA's measure of how interchangeable the modalities are: a decoder that
              only ever saw text embeddings captions images well only if the gap is small;
  projection  v_proj = Σ_i w_i t_i,  w = softmax(cos(v, t_i) / τ) over a memory of text
              embeddings t_i (DeCap's training captions), re-normalised — DeCap's own decoding.

The captioner, its training and decoding are ``captioning/clipcap.py``'s, with these settings.
One deviation, for speed on CPU: the decoder predicts over the tokens of its training captions
(``compact_vocab``; the others never get a positive target); ``compact_vocab=False`` restores
DeCap's softmax over all 49,408.
"""

from __future__ import annotations

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
  max_len=20,
  label_smoothing=0.1,
  lr=1e-5,
  warmup_steps=0,
  batch_size=64,
  epochs=10,
)
PROJECTION_TAU = 0.01  # DeCap's softmax(100 · cos) over the memory


def settings(overrides: dict | None = None) -> dict:
  return clipcap.settings({**SETTINGS, **dict(overrides or {})})


def train(s: dict, text_feats: np.ndarray, captions: list[str], **kw) -> clipcap.Trained:
  """Decoder trained to reconstruct each caption from its own text embedding."""
  return clipcap.train(s, (text_feats, captions), None, **kw)


@jax.jit
def _project(v: jax.Array, memory: jax.Array, tau: float) -> jax.Array:
  v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  m = memory / jnp.linalg.norm(memory, axis=-1, keepdims=True)
  w = jax.nn.softmax((v @ m.T) / tau, axis=-1)
  out = w @ m
  return out / jnp.linalg.norm(out, axis=-1, keepdims=True)


def project(v: np.ndarray, memory: np.ndarray, tau: float = PROJECTION_TAU) -> np.ndarray:
  """Image embeddings [N, C] -> convex combinations of the text memory [M, C], L2-normalised."""
  return np.asarray(_project(jnp.asarray(v, jnp.float32), jnp.asarray(memory, jnp.float32), tau))
