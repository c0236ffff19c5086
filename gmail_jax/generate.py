r"""``python -m gmail_jax.generate --config=configs/generate/NAME.py --workdir=DIR``.

Captions -> generated images and DIR/manifest.parquet, exactly once, sharded and resumable
(gmail_jax/generation/runner.py says how). ``--num_shards=N --shard_index=i`` split the work
between processes (default: JAX_NUM_PROCESSES / JAX_PROCESS_ID, else SLURM_NTASKS / SLURM_PROCID).
DIR may be a bucket folder (``gs://bucket/run``): everything is written there and a rerun resumes
from there. A DIR that cannot be written stops the run in one line before any model loads.
Errors from bad input end the run with one line (``GMAIL_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from gmail_jax import cli
from gmail_jax.generation import runner

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Generation config (configs/generate/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Output folder (images, manifest): a local path or a bucket URL (gs://...)."
)
_NUM_SHARDS = flags.DEFINE_integer(
  "num_shards", None, "Processes splitting the work (default: env)."
)
_SHARD_INDEX = flags.DEFINE_integer("shard_index", None, "This process's shard in [0, num_shards).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.one_line_errors():
    runner.run(
      _CONFIG.value, _WORKDIR.value, shard_index=_SHARD_INDEX.value, num_shards=_NUM_SHARDS.value
    )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
