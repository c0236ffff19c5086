"""Tiny CLIP teacher pretraining (the quickstart / CIFAKE stage 1) and contrastive fine-tuning.

The small-scale reproductions need a "CLIP pretrained on real images" (GMAIL's f_r) that exists
offline in seconds, so we train one: a tiny CLIP (config.model.variant + overrides) on real
image-caption pairs, all parameters trained, with CLIP's symmetric contrastive loss. Captions come
from class templates, so many items of a batch share a class; their captions are true positives,
not negatives, and the loss uses multi-positive targets (``group_clip_loss``).

The same loop (``contrastive_finetune``) with ``wrt=nnx.LoRAParam`` trains the "Synthetic"
baseline of GMAIL Table 9 (LoRA on generated image-caption pairs with the CLIP loss; report.py).

Everything is deterministic in ``config.seed``: init, batch order, caption templates. The teacher
is cached in WORKDIR/teacher/ (params.npz + metrics.jsonl) so a resumed run gets the same weights
without retraining.
"""

from __future__ import annotations

import json
import pathlib
import time
import zipfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import PIL.Image
from flax import nnx

from gmail_jax.data import preprocess
from gmail_jax.models import clip as clip_lib

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------
# Loss.
# ---------------------------------------------------------------------------------------------


def group_clip_loss(
  img: jax.Array, txt: jax.Array, logit_scale: jax.Array, groups: jax.Array
) -> jax.Array:
  """Symmetric CLIP loss with multi-positive targets for items that share a group (class).

      S   = exp(logit_scale) · norm(img) @ norm(txt)ᵀ                      [B, B]
      T_ij = [g_i = g_j] / Σ_k [g_i = g_k]                                 (rows sum to 1)
      L   = ½ (CE(S, T) + CE(Sᵀ, T)),   CE(S, T) = −(1/B) Σ_i Σ_j T_ij log softmax_j(S_i)

  With all groups distinct, T = I and this is exactly CLIP's loss (Radford et al. 2021).
  """
  img = clip_lib.l2_normalize(img.astype(jnp.float32))
  txt = clip_lib.l2_normalize(txt.astype(jnp.float32))
  logits = jnp.exp(logit_scale.astype(jnp.float32)) * img @ txt.T
  same = (groups[:, None] == groups[None, :]).astype(jnp.float32)
  targets = same / same.sum(axis=1, keepdims=True)  # symmetric, so the same for both directions
  ce_i = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
  ce_t = -jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1), axis=1)
  return 0.5 * (ce_i.mean() + ce_t.mean())


# ---------------------------------------------------------------------------------------------
# Training loop (plain jit on the default device: tiny models, deterministic).
# ---------------------------------------------------------------------------------------------


def contrastive_finetune(
  model: clip_lib.CLIP,
  images: np.ndarray,
  ids: np.ndarray,
  groups: np.ndarray,
  *,
  wrt: nnx.filterlib.Filter = nnx.Param,
  steps: int,
  batch_size: int,
  lr: float,
  weight_decay: float = 0.01,
  warmup_steps: int = 0,
  seed: int = 0,
  log: Callable[[int, float], None] | None = None,
) -> list[float]:
  """Train ``model`` in place with ``group_clip_loss`` on (images, caption ids); returns losses.

  images: uint8 [N, S, S, 3] (normalised on device); ids: int32 [N, L]; groups: int [N].
  ``wrt`` picks the trainable variables (nnx.Param = everything, nnx.LoRAParam = adapters only;
  the rest, e.g. the text tower for LoRA, stays frozen). AdamW with linear warmup + cosine decay,
  global-norm clipping 1.0; batches are epochs of a permutation drawn from ``seed``.
  """
  n = len(images)
  if n < 2 or len(ids) != n or len(groups) != n:
    raise ValueError(f"contrastive_finetune: need >= 2 aligned items, got {len(images)}/{len(ids)}")
  batch_size = min(batch_size, n)
  if isinstance(wrt, type) and issubclass(wrt, nnx.LoRAParam):
    graphdef, train_state, rest = nnx.split(model, nnx.LoRAParam, ...)
  else:
    graphdef, train_state, rest = nnx.split(model, wrt, ...)
  sched = optax.warmup_cosine_decay_schedule(
    0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1), end_value=0.1 * lr
  )
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      sched, weight_decay=weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    ),
  )
  opt_state = tx.init(train_state)

  @jax.jit
  def step_fn(train_state, opt_state, rest, img, tok, grp):
    def loss_fn(ts):
      m = nnx.merge(graphdef, ts, rest)
      zi = m.encode_image(preprocess.normalize(img))
      zt = m.encode_text(tok)
      return group_clip_loss(zi, zt, m.logit_scale[...], grp)

    loss, grads = jax.value_and_grad(loss_fn)(train_state)
    updates, opt_state = tx.update(grads, opt_state, train_state)
    return optax.apply_updates(train_state, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  losses = []
  for step in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:batch_size], order[batch_size:]
    train_state, opt_state, loss = step_fn(
      train_state, opt_state, rest, images[idx], ids[idx], groups[idx].astype(np.int32)
    )
    losses.append(float(loss))
    if log is not None:
      log(step + 1, losses[-1])
  nnx.update(model, train_state)
  return losses


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
      raise ValueError(f"cannot read image {p}: {e}") from None
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


# ---------------------------------------------------------------------------------------------
# Stage 1 entry point.
# ---------------------------------------------------------------------------------------------


def teacher_config(config: ml_collections.ConfigDict) -> clip_lib.CLIPConfig:
  """Tiny CLIP: config.model.variant + config.teacher_pretrain.clip overrides, data.image_size."""
  clip_overrides = config.teacher_pretrain.get("clip")
  overrides = clip_overrides.to_dict() if clip_overrides else {}
  overrides.setdefault("vision_image_size", config.data.image_size)
  return clip_lib.clip_config(config.model.variant, **overrides)


