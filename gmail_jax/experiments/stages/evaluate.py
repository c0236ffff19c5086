"""Stage 'evaluate': every evaluator of ``config.evals`` on the trained run (as gmail_jax.evaluate).

Reads the align stage's run in WORKDIR (``run.load_run``: teacher, student with LoRA merged) and
writes WORKDIR/eval/metrics.json (per encoder teacher / student / student_all: retrieval recall@K
in both directions, zero-shot top-1/5, gaps, ...) and its plots (experiments/evaluation.py).
Before anything is built, every dataset the evaluators read must exist (``check``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from gmail_jax import storage
from gmail_jax.errors import ConfigError
from gmail_jax.evaluators import common
from gmail_jax.experiments import driver, evaluation

KEYS = None  # the whole config: the run's and the evaluators'
ON_CHANGE = "rerun"
ALL_PROCESSES = True  # load_run restores on every process; process 0 writes


def check(config: ml_collections.ConfigDict) -> None:
  if not config.evals:
    raise ConfigError("config.evals: empty; the evaluate stage needs at least one evaluator")
  paths = {
    f"evals.{name}.{key}": cfg[key]
    for name, cfg in config.evals.items()
    for key in common.PATH_KEYS
    if cfg.get(key)
  }
  driver.require_paths(config, paths)


def metrics_path(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "eval" / "metrics.json"


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  path = storage.path(outputs["metrics"])
  return path.is_file() and json.loads(path.read_text())["step"] == outputs["step"]


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  from gmail_jax.experiments.stages import align

  report = evaluation.evaluate(align.stage_config(config, inputs), str(workdir))
  return {"metrics": str(metrics_path(workdir)), "step": int(report["step"])}
