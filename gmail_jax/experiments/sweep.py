"""α_target sweep for TPC-CMA: one training run per α and seed, then held-out gaps, task metrics,
their R² and a figure.

  python -m gmail_jax.sweep --config=configs/tpc_cma.py --alphas=0,0.05,0.2,0.5,1.0 \
      --seeds=0,1,2 --workdir=/tmp/tpc_sweep [--arg=mode=smoke,pairs=gen_real]

For each seed S and α: ``--config`` with ``alpha_target=α`` (appended to ``--arg``) and
``config.seed = S`` runs its stages in WORKDIR/seed_S/alpha_<α> (without ``--seeds``: the config's
own seed, in WORKDIR/alpha_<α>); an existing finished run is reused. The seed's first run's
'splits' and 'teacher' stage records are given to its other runs, so every α of a seed trains from
the same frozen teacher on the same split. Then each run (``run.load_run``) is measured on the
held-out split (never trained on):

  pairs=image_text  x = image tower (f_g for the runs, f_r for the 'teacher' row) on the real
                    test images, y = frozen text tower on their class captions.
                    Tasks: zeroshot_top1 over the class captions; joint_ari (k-means on x ∪ y,
                    k = #classes, evaluators/clustering.py); probe_acc (a linear probe fitted on
                    the even-indexed x, tested on the odd: how discriminative the images stay);
                    decap_cider (DeCap, captioning/decap.py, trained on the text embeddings of
                    the class captions only, fed x directly: CIDEr-D against the class's
                    captions); decap_proj_cider (the same decoder fed x projected onto the
                    caption memory, softmax(cos/0.01): nearest-caption retrieval over the
                    reference captions, not an independent captioning task — labelled
                    "(retrieval)" in sweep.md and left out of ``independent_task_metrics``)
  pairs=gen_real    x = f_g(rendered test digit), y = f_r(real test scan of the same class, paired
                    in order). Tasks: class_acc (nearest real-class-centroid top-1 of x);
                    joint_ari of x ∪ y; transfer_acc (GMAIL's: a probe fitted on x, tested on
                    f_r of every held-out real image, evaluators/probe.py)
Retrieval is not measured: the held-out sets have one caption per class, where image→text R@1
is zeroshot_top1.

WORKDIR/sweep.json: ``rows`` — one per checkpoint (a teacher row per seed, then each α): run,
seed, alpha_target (None = teacher), form, nce, temperature_from, learn_temperature, the
temperature it trained with and its logit_scale = 1/τ (the teacher row: its own), every gap of
evaluators/gap.py (raw, centroid, distribution, frechet, frechet_distribution, paired_cosine),
the task metrics, and gap reductions % = 100·(1 − G/G_ref) per gap against the seed's teacher
(``reduction_vs_teacher``) and against the seed's α = 0 run, trained under the same temperature
setting (``reduction_vs_alpha0``); ``summary`` — mean ± std (sample std) over seeds per α;
``stats`` — {gap: {task: {...}}} (evaluators/regression.py::sweep_stats), per (gap, task) over the
rows that have both values:

  r2               R² of the OLS line task = a + b·gap over the per-setting seed means: one point
                   for the teacher rows' mean, one per α (n_points of them) — the headline
  bootstrap_ci95   [lo, hi]: 95 % percentile interval of r2 over ``stats_bootstrap.resamples``
                   resamples of the seeds with replacement (numpy seed ``stats_bootstrap.rng_seed``;
                   per-α means recomputed each time); bootstrap_valid: resamples with a defined R²
  within_seed_r2   {mean, std, n, per_seed: {seed: R²}}: R² over each seed's own rows
  spearman         Spearman's ρ over the same per-setting means
  pooled_r2        R² over all rows in one fit (the earlier ``r2``: mixes between-seed variance
                   with the α effect, and the teacher rows have high leverage)
  n_points, n_seeds, n_rows

``r2`` — {gap: {task: stats[gap][task].r2}}, the headline alone; ``task_notes`` — {task: why it is
not an independent task}; ``independent_task_metrics`` — task_metrics less those. ``add_stats`` /
``stats_from_sweep_json`` re-derive stats, r2 and the notes from a sweep.json's rows.
Also WORKDIR/sweep.md (the tables, ``markdown``) and WORKDIR/sweep_r2.png
(plots.plot_task_vs_gap); each is rendered in memory and written whole (``storage.write_*``: a
temporary file renamed over the old one, or one upload when WORKDIR is a ``gs://`` URL).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from gmail_jax import objectives, storage
from gmail_jax import run as run_lib
from gmail_jax.data import eval_sets
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.evaluators import clustering, common, gap, plots, probe, regression, zeroshot
from gmail_jax.experiments import driver

SHARED = ("splits", "teacher")  # stages whose outputs every α run of a seed shares
GAPS = (*gap.GAP_KEYS, "paired_cosine")
TASKS = {
  "image_text": ("zeroshot_top1", "joint_ari", "probe_acc", "decap_cider", "decap_proj_cider"),
  "gen_real": ("class_acc", "joint_ari", "transfer_acc"),
}
# Task metrics that are not independent tasks: reported (under their row key), labelled, and left
# out of every count of tasks.
TASK_KINDS = {"decap_proj_cider": "retrieval"}
TASK_NOTES = {
  "decap_proj_cider": (
    "DeCap fed each image embedding projected onto the reference captions' text embeddings,"
    " softmax(cos/0.01)-weighted — nearest-caption retrieval at τ = 0.01 over the reference"
    " captions, not an independent captioning task"
  ),
}


def load_config(spec: str, extra_arg: str) -> ml_collections.ConfigDict:
  """``path/to/config.py[:arg]`` + ``extra_arg`` -> the module's get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config: no such file {path}")
  module_spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(",".join(a for a in (arg, extra_arg) if a) or None)


