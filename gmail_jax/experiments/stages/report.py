"""Stage 'report': before / after / baselines of a class-paired reproduction, every number from an
evaluator (the same code ``gmail_jax.evaluate`` runs).

Inputs: the align stage's run in WORKDIR (``run.load_run``) and the 'splits' stage's ``train`` /
``test`` views. Writes WORKDIR/report.json (layout: experiments/report.py), report.md, tsne.png and
curves.png. The "fine-tune on generated as if real" baseline (GMAIL Table 9 'Synthetic') trains
a LoRA copy of the teacher with the CLIP loss on generated image-caption pairs, with GMAIL's own
LoRA targets, rank, alpha, steps, batch and learning rate; both record ``trainable_params`` and
``lora_targets``. Deterministic: the same seed gives a byte-identical report.json.

Every process runs it: loading the run (Orbax), embedding (encoders are collectives) and the
baseline's training on the run's mesh need all of them. The numbers after embedding (sklearn
probes, gaps) are host work on the same gathered embeddings, so every process computes the same
report; process 0 alone writes the files and prints it.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import ml_collections

from gmail_jax import run as run_lib
from gmail_jax import storage
from gmail_jax.evaluators import gap, generator, plots, probe, zeroshot
from gmail_jax.experiments import report
from gmail_jax.experiments.baselines import synthetic_finetune
from gmail_jax.models import lora as lora_lib
from gmail_jax.training import build, encoders

KEYS = None  # the whole config
ON_CHANGE = "rerun"  # cheap and deterministic: measured again
ALL_PROCESSES = True  # load_run and the encoders are collectives; process 0 writes


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  return storage.path(outputs["report"]).is_file()


def _curves(workdir: pathlib.Path) -> None:
  """curves.png from the alignment metrics.jsonl (+ teacher pretraining loss when present)."""
  rows = []
  for path in (workdir / "teacher" / "metrics.jsonl", workdir / "metrics.jsonl"):
    if path.exists():
      rows += plots.read_metrics_jsonl(str(path))
  if not rows:
    return
  offset = max((r.get("step", 0) for r in rows if "pretrain_loss" in r), default=0)
  merged = [{**r, "step": r.get("step", 0) + (0 if "pretrain_loss" in r else offset)} for r in rows]
  plots.plot_curves(merged, str(workdir / "curves.png"), source=str(workdir / "metrics.jsonl"))


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  t0 = time.time()
  rc = config.report
  # The splits' class folders (in a gs:// WORKDIR: read from local copies, storage.fetch_dir).
  train_root, test_root = storage.fetch_dir(inputs["train"]), storage.fetch_dir(inputs["test"])
  loaded = run_lib.load_run(workdir)
  views = loaded.encoders(batch_size=rc.batch_size)
  kw = {"image_size": config.data.image_size, "batch_size": rc.batch_size}
  pairs = gap.GapEvaluator("gap", pairs="class_gen_real", root=str(test_root), **kw)
  reference = gap.GapEvaluator("reference", pairs="class_real_real", root=str(test_root), **kw)
  probe_kw = {"c": rc.probe_c, "seed": rc.probe_seed, **kw}
  transfer = probe.ProbeEvaluator(
    "transfer", train=str(train_root / "generated"), test=str(test_root / "real"), **probe_kw
  )
  real_upper = probe.ProbeEvaluator(
    "real_upper",
    train=str(train_root / "real"),
    test=str(test_root / "real"),
    train_path="real",
    **probe_kw,
  )
  template = config.data.caption_template.replace("{class}", "{}")
  zs = {
    m: zeroshot.ZeroShotEvaluator(
      f"zeroshot_{m}", dataset=str(test_root / m), templates=[template], batch_size=rc.batch_size
    )
    for m in ("real", "generated")
  }

  def measure(encoder: encoders.Encoder) -> dict[str, float]:
    return {**report.gap_fields(pairs.compute(encoder)), **transfer.compute(encoder)}

  targets = build.lora_targets(config)
  before = measure(views["teacher"])
  after = {
    **measure(views["student"]),
    "trainable_params": lora_lib.count_params(loaded.state["params"]),
    "lora_targets": targets,
  }
  baselines: dict[str, Any] = {
    "teacher_direct": {"transfer_accuracy": before["transfer_accuracy"]},
    "real_upper": real_upper.compute(views["teacher"]),
  }
  if rc.synthetic_baseline:
    model, n_trainable = synthetic_finetune(config, loaded.teacher, transfer.train)
    spec = loaded.tower.preprocess
    syn = encoders.Encoder(
      model, tokenizer=loaded.tokenizer, mesh=loaded.mesh, batch_size=rc.batch_size,
      mean=spec.mean, std=spec.std, resize=spec.resize,
    )  # fmt: skip
    baselines["synthetic_finetune"] = {
      **measure(syn),
      "trainable_params": n_trainable,
      "lora_targets": targets,
    }
  baselines["real_real_reference"] = report.gap_fields(reference.compute(views["teacher"]))
  out = {
    "before": before,
    "after": after,
    "baselines": baselines,
    "variants": {"after_student_real": measure(views["student_all"])},
    "test_pairs": len(pairs.x_items),
    "teacher_zeroshot_real": zs["real"].compute(views["teacher"])["top1"],
    "teacher_zeroshot_generated": zs["generated"].compute(views["teacher"])["top1"],
    "counts": {
      "train_gen": len(transfer.train.labels),
      "train_real": len(real_upper.train.labels),
      "test_gen": len(zs["generated"].labels),
      "test_real": len(transfer.test.labels),
    },
    "classes": list(transfer.train.classnames),
    "seed": int(config.seed),
  }
  if "generator" in inputs:  # stage 'diffusion' made the generator: its own numbers, samples.png
    teacher = views["teacher"]
    out["generator"] = generator.measure(teacher, train_root, test_root, workdir, **probe_kw)
  path = workdir / "report.json"
  # Every process embeds the t-SNE points (collectives); process 0 projects and writes.
  points = plots.gap_tsne_points(
    pairs, views["teacher"], views["student"], max_points=rc.tsne_points, seed=rc.probe_seed
  )
  if jax.process_index() == 0:
    storage.write_text(path, json.dumps(out, indent=2))
    storage.write_text(workdir / "report.md", report.markdown(out, rc.title))
    real_t, gen_t, gen_s = points
    plots.plot_alignment_tsne(
      str(workdir / "tsne.png"),
      real_t,
      gen_t,
      real_t,
      gen_s,
      method=rc.tsne_method,
      seed=rc.probe_seed,
    )
    _curves(workdir)
    print(report.markdown(out, rc.title), flush=True)
    print(f"report: {time.time() - t0:.1f} s", flush=True)
  return {"report": str(path)}
