"""Dense layer shared by every CLIP projection, with an optional LoRA adapter.

The adapter lives *inside* the layer (``lora_a``/``lora_b`` as ``nnx.LoRAParam``) so that
the frozen ``kernel``/``bias`` keep the same state paths with or without LoRA: the teacher
(base weights) and the student (base + LoRA) are two graphdefs over ONE frozen state.
``models/lora.py`` decides which layers get an adapter; this module only computes

    y = x @ W + b + (alpha / rank) * dropout(x) @ A @ B        (Hu et al., 2021)

The low-rank product has its own VJP (``lora_product``). Autodiff of ``(x @ A) @ B`` gives
``dA = x^T @ (g @ B^T)`` as a dot contracting x's leading (row) axis; XLA:CPU lowers that by
materialising x^T, and it fuses the whole residual-stream chain that produces x into that
transpose, so each block recomputes the blocks below it (measured on a 12-block ViT-B/32 LoRA
step, batch 16: 2.3 s of a 5.4 s step). Computing ``dA^T = (g @ B^T)^T @ x`` instead
contracts the small [M, r] operand's rows and reads x in its natural layout (step: 3.0 s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


@jax.custom_vjp
def lora_product(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``(x @ a) @ b`` for x [..., in], a [in, r], b [r, out]; gradients laid out for XLA:CPU."""
  return (x @ a) @ b


def _lora_product_fwd(x, a, b):
  xa = x @ a
  return xa @ b, (x, a, b, xa)


def _lora_product_bwd(residuals, g):
  x, a, b, xa = residuals
  rows = lambda t: t.reshape(-1, t.shape[-1])  # [..., n] -> [M, n]
  g_xa = g @ b.T  # [..., r]
  grad_b = jnp.einsum("mr,mo->ro", rows(xa), rows(g))
  # The barrier keeps XLA from folding the transpose into the dot: folded, the dot reads x as its
  # transposed lhs, ~8x slower alone on XLA:CPU (this whole backward at M=1576: 1040 vs 360 µs).
  grad_a = jax.lax.optimization_barrier(jnp.einsum("mr,mi->ri", rows(g_xa), rows(x))).T
  grad_x = g_xa @ a.T
  return grad_x.astype(x.dtype), grad_a.astype(a.dtype), grad_b.astype(b.dtype)


lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)


class Dense(nnx.Module):
  """``x @ kernel + bias`` with kernel [in, out] (HF ``weight`` transposed)."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    init = nnx.initializers.lecun_normal()
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    # LoRA adapter, absent until models/lora.py attaches one.
    self.lora_a: nnx.LoRAParam | None = None
    self.lora_b: nnx.LoRAParam | None = None
    self.lora_scale: float = 0.0
    self.lora_dropout: nnx.Dropout | None = None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    y = x @ self.kernel[...].astype(dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    if self.lora_a is not None:
      h = self.lora_dropout(x) if self.lora_dropout is not None else x
      delta = lora_product(h, self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype))
      y = y + (self.lora_scale * delta).astype(dtype)
    return y