def held_out_pairs(
  config: ml_collections.ConfigDict, test_root: str, max_per_class: int
) -> dict[str, Any]:
  """Images / captions / labels of the held-out split for config.cma.pairs (see module doc)."""
  real = eval_sets.load_class_set(os.path.join(test_root, "real"), per_class=max_per_class)
  names = [c.replace("_", " ") for c in real.classnames]
  captions = [config.data.caption_template.format(**{"class": n}) for n in names]
  out = {"classes": names, "class_captions": captions, "real": real.images}
  out["caption_set"], out["seed"] = class_caption_set(config, names), int(config.seed)
  out["real_labels"] = real.labels
  if config.cma.pairs == "gen_real":
    gen = eval_sets.load_class_set(os.path.join(test_root, "generated"), per_class=max_per_class)
    if gen.classnames != real.classnames:
      raise InputError(f"{test_root}: generated/ and real/ class folders differ")
    # Pair the k-th generated with the k-th real image of the same class.
    gi, ri = gap.class_pairs(gen.labels, real.labels)
    out["gen"] = [gen.images[i] for i in gi]
    out["gen_labels"] = gen.labels[gi]
    out["paired_real"] = [real.images[i] for i in ri]
  return out


# DeCap (captioning/decap.py: 4 layers, 4 heads, label smoothing 0.1) sized for the held-out sets
# here: a few dozen class captions, so a narrow decoder trained for many epochs.
DECAP = {"lm_width": 64, "lr": 1e-3, "warmup_steps": 20, "steps": 300, "batch_size": 64}


def class_caption_set(config: ml_collections.ConfigDict, names: Sequence[str]) -> list[list[str]]:
  """Per class, its captions: the teacher's pretraining templates (else the data's template)."""
  templates = tuple(config.teacher_pretrain.templates) or (config.data.caption_template,)
  return [[t.format(name=n, **{"class": n}) for t in templates] for n in names]


def decap_cider(
  enc,
  x: np.ndarray,
  labels: np.ndarray,
  refs: list[list[str]],
  seed: int,
  steps: int,
  decoders: dict,
) -> dict:
  """TPC-CMA's interchangeability measure: a DeCap decoder trained on the text embeddings of the
  class captions only, fed the image embeddings x directly (decap_cider) and projected onto the
  caption memory (decap_proj_cider); CIDEr-D against the image's class captions."""
  from gmail_jax.captioning import decap
  from gmail_jax.evaluators.captioning import caption_metrics

  captions = [c for r in refs for c in r]
  text = common.l2_normalize(common.encode_in_batches(enc.encode_texts, captions, 256))
  # The text tower is frozen in every run of a seed, so their decoders would be identical: one is
  # trained per distinct text embeddings (``decoders``: the seed's) and reused.
  key = hashlib.sha256(np.ascontiguousarray(text, np.float32).tobytes()).hexdigest()
  if key not in decoders:
    decoders[key] = decap.train(
      decap.settings({**DECAP, "seed": seed, "steps": steps}), text, captions
    )
  trained = decoders[key]
  references = {i: refs[int(y)] for i, y in enumerate(labels)}
  out = {}
  for key, feats in (("decap_cider", x), ("decap_proj_cider", decap.project(x, text))):
    got = dict(enumerate(trained.caption(feats)))
    scores = caption_metrics(got, references, tokenize="python", meteor=False, spice=False)
    out[key] = scores["CIDEr"]
  return out


