"""LoRA adapters (Hu et al., 2021) attached to ``layers.Dense`` by a regex over module paths.

    y = x @ W + b + (alpha / rank) * dropout(x) @ A @ B,   A: [in, r] he-uniform, B: [r, out] zeros

A and B are ``nnx.LoRAParam`` inside the Dense, so the frozen ``kernel``/``bias`` keep their
paths: the model *before* ``apply_lora`` is the teacher, the same object *after* it is the
student, and ``split_student`` yields (LoRA state, dropout-rng state, frozen state) whose frozen
state has exactly the teacher's paths. One copy of the frozen weights serves both.

Module paths are '/'-joined attribute names, e.g. ``vision/blocks/3/attn/q_proj``. GMAIL's
default (papers.md A.6 #3): q/k/v/out projections of every vision block; MLP optional.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models.layers import Dense

ATTN_TARGETS = r"vision/blocks/\d+/attn/(q_proj|k_proj|v_proj|out_proj)"
MLP_TARGETS = r"vision/blocks/\d+/mlp/(fc1|fc2)"
DEFAULT_TARGETS = (ATTN_TARGETS,)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A detached adapter (what ``merge_lora`` folded into a kernel and ``unmerge_lora`` restores)."""

  a: jax.Array
  b: jax.Array
  scale: float
  dropout: float


def module_path(path: Sequence[str | int]) -> str:
  return "/".join(str(p) for p in path)


def dense_layers(model: nnx.Module) -> dict[str, Dense]:
  """Every ``Dense`` in ``model`` by its '/'-joined module path."""
  return {module_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Dense)}


def select_targets(model: nnx.Module, targets: str | Sequence[str]) -> list[str]:
  """Paths of the Dense layers fully matched by any regex in ``targets``.

  Raises ValueError naming the regex when one matches nothing (a typo must not silently train
  nothing).
  """
  targets = [targets] if isinstance(targets, str) else list(targets)
  if not targets:
    raise ConfigError("config.lora.targets: empty; give at least one module-path regex")
  paths = list(dense_layers(model))
  chosen = []
  for pattern in targets:
    try:
      rx = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config.lora.targets: bad regex {pattern!r}: {e}") from None
    hits = [p for p in paths if rx.fullmatch(p)]
    if not hits:
      raise ConfigError(
        f"config.lora.targets: regex {pattern!r} matches no Dense layer (e.g. {paths[:3]} ...)"
      )
    chosen += [p for p in hits if p not in chosen]
  return sorted(chosen, key=paths.index)


def apply_lora(
  model: nnx.Module,
  *,
  rank: int = 4,
  alpha: float = 4.0,
  dropout: float = 0.0,
  targets: str | Sequence[str] = DEFAULT_TARGETS,
  rngs: nnx.Rngs,
) -> list[str]:
  """Attaches a LoRA adapter (in place) to each targeted Dense; returns the adapted paths.

  A ~ he-uniform (kaiming_uniform(a=sqrt(5)) as in PEFT/torch Linear: U(-1/sqrt(in), 1/sqrt(in)))
  and B = 0, so the student equals the teacher at step 0. ``rngs.params`` draws A;
  ``rngs.dropout`` (only when dropout > 0) feeds one dropout stream shared by all adapters.
  """
  if rank < 1:
    raise ConfigError(f"config.lora.rank: must be >= 1, got {rank}")
  if not 0.0 <= dropout < 1.0:
    raise ConfigError(f"config.lora.dropout: must be in [0, 1), got {dropout}")
  layers = dense_layers(model)
  paths = select_targets(model, targets)
  for path in paths:
    layer = layers[path]
    if layer.lora_a is not None:
      raise ValueError(f"lora: {path} already has an adapter")
    dtype = jax.tree.leaves(layer.kernel)[0].dtype  # also works on abstract (eval_shape) models
    bound = 1.0 / math.sqrt(layer.in_features)
    a = jax.random.uniform(rngs.params(), (layer.in_features, rank), dtype, -bound, bound)
    # nnx.data: Dense declares these as (static) None until an adapter is attached.
    layer.lora_a = nnx.data(nnx.LoRAParam(a))
    layer.lora_b = nnx.data(nnx.LoRAParam(jnp.zeros((rank, layer.out_features), dtype)))
    layer.lora_scale = float(alpha) / rank
    if dropout > 0:
      layer.lora_dropout = nnx.data(nnx.Dropout(dropout, rngs=rngs))
  return paths


def adapted_paths(model: nnx.Module) -> list[str]:
  return [p for p, m in dense_layers(model).items() if m.lora_a is not None]


def split_student(student: nnx.Module):
  """(graphdef, lora, rng, frozen): LoRAParam first (it subclasses Param), then dropout rngs.

  ``frozen`` has the same paths as ``nnx.state(teacher)`` for the pre-LoRA model.
  """
  return nnx.split(student, nnx.LoRAParam, nnx.RngState, ...)


def merge_lora(model: nnx.Module) -> dict[str, Adapter]:
  """Folds every adapter into its kernel (W += scale * A @ B) and detaches it, in place.

  The result is a plain model with the teacher's structure (what ``api.load_student`` returns).
  Returns the detached adapters for ``unmerge_lora``.
  """
  adapters = {}
  for path, layer in dense_layers(model).items():
    if layer.lora_a is None:
      continue
    a, b = layer.lora_a[...], layer.lora_b[...]
    delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)) * layer.lora_scale
    kernel = layer.kernel[...]
    layer.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    rate = layer.lora_dropout.rate if layer.lora_dropout is not None else 0.0
    adapters[path] = Adapter(a=a, b=b, scale=layer.lora_scale, dropout=rate)
    # Back to the pre-LoRA (static None) attributes: same graphdef as the teacher.
    for name in ("lora_a", "lora_b", "lora_dropout"):
      setattr(layer, name, nnx.static(None))
    layer.lora_scale = 0.0
  return adapters


def unmerge_lora(
  model: nnx.Module, adapters: dict[str, Adapter], *, rngs: nnx.Rngs | None = None
) -> None:
  """Inverse of ``merge_lora`` (W -= scale * A @ B, adapters re-attached), in place.

  Exact up to float rounding of the add/subtract. ``rngs`` is needed only for dropout > 0.
  """
  layers = dense_layers(model)
  for path, ad in adapters.items():
    layer = layers[path]
    delta = (ad.a.astype(jnp.float32) @ ad.b.astype(jnp.float32)) * ad.scale
    kernel = layer.kernel[...]
    layer.kernel[...] = (kernel.astype(jnp.float32) - delta).astype(kernel.dtype)
    layer.lora_a, layer.lora_b = nnx.data(nnx.LoRAParam(ad.a)), nnx.data(nnx.LoRAParam(ad.b))
    layer.lora_scale = ad.scale
    if ad.dropout > 0:
      if rngs is None:
        raise ValueError(f"unmerge_lora: {path} has dropout {ad.dropout}; pass rngs")
      layer.lora_dropout = nnx.data(nnx.Dropout(ad.dropout, rngs=rngs))


def count_params(state: nnx.State) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state))
