"""Stage 'teacher': a tiny CLIP pretrained on real image-caption pairs, saved as a HF directory.

The small-scale reproductions need a "CLIP pretrained on real images" (GMAIL's f_r) that exists
offline in seconds, so we train one: the tower of ``config.model`` (variant + overrides, at
``data.image_size``) on real images with class-template captions, all parameters trained, with
CLIP's contrastive loss (training/contrastive.py). Deterministic in ``config.seed``: init, batch
order, caption templates.

Output: WORKDIR/teacher/model/ — a transformers CLIP directory (config.json, model.safetensors,
tokenizer and preprocessor files; export/hf_dir.py) that the align stage loads as its
``config.init`` — and WORKDIR/teacher/{metrics.jsonl, info.json}.
"""

from __future__ import annotations

import json
import pathlib
import time
import zipfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import PIL.Image
from flax import nnx

from gmail_jax import storage
from gmail_jax.data import preprocess
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.export import hf_dir
from gmail_jax.models import towers
from gmail_jax.models.tokenizer import Tokenizer
from gmail_jax.training import contrastive

KEYS = (
  "seed",
  "model.name",
  "model.variant",
  "model.overrides",
  "data.image_size",
  "data.root",
  "splits",
  "teacher_pretrain",
)
ON_CHANGE = "refuse"
# Process 0 alone: plain jit on its own default device, no mesh (fit.fit_arrays), the same program
# as on one process, so the teacher does not depend on the process count; the others wait.
ALL_PROCESSES = False
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------
# Data: class folders and the CIFAR-10 test zip.
# ---------------------------------------------------------------------------------------------