def measure(views: dict, pairs: str, data: dict, *, student: bool, batch_size: int = 256) -> dict:
  """Gap metrics + task metrics (TASKS[pairs]) of the teacher (student=False) or a student on
  held_out_pairs' data. image_text: the student's image path is f_g on real images
  (the ``student_all`` view)."""
  enc_b = lambda fn, items: common.encode_in_batches(fn, items, batch_size)
  k = len(data["classes"])
  if pairs == "image_text":
    enc = views["student_all" if student else "teacher"]
    x = common.l2_normalize(enc_b(enc.encode_images, data["real"]))
    class_emb = common.l2_normalize(enc_b(enc.encode_texts, data["class_captions"]))
    labels = np.asarray(data["real_labels"])
    y = class_emb[labels]
    acc = zeroshot.zeroshot_accuracy(x, class_emb, labels, ks=(1,))
    even, odd = slice(0, None, 2), slice(1, None, 2)
    tasks = {
      "zeroshot_top1": float(next(iter(acc.values()))),
      "joint_ari": clustering.joint_ari(x, y, labels, k),
      "probe_acc": probe.probe_accuracy(x[even], labels[even], x[odd], labels[odd]),
      **(
        decap_cider(
          enc, x, labels, data["caption_set"], data["seed"], data["decap_steps"], data["decoders"]
        )
        if data["decap_steps"] > 0
        else {}
      ),
    }
  else:
    enc = views["student" if student else "teacher"]
    x = common.l2_normalize(enc_b(enc.encode_generated, data["gen"]))
    y = enc_b(enc.encode_images, data["paired_real"])
    real = common.l2_normalize(enc_b(enc.encode_images, data["real"]))
    real_labels, labels = np.asarray(data["real_labels"]), np.asarray(data["gen_labels"])
    cents = common.l2_normalize(np.stack([real[real_labels == c].mean(0) for c in range(k)]))
    tasks = {
      "class_acc": float(np.mean(np.argmax(x @ cents.T, 1) == labels)),
      "joint_ari": clustering.joint_ari(x, y, labels, k),
      "transfer_acc": probe.probe_accuracy(x, labels, real, real_labels),
    }
  return {**gap.gap_metrics(x, y), **tasks}


def trained_with(run: run_lib.Run, *, student: bool) -> dict[str, Any]:
  """What a row's checkpoint trained with: the objective's settings and its InfoNCE τ (the teacher
  row: the teacher's own learned CLIP scale)."""
  config = run.config
  teacher_scale = float(np.exp(np.asarray(run.teacher.logit_scale[...], np.float64)))
  if not student:
    return {"temperature": 1.0 / teacher_scale, "logit_scale": teacher_scale}
  tau = objectives.trained_temperature(config, run.state["params"], teacher_scale)
  return {
    "form": config.cma.form,
    "nce": config.cma.nce,
    "temperature_from": objectives.get(config.loss.mode).temperature_from(config),
    "learn_temperature": bool(config.loss.learn_temperature),
    "temperature": tau,
    "logit_scale": 1.0 / tau,
  }


def _fmt_alpha(a: float) -> str:
  return f"{a:g}"


def _share_stages(first: str, wd: str) -> None:
  """Copies the first run's split / teacher stage records into ``wd`` (so its stages reuse them)."""
  for name in SHARED:
    src = storage.path(first) / driver.RECORDS / f"{name}.json"
    dst = storage.path(wd) / driver.RECORDS / f"{name}.json"
    if src.exists() and not dst.exists():
      storage.write_bytes(dst, src.read_bytes())


