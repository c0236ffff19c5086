"""Where generated images go: chunks, per-batch journal entries, whole parts, the manifest.

DIR (``--workdir``) is a local folder or a bucket folder (``gs://bucket/run``); every file goes
through gmail_jax/storage.py. A bucket has no append and no rename, so nothing here relies on
either: every file is written whole (local: temp name + rename; bucket: one upload, the object
appearing when complete), and nothing is ever appended to.

Work split: item i = (caption i // K, k = i % K); chunk c = items [c*chunk_size, (c+1)*chunk_size).
A finished chunk is DIR/parts/part-<c>.parquet. Inside a chunk, each batch's images are written
(local: fsynced, renamed into place, their folder fsynced; bucket: uploaded) before the batch's
journal entry DIR/parts/part-<c>.journal/item-<i>.json (its rows, keyed by (caption_id, k)) is
written the same way: one new file per batch, never a grown one. So after a kill or a power loss
every journaled image is there, and a restart generates exactly the items of the chunk that no
entry records, in batches of the current batch_size. No torch here: every backend writes through
this module.
"""

from __future__ import annotations

import fnmatch
import io
import json
import math
import os
import re

import numpy as np

from gmail_jax import storage
from gmail_jax.generation.captions import Captions

MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"


def num_chunks(n_items: int, chunk_size: int) -> int:
  return math.ceil(n_items / chunk_size)


def chunk_items(c: int, n_items: int, chunk_size: int) -> range:
  return range(c * chunk_size, min(n_items, (c + 1) * chunk_size))


def shard_chunks(n_chunks: int, shard_index: int, num_shards: int) -> range:
  return range(shard_index, n_chunks, num_shards)


def workdir_path(workdir: storage.PathLike) -> storage.Path:
  """``workdir`` as a path: a bucket URL as given, a local path made absolute (the summary and
  the stage record name it)."""
  return storage.path(workdir if storage.is_remote(workdir) else os.path.abspath(workdir))


def part_path(workdir: storage.Path, c: int) -> storage.Path:
  return workdir / "parts" / f"part-{c:06d}.parquet"


def journal_path(workdir: storage.Path, c: int) -> storage.Path:
  return workdir / "parts" / f"part-{c:06d}.journal"


_PART_NAME = re.compile(r"part-(\d{6,})\.(parquet|journal|jsonl)")


def scan_parts(workdir: storage.Path) -> tuple[set[int], set[int]]:
  """(chunks whose part is written, chunks with a journal) from one listing of DIR/parts: a
  bucket answers one request per thousand names, not one per chunk."""
  parts, journals = set(), set()
  try:
    names = [p.name for p in (workdir / "parts").iterdir()]
  except FileNotFoundError:  # nothing generated yet (a bucket has no empty folders)
    names = []
  for name in names:
    m = _PART_NAME.fullmatch(name)
    if m:
      (parts if m[2] == "parquet" else journals).add(int(m[1]))
  return parts, journals


def write_journal_entry(journal: storage.Path, first_item: int, rows: list[dict]) -> None:
  """One batch's rows, durable, after its images (see the module docstring)."""
  storage.makedirs(journal)
  entry = journal / f"item-{first_item:09d}.json"
  storage.write_bytes(entry, json.dumps({"rows": rows}).encode(), durable=True)
  storage.sync_dir(journal)


def read_journal(journal: storage.Path) -> dict[tuple[str, int], dict]:
  """{(caption_id, k): row} of a chunk's journal entries (temp names of a killed write ignored;
  also reads the single-file journal part-<c>.jsonl that earlier versions appended to)."""
  done: dict[tuple[str, int], dict] = {}
  try:
    entries = sorted(p for p in journal.iterdir() if fnmatch.fnmatchcase(p.name, "item-*.json"))
  except (FileNotFoundError, NotADirectoryError):
    entries = []
  texts = [p.read_text() for p in entries]
  legacy = journal.with_suffix(".jsonl")
  if legacy.exists():
    texts += legacy.read_text().splitlines()
  for text in texts:
    try:
      rows = json.loads(text)["rows"]
    except (ValueError, KeyError):
      continue  # a torn last line of a legacy journal
    done.update({(r["caption_id"], int(r["k"])): r for r in rows})
  return done


