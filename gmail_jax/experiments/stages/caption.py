"""Stage 'caption': train a captioner (ClipCap or DeCap) on an encoder's embeddings, caption real
test images, score them (``captioning/evaluator.py``; settings in ``config.caption``).

``config.caption.views`` picks the encoders, each measured with a fresh captioner of the same
settings and seed:

  teacher      f_r for every image (no alignment; the frozen model of ``config.init``, or the
               seeded random tower of ``config.model`` when there is no run in WORKDIR)
  student      GMAIL's path: generated images through f_g, real images through f_r (the align
               stage's run in WORKDIR)
  student_all  f_g for every image
  as_if_real   GMAIL Table 9 'Synthetic': a LoRA copy of the teacher fine-tuned with the CLIP loss
               on the generated training images as if real (``baselines.py``, class-paired
               experiments only), used for every image

Writes WORKDIR/eval/captions.jsonl (view, id, caption, references) and
WORKDIR/eval/captioning.json ({view: metrics, how they were scored, captioner settings, training
loss}). Embeddings are computed once and kept in WORKDIR/eval/features/<view>/, keyed by what they
depend on (captioning/evaluator.py): the weights fingerprints of both towers the view uses (teacher
and student states), the preprocessing (image size, resize mode, mean/std), the tokenizer and the
image ids; never by WORKDIR and step, which a retrained run or another as-if-real baseline reuses.
So a rerun with other captioner settings trains on them directly, as ClipCap does, and a rerun with
another encoder recomputes them.

Every process runs it up to the embeddings (loading the run, the as-if-real baseline's training on
the run's mesh and the encoders are collectives); process 0 alone then trains the captioners (a
small model on its own device), captions, scores (pycocoevalcap; METEOR / SPICE start a JVM) and
writes, while the others wait for its record.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from gmail_jax import run as run_lib
from gmail_jax import storage
from gmail_jax.captioning.evaluator import CaptioningEvaluator, result_paths, write_results
from gmail_jax.data import eval_sets
from gmail_jax.errors import ConfigError
from gmail_jax.experiments import baselines
from gmail_jax.training import build, encoders
from gmail_jax.training import sharding as shd

KEYS = None  # the whole config
ON_CHANGE = "rerun"  # deterministic: trained and measured again
ALL_PROCESSES = True  # load_run and the encoders are collectives; process 0 captions and writes
OUT = "eval"
VIEWS = (*encoders.VIEWS, "as_if_real")


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  return all(storage.path(outputs[k]).is_file() for k in ("captions", "captioning"))


def _encoders(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, encoders.Encoder]:
  """{view: encoder}; each keys its embedding cache by its ``identity()``."""
  views = tuple(config.caption.views)
  unknown = [v for v in views if v not in VIEWS]
  if unknown or not views:
    raise ConfigError(f"config.caption.views: choose from {list(VIEWS)}, got {views}")
  spec = build.tower(config).preprocess
  if not run_lib.is_run(workdir):
    if views != ("teacher",):
      raise ConfigError(
        f"config.caption.views: {views} need the align stage's run in {workdir} (none there);"
        " without one only ('teacher',) is possible"
      )
    mesh = shd.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
      model = build.build_teacher(config, mesh, fsdp=False)
    tokenizer = build.tokenizer(config, model.config.text.context_length)
    kw = dict(tokenizer=tokenizer, mesh=mesh, mean=spec.mean, std=spec.std, resize=spec.resize)
    return {"teacher": encoders.Encoder(model, **kw)}
  loaded = run_lib.load_run(workdir)
  out = loaded.encoders(names=tuple(v for v in views if v in encoders.VIEWS))
  if "as_if_real" in views:
    train = eval_sets.load_class_set(
      storage.fetch_dir(inputs["train"]) / "generated",  # a bucket's: read from a local copy
      image_size=config.data.image_size,
      resize=spec.resize,
    )
    with jax.set_mesh(loaded.mesh):
      model, _ = baselines.synthetic_finetune(config, loaded.teacher, train)
    out["as_if_real"] = encoders.Encoder(
      model,
      tokenizer=loaded.tokenizer,
      mesh=loaded.mesh,
      mean=spec.mean,
      std=spec.std,
      resize=spec.resize,
    )
  return {v: out[v] for v in views}


def evaluator(config: ml_collections.ConfigDict, inputs: dict[str, Any]) -> CaptioningEvaluator:
  """The evaluator of ``config.caption``; an empty class-folder root means the splits stage's."""
  cc = config.caption.to_dict()
  for role, split, sub in (("train", "train", "generated"), ("test", "test", "real")):
    spec = dict(cc[role])
    if spec.get("kind") == "classes" and not spec.get("root"):
      spec["root"] = str(storage.fetch_dir(inputs[split]) / sub)  # a bucket's: a local copy
    if spec.get("kind") == "manifest" and not spec.get("path"):
      spec["path"] = inputs.get("manifest") or config.data.manifest  # the pairs aligned on
    cc[role] = spec
  real = cc.get("real") or None
  return CaptioningEvaluator(
    "captioning",
    method=cc["method"],
    train=cc["train"],
    test=cc["test"],
    real=real if real and real.get("kind") else None,
    train_path=cc["train_path"],
    templates=tuple(cc["templates"]),
    image_size=config.data.image_size,
    resize=build.tower(config).preprocess.resize,
    batch_size=cc["batch_size"],
    captioner={"seed": config.seed, **cc["captioner"]},  # seeded like the run unless set
    meteor=cc["meteor"],
  )


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  t0 = time.time()
  ev = evaluator(config, inputs)
  every = max(1, int(config.log_every_steps))
  main = jax.process_index() == 0
  results = {}
  for view, enc in _encoders(config, workdir, inputs).items():

    def log(step: int, loss: float, view=view) -> None:
      logging.info("caption %s: step %d loss %.4f", view, step, loss)

    with jax.set_mesh(enc.mesh):
      feats = ev.embed(enc, cache_dir=str(workdir / OUT / "features" / view))
    if not main:  # the rest is host work on the gathered embeddings: process 0's alone
      continue
    results[view] = ev.caption_embedded(feats, log=log, log_every=every)
    logging.info(
      "caption %s: %s (%.0f s so far)",
      view,
      {k: round(v, 4) for k, v in results[view].metrics.items()},
      time.time() - t0,
    )
  if main:
    write_results(workdir / OUT, results)
  paths = result_paths(workdir / OUT)  # the same on every process
  return {"captions": paths["captions"], "captioning": paths["metrics"]}
