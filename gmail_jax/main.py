r"""Entry point: ``python -m gmail_jax.main --config=configs/NAME.py --workdir=DIR``.

Thin on purpose (flax examples): flags, multi-process init, then the config's stages
(``driver.run``: e.g. splits → teacher → align → report; plain training is ``('align',)``).
Overrides: ``--config.batch_size=64 --config.lora.rank=8``; ``configs/coco.py:L/14`` passes an arg.
Multi-process: set ``--coordinator_address/--num_processes/--process_id`` (or the JAX_COORDINATOR_
ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables); on TPU pods and SLURM the flag
``--distributed`` lets JAX auto-detect them. Errors from bad input end the run with one line
(``GMAIL_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from gmail_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pod, SLURM)."
)
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_CPU_COLLECTIVES = flags.DEFINE_string(
  "cpu_collectives", "gloo", "Cross-process collectives for CPU-only multi-process runs."
)
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout_s",
  60,
  "Several processes: a process that sends no heartbeat for this long is lost, and every other"
  " process stops (non-zero, naming it) instead of hanging in a collective.",
)
_PLATFORM = flags.DEFINE_enum(
  "platform",
  os.environ.get("GMAIL_PLATFORM", "any"),
  ["any", "cpu", "gpu", "tpu"],
  "Refuse to run unless JAX's devices are of this platform (launch scripts: gpu / tpu), so a CPU"
  " jaxlib never trains silently on the CPU. Default: $GMAIL_PLATFORM, else any.",
)
# What makes JAX use a platform (README: Installing for GPUs and TPUs).
FIX = {
  "gpu": "pip install -e '.[cuda]'",
  "tpu": "pip install -e '.[tpu]'",
  "cpu": "JAX_PLATFORMS=cpu",
}


def check_platform(expected: str, found: str) -> None:
  """One-line ConfigError when the devices JAX found are not the platform asked for."""
  if expected not in ("any", found):
    raise ConfigError(
      f"--platform={expected}: JAX runs on {found} here (the {found} jaxlib, or no {expected}"
      f" visible); fix: {FIX[expected]}"
    )


def _maybe_initialize_distributed() -> None:
  """jax.distributed.initialize when flags or JAX_* env vars ask for several processes."""
  import jax

  coord = _COORD.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = _NUM.value or os.environ.get("JAX_NUM_PROCESSES")
  pid = _PID.value if _PID.value is not None else os.environ.get("JAX_PROCESS_ID")
  if coord and num is not None and pid is not None:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    jax.distributed.initialize(
      coordinator_address=coord,
      num_processes=int(num),
      process_id=int(pid),
      heartbeat_timeout_seconds=_HEARTBEAT.value,
    )
  elif _DISTRIBUTED.value:
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _maybe_initialize_distributed()
  import jax

  from gmail_jax import cli
  from gmail_jax.experiments import driver

  with cli.one_line_errors():
    check_platform(_PLATFORM.value, jax.devices()[0].platform)
  logging.info(
    "process %d/%d, devices: %d local / %d global (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  if logging.get_verbosity() < logging.DEBUG:  # Orbax INFO: ~50 lines/save; --verbosity=1 keeps it
    logging.get_absl_logger().addFilter(lambda r: r.levelno > 20 or "/orbax/" not in r.pathname)
  with cli.one_line_errors():
    driver.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
