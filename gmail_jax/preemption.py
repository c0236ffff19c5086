"""Preemption: the SIGTERM that spot / preemptible VMs and SLURM (``--signal``) send before a kill.

Training saves a checkpoint and stops; generation finishes and journals its current batch and
stops; either way the process exits 0 with one line saying how to resume (``Preempted``), and the
rerun resumes with no step or image lost.

* One process: ``install()`` makes SIGTERM set a flag that ``requested()`` reads.
* Several processes (``jax.distributed``): JAX's preemption service owns SIGTERM (its C++ handler
  is installed by ``jax.distributed.initialize``); ``sync_point(step)`` is its agreement protocol,
  True on every process at the same step once any process got the notice.
"""

from __future__ import annotations

import signal
import threading

_notice = threading.Event()


class Preempted(Exception):  # noqa: N818 (a stop, not an error: the command exits 0)
  """Raised at a safe point after SIGTERM; the message says where to resume."""


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _notice.set()


def install() -> None:
  """SIGTERM sets the notice instead of killing the process (call from the main thread)."""
  signal.signal(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
  """Whether this process got SIGTERM since ``install()``."""
  return _notice.is_set()


def distributed() -> bool:
  """Whether JAX's distributed runtime (and so its preemption service) is up."""
  from jax._src import distributed as jax_distributed

  return jax_distributed.global_state.client is not None


def sync_point(step: int) -> bool:
  """True on every process at the same ``step`` once any of them was told to stop. Call it at
  every step, on every process, from the same first step (JAX's contract)."""
  if distributed():
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)
  return requested()
