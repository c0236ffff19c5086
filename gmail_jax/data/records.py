"""One paired example as bytes: the record format of the ArrayRecord shards.

Layout: ``b"GMP1"`` | uint32 little-endian header length | UTF-8 JSON header | real | gen bytes.
The header holds ``caption, real_name, gen_name, group, real_id, item, real_len, gen_len``; the
image bytes are encoded files: the originals (JPEG/PNG/WebP) or, for images ``prepare`` resized
(``--resize_short``), a JPEG of the resized image, or with ``prepare --store=train`` a JPEG of the
training crop (meta.json says which).
"""

from __future__ import annotations

import json
import struct

from gmail_jax.errors import InputError

MAGIC = b"GMP1"


def pack_pair(
  *,
  caption: str,
  real: bytes,
  gen: bytes,
  real_name: str,
  gen_name: str,
  group: int,
  real_id: int,
  item: int,
) -> bytes:
  header = json.dumps(
    {
      "caption": caption,
      "real_name": real_name,
      "gen_name": gen_name,
      "group": int(group),
      "real_id": int(real_id),
      "item": int(item),
      "real_len": len(real),
      "gen_len": len(gen),
    },
    ensure_ascii=False,
  ).encode()
  return MAGIC + struct.pack("<I", len(header)) + header + bytes(real) + bytes(gen)


def unpack_pair(record: bytes) -> dict:
  """Inverse of :func:`pack_pair`: the header fields plus ``real`` and ``gen`` bytes."""
  if record[:4] != MAGIC:
    raise InputError("not a gmail_jax pair record (bad magic)")
  (hlen,) = struct.unpack("<I", record[4:8])
  header = json.loads(record[8 : 8 + hlen].decode())
  start = 8 + hlen
  real_end = start + header["real_len"]
  gen_end = real_end + header["gen_len"]
  if gen_end != len(record):
    raise InputError(f"pair record length {len(record)} != expected {gen_end} (truncated record)")
  header["real"] = record[start:real_end]
  header["gen"] = record[real_end:gen_end]
  return header
