"""Reports of the small reproductions: the report.json layout, Markdown, mean ± std over seeds.

The report stage (experiments/stages/report.py) measures every number with the evaluators that
``gmail_jax.evaluate`` runs and writes WORKDIR/report.json:

    before     teacher f_r on both paths           gap fields + transfer_accuracy
    after      GMAIL: f_g on generated, f_r real   gap fields + transfer_accuracy, trainable_params,
                                                   lora_targets
    baselines  teacher_direct, real_upper (probe trained on real), synthetic_finetune ("fine-tune
               on generated as if real", GMAIL Table 9: the same LoRA targets, rank and budget as
               GMAIL; trainable_params, lora_targets), real_real_reference (two real images of a
               class under f_r)
    variants   after_student_real: f_g on both paths (paper §3.2)
    generator  (after a 'diffusion' stage) accuracy, per_class, real_accuracy, ...: a real-image
               probe on the generated images (evaluators/generator.py)

Gap fields: paired_cosine, raw_gap, centroid_gap, distribution_gap (evaluators/gap.py, held-out
pairs matched by class); transfer_accuracy: linear probe fitted on generated train-split embeddings,
tested on held-out real ones (evaluators/probe.py).

``aggregate_workdirs`` (``python -m gmail_jax.report --aggregate DIR1 DIR2 ... [--out FILE]``):
mean ± std (sample std, ddof=1) of every number over runs (seeds) as a Markdown table and JSON;
``--file eval/captioning.json`` does the same for the caption stage's metrics (one row per
encoder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from gmail_jax import storage

GAP_FIELDS = ("paired_cosine", "raw_gap", "centroid_gap", "distribution_gap")
STAGE_FIELDS = GAP_FIELDS + ("transfer_accuracy",)
# gap evaluator key -> report key
GAP_NAMES = {
  "paired_cosine": "paired_cosine",
  "raw": "raw_gap",
  "centroid": "centroid_gap",
  "distribution": "distribution_gap",
}


def gap_fields(metrics: dict[str, float]) -> dict[str, float]:
  """The report's names for an (unprefixed) gap evaluator result."""
  return {name: float(metrics[key]) for key, name in GAP_NAMES.items()}


def markdown(report: dict, title: str = "GMAIL small-scale reproduction") -> str:
  """A readable Markdown table of report.json (values or 'mean ± std' strings)."""

  def fmt(v):
    if isinstance(v, dict) and "mean" in v:
      return f"{v['mean']:.3f} ± {v['std']:.3f}"
    return f"{v:.3f}" if isinstance(v, float | int) else "–"

  rows = [
    ("teacher f_r on both (before alignment)", report["before"]),
    ("GMAIL: f_g on generated, f_r on real (after)", report["after"]),
  ]
  b = report.get("baselines", {})
  if "synthetic_finetune" in b:
    rows.append(
      ("fine-tune on generated as if real (Table 9 'Synthetic')", b["synthetic_finetune"])
    )
  v = report.get("variants", {})
  if "after_student_real" in v:
    rows.append(("variant: f_g on both (§3.2 path)", v["after_student_real"]))
  if "real_real_reference" in b:
    rows.append(("reference: two real images of a class, f_r", b["real_real_reference"]))
  if "real_upper" in b:
    rows.append(("upper reference: probe trained on real", b["real_upper"]))
  lines = [
    f"# {title}",
    "",
    "Gaps: held-out (generated, real) pairs matched by class. Transfer: linear probe trained on",
    "generated train-split embeddings, tested on held-out real images.",
    "",
    "| encoder | paired cos ↑ | raw gap ↓ | centroid gap ↓ | distrib. gap ↓ | transfer acc ↑ |",
    "|---|---|---|---|---|---|",
  ]
  for name, r in rows:
    lines.append(f"| {name} | " + " | ".join(fmt(r.get(k)) for k in STAGE_FIELDS) + " |")
  extra = {
    k: report[k] for k in ("teacher_zeroshot_real", "teacher_zeroshot_generated") if k in report
  }
  if extra:
    lines += [
      "",
      "Teacher zero-shot accuracy (class prompts): "
      + ", ".join(f"{k.split('_')[-1]} {fmt(val)}" for k, val in extra.items()),
    ]
  gen = report.get("generator")  # stage 'diffusion': the generator's own numbers
  if gen:
    per_class = ", ".join(f"{k} {fmt(v)}" for k, v in gen.get("per_class", {}).items())
    lines += [
      "",
      "Generator: a probe on f_r of the real train images labels the held-out generated images"
      f" {fmt(gen.get('accuracy'))} (train-split generated {fmt(gen.get('train_split_accuracy'))},"
      f" held-out images of its training data {fmt(gen.get('source_accuracy'))}, held-out real"
      f" {fmt(gen.get('real_accuracy'))}); per class: {per_class}.",
    ]
  for key in ("test_pairs", "seeds", "runs"):
    if key in report:
      val = report[key]
      val = int(val["mean"]) if isinstance(val, dict) and "mean" in val else val
      lines.append(f"\n{key}: {val}")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds.
# ---------------------------------------------------------------------------------------------


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_numbers(v, key + "/"))
    elif isinstance(v, float | int) and not isinstance(v, bool):
      out[key] = float(v)
  return out


def aggregate(reports: Sequence[dict]) -> dict:
  """Mean and sample std (ddof=1; 0 for a single run) of every shared number, nested like input."""
  flat = [_numbers(r) for r in reports]
  keys = [k for k in flat[0] if all(k in f for f in flat)]
  out: dict = {}
  for k in keys:
    vals = np.asarray([f[k] for f in flat])
    node = out
    parts = k.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = {
      "mean": float(vals.mean()),
      "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
      "values": vals.tolist(),
    }
  out["runs"] = len(reports)
  out["seeds"] = [r.get("seed") for r in reports]
  return out


def captioning_markdown(agg: dict, title: str) -> str:
  """Rows = encoders of eval/captioning.json, columns = their caption metrics (mean ± std)."""
  views = [v for v in agg if isinstance(agg[v], dict) and "metrics" in agg[v]]
  keys = [k for k in agg[views[0]]["metrics"]] if views else []
  lines = [
    f"# {title}",
    "",
    "| encoder | " + " | ".join(keys) + " |",
    "|---" * (len(keys) + 1) + "|",
  ]
  for v in views:
    m = agg[v]["metrics"]
    cells = [f"{m[k]['mean']:.3f}±{m[k]['std']:.3f}" if k in m else "" for k in keys]
    lines.append(f"| {v} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def aggregate_workdirs(workdirs: Sequence[str], file: str = "report.json") -> tuple[dict, str]:
  """(mean ± std of every number of WORKDIR/``file`` over ``workdirs``, its Markdown table)."""
  reports = []
  for d in workdirs:
    path = storage.path(d) / file  # a local folder or a bucket URL
    if not path.exists():
      raise FileNotFoundError(f"{path} not found (did the run finish?)")
    reports.append(json.loads(path.read_text()))
  agg = aggregate(reports)
  if file == "report.json":
    md = markdown(agg, f"GMAIL small-scale reproduction, {len(reports)} runs (mean ± std)")
  else:
    md = captioning_markdown(agg, f"{file}, {len(reports)} runs (mean ± std)")
  return agg, md
