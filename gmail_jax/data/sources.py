"""Random-access sources of (generated, real, caption) pairs.

Every source is picklable (it travels into grain worker processes), has ``len()`` = pairs per epoch,
and ``get(index, epoch) -> Pair`` that reads the encoded bytes (decoding happens in the pipeline)
and raises :class:`~gmail_jax.data.rejects.BadInput` naming the file and reason for unusable input.

* :class:`ManifestSource`  CSV / JSONL / Parquet rows ``caption, real_path, gen_path[, group]``
* :class:`ClassFolderSource`  ``real/<class>/*`` + ``generated/<class>/*``, paired by class
* :class:`ArrayRecordSource`  shards written by ``python -m gmail_jax.data.prepare``
* :class:`TfdsSource`  ``tfds.data_source`` (optional extra, read without TensorFlow)
* :class:`SyntheticSource`  deterministic random images (tests, benchmarks)

Every path may be a local file or folder or a bucket's ``gs://`` URL (manifests, the images they
name, class folders, ArrayRecord shards): files are read through :mod:`gmail_jax.storage`, shards
by array_record's own GCS reader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import posixpath
import re
import struct
import threading
from collections.abc import Iterable

import numpy as np

from gmail_jax import storage
from gmail_jax.data.pairing import PairIndex, same_class_draw
from gmail_jax.data.records import unpack_pair
from gmail_jax.data.rejects import BadInput, BadInputError, RejectLog
from gmail_jax.errors import ConfigError, InputError, first_line

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_COLUMNS = ("caption", "real_path", "gen_path")
INDEX_FILE = "index.npz"
META_FILE = "meta.json"


@dataclasses.dataclass
class Pair:
  """One pair before decoding; ``gen``/``real`` are encoded bytes or uint8 arrays."""

  caption: str
  gen: bytes | np.ndarray
  real: bytes | np.ndarray
  group: int
  real_id: int
  gen_name: str
  real_name: str


def read_bytes(path: str) -> bytes:
  """File or object contents, or :class:`BadInput` ('missing file', 'unreadable: ...')."""
  if storage.is_remote(path):
    return _read_object(path)
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise BadInput(path, "missing file") from None
  except IsADirectoryError:
    raise BadInput(path, "not a file (directory)") from None
  except OSError as e:
    raise BadInput(path, f"unreadable: {e.strerror or e}") from None


def _read_object(url: str) -> bytes:
  fs, key = storage.filesystem(url)
  try:
    return fs.cat_file(key)  # one GET (opening a file first costs a metadata request more)
  except FileNotFoundError:
    raise BadInput(url, "missing file") from None
  except Exception as e:  # noqa: BLE001 - whatever the client raised (after its retries): one reject
    raise BadInput(url, f"unreadable: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------- manifest


def read_manifest_table(path: str | os.PathLike, columns: tuple[str, ...] = MANIFEST_COLUMNS):
  """The manifest as a pyarrow Table of string columns (CSV/TSV, JSONL/NDJSON/JSON, Parquet):
  ``columns`` (required) and ``group`` when present."""
  import pyarrow as pa
  import pyarrow.compute as pc

  path = storage.path(path)
  if not path.exists():
    raise FileNotFoundError(f"manifest not found: {path}")
  suffix = path.suffix.lower()
  # pyarrow gets a file object: given a gs:// string it would use its own GCS client (which waits
  # on default credentials); every manifest is read through the one path layer instead
  with contextlib.ExitStack() as stack:
    f = stack.enter_context(path.open("rb")) if storage.is_remote(path) else os.fspath(path)
    table = _read_table(f, path, suffix)
  missing = [c for c in columns if c not in table.column_names]
  if missing:
    raise InputError(
      f"manifest {path}: missing column(s) {', '.join(missing)}"
      f" (need {', '.join(columns)}[, group]; has {', '.join(table.column_names)})"
    )
  cols = {}
  for name in (*columns, "group"):
    if name in table.column_names:
      col = table.column(name)
      cols[name] = col if col.type == pa.string() else pc.cast(col, pa.string())
  return pa.table(cols)


def _read_table(f, path: storage.Path, suffix: str):
  """``f`` (a local path or an open file) read as the manifest format ``suffix`` names."""
  import pyarrow as pa

  try:
    if suffix in (".csv", ".tsv"):
      import pyarrow.csv as pacsv

      return pacsv.read_csv(
        f,
        parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
      )
    if suffix in (".jsonl", ".ndjson", ".json"):
      import pyarrow.json as pajson

      return pajson.read_json(f)
    if suffix in (".parquet", ".pq"):
      import pyarrow.parquet as pq

      return pq.read_table(f)
  except (pa.ArrowInvalid, OSError) as e:
    raise InputError(f"manifest {path}: cannot parse: {' '.join(str(e).split())}") from None
  raise InputError(f"manifest {path}: unknown format {suffix!r} (use .csv, .jsonl or .parquet)")


def _codes(column) -> np.ndarray:
  """Integer id per row, ids in order of first appearance."""
  import pyarrow.compute as pc

  codes = pc.dictionary_encode(column)
  if hasattr(codes, "combine_chunks"):
    codes = codes.combine_chunks()
  return np.asarray(codes.indices, dtype=np.int64)


def ids_fingerprint(keys) -> str:
  """sha256 of the ordered keys that ``real_id`` 0, 1, 2, ... stand for (what a cache of teacher
  embeddings indexed by ``real_id`` means): reordering the rows of a manifest changes it."""
  h = hashlib.sha256()
  for k in keys:
    h.update(str(k).encode())
    h.update(b"\n")
  return h.hexdigest()


class ManifestSource:
  """Rows ``caption, real_path, gen_path[, group]``; one row per generated image.

  Paths are absolute (or ``gs://`` URLs) or relative to ``root`` (default: the manifest's
  directory, or its bucket prefix). ``group`` defaults to ``real_path``. Rows with a missing field
  are rejected (logged) at load; a manifest with no usable row is an error. ``real_id`` numbers
  distinct real paths in order of first appearance; rows sharing (real_path, caption) form one item
  for ``gens_per_caption``.
  """

  def __init__(
    self,
    manifest: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    gens_per_caption: int = 1,
    log: RejectLog | None = None,
    log_rows: bool = True,
  ):
    import pyarrow as pa
    import pyarrow.compute as pc

    self.manifest = str(manifest)
    if root:
      self.root = str(root)
    elif storage.is_remote(manifest):
      self.root = os.fspath(storage.path(manifest).parent)
    else:
      self.root = str(pathlib.Path(manifest).resolve().parent)
    log = log or RejectLog(None)
    table = read_manifest_table(manifest)
    n = table.num_rows
    valid = np.ones(n, bool)
    is_csv = self.manifest.lower().endswith((".csv", ".tsv"))
    for name in MANIFEST_COLUMNS:
      col = table.column(name)
      empty = pc.or_(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
      bad = np.asarray(pc.fill_null(empty, True).combine_chunks(), dtype=bool) & valid
      for i in np.flatnonzero(bad)[: None if (log_rows or log.policy == "fail") else 0]:
        where = f"{self.manifest}:{i + 2 if is_csv else i + 1}"  # file line number
        log.reject(where, f"missing field {name!r}", row=int(i))
      valid &= ~bad
    if not valid.any():
      raise InputError(
        f"manifest {self.manifest}: no usable rows ({n} rows, all rejected or empty)"
      )
    table = table.filter(pa.array(valid))
    self.row_of = np.flatnonzero(valid)  # manifest row of each kept row (for messages)
    real = table.column("real_path").combine_chunks()
    caption = table.column("caption").combine_chunks()
    gen = table.column("gen_path").combine_chunks()
    if "group" in table.column_names:
      group = pc.coalesce(table.column("group"), table.column("real_path")).combine_chunks()
    else:
      group = real
    self._caption, self._real, self._gen = caption, real, gen
    self.real_id = _codes(real).astype(np.int32)
    self._real_keys = pc.dictionary_encode(real).dictionary  # real paths in real_id order
    self.group = _codes(group).astype(np.int32)
    self.item = _codes(pc.binary_join_element_wise(real, caption, "\x1f"))
    self.index = PairIndex(self.item, gens_per_caption)

  def __len__(self) -> int:
    return len(self.index)

  @property
  def num_rows(self) -> int:
    return len(self.item)

  def real_ids_fingerprint(self) -> str:
    return ids_fingerprint(self.resolve(k.as_py()) for k in self._real_keys)

  def resolve(self, rel: str) -> str:
    if os.path.isabs(rel) or storage.is_remote(rel):
      return rel
    if storage.is_remote(self.root):
      return posixpath.join(self.root, rel)  # a bucket's names always join with '/'
    return os.path.join(self.root, rel)

  def row_fields(self, row: int) -> dict:
    """Caption, absolute paths, group and real_id of kept row ``row`` (no file access)."""
    return {
      "caption": self._caption[row].as_py(),
      "real_path": self.resolve(self._real[row].as_py()),
      "gen_path": self.resolve(self._gen[row].as_py()),
      "group": int(self.group[row]),
      "real_id": int(self.real_id[row]),
      "item": int(self.item[row]),
    }

  def get(self, index: int, epoch: int) -> Pair:
    f = self.row_fields(self.index.row(index, epoch))
    return Pair(
      caption=f["caption"],
      gen=read_bytes(f["gen_path"]),
      real=read_bytes(f["real_path"]),
      group=f["group"],
      real_id=f["real_id"],
      gen_name=f["gen_path"],
      real_name=f["real_path"],
    )


# ------------------------------------------------------------------------------------ class folders


def _image_files(folder: pathlib.Path) -> list[str]:
  return sorted(
    str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.is_dir()
  )


def _class_images(folder: str) -> dict[str, list[str]]:
  """``{class: its image files at any depth, sorted}`` of ``folder/<class>/`` (a bucket's from one
  listing; it has no empty folders, so a class there is a prefix holding some object)."""
  if not storage.is_remote(folder):
    return {p.name: _image_files(p) for p in pathlib.Path(folder).iterdir() if p.is_dir()}
  out: dict[str, list[str]] = {}
  prefix = folder.rstrip("/") + "/"
  for f in storage.list_files(folder):
    name, sep, rest = f[len(prefix) :].partition("/")
    if sep:  # files directly in folder/ belong to no class
      files = out.setdefault(name, [])
      if posixpath.splitext(rest)[1].lower() in IMAGE_EXTS:
        files.append(f)
  return out


class ClassFolderSource:
  """``root/real/<class>/…`` and ``root/generated/<class>/…``; one pair per generated image.

  The real image of generated image ``i`` in epoch ``e`` is a same-class real image drawn from
  hash(seed, e, i), so pairs change across epochs and are reproducible. ``group`` = class index
  (same class = not a negative when masking), ``real_id`` = index among all real files (sorted).
  Captions come from ``template.format(class=name)`` with underscores shown as spaces.
  """

  def __init__(
    self,
    root: str | os.PathLike,
    *,
    template: str = "a photo of a {class}.",
    seed: int = 0,
    real_dir: str = "real",
    gen_dir: str = "generated",
  ):
    if storage.is_remote(root):
      self.root = os.fspath(root).rstrip("/")
      real_root, gen_root = storage.join(self.root, real_dir), storage.join(self.root, gen_dir)
    else:
      self.root = str(pathlib.Path(root))
      real_root, gen_root = str(pathlib.Path(root, real_dir)), str(pathlib.Path(root, gen_dir))
    self.seed, self.template = int(seed), template
    if not storage.path(real_root).is_dir() or not storage.path(gen_root).is_dir():
      raise FileNotFoundError(f"class folders: need {real_root}/<class>/ and {gen_root}/<class>/")
    real_by_class, gen_by_class = _class_images(real_root), _class_images(gen_root)
    self.classes = sorted(set(gen_by_class) | set(real_by_class))
    self.real_files: list[str] = []
    self.real_start: list[int] = []  # per class: first index in real_files
    self.real_count: list[int] = []
    gen_files, gen_class = [], []
    for c, name in enumerate(self.classes):
      reals, gens = real_by_class.get(name, []), gen_by_class.get(name, [])
      if gens and not reals:
        raise InputError(
          f"class folders: class {name!r} has generated images but no real images"
          f" in {storage.join(real_root, name)}"
        )
      self.real_start.append(len(self.real_files))
      self.real_count.append(len(reals))
      self.real_files += reals
      gen_files += gens
      gen_class += [c] * len(gens)
    if not gen_files:
      raise InputError(f"class folders: no generated images under {gen_root}/<class>/")
    self.gen_files = gen_files
    self.gen_class = np.asarray(gen_class, np.int32)

  def __len__(self) -> int:
    return len(self.gen_files)

  def caption(self, c: int) -> str:
    return self.template.format(**{"class": self.classes[c].replace("_", " ")})

  def real_ids_fingerprint(self) -> str:
    return ids_fingerprint(self.real_files)

  def pair_paths(self, index: int, epoch: int) -> tuple[str, str, int, int]:
    """(gen_path, real_path, class, real_id) of pair ``index`` in ``epoch``."""
    c = int(self.gen_class[index])
    real_id = self.real_start[c] + same_class_draw(self.seed, epoch, index, self.real_count[c])
    return self.gen_files[index], self.real_files[real_id], c, real_id

  def get(self, index: int, epoch: int) -> Pair:
    gen_path, real_path, c, real_id = self.pair_paths(index, epoch)
    return Pair(
      caption=self.caption(c),
      gen=read_bytes(gen_path),
      real=read_bytes(real_path),
      group=c,
      real_id=real_id,
      gen_name=gen_path,
      real_name=real_path,
    )


# ------------------------------------------------------------------------------------- ArrayRecord


# prepare's shard names: with every name of a set known, a missing shard is named, not miscounted
_SHARD_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.array_record")
# Opening a gs:// shard takes well under a second; a reader still waiting after this cannot reach
# the bucket (google-cloud-cpp would go on retrying for minutes).
OPEN_TIMEOUT_S = 120
FUSE_HINT = (
  "or mount the bucket with Cloud Storage FUSE (gcsfuse BUCKET /gcs/BUCKET) and set"
  " config.data.root=/gcs/BUCKET/..."
)


def missing_shards(names: Iterable[str]) -> list[str]:
  """The names of ``prepare``'s ``PREFIX-SSSSS-of-NNNNN.array_record`` shards absent from
  ``names`` (a set is complete when all N are there)."""
  have: dict[tuple[str, int], set[int]] = {}
  for name in names:
    m = _SHARD_NAME.fullmatch(name)
    if m:
      have.setdefault((m[1], int(m[3])), set()).add(int(m[2]))
  return [
    f"{prefix}-{s:05d}-of-{n:05d}.array_record"
    for (prefix, n), got in sorted(have.items())
    for s in range(n)
    if s not in got
  ]


class ArrayRecordSource:
  """Shards ``*.array_record`` + ``index.npz`` (item, group, real_id per record), by ``prepare``.

  ``root`` is a local folder or a ``gs://`` prefix: array_record reads gs:// objects itself
  (google-cloud-cpp, Application Default Credentials); a bucket's shards are opened here, so a
  reader that cannot read them fails in one line naming the object and the alternative (a Cloud
  Storage FUSE mount) before anything is built. ``stored_crop``: ``(image_size, resize mode)``
  when ``prepare --store=train`` stored every image as its training crop (from meta.json), else
  None (images to resize at train time).
  """

  def __init__(self, root: str | os.PathLike, *, gens_per_caption: int = 1):
    self._sizes: dict[str, int] | None = None  # a bucket's shard sizes, from its one listing
    if storage.is_remote(root):
      self.root = os.fspath(root).rstrip("/")
      if not self.root.startswith("gs://"):
        raise InputError(
          f"config.data.root={self.root}: array_record reads local files and gs:// only: copy"
          " the shards to a local disk, or mount the store with FUSE and set config.data.root"
          " to the mounted folder"
        )
      listing = storage.list_sizes(self.root)
      self._sizes = {n: b for n, b in listing.items() if n.endswith(".array_record")}
      self.shards = [storage.join(self.root, n) for n in sorted(self._sizes)]
      has_index = INDEX_FILE in listing
    else:
      local = pathlib.Path(root)
      self.root = str(local)
      self.shards = sorted(str(p) for p in local.glob("*.array_record"))
      has_index = (local / INDEX_FILE).exists()
    if not self.shards:
      raise FileNotFoundError(
        f"array_record: no *.array_record shards in {self.root} (run gmail_jax.data.prepare)"
      )
    missing = missing_shards(os.path.basename(p) for p in self.shards)
    if missing:
      n = int(_SHARD_NAME.fullmatch(missing[0])[3])
      raise FileNotFoundError(
        f"array_record: {storage.join(self.root, missing[0])} missing ({len(missing)} of the {n}"
        " shards prepare wrote): rerun gmail_jax.data.prepare with the same --out to finish it"
      )
    index_path = storage.join(self.root, INDEX_FILE)
    if not has_index:
      raise FileNotFoundError(
        f"array_record: {index_path} missing (written by gmail_jax.data.prepare)"
      )
    remote = self._sizes is not None
    index = io.BytesIO(storage.path(index_path).read_bytes()) if remote else index_path
    with np.load(index) as z:
      self.item, self.group, self.real_id = z["item"], z["group"], z["real_id"]
    self.index = PairIndex(self.item, gens_per_caption)
    self.stored_crop: tuple[int, str] | None = None
    try:
      meta = json.loads(storage.path(storage.join(self.root, META_FILE)).read_text())
    except (OSError, ValueError):
      meta = {}  # shards of a run that wrote no meta.json: resized at train time, as always
    if isinstance(meta, dict) and meta.get("store") == "train":
      self.stored_crop = (int(meta["image_size"]), str(meta["resize"]))
    self._reader = None
    if remote:  # a bucket the reader cannot read: say so now, not in a grain worker
      self._probe()
      self._records()

  def _records(self):
    if self._reader is None:
      import grain

      try:
        reader = grain.sources.ArrayRecordDataSource(self.shards)
      except (RuntimeError, OSError, ValueError) as e:
        self._check_each()  # names the shard (the reader's message may not)
        raise self._unreadable(e) from None
      if len(reader) != len(self.item):
        if self._sizes is not None:
          self._check_each()  # a shard the reader saw as empty is one it could not read
        raise InputError(
          f"array_record {self.root}: {len(reader)} records but {INDEX_FILE} lists {len(self.item)}"
        )
      self._reader = reader
    return self._reader

  def _unreadable(self, e: BaseException, shard: str | None = None) -> InputError:
    """The one-line error for shards the reader cannot open: the shard, and for a bucket what to
    do (credentials, or a FUSE mount that makes the shards local files)."""
    why = first_line(e)
    shard = shard or next((s for s in self.shards if s in why), self.root)
    msg = f"array_record: cannot read {shard} ({why})"
    if self._sizes is not None:
      msg += (
        f"; array_record {_array_record_version()} reads gs:// with Application Default"
        f" Credentials (gcloud auth application-default login, or the VM's service account): give"
        f" them read access to the bucket, {FUSE_HINT}"
      )
    return InputError(msg)

  def _probe(self) -> None:
    """Opens one shard, giving up after ``OPEN_TIMEOUT_S``: array_record's GCS client retries an
    endpoint it cannot reach (or credentials it cannot get) for many minutes. In a daemon thread
    of its own, so a reader still waiting never keeps the process from exiting (grain's opening
    pool would: its threads are joined at exit)."""
    from array_record.python.array_record_module import ArrayRecordReader

    def open_one() -> None:
      with contextlib.suppress(Exception):  # reported by _records, which opens it again
        ArrayRecordReader(self.shards[0]).close()

    probe = threading.Thread(target=open_one, name="array_record-probe", daemon=True)
    probe.start()
    probe.join(OPEN_TIMEOUT_S)
    if probe.is_alive():
      raise self._unreadable(TimeoutError(f"no answer in {OPEN_TIMEOUT_S} s"), self.shards[0])

  def _check_each(self) -> None:
    """Opens every shard alone; the first one the reader cannot read raises :meth:`_unreadable`
    (some readers report a missing or unreadable object as empty instead of raising)."""
    from array_record.python.array_record_module import ArrayRecordReader

    for shard in self.shards:
      try:
        reader = ArrayRecordReader(shard)
        ok = reader.ok()
        reader.close()  # where this reader raises for what it could not open
      except (RuntimeError, OSError, ValueError) as e:
        raise self._unreadable(e, shard) from None
      if not ok:
        raise self._unreadable(RuntimeError("the reader reports an error, no records"), shard)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None  # reopened lazily in each worker
    return state

  def __len__(self) -> int:
    return len(self.index)

  def real_ids_fingerprint(self) -> str:
    """The index prepare wrote (real_id per record) and the shards it describes."""
    index = storage.path(storage.join(self.root, INDEX_FILE)).read_bytes()
    if self._sizes is not None:
      shards = (f"{n}:{b}" for n, b in sorted(self._sizes.items()))
    else:
      shards = (f"{os.path.basename(p)}:{os.path.getsize(p)}" for p in self.shards)
    return ids_fingerprint([hashlib.sha256(index).hexdigest(), *shards])

  def get(self, index: int, epoch: int) -> Pair:
    row = self.index.row(index, epoch)
    name = f"{self.root}#{row}"
    records = self._records()  # outside the try: a source that cannot be read is no bad record
    try:
      rec = unpack_pair(records[row])
    except BadInputError:
      raise
    except (ValueError, KeyError, TypeError, struct.error) as e:  # what a damaged record raises
      raise BadInput(name, f"corrupt record: {e}") from None
    return Pair(
      caption=rec["caption"],
      gen=rec["gen"],
      real=rec["real"],
      group=int(self.group[row]),
      real_id=int(self.real_id[row]),
      gen_name=f"{name}:{rec['gen_name']}",
      real_name=f"{name}:{rec['real_name']}",
    )


def _array_record_version() -> str:
  from importlib import metadata

  try:
    return metadata.version("array_record")
  except metadata.PackageNotFoundError:
    return "(version unknown)"


# -------------------------------------------------------------------------------------------- TFDS


def import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError(
      "config.data.source='tfds' needs tensorflow-datasets (TensorFlow is not needed):"
      " pip install -e .[tfds]"
    ) from None
  return tfds


class TfdsSource:
  """A prepared TFDS dataset (ArrayRecord format) read via ``tfds.data_source``, no TensorFlow.

  Each record is one pair: features ``gen_key`` and ``real_key`` (Image -> uint8 arrays, or encoded
  bytes), ``caption_key`` (Text -> bytes), optional ``group_key``; ``real_id`` = record index.
  """

  def __init__(
    self,
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    gen_key: str = "generated_image",
    real_key: str = "image",
    caption_key: str = "caption",
    group_key: str | None = None,
  ):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.keys = (gen_key, real_key, caption_key, group_key)
    self._ds = None
    self._len = len(self._source())

  def _source(self):
    if self._ds is None:
      tfds = import_tfds()
      self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
    return self._ds

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None
    return state

  def __len__(self) -> int:
    return self._len

  def real_ids_fingerprint(self) -> str:  # real_id = record index of this build
    return ids_fingerprint([self.name, self.split, len(self)])

  def get(self, index: int, epoch: int) -> Pair:
    del epoch
    gen_key, real_key, caption_key, group_key = self.keys
    name = f"tfds:{self.name}/{self.split}#{index}"
    try:
      rec = self._source()[index]
      caption = rec[caption_key]
      caption = caption.decode() if isinstance(caption, bytes) else str(caption)
      group = int(rec[group_key]) if group_key else index
      gen, real = rec[gen_key], rec[real_key]
    except KeyError as e:
      raise BadInput(name, f"missing feature {e}") from None
    except Exception as e:
      raise BadInput(name, f"unreadable record: {type(e).__name__}: {e}") from None
    return Pair(caption, gen, real, group, index, f"{name}:{gen_key}", f"{name}:{real_key}")


# --------------------------------------------------------------------------------------- synthetic


class SyntheticSource:
  """``size`` pairs of deterministic random uint8 images ([image_size, image_size, 3]).

  Pair ``i``: real and generated images from hash(seed, i); the generated one is the real one plus
  noise (so alignment is learnable); caption ``"synthetic image {i}"``, group = real_id = i.
  """

  def __init__(self, size: int = 256, *, image_size: int = 64, seed: int = 0):
    self.size, self.image_size, self.seed = int(size), int(image_size), int(seed)

  def __len__(self) -> int:
    return self.size

  def real_ids_fingerprint(self) -> str:
    return ids_fingerprint(["synthetic", self.size, self.image_size, self.seed])

  def get(self, index: int, epoch: int) -> Pair:
    del epoch
    rng = np.random.default_rng([self.seed, index])
    s = self.image_size
    real = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    noise = rng.integers(-24, 25, (s, s, 3))
    gen = np.clip(real.astype(np.int32) + noise, 0, 255).astype(np.uint8)
    name = f"synthetic#{index}"
    return Pair(f"synthetic image {index}", gen, real, index, index, name, name)


# --------------------------------------------------------------------------------------- factory


def make_source(data, *, seed: int = 0, log: RejectLog | None = None, primary: bool = True):
  """The source named by ``config.data.source`` (see ``default_data_config``)."""
  kind = data.source
  if kind == "manifest":
    return ManifestSource(
      data.manifest,
      root=data.root,
      gens_per_caption=data.gens_per_caption,
      log=log,
      log_rows=primary,
    )
  if kind == "class_folders":
    return ClassFolderSource(data.root, template=data.caption_template, seed=seed)
  if kind == "array_record":
    return ArrayRecordSource(data.root, gens_per_caption=data.gens_per_caption)
  if kind == "tfds":
    return TfdsSource(
      data.tfds_name,
      split=data.tfds_split,
      data_dir=data.tfds_data_dir,
      gen_key=data.tfds_gen_key,
      real_key=data.tfds_real_key,
      caption_key=data.tfds_caption_key,
      group_key=data.tfds_group_key,
    )
  if kind == "synthetic":
    return SyntheticSource(data.synthetic_size, image_size=data.synthetic_image_size, seed=seed)
  raise ConfigError(
    f"config.data.source={kind!r}: expected manifest, class_folders, array_record, tfds"
    " or synthetic"
  )


def write_meta(out: str | os.PathLike, meta: dict) -> None:
  storage.write_text(storage.join(out, META_FILE), json.dumps(meta, indent=2))
