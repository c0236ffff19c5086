"""Teacher-embedding cache: z_r = f_r(x_r) once per real image, then train without the teacher.

Real images are never augmented (only generated ones are, ``data.augment_generated``), so the
frozen teacher's embedding of a real image is a fixed function of (teacher weights, compute dtype,
architecture, crop size, image). The cache stores it per ``real_id``:

    DIR/meta.json        {"key": sha256(teacher weights + architecture + dtype + image size),
                          "data": {source, manifest/root/..., image_size}, "dim": D, ...}
    DIR/embeddings.npy   float32 [capacity, D], row = real_id
    DIR/filled.npy       bool [capacity]

DIR is ``config.teacher_cache.path``, by default
``<data dir>/teacher_cache/<variant>-<dtype>-<size>``
("beside the data": the manifest's directory, ``data.root`` or ``data.tfds_data_dir``).
A cache whose key or data description differs from the current run is *stale* and refused
(``StaleCacheError``) unless ``config.teacher_cache.rebuild`` is set.

Filling: ``precompute`` runs one unshuffled pass of the pairs (epoch 0) through the jitted teacher,
batch-sharded over the training mesh; rows missed by it (e.g. class-folder pairings draw other real
images in later epochs) are computed on first sight by ``attach`` and written back. In training,
``attach`` adds ``teacher_emb`` [b, D] to the per-process batch and drops ``real_image``; the
train step then skips the teacher forward (train_step.make_train_step). The input pipeline gets
the rows filled when training starts (``cached_real``): it does not decode those real images at
all, so a filled cache halves the images decoded per pair. Process 0 owns the files
(the data dir is assumed shared by all processes); the others keep copy-on-write views and fill
them from the same all-gathered rows, so every process holds the same cache.

DIR may be in a bucket (``gs://``; ``config.teacher_cache.path``, or the default beside data or a
workdir there). A memmap cannot live in a bucket, so each process keeps the two arrays in a local
folder under ``storage.cache_root()/teacher_cache`` (downloaded at open) and process 0 uploads them
whole at ``flush`` (embeddings first: rows marked filled are always stored); meta.json is read
and written in the bucket itself, so the staleness check sees what is there.

Key: the teacher's exact weights fingerprint (training/fingerprint.py, the identity checkpoints
use too) with its architecture, dtype and crop size; the data description includes what the ids
mean (the source's ordered real-image keys), so a reordered manifest is never reused silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from gmail_jax import storage
from gmail_jax.errors import UserError
from gmail_jax.models import towers
from gmail_jax.training import fingerprint

META = "meta.json"
EMB = "embeddings.npy"
FILLED = "filled.npy"
VERSION = 1


class StaleCacheError(UserError, ValueError):
  """The cache on disk was built for another teacher (or other data) than this run's."""


def teacher_key(frozen: nnx.State, *, model_config: Any, dtype: str, image_size: int) -> str:
  """The cache key: weights fingerprint + everything else the teacher embedding depends on.

  Only the vision tower's weights are fingerprinted (the text tower does not touch z_r).
  """
  vision = frozen["vision"] if "vision" in frozen else frozen
  desc = json.dumps(
    {
      "weights": fingerprint.weights_fingerprint(vision),
      "vision": dataclasses.asdict(model_config.vision),
      "embed_dim": model_config.embed_dim,
      "dtype": dtype,
      "image_size": int(image_size),
    },
    sort_keys=True,
  )
  return hashlib.sha256(desc.encode()).hexdigest()


def _absolute(p: str) -> str:
  """A local path made absolute; a bucket URL as given."""
  return p if storage.is_remote(p) else os.path.abspath(p)


