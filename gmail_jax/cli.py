"""What the command-line entry points share (main, evaluate, sweep, generate, prepare)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from absl import logging

from gmail_jax.errors import ConfigError, UserError
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


def resolve_shard(
  num_shards: int | None = None,
  shard_index: int | None = None,
  environ: dict[str, str] | None = None,
) -> tuple[int, int]:
  """(shard_index, num_shards) of this process for the sharded commands (generate, prepare): the
  flags, else JAX_NUM_PROCESSES/JAX_PROCESS_ID, else SLURM_NTASKS/SLURM_PROCID, else (0, 1)."""
  env = os.environ if environ is None else environ
  if num_shards is None and shard_index is None:
    for n_key, i_key in (("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"), ("SLURM_NTASKS", "SLURM_PROCID")):
      if env.get(n_key) and env.get(i_key):
        num_shards, shard_index = int(env[n_key]), int(env[i_key])
        break
    else:
      num_shards, shard_index = 1, 0
  if num_shards is None or shard_index is None:
    raise ConfigError("--num_shards and --shard_index: give both or neither")
  if not 0 <= shard_index < num_shards:
    raise ConfigError(f"--shard_index={shard_index}: must be in [0, --num_shards={num_shards})")
  return int(shard_index), int(num_shards)
