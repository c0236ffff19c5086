"""Caption readers: COCO captions JSON, Karpathy JSON, CSV / TSV / JSONL / Parquet -> ``Captions``.

COCO: caption_id = annotation id, group = image id, real_path = ``real_images``/file_name.
Karpathy: sentid, cocoid/imgid, filepath/filename; ``split`` picks splits. Tables: ``caption``
and optional ``caption_id`` (default: the row number), ``real_path`` (relative to
``real_images``, else to the captions file) and ``group``. Ids must be file-name safe and unique.
The captions file and ``real_images`` may be in a bucket (``gs://...``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
from typing import Any

import ml_collections

from gmail_jax import storage
from gmail_jax.errors import ConfigError, InputError

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Captions:
  """Parallel lists: ``ids``, ``texts`` and ``real_path`` / ``group`` (None where unknown)."""

  def __init__(self, ids, texts, real_path, group, source: str):
    self.ids, self.texts, self.real_path, self.group = ids, texts, real_path, group
    self.source = source

  def __len__(self) -> int:
    return len(self.ids)

  def fingerprint(self) -> str:
    """sha256 of the (caption_id, caption) sequence: what the images were generated from."""
    h = hashlib.sha256()
    for i, t in zip(self.ids, self.texts, strict=True):
      h.update(f"{i}\x1f{t}\n".encode())
    return h.hexdigest()


def _clean(text: Any) -> str:
  return " ".join(str(text).split()) if text is not None else ""


def _read_table(path: storage.Path):
  """A pyarrow Table of a CSV / TSV / JSONL / Parquet file, every column read as written (a
  bucket's through its file object: pyarrow's own gs:// filesystem looks for credentials)."""
  import pyarrow as pa

  suffix = path.suffix.lower()
  source = path.open("rb") if storage.is_remote(path) else contextlib.nullcontext(os.fspath(path))
  try:
    with source as f:
      if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pacsv

        return pacsv.read_csv(
          f,
          parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
          convert_options=pacsv.ConvertOptions(
            strings_can_be_null=True, column_types={"caption_id": pa.string()}
          ),
        )
      if suffix in (".jsonl", ".ndjson"):
        import pyarrow.json as pajson

        return pajson.read_json(f)
      if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(f)
  except (pa.ArrowInvalid, OSError) as e:
    raise InputError(f"captions {path}: cannot parse: {' '.join(str(e).split())}") from None
  raise InputError(f"captions {path}: unknown format {suffix!r} (.json, .csv, .jsonl, .parquet)")


def _from_json(path: storage.Path, split: str, real_images: str) -> tuple[list, ...]:
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise InputError(f"captions {path}: cannot read JSON: {e}") from None
  ids, texts, reals, groups = [], [], [], []
  join = (lambda name: os.path.join(real_images, name)) if real_images else (lambda name: None)
  if isinstance(data, dict) and "annotations" in data:  # COCO captions
    files = {im["id"]: im["file_name"] for im in data.get("images", [])}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
      ids.append(str(a["id"]))
      texts.append(_clean(a.get("caption")))
      name = files.get(a["image_id"])
      reals.append(join(name) if name else None)
      groups.append(str(a["image_id"]))
  elif isinstance(data, dict) and "images" in data:  # Karpathy
    splits = {s.strip() for s in split.split(",") if s.strip()}
    for im in data["images"]:
      if splits and im.get("split") not in splits:
        continue
      name = os.path.join(im.get("filepath", ""), im["filename"])
      gid = im.get("cocoid", im.get("imgid"))
      for s in im.get("sentences", []):
        ids.append(str(s["sentid"]))
        texts.append(_clean(s.get("raw")))
        reals.append(join(name))
        groups.append(None if gid is None else str(gid))
  else:
    raise InputError(f"captions {path}: neither COCO captions ('annotations') nor Karpathy JSON")
  return ids, texts, reals, groups


def _from_table(path: storage.Path, real_images: str) -> tuple[list, ...]:
  table = _read_table(path)
  if "caption" not in table.column_names:
    raise InputError(f"captions {path}: no 'caption' column (has {', '.join(table.column_names)})")
  n = table.num_rows

  def column(name):
    if name not in table.column_names:
      return [None] * n
    return [None if v is None else str(v) for v in table.column(name).to_pylist()]

  texts = [_clean(t) for t in column("caption")]
  ids = [i if i is not None else str(r) for r, i in enumerate(column("caption_id"))]
  base = real_images or str(path.parent)
  reals = [None if p is None else os.path.join(base, p) for p in column("real_path")]
  return ids, texts, reals, column("group")


def read_captions(config: ml_collections.ConfigDict) -> Captions:
  """The captions to generate for, in order (``only_with_real`` and ``max_captions`` applied)."""
  path = storage.path(config.captions)
  if not path.is_file():
    raise InputError(f"config.captions: file not found: {path}")
  if path.suffix.lower() == ".json":
    ids, texts, reals, groups = _from_json(path, config.split, config.real_images)
  else:
    ids, texts, reals, groups = _from_table(path, config.real_images)
  reals = [p if p is None or storage.is_remote(p) else os.path.abspath(p) for p in reals]
  if config.only_with_real:
    if not any(reals):
      raise ConfigError(
        "config.only_with_real: the captions name no real image (set config.real_images)"
      )
    present = _existing([p for p in reals if p])
    keep = [i for i, p in enumerate(reals) if p in present]
    ids, texts = [ids[i] for i in keep], [texts[i] for i in keep]
    reals, groups = [reals[i] for i in keep], [groups[i] for i in keep]
  if config.max_captions:
    ids, texts = ids[: config.max_captions], texts[: config.max_captions]
    reals, groups = reals[: config.max_captions], groups[: config.max_captions]
  if not ids:
    raise InputError(f"captions {path}: no captions (after split / only_with_real filters)")
  seen: set[str] = set()
  for row, cid in enumerate(ids):
    if not _SAFE_ID.fullmatch(cid):
      raise InputError(
        f"captions {path}: caption_id {cid!r} (caption {row}) is not file-name safe"
        " (letters, digits, '.', '_', '-'; at most 128)"
      )
    if cid in seen:
      raise InputError(f"captions {path}: caption_id {cid!r} appears twice")
    seen.add(cid)
  return Captions(ids, texts, reals, groups, str(path))


def _existing(paths: list[str]) -> set[str]:
  """Those of ``paths`` that exist: local ones checked one by one, a bucket's by listing each
  folder once (one request per thousand names, not one per image)."""
  out = {p for p in paths if not storage.is_remote(p) and os.path.exists(p)}
  folders = collections.defaultdict(list)
  for p in paths:
    if storage.is_remote(p):
      folders[p.rpartition("/")[0]].append(p)
  for folder, members in folders.items():
    try:
      names = {q.name for q in storage.path(folder).iterdir()}
    except FileNotFoundError:
      continue
    out.update(p for p in members if p.rpartition("/")[2] in names)
  return out