def data_description(data) -> dict[str, Any]:
  """What ``real_id`` refers to: the source and where it lives (absolute paths), and crop size."""
  out: dict[str, Any] = {"source": data.source, "image_size": int(data.image_size)}
  for key in ("manifest", "root", "tfds_name", "tfds_split", "tfds_data_dir", "tfds_real_key"):
    value = data.get(key)
    if value:
      out[key] = _absolute(value) if key in ("manifest", "root", "tfds_data_dir") else value
  if data.source == "synthetic":
    out["synthetic"] = [int(data.synthetic_size), int(data.synthetic_image_size)]
  return out


def run_description(config) -> dict[str, Any]:
  """``data_description`` plus the seed (the synthetic source draws its images from it)."""
  out = data_description(config.data)
  if config.data.source == "synthetic":
    out["seed"] = int(config.seed)
  return out


def default_directory(config, workdir: str | os.PathLike) -> str:
  """``<data dir>/teacher_cache/<variant>-<dtype>-<size>`` (synthetic data: under the workdir)."""
  data = config.data
  if data.source == "manifest" and data.get("manifest") and not data.get("root"):
    base = posixpath.dirname(_absolute(data.manifest))
  elif data.get("root"):
    base = _absolute(data.root)
  elif data.source == "tfds" and data.get("tfds_data_dir"):
    base = _absolute(data.tfds_data_dir)
  else:
    base = _absolute(os.fspath(workdir))
  tag = f"{config.model.variant.replace('/', '')}-{config.model.dtype}-{int(data.image_size)}"
  return storage.join(base, "teacher_cache", tag)


# ---------------------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------------------


