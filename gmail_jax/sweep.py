r"""α_target sweep for TPC-CMA: one training run per α, then a held-out gap / accuracy table.

  python -m gmail_jax.sweep --config=configs/tpc_cma.py --alphas=0,0.05,0.2,0.5,1.0 \
      --workdir=/tmp/tpc_sweep [--arg=mode=smoke]

For each α: ``--config`` with ``alpha_target=α`` (appended to ``--arg``) is trained in
WORKDIR/alpha_<α> (an existing finished run is reused); the quickstart teacher and data split of the
first run are copied into the others, so every α starts from the same frozen teacher. Then each run
is measured on the held-out split WORKDIR/alpha_<α>/data/test (never trained on):

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

from gmail_jax import cli, evaluate, train
from gmail_jax.evaluators import common, gap, zeroshot

SHARED = ("data", "teacher")  # per-workdir artefacts every α run shares (quickstart stages)


def load_config(spec: str, extra_arg: str) -> ml_collections.ConfigDict:
  """``path/to/config.py[:arg]`` + ``extra_arg`` -> the module's get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config: no such file {path}")
  module_spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(",".join(a for a in (arg, extra_arg) if a) or None)


def _class_paths(root: str) -> tuple[list[str], np.ndarray, list[str]]:
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  paths, labels = [], []
  for i, c in enumerate(classes):
    files = sorted(os.listdir(os.path.join(root, c)))
    paths += [os.path.join(root, c, f) for f in files]
    labels += [i] * len(files)
  if not paths:
    raise FileNotFoundError(f"{root}: no class folders with images")
  return paths, np.asarray(labels), classes


def held_out_pairs(config: ml_collections.ConfigDict, workdir: str, max_per_class: int) -> dict:
  """Images / captions / labels of WORKDIR/data/test for config.cma.pairs (see module doc)."""
  from gmail_jax.evaluators import retrieval  # noqa: PLC0415

  test = os.path.join(workdir, "data", "test")
  real_paths, real_y, classes = _class_paths(os.path.join(test, "real"))
  names = [c.replace("_", " ") for c in classes]
  captions = [config.data.caption_template.format(**{"class": n}) for n in names]

  def cap(paths, labels):
    keep = np.concatenate([np.flatnonzero(labels == c)[:max_per_class] for c in range(len(names))])
    return [paths[i] for i in keep], labels[keep]

  real_paths, real_y = cap(real_paths, real_y)
  out = {"classes": names, "class_captions": captions, "real": retrieval.load_images(real_paths)}
  out["real_labels"] = real_y
  if config.cma.pairs == "gen_real":
    gen_paths, gen_y, gen_classes = _class_paths(os.path.join(test, "generated"))
    if gen_classes != classes:
      raise ValueError(f"{test}: generated/ and real/ class folders differ")
    gen_paths, gen_y = cap(gen_paths, gen_y)
    # Pair the i-th generated with the i-th real image of the same class.
    gi, ri = [], []
    for c in range(len(names)):
      g, r = np.flatnonzero(gen_y == c), np.flatnonzero(real_y == c)
      n = min(len(g), len(r))
      gi += list(g[:n])
      ri += list(r[:n])
    gen_images = retrieval.load_images(gen_paths)
    out["gen"] = [gen_images[i] for i in gi]
    out["gen_labels"] = gen_y[gi]
    out["paired_real"] = [out["real"][i] for i in ri]
  return out


def measure(enc: Any, pairs: str, data: dict, *, student: bool, batch_size: int = 256) -> dict:
  """Gap metrics + accuracy of one encoder (train.TrainEncoder) on held_out_pairs' data."""
  enc_b = lambda fn, items: common.encode_in_batches(fn, items, batch_size)  # noqa: E731
  if pairs == "image_text":
    image_fn = enc.encode_generated if student else enc.encode_images  # f_g on real images
    x = enc_b(image_fn, data["real"])
    class_emb = common.l2_normalize(enc_b(enc.encode_texts, data["class_captions"]))
    y = class_emb[data["real_labels"]]
    acc = zeroshot.zeroshot_accuracy(x, class_emb, data["real_labels"], ks=(1,))
    acc = next(iter(acc.values()))
  else:
    gen_fn = enc.encode_generated if student else enc.encode_images
    x = enc_b(gen_fn, data["gen"])
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
    if config.loss.get("mode") != "tpc_cma":
      raise ValueError(f"--config={config_spec}: loss.mode must be 'tpc_cma'")
    wd = os.path.join(workdir, f"alpha_{_fmt_alpha(alpha)}")
    if first is not None:
      for name in SHARED:
        src, dst = os.path.join(first, name), os.path.join(wd, name)
        if os.path.isdir(src) and not os.path.exists(dst):
          shutil.copytree(src, dst)
    train.train_and_evaluate(config, wd)
    first = first or wd
    run = evaluate.load_run(config, wd)
    encs = evaluate.encoders(run)
    with jax.set_mesh(run.mesh):
      if data is None:
        data = held_out_pairs(config, wd, max_per_class)
      if teacher_row is None:
        teacher_row = {
          "alpha": None,
          "run": "teacher",
          **measure(encs["teacher"], config.cma.pairs, data, student=False),
        }
      rows.append(
        {
          "alpha": float(alpha),
          "run": os.path.basename(wd),
          **measure(encs["student"], config.cma.pairs, data, student=True),
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
  from absl import app, flags  # noqa: PLC0415

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  with cli.one_line_errors():
    alphas = [float(a) for a in f.alphas.split(",") if a.strip()]
    if not alphas:
      raise ValueError("--alphas: empty")
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
