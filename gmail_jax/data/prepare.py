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

Output in ``--out``: ``pairs-NNNNN-of-NNNNN.array_record`` (records in
:mod:`gmail_jax.data.records` format; ``--shard_size`` input rows each, or one per tar),
``index.npz`` (``item, group, real_id`` per record, used for pairing without reading the shards),
``meta.json``, and ``rejects.jsonl`` (skipped inputs).
Train on it with ``config.data.source='array_record'``, ``config.data.root=OUT``.

Stored images (``--resize_short``, ``--quality``): by default every image whose short side exceeds
256 px is stored as a JPEG (quality 90) resized with PIL bicubic so its short side is 256 (long side
``int(256 * long / short)``, the CLIP rule), so training decodes small JPEGs: a 224 crop with room
for random-resized-crop augmentation. Large JPEGs are draft-decoded (DCT downscaling, see
:func:`gmail_jax.data.images.decode_image`) before that resize. Smaller images are never upscaled;
their original bytes are kept, as are all bytes with ``--resize_short=0``. Every input is decoded
(also with ``--verify=false`` when resizing), so corrupt files go to ``rejects.jsonl``.

``--store=train`` stores what training eats instead: every image (real and generated, small ones
too) as its ``--image_size`` crop made by the tower's preprocessing (``--resize``:
``shortest_edge_crop``, CLIPImageProcessor's bicubic short-side resize + centre crop, from a full
decode; or ``squash``, SigLIP's), as a 4:4:4 JPEG at ``--quality`` (default 95). Training then
only decodes a 224x224 JPEG per image, no resize (``gmail_jax.data.pipeline`` checks that
``config.data.image_size`` and the tower's resize mode are the ones stored, from meta.json). The
only difference from the exact crop is the JPEG encoding: on coco-mini's 239 photos, mean |diff|
1.8/255, max 26/255 at quality 95 (quality 90: 2.6 / 54), where the default store, resized to a
256 short side at quality 90 then cropped at train time, is 3.6 / 168. With
``config.data.augment_generated``, the random resized crop of a generated image is drawn inside
its stored crop (CLIP's centre square) and upsampled back to ``image_size``: no part of the image
outside that square is ever seen, and crops of scale s are magnified by 1/sqrt(s) (<= 1.41x at the
default scale 0.5). Where augmentation should see the whole image, keep the default store.

On N hosts (or N processes): every process reads the inputs and decides the same list of output
shards; process ``i`` of ``N`` writes the shards ``s`` with ``s % N == i``, and whichever process
finds every shard written merges ``index.npz``, ``meta.json`` and ``rejects.jsonl`` (the same
bytes as a one-process run; ``seconds`` in meta.json aside). ``--num_shards``/``--shard_index``
default to JAX_NUM_PROCESSES/JAX_PROCESS_ID, else SLURM_NTASKS/SLURM_PROCID, else 1/0::

  srun --ntasks=16 python -m gmail_jax.data.prepare --src=cc12m/ --out=/shared/cc12m_pairs
  # or one command per host, the same flags except the index:
  python -m gmail_jax.data.prepare --src=... --out=... --num_shards=16 --shard_index=3

``--out`` must be a directory every process sees: a shared file system, or a bucket
(``--out=gs://BUCKET/pairs``, what a TPU pod trains from with ``config.data.root=gs://…``).
``--num_workers`` is the number of writer processes within each host. ``--src`` (a manifest and
the images it names, class folders, tars) and ``--gen_dir`` may be in a bucket too.

Into a bucket: ArrayRecord's writer writes local files only and a bucket has no rename, so each
shard is written in a local staging folder (``$TMPDIR/gmail_prepare-<hash of --out>``, one shard
per writer at a time) and uploaded whole, then its rejects and its index, each one upload: an
object appears only when complete, so the index still marks a complete shard. ``prepare.json`` is
created with a generation precondition (only if absent), as the local hard link does. Under
``--on_bad_input=fail`` the reject is appended to ``OUT/rejects.jsonl`` (the object rewritten
whole) as the run stops. A killed run leaves at most its writers' partial shards in the staging
folder; the rerun on that host removes them. Credentials: gcsfs' (Application Default
Credentials).

Resuming: a rerun (with any ``--num_shards``) skips the shards already complete and rewrites
partial ones, so an interrupted run is finished by running the same command again.
``OUT/prepare.json`` records the plan (the flags that decide the records, and the number and input
sizes of the shards); a rerun with other values is refused, naming the flag: use a new ``--out``.
Files in ``--out`` beside the ones above, each written under a temporary name and renamed when
complete (in a bucket: uploaded whole): ``prepare.json``; per shard, ``pairs-…index.npz`` (its
records' index; written last, it marks the shard complete) and ``pairs-…rejects.jsonl``.
``rejects.jsonl`` is the manifest rows rejected while planning (the same in every process), then
each shard's rejects, in shard order.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import socket
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import PIL.Image

from gmail_jax import storage
from gmail_jax.cli import resolve_shard
from gmail_jax.data.images import decode_image
from gmail_jax.data.preprocess import resize as preprocess_resize
from gmail_jax.data.preprocess import resize_output_size
from gmail_jax.data.records import pack_pair
from gmail_jax.data.rejects import REJECTS_FILE, BadInput, BadInputError, RejectLog
from gmail_jax.data.sources import (
  IMAGE_EXTS,
  INDEX_FILE,
  MANIFEST_COLUMNS,
  META_FILE,
  ClassFolderSource,
  ManifestSource,
  read_bytes,
)
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.faults import kill_point

FORMAT = "gmail_jax.pairs/1"
PLAN_FILE = "prepare.json"


def _writer(path: str):
  from array_record.python.array_record_module import ArrayRecordWriter

  return ArrayRecordWriter(path, "group_size:1")  # one record per chunk: fast random access


DEFAULT_RESIZE_SHORT = 256  # 224 crops + headroom for random resized crops
DEFAULT_QUALITY = 90
STORES = ("resized", "train")
DEFAULT_TRAIN_QUALITY = 95  # the crop the model sees: see the module docstring for the trade-off
DEFAULT_IMAGE_SIZE = 224
RESIZE_MODES = ("shortest_edge_crop", "squash")  # preprocess.RESIZE_MODES


@dataclasses.dataclass(frozen=True)
class _Store:
  """How images are stored (travels into the ``--num_workers`` processes).

  ``image_size`` > 0: ``--store=train`` crops of that side by ``resize``; else ``resize_short``
  (0: original bytes)."""

  verify: bool
  resize_short: int
  quality: int
  image_size: int = 0
  resize: str = "shortest_edge_crop"


def _train_crop(data: bytes, name: str, store: _Store) -> bytes:
  """``--store=train``: the training crop of one image as a 4:4:4 JPEG at ``store.quality``."""
  # A full decode, as the exact path does (a draft decode would shift pixels before the crop);
  # 4:4:4 because the model sees every pixel of the crop: 4:2:0 smears colour edges (max 188/255
  # vs 54 at quality 90 on coco-mini) for a decode ~1.5x faster.
  crop = preprocess_resize(decode_image(data, name), store.image_size, store.resize)
  buf = io.BytesIO()
  PIL.Image.fromarray(crop).save(buf, "JPEG", quality=store.quality, subsampling=0)
  return buf.getvalue()


def _stored(data: bytes, name: str, store: _Store) -> bytes:
  """The bytes to store for one image: the original file, a JPEG resized to ``resize_short``, or
  the ``--store=train`` crop.

  Raises :class:`BadInput` for an undecodable image (whenever it is decoded: always when resizing).
  """
  if store.image_size:
    return _train_crop(data, name, store)
  verify, resize_short, quality = store.verify, store.resize_short, store.quality
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


def _write_rows(path: str, log: RejectLog, rows: list[dict], store: _Store) -> list[tuple]:
  """Rows of paths -> one shard; returns (item, group, real_id) of the records written."""
  kept = []
  writer = _writer(path)
  try:
    for row in rows:
      try:
        gen = _stored(read_bytes(row["gen_path"]), row["gen_path"], store)
        real = _stored(read_bytes(row["real_path"]), row["real_path"], store)
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
  """(key, {suffix: bytes}) per example of one tar (a file or an object, streamed), in tar order."""
  with contextlib.ExitStack() as stack:
    if storage.is_remote(tar_path):
      f = stack.enter_context(storage.path(tar_path).open("rb"))
      tar = stack.enter_context(tarfile.open(fileobj=f, mode="r|*"))
    else:
      tar = stack.enter_context(tarfile.open(tar_path, "r|*"))
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
    base = storage.join(gen_dir, os.path.basename(key))
    exists = os.path.exists if not storage.is_remote(base) else lambda p: storage.path(p).exists()
    for ext in IMAGE_EXTS:
      if exists(base + ext):
        gens.append((base + ext, read_bytes(base + ext)))
    for n in range(1024):
      found = [base + f".{n}{ext}" for ext in IMAGE_EXTS if exists(base + f".{n}{ext}")]
      if not found:
        break
      gens.append((found[0], read_bytes(found[0])))
  if not gens:
    raise BadInput(where, "no generated image (KEY.gen.jpg in the tar or --gen_dir/KEY.jpg)")
  group = str(meta.get("group", key))
  return caption, members[real[0]], f"{where}.{real[0]}", gens, group


def _write_tar(path: str, log: RejectLog, tar_path: str, gen_dir, store: _Store):
  """One webdataset tar -> one shard; returns (local_key_index, group_str, local_key_index)."""
  kept = []
  writer = _writer(path)
  try:
    n_keys = 0
    for key, members in _wds_examples(tar_path, gen_dir):
      where = f"{tar_path}:{key}"
      try:
        caption, real, real_name, gens, group = _wds_pairs(key, members, gen_dir, where)
        real = _stored(real, real_name, store)
      except BadInput as e:
        log.reject(e.path, e.reason)
        continue
      local = n_keys
      n_keys += 1
      for gen_name, gen in gens:
        try:
          gen = _stored(gen, gen_name, store)
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
  p = storage.path(src.split(",")[0])
  if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet"):
    return "manifest"
  if p.is_dir() and (p / "real").is_dir() and (p / "generated").is_dir():
    return "class_folders"
  if p.suffix == ".tar" or (p.is_dir() and _tars(p)):
    return "wds"
  raise InputError(
    f"prepare: cannot tell what {src} is (manifest file, class-folder root, or tars)"
  )


# ------------------------------------------------------------------------------ the output folder


class _OutDir:
  """Every file operation on ``--out``, a local folder or a bucket's prefix (``gs://b/pairs``).
  Names are relative to it; a file appears whole or not at all. Local: filled under a temporary
  name beside it, then renamed. Bucket (no rename; ArrayRecord's writer writes local files only):
  filled in a local staging folder, then uploaded in one piece (an object appears when its upload
  completes). Picklable (travels into the ``--num_workers`` processes on this host)."""

  def __init__(self, root: str | os.PathLike):
    self.remote = storage.is_remote(root)
    self.root = os.fspath(root).rstrip("/") if self.remote else pathlib.Path(root)
    # per process: two writers never share a temp file, whatever else goes wrong
    self.tag = f"{socket.gethostname()}-{os.getpid()}"
    # one per --out and host, left in place (empty) after a run: the processes on a host share it
    # (removing it would race with one still writing) and a rerun removes what a killed one left
    digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
    self.stage = os.path.join(tempfile.gettempdir(), f"gmail_prepare-{digest}")

  def make(self) -> None:
    if self.remote:
      storage.check_writable(self.root, "--out")  # one line before any input is read
      os.makedirs(self.stage, exist_ok=True)
    else:
      self.root.mkdir(parents=True, exist_ok=True)

  def path(self, name: str) -> str:
    return storage.join(self.root, name) if self.remote else str(self.root / name)

  def names(self) -> set[str]:
    if self.remote:
      return set(storage.list_sizes(self.root))
    return set(os.listdir(self.root))

  def read(self, name: str) -> bytes | None:
    try:
      return storage.path(self.path(name)).read_bytes()
    except FileNotFoundError:
      return None

  def temp(self, name: str) -> str:
    """A local path to fill before :meth:`commit` publishes it as ``name``."""
    folder = self.stage if self.remote else str(self.root)
    return os.path.join(folder, f"{name}.tmp-{self.tag}")

  def temps(self) -> list[str]:
    """The temporary files there are (this run's or a killed one's), as paths."""
    folder = self.stage if self.remote else str(self.root)
    try:
      return [os.path.join(folder, n) for n in os.listdir(folder) if ".tmp-" in n]
    except FileNotFoundError:
      return []

  def commit(self, temp: str, name: str) -> None:
    if self.remote:
      storage.upload_file(temp, self.path(name))
      os.unlink(temp)
    else:
      os.replace(temp, self.path(name))

  def drop(self, temp: str) -> None:
    pathlib.Path(temp).unlink(missing_ok=True)

  def write(self, name: str, data: bytes) -> None:
    if self.remote:
      storage.write_bytes(self.path(name), data)
      return
    temp = self.temp(name)
    pathlib.Path(temp).write_bytes(data)
    self.commit(temp, name)

  def create(self, name: str, data: bytes) -> bool:
    """Write ``name`` unless it exists (False then): of processes creating it together, exactly
    one succeeds, and nobody sees it partly written."""
    return storage.create_exclusive(self.path(name), data)

  def remove(self, name: str) -> None:
    if self.remote:
      storage.path(self.path(name)).unlink(missing_ok=True)
    else:
      (self.root / name).unlink(missing_ok=True)


def _npz_bytes(**arrays) -> bytes:
  """``np.savez`` as bytes: the same arrays give the same bytes whoever writes them, and when
  (zipfile dates the members 1980), so the merged index.npz, fingerprinted by training, is too."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(data)) as z:
    return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------- plan


def _base(s: int, n: int) -> str:
  return f"pairs-{s:05d}-of-{n:05d}"


SHARD, SHARD_INDEX, SHARD_REJECTS = ".array_record", ".index.npz", ".rejects.jsonl"

# plan key -> the flag that sets it, in the order a mismatch is reported (the first one is named)
PLAN_FLAGS = {
  "format": None,
  "src": "--src",
  "kind": "--kind",
  "root": "--root",
  "gen_dir": "--gen_dir",
  "template": "--template",
  "seed": "--seed",
  "shard_size": "--shard_size",
  "store": "--store",
  "image_size": "--image_size",
  "resize": "--resize",
  "resize_short": "--resize_short",
  "quality": "--quality",
  "verify": "--verify",
  "shards": None,
}


# Keys a plan of the default store leaves out (so its plan, and plan id, are those of a run before
# --store existed, and such a run resumes): their value when absent.
PLAN_DEFAULTS = {"store": "resized"}


def _plan_value(plan: dict, key: str):
  return plan.get(key, PLAN_DEFAULTS.get(key))


def _plan_id(plan: dict) -> str:
  return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _check_plan(old: dict, plan: dict, where: str) -> None:
  """One-line InputError naming the first flag whose value differs from the recorded plan."""
  for key, flag in PLAN_FLAGS.items():
    was, now = _plan_value(old, key), _plan_value(plan, key)
    if was == now:
      continue
    if flag is not None:
      was, now = (str(v).lower() if isinstance(v, bool) else v for v in (was, now))
      raise InputError(
        f"prepare: {where} was written with {flag}={was}, this run has {flag}={now}: use the"
        " same flags to finish it, or a new --out"
      )
    if key == "format":
      raise InputError(f"prepare: {where} is not a {FORMAT} plan: use a new --out")
    then, now = old.get("shards") or [], plan["shards"]
    if len(then) != len(now):
      change = f"{len(then)} output shards planned then, {len(now)} now"
    else:
      s = next(s for s in range(len(now)) if then[s] != now[s])
      said = (", ".join(f"{k}={v}" for k, v in sizes.items()) for sizes in (then[s], now[s]))
      change = "output shard {}: {} then, {} now".format(s, *said)
    raise InputError(
      f"prepare: the inputs in --src={plan['src']} changed since {where} was written ({change}):"
      " use a new --out"
    )


def _record_plan(out: _OutDir, plan: dict) -> None:
  """Create prepare.json with ``plan``, or refuse a run whose plan differs from the recorded one."""
  if out.create(PLAN_FILE, (json.dumps(plan, indent=1) + "\n").encode()):
    for name in (INDEX_FILE, META_FILE, REJECTS_FILE):
      out.remove(name)  # an earlier, unrecorded run's: not of this plan
    return
  try:
    old = json.loads(out.read(PLAN_FILE) or b"")
  except ValueError:
    old = {}
  _check_plan(old if isinstance(old, dict) else {}, plan, out.path(PLAN_FILE))


class _Inputs:
  """The output shards of ``src`` (decided from the inputs alone: the same on every process) and
  the input of each (rows of paths, or one tar)."""

  def __init__(self, src, kind, *, root, gen_dir, template, seed, shard_size, log: RejectLog):
    self.kind, self.tars, self._row = kind, [], None
    if kind in ("manifest", "class_folders"):
      if kind == "manifest":
        source = ManifestSource(src, root=root, gens_per_caption=0, log=log)
        self.num_rows, self._row = source.num_rows, source.row_fields
      else:
        folders = ClassFolderSource(src, template=template, seed=seed)
        self.num_rows, self._row = len(folders), _class_folder_row(folders)
      self.shard_size = shard_size
      n = max(1, -(-self.num_rows // shard_size))
      self.sizes = [{"rows": len(range(*self._bounds(s)))} for s in range(n)]
    elif kind == "wds":
      for part in src.split(","):
        p = storage.path(part)
        self.tars += _tars(p) if p.is_dir() else [os.fspath(p)]
      if not self.tars:
        raise InputError(f"prepare: no .tar shards in {src}")
      # a rewritten tar of another size would mix old and new records
      self.sizes = [{"tar": t, "bytes": _size(t)} for t in self.tars]
    else:
      raise InputError(f"prepare: --kind={kind!r}: expected auto, manifest, class_folders or wds")

  def _bounds(self, s: int) -> tuple[int, int]:
    return s * self.shard_size, min((s + 1) * self.shard_size, self.num_rows)

  def job(self, s: int, gen_dir, store: _Store) -> tuple[Callable, tuple]:
    """The writer of shard ``s`` and its arguments after (path, log)."""
    if self.kind == "wds":
      return _write_tar, (self.tars[s], gen_dir, store)
    return _write_rows, ([self._row(i) for i in range(*self._bounds(s))], store)


def _class_folder_row(source: ClassFolderSource) -> Callable[[int], dict]:
  def row(i: int) -> dict:
    gen_path, real_path, c, real_id = source.pair_paths(i, 0)
    return dict(
      caption=source.caption(c),
      gen_path=gen_path,
      real_path=real_path,
      group=c,
      real_id=real_id,
      item=i,
    )

  return row


def _tars(folder: storage.Path) -> list[str]:
  """The .tar files directly in ``folder``, sorted (a bucket's from one listing)."""
  return [storage.join(folder, n) for n in sorted(storage.list_sizes(folder)) if n.endswith(".tar")]


def _size(path: str) -> int | None:
  try:
    return storage.path(path).stat().length if storage.is_remote(path) else os.path.getsize(path)
  except OSError:
    return None  # a missing tar is reported (rejected) when its shard is written


# ------------------------------------------------------------------------------------------ shards


def _write_shard(
  out: _OutDir, base: str, plan_id: str, log: RejectLog, write: Callable, args: tuple
) -> None:
  """One output shard: the records, its rejects, then its index (which marks it complete), each
  under a temporary name until whole, so a killed process leaves no file that looks complete."""
  temp = out.temp(base + SHARD)
  own_log = log.policy == "skip"  # a temp file of this shard ('fail' appends to rejects.jsonl)
  try:
    result = write(temp, log, *args)
  except BaseException:
    out.drop(temp)
    if own_log:
      out.drop(log.path)
    raise
  kept, n_keys = result if write is _write_tar else (result, 0)
  if own_log and os.path.exists(log.path):
    out.commit(log.path, base + SHARD_REJECTS)
  else:
    out.remove(base + SHARD_REJECTS)  # a previous attempt's
  out.commit(temp, base + SHARD)
  # wds: group keys are strings, numbered when merging (first appearance over all shards)
  keys: dict = {}
  group = [keys.setdefault(g, len(keys)) if write is _write_tar else g for _, g, _ in kept]
  out.write(
    base + SHARD_INDEX,
    _npz_bytes(
      item=np.asarray([k[0] for k in kept], np.int64),
      group=np.asarray(group, np.int32),
      real_id=np.asarray([k[2] for k in kept], np.int32),
      group_key=np.asarray(list(keys), str),
      n_keys=np.int64(n_keys),
      plan=np.asarray(plan_id),
    ),
  )


def _shard_index(out: _OutDir, names: set[str], base: str, plan_id: str) -> dict | None:
  """The index of a complete shard of this plan, else None."""
  if base + SHARD not in names or base + SHARD_INDEX not in names:
    return None
  data = out.read(base + SHARD_INDEX)
  index = _load_npz(data) if data is not None else None
  return index if index is not None and str(index["plan"]) == plan_id else None


def _call(job):
  fn, args = job
  return fn(*args)


def _run(jobs: list, num_workers: int) -> Iterator:
  if num_workers > 1 and len(jobs) > 1:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
      yield from pool.map(_call, jobs)
  else:
    yield from (_call(j) for j in jobs)


# ------------------------------------------------------------------------------------------- merge


def _merge(out: _OutDir, plan: dict, plan_id: str, plan_rejects: bytes) -> tuple[dict, int] | None:
  """Merge the shard indexes and rejects when every shard of the plan is complete (else None):
  the same bytes whoever does it, records in shard order. Returns (arrays, rejected)."""
  names = out.names()
  n = len(plan["shards"])
  bases = [_base(s, n) for s in range(n)]
  if any(b + SHARD not in names or b + SHARD_INDEX not in names for b in bases):
    return None
  indexes = [_shard_index(out, names, b, plan_id) for b in bases]
  if any(index is None for index in indexes):
    return None  # a file of an earlier plan, being rewritten
  if plan["kind"] == "wds":
    item, group, offset, group_ids = [], [], 0, {}
    for index in indexes:
      codes = [group_ids.setdefault(str(k), len(group_ids)) for k in index["group_key"]]
      item.append(index["item"] + offset)
      group.append(np.asarray(codes, np.int32)[index["group"]])
      offset += int(index["n_keys"])
    real_id = [i.astype(np.int32) for i in item]
  else:
    item, group = [i["item"] for i in indexes], [i["group"] for i in indexes]
    real_id = [i["real_id"] for i in indexes]
  arrays = dict(
    item=np.concatenate(item).astype(np.int64),
    group=np.concatenate(group).astype(np.int32),
    real_id=np.concatenate(real_id).astype(np.int32),
  )
  # shards of another plan (an older run into this --out) would be read as part of this one
  for name in names:
    if name.startswith("pairs-") and name.split(".", 1)[0] not in bases:
      out.remove(name)
  parts = [plan_rejects]
  parts += [out.read(b + SHARD_REJECTS) or b"" for b in bases if b + SHARD_REJECTS in names]
  rejects = b"".join(parts)
  if rejects:
    out.write(REJECTS_FILE, rejects)
  else:
    out.remove(REJECTS_FILE)
  return arrays, sum(1 for line in rejects.decode().splitlines() if line.strip())


# ----------------------------------------------------------------------------------------- prepare


@dataclasses.dataclass(frozen=True)
class _BucketFailLog(RejectLog):
  """``--on_bad_input=fail`` into a bucket, which has no append: the reject is logged in a local
  file of ``stage`` (RejectLog's own format), which is then appended to ``path`` (OUT/rejects.jsonl)
  whole before the error goes on. Picklable, like RejectLog."""

  stage: str = ""

  def reject(self, path: str, reason: str, **extra) -> None:
    local = os.path.join(self.stage, f"{REJECTS_FILE}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
      RejectLog(local, self.policy).reject(path, reason, **extra)
    finally:
      if os.path.exists(local):
        storage.append_text(self.path, pathlib.Path(local).read_text())
        os.unlink(local)


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
  quality: int | None = None,
  num_shards: int = 1,
  shard_index: int = 0,
  store: str = "resized",
  image_size: int = DEFAULT_IMAGE_SIZE,
  resize: str = "shortest_edge_crop",
) -> dict:
  """Write ``src`` as ArrayRecord shards under ``out`` (a local folder or a bucket's ``gs://``
  prefix; ``src`` either too); returns the meta dict (also meta.json).

  ``resize_short``: short side of the stored images (larger ones are resized and re-encoded as
  JPEG at ``quality``, default 90); 0 or None keeps every image's original bytes.
  ``store="train"``: every image stored as its ``image_size`` crop by ``resize`` (the tower's
  resize mode) as a JPEG at ``quality`` (default 95); ``resize_short`` is unused then (see the
  module docstring). This process writes the
  output shards ``s % num_shards == shard_index`` that are not complete yet (see the module
  docstring); when others are still missing, it returns ``{"complete": False, ...}`` (counts)
  instead of the meta dict and writes no meta.json: the last process to finish writes it.
  """
  start = time.time()
  if store not in STORES:
    raise ConfigError(f"--store={store!r}: expected {' or '.join(STORES)}")
  train = store == "train"
  if train and (int(image_size) < 1 or resize not in RESIZE_MODES):
    raise ConfigError(
      f"--image_size={image_size} >= 1, --resize={resize!r} in {', '.join(RESIZE_MODES)}"
    )
  resize_short = 0 if train else int(resize_short or 0)
  if quality is None:
    quality = DEFAULT_TRAIN_QUALITY if train else DEFAULT_QUALITY
  if resize_short < 0 or not 1 <= quality <= 100:
    raise InputError(f"prepare: --resize_short={resize_short} >= 0, --quality={quality} in 1..100")
  if shard_size < 1:
    raise ConfigError(f"--shard_size={shard_size}: must be >= 1")
  shard_index, num_shards = resolve_shard(num_shards, shard_index, environ={})
  if on_bad_input not in ("skip", "fail"):
    raise ConfigError(f"--on_bad_input={on_bad_input!r}: expected skip or fail")
  outd = _OutDir(out)
  outd.make()
  kind = _detect(src) if kind == "auto" else kind

  # under 'fail' the one reject goes straight to rejects.jsonl (as a one-process run always did);
  # under 'skip' each shard logs to its own file, merged at the end: no two writers share a file
  def reject_log(temp: str) -> RejectLog:
    if on_bad_input == "fail" and outd.remote:
      return _BucketFailLog(outd.path(REJECTS_FILE), "fail", stage=outd.stage)
    if on_bad_input == "fail":
      return RejectLog(outd.path(REJECTS_FILE), "fail")
    outd.drop(temp)
    return RejectLog(temp, "skip")

  with tempfile.TemporaryDirectory(prefix="gmail_prepare_") as scratch:
    # rows rejected while planning are the same in every process: each keeps them for its merge
    plan_log = reject_log(os.path.join(scratch, REJECTS_FILE))
    inputs = _Inputs(
      src,
      kind,
      root=root,
      gen_dir=gen_dir,
      template=template,
      seed=seed,
      shard_size=shard_size,
      log=plan_log,
    )
    plan_rejects = b""
    if plan_log.policy == "skip" and os.path.exists(plan_log.path):
      plan_rejects = pathlib.Path(plan_log.path).read_bytes()
  # what decides the records; flags that cannot matter for this kind are recorded as None
  plan = {
    "format": FORMAT,
    "src": str(src),
    "kind": kind,
    "root": root if kind == "manifest" else None,
    "gen_dir": gen_dir if kind == "wds" else None,
    "template": template if kind == "class_folders" else None,
    "seed": seed if kind == "class_folders" else None,
    "shard_size": shard_size if kind != "wds" else None,
    "resize_short": resize_short,
    "quality": quality if resize_short or train else None,
    # resizing and cropping decode (verify) every image anyway
    "verify": bool(verify or resize_short or train),
    "shards": inputs.sizes,
  }
  if train:  # absent for the default store (PLAN_DEFAULTS)
    plan.update(store=store, image_size=int(image_size), resize=resize)
  plan_id = _plan_id(plan)
  _record_plan(outd, plan)

  n = len(inputs.sizes)
  names = outd.names()
  mine = [s for s in range(n) if s % num_shards == shard_index]
  todo = [s for s in mine if _shard_index(outd, names, _base(s, n), plan_id) is None]
  bases = {_base(s, n) for s in todo}
  for temp in outd.temps():  # a killed run's partial files of the shards this process redoes
    if os.path.basename(temp).split(".", 1)[0] in bases:
      outd.drop(temp)
  how = _Store(
    plan["verify"], resize_short, quality, int(image_size) if train else 0, resize if train else ""
  )
  jobs = []
  for s in todo:
    write, args = inputs.job(s, gen_dir, how)
    log = reject_log(outd.temp(_base(s, n) + SHARD_REJECTS))
    jobs.append((_write_shard, (outd, _base(s, n), plan_id, log, write, args)))
  for k, _ in enumerate(_run(jobs, num_workers), 1):
    kill_point("shard", k)

  merged = _merge(outd, plan, plan_id, plan_rejects)
  if merged is None:
    names = outd.names()
    missing = sum(_base(s, n) + SHARD_INDEX not in names for s in range(n))
    return {
      "complete": False,
      "shard_index": shard_index,
      "num_shards": num_shards,
      "shards_written": len(todo),
      "shards_skipped": len(mine) - len(todo),
      "shards_missing": missing,
    }
  arrays, rejected = merged
  if not len(arrays["item"]):
    raise InputError(f"prepare: no usable pairs in {src} (see {outd.path(REJECTS_FILE)})")
  outd.write(INDEX_FILE, _npz_bytes(**arrays))
  meta = {
    "format": FORMAT,
    "src": str(src),
    "kind": kind,
    "num_records": len(arrays["item"]),
    "num_shards": n,
    "num_rejected": rejected,
    "manifest_columns": list(MANIFEST_COLUMNS),
    # how the images are stored; the pipeline reads it (store=train: crops it must not resize)
    "store": store,
    # resized: images with a larger short side were stored resized as JPEG at this quality (None:
    # originals); train: every image is its image_size crop by resize, a JPEG at this quality
    "resize_short": resize_short or None,
    "quality": quality if resize_short or train else None,
    "seconds": round(time.time() - start, 2),
  }
  if train:
    meta.update(image_size=int(image_size), resize=resize, subsampling="4:4:4")
  outd.write(META_FILE, json.dumps(meta, indent=2).encode())  # last: marks the output complete
  return meta


HELP_EPILOG = """On N hosts: every process reads the inputs and writes the output shards s with
s % N == shard_index; the last to finish merges index.npz and meta.json. --out must be shared
(a shared file system, or a bucket: --out=gs://BUCKET/pairs, each shard staged locally and
uploaded whole).
  srun --ntasks=N python -m gmail_jax.data.prepare --src=... --out=...   (SLURM_NTASKS/PROCID)
  python -m gmail_jax.data.prepare ... --num_shards=N --shard_index=i    (one command per host)
Rerun the same command to finish an interrupted run: complete shards are kept, partial ones are
rewritten; other values of the flags recorded in OUT/prepare.json are refused (use a new --out)."""


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m gmail_jax.data.prepare",
    description=__doc__.split("\n")[0],
    epilog=HELP_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--src", required=True, help="manifest file, class-folder root, .tar / dir of .tar"
  )
  p.add_argument(
    "--out", required=True, help="output directory for the ArrayRecord shards (or gs://BUCKET/…)"
  )
  p.add_argument("--kind", default="auto", choices=["auto", "manifest", "class_folders", "wds"])
  p.add_argument("--root", default=None, help="base dir of relative manifest paths")
  p.add_argument("--gen_dir", default=None, help="wds: generated images as GEN_DIR/KEY[.N].jpg")
  p.add_argument("--template", default="a photo of a {class}.", help="class-folder caption")
  p.add_argument("--seed", type=int, default=0, help="class folders: same-class real draw")
  p.add_argument("--shard_size", type=int, default=10_000, help="input rows per shard (not wds)")
  p.add_argument("--num_workers", type=int, default=1, help="processes writing shards (per host)")
  p.add_argument(
    "--num_shards",
    type=int,
    default=None,
    help="processes sharing the work (not the number of output shards); default:"
    " JAX_NUM_PROCESSES, else SLURM_NTASKS, else 1",
  )
  p.add_argument(
    "--shard_index",
    type=int,
    default=None,
    help="this process, in [0, num_shards); default: JAX_PROCESS_ID, else SLURM_PROCID, else 0",
  )
  p.add_argument("--verify", default="true", choices=["true", "false"], help="decode every image")
  p.add_argument("--on_bad_input", default="skip", choices=["skip", "fail"])
  p.add_argument(
    "--resize_short",
    default=str(DEFAULT_RESIZE_SHORT),
    help="store larger images resized to this short side (JPEG); 0 or none: original bytes",
  )
  p.add_argument(
    "--quality",
    type=int,
    default=None,
    help=f"JPEG quality of stored images (default {DEFAULT_QUALITY}; --store=train:"
    f" {DEFAULT_TRAIN_QUALITY})",
  )
  p.add_argument(
    "--store",
    default="resized",
    choices=STORES,
    help="resized: images resized to --resize_short (training crops them); train: the training"
    " crops themselves (--image_size, --resize), so training only decodes",
  )
  p.add_argument(
    "--image_size",
    type=int,
    default=DEFAULT_IMAGE_SIZE,
    help="--store=train: the crop side (config.data.image_size)",
  )
  p.add_argument(
    "--resize",
    default="shortest_edge_crop",
    choices=RESIZE_MODES,
    help="--store=train: the tower's resize (CLIP: shortest_edge_crop, SigLIP: squash)",
  )
  a = p.parse_args(argv)
  short = 0 if a.resize_short.lower() in ("0", "none", "") else int(a.resize_short)
  try:
    shard_index, num_shards = resolve_shard(a.num_shards, a.shard_index)
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
      num_shards=num_shards,
      shard_index=shard_index,
      store=a.store,
      image_size=a.image_size,
      resize=a.resize,
    )
  except (BadInputError, ValueError, FileNotFoundError) as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 1
  if meta.get("complete") is False:
    print(
      f"prepare: process {shard_index} of {num_shards} done (shards written:"
      f" {meta['shards_written']}); still to come from the other processes:"
      f" {meta['shards_missing']} shards, then the last to finish writes {INDEX_FILE} and"
      f" {META_FILE}",
      file=sys.stderr,
    )
  print(json.dumps(meta))
  return 0


if __name__ == "__main__":
  sys.exit(main())