class TeacherCache:
  """Rows of teacher embeddings by ``real_id`` (memory-mapped; grows on demand).

  ``directory``: where the cache is (a local folder or a bucket URL); ``local``: the folder the
  arrays are mapped from (``directory`` itself when it is local)."""

  def __init__(
    self, directory: str, *, key: str, data: dict, dim: int, writer: bool, local: str | None = None
  ):
    self.directory, self.key, self.data, self.dim, self.writer = directory, key, data, dim, writer
    self.local = directory if local is None else local
    self.hits = self.misses = 0
    self._emb = self._filled = None
    self._dirty = False  # bucket: rows put since the last upload
    if os.path.exists(os.path.join(self.local, EMB)):
      self._map()

  # --------------------------------------------------------------------------------- open/create
  @classmethod
  def open(
    cls,
    directory: str | os.PathLike,
    *,
    key: str,
    data: dict,
    dim: int,
    rebuild: bool = False,
    writer: bool | None = None,
  ) -> TeacherCache:
    """Opens (or creates) the cache at ``directory`` for teacher ``key`` and data ``data``.

    Raises StaleCacheError (naming the directory and both keys) when the cache on disk belongs to
    another teacher or data and ``rebuild`` is False; ``rebuild=True`` starts it afresh.
    """
    directory = os.fspath(directory)
    writer = jax.process_index() == 0 if writer is None else writer
    meta_path = storage.path(directory) / META
    if meta_path.exists():
      try:
        meta = json.loads(meta_path.read_text())
      except (OSError, ValueError) as e:
        raise StaleCacheError(f"teacher cache {meta_path}: unreadable ({e}); delete it") from None
      problem = None
      if meta.get("key") != key:
        problem = (
          f"was built with teacher {str(meta.get('key'))[:16]}…, this run's teacher is {key[:16]}…"
          " (other weights, architecture, dtype or image size)"
        )
      elif meta.get("data") != data:
        problem = f"was built for data {meta.get('data')}, this run reads {data}"
      elif int(meta.get("dim", -1)) != dim or meta.get("version") != VERSION:
        problem = f"has dim {meta.get('dim')} / version {meta.get('version')}, expected {dim}"
      if problem and not rebuild:
        raise StaleCacheError(
          f"stale teacher cache {directory}: it {problem}. Delete the directory, set"
          " config.teacher_cache.rebuild=True, or point config.teacher_cache.path elsewhere"
        )
      if problem or rebuild:
        cls._wipe(directory, writer)
    if writer:
      try:
        storage.makedirs(directory)
        if not meta_path.exists():
          _write_json(meta_path, {"version": VERSION, "key": key, "data": data, "dim": dim})
      except OSError as e:
        raise OSError(
          f"config.teacher_cache.path: cannot write the teacher cache at {directory} ({e});"
          " set config.teacher_cache.path to a writable directory"
        ) from None
    if jax.process_count() > 1:  # the others open only after process 0 created/wiped the files
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"teacher_cache_open:{directory}")
    local = _download(directory) if storage.is_remote(directory) else None
    return cls(directory, key=key, data=data, dim=dim, writer=writer, local=local)

  @staticmethod
  def _wipe(directory: str, writer: bool) -> None:
    if writer:
      for name in (EMB, FILLED, META):
        path = storage.path(directory) / name
        if path.exists():
          path.unlink()

  def _map(self) -> None:
    mode = "r+" if self.writer else "c"  # non-writers: private copy-on-write view
    self._emb = np.load(os.path.join(self.local, EMB), mmap_mode=mode)
    self._filled = np.load(os.path.join(self.local, FILLED), mmap_mode=mode)

  @property
  def capacity(self) -> int:
    return 0 if self._filled is None else int(self._filled.shape[0])

  @property
  def num_filled(self) -> int:
    return 0 if self._filled is None else int(np.count_nonzero(self._filled))

  def _grow(self, needed: int) -> None:
    """Capacity >= ``needed`` rows (doubling; rewrites the files once per doubling)."""
    if needed <= self.capacity:
      return
    cap = max(needed, 2 * self.capacity, 1024)
    emb = np.zeros((cap, self.dim), np.float32)
    filled = np.zeros((cap,), bool)
    if self._filled is not None:
      emb[: self.capacity] = self._emb
      filled[: self.capacity] = self._filled
    if self.writer:
      self._emb = self._filled = None
      _save_npy(os.path.join(self.local, EMB), emb)
      _save_npy(os.path.join(self.local, FILLED), filled)
      self._map()
    else:
      self._emb, self._filled = emb, filled

  # ----------------------------------------------------------------------------------- rows
  def lookup(self, real_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 [b, D], hit mask [b]) for ``real_id`` [b]; misses are zero rows."""
    ids = np.asarray(real_id, np.int64).reshape(-1)
    if np.any(ids < 0):
      raise ValueError(f"teacher cache: negative real_id in batch: {ids[ids < 0][:4]}")
    hit = np.zeros(ids.shape, bool)
    emb = np.zeros((ids.size, self.dim), np.float32)
    inside = ids < self.capacity
    if np.any(inside):
      hit[inside] = self._filled[ids[inside]]
      emb[hit] = self._emb[ids[hit]]
    self.hits += int(hit.sum())
    self.misses += int((~hit).sum())
    return emb, hit

  def put(self, real_id: np.ndarray, emb: np.ndarray) -> None:
    ids = np.asarray(real_id, np.int64).reshape(-1)
    emb = np.asarray(emb, np.float32).reshape(ids.size, self.dim)
    self._grow(int(ids.max()) + 1 if ids.size else 0)
    self._emb[ids] = emb
    self._filled[ids] = True
    self._dirty = True

  def filled_mask(self) -> np.ndarray:
    """bool [capacity], a plain copy (picklable into input workers): True where a row is cached."""
    return np.zeros((0,), bool) if self._filled is None else np.array(self._filled, bool)

  def flush(self) -> None:
    """The rows put so far, on disk (a bucket cache: uploaded, each array whole)."""
    if self.writer and self._emb is not None:
      self._emb.flush()
      self._filled.flush()
      if self.local != self.directory and self._dirty:
        # Embeddings first: a kill between the two uploads leaves filled marks that are all stored.
        for name in (EMB, FILLED):
          _upload(os.path.join(self.local, name), storage.join(self.directory, name))
        self._dirty = False

  def close(self) -> None:
    """``flush``, then (a bucket cache) the local copy goes."""
    self.flush()
    if self.local != self.directory:
      self._emb = self._filled = None
      shutil.rmtree(self.local, ignore_errors=True)


def _save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def _write_json(path: storage.Path, obj: dict) -> None:
  storage.write_text(path, json.dumps(obj, indent=1, sort_keys=True))  # whole or not at all


def _download(directory: str) -> str:
  """A fresh local folder (``storage.cache_root()/teacher_cache``, one per open) with the
  arrays of bucket cache ``directory``, when it has both."""
  import fsspec

  root = storage.cache_root() / "teacher_cache"
  root.mkdir(parents=True, exist_ok=True)
  digest = hashlib.sha256(directory.encode()).hexdigest()[:12]
  local = pathlib.Path(tempfile.mkdtemp(prefix=f"{digest}-", dir=root))
  fs, key = fsspec.core.url_to_fs(directory)
  if all(fs.exists(f"{key}/{name}") for name in (EMB, FILLED)):
    for name in (EMB, FILLED):
      fs.get_file(f"{key}/{name}", os.fspath(local / name))
    emb = np.load(local / EMB, mmap_mode="r")
    filled = np.load(local / FILLED, mmap_mode="r")
    if emb.shape[0] != filled.shape[0]:  # a kill between the two uploads of a doubling: refill
      del emb, filled
      for name in (EMB, FILLED):
        (local / name).unlink()
  return os.fspath(local)


def _upload(local: str, url: str) -> None:
  """A local file to ``url``, streamed; the object appears whole when the upload ends."""
  import fsspec

  fs, key = fsspec.core.url_to_fs(url)
  fs.put_file(local, key)


# ---------------------------------------------------------------------------------------------
# Teacher forward, precompute, and the training-batch hook.
# ---------------------------------------------------------------------------------------------


def make_teacher_embed(
  models, frozen: nnx.State, mesh, *, mean=None, std=None
) -> Callable[[dict], np.ndarray]:
  """``embed(local_real_uint8 [b,S,S,3]) -> np.float32 [b_global, D]`` on every process.

  The same computation as the train step's teacher branch (normalize on device, frozen teacher
  vision tower), jitted with the batch sharded over the mesh; rows are all-gathered so every
  process can fill its cache with the global batch.
  """
  from gmail_jax.data import pipeline, preprocess
  from gmail_jax.training import train_step

  mean = preprocess.CLIP_MEAN if mean is None else mean
  std = preprocess.CLIP_STD if std is None else std
  fn = jax.jit(
    lambda frozen, real: train_step.teacher_model(models, frozen).vision(
      preprocess.normalize(real, mean, std)
    ),
    out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )

  def embed(local_real: np.ndarray) -> np.ndarray:
    real = pipeline.global_batch({"real_image": local_real}, mesh)["real_image"]
    return np.asarray(jax.device_get(fn(frozen, real)), np.float32)

  return embed


def _allgather_rows(local: np.ndarray) -> np.ndarray:
  """Per-process rows [b, ...] -> all processes' rows [P*b, ...] in process order."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def attach(local: dict, cache: TeacherCache, embed: Callable[[np.ndarray], np.ndarray]) -> dict:
  """Adds ``teacher_emb`` [b, D] (float32) to a per-process batch and drops ``real_image``.

  Misses (in any process: the decision is collective) run the teacher on this batch's real images
  once and are written to the cache; later epochs hit. Rows the pipeline did not decode (cached
  when it started: no ``real_image``, or ``real_decoded`` False) are hits; they go through the
  teacher as zero images when another row misses, and are never written back.
  """
  emb, hit = cache.lookup(local["real_id"])
  b = emb.shape[0]
  real = local.get("real_image")
  decoded = np.asarray(local.get("real_decoded", np.full(b, real is not None)), bool)
  if np.any(~hit & ~decoded):
    raise RuntimeError(
      "teacher cache: a real image the input pipeline skipped as cached is not in the cache"
      f" ({cache.directory} changed during the run?)"
    )
  any_miss = bool(np.any(_allgather_rows(np.asarray([not hit.all()]))))
  if any_miss:
    if real is None:  # every row here is cached; the teacher runs for the other processes' misses
      real = np.zeros_like(local["gen_image"])
    rows = embed(real)  # global batch, process order
    ids = _allgather_rows(local["real_id"])
    keep = _allgather_rows(decoded)
    cache.put(ids[keep], rows[keep])
    start = jax.process_index() * b
    emb = np.where(hit[:, None], emb, rows[start : start + b])
  out = {k: v for k, v in local.items() if k not in ("real_image", "real_decoded")}
  out["teacher_emb"] = emb
  return out


