"""Losses as pure jnp functions on (global) embedding batches.

GMAIL (Mo & Yun, ICML 2025, Eq. 1) and TPC-CMA (Liu et al., arXiv 2604.00279; our reconstruction,
see DESIGN.md §1). Computed inside jit on globally sharded arrays: XLA inserts the all-gather, so
the negatives are the whole global batch and the gradient flows through the gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# GMAIL: gen->real InfoNCE, symmetric variant, CLIP text term, false-negative masking.
# ---------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def false_negative_mask(group: jax.Array | None, n: int) -> jax.Array | None:
  """mask[i, j] = True where column j must leave row i's denominator.

      mask[i, j] = (group_i == group_j) and i != j

  Rows that share a group id (same real image, or same class) are not each other's negatives;
  the diagonal (the positive) always stays. None when ``group`` is None.
  """
  if group is None:
    return None
  same = group[:, None] == group[None, :]
  return same & ~jnp.eye(n, dtype=bool)


def diagonal(x: jax.Array) -> jax.Array:
  """x[i, i] of a square matrix, as an element-wise select and a row sum (exact: the rest are 0).

  Not ``jnp.diagonal``: over a batch-sharded matrix its gradient is a scatter inside a
  ``conditional`` whose all-gathers XLA:CPU may run beside the step's top-level collectives, and
  with as many busy threads as devices that deadlocks (a 40 s rendezvous timeout, then abort).
  """
  return jnp.sum(jnp.where(jnp.eye(x.shape[0], dtype=bool), x, 0.0), axis=-1)


def _row_infonce(logits: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Per-row -log softmax(logits)[i, i] with masked columns removed, and row accuracy."""
  if mask is not None:
    logits = jnp.where(mask, -jnp.inf, logits)
  diag = diagonal(logits)
  nll = jax.nn.logsumexp(logits, axis=-1) - diag
  acc = (jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0])).astype(jnp.float32)
  return nll, acc


def negative_log_weights(sim: jax.Array, beta: float, mask: jax.Array | None) -> jax.Array:
  """log w_ij of the negative re-weighting (papers.md §B.3, after Robinson et al. 2021), [B, B]:

      w_ij = exp(β s_ij) / mean_{k ∈ N_i} exp(β s_ik)   for j ∈ N_i (off-diagonal, unmasked)
      log w_ij = 0 on the diagonal and masked columns

  Adding log w to the logits turns row i's denominator into exp(l_ii) + Σ_{j∈N_i} w_ij exp(l_ij):
  harder negatives (higher cosine s_ij) weigh more, the mean weight is 1, β = 0 is plain InfoNCE.
  The weights are constants (stop_gradient), as in importance re-weighting.
  """
  n = sim.shape[0]
  neg = ~jnp.eye(n, dtype=bool) if mask is None else ~(jnp.eye(n, dtype=bool) | mask)
  b = float(beta) * jax.lax.stop_gradient(sim.astype(jnp.float32))
  count = jnp.maximum(jnp.sum(neg, axis=1, keepdims=True), 1).astype(jnp.float32)
  log_mean = jax.nn.logsumexp(jnp.where(neg, b, -jnp.inf), axis=1, keepdims=True) - jnp.log(count)
  return jnp.where(neg, b - jnp.where(jnp.isfinite(log_mean), log_mean, 0.0), 0.0)


def _nce_rows(
  logits: jax.Array, sim: jax.Array, mask: jax.Array | None, neg_beta: float | None
) -> tuple[jax.Array, jax.Array]:
  """_row_infonce, with the negatives re-weighted when ``neg_beta`` is set (accuracy unweighted)."""
  nll, acc = _row_infonce(logits, mask)
  if neg_beta is not None:
    nll, _ = _row_infonce(logits + negative_log_weights(sim, neg_beta, mask), mask)
  return nll, acc


