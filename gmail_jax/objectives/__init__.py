"""Training objectives by name (``config.loss.mode``): one module per objective + a registry line.

    objective = objectives.make(config)     # an objectives.base.Objective bound to config
    objectives.validate(config)             # one-line ConfigErrors, before anything is built

A new loss is a module with an ``Objective`` subclass named ``OBJECTIVE`` and one line in
``REGISTRY`` (or ``register(name, cls)`` at run time, e.g. in a test).
"""

from __future__ import annotations

import importlib

import ml_collections

from gmail_jax.errors import ConfigError
from gmail_jax.objectives.base import Objective, Targets, temperature_of

__all__ = ["REGISTRY", "Objective", "Targets", "get", "make", "register", "temperature_of"]

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