def default_zip(source: str | pathlib.Path) -> str:
  """<source>/../cifar10-test-jpeg/cifar10_test_jpeg.zip (the shared data layout), if present."""
  path = pathlib.Path(source).parent / "cifar10-test-jpeg" / "cifar10_test_jpeg.zip"
  if not path.is_file():
    raise ValueError(
      f"config.teacher_pretrain.path: not set and {path} does not exist; pass the CIFAR-10 zip"
    )
  return str(path)


def teacher_data(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> tuple[np.ndarray, list[str], list[str]]:
  """(uint8 images, class per image, sorted class names) the teacher is pretrained on.

  teacher_pretrain.source = 'folder': ROOT/<class>/* with ROOT = teacher_pretrain.path, or the
    materialised split's train/real (splits.py) when path is empty.
  teacher_pretrain.source = 'zip': teacher_pretrain.path (e.g. cifar10_test_jpeg.zip), minus every
    (class, name) present under the alignment dataset's real/ folder (config.data.root), so no
    image is both a pretraining image and an alignment or evaluation image.
  """
  from gmail_jax.data import splits

  tp = config.teacher_pretrain
  size = config.data.image_size
  cap = int(tp.get("max_per_class", 0) or 0)  # 0 = all; else the first `cap` per class by name
  if tp.source == "folder":
    root = tp.get("path") or splits.split_root(config, workdir, "train") / "real"
    paths, classes = list_class_folder(root)
    images = load_images(paths, size)
  elif tp.source == "zip":
    source = splits.source_root(config)
    zip_path = tp.get("path") or default_zip(source)
    real = pathlib.Path(source) / "real"
    exclude = {(c, p.name) for p, c in zip(*list_class_folder(real), strict=True)}
    images, classes = load_zip_class_images(
      zip_path, size, prefix=tp.get("zip_prefix", "test"), exclude=exclude, max_per_class=cap
    )
  else:
    raise ValueError(f"config.teacher_pretrain.source: {tp.source!r} not in ('folder', 'zip')")
  if cap > 0 and tp.source == "folder":  # the first `cap` of each class (sorted by name)
    seen: dict[str, int] = {}
    keep = [seen.setdefault(c, 0) < cap and not seen.update({c: seen[c] + 1}) for c in classes]
    images, classes = images[np.asarray(keep)], [c for c, k in zip(classes, keep, strict=True) if k]
  return images, classes, sorted(set(classes))


def _save(model: nnx.Module, path: pathlib.Path) -> None:
  leaves = jax.tree.leaves(nnx.state(model))
  np.savez(path, *[np.asarray(x) for x in leaves])


def _restore(model: nnx.Module, path: pathlib.Path) -> None:
  state = nnx.state(model)
  leaves, treedef = jax.tree.flatten(state)
  with np.load(path) as z:
    saved = [z[f"arr_{i}"] for i in range(len(z.files))]
  if len(saved) != len(leaves) or any(
    a.shape != b.shape for a, b in zip(saved, leaves, strict=False)
  ):
    raise ValueError(f"{path}: saved teacher does not match config (delete it to retrain)")
  nnx.update(model, jax.tree.unflatten(treedef, [jnp.asarray(a) for a in saved]))


def pretrain_teacher(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> clip_lib.CLIP:
  """Stage 1: train a tiny CLIP on real image-caption pairs; returns it (all params trained).

  Writes WORKDIR/teacher/{params.npz, metrics.jsonl, info.json}; a rerun with the same workdir
  loads params.npz instead of retraining.
  """
  from gmail_jax.data import splits
  from gmail_jax.models.tokenizer import Tokenizer

  workdir = pathlib.Path(workdir)
  splits.materialize(config, workdir)
  tp = config.teacher_pretrain
  cfg = teacher_config(config)
  model = clip_lib.CLIP(cfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed))
  out = workdir / "teacher"
  out.mkdir(parents=True, exist_ok=True)
  if (out / "params.npz").exists():
    _restore(model, out / "params.npz")
    return model
  t0 = time.time()
  images, classes, names = teacher_data(config, workdir)
  captions = class_captions(classes, names, tuple(tp.templates), seed=config.seed)
  tok = Tokenizer(context_length=cfg.text.context_length)
  ids = np.asarray(tok(captions), np.int32)
  groups = np.asarray([names.index(c) for c in classes], np.int32)
  log_every = max(1, tp.steps // 20)
  with open(out / "metrics.jsonl", "w") as f:

    def log(step, loss):
      if step % log_every == 0 or step == tp.steps:
        f.write(json.dumps({"step": step, "pretrain_loss": loss}) + "\n")
        f.flush()

    losses = contrastive_finetune(
      model,
      images,
      ids,
      groups,
      wrt=nnx.Param,
      steps=tp.steps,
      batch_size=tp.batch_size,
      lr=tp.lr,
      weight_decay=tp.get("weight_decay", 0.01),
      warmup_steps=tp.get("warmup_steps", 0),
      seed=config.seed,
      log=log,
    )
  _save(model, out / "params.npz")
  info = {
    "images": len(images),
    "classes": names,
    "steps": tp.steps,
    "first_loss": losses[0],
    "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
    "seconds": round(time.time() - t0, 1),
  }
  (out / "info.json").write_text(json.dumps(info, indent=2))
  print(
    f"teacher pretrained on {len(images)} real images: loss {losses[0]:.3f} -> "
    f"{info['final_loss']:.3f} in {info['seconds']}s",
    flush=True,
  )
  return model