def gen_real_infonce(
  z_gen: jax.Array,
  z_real: jax.Array,
  temperature: float | jax.Array = 0.07,
  *,
  group: jax.Array | None = None,
  symmetric: bool = False,
  neg_beta: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GMAIL cross-modality alignment loss (Mo & Yun 2025, Eq. 1).

      L = -(1/|B|) sum_i log [ exp(s_ii / tau) / sum_{j not in M_i} exp(s_ij / tau) ]
      s_ij = cos(f_g(x_g,i), f_r(x_r,j)),   M_i = {j != i : group_j == group_i}

  One-directional gen->real: anchors are the student embeddings of generated images, the positive
  is the paired real image under the frozen teacher, negatives are all other real images of the
  (global) batch. ``symmetric`` averages it with the real->gen direction (columns, same mask).
  With ``group=None`` nothing is masked, which is literally Eq. 1. ``neg_beta`` re-weights the
  negatives (``negative_log_weights``; TPC-CMA's cma.nce='reweighted'); None = Eq. 1.

  Args:
    z_gen: [B, D] student embeddings of generated images (any scale; normalised here).
    z_real: [B, D] teacher embeddings of the paired real images.
    temperature: tau > 0 (fixed 0.07 in the paper, or exp(-learned log-scale)).
    group: optional int [B] false-negative group ids.
    symmetric: also add the real->gen direction.

  Returns:
    (loss, {'pair_acc': fraction of rows whose argmax is the positive,
            'pos_cos': mean cosine of the positive pairs}).
  """
  zg, zr = l2_normalize(z_gen), l2_normalize(z_real)
  sim = zg @ zr.T
  logits = sim / temperature
  mask = false_negative_mask(group, sim.shape[0])
  nll, acc = _nce_rows(logits, sim, mask, neg_beta)
  loss = jnp.mean(nll)
  if symmetric:
    nll_t, _ = _nce_rows(logits.T, sim.T, None if mask is None else mask.T, neg_beta)
    loss = 0.5 * (loss + jnp.mean(nll_t))
  return loss, {"pair_acc": jnp.mean(acc), "pos_cos": jnp.mean(diagonal(sim))}


def clip_loss(
  z_image: jax.Array,
  z_text: jax.Array,
  logit_scale: float | jax.Array,
  *,
  group: jax.Array | None = None,
  neg_beta: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric CLIP InfoNCE (Radford et al., 2021) with a linear logit scale.

      L = 1/2 [ CE(scale * I T^T, diag) + CE(scale * T I^T, diag) ]       (I, T L2-normalised)

  Used as GMAIL's optional text term between the student's generated-image embeddings and the
  frozen text tower's caption embeddings. ``logit_scale`` is exp(CLIP's log-scale), i.e. 1/tau.
  ``group`` masks false negatives and ``neg_beta`` re-weights them as in ``gen_real_infonce``.
  """
  zi, zt = l2_normalize(z_image), l2_normalize(z_text)
  sim = zi @ zt.T
  logits = logit_scale * sim
  mask = false_negative_mask(group, logits.shape[0])
  nll_i, acc_i = _nce_rows(logits, sim, mask, neg_beta)
  nll_t, _ = _nce_rows(logits.T, sim.T, None if mask is None else mask.T, neg_beta)
  loss = 0.5 * (jnp.mean(nll_i) + jnp.mean(nll_t))
  return loss, {"text_acc": jnp.mean(acc_i)}


def sigmoid_loss(
  z_image: jax.Array,
  z_text: jax.Array,
  logit_scale: float | jax.Array,
  logit_bias: float | jax.Array,
  *,
  group: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SigLIP's pairwise sigmoid loss (Zhai et al., 2023) with a linear scale and a bias.

      L = -1/B sum_ij log sigmoid(y_ij (scale * <i_i, t_j> + bias)),  y = +1 on the diagonal, -1 off

  (HF ``SiglipModel(return_loss=True)``). ``group`` drops same-group off-diagonal pairs, which are
  neither positives nor negatives, as in ``gen_real_infonce``.
  """
  zi, zt = l2_normalize(z_image), l2_normalize(z_text)
  logits = logit_scale * (zi @ zt.T) + logit_bias
  n = logits.shape[0]
  labels = 2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0
  terms = jax.nn.log_sigmoid(labels * logits)
  mask = false_negative_mask(group, n)
  if mask is not None:
    terms = jnp.where(mask, 0.0, terms)
  loss = -jnp.sum(terms) / n
  acc = jnp.argmax(logits, axis=1) == jnp.arange(n)
  return loss, {"text_acc": jnp.mean(acc)}


def gmail_loss(
  z_gen: jax.Array,
  z_real: jax.Array,
  *,
  temperature: float | jax.Array = 0.07,
  group: jax.Array | None = None,
  symmetric: bool = False,
  z_text: jax.Array | None = None,
  text_weight: float = 0.0,
  text_logit_scale: float | jax.Array = 1.0 / 0.07,
  text_loss: str = "softmax",
  text_bias: float | jax.Array = -10.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GMAIL objective:  L = L_align(z_gen, z_real; tau) + lambda * L_CLIP(z_gen, z_text).

  lambda = ``text_weight``; lambda = 0 (or ``z_text=None``) is literally Algorithm 1. The text
  term is CLIP's InfoNCE (``text_loss="softmax"``) or SigLIP's sigmoid loss with ``text_bias``
  (``"sigmoid"``). Returns the
  total loss and per-term metrics ('align_loss', 'pair_acc', 'pos_cos', and with the text term
  'text_loss', 'text_acc').
  """
  align, aux = gen_real_infonce(z_gen, z_real, temperature, group=group, symmetric=symmetric)
  aux = {"align_loss": align, **aux}
  loss = align
  if z_text is not None and text_weight:
    if text_loss == "sigmoid":
      text, text_aux = sigmoid_loss(z_gen, z_text, text_logit_scale, text_bias, group=group)
    else:
      text, text_aux = clip_loss(z_gen, z_text, text_logit_scale, group=group)
    loss = loss + text_weight * text
    aux.update(text_loss=text, **text_aux)
  return loss, aux


# ---------------------------------------------------------------------------------------------
# TPC-CMA: centroid and distribution alignment terms.
# ---------------------------------------------------------------------------------------------
# Reconstruction (papers.md §B.3): L_CMA = L_C + λ_D·L_D on L2-normalised paired embeddings of one
# (global) batch; the training mode is L = L_InfoNCE + α(t)·L_CMA (curriculum.py).

DISTRIBUTION_KINDS = ("gram", "residual")


def _cma_l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| per row, in float32 (the CMA terms are squared differences of small numbers)."""
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def centroid_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Centroid term L_C = ||mean_B(x̂) − mean_B(ŷ)||², x̂, ŷ the L2-normalised rows of x, y [B, D].

  The squared batch estimate of the centroid gap G_C (Liang et al. 2022's ||Δ_gap||).
  """
  x, y = _cma_l2_normalize(x), _cma_l2_normalize(y)
  d = jnp.mean(x, axis=0) - jnp.mean(y, axis=0)
  return jnp.sum(d * d)


def distribution_loss(x: jax.Array, y: jax.Array, kind: str = "gram") -> jax.Array:
  """Distribution term L_D on L2-normalised rows x̂, ŷ of x, y [B, D].

  kind='gram' (intra-modal geometry matching, unpaired within each modality):
      L_D = (1/B²) · ||X̂X̂ᵀ − ŶŶᵀ||_F²
  kind='residual' (paired; the batch estimate of G_D² in gmail_jax/evaluators/gap.py):
      L_D = (1/B) Σ_i ||(x̂_i − μ_x) − (ŷ_i − μ_y)||²
  """
  if kind not in DISTRIBUTION_KINDS:
    raise ValueError(f"distribution_loss: kind must be one of {DISTRIBUTION_KINDS}, got {kind!r}")
  x, y = _cma_l2_normalize(x), _cma_l2_normalize(y)
  if kind == "gram":
    diff = x @ x.T - y @ y.T
    return jnp.mean(diff * diff)  # mean over B² entries = (1/B²)·||·||_F²
  r = (x - jnp.mean(x, axis=0)) - (y - jnp.mean(y, axis=0))
  return jnp.mean(jnp.sum(r * r, axis=-1))


def cma_loss(x: jax.Array, y: jax.Array, lambda_d: float = 1.0, kind: str = "gram") -> jax.Array:
  """Cross-modal alignment loss L_CMA = L_C + λ_D · L_D (see centroid_loss, distribution_loss).

  Zero when x̂ == ŷ; scale-invariant per row (inputs are L2-normalised inside).
  """
  return centroid_loss(x, y) + lambda_d * distribution_loss(x, y, kind=kind)
