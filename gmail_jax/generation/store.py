"""Where generated images go: chunks, per-batch journals, atomic parts, the manifest and summary.

Work split: item i = (caption i // K, k = i % K); chunk c = items [c*chunk_size, (c+1)*chunk_size).
A finished chunk is DIR/parts/part-<c>.parquet (temp name + rename); inside a chunk each batch's
images are renamed into place and then recorded in DIR/parts/part-<c>.jsonl, so a restart skips
finished chunks and finished batches. No torch here: every backend writes through this module.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
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


def atomic_write(path: pathlib.Path, data: bytes, tmp_dir: pathlib.Path | None = None) -> None:
  tmp = (tmp_dir or path.parent) / tmp_name(path.name)
  tmp.write_bytes(data)
  os.replace(tmp, path)


def part_path(workdir: pathlib.Path, c: int) -> pathlib.Path:
  return workdir / "parts" / f"part-{c:06d}.parquet"


def journal_path(workdir: pathlib.Path, c: int) -> pathlib.Path:
  return workdir / "parts" / f"part-{c:06d}.jsonl"


def append_line(path: pathlib.Path, record: dict) -> None:
  # One O_APPEND write: a SIGKILL leaves whole lines (a torn last line is ignored on read).
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, (json.dumps(record) + "\n").encode())
  finally:
    os.close(fd)


def read_journal(path: pathlib.Path) -> dict[int, list[dict]]:
  done: dict[int, list[dict]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      done[int(rec["batch"])] = rec["rows"]
  return done


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