def remove_journal(journal: storage.Path) -> None:
  storage.rmtree(journal)
  legacy = journal.with_suffix(".jsonl")
  if legacy.exists():
    legacy.unlink()


PART_COLUMNS = ("caption_id", "k", "gen_path", "seed", "reject", "truncated")


def write_part(path: storage.Path, rows: list[dict]) -> None:
  """A finished chunk's rows, whole and durable (its journal is removed next)."""
  import pyarrow as pa

  schema = pa.schema(
    [("caption_id", pa.string()), ("k", pa.int32()), ("gen_path", pa.string()),
     ("seed", pa.int64()), ("reject", pa.string()), ("truncated", pa.bool_())]
  )  # fmt: skip
  table = pa.Table.from_pylist([{c: r.get(c) for c in PART_COLUMNS} for r in rows], schema=schema)
  storage.write_bytes(path, parquet_bytes(table), durable=True)
  storage.sync_dir(path.parent)


def parquet_bytes(table) -> bytes:
  """``table`` as a Parquet file's bytes (the same bytes ``pq.write_table`` writes to a path),
  to be written whole: a bucket object is one upload, never a file grown in place."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  sink = pa.BufferOutputStream()
  pq.write_table(table, sink)
  return sink.getvalue().to_pybytes()


def read_parquet(path: storage.Path):
  """The Table of Parquet file ``path``, local or in a bucket (read whole: no pyarrow filesystem,
  which would look for default credentials)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  return pq.read_table(pa.BufferReader(path.read_bytes()))


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
  """uint8 [H, W, 3] -> JPEG (4:2:0, ``quality``) or PNG bytes."""
  import PIL.Image

  buf = io.BytesIO()
  image = PIL.Image.fromarray(pixels)
  if image_format == "png":
    image.save(buf, format="PNG")
  else:
    image.save(buf, format="JPEG", quality=int(quality))
  return buf.getvalue()


def manifest_path(workdir: storage.PathLike) -> storage.Path:
  return storage.path(workdir) / MANIFEST


def manifest_table(captions: Captions, rows, gen_path, seed):
  """The manifest Table: caption_id, k, caption, gen_path, seed[, real_path][, group]."""
  import pyarrow as pa

  index = {cid: i for i, cid in enumerate(captions.ids)}
  at = [index[cid] for cid in rows["caption_id"]]
  cols = {
    "caption_id": pa.array(rows["caption_id"], pa.string()),
    "k": pa.array(rows["k"], pa.int32()),
    "caption": pa.array([captions.texts[i] for i in at], pa.string()),
    "gen_path": pa.array(gen_path, pa.string()),
    "seed": pa.array(seed, pa.int64()),
  }
  for name, values in (("real_path", captions.real_path), ("group", captions.group)):
    if any(v is not None for v in values):
      cols[name] = pa.array([values[i] for i in at], pa.string())
  return pa.table(cols)


def write_manifest(workdir: storage.Path, table) -> storage.Path:
  path = manifest_path(workdir)
  storage.write_bytes(path, parquet_bytes(table))  # concurrent writers write the same bytes
  return path


def write_summary(workdir: storage.Path, summary: dict) -> dict:
  storage.write_json(workdir / SUMMARY, summary)
  reasons = "".join(f", {k}: {v}" for k, v in summary["reject_reasons"].items())
  print(
    f"manifest: {summary['images']} images for {summary['captions']} captions"
    f" ({summary['rejected']} rejected{reasons}) -> {summary['manifest']}",
    flush=True,
  )
  return summary
