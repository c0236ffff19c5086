"""Training objectives by name (``config.loss.mode``): one module per objective + a registry line.

    objective = objectives.make(config)     # an objectives.base.Objective bound to config
    objectives.validate(config)             # one-line ConfigErrors, before anything is built
    objectives.trained_temperature(config, params, teacher_scale)   # the τ a run trained with
    objectives.trained_logit_head(config, params)   # the image-text logit scale / bias it trained

A new loss is a module with an ``Objective`` subclass named ``OBJECTIVE`` and one line in
``REGISTRY`` (or ``register(name, cls)`` at run time, e.g. in a test). Pure jnp math lives beside
them (losses.py, curriculum.py). May import errors only.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import ml_collections

from gmail_jax.errors import ConfigError
from gmail_jax.objectives.base import MAX_LOG_SCALE, Objective, Targets, temperature_of

__all__ = [
  "REGISTRY",
  "Objective",
  "Targets",
  "get",
  "make",
  "register",
  "temperature_of",
  "trained_logit_head",
  "trained_temperature",
]

REGISTRY: dict[str, str | type[Objective]] = {
  "gmail": "gmail_jax.objectives.gmail",
  "tpc_cma": "gmail_jax.objectives.tpc_cma",
}


def register(name: str, cls: type[Objective]) -> None:
  """Adds (or replaces) an objective under ``name``."""
  REGISTRY[name] = cls


def get(name: str) -> type[Objective]:
  if name not in REGISTRY:
    raise ConfigError(f"config.loss.mode: {name!r} not in {sorted(REGISTRY)}")
  entry = REGISTRY[name]
  return importlib.import_module(entry).OBJECTIVE if isinstance(entry, str) else entry


def validate(config: ml_collections.ConfigDict) -> None:
  get(config.loss.mode).validate(config)


def make(config: ml_collections.ConfigDict) -> Objective:
  cls = get(config.loss.mode)
  cls.validate(config)
  return cls(config)


def trained_temperature(config: ml_collections.ConfigDict, params: dict, teacher_scale) -> float:
  """The InfoNCE τ of a run's trainable ``params`` (its learned log_scale if any), else the
  teacher's 1/``teacher_scale`` (exp of its logit_scale) or config.loss.temperature, as training
  resolved config.loss.temperature_from."""
  src = get(config.loss.mode).temperature_from(config)
  scale = jnp.asarray(teacher_scale, jnp.float32) if src == "teacher" else None
  return float(temperature_of(params, config.loss, scale))


def trained_logit_head(config: ml_collections.ConfigDict, params: dict) -> dict[str, jax.Array]:
  """The image-text logit head a run's trainable ``params`` define, as replacements for the
  teacher's (``logit_scale`` in log space, ``logit_bias``); a missing key keeps the teacher's.

  ``logit_scale``: log 1/τ, only for an objective whose InfoNCE pairs the student's images with the
  frozen text tower (``teacher_temperature_ok``: TPC-CMA image_text) and whose τ is not the
  teacher's own: the learned one (clamped at 1/100 as :func:`temperature_of` clamps it) or
  config.loss.temperature. GMAIL's τ (and TPC-CMA gen_real's) aligns generated with real images:
  not an image-text scale, so those runs keep the teacher's, which their text term trains with.
  ``logit_bias``: the sigmoid text term's learned bias (it trains at the teacher's scale).
  """
  head: dict[str, jax.Array] = {}
  cls = get(config.loss.mode)
  if cls.teacher_temperature_ok(config):
    if "log_scale" in params:
      head["logit_scale"] = jnp.minimum(params["log_scale"], MAX_LOG_SCALE)
    elif cls.temperature_from(config) == "config":
      head["logit_scale"] = jnp.asarray(math.log(1.0 / config.loss.temperature), jnp.float32)
  if "text_bias" in params:
    head["logit_bias"] = params["text_bias"]
  return head
