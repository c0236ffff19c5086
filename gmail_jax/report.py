"""Stage 3 of the small-scale reproductions: before/after metrics, transfer accuracy, baselines.

``write_report(config, workdir, teacher, student)`` embeds the materialised splits
(gmail_jax/data/splits.py) and writes WORKDIR/report.json, report.md, tsne.png and curves.png.

Encoders (GMAIL notation): f_r = the frozen teacher's image tower; f_g = the student (teacher +
LoRA, aligned by L_align on generated->real pairs).

Gaps (``before`` / ``after``): on held-out (generated, real) pairs matched by class (the i-th test
generated image of class c with the i-th test real image of class c), ``gap_metrics`` of
(f(x_g), f_r(x_r)) with f = f_r before and f = f_g after alignment: paired_cosine, raw_gap,
centroid_gap, distribution_gap (L2-normalised; G_raw² = G_C² + G_D²).

Transfer accuracy: a linear probe (``probe_accuracy``: sklearn LogisticRegression on
L2-normalised embeddings, fixed seed) trained on *generated* train-split embeddings with their
class labels and tested on *held-out real* embeddings:
  before                 probe on f_r(x_g), tested on f_r(x_r)   (= baseline "teacher direct")
  after (GMAIL, Alg. 1)  probe on f_g(x_g), tested on f_r(x_r)   (generated path f_g, real path f_r)
  baselines.synthetic_finetune   GMAIL Table 9 'Synthetic' row: the same LoRA budget (rank, targets,
                         steps, batch, lr) trained with the CLIP loss on generated image-caption
                         pairs (frozen text tower), used as the encoder for both generated and real
  baselines.real_upper   probe on f_r(real train split), tested on f_r(x_r): an upper reference
  variants.after_student_real    probe on f_g(x_g), tested on f_g(x_r) (paper §3.2 path)
Also: the teacher's zero-shot accuracy with class prompts on held-out real / generated images.

``python -m gmail_jax.report --aggregate DIR1 DIR2 ... [--out FILE]`` prints mean ± std (sample
std, ddof=1) of every number over runs (seeds) as a Markdown table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gmail_jax.data import preprocess
from gmail_jax.data import splits as splits_lib

GAP_FIELDS = ("paired_cosine", "raw_gap", "centroid_gap", "distribution_gap")
STAGE_FIELDS = GAP_FIELDS + ("transfer_accuracy",)


# ---------------------------------------------------------------------------------------------
# Pure numpy pieces.
# ---------------------------------------------------------------------------------------------


def l2n(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def probe_accuracy(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  *,
  c: float = 1.0,
  seed: int = 0,
) -> float:
  """Top-1 accuracy of a multinomial logistic-regression probe (lbfgs, L2 penalty C) fitted on
  L2-normalised ``train_x`` and evaluated on L2-normalised ``test_x``."""
  from sklearn.linear_model import LogisticRegression

  clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
  clf.fit(l2n(train_x), train_y)
  return float(np.mean(clf.predict(l2n(test_x)) == test_y))


def class_pairs(gen_y: np.ndarray, real_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Indices (gi, ri) pairing the k-th generated with the k-th real item of each class,
  k < min(count_gen(c), count_real(c)) (class-level pairing, as in CIFAKE)."""
  gi, ri = [], []
  for c in np.unique(np.concatenate([gen_y, real_y])):
    g, r = np.flatnonzero(gen_y == c), np.flatnonzero(real_y == c)
    k = min(len(g), len(r))
    gi.append(g[:k])
    ri.append(r[:k])
  gi, ri = np.concatenate(gi), np.concatenate(ri)
  if len(gi) < 2:
    raise ValueError("report: fewer than 2 (generated, real) test pairs share a class")
  return gi, ri


