"""Paired data -> ArrayRecord shards: ``python -m gmail_jax.data.prepare --src=... --out=...``.

Sources (``--kind`` auto-detected):

* ``manifest``: a CSV / JSONL / Parquet manifest (``caption, real_path, gen_path[, group]``);
* ``class_folders``: ``SRC/real/<class>/…`` + ``SRC/generated/<class>/…``; the pairing of epoch 0
  (same-class real drawn by ``--seed``) is frozen into the records;
* ``wds``: webdataset tar shards (a .tar, a directory of .tar, or a comma-separated list), as
  written by img2dataset. Members of one example share a key (basename up to its first dot):

    KEY.txt                     caption (or ``"caption"`` in KEY.json)
    KEY.json                    optional metadata; ``"group"`` overrides the group (default: KEY)
    KEY.real.jpg + KEY.gen.jpg  a GMAIL pair; K generated images: KEY.gen.0.jpg, KEY.gen.1.jpg …
    KEY.jpg                     plain img2dataset output (real image only): the generated image(s)
                                come from ``--gen_dir`` as GEN_DIR/KEY.jpg or GEN_DIR/KEY.N.jpg

  (any of jpg/jpeg/png/webp). Each generated image becomes one record; ``real_id`` numbers keys.

Output in ``--out``: ``pairs-NNNNN.array_record`` (records in :mod:`gmail_jax.data.records`
format), ``index.npz`` (``item, group, real_id`` per record, used for pairing without reading the
shards), ``meta.json``, and ``rejects.jsonl`` (skipped inputs).
Train on it with ``config.data.source='array_record'``, ``config.data.root=OUT``.

Stored images (``--resize_short``, ``--quality``): by default every image whose short side exceeds
256 px is stored as a JPEG (quality 90) resized with PIL bicubic so its short side is 256 (long side
``int(256 * long / short)``, the CLIP rule), so training decodes small JPEGs: a 224 crop with room
for random-resized-crop augmentation. Large JPEGs are draft-decoded (DCT downscaling, see
:func:`gmail_jax.data.images.decode_image`) before that resize. Smaller images are never upscaled;
their original bytes are kept, as are all bytes with ``--resize_short=0``. Every input is decoded
(also with ``--verify=false`` when resizing), so corrupt files go to ``rejects.jsonl``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import pathlib
import sys
import tarfile
import time

import numpy as np
import PIL.Image

from gmail_jax.data.images import decode_image
from gmail_jax.data.preprocess import resize_output_size
from gmail_jax.data.records import pack_pair
from gmail_jax.data.rejects import BadInput, BadInputError, RejectLog
from gmail_jax.data.sources import (
  IMAGE_EXTS,
  INDEX_FILE,
  MANIFEST_COLUMNS,
  ClassFolderSource,
  ManifestSource,
  read_bytes,
  write_meta,
)
from gmail_jax.errors import InputError

FORMAT = "gmail_jax.pairs/1"


def _writer(path: str):
  from array_record.python.array_record_module import ArrayRecordWriter

  return ArrayRecordWriter(path, "group_size:1")  # one record per chunk: fast random access


DEFAULT_RESIZE_SHORT = 256  # 224 crops + headroom for random resized crops
DEFAULT_QUALITY = 90


def _stored(data: bytes, name: str, verify: bool, resize_short: int, quality: int) -> bytes:
  """The bytes to store for one image: the original file, or a JPEG resized to ``resize_short``.

  Raises :class:`BadInput` for an undecodable image (whenever it is decoded: always when resizing).
  """
  if not resize_short:
    if verify:
      decode_image(data, name)
    return data
  image = decode_image(data, name, draft_short=resize_short)
  with PIL.Image.open(io.BytesIO(data)) as header:  # the size before draft scaling
    width, height = header.size
  if min(width, height) <= resize_short:  # never upscale: keep the original bytes
    return data
  # from the original size: a draft-scaled size is rounded up and could shift the long side
  new_h, new_w = resize_output_size(height, width, resize_short)
  out = image.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)
  buf = io.BytesIO()
  out.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def _write_rows(
  path: str, rows: list[dict], log: RejectLog, verify: bool, resize_short: int, quality: int
) -> list[tuple]:
  """Rows of paths -> one shard; returns (item, group, real_id) of the records written."""
  kept = []
  writer = _writer(path)
  store = (verify, resize_short, quality)
  try:
    for row in rows:
      try:
        gen = _stored(read_bytes(row["gen_path"]), row["gen_path"], *store)
        real = _stored(read_bytes(row["real_path"]), row["real_path"], *store)
      except BadInput as e:
        log.reject(e.path, e.reason)
        continue
      writer.write(
        pack_pair(
          caption=row["caption"],
          real=real,
          gen=gen,
          real_name=row["real_path"],
          gen_name=row["gen_path"],
          group=row["group"],
          real_id=row["real_id"],
          item=row["item"],
        )
      )
      kept.append((row["item"], row["group"], row["real_id"]))
  finally:
    writer.close()
  return kept


def _split_ext(name: str) -> tuple[str, str]:
  """'dir/KEY.gen.0.jpg' -> ('dir/KEY', 'gen.0.jpg') (webdataset key = basename up to first dot)."""
  head, base = os.path.split(name)
  key, _, suffix = base.partition(".")
  return os.path.join(head, key), suffix.lower()


def _is_image(suffix: str) -> bool:
  return ("." + suffix.rsplit(".", 1)[-1]) in IMAGE_EXTS


def _wds_examples(tar_path: str, gen_dir: str | None):
  """(key, {suffix: bytes}) per example of one tar, in tar order."""
  with tarfile.open(tar_path, "r|*") as tar:
    key, members = None, {}
    for info in tar:
      if not info.isfile():
        continue
      k, suffix = _split_ext(info.name)
      if k != key and key is not None:
        yield key, members
        members = {}
      key = k
      members[suffix] = tar.extractfile(info).read()
    if key is not None:
      yield key, members


def _wds_pairs(key: str, members: dict, gen_dir: str | None, where: str):
  """Caption, real bytes, [(gen_name, gen bytes)], group key of one webdataset example."""
  meta = {}
  if "json" in members:
    try:
      meta = json.loads(members["json"])
    except ValueError:
      meta = {}
  if "txt" in members:
    caption = members["txt"].decode("utf-8", "replace").strip()
  else:
    caption = str(meta.get("caption") or "").strip()
  if not caption:
    raise BadInput(where, "missing caption (KEY.txt or caption in KEY.json)")
  real = [s for s in members if _is_image(s) and (s.startswith("real.") or s.count(".") == 0)]
  if not real:
    raise BadInput(where, "missing real image (KEY.real.jpg or KEY.jpg)")
  gens = sorted((s, members[s]) for s in members if _is_image(s) and s.startswith("gen."))
  gens = [(f"{where}.{s}", b) for s, b in gens]
  if not gens and gen_dir:
    base = os.path.join(gen_dir, os.path.basename(key))
    for ext in IMAGE_EXTS:
      if os.path.exists(base + ext):
        gens.append((base + ext, read_bytes(base + ext)))
    for n in range(1024):
      found = [base + f".{n}{ext}" for ext in IMAGE_EXTS if os.path.exists(base + f".{n}{ext}")]
      if not found:
        break
      gens.append((found[0], read_bytes(found[0])))
  if not gens:
    raise BadInput(where, "no generated image (KEY.gen.jpg in the tar or --gen_dir/KEY.jpg)")
  group = str(meta.get("group", key))
  return caption, members[real[0]], f"{where}.{real[0]}", gens, group


def _write_tar(
  path: str, tar_path: str, gen_dir, log: RejectLog, verify: bool, resize_short: int, quality: int
):
  """One webdataset tar -> one shard; returns (local_key_index, group_str, local_key_index)."""
  kept = []
  writer = _writer(path)
  store = (verify, resize_short, quality)
  try:
    n_keys = 0
    for key, members in _wds_examples(tar_path, gen_dir):
      where = f"{tar_path}:{key}"
      try:
        caption, real, real_name, gens, group = _wds_pairs(key, members, gen_dir, where)
        real = _stored(real, real_name, *store)
      except BadInput as e:
        log.reject(e.path, e.reason)
        continue
      local = n_keys
      n_keys += 1
      for gen_name, gen in gens:
        try:
          gen = _stored(gen, gen_name, *store)
        except BadInput as e:
          log.reject(e.path, e.reason)
          continue
        rec = pack_pair(
          caption=caption,
          real=real,
          gen=gen,
          real_name=real_name,
          gen_name=gen_name,
          group=0,
          real_id=local,
          item=local,
        )
        writer.write(rec)
        kept.append((local, group, local))
  finally:
    writer.close()
  return kept, n_keys


def _detect(src: str) -> str:
  p = pathlib.Path(src.split(",")[0])
  if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet"):
    return "manifest"
  if p.is_dir() and (p / "real").is_dir() and (p / "generated").is_dir():
    return "class_folders"
  if p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
    return "wds"
  raise InputError(
    f"prepare: cannot tell what {src} is (manifest file, class-folder root, or tars)"
  )


def prepare(
  src: str,
  out: str,
  *,
  kind: str = "auto",
  root: str | None = None,
  gen_dir: str | None = None,
  template: str = "a photo of a {class}.",
  seed: int = 0,
  shard_size: int = 10_000,
  num_workers: int = 1,
  verify: bool = True,
  on_bad_input: str = "skip",
  resize_short: int | None = DEFAULT_RESIZE_SHORT,
  quality: int = DEFAULT_QUALITY,
) -> dict:
  """Write ``src`` as ArrayRecord shards under ``out``; returns the meta dict (also meta.json).

  ``resize_short``: short side of the stored images (larger ones are resized and re-encoded as
  JPEG at ``quality``); 0 or None keeps every image's original bytes.
  """
  start = time.time()
  resize_short = int(resize_short or 0)
  if resize_short < 0 or not 1 <= quality <= 100:
    raise InputError(f"prepare: --resize_short={resize_short} >= 0, --quality={quality} in 1..100")
  outp = pathlib.Path(out)
  outp.mkdir(parents=True, exist_ok=True)
  for old in outp.glob("pairs-*.array_record"):
    old.unlink()
  log = RejectLog.for_workdir(outp, on_bad_input)
  kind = _detect(src) if kind == "auto" else kind
  jobs = []  # (fn, args)
  if kind in ("manifest", "class_folders"):
    if kind == "manifest":
      source = ManifestSource(src, root=root, gens_per_caption=0, log=log)
      rows = [source.row_fields(r) for r in range(source.num_rows)]
    else:
      source = ClassFolderSource(src, template=template, seed=seed)
      rows = []
      for i in range(len(source)):
        gen_path, real_path, c, real_id = source.pair_paths(i, 0)
        rows.append(
          dict(
            caption=source.caption(c),
            gen_path=gen_path,
            real_path=real_path,
            group=c,
            real_id=real_id,
            item=i,
          )
        )
    n_shards = max(1, -(-len(rows) // shard_size))
    for s in range(n_shards):
      path = str(outp / f"pairs-{s:05d}-of-{n_shards:05d}.array_record")
      chunk = rows[s * shard_size : (s + 1) * shard_size]
      jobs.append((_write_rows, (path, chunk, log, verify, resize_short, quality)))
  elif kind == "wds":
    parts = src.split(",")
    tars = []
    for part in parts:
      p = pathlib.Path(part)
      tars += sorted(str(t) for t in p.glob("*.tar")) if p.is_dir() else [str(p)]
    if not tars:
      raise InputError(f"prepare: no .tar shards in {src}")
    for s, tar in enumerate(tars):
      path = str(outp / f"pairs-{s:05d}-of-{len(tars):05d}.array_record")
      jobs.append((_write_tar, (path, tar, gen_dir, log, verify, resize_short, quality)))
  else:
    raise InputError(f"prepare: --kind={kind!r}: expected auto, manifest, class_folders or wds")

  if num_workers > 1 and len(jobs) > 1:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
      results = list(pool.map(_call, jobs))
  else:
    results = [_call(j) for j in jobs]

  item, group, real_id = [], [], []
  if kind == "wds":
    offset, group_ids = 0, {}
    for kept, n_keys in results:
      for local, g, _ in kept:
        item.append(offset + local)
        real_id.append(offset + local)
        group.append(group_ids.setdefault(g, len(group_ids)))
      offset += n_keys
  else:
    for kept in results:
      for it, g, r in kept:
        item.append(it)
        group.append(g)
        real_id.append(r)
  if not item:
    raise InputError(f"prepare: no usable pairs in {src} (see {outp / 'rejects.jsonl'})")
  np.savez(
    outp / INDEX_FILE,
    item=np.asarray(item, np.int64),
    group=np.asarray(group, np.int32),
    real_id=np.asarray(real_id, np.int32),
  )
  rejected = 0
  if (outp / "rejects.jsonl").exists():
    rejected = sum(1 for line in (outp / "rejects.jsonl").read_text().splitlines() if line.strip())
  meta = {
    "format": FORMAT,
    "src": str(src),
    "kind": kind,
    "num_records": len(item),
    "num_shards": len(jobs),
    "num_rejected": rejected,
    "manifest_columns": list(MANIFEST_COLUMNS),
    # images with a larger short side were stored resized as JPEG at this quality; None: originals
    "resize_short": resize_short or None,
    "quality": quality if resize_short else None,
    "seconds": round(time.time() - start, 2),
  }
  write_meta(outp, meta)
  return meta


def _call(job):
  fn, args = job
  return fn(*args)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m gmail_jax.data.prepare", description=__doc__.split("\n")[0]
  )
  p.add_argument(
    "--src", required=True, help="manifest file, class-folder root, .tar / dir of .tar"
  )
  p.add_argument("--out", required=True, help="output directory for the ArrayRecord shards")
  p.add_argument("--kind", default="auto", choices=["auto", "manifest", "class_folders", "wds"])
  p.add_argument("--root", default=None, help="base dir of relative manifest paths")
  p.add_argument("--gen_dir", default=None, help="wds: generated images as GEN_DIR/KEY[.N].jpg")
  p.add_argument("--template", default="a photo of a {class}.", help="class-folder caption")
  p.add_argument("--seed", type=int, default=0, help="class folders: same-class real draw")
  p.add_argument("--shard_size", type=int, default=10_000, help="records per shard (not wds)")
  p.add_argument("--num_workers", type=int, default=1, help="processes writing shards")
  p.add_argument("--verify", default="true", choices=["true", "false"], help="decode every image")
  p.add_argument("--on_bad_input", default="skip", choices=["skip", "fail"])
  p.add_argument(
    "--resize_short",
    default=str(DEFAULT_RESIZE_SHORT),
    help="store larger images resized to this short side (JPEG); 0 or none: original bytes",
  )
  p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of resizes")
  a = p.parse_args(argv)
  short = 0 if a.resize_short.lower() in ("0", "none", "") else int(a.resize_short)
  try:
    meta = prepare(
      a.src,
      a.out,
      kind=a.kind,
      root=a.root,
      gen_dir=a.gen_dir,
      template=a.template,
      seed=a.seed,
      shard_size=a.shard_size,
      num_workers=a.num_workers,
      verify=a.verify == "true",
      on_bad_input=a.on_bad_input,
      resize_short=short,
      quality=a.quality,
    )
  except (BadInputError, ValueError, FileNotFoundError) as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(meta))
  return 0


if __name__ == "__main__":
  sys.exit(main())
