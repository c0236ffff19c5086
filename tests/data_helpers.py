"""Shared setup of the data tests: configs, eval-order batches, small views of the shared data,
a small JPEG manifest, and every file of a folder (local or in a bucket)."""

from __future__ import annotations

import io
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping

import ml_collections
import PIL.Image

from gmail_jax import storage
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


def jpeg(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
  buf = io.BytesIO()
  PIL.Image.new("RGB", size, color).save(buf, "JPEG")
  return buf.getvalue()


def jpeg_manifest(folder: pathlib.Path, plan_reject: bool = True, where: str | None = None) -> str:
  """``folder/m.jsonl``: 10 usable rows of 40x30 JPEG pairs in ``where/img`` (default
  ``folder/img``; a bucket URL too), the generated image of row 4 corrupt; ``plan_reject``: + a
  row with no caption (rejected while planning). Paths are absolute."""
  img = storage.join(where or folder, "img")
  rows = []
  for i in range(10):
    storage.write_bytes(storage.join(img, f"r{i}.jpg"), jpeg((40 + i, 30), (20 * i, 0, 0)))
    storage.write_bytes(storage.join(img, f"g{i}.jpg"), jpeg((30, 40 + i), (0, 20 * i, 0)))
    rows.append(
      {
        "caption": f"pair {i}",
        "real_path": storage.join(img, f"r{i}.jpg"),
        "gen_path": storage.join(img, f"g{i}.jpg"),
        "group": f"g{i // 3}",
      }
    )
  storage.write_bytes(storage.join(img, "g4.jpg"), b"\xff\xd8 not really a jpeg")
  if plan_reject:
    rows.insert(7, {"caption": " ", "real_path": rows[0]["real_path"], "gen_path": "x.jpg"})
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(folder / "m.jsonl")


def folder_files(out: str | os.PathLike) -> dict:
  """Every file directly in ``out`` (a local folder or a bucket prefix): bytes, and meta.json
  without its timing."""
  files = {p.name: p.read_bytes() for p in storage.path(out).iterdir() if p.is_file()}
  if "meta.json" in files:
    meta = json.loads(files.pop("meta.json"))
    meta.pop("seconds")
    files["meta.json"] = meta
  return files


def assert_same_files(a: str | os.PathLike, b: str | os.PathLike) -> None:
  fa, fb = folder_files(a), folder_files(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    assert fa[name] == fb[name], name
  assert not [n for n in fa if ".tmp-" in n]
