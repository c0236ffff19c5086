"""Shared setup of the data tests: configs, eval-order batches, small views of the shared data."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterable, Mapping

import ml_collections

from gmail_jax.data import pipeline
from gmail_jax.data.config import default_data_config


def data_config(*, seed: int, image_size: int, **data) -> ml_collections.ConfigDict:
  """``config.seed``, ``config.batch_size = 4`` and the default ``config.data`` with small images,
  2 read threads and ``data`` overrides."""
  c = ml_collections.ConfigDict()
  c.seed = seed
  c.batch_size = 4
  c.data = default_data_config()
  c.data.image_size = image_size
  c.data.read_threads = 2
  c.data.update(data)
  return c


def eval_batches(config: ml_collections.ConfigDict, workdir, **kw) -> list[dict]:
  """Every batch (3 pairs, shuffled, no tokenizer) of ``pipeline.make_eval_iterator``."""
  return list(
    pipeline.make_eval_iterator(
      config, tokenizer=None, workdir=workdir, shuffle=True, batch_size=3, **kw
    )
  )


def link_cifake(
  shared: Callable, root: pathlib.Path, classes: Iterable[str], per_split: Mapping[str, int]
) -> pathlib.Path:
  """``root/<split>/<class>/`` with the first ``per_split[split]`` CIFAKE sample JPEGs of each
  class symlinked in (the real layout, a fraction of the files)."""
  src = shared("cifake-sd14-test-sample")
  for cls in classes:
    for split, n in per_split.items():
      d = root / split / cls
      d.mkdir(parents=True)
      for f in sorted((src / split / cls).glob("*.jpg"))[:n]:
        (d / f.name).symlink_to(f)
  return root


def coco_captions(
  shared: Callable, split: str, n_images: int
) -> tuple[pathlib.Path, list[dict], dict[int, list[str]]]:
  """(coco-mini root, its first ``n_images`` ``split`` images by id, image id -> stripped captions
  in annotation-id order)."""
  coco = shared("coco-mini")
  ann = json.loads((coco / "annotations" / f"captions_{split}.json").read_text())
  images = sorted(ann["images"], key=lambda im: im["id"])[:n_images]
  caps: dict[int, list[str]] = {}
  for a in sorted(ann["annotations"], key=lambda a: a["id"]):
    caps.setdefault(a["image_id"], []).append(a["caption"].strip())
  return coco, images, caps
