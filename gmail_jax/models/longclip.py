"""Long-CLIP (Zhang et al., 2024): a longer text context by "knowledge-preserved stretching".

From a ``[L, D]`` text positional embedding (L = 77) Long-CLIP builds ``4 L - 3 keep`` rows
(keep = 20: 248), exactly as its reference code does (same fp32 operation order):

    new[i]                  = pos[i]                                   i < keep (kept bitwise)
    new[keep + 4 i + j]     = (4 - j) * pos[keep + i] / 4 + j * pos[keep + i + 1] / 4
                                                                       0 <= i < L - 1 - keep
    new[4 L - 3 keep - 4 + j] = pos[L - 1] + j * (pos[L - 1] - pos[L - 2]) / 4    (the tail)

with j = 0..3: positions keep..L-1 interpolated x4 and the last four extrapolated from the final
two. A shorter target context takes the first rows. A Long-CLIP checkpoint already in HF format
(``max_position_embeddings=248``) needs none of this: convert.py loads it as it is.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models.clip import CLIP

KEEP = 20
LONG_CONTEXT = 248


def stretch_positions(pos: np.ndarray, context: int = LONG_CONTEXT, keep: int = KEEP) -> np.ndarray:
  """Long-CLIP's stretched positional embedding ``[context, D]`` from ``pos [L, D]``."""
  pos = np.asarray(pos)
  length = pos.shape[0]
  full = 4 * length - 3 * keep
  if not (length < context <= full and length - 1 > keep):
    raise ConfigError(
      f"text_context {context}: Long-CLIP stretching of a {length}-position embedding gives "
      f"{length + 1}..{full} positions"
    )
  a, b = pos[keep:-1], pos[keep + 1 :]  # [L - 1 - keep, D] each
  four, rows = pos.dtype.type(4), []
  for j in range(4):
    # (4-j)*a/4 + j*b/4 in the reference's order, so that results match it bit for bit.
    rows.append(pos.dtype.type(4 - j) * a / four + pos.dtype.type(j) * b / four)
  middle = np.stack(rows, axis=1).reshape(-1, pos.shape[1])
  last, step = pos[-1], pos[-1] - pos[-2]
  tail = np.stack([last + pos.dtype.type(j) * step / four for j in range(4)])
  return np.concatenate([pos[:keep], middle, tail])[:context]


def stretch_text_context(model: CLIP, context: int) -> CLIP:
  """``model`` with a ``context``-token text tower (positional embedding stretched as above);
  ``model`` itself if it already has that context. Every other weight is shared unchanged."""
  text_cfg = model.config.text
  if context == text_cfg.context_length:
    return model
  pos = np.asarray(model.text.pos_embedding[...])
  stretched = stretch_positions(pos, context)
  config = dataclasses.replace(
    model.config, text=dataclasses.replace(text_cfg, context_length=context)
  )
  kw = dict(dtype=model.text.dtype, remat=model.text.remat, residual_loops=model.residual_loops)
  abstract = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0), **kw))
  graphdef, _ = nnx.split(abstract)
  state = nnx.state(model)
  state["text"]["pos_embedding"] = state["text"]["pos_embedding"].replace(
    jnp.asarray(stretched, dtype=pos.dtype)
  )
  return nnx.merge(graphdef, state)
