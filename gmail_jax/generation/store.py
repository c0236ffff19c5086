"""Where generated images go: chunks, per-batch journal entries, atomic parts, the manifest.

Work split: item i = (caption i // K, k = i % K); chunk c = items [c*chunk_size, (c+1)*chunk_size).
A finished chunk is DIR/parts/part-<c>.parquet. Inside a chunk, each batch's images are written
(fsynced, renamed into place, their directory fsynced) before the batch's journal entry
DIR/parts/part-<c>.journal/item-<i>.json (its rows, keyed by (caption_id, k)) is written the same
way, so after a kill or a power loss every journaled image is on disk, and a restart generates
exactly the items of the chunk that no entry records, in batches of the current batch_size.
Every file is written whole under a temp name and renamed (an object store writes it whole);
nothing is appended to. No torch here: every backend writes through this module.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import shutil
import socket

import numpy as np

from gmail_jax.generation.captions import Captions

MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"


def num_chunks(n_items: int, chunk_size: int) -> int:
  return math.ceil(n_items / chunk_size)


def chunk_items(c: int, n_items: int, chunk_size: int) -> range:
  return range(c * chunk_size, min(n_items, (c + 1) * chunk_size))


def shard_chunks(n_chunks: int, shard_index: int, num_shards: int) -> range:
  return range(shard_index, n_chunks, num_shards)


def tmp_name(name: str) -> str:
  return f"{name}.tmp-{socket.gethostname()}-{os.getpid()}"


def atomic_write(
  path: pathlib.Path, data: bytes, tmp_dir: pathlib.Path | None = None, durable: bool = False
) -> None:
  """``data`` at ``path``, whole or not at all (temp name + rename); ``durable``: the bytes reach
  the disk before the rename (fsync), so a power loss never leaves a named but empty file."""
  tmp = (tmp_dir or path.parent) / tmp_name(path.name)
  with open(tmp, "wb") as f:
    f.write(data)
    if durable:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, path)


def fsync_dir(path: pathlib.Path) -> None:
  """Makes the renames into ``path`` durable (the directory entry, not only the file)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def create_exclusive(path: pathlib.Path, data: bytes) -> bool:
  """Writes ``path`` only if no file is there, whole (temp file + hard link, which fails when
  the name exists: two processes starting together cannot both write it). Returns whether this
  call created it."""
  tmp = path.parent / tmp_name(path.name)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    tmp.unlink()


def part_path(workdir: pathlib.Path, c: int) -> pathlib.Path:
  return workdir / "parts" / f"part-{c:06d}.parquet"


def journal_path(workdir: pathlib.Path, c: int) -> pathlib.Path:
  return workdir / "parts" / f"part-{c:06d}.journal"


def write_journal_entry(journal: pathlib.Path, first_item: int, rows: list[dict]) -> None:
  """One batch's rows, durable, after its images (see the module docstring)."""
  journal.mkdir(exist_ok=True)
  entry = journal / f"item-{first_item:09d}.json"
  atomic_write(entry, json.dumps({"rows": rows}).encode(), durable=True)
  fsync_dir(journal)


def read_journal(journal: pathlib.Path) -> dict[tuple[str, int], dict]:
  """{(caption_id, k): row} of a chunk's journal entries (temp files of a killed write ignored;
  also reads the single-file journal part-<c>.jsonl that earlier versions appended to)."""
  done: dict[tuple[str, int], dict] = {}
  texts = [p.read_text() for p in sorted(journal.glob("item-*.json"))] if journal.is_dir() else []
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


def remove_journal(journal: pathlib.Path) -> None:
  shutil.rmtree(journal, ignore_errors=True)
  journal.with_suffix(".jsonl").unlink(missing_ok=True)


PART_COLUMNS = ("caption_id", "k", "gen_path", "seed", "reject", "truncated")


def write_part(path: pathlib.Path, rows: list[dict], tmp_dir: pathlib.Path) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq

  schema = pa.schema(
    [("caption_id", pa.string()), ("k", pa.int32()), ("gen_path", pa.string()),
     ("seed", pa.int64()), ("reject", pa.string()), ("truncated", pa.bool_())]
  )  # fmt: skip
  table = pa.Table.from_pylist([{c: r.get(c) for c in PART_COLUMNS} for r in rows], schema=schema)
  tmp = tmp_dir / tmp_name(path.name)
  pq.write_table(table, tmp)
  os.replace(tmp, path)


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


def manifest_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / MANIFEST


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


def write_manifest(workdir: pathlib.Path, table) -> pathlib.Path:
  import pyarrow.parquet as pq

  path = manifest_path(workdir)
  tmp = workdir / tmp_name(MANIFEST)
  pq.write_table(table, tmp)
  os.replace(tmp, path)
  return path


def write_summary(workdir: pathlib.Path, summary: dict) -> dict:
  atomic_write(workdir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
  reasons = "".join(f", {k}: {v}" for k, v in summary["reject_reasons"].items())
  print(
    f"manifest: {summary['images']} images for {summary['captions']} captions"
    f" ({summary['rejected']} rejected{reasons}) -> {summary['manifest']}",
    flush=True,
  )
  return summary