def _same_class_shift(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(a, b): each item a paired with the next item b of its class (cyclically)."""
  a, b = [], []
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    if len(idx) > 1:
      a.append(idx)
      b.append(np.roll(idx, -1))
  return np.concatenate(a), np.concatenate(b)


def gap_fields(gen_emb: np.ndarray, real_emb: np.ndarray) -> dict[str, float]:
  """paired_cosine, raw_gap, centroid_gap, distribution_gap (evaluators.gap.gap_metrics)."""
  from gmail_jax.evaluators.gap import gap_metrics

  m = gap_metrics(gen_emb, real_emb)
  return {
    "paired_cosine": m["paired_cosine"],
    "raw_gap": m["raw"],
    "centroid_gap": m["centroid"],
    "distribution_gap": m["distribution"],
  }


def assemble(
  emb: dict[str, np.ndarray],
  labels: dict[str, np.ndarray],
  *,
  probe_c: float = 1.0,
  seed: int = 0,
) -> dict:
  """Report numbers from embeddings (all numpy; keys below) and labels per split.

  emb keys: '<encoder>/<split>' with encoder in teacher | student | synthetic and split in
  train_gen | train_real | test_gen | test_real (synthetic optional; train_real only for teacher).
  labels keys: train_gen, train_real, test_gen, test_real.
  """
  gi, ri = class_pairs(labels["test_gen"], labels["test_real"])
  y_tr_g, y_te_r = labels["train_gen"], labels["test_real"]

  def probe(train, test, y_train=y_tr_g):
    return probe_accuracy(train, y_train, test, y_te_r, c=probe_c, seed=seed)

  t, s = "teacher", "student"
  before = gap_fields(emb[f"{t}/test_gen"][gi], emb[f"{t}/test_real"][ri])
  before["transfer_accuracy"] = probe(emb[f"{t}/train_gen"], emb[f"{t}/test_real"])
  after = gap_fields(emb[f"{s}/test_gen"][gi], emb[f"{t}/test_real"][ri])
  after["transfer_accuracy"] = probe(emb[f"{s}/train_gen"], emb[f"{t}/test_real"])
  baselines = {
    "teacher_direct": {"transfer_accuracy": before["transfer_accuracy"]},
    "real_upper": {
      "transfer_accuracy": probe(
        emb[f"{t}/train_real"], emb[f"{t}/test_real"], labels["train_real"]
      )
    },
  }
  if "synthetic/train_gen" in emb:
    syn = gap_fields(emb["synthetic/test_gen"][gi], emb["synthetic/test_real"][ri])
    syn["transfer_accuracy"] = probe(emb["synthetic/train_gen"], emb["synthetic/test_real"])
    baselines["synthetic_finetune"] = syn
  # Ceiling for class-level pairs: two different held-out real images of the same class under
  # f_r (the k-th paired with the (k+1)-th of its class) are not identical either.
  rr_a, rr_b = _same_class_shift(y_te_r)
  real = emb[f"{t}/test_real"]
  baselines["real_real_reference"] = gap_fields(real[rr_a], real[rr_b])
  variants = {
    "after_student_real": {
      **gap_fields(emb[f"{s}/test_gen"][gi], emb[f"{s}/test_real"][ri]),
      "transfer_accuracy": probe(emb[f"{s}/train_gen"], emb[f"{s}/test_real"]),
    }
  }
  return {
    "before": before,
    "after": after,
    "baselines": baselines,
    "variants": variants,
    "test_pairs": int(len(gi)),
  }


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
  for key in ("test_pairs", "seeds", "runs"):
    if key in report:
      val = report[key]
      val = int(val["mean"]) if isinstance(val, dict) and "mean" in val else val
      lines.append(f"\n{key}: {val}")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Embedding with the models.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(graphdef, state, x: jax.Array) -> jax.Array:
  z = nnx.merge(graphdef, state)(preprocess.normalize(x))
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def image_encoder(tower: nnx.Module, batch_size: int = 256) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 [N, S, S, 3] -> L2-normalised float [N, D] through ``tower`` (jitted, fixed batch;
  towers with the same structure share one compilation)."""
  graphdef, state = nnx.split(tower)

  def encode(images: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch_size):
      chunk = images[i : i + batch_size]
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(_encode_batch(graphdef, state, chunk))[: batch_size - pad])
    return np.concatenate(out).astype(np.float64)

  return encode


