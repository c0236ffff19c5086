"""CLIP-style contrastive training of a whole model or of its LoRA adapters (small models).

Two users: the 'teacher' stage pretrains the tiny CLIP teacher of the small reproductions on real
image-caption pairs (all parameters), and the report stage trains the "fine-tune on generated as
if real" baseline of GMAIL Table 9 (LoRA only, the same targets and budget as GMAIL). Captions come
from class templates, so many items of a batch share a class; their captions are true positives,
not negatives, and the loss uses multi-positive targets (``group_clip_loss``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmail_jax.data import preprocess
from gmail_jax.models import clip as clip_lib
from gmail_jax.training import fit as fit_lib

# ---------------------------------------------------------------------------------------------
# Loss.
# ---------------------------------------------------------------------------------------------


def group_clip_loss(
  img: jax.Array, txt: jax.Array, logit_scale: jax.Array, groups: jax.Array
) -> jax.Array:
  """Symmetric CLIP loss with multi-positive targets for items that share a group (class).

      S   = exp(logit_scale) · norm(img) @ norm(txt)ᵀ                      [B, B]
      T_ij = [g_i = g_j] / Σ_k [g_i = g_k]                                 (rows sum to 1)
      L   = ½ (CE(S, T) + CE(Sᵀ, T)),   CE(S, T) = −(1/B) Σ_i Σ_j T_ij log softmax_j(S_i)

  With all groups distinct, T = I and this is exactly CLIP's loss (Radford et al. 2021).
  """
  img = clip_lib.l2_normalize(img.astype(jnp.float32))
  txt = clip_lib.l2_normalize(txt.astype(jnp.float32))
  logits = jnp.exp(logit_scale.astype(jnp.float32)) * img @ txt.T
  same = (groups[:, None] == groups[None, :]).astype(jnp.float32)
  targets = same / same.sum(axis=1, keepdims=True)  # symmetric, so the same for both directions
  ce_i = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
  ce_t = -jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1), axis=1)
  return 0.5 * (ce_i.mean() + ce_t.mean())


# ---------------------------------------------------------------------------------------------
# Training loop (plain jit on the default device: tiny models, deterministic).
# ---------------------------------------------------------------------------------------------


def contrastive_finetune(
  model: clip_lib.CLIP,
  images: np.ndarray,
  ids: np.ndarray,
  groups: np.ndarray,
  *,
  wrt: nnx.filterlib.Filter = nnx.Param,
  steps: int,
  batch_size: int,
  lr: float,
  weight_decay: float = 0.01,
  warmup_steps: int = 0,
  seed: int = 0,
  log: Callable[[int, float], None] | None = None,
  log_every: int = 1,
) -> list[float]:
  """Train ``model`` in place with ``group_clip_loss`` on (images, caption ids); returns losses.

  images: uint8 [N, S, S, 3] (normalised on device); ids: int32 [N, L]; groups: int [N].
  ``wrt`` picks the trainable variables (nnx.Param = everything, nnx.LoRAParam = adapters only;
  the rest, e.g. the text tower for LoRA, stays frozen). AdamW with linear warmup + cosine decay,
  global-norm clipping 1.0; the loop is ``fit.fit_arrays`` (batches: epochs of a permutation drawn
  from ``seed``; ``log(step, loss)`` every ``log_every`` steps).
  """
  n = len(images)
  if n < 2 or len(ids) != n or len(groups) != n:
    raise ValueError(f"contrastive_finetune: need >= 2 aligned items, got {len(images)}/{len(ids)}")
  sched = optax.warmup_cosine_decay_schedule(
    0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1), end_value=0.1 * lr
  )
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      sched, weight_decay=weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    ),
  )

  def loss_fn(m: clip_lib.CLIP, img, tok, grp) -> jax.Array:
    zi = m.encode_image(preprocess.normalize(img))
    return group_clip_loss(zi, m.encode_text(tok), m.logit_scale[...], grp)

  return fit_lib.fit_arrays(
    model,
    wrt,
    loss_fn,
    (images, ids, groups.astype(np.int32)),
    tx=tx,
    steps=steps,
    batch_size=min(batch_size, n),
    seed=seed,
    log=log,
    log_every=log_every,
  )
