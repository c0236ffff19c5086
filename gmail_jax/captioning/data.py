"""Captioned image sets for training and testing captioners, from a spec dict.

  dict(kind='coco', captions=JSON, images=DIR[, max_images])    COCO captions JSON (5 per image)
  dict(kind='karpathy', path=JSON, images=DIR, split='test'[, max_images])   dataset_coco.json
  dict(kind='classes', root=DIR[, per_class])     class folders; every image's captions are the
                                                   templates filled with its class name
  dict(kind='manifest', path=M, column='gen_path'[, max_images])   a paired manifest (caption,
                                                   real_path, gen_path): one caption per row,
                                                   rows of one image grouped

Training uses every (image, caption) pair (``pairs``); testing uses each image's captions as its
references (and, for class folders, its class name: ``class_named``). Images are listed, not
decoded: ``images`` is an ``eval_sets.LazyImages`` that decodes a batch when it is embedded, so an
embedding read back from the cache reads no image, and a set of any size is never held decoded
(COCO's 566k generated training images would be ~85 GB of 224-pixel crops).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gmail_jax import storage
from gmail_jax.data import eval_sets, sources
from gmail_jax.errors import ConfigError

KINDS = ("coco", "karpathy", "classes", "manifest")


@dataclasses.dataclass
class CaptionedImages:
  ids: list[str]  # one per image: its file name (class/file for class folders)
  images: Sequence  # uint8 [S, S, 3] crops, decoded when indexed (eval_sets.LazyImages)
  references: list[list[str]]
  classes: list[str] | None = None  # class folders: each image's class name, else None

  def pairs(self) -> tuple[np.ndarray, list[str]]:
    """(image index per pair, caption per pair): every caption of every image."""
    index = [i for i, refs in enumerate(self.references) for _ in refs]
    return np.asarray(index, np.int64), [c for refs in self.references for c in refs]


def _grouped(paths: Sequence[str], captions: Sequence[str], t2i: np.ndarray) -> list[list[str]]:
  refs: list[list[str]] = [[] for _ in paths]
  for caption, i in zip(captions, t2i, strict=True):
    refs[int(i)].append(caption)
  return refs


def load(
  spec: Mapping[str, Any],
  *,
  image_size: int,
  resize: str = "shortest_edge_crop",
  templates: Sequence[str] = (),
  where: str = "captioning",
) -> CaptionedImages:
  """The set ``spec`` describes (see the module doc); ``where`` names it in errors."""
  spec = dict(spec)
  kind = spec.get("kind")
  if kind not in KINDS:
    raise ConfigError(f"{where}.kind: one of {list(KINDS)}, got {kind!r}")
  max_images = spec.get("max_images") or None
  lazy = lambda sources: eval_sets.LazyImages(sources, image_size=image_size, resize=resize)
  if kind in ("coco", "karpathy"):
    if kind == "coco":
      paths, captions, t2i = eval_sets.coco_captions(
        spec["captions"], spec["images"], max_images=max_images
      )
    else:
      paths, captions, t2i = eval_sets.karpathy_captions(
        spec["path"], spec["images"], split=spec.get("split", "test"), max_images=max_images
      )
    refs = _grouped(paths, captions, t2i)
    return CaptionedImages([os.path.basename(p) for p in paths], lazy(paths), refs)
  if kind == "classes":
    if not templates:
      raise ConfigError(f"{where}: kind 'classes' needs caption templates ('{{}}' = class name)")
    files, labels, classnames, paths = eval_sets.class_set_index(
      spec["root"], per_class=spec.get("per_class") or None
    )
    names = [c.replace("_", " ") for c in classnames]
    refs = [[t.format(names[y]) for t in templates] for y in labels]
    ids = [os.path.join(*pathlib.Path(p).parts[-2:]) for p in paths]  # class/file
    return CaptionedImages(ids, lazy(files), refs, [names[y] for y in labels])
  column = spec.get("column", "gen_path")
  table = sources.read_manifest_table(spec["path"], ("caption", column)).to_pydict()
  manifest = spec["path"]
  base = os.fspath(storage.path(manifest).parent) if storage.is_remote(manifest) else None
  base = base or os.path.dirname(os.path.abspath(manifest))  # image paths are relative to it
  order: dict[str, list[str]] = {}
  for caption, path in zip(table["caption"], table[column], strict=True):
    order.setdefault(os.path.join(base, path), []).append(caption)
  paths = list(order)[:max_images]
  return CaptionedImages(paths, lazy(paths), [order[p] for p in paths])


def captions_only(
  spec: Mapping[str, Any], *, templates: Sequence[str] = (), where: str = "captioning"
) -> list[str]:
  """Every caption of the set ``spec`` describes, without reading an image (DeCap is text-only)."""
  spec = dict(spec)
  kind = spec.get("kind")
  if kind not in KINDS:
    raise ConfigError(f"{where}.kind: one of {list(KINDS)}, got {kind!r}")
  max_images = spec.get("max_images") or None
  if kind == "coco":
    return eval_sets.coco_captions(spec["captions"], spec["images"], max_images=max_images)[1]
  if kind == "karpathy":
    images = json.loads(pathlib.Path(spec["path"]).read_text())["images"]
    split = [im for im in images if im.get("split") == spec.get("split", "test")][:max_images]
    return [" ".join(s["raw"].split()) for im in split for s in im.get("sentences", [])]
  if kind == "classes":
    if not templates:
      raise ConfigError(f"{where}: kind 'classes' needs caption templates ('{{}}' = class name)")
    root = spec["root"]
    if not os.path.isdir(root):
      raise ConfigError(f"{where}.root: not a directory: {root}")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return [t.format(n.replace("_", " ")) for n in names for t in templates]
  column = spec.get("column", "gen_path")
  return list(sources.read_manifest_table(spec["path"], ("caption", column))["caption"].to_pylist())


def class_named(captions: Sequence[str], classes: Sequence[str], names: Sequence[str]) -> float:
  """Fraction of captions that name their image's class and no other class (whole words)."""
  import re

  hits = 0
  for caption, cls in zip(captions, classes, strict=True):
    words = " " + " ".join(re.findall(r"[a-z0-9]+", caption.lower())) + " "
    named = {n for n in names if f" {n.lower()} " in words}
    hits += named == {cls}
  return hits / max(len(captions), 1)
