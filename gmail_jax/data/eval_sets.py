"""Evaluation sets: image–caption sets (several captions per image) and class-labelled sets.

* COCO-format captions JSON (``images``, ``annotations``) + image dir  -> :class:`CaptionSet`
* Flickr30k / COCO Karpathy JSON (``images[].sentences[].raw``, ``split``) -> :class:`CaptionSet`
* class folders ``<root>/<class>/*`` or a zip of ``.../<class>/<file>`` -> :class:`ClassSet`

Images are decoded to RGB PIL, or to uint8 ``[size, size, 3]`` crops when ``image_size`` is given
(the same resize as training: the tower's ``resize`` mode, CLIP's centre crop by default). Bad files
are an error naming the file. :class:`LazyImages` is the same images decoded only when indexed (an
embedding batch at a time), for sets too large to hold decoded; :func:`coco_captions`,
:func:`karpathy_captions` and :func:`class_set_index` list a set without decoding it. Every path
may also be a bucket's (``gs://``): files are read through :mod:`gmail_jax.storage`, folders
listed once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile
from collections.abc import Sequence

import numpy as np

from gmail_jax import storage
from gmail_jax.data import preprocess
from gmail_jax.data.images import decode_image
from gmail_jax.data.rejects import BadInput
from gmail_jax.data.sources import IMAGE_EXTS, read_bytes
from gmail_jax.errors import InputError


@dataclasses.dataclass
class CaptionSet:
  """``text_to_image[j]`` = index of the image caption ``j`` describes."""

  paths: list[str]
  images: list  # PIL images, or uint8 [S,S,3] arrays when image_size was given
  captions: list[str]
  text_to_image: np.ndarray

  @property
  def image_to_texts(self) -> list[np.ndarray]:
    return [np.flatnonzero(self.text_to_image == i) for i in range(len(self.paths))]


@dataclasses.dataclass
class ClassSet:
  images: list
  labels: np.ndarray
  classnames: list[str]
  paths: list[str]


def _load(data: bytes, name: str, image_size: int | None, resize: preprocess.ResizeMode):
  try:
    image = decode_image(data, name)
  except BadInput as e:
    raise InputError(f"eval set: bad image {e.path}: {e.reason}") from None
  return preprocess.resize(image, image_size, resize) if image_size else image


def _read(path: str) -> bytes:
  if storage.is_remote(path):
    try:
      return read_bytes(path)
    except BadInput as e:
      raise InputError(f"eval set: cannot read {path}: {e.reason}") from None
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise InputError(f"eval set: cannot read {path}: {e.strerror or e}") from None


def _read_json(path: str | os.PathLike, what: str):
  """A JSON file (or object), or InputError naming it and ``what`` it should be."""
  try:
    return json.loads(storage.path(path).read_text())
  except (OSError, ValueError) as e:
    raise InputError(f"eval set: cannot read {what} {path}: {e}") from None


class _ObjectZip(zipfile.ZipFile):
  """A bucket's zip object read in place (members fetched by range); closing it closes the
  object too (a ZipFile leaves a file object it was given open)."""

  def __init__(self, url: str):
    self._object = storage.path(url).open("rb")
    super().__init__(self._object)

  def close(self) -> None:
    try:
      super().close()
    finally:
      self._object.close()


def _zip(archive: str) -> zipfile.ZipFile:
  return _ObjectZip(archive) if storage.is_remote(archive) else zipfile.ZipFile(archive)


Source = str | tuple[str, str]  # an image file, or (zip archive, member)


class LazyImages(Sequence):
  """Images decoded (as :func:`load_images`) each time they are indexed: ``x[i]`` one image,
  ``x[a:b]`` a list; nothing is kept, so only the batch being used is ever in memory."""

  def __init__(
    self,
    sources: Sequence[Source],
    *,
    image_size: int | None = None,
    resize: preprocess.ResizeMode = "shortest_edge_crop",
  ):
    self.sources, self.image_size, self.resize = list(sources), image_size, resize

  def __len__(self) -> int:
    return len(self.sources)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return _decode_all(self.sources[index], self.image_size, self.resize)
    return _decode_all([self.sources[index]], self.image_size, self.resize)[0]


def _decode_all(sources: Sequence[Source], image_size, resize) -> list:
  """Each source decoded; a zip archive is opened once for all its members here."""
  zips: dict[str, zipfile.ZipFile] = {}
  try:
    out = []
    for src in sources:
      if isinstance(src, tuple):
        archive, member = src
        if archive not in zips:
          zips[archive] = _zip(archive)
        out.append(_load(zips[archive].read(member), f"{archive}:{member}", image_size, resize))
      else:
        out.append(_load(_read(src), src, image_size, resize))
    return out
  finally:
    for zf in zips.values():
      zf.close()


def load_images(
  paths: list[str],
  *,
  image_size: int | None = None,
  resize: preprocess.ResizeMode = "shortest_edge_crop",
) -> list:
  """RGB PIL images (alpha on white, like training), or uint8 ``[size, size, 3]`` crops resized
  by the tower's ``resize`` mode (CLIP's centre crop by default)."""
  return [_load(_read(p), p, image_size, resize) for p in paths]


def _caption_index(entries, images_dir, max_images) -> tuple[list[str], list[str], np.ndarray]:
  """(image paths, captions, text_to_image) of the first ``max_images`` captioned entries
  ``(file_name, captions)``."""
  entries = [(f, caps) for f, caps in entries if caps][:max_images]
  if not entries:
    raise InputError(f"eval set: no captioned images for {images_dir}")
  paths, captions, t2i = [], [], []
  for i, (file_name, caps) in enumerate(entries):
    paths.append(os.path.join(images_dir, file_name))
    captions += caps
    t2i += [i] * len(caps)
  return paths, captions, np.asarray(t2i, np.int64)


def coco_captions(
  captions_json: str | os.PathLike,
  images_dir: str | os.PathLike,
  *,
  max_images: int | None = None,
  only_present: bool = True,
) -> tuple[list[str], list[str], np.ndarray]:
  """(image paths, captions, text_to_image) without decoding: images sorted by id (those present
  in ``images_dir`` if ``only_present``) that have a caption, the first ``max_images`` of them;
  each image's captions by annotation id, whitespace collapsed."""
  data = _read_json(captions_json, "COCO captions")
  try:
    images, anns = data["images"], data["annotations"]
  except (KeyError, TypeError) as e:
    raise InputError(f"eval set: cannot read COCO captions {captions_json}: {e}") from None
  caps: dict[int, list[str]] = {}
  for a in sorted(anns, key=lambda a: a["id"]):
    caps.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
  images = sorted(images, key=lambda im: im["id"])
  if only_present:
    if storage.is_remote(images_dir):  # one listing, not a request per image
      base = os.fspath(images_dir).rstrip("/") + "/"
      present = {f.removeprefix(base) for f in storage.list_files(images_dir)}
      images = [im for im in images if im["file_name"] in present]
    else:
      images = [im for im in images if os.path.exists(os.path.join(images_dir, im["file_name"]))]
  entries = [(im["file_name"], caps.get(im["id"], [])) for im in images]
  return _caption_index(entries, str(images_dir), max_images)


