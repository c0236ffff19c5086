"""Training objectives by name (``config.loss.mode``): one module per objective + a registry line.

    objective = objectives.make(config)     # an objectives.base.Objective bound to config
    objectives.validate(config)             # one-line ConfigErrors, before anything is built
    objectives.trained_temperature(config, params, teacher_scale)   # the τ a run trained with

A new loss is a module with an ``Objective`` subclass named ``OBJECTIVE`` and one line in
``REGISTRY`` (or ``register(name, cls)`` at run time, e.g. in a test). Pure jnp math lives beside
them (losses.py, curriculum.py). May import errors only.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp
import ml_collections

from gmail_jax.errors import ConfigError
from gmail_jax.objectives.base import Objective, Targets, temperature_of

__all__ = [
  "REGISTRY",
  "Objective",
  "Targets",
  "get",
  "make",
  "register",
  "temperature_of",
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
