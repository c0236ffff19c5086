"""Random-access sources of (generated, real, caption) pairs.

Every source is picklable (it travels into grain worker processes), has ``len()`` = pairs per epoch,
and ``get(index, epoch) -> Pair`` that reads the encoded bytes (decoding happens in the pipeline)
and raises :class:`~gmail_jax.data.rejects.BadInput` naming the file and reason for unusable input.

* :class:`ManifestSource`  CSV / JSONL / Parquet rows ``caption, real_path, gen_path[, group]``
* :class:`ClassFolderSource`  ``real/<class>/*`` + ``generated/<class>/*``, paired by class
* :class:`ArrayRecordSource`  shards written by ``python -m gmail_jax.data.prepare``
* :class:`TfdsSource`  ``tfds.data_source`` (optional extra, read without TensorFlow)
* :class:`SyntheticSource`  deterministic random images (tests, benchmarks)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import struct

import numpy as np

from gmail_jax.data.pairing import PairIndex, same_class_draw
from gmail_jax.data.records import unpack_pair
from gmail_jax.data.rejects import BadInput, BadInputError, RejectLog
from gmail_jax.errors import ConfigError, InputError

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
  """File contents, or :class:`BadInput` ('missing file', 'unreadable: ...')."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise BadInput(path, "missing file") from None
  except IsADirectoryError:
    raise BadInput(path, "not a file (directory)") from None
  except OSError as e:
    raise BadInput(path, f"unreadable: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------- manifest


def read_manifest_table(path: str | os.PathLike, columns: tuple[str, ...] = MANIFEST_COLUMNS):
  """The manifest as a pyarrow Table of string columns (CSV/TSV, JSONL/NDJSON/JSON, Parquet):
  ``columns`` (required) and ``group`` when present."""
  import pyarrow as pa
  import pyarrow.compute as pc

  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"manifest not found: {path}")
  suffix = path.suffix.lower()
  try:
    if suffix in (".csv", ".tsv"):
      import pyarrow.csv as pacsv

      table = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
      )
    elif suffix in (".jsonl", ".ndjson", ".json"):
      import pyarrow.json as pajson

      table = pajson.read_json(path)
    elif suffix in (".parquet", ".pq"):
      import pyarrow.parquet as pq

      table = pq.read_table(path)
    else:
      raise InputError(f"manifest {path}: unknown format {suffix!r} (use .csv, .jsonl or .parquet)")
  except (pa.ArrowInvalid, OSError) as e:
    raise InputError(f"manifest {path}: cannot parse: {' '.join(str(e).split())}") from None
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

  Paths are absolute or relative to ``root`` (default: the manifest's directory). ``group``
  defaults to ``real_path``. Rows with a missing field are rejected (logged) at load; a manifest
  with no usable row is an error. ``real_id`` numbers distinct real paths in order of first
  appearance; rows sharing (real_path, caption) form one item for ``gens_per_caption``.
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
    self.root = str(root) if root else str(pathlib.Path(manifest).resolve().parent)
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
    return rel if os.path.isabs(rel) else os.path.join(self.root, rel)

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
    root = pathlib.Path(root)
    self.root, self.seed, self.template = str(root), int(seed), template
    if not (root / real_dir).is_dir() or not (root / gen_dir).is_dir():
      raise FileNotFoundError(
        f"class folders: need {root / real_dir}/<class>/ and {root / gen_dir}/<class>/"
      )
    gen_classes = sorted(p.name for p in (root / gen_dir).iterdir() if p.is_dir())
    real_classes = sorted(p.name for p in (root / real_dir).iterdir() if p.is_dir())
    self.classes = sorted(set(gen_classes) | set(real_classes))
    self.real_files: list[str] = []
    self.real_start: list[int] = []  # per class: first index in real_files
    self.real_count: list[int] = []
    gen_files, gen_class = [], []
    for c, name in enumerate(self.classes):
      reals = _image_files(root / real_dir / name)
      gens = _image_files(root / gen_dir / name)
      if gens and not reals:
        raise InputError(
          f"class folders: class {name!r} has generated images but no real images"
          f" in {root / real_dir / name}"
        )
      self.real_start.append(len(self.real_files))
      self.real_count.append(len(reals))
      self.real_files += reals
      gen_files += gens
      gen_class += [c] * len(gens)
    if not gen_files:
      raise InputError(f"class folders: no generated images under {root / gen_dir}/<class>/")
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


class ArrayRecordSource:
  """Shards ``*.array_record`` + ``index.npz`` (item, group, real_id per record), by ``prepare``.

  ``stored_crop``: ``(image_size, resize mode)`` when ``prepare --store=train`` stored every image
  as its training crop (from meta.json), else None (images to resize at train time).
  """

  def __init__(self, root: str | os.PathLike, *, gens_per_caption: int = 1):
    root = pathlib.Path(root)
    self.root = str(root)
    self.shards = sorted(str(p) for p in root.glob("*.array_record"))
    if not self.shards:
      raise FileNotFoundError(
        f"array_record: no *.array_record shards in {root} (run gmail_jax.data.prepare)"
      )
    if not (root / INDEX_FILE).exists():
      raise FileNotFoundError(
        f"array_record: {root / INDEX_FILE} missing (written by gmail_jax.data.prepare)"
      )
    with np.load(root / INDEX_FILE) as z:
      self.item, self.group, self.real_id = z["item"], z["group"], z["real_id"]
    self.index = PairIndex(self.item, gens_per_caption)
    self.stored_crop: tuple[int, str] | None = None
    try:
      meta = json.loads((root / META_FILE).read_text())
    except (OSError, ValueError):
      meta = {}  # shards of a run that wrote no meta.json: resized at train time, as always
    if isinstance(meta, dict) and meta.get("store") == "train":
      self.stored_crop = (int(meta["image_size"]), str(meta["resize"]))
    self._reader = None

  def _records(self):
    if self._reader is None:
      import grain

      self._reader = grain.sources.ArrayRecordDataSource(self.shards)
      if len(self._reader) != len(self.item):
        raise InputError(
          f"array_record {self.root}: {len(self._reader)} records but {INDEX_FILE}"
          f" lists {len(self.item)}"
        )
    return self._reader

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None  # reopened lazily in each worker
    return state

  def __len__(self) -> int:
    return len(self.index)

  def real_ids_fingerprint(self) -> str:
    """The index prepare wrote (real_id per record) and the shards it describes."""
    index = (pathlib.Path(self.root) / INDEX_FILE).read_bytes()
    shards = (f"{os.path.basename(p)}:{os.path.getsize(p)}" for p in self.shards)
    return ids_fingerprint([hashlib.sha256(index).hexdigest(), *shards])

  def get(self, index: int, epoch: int) -> Pair:
    row = self.index.row(index, epoch)
    name = f"{self.root}#{row}"
    try:
      rec = unpack_pair(self._records()[row])
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
  pathlib.Path(out, META_FILE).write_text(json.dumps(meta, indent=2))
