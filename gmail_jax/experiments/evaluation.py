"""Evaluate a run (``python -m gmail_jax.evaluate --config=configs/NAME.py --workdir=DIR``).

Loads the run with ``run.load_run`` (the teacher exactly as training built it, the student from
DIR's latest Orbax checkpoint with LoRA merged), runs every evaluator of ``config.evals`` on the
three encoders of ``encoders.views``, and writes

  DIR/eval/metrics.json         {'step', 'encoders': {name: {metric: value}}, 'gap_reduction': ...}
  DIR/eval/tsne_gen_real.png    t-SNE of real vs generated embeddings, before/after alignment
                                (when config.evals has a gap set with generated-real pairs)
  DIR/eval/training_curves.png  from DIR/metrics.jsonl (when present)

Encoders (the evaluators.common interface):
  teacher      f_r for every image, frozen text tower              (before alignment)
  student      generated images through f_g, real images through f_r, frozen text tower
               (GMAIL Algorithm 1 inference path; what 'gen_real' gaps measure)
  student_all  f_g for every image (the documented variant, and TPC-CMA's image-text setting)
``gap_reduction[enc][eval]`` = 100·(1 − G_enc / G_teacher) per gap kind (gap evaluators only).
DIR may be a bucket URL (``gs://``): every file is read and written through ``gmail_jax.storage``.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from gmail_jax import run as run_lib
from gmail_jax import storage
from gmail_jax.errors import ConfigError
from gmail_jax.training import encoders

ENCODERS = encoders.VIEWS


def _unprefix(metrics: dict[str, float], prefix: str) -> dict[str, float]:
  return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  step: int | None = None,
  which: tuple[str, ...] = ENCODERS,
  plots: bool = True,
  tsne_points: int = 500,
) -> dict[str, Any]:
  """Runs config.evals on the run's encoders; writes and returns DIR/eval/metrics.json's dict."""
  from gmail_jax.evaluators import common, gap
  from gmail_jax.evaluators import plots as plots_lib

  unknown = [w for w in which if w not in ENCODERS]
  if unknown:
    raise ConfigError(f"--encoders: unknown {unknown}; choose from {list(ENCODERS)}")
  workdir = run_lib.resolve_dir(workdir)
  from gmail_jax.models import towers

  # Pre-cropped eval images follow the run's tower resize (evaluators that take ``resize``).
  evaluators = common.from_config(config.get("evals"), resize=towers.resize_mode(config))
  if not evaluators:
    raise ConfigError("config.evals: empty; nothing to evaluate (add e.g. a 'gap' evaluator)")
  run = run_lib.load_run(workdir, step, config=config)
  encs = run.encoders()
  results: dict[str, dict[str, float]] = {}
  with jax.set_mesh(run.mesh):
    for name in which:
      out: dict[str, float] = {}
      for ev in evaluators:
        out.update(ev.run(encs[name], run.step))
      results[name] = out

  reduction: dict[str, dict[str, dict[str, float]]] = {}
  gap_evs = [ev for ev in evaluators if isinstance(ev, gap.GapEvaluator)]
  if "teacher" in results:
    for name in (w for w in which if w != "teacher"):
      reduction[name] = {
        ev.name: gap.gap_reduction(
          _unprefix(results["teacher"], ev.prefix), _unprefix(results[name], ev.prefix)
        )
        for ev in gap_evs
      }
  report: dict[str, Any] = {
    "step": run.step,
    "workdir": workdir,
    "encoders": results,
    "gap_reduction": reduction,
    "plots": [],
  }
  out_dir = storage.join(workdir, "eval")
  gen_real = [ev for ev in gap_evs if ev.pairs in ("gen_real", "class_gen_real")]
  points = None
  if plots and gen_real:  # embedded on every process (collectives), plotted by process 0
    with jax.set_mesh(run.mesh):
      points = plots_lib.gap_tsne_points(
        gen_real[0], encs["teacher"], encs["student"], max_points=tsne_points
      )
  if jax.process_index() == 0:
    storage.makedirs(out_dir)
    if plots:
      if points is not None:
        real_t, gen_t, gen_s = points
        p = plots_lib.plot_alignment_tsne(
          storage.join(out_dir, "tsne_gen_real.png"), real_t, gen_t, real_t, gen_s
        )
        report["plots"].append(p)
      curves = storage.join(workdir, "metrics.jsonl")
      if storage.path(curves).exists():
        p = plots_lib.plot_training_curves(curves, storage.join(out_dir, "training_curves.png"))
        report["plots"].append(p)
    path = storage.join(out_dir, "metrics.json")
    storage.write_text(path, json.dumps(report, indent=2, sort_keys=True))
  return report