def _sweep_seed(
  config_spec: str,
  alphas: Sequence[float],
  root: str,
  seed: int | None,
  extra_arg: str,
  max_per_class: int,
  decap_steps: int,
) -> tuple[list[dict], ml_collections.ConfigDict, dict]:
  """Teacher row + one row per α for one seed (runs trained in root/alpha_<α>)."""
  rows: list[dict[str, Any]] = []
  first: str | None = None
  data = config = None
  for alpha in alphas:
    arg = ",".join(a for a in (extra_arg, f"alpha_target={alpha}") if a)
    config = load_config(config_spec, arg)
    if config.loss.mode != "tpc_cma":
      raise ConfigError(f"--config={config_spec}: loss.mode must be 'tpc_cma'")
    if seed is not None:
      config.seed = seed
    wd = storage.join(root, f"alpha_{_fmt_alpha(alpha)}")
    if first is not None:  # the seed's first run's split and teacher, by their stage records
      _share_stages(first, wd)
    outputs = driver.run(config, wd)
    first = first or wd
    run = run_lib.load_run(wd)
    views = run.encoders()
    pairs = config.cma.pairs
    if data is None:
      # The split's class folders (a gs:// WORKDIR's: read from a local copy).
      test_root = os.fspath(storage.fetch_dir(outputs["test"]))
      data = held_out_pairs(config, test_root, max_per_class)
      data["decap_steps"], data["decoders"] = decap_steps, {}
      rows.append(
        {
          "run": "teacher",
          "seed": int(config.seed),
          "alpha_target": None,
          **trained_with(run, student=False),
          **measure(views, pairs, data, student=False),
        }
      )
    rows.append(
      {
        "run": os.path.relpath(wd, os.path.dirname(root) if seed is not None else root),
        "seed": int(config.seed),
        "alpha_target": float(alpha),
        **trained_with(run, student=True),
        **measure(views, pairs, data, student=True),
      }
    )
  teacher = rows[0]
  base = next((r for r in rows if r["alpha_target"] == 0.0), None)
  for r in rows:
    r["reduction_vs_teacher"] = gap.gap_reduction(teacher, r)
    r["reduction_vs_alpha0"] = gap.gap_reduction(base, r) if base is not None else None
  return rows, config, data


