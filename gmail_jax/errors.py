"""User-facing error types: what the command-line entry points end with one line (cli.py).

A ``ValueError`` raised by a bug (a shape mismatch deep in JAX) keeps its traceback; a
``UserError`` is one whose message alone tells the user what to change: a config key, a file, a
checkpoint, a stage's outputs. The subclasses are also ``ValueError``s, so callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(Exception):
  """Base: ends a command with one line (``GMAIL_TRACEBACK=1`` shows the traceback)."""


class ConfigError(UserError, ValueError):
  """A config value or key that cannot work; the message names the key (``config.a.b: ...``)."""


class InputError(UserError, ValueError):
  """A file or directory the user named is missing, unreadable or not what it should be."""


class StageError(UserError, ValueError):
  """A stage whose recorded outputs do not match the config that now asks for them."""


class ResumeError(UserError, ValueError):
  """A resume that would change what the saved state means (named keys, teacher, checkpoints)."""


def first_line(e: BaseException) -> str:
  """The first line of an exception's message, whitespace collapsed (for one-line errors)."""
  text = str(e).strip()
  return " ".join(text.splitlines()[0].split()) if text else type(e).__name__
