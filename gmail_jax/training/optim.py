"""Learning-rate schedules and the optimizer (optax) for the trainable subtree only.

Paper settings (papers.md A.3): AdamW lr 1e-4, weight decay 0.01, cosine annealing with warm
restarts, gradient clipping (global norm 1.0 here). The optimizer only ever sees the trainable
pytree (LoRA [+ projection, log-scale]); frozen weights get no state by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gmail_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine", "cosine_restarts")


def warmup_cosine(
  step: jax.Array, *, base_lr: float, total_steps: int, warmup_steps: int, min_ratio: float
) -> jax.Array:
  """Linear warmup to base_lr, then  lr = min + (base - min) * (1 + cos(pi * t)) / 2, t in [0,1]."""
  step = jnp.asarray(step, jnp.float32)
  warm = base_lr * (step + 1) / max(warmup_steps, 1)
  t = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
  lo = base_lr * min_ratio
  cos = lo + (base_lr - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  return jnp.where(step < warmup_steps, warm, cos)


def cosine_warm_restarts(
  step: jax.Array,
  *,
  base_lr: float,
  period: int,
  period_mult: float,
  warmup_steps: int,
  min_ratio: float,
) -> jax.Array:
  """SGDR (Loshchilov & Hutter 2017; torch CosineAnnealingWarmRestarts) after a linear warmup.

      lr = min + (base - min) * (1 + cos(pi * T_cur / T_i)) / 2,   T_i = T_0 * mult^i

  where i is the index of the current cycle and T_cur the steps since it started.
  """
  step = jnp.asarray(step, jnp.float32)
  s = jnp.maximum(step - warmup_steps, 0.0)
  if period_mult == 1.0:
    t_cur, t_i = jnp.mod(s, period), jnp.float32(period)
  else:
    i = jnp.floor(jnp.log1p(s * (period_mult - 1.0) / period) / jnp.log(period_mult))
    start = period * (period_mult**i - 1.0) / (period_mult - 1.0)
    t_cur, t_i = s - start, period * period_mult**i
  lo = base_lr * min_ratio
  cos = lo + (base_lr - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * t_cur / t_i))
  warm = base_lr * (step + 1) / max(warmup_steps, 1)
  return jnp.where(step < warmup_steps, warm, cos)


def make_schedule(
  cfg: ml_collections.ConfigDict, total_steps: int
) -> Callable[[jax.Array], jax.Array]:
  """``config.optim`` → step -> lr. Errors name ``config.optim.schedule``."""
  kind = cfg.schedule
  if kind == "constant":
    return lambda step: jnp.full((), cfg.lr, jnp.float32)
  if kind == "cosine":
    return lambda step: warmup_cosine(
      step,
      base_lr=cfg.lr,
      total_steps=total_steps,
      warmup_steps=cfg.warmup_steps,
      min_ratio=cfg.min_lr_ratio,
    )
  if kind == "cosine_restarts":
    if cfg.restart_steps < 1 or cfg.restart_mult < 1:
      raise ConfigError("config.optim.restart_steps must be >= 1 and restart_mult >= 1")
    return lambda step: cosine_warm_restarts(
      step,
      base_lr=cfg.lr,
      period=cfg.restart_steps,
      period_mult=float(cfg.restart_mult),
      warmup_steps=cfg.warmup_steps,
      min_ratio=cfg.min_lr_ratio,
    )
  raise ConfigError(f"config.optim.schedule: {kind!r} not in {SCHEDULES}")


def make_optimizer(
  cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """clip_by_global_norm → AdamW(schedule); decay only on matrices (not scales/biases)."""
  if cfg.name != "adamw":
    raise ConfigError(f"config.optim.name: {cfg.name!r} not supported (use 'adamw')")
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(
    optax.adamw(
      schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
    )
  )
  return optax.chain(*parts), schedule