def summarize(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
  """Per alpha_target (None = teacher, first): n, and {key: {mean, std}} over the seeds (sample
  std, 0 for one seed); reductions as 'reduction_vs_<ref>/<gap>'."""
  order: list[Any] = []
  for r in rows:
    if r["alpha_target"] not in order:
      order.append(r["alpha_target"])
  out = []
  for a in order:
    group = [r for r in rows if r["alpha_target"] == a]
    flat = [
      {
        **{k: r.get(k) for k in keys},
        **{
          f"{ref}/{g}": (r.get(ref) or {}).get(g)
          for ref in ("reduction_vs_teacher", "reduction_vs_alpha0")
          for g in GAPS
        },
      }
      for r in group
    ]
    stats = {}
    for k in flat[0]:
      vals = np.array([f[k] for f in flat if f[k] is not None], np.float64)
      if vals.size:
        std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        stats[k] = {"mean": float(vals.mean()), "std": std}
    out.append({"alpha_target": a, "n": len(group), **stats})
  return out


def run_sweep(
  config_spec: str,
  alphas: Sequence[float],
  workdir: str,
  *,
  extra_arg: str = "",
  max_per_class: int = 100,
  seeds: Sequence[int] | None = None,
  decap_steps: int = DECAP["steps"],
) -> dict:
  """Trains every (seed, α), measures teacher + students on the held-out split; writes and
  returns the sweep dict (module docstring). seeds=None: the config's seed in WORKDIR/alpha_<α>."""
  workdir = run_lib.resolve_dir(workdir)
  rows: list[dict[str, Any]] = []
  config = data = None
  for seed in seeds if seeds else [None]:
    root = workdir if seed is None else storage.join(workdir, f"seed_{seed}")
    seed_rows, config, data = _sweep_seed(
      config_spec, alphas, root, seed, extra_arg, max_per_class, decap_steps
    )
    rows.extend(seed_rows)
  pairs = config.cma.pairs
  tasks = tuple(t for t in TASKS[pairs] if decap_steps > 0 or not t.startswith("decap_"))
  table = add_stats(
    {
      "config": config_spec,
      "extra_arg": extra_arg,
      "pairs": pairs,
      "form": config.cma.form,
      "nce": config.cma.nce,
      "seeds": [r["seed"] for r in rows if r["alpha_target"] is None],
      "alphas": [float(a) for a in alphas],
      "n_pairs": len(data["gen"]) if pairs == "gen_real" else len(data["real"]),
      "gap_metrics": list(GAPS),
      "task_metrics": list(tasks),
      "rows": rows,
      "summary": summarize(rows, (*GAPS, *tasks, "temperature", "logit_scale")),
    }
  )
  if jax.process_index() == 0:
    write_outputs(table, workdir)
  return table


def task_label(task: str) -> str:
  """A task metric's name in tables and figures: ``decap_proj_cider (retrieval)`` for the
  TASK_KINDS ones (their row key stays the bare name)."""
  return f"{task} ({TASK_KINDS[task]})" if task in TASK_KINDS else task


def independent_tasks(tasks: Sequence[str]) -> list[str]:
  """``tasks`` less those that are not independent tasks (TASK_NOTES): what any count of tasks
  counts."""
  return [t for t in tasks if t not in TASK_NOTES]


def add_stats(
  table: dict,
  *,
  n_resamples: int = regression.BOOTSTRAP_RESAMPLES,
  rng_seed: int = regression.BOOTSTRAP_SEED,
) -> dict:
  """``table`` (a sweep dict: ``rows``, and ``gap_metrics`` / ``task_metrics``, else GAPS / every
  known task the rows have) with ``stats``, ``r2``, ``stats_bootstrap``, ``task_notes`` and
  ``independent_task_metrics`` computed from its rows (module docstring)."""
  rows = table["rows"]
  known_tasks = dict.fromkeys(t for ts in TASKS.values() for t in ts)
  gaps = table.get("gap_metrics") or [g for g in GAPS if any(g in r for r in rows)]
  tasks = table.get("task_metrics") or [t for t in known_tasks if any(t in r for r in rows)]
  stats = regression.sweep_stats(rows, gaps, tasks, n_resamples=n_resamples, rng_seed=rng_seed)
  return {
    **table,
    "gap_metrics": list(gaps),
    "task_metrics": list(tasks),
    "independent_task_metrics": independent_tasks(tasks),
    "task_notes": {t: TASK_NOTES[t] for t in tasks if t in TASK_NOTES},
    "stats_bootstrap": {"resamples": n_resamples, "rng_seed": rng_seed},
    "stats": stats,
    "r2": {g: {t: cell["r2"] for t, cell in by_task.items()} for g, by_task in stats.items()},
  }


def stats_from_sweep_json(path: str, **kw: Any) -> dict:
  """The table of an existing sweep.json with its statistics re-derived from its ``rows``
  (``add_stats``; kw: n_resamples, rng_seed): for files written before ``stats`` existed, or to
  check one. ``markdown`` of the result prints its tables."""
  return add_stats(json.loads(storage.path(path).read_text()), **kw)


def write_outputs(table: dict, workdir: str, *, plot: bool = True) -> None:
  """WORKDIR/sweep.json, sweep.md and (plot) sweep_r2.png of a sweep table, each whole or not at
  all (a crash mid-write leaves the previous file as it was)."""
  text = markdown(table)  # before any write: a table that cannot be printed changes no file
  buf = io.StringIO()
  json.dump(table, buf, indent=2)  # in memory first: a failure here writes nothing
  storage.write_text(storage.join(workdir, "sweep.json"), buf.getvalue(), durable=True)
  storage.write_text(storage.join(workdir, "sweep.md"), text, durable=True)
  if plot:
    tasks = table["task_metrics"]
    plots.plot_task_vs_gap(
      table["rows"],
      table["gap_metrics"],
      tasks,
      storage.join(workdir, "sweep_r2.png"),
      task_labels=[task_label(t) for t in tasks],
    )


def _pm(stats: dict, key: str, fmt: str) -> str:
  s = stats.get(key)
  if s is None:
    return ""
  return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}" if stats["n"] > 1 else f"{s['mean']:{fmt}}"


def _num(x: float | None, fmt: str = ".3f") -> str:
  return "nan" if x is None or math.isnan(x) else f"{x:{fmt}}"