def load_coco_captions(
  captions_json: str | os.PathLike,
  images_dir: str | os.PathLike,
  *,
  image_size: int | None = None,
  max_images: int | None = None,
  only_present: bool = True,
  resize: preprocess.ResizeMode = "shortest_edge_crop",
) -> CaptionSet:
  """:func:`coco_captions` with the images decoded (see :func:`load_images`)."""
  paths, captions, t2i = coco_captions(
    captions_json, images_dir, max_images=max_images, only_present=only_present
  )
  return CaptionSet(paths, load_images(paths, image_size=image_size, resize=resize), captions, t2i)


def karpathy_captions(
  karpathy_json: str | os.PathLike,
  images_dir: str | os.PathLike,
  *,
  split: str = "test",
  max_images: int | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
  """(image paths, captions, text_to_image) of one split of a Karpathy-split JSON
  (``dataset_coco.json`` / ``dataset_flickr30k.json``), in file order, without decoding."""
  try:
    data = _read_json(karpathy_json, "Karpathy JSON")["images"]
  except (KeyError, TypeError) as e:
    raise InputError(f"eval set: cannot read Karpathy JSON {karpathy_json}: {e}") from None
  entries = []
  for im in data:
    if im.get("split") != split:
      continue
    name = os.path.join(im.get("filepath", ""), im["filename"])
    entries.append((name, [" ".join(s["raw"].split()) for s in im.get("sentences", [])]))
  return _caption_index(entries, str(images_dir), max_images)


def load_karpathy(
  karpathy_json: str | os.PathLike,
  images_dir: str | os.PathLike,
  *,
  split: str = "test",
  image_size: int | None = None,
  max_images: int | None = None,
  resize: preprocess.ResizeMode = "shortest_edge_crop",
) -> CaptionSet:
  """:func:`karpathy_captions` with the images decoded (see :func:`load_images`)."""
  paths, captions, t2i = karpathy_captions(
    karpathy_json, images_dir, split=split, max_images=max_images
  )
  return CaptionSet(paths, load_images(paths, image_size=image_size, resize=resize), captions, t2i)


def load_class_set(
  path: str | os.PathLike,
  *,
  image_size: int | None = None,
  per_class: int | None = None,
  max_images: int | None = None,
  resize: preprocess.ResizeMode = "shortest_edge_crop",
) -> ClassSet:
  """Class-labelled images from ``path/<class>/*`` or a zip whose members end ``<class>/<file>``
  (e.g. the CIFAR-10 test zip, read in place). Classes sorted by name; files sorted; the first
  ``per_class`` of each class when given, else ``max_images // n_classes`` of each (a stratified,
  deterministic subset) when ``max_images`` is given."""
  sources, labels, classnames, paths = class_set_index(
    path, per_class=per_class, max_images=max_images
  )
  images = _decode_all(sources, image_size, resize)
  return ClassSet(images, labels, classnames, paths)


def class_set_index(
  path: str | os.PathLike, *, per_class: int | None = None, max_images: int | None = None
) -> tuple[list[Source], np.ndarray, list[str], list[str]]:
  """(sources, labels, classnames, names) of :func:`load_class_set`'s images, without decoding:
  a source is a file or (zip, member), for :class:`LazyImages`; names as ``ClassSet.paths``."""
  path = str(path)
  by_class: dict[str, list[str]] = {}
  where = storage.path(path)
  zf = _zip(path) if where.is_file() and _is_zip(path) else None
  try:
    if zf is not None:
      for n in zf.namelist():
        parts = n.split("/")
        if len(parts) >= 2 and os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTS:
          by_class.setdefault(parts[-2], []).append(n)
    elif storage.is_remote(path) and where.is_dir():
      for f in storage.list_files(path):  # one listing; <class>/<file> only, as below
        parts = f.removeprefix(path.rstrip("/") + "/").split("/")
        if len(parts) == 2 and os.path.splitext(parts[1])[1].lower() in IMAGE_EXTS:
          by_class.setdefault(parts[0], []).append(f)
    elif os.path.isdir(path):
      for d in sorted(pathlib.Path(path).iterdir()):
        files = (
          sorted(str(f) for f in d.glob("*") if f.suffix.lower() in IMAGE_EXTS)
          if d.is_dir()
          else []
        )
        if files:
          by_class[d.name] = files
    elif not where.exists():
      raise InputError(f"eval set: class-folder dataset not found: {path}")
    else:
      raise InputError(f"eval set: {path} is neither a class-folder directory nor a zip")
    if not by_class:
      raise InputError(f"eval set: no <class>/<image> files in {path}")
    classnames = sorted(by_class)
    if per_class is None and max_images is not None:
      per_class = max(1, max_images // len(classnames))
    sources, labels, names = [], [], []
    for label, c in enumerate(classnames):
      for n in sorted(by_class[c])[:per_class]:
        sources.append((path, n) if zf is not None else n)
        labels.append(label)
        names.append(f"{path}:{n}" if zf is not None else n)
  finally:
    if zf is not None:
      zf.close()
  return sources, np.asarray(labels, np.int64), classnames, names


def _is_zip(path: str) -> bool:
  if not storage.is_remote(path):
    return zipfile.is_zipfile(path)
  with storage.path(path).open("rb") as f:
    return zipfile.is_zipfile(f)


def class_prompts(classnames: list[str], template: str = "a photo of a {class}.") -> list[str]:
  """One prompt per class (underscores shown as spaces), same template as class-folder training."""
  return [template.format(**{"class": c.replace("_", " ")}) for c in classnames]


__all__ = [
  "CaptionSet",
  "ClassSet",
  "LazyImages",
  "class_set_index",
  "coco_captions",
  "load_coco_captions",
  "load_images",
  "load_karpathy",
  "load_class_set",
  "class_prompts",
]