def precompute(
  config,
  cache: TeacherCache,
  embed: Callable[[np.ndarray], np.ndarray],
  *,
  workdir: str | os.PathLike | None,
  batch_size: int | None = None,
) -> int:
  """One unshuffled pass (epoch 0) of the pairs through the teacher; returns rows written.

  Batches of ``batch_size`` per process (default the training per-process batch), padded to full
  size by repeating the last row (so the jitted forward compiles once and shards evenly); all
  processes step together until every one has run out of data.
  """
  from gmail_jax.data import pipeline

  b = int(batch_size or config.batch_size // jax.process_count())
  it = pipeline.make_eval_iterator(
    config,
    tokenizer=None,
    workdir=workdir,
    batch_size=b,
    keep_caption=False,
    resize=towers.resize_mode(config),
  )
  written = 0
  try:
    while True:
      local = next(it, None)
      done = local is None
      if all(_allgather_rows(np.asarray([done]))):
        break
      if done:  # this process is out of data; keep stepping with a dummy batch
        size = config.data.image_size
        real = np.zeros((b, size, size, 3), np.uint8)
        ids = np.full((b,), -1, np.int64)
      else:
        n = len(local["real_id"])
        pad = np.r_[np.arange(n), np.full(b - n, n - 1)].astype(np.int64)
        real, ids = local["real_image"][pad], np.asarray(local["real_id"], np.int64)[pad]
      rows = embed(real)
      all_ids = _allgather_rows(ids)
      keep = all_ids >= 0
      cache.put(all_ids[keep], rows[keep])
      written += int(np.unique(all_ids[keep]).size)
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
  cache.flush()
  return written


def from_config(
  config, *, models, frozen: nnx.State, mesh, workdir: str | os.PathLike, model_config
) -> tuple[TeacherCache, Callable[[np.ndarray], np.ndarray]] | None:
  """The cache and teacher-embed function for a run, or None when ``config.teacher_cache`` is off.

  ``config.teacher_cache``: ``enabled`` (bool), ``path`` ('' = beside the data), ``rebuild``
  (bool), ``precompute`` (bool: fill with one pass before training; else fill on first sight).
  Refuses augmented *real* images (none of our pipelines augment them) and stale caches.
  """
  tc = config.teacher_cache
  if not tc.enabled:
    return None
  directory = tc.path or default_directory(config, workdir)
  key = teacher_key(
    frozen, model_config=model_config, dtype=config.model.dtype, image_size=config.data.image_size
  )
  from gmail_jax.data import sources

  # What the ids mean: the ordered real-image keys of the source as it reads them now (a manifest
  # reordered in place keeps its path but renumbers its real images).
  source = sources.make_source(config.data, seed=int(config.seed), primary=False)
  data = {**run_description(config), "real_ids": source.real_ids_fingerprint()}
  cache = TeacherCache.open(
    directory,
    key=key,
    data=data,
    dim=int(model_config.embed_dim),
    rebuild=bool(tc.rebuild),
  )

  spec = towers.get(config.model.name).preprocess
  embed = make_teacher_embed(models, frozen, mesh, mean=spec.mean, std=spec.std)
  if tc.precompute and cache.num_filled == 0:
    precompute(config, cache, embed, workdir=workdir)
  return cache, embed
