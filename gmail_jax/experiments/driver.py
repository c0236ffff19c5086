"""An experiment is a sequence of stages declared in its config (``config.stages``), run in order.

    python -m gmail_jax.main --config=configs/quickstart.py --workdir=DIR
    config.stages = ("splits", "teacher", "align", "report")

Each stage is one module of ``experiments/stages/`` plus one line in ``STAGES``; it reads its inputs
from, and writes its outputs to, the workdir, and provides:

    KEYS       config keys whose values define its outputs (None = the whole config)
    ON_CHANGE  'refuse': outputs recorded under other values of KEYS are never reused or replaced
               (a new workdir is needed); 'rerun': the stage runs again and decides itself (the
               align stage resumes from its checkpoints)
    ALL_PROCESSES  True when every process must run it: it trains, restores a checkpoint
                   (``run.load_run``: Orbax needs every process), embeds (encoders are
                   collectives: each process embeds its block of rows) or does its share
                   (generation); such a stage writes shared files from process 0 only. False:
                   process 0 runs it alone (host work: files, sklearn, a model on its own local
                   device), so it must call no collective and build no mesh over jax.devices()
    run(config, workdir, inputs) -> outputs     outputs: JSON-able dict, merged into ``inputs``
    complete(workdir, outputs) -> bool          the recorded outputs are all still there
    check(config)  (optional)                   one-line ConfigError for values the stage cannot
                                                use; the driver calls each listed stage's first

The driver records each finished stage in WORKDIR/stages/<name>.json (the values of its KEYS and
its outputs) and skips the stage when the record matches the config and ``complete`` holds.

WORKDIR may be a bucket URL (``gs://bucket/run``): stages then get an ``epath.Path`` (a local
WORKDIR stays a ``pathlib.Path``, absolute; both have pathlib's API, so never wrap it in
``pathlib.Path``, which mangles ``gs://``) and write through ``gmail_jax.storage``; recorded
outputs are ``gs://`` URLs. A WORKDIR that cannot be written stops the run in one line before any
stage builds anything (``storage.check_writable``).

Several processes (a pod, or ``--num_processes``; WORKDIR on a filesystem they all share): every
process decides to skip or run a stage from the same record, and they must agree (else one would
wait in a collective the others never join: a StageError names the stage). Process 0 alone writes
the records; after each stage every process waits for the others and takes its outputs from
process 0's record, so all of them return the same outputs.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import time
from types import ModuleType
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gmail_jax import faults, schema, storage
from gmail_jax.errors import ConfigError, InputError, StageError

STAGES: dict[str, str] = {
  "init": "gmail_jax.experiments.stages.init",
  "generate": "gmail_jax.experiments.stages.generate",
  "prepare": "gmail_jax.experiments.stages.prepare",
  "splits": "gmail_jax.experiments.stages.splits",
  "teacher": "gmail_jax.experiments.stages.teacher",
  "diffusion": "gmail_jax.experiments.stages.diffusion",
  "align": "gmail_jax.experiments.stages.align",
  "evaluate": "gmail_jax.experiments.stages.evaluate",
  "report": "gmail_jax.experiments.stages.report",
  "caption": "gmail_jax.experiments.stages.caption",
  "export": "gmail_jax.experiments.stages.export",
}
RECORDS = "stages"


def check_stages(config: ml_collections.ConfigDict) -> None:
  """config.stages: a non-empty sequence of known stage names, each once."""
  names = list(config.stages)
  unknown = [n for n in names if n not in STAGES]
  if unknown:
    raise ConfigError(f"config.stages: unknown stage {unknown[0]!r} (known: {sorted(STAGES)})")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.stages: a stage is listed twice in {names}")
  if not names:
    raise ConfigError("config.stages: empty")


def require_paths(config: ml_collections.ConfigDict, paths: dict[str, str]) -> None:
  """One-line InputError for the first of ``paths`` ({config key: path}) that does not exist,
  naming the key, the path and how to get it: ``config.downloads``, (path prefix, instructions)
  pairs, the longest matching prefix."""
  for key, path in paths.items():
    if path and not storage.path(path).exists():
      hints = [(p, how) for p, how in config.downloads if str(path).startswith(p)]
      how = max(hints, key=lambda h: len(h[0]))[1] if hints else None
      raise InputError(f"config.{key}: {path} not found" + (f"; {how}" if how else ""))


def stage(name: str) -> ModuleType:
  return importlib.import_module(STAGES[name])


def _values(config: ml_collections.ConfigDict, keys: tuple[str, ...] | None) -> dict[str, Any]:
  """{key: value} of ``keys`` (dotted) as JSON values; None = the whole config."""
  flat = json.loads(config.to_json_best_effort())
  if keys is None:
    return flat
  out = {}
  for key in keys:
    node = flat
    for part in key.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    out[key] = node
  return out


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
  keys = sorted(set(old) | set(new))
  out = []
  for k in keys:
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _changed(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}")
  return out


def workdir_path(workdir: str | os.PathLike) -> storage.Path | pathlib.Path:
  """What stages get as WORKDIR: a local folder as an absolute ``pathlib.Path``, a bucket URL as
  an ``epath.Path``."""
  if storage.is_remote(workdir):
    return storage.path(os.fspath(workdir).rstrip("/"))
  return pathlib.Path(os.path.abspath(os.fspath(workdir)))


def _record_path(workdir: storage.Path | pathlib.Path, name: str) -> storage.Path | pathlib.Path:
  return workdir / RECORDS / f"{name}.json"


def _write_record(path: storage.Path | pathlib.Path, record: dict) -> None:
  # Whole or not at all (a bucket object appears when its upload ends): a crash never leaves a
  # truncated record that would read as a finished stage.
  storage.write_text(path, json.dumps(record, indent=2, sort_keys=True))


def _run_one(
  name: str, config: ml_collections.ConfigDict, workdir: storage.Path | pathlib.Path, inputs: dict
) -> dict[str, Any]:
  mod = stage(name)
  values = _values(config, mod.KEYS)
  path = _record_path(workdir, name)
  record = json.loads(path.read_text()) if path.exists() else None
  # Every process calls ``complete`` (align's opens the checkpoints: an Orbax collective).
  skip = (
    record is not None
    and record["config"] == values
    and bool(mod.complete(workdir, record["outputs"]))
  )
  _agree(name, skip, path)
  if skip:
    logging.info("stage %s: complete, skipped (%s)", name, path)
    return record["outputs"]
  if record is not None:
    changed = _changed(record["config"], values)
    if changed and mod.ON_CHANGE == "refuse":
      raise StageError(
        f"{path}: stage {name!r} was run with other values of config.{changed[0]}"
        f" ({len(changed)} key(s) changed: {', '.join(changed[:5])}); use a new --workdir or"
        " the original config"
      )
  main = jax.process_index() == 0
  if mod.ALL_PROCESSES or main:
    t0 = time.monotonic()
    outputs = mod.run(config, workdir, inputs)
    # Crash point: the outputs are there, their record is not (the rerun must redo or adopt them).
    faults.kill_point("unrecorded", list(config.stages).index(name) + 1)
    if main:
      _write_record(path, {"config": values, "outputs": outputs})
      logging.info("stage %s: done in %.1f s (%s)", name, time.monotonic() - t0, path)
  if jax.process_count() > 1:
    # Also after a stage every process ran: no process reads a stage's files (or starts the next
    # stage's collectives) before process 0 has written them, and all return the same outputs.
    multihost_utils.sync_global_devices(f"stage {name}")
    outputs = json.loads(path.read_text())["outputs"]
  return outputs


def _agree(name: str, skip: bool, path: storage.Path | pathlib.Path) -> None:
  """StageError unless every process decided the same (to skip stage ``name`` or to run it)."""
  if jax.process_count() == 1:
    return
  votes = np.asarray(multihost_utils.process_allgather(np.int32(skip))).reshape(-1)
  if len(set(votes.tolist())) > 1:
    skipping = [i for i, v in enumerate(votes.tolist()) if v]
    raise StageError(
      f"stage {name!r}: processes {skipping} found it complete in {path} and the others did not;"
      " every process must see the same WORKDIR (a shared filesystem)"
    )


def check(config: ml_collections.ConfigDict) -> None:
  """The whole config, before any stage builds anything: the keys every part reads, the stage
  list, then each listed stage's own ``check``."""
  schema.validate(config)
  check_stages(config)
  for name in config.stages:
    stage_check = getattr(stage(name), "check", None)
    if stage_check is not None:
      stage_check(config)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs ``config.stages`` in order in ``workdir`` (a local folder or a bucket URL); returns every
  stage's outputs, merged."""
  check(config)
  workdir = workdir_path(workdir)
  storage.check_writable(workdir)  # one line, before any stage builds or compiles anything
  inputs: dict[str, Any] = {}
  for name in config.stages:
    inputs.update(_run_one(name, config, workdir, inputs))
  # On every process: what each returns (the same on all; tests compare them).
  logging.info("stages done, outputs: %s", json.dumps(inputs, sort_keys=True))
  return inputs