def _eval_copy(model: nnx.Module) -> nnx.Module:
  """A copy with any LoRA folded into the kernels (no dropout; the teacher's structure)."""
  from gmail_jax.models import lora as lora_lib

  m = nnx.clone(model)
  lora_lib.merge_lora(m)
  return m


def load_splits(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
  """uint8 images and int labels of the four split folders, and the class names."""
  from gmail_jax.pretrain import list_class_folder, load_images

  size = config.data.image_size
  images, labels, names = {}, {}, None
  for split in ("train", "test"):
    root = splits_lib.split_root(config, workdir, split)
    for modality, short in (("generated", "gen"), ("real", "real")):
      paths, classes = list_class_folder(root / modality)
      names = names or sorted(set(classes))
      images[f"{split}_{short}"] = load_images(paths, size)
      labels[f"{split}_{short}"] = np.asarray([names.index(c) for c in classes])
  return images, labels, names


def synthetic_finetune(
  config: ml_collections.ConfigDict,
  teacher: nnx.Module,
  images: np.ndarray,
  labels: np.ndarray,
  names: Sequence[str],
) -> nnx.Module:
  """Baseline (b): a LoRA copy of the teacher (config.lora.*) trained with the CLIP loss on
  generated image-caption pairs (captions from config.data.caption_template), same steps, batch
  and lr as the alignment run; text tower and base weights frozen."""
  from gmail_jax.models import lora as lora_lib
  from gmail_jax.models.tokenizer import Tokenizer
  from gmail_jax.pretrain import contrastive_finetune

  model = nnx.clone(teacher)
  lora_lib.apply_lora(
    model,
    rank=config.lora.rank,
    alpha=config.lora.alpha,
    dropout=config.lora.dropout,
    targets=tuple(config.lora.targets)
    if not isinstance(config.lora.targets, str)
    else config.lora.targets,
    rngs=nnx.Rngs(params=config.seed + 1, dropout=config.seed + 1),
  )
  template = config.data.caption_template
  captions = [template.format(**{"class": names[y].replace("_", " ")}) for y in labels]
  ids = np.asarray(Tokenizer(context_length=model.config.text.context_length)(captions), np.int32)
  contrastive_finetune(
    model,
    images,
    ids,
    labels.astype(np.int32),
    wrt=nnx.LoRAParam,
    steps=config.total_steps,
    batch_size=config.batch_size,
    lr=config.optim.lr,
    weight_decay=config.optim.get("weight_decay", 0.01),
    warmup_steps=config.optim.get("warmup_steps", 0),
    seed=config.seed,
  )
  return model


def zeroshot(
  model: nnx.Module, emb: np.ndarray, y: np.ndarray, names: Sequence[str], template: str
) -> float:
  """Zero-shot top-1 of L2-normalised image embeddings against class prompt embeddings."""
  from gmail_jax.models.tokenizer import Tokenizer

  prompts = [template.format(**{"class": n.replace("_", " ")}) for n in names]
  ids = np.asarray(Tokenizer(context_length=model.config.text.context_length)(prompts), np.int32)
  t = l2n(np.asarray(jax.jit(lambda i: model.encode_text(i))(ids)))
  return float(np.mean(np.argmax(emb @ t.T, axis=1) == y))


def write_report(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  *,
  teacher: nnx.Module,
  student: nnx.Module,
) -> dict:
  """Stage 3: embed the splits, compute before/after/baselines, write report.json/.md + figures."""
  from gmail_jax.evaluators import plots

  t0 = time.time()
  workdir = pathlib.Path(workdir)
  rc = config.get("report") or {}
  images, labels, names = load_splits(config, workdir)
  teacher, student = _eval_copy(teacher), _eval_copy(student)
  bs = int(rc.get("batch_size", 256))
  enc_t, enc_s = image_encoder(teacher.vision, bs), image_encoder(student.vision, bs)
  emb = {f"teacher/{k}": enc_t(v) for k, v in images.items()}
  emb.update({f"student/{k}": enc_s(v) for k, v in images.items() if k != "train_real"})
  if rc.get("synthetic_baseline", True):
    syn = _eval_copy(
      synthetic_finetune(config, teacher, images["train_gen"], labels["train_gen"], names)
    )
    enc_b = image_encoder(syn.vision, bs)
    emb.update({f"synthetic/{k}": enc_b(v) for k, v in images.items() if k != "train_real"})
  seed = int(rc.get("probe_seed", 0))
  report = assemble(emb, labels, probe_c=float(rc.get("probe_c", 1.0)), seed=seed)
  template = config.data.caption_template
  report["teacher_zeroshot_real"] = zeroshot(
    teacher, emb["teacher/test_real"], labels["test_real"], names, template
  )
  report["teacher_zeroshot_generated"] = zeroshot(
    teacher, emb["teacher/test_gen"], labels["test_gen"], names, template
  )
  report["counts"] = {k: int(len(v)) for k, v in labels.items()}
  report["classes"] = list(names)
  report["seed"] = int(config.seed)
  report["report_seconds"] = round(time.time() - t0, 1)
  (workdir / "report.json").write_text(json.dumps(report, indent=2))
  (workdir / "report.md").write_text(
    markdown(report, rc.get("title", "GMAIL small-scale reproduction"))
  )

  gi, ri = class_pairs(labels["test_gen"], labels["test_real"])
  n = min(len(gi), int(rc.get("tsne_points", 500)))
  sel = np.random.default_rng(seed).permutation(len(gi))[:n]
  plots.plot_alignment_tsne(
    str(workdir / "tsne.png"),
    emb["teacher/test_real"][ri[sel]],
    emb["teacher/test_gen"][gi[sel]],
    emb["teacher/test_real"][ri[sel]],
    emb["student/test_gen"][gi[sel]],
    method=rc.get("tsne_method", "tsne"),
    seed=seed,
  )
  _curves(workdir)
  print(markdown(report), flush=True)
  return report


def _curves(workdir: pathlib.Path) -> None:
  """curves.png from the alignment metrics.jsonl (+ teacher pretraining loss when present)."""
  from gmail_jax.evaluators import plots

  rows = []
  for path in (workdir / "teacher" / "metrics.jsonl", workdir / "metrics.jsonl"):
    if path.exists():
      rows += plots.read_metrics_jsonl(str(path))
  if not rows:
    return
  offset = max((r.get("step", 0) for r in rows if "pretrain_loss" in r), default=0)
  merged = [{**r, "step": r.get("step", 0) + (0 if "pretrain_loss" in r else offset)} for r in rows]
  tmp = workdir / "curves_metrics.jsonl"
  tmp.write_text("".join(json.dumps(r) + "\n" for r in merged))
  plots.plot_training_curves(str(tmp), str(workdir / "curves.png"))
  tmp.unlink()


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


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m gmail_jax.report", description=__doc__.split("\n")[0])
  p.add_argument("--aggregate", nargs="+", required=True, metavar="WORKDIR")
  p.add_argument("--out", default=None, help="write the aggregate JSON here (and .md next to it)")
  args = p.parse_args(argv)
  reports = []
  for d in args.aggregate:
    path = pathlib.Path(d) / "report.json"
    if not path.exists():
      print(f"error: {path} not found (did the run finish?)", file=sys.stderr)
      return 2
    reports.append(json.loads(path.read_text()))
  agg = aggregate(reports)
  md = markdown(agg, f"GMAIL small-scale reproduction, {len(reports)} runs (mean ± std)")
  print(md)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(agg, indent=2))
    pathlib.Path(args.out).with_suffix(".md").write_text(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
