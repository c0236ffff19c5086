"""The generator's own numbers: do its images show what their captions say? (stage 'diffusion')

GMAIL only means something if the generated images show their captions' content. With class
captions that can be measured: a real-image classifier, the logistic-regression probe of probe.py
fitted on the frozen teacher's f_r embeddings of the real train-split images, labels generated
images through the same f_r path. Its accuracy on the held-out split's generated images (overall
and per class) is the generator's score; the same probe on held-out real images (its ceiling),
on the train split's generated images (what the alignment trained on) and on held-out images of
the generator's own training data (the quickstart's rendered digits) put it in context.
:func:`sample_grid` draws the first generated images of each class, a row per class.
"""

from __future__ import annotations

import io
import os
import pathlib
from typing import Any

import jax
import numpy as np

from gmail_jax import storage
from gmail_jax.data import eval_sets, splits
from gmail_jax.evaluators import common


def measure(
  encoder: Any,
  train_root: str | os.PathLike,
  test_root: str | os.PathLike,
  workdir: str | os.PathLike,
  *,
  image_size: int | None = None,
  batch_size: int = 256,
  c: float = 1.0,
  seed: int = 0,
  grid_per_class: int = 8,
) -> dict[str, Any]:
  """{'accuracy', 'per_class': {class: accuracy}, 'images', 'real_accuracy',
  'train_split_accuracy'[, 'source_accuracy']} (module docstring) for the class views
  TRAIN_ROOT / TEST_ROOT ({real,generated}/<class>/); ``source``: the splits' own held-out
  generated/ (WORKDIR/data/test/generated) when the views replaced it. Process 0 also writes
  WORKDIR/samples.png (:func:`sample_grid`)."""
  from sklearn.linear_model import LogisticRegression

  train_root, test_root = pathlib.Path(train_root), pathlib.Path(test_root)
  sets = {
    "": test_root / "generated",
    "real_": test_root / "real",
    "train_split_": train_root / "generated",
  }
  source = splits.split_root(workdir, "test") / "generated"
  if source.is_dir() and source.resolve() != sets[""].resolve():
    sets["source_"] = source

  def embed(path: pathlib.Path) -> tuple[eval_sets.ClassSet, np.ndarray]:
    data = eval_sets.load_class_set(path, image_size=image_size)
    fn = encoder.encode_images  # f_r: a classifier of real images
    return data, common.l2_normalize(common.encode_in_batches(fn, data.images, batch_size))

  real, x_real = embed(train_root / "real")
  probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_real, real.labels)
  out: dict[str, Any] = {}
  for prefix, path in sets.items():
    data, x = embed(path)
    if data.classnames != real.classnames:
      raise ValueError(f"{path}: classes {data.classnames} differ from {real.classnames}")
    hit = probe.predict(x) == data.labels
    out[f"{prefix}accuracy"] = float(hit.mean())
    if not prefix:
      out["per_class"] = {
        name: float(hit[data.labels == k].mean()) for k, name in enumerate(data.classnames)
      }
      out["images"] = len(hit)
  if jax.process_index() == 0:
    sample_grid(sets[""], storage.path(workdir) / "samples.png", per_class=grid_per_class)
  return out


def sample_grid(root: str | os.PathLike, path: str | os.PathLike, *, per_class: int = 8) -> str:
  """PNG of the first ``per_class`` images (by name) of each ROOT/<class>/, a row per class
  labelled with its name; returns ``path`` (local or a bucket URL)."""
  import matplotlib

  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt

  data = eval_sets.load_class_set(root, per_class=per_class)
  names = data.classnames
  fig, axes = plt.subplots(
    len(names), per_class, figsize=(0.6 * per_class + 0.8, 0.6 * len(names)), squeeze=False
  )
  for ax in axes.ravel():
    ax.set_axis_off()
  for image, label, col in zip(data.images, data.labels, _columns(data.labels), strict=True):
    axes[label, col].imshow(np.asarray(image), cmap="gray", interpolation="nearest")
  for k, name in enumerate(names):
    axes[k, 0].text(-0.6, 0.5, name, transform=axes[k, 0].transAxes, ha="right", va="center")
  fig.suptitle("generated samples per class (held-out captions)", fontsize=9)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
  storage.write_bytes(path, buf.getvalue())
  return str(path)


def _columns(labels: np.ndarray) -> list[int]:
  """The position of each item among the items of its class, in order."""
  seen: dict[int, int] = {}
  cols = []
  for label in labels.tolist():
    cols.append(seen.get(label, 0))
    seen[label] = cols[-1] + 1
  return cols
