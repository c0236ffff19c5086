"""Crash points for the crash-safety tests: ``GMAIL_KILL_AT=<point>:<n>`` makes the process SIGKILL
itself the moment it reaches ``<point>`` for the ``n``-th time (or at step ``n``), so a kill at
the worst moment replays exactly instead of depending on the clock.

Points: training ``step`` (step n computed, nothing logged or saved), ``async_save`` (checkpoint
n issued, possibly still being written), ``checkpoint`` (checkpoint n committed); generation
``image`` (the n-th image written, its batch not yet journaled), ``batch`` (the n-th batch
journaled), ``chunk`` (chunk n's part written); experiments ``unrecorded`` (the n-th stage of
``config.stages`` ran, its record not yet written); data.prepare ``shard`` (the n-th output shard
this process wrote, with its index, not yet merged); the diffusion stage ``diffusion_step`` (step n
computed, not checkpointed). Unset (every real run): nothing happens.

``GMAIL_PAUSE_S=<seconds>`` makes every point wait that long first: a slow run, so that a notice
sent to one process reaches the others (JAX's preemption service) before a short run ends.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

KILL_AT = "GMAIL_KILL_AT"
TERM_AT = "GMAIL_TERM_AT"  # the same points, SIGTERM instead: a preemption notice (preemption.py)
PAUSE = "GMAIL_PAUSE_S"


def kill_point(point: str, n: int, before: Callable[[], object] | None = None) -> None:
  """SIGKILL this process when ``GMAIL_KILL_AT`` names ``point:n`` (after ``before()``); send it
  SIGTERM (and go on) when ``GMAIL_TERM_AT`` does."""
  here = f"{point}:{n}"
  if PAUSE in os.environ:
    time.sleep(float(os.environ[PAUSE]))
  if os.environ.get(KILL_AT) == here:
    if before is not None:
      before()
    os.kill(os.getpid(), signal.SIGKILL)
  if os.environ.get(TERM_AT) == here:
    os.kill(os.getpid(), signal.SIGTERM)