def list_class_folder(root: str | pathlib.Path) -> tuple[list[pathlib.Path], list[str]]:
  """(image paths, class names) of ROOT/<class>/<image>, sorted by class then name."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"class folder root not found: {root}")
  paths, classes = [], []
  for d in sorted(p for p in root.iterdir() if p.is_dir()):
    for f in sorted(d.iterdir()):
      if f.suffix.lower() in IMAGE_EXTS:
        paths.append(f)
        classes.append(d.name)
  if not paths:
    raise FileNotFoundError(f"no images under {root}/<class>/")
  return paths, classes


def load_images(paths: Sequence[str | pathlib.Path], size: int) -> np.ndarray:
  """uint8 [N, size, size, 3]: each file through the CLIP resize + centre crop."""
  out = np.empty((len(paths), size, size, 3), np.uint8)
  for i, p in enumerate(paths):
    try:
      with PIL.Image.open(p) as im:
        out[i] = preprocess.resize_center_crop(im, size)
    except (OSError, ValueError) as e:
      raise InputError(f"cannot read image {p}: {e}") from None
  return out


def zip_class_members(
  zf: zipfile.ZipFile,
  *,
  prefix: str = "test",
  exclude: set[tuple[str, str]] = frozenset(),
  max_per_class: int = 0,
) -> list[tuple[str, str]]:
  """Sorted (member name, class) of PREFIX/<class>/<name> images, minus (class, name) in
  ``exclude``; at most the first ``max_per_class`` of each class when > 0."""
  members, seen = [], {}
  for name in sorted(zf.namelist()):
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != prefix or not parts[2].lower().endswith(IMAGE_EXTS):
      continue
    if (parts[1], parts[2]) in exclude:
      continue
    if max_per_class > 0 and seen.get(parts[1], 0) >= max_per_class:
      continue
    seen[parts[1]] = seen.get(parts[1], 0) + 1
    members.append((name, parts[1]))
  return members


def load_zip_class_images(
  zip_path: str | pathlib.Path,
  size: int,
  *,
  prefix: str = "test",
  exclude: set[tuple[str, str]] = frozenset(),
  max_per_class: int = 0,
) -> tuple[np.ndarray, list[str]]:
  """(uint8 images, classes) of the ``zip_class_members`` of ZIP, decoded and resized."""
  zip_path = pathlib.Path(zip_path)
  if not zip_path.is_file():
    raise FileNotFoundError(f"teacher_pretrain.path: zip not found: {zip_path}")
  with zipfile.ZipFile(zip_path) as zf:
    members = zip_class_members(zf, prefix=prefix, exclude=exclude, max_per_class=max_per_class)
    if not members:
      raise FileNotFoundError(f"no images under {zip_path}:{prefix}/<class>/ after exclusions")
    images = np.empty((len(members), size, size, 3), np.uint8)
    for i, (name, _) in enumerate(members):
      with zf.open(name) as f, PIL.Image.open(f) as im:
        images[i] = preprocess.resize_center_crop(im, size)
  return images, [c for _, c in members]


def class_captions(
  classes: Sequence[str], class_names: Sequence[str], templates: Sequence[str], seed: int
) -> list[str]:
  """One caption per item: a template drawn from ``seed``, formatted with {name} (folder name,
  underscores as spaces) and {index} (position in ``class_names``)."""
  rng = np.random.default_rng(seed)
  picks = rng.integers(len(templates), size=len(classes))
  index = {c: i for i, c in enumerate(class_names)}
  return [
    templates[t].format(name=c.replace("_", " "), index=index[c])
    for c, t in zip(classes, picks, strict=True)
  ]


def default_zip(source: str | pathlib.Path) -> str:
  """<source>/../cifar10-test-jpeg/cifar10_test_jpeg.zip (the shared data layout), if present."""
  path = pathlib.Path(source).parent / "cifar10-test-jpeg" / "cifar10_test_jpeg.zip"
  if not path.is_file():
    raise ConfigError(
      f"config.teacher_pretrain.path: not set and {path} does not exist; pass the CIFAR-10 zip"
    )
  return str(path)


def teacher_data(
  config: ml_collections.ConfigDict, train_root: str | None
) -> tuple[np.ndarray, list[str], list[str]]:
  """(uint8 images, class per image, sorted class names) the teacher is pretrained on.

  teacher_pretrain.source = 'folder': ROOT/<class>/* with ROOT = teacher_pretrain.path, or the
    train split's real/ (``train_root``, from the 'splits' stage) when path is empty.
  teacher_pretrain.source = 'zip': teacher_pretrain.path (e.g. cifar10_test_jpeg.zip), minus every
    (class, name) present under the alignment dataset's real/ folder (config.data.root), so no
    image is both a pretraining image and an alignment or evaluation image.
  """
  tp = config.teacher_pretrain
  size = config.data.image_size
  cap = int(tp.max_per_class)  # 0 = all; else the first `cap` per class by name
  if tp.source == "folder":
    if not (tp.path or train_root):
      raise ConfigError(
        "config.teacher_pretrain.path: empty and no 'splits' stage before 'teacher'"
      )
    # A folder in a bucket (the train split of a gs:// WORKDIR) is read from a local copy.
    root = storage.fetch_dir(tp.path) if tp.path else storage.fetch_dir(train_root) / "real"
    paths, classes = list_class_folder(root)
    images = load_images(paths, size)
  elif tp.source == "zip":
    source = config.data.root
    if not source:
      raise ConfigError("config.data.root: needed by teacher_pretrain.source='zip' (exclusions)")
    zip_path = tp.path or default_zip(source)
    real = pathlib.Path(source) / "real"
    exclude = {(c, p.name) for p, c in zip(*list_class_folder(real), strict=True)}
    images, classes = load_zip_class_images(
      zip_path, size, prefix=tp.zip_prefix, exclude=exclude, max_per_class=cap
    )
  else:
    raise ConfigError(f"config.teacher_pretrain.source: {tp.source!r} not in ('folder', 'zip')")
  if cap > 0 and tp.source == "folder":  # the first `cap` of each class (sorted by name)
    seen: dict[str, int] = {}
    keep = [seen.setdefault(c, 0) < cap and not seen.update({c: seen[c] + 1}) for c in classes]
    images, classes = images[np.asarray(keep)], [c for c, k in zip(classes, keep, strict=True) if k]
  return images, classes, sorted(set(classes))


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------


def model_dir(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "teacher" / "model"


def complete(workdir: pathlib.Path, outputs: dict[str, Any]) -> bool:
  d = storage.path(outputs["model_dir"])
  return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def run(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, inputs: dict[str, Any]
) -> dict[str, Any]:
  """Trains the teacher and writes it (see the module docstring); returns {'model_dir'}."""
  tp = config.teacher_pretrain
  tower = towers.get(config.model.name)
  overrides = config.model.overrides.to_dict()
  overrides.setdefault("vision_image_size", config.data.image_size)
  cfg = tower.arch_config(config.model.variant, **overrides)
  model = tower.make(cfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed))
  t0 = time.time()
  images, classes, names = teacher_data(config, inputs.get("train"))
  captions = class_captions(classes, names, tuple(tp.templates), seed=config.seed)
  ids = np.asarray(Tokenizer(context_length=cfg.text.context_length)(captions), np.int32)
  groups = np.asarray([names.index(c) for c in classes], np.int32)
  out = workdir / "teacher"
  log_every = max(1, tp.steps // 20)
  metrics = out / "metrics.jsonl"
  storage.write_text(metrics, "")  # an interrupted earlier attempt's lines go

  def log(step, loss):
    if step % log_every == 0 or step == tp.steps:  # ~20 lines: a bucket rewrites the object
      storage.append_text(metrics, json.dumps({"step": step, "pretrain_loss": loss}) + "\n")

  losses = contrastive.contrastive_finetune(
    model,
    images,
    ids,
    groups,
    wrt=nnx.Param,
    steps=tp.steps,
    batch_size=tp.batch_size,
    lr=tp.lr,
    weight_decay=tp.weight_decay,
    warmup_steps=tp.warmup_steps,
    seed=config.seed,
    log=log,
    log_every=log_every,
  )
  # overwrite: replaces an interrupted earlier attempt's directory.
  hf_dir.save_pretrained(model, str(model_dir(workdir)), overwrite=True)
  info = {
    "images": len(images),
    "classes": names,
    "steps": tp.steps,
    "first_loss": losses[0],
    "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
    "seconds": round(time.time() - t0, 1),
  }
  storage.write_text(out / "info.json", json.dumps(info, indent=2))
  print(
    f"teacher pretrained on {len(images)} real images: loss {losses[0]:.3f} -> "
    f"{info['final_loss']:.3f} in {info['seconds']}s",
    flush=True,
  )
  return {"model_dir": str(model_dir(workdir))}