def markdown(table: dict) -> str:
  """sweep.md: the per-α summary (mean ± std over seeds), then per gap × task the headline R² over
  the per-setting means with its seed-bootstrap interval, the within-seed R², Spearman's ρ and the
  pooled R² (``stats``; a cell over fewer points than the others says its n), then the task
  notes."""
  tasks = table["task_metrics"]
  labels = [task_label(t) for t in tasks]
  independent = independent_tasks(tasks)
  seeds = table.get("seeds") or sorted({r.get("seed") for r in table["rows"]}, key=str)
  lines = [
    f"TPC-CMA α sweep ({table['pairs']} pairs, {table['n_pairs']} held-out pairs, form="
    f"{table['form']}, nce={table['nce']}, seeds {seeds}: mean ± sample std over {len(seeds)})",
    "",
    "| α_target | τ | G_C | G_D | G_raw | Δraw vs teacher % | Δraw vs α=0 % | ΔG_D vs α=0 % "
    "| paired cos | " + " | ".join(labels) + " |",
    "|---" * (9 + len(tasks)) + "|",
  ]
  for s in table["summary"]:
    a = "teacher" if s["alpha_target"] is None else _fmt_alpha(s["alpha_target"])
    cells = [
      a,
      _pm(s, "temperature", ".4f"),
      _pm(s, "centroid", ".4f"),
      _pm(s, "distribution", ".4f"),
      _pm(s, "raw", ".4f"),
      _pm(s, "reduction_vs_teacher/raw", ".1f"),
      _pm(s, "reduction_vs_alpha0/raw", ".1f"),
      _pm(s, "reduction_vs_alpha0/distribution", ".1f"),
      _pm(s, "paired_cosine", ".4f"),
      *(_pm(s, t, ".3f") for t in tasks),
    ]
    lines.append("| " + " | ".join(cells) + " |")

  stats = table["stats"]
  all_cells = [c for by_task in stats.values() for c in by_task.values()]
  n_points = max((c["n_points"] for c in all_cells), default=0)
  n_seeds = max((c["n_seeds"] for c in all_cells), default=0)
  n_rows = max((c["n_rows"] for c in all_cells), default=0)
  resamples = table.get("stats_bootstrap", {}).get("resamples", regression.BOOTSTRAP_RESAMPLES)

  def grid(title: str, cell: Callable[[dict], str]) -> None:
    lines.extend(["", title, "", "| gap | " + " | ".join(labels) + " |"])
    lines.append("|---" * (1 + len(tasks)) + "|")
    for g, by_task in stats.items():
      lines.append(f"| {g} | " + " | ".join(cell(by_task[t]) for t in tasks) + " |")

  def n_note(n: int, common: int) -> str:  # a cell over fewer points than the others says so
    return f" (n={n})" if n != common else ""

  def with_ci(c: dict) -> str:
    lo, hi = c["bootstrap_ci95"]
    ci = f" [{_num(lo)}, {_num(hi)}]" if not math.isnan(lo) else ""
    return _num(c["r2"]) + ci + n_note(c["n_points"], n_points)

  def within(c: dict) -> str:
    w = c["within_seed_r2"]
    return (
      _num(w["mean"]) + (f" ± {_num(w['std'])}" if w["n"] > 1 else "") + n_note(w["n"], n_seeds)
    )

  grid(
    f"R² of the OLS line task = a + b·gap over the per-setting seed means (the headline `r2`: n ="
    f" {n_points} points, the teacher rows' mean and each α's, each over up to {n_seeds} seeds)"
    f" [95 % bootstrap interval, {resamples} resamples of the seeds]:",
    with_ci,
  )
  grid(
    f"Within-seed R² (each seed's own teacher + α rows), mean ± std over {n_seeds} seeds:", within
  )
  grid(
    f"Spearman ρ over the same {n_points} per-setting means:",
    lambda c: _num(c["spearman"]) + n_note(c["n_points"], n_points),
  )
  grid(
    f"Pooled R² over all {n_rows} rows in one fit (the earlier headline; it mixes between-seed"
    " variance with the α effect, and the teacher rows have high leverage):",
    lambda c: _num(c["pooled_r2"]) + n_note(c["n_rows"], n_rows),
  )
  lines += ["", f"Independent task metrics ({len(independent)}): " + ", ".join(independent) + "."]
  for t in tasks:
    if t in TASK_NOTES:
      lines += [
        "",
        f"{task_label(t)}: {TASK_NOTES[t]}; not counted among the independent task metrics"
        f" (row key `{t}`).",
      ]
  return "\n".join(lines) + "\n"
