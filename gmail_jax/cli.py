"""What the command-line entry points share (main, evaluate, sweep)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from absl import logging

from gmail_jax.errors import UserError
from gmail_jax.preemption import Preempted

# Bad config, input file, checkpoint, stage or resume (errors.UserError), a missing path, a NaN
# loss. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FloatingPointError)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Ends the run with one line and exit code 1 on a user-facing error, and with one line and
  exit code 0 on a preemption (SIGTERM: the state to resume from was saved).

  ``GMAIL_TRACEBACK=1`` re-raises instead, for the full traceback.
  """
  try:
    yield
  except Preempted as e:
    logging.warning("%s", e)
    print(str(e), file=sys.stderr)
    sys.exit(0)
  except USER_ERRORS as e:
    if os.environ.get("GMAIL_TRACEBACK"):
      raise
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
