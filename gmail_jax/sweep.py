r"""α_target sweep for TPC-CMA: one training run per α, then a held-out gap / accuracy table.

  python -m gmail_jax.sweep --config=configs/tpc_cma.py --alphas=0,0.05,0.2,0.5,1.0 \
      --workdir=/tmp/tpc_sweep [--arg=mode=smoke]

For each α: ``--config`` with ``alpha_target=α`` (appended to ``--arg``) runs its stages in
WORKDIR/alpha_<α> (an existing finished run is reused); the first run's 'splits' and 'teacher'
stage records are given to the others, so every α trains from the same frozen teacher on the same
split. Then each run (``run.load_run``) is measured on the held-out split (never trained on):

  pairs=image_text  x = image tower (f_g for the runs, f_r for the 'teacher' row) on the real
                    test images, y = frozen text tower on their class captions; acc = zero-shot
                    top-1 over the class captions
  pairs=gen_real    x = f_g(rendered test digit), y = f_r(real test scan of the same class, paired
                    in order); acc = nearest real-class-centroid top-1 of x

Table columns: G_C, G_D, G_raw (evaluators/gap.py), gap reduction % = 100·(1 − G_raw/G_raw^ref)
against the teacher and against the α = 0 run (contrastive only), mean paired cosine, accuracy.
Writes WORKDIR/sweep.json and WORKDIR/sweep.md and prints the table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from gmail_jax import cli, experiment
from gmail_jax import run as run_lib
from gmail_jax.data import eval_sets
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.evaluators import common, gap, zeroshot

SHARED = ("splits", "teacher")  # stages whose outputs every α run shares


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


def measure(views: dict, pairs: str, data: dict, *, student: bool, batch_size: int = 256) -> dict:
  """Gap metrics + accuracy of the teacher (student=False) or a student on held_out_pairs' data.

  image_text: the student's image path is f_g on real images (the ``student_all`` view)."""
  enc_b = lambda fn, items: common.encode_in_batches(fn, items, batch_size)
  if pairs == "image_text":
    enc = views["student_all" if student else "teacher"]
    x = enc_b(enc.encode_images, data["real"])
    class_emb = common.l2_normalize(enc_b(enc.encode_texts, data["class_captions"]))
    y = class_emb[data["real_labels"]]
    acc = zeroshot.zeroshot_accuracy(x, class_emb, data["real_labels"], ks=(1,))
    acc = next(iter(acc.values()))
  else:
    enc = views["student" if student else "teacher"]
    x = enc_b(enc.encode_generated, data["gen"])
    y = enc_b(enc.encode_images, data["paired_real"])
    real = common.l2_normalize(enc_b(enc.encode_images, data["real"]))
    cents = common.l2_normalize(
      np.stack([real[data["real_labels"] == c].mean(0) for c in range(len(data["classes"]))])
    )
    acc = float(np.mean(np.argmax(common.l2_normalize(x) @ cents.T, 1) == data["gen_labels"]))
  return {**gap.gap_metrics(x, y), "acc": float(acc)}


def _fmt_alpha(a: float) -> str:
  return f"{a:g}"


def run_sweep(
  config_spec: str,
  alphas: Sequence[float],
  workdir: str,
  *,
  extra_arg: str = "",
  max_per_class: int = 100,
) -> dict:
  """Trains every α, measures teacher + students on the held-out split; returns the table dict."""
  workdir = os.path.abspath(workdir)
  rows: list[dict[str, Any]] = []
  first: str | None = None
  teacher_row = None
  data = None
  for alpha in alphas:
    arg = ",".join(a for a in (extra_arg, f"alpha_target={alpha}") if a)
    config = load_config(config_spec, arg)
    if config.loss.mode != "tpc_cma":
      raise ConfigError(f"--config={config_spec}: loss.mode must be 'tpc_cma'")
    wd = os.path.join(workdir, f"alpha_{_fmt_alpha(alpha)}")
    if first is not None:  # the first run's split and teacher, by their stage records
      for name in SHARED:
        src = os.path.join(first, experiment.RECORDS, f"{name}.json")
        dst = os.path.join(wd, experiment.RECORDS, f"{name}.json")
        if os.path.exists(src) and not os.path.exists(dst):
          os.makedirs(os.path.dirname(dst), exist_ok=True)
          shutil.copyfile(src, dst)
    outputs = experiment.run(config, wd)
    first = first or wd
    run = run_lib.load_run(wd)
    views = run.encoders()
    with jax.set_mesh(run.mesh):
      if data is None:
        data = held_out_pairs(config, outputs["test"], max_per_class)
      if teacher_row is None:
        teacher_row = {
          "alpha": None,
          "run": "teacher",
          **measure(views, config.cma.pairs, data, student=False),
        }
      rows.append(
        {
          "alpha": float(alpha),
          "run": os.path.basename(wd),
          **measure(views, config.cma.pairs, data, student=True),
        }
      )
  base = next((r for r in rows if r["alpha"] == 0.0), None)
  for r in [teacher_row, *rows]:
    r["reduction_vs_teacher"] = gap.gap_reduction(teacher_row, r).get("raw", 0.0)
    if base is not None:
      r["reduction_vs_alpha0"] = gap.gap_reduction(base, r).get("raw", 0.0)
  table = {
    "config": config_spec,
    "extra_arg": extra_arg,
    "pairs": config.cma.pairs,
    "n_pairs": len(data["gen"]) if config.cma.pairs == "gen_real" else len(data["real"]),
    "rows": [teacher_row, *rows],
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
      json.dump(table, f, indent=2)
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
      f.write(markdown(table))
  return table


def markdown(table: dict) -> str:
  acc = "zero-shot top-1" if table["pairs"] == "image_text" else "class acc"
  lines = [
    f"TPC-CMA α sweep ({table['pairs']} pairs, {table['n_pairs']} held-out pairs)",
    "",
    f"| α_target | G_C | G_D | G_raw | Δraw vs teacher % | Δraw vs α=0 % | paired cos | {acc} |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in table["rows"]:
    a = "teacher" if r["alpha"] is None else _fmt_alpha(r["alpha"])
    d0 = r.get("reduction_vs_alpha0")
    lines.append(
      f"| {a} | {r['centroid']:.4f} | {r['distribution']:.4f} | {r['raw']:.4f} "
      f"| {r['reduction_vs_teacher']:.1f} | {'' if d0 is None else f'{d0:.1f}'} "
      f"| {r['paired_cosine']:.4f} | {r['acc']:.3f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  with cli.one_line_errors():
    alphas = [float(a) for a in f.alphas.split(",") if a.strip()]
    if not alphas:
      raise ConfigError("--alphas: empty")
    table = run_sweep(f.config, alphas, f.workdir, extra_arg=f.arg, max_per_class=f.max_per_class)
  print(markdown(table))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("config", None, "Config file path[:arg] with loss.mode='tpc_cma'.")
  flags.DEFINE_string("alphas", "0,0.05,0.2,0.5,1.0", "Comma list of alpha_target values.")
  flags.DEFINE_string("workdir", None, "Sweep directory (one sub-workdir per alpha).")
  flags.DEFINE_string("arg", "", "Extra config arg, e.g. 'mode=smoke,pairs=gen_real'.")
  flags.DEFINE_integer("max_per_class", 100, "Held-out images per class measured.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
