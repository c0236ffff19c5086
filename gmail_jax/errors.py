"""User-facing error types: what the command-line entry points end with one line (cli.py).

A ``ValueError`` raised by a bug (a shape mismatch deep in JAX) keeps its traceback; these are the
errors whose message alone tells the user what to change: a config key, a file, a checkpoint.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config value or key that cannot work; the message names the key (``config.a.b: ...``)."""


class StageError(ValueError):
  """A stage whose recorded outputs do not match the config that now asks for them."""
