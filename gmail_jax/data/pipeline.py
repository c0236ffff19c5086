"""Grain input pipeline: pairs -> per-process uint8 batches -> globally sharded jax.Arrays.

Order. Global position ``g`` (0, 1, 2, ...) is epoch ``e = g // N``, slot
``perm_{hash(seed, e)}(g % N)`` (grain's O(1)-memory index shuffle, a new permutation every
epoch). Process ``p`` of ``P`` reads positions ``p, p+P, p+2P, ...``, so within an epoch every slot
goes to exactly one process. A bad pair is dropped where it stands: the other pairs keep their
positions (determinism, exactly-once).

Sources may be local or in a bucket (``gs://``: ArrayRecord shards read by array_record's own GCS
reader, manifests and images through :mod:`gmail_jax.storage`; see data/sources.py), in the main
process and in the worker processes alike.

Per element: read bytes -> decode -> ``preprocess.resize`` in the tower's mode (generated images:
optional random resized crop + flip, drawn from hash(seed, g)) -> uint8. Shards written by
``prepare --store=train`` hold the crops themselves: decode only (the random resized crop, when on,
is drawn inside the stored crop). Per batch: stack and tokenize captions. Batches are the
contract's numpy dicts ``gen_image, real_image, text, group, real_id``; normalisation happens on
device.

Teacher cache (``cached_real``, a bool mask by ``real_id``): a real image whose teacher embedding
is cached is not decoded. A batch whose real images are all cached has no ``real_image``; one with
some has ``real_image`` with zero rows where cached and ``real_decoded`` [b] saying which rows are
images (``training.teacher_cache.attach`` reads both).

Worker processes (``num_workers``) stack image batches straight into shared memory (grain's
``SharedMemoryArray``), so a batch crosses to the main process without a copy. The iterator is
a ``grain.DatasetIterator``:
``get_state``/``set_state`` and Orbax ``grain.checkpoint.CheckpointSave/CheckpointRestore``
work on it directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import grain
import numpy as np

from gmail_jax.data import preprocess
from gmail_jax.data.config import validate
from gmail_jax.data.images import decode_image, random_resized_crop_flip
from gmail_jax.data.pairing import mix64
from gmail_jax.data.rejects import BadInput, RejectLog
from gmail_jax.data.sources import make_source
from gmail_jax.errors import ConfigError, UserError

BATCH_KEYS = ("gen_image", "real_image", "text", "group", "real_id")
IMAGE_KEYS = ("gen_image", "real_image")
# Arrays below this size cross from a worker pickled in its queue message: a shared-memory segment
# per array (open, truncate, map, unlink) costs more than copying text ids or group numbers.
MIN_SHM_BYTES = 1 << 16

try:  # the permutation grain's own MapDataset.shuffle uses (O(1) memory, any length)
  from grain._src.python.experimental.index_shuffle.python.index_shuffle_module import (
    index_shuffle as _index_shuffle,
  )
except ImportError:  # pragma: no cover - grain internals moved
  _index_shuffle = None


def _permute(i: int, n: int, seed: int) -> int:
  if n == 1:
    return 0
  if _index_shuffle is not None:
    return int(_index_shuffle(i, max_index=n - 1, seed=seed % 2**32, rounds=4))
  return int(np.random.default_rng(seed).permutation(n)[i])  # slow fallback


class GlobalOrder(grain.sources.RandomAccessDataSource):
  """Position ``g`` -> ``(g, epoch, slot)``: epoch-wise shuffled slots of an ``n``-slot source."""

  def __init__(
    self,
    n: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    first_epoch: int = 0,
  ):
    if n <= 0:
      raise ValueError("empty source")
    self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
    self.num_epochs, self.first_epoch = num_epochs, int(first_epoch)

  def __len__(self) -> int:
    return sys.maxsize if self.num_epochs is None else self.n * self.num_epochs

  def __getitem__(self, g: int) -> tuple[int, int, int]:
    g = int(g)
    epoch, i = divmod(g, self.n)
    epoch += self.first_epoch
    # Seed and epoch are mixed by a hash: with seed + epoch, seed 1 epoch 0 would replay seed 0
    # epoch 1, and "several seeds" would see one batch sequence shifted by an epoch.
    slot = _permute(i, self.n, mix64(self.seed, epoch, 0x5EED)) if self.shuffle else i
    return g + self.first_epoch * self.n, epoch, slot


class LoadPair:
  """(g, epoch, slot) -> dict of uint8 crops + caption, or None (rejected; logged)."""

  def __init__(
    self,
    source,
    *,
    image_size: int,
    seed: int,
    log: RejectLog,
    augment: bool,
    augment_scale=(0.5, 1.0),
    keep_index: bool = False,
    resize: preprocess.ResizeMode = "shortest_edge_crop",
    draft_decode: bool = False,
    stored_crop: bool = False,
    cached_real: np.ndarray | None = None,
  ):
    self.resize = resize
    # Images are already image_size crops by ``resize`` (prepare --store=train): decode only.
    self.stored_crop = bool(stored_crop)
    self.cached_real = None if cached_real is None else np.asarray(cached_real, bool)
    # The augmented crop draws its box in the decoded image's pixels: never draft-decode it.
    self.draft_real = int(image_size) if draft_decode else None
    self.draft_gen = None if augment else self.draft_real
    self.source, self.image_size, self.seed, self.log = source, int(image_size), int(seed), log
    self.augment, self.augment_scale, self.keep_index = (
      bool(augment),
      tuple(augment_scale),
      keep_index,
    )

  def _cached(self, real_id: int) -> bool:
    mask = self.cached_real
    return mask is not None and 0 <= real_id < len(mask) and bool(mask[real_id])

  def _crop(self, image, name: str) -> np.ndarray:
    if not self.stored_crop:
      return preprocess.resize(image, self.image_size, self.resize)
    if image.size != (self.image_size, self.image_size):
      w, h = image.size
      raise BadInput(name, f"stored crop is {w}x{h}, meta.json says {self.image_size} px")
    return np.asarray(image)

  def __call__(self, element):
    g, epoch, slot = element
    name = f"pair #{slot}"
    try:
      pair = self.source.get(slot, epoch)
      name = pair.gen_name
      gen = decode_image(pair.gen, pair.gen_name, draft_short=self.draft_gen)
      real_crop = None  # cached teacher embedding: the real image is never looked at
      if not self._cached(int(pair.real_id)):
        name = pair.real_name
        real = decode_image(pair.real, pair.real_name, draft_short=self.draft_real)
        real_crop = self._crop(real, name)
      name = pair.gen_name
      if self.augment:
        rng = np.random.default_rng(mix64(self.seed, g, 0xA06))
        gen_crop = random_resized_crop_flip(gen, self.image_size, rng, scale=self.augment_scale)
      else:
        gen_crop = self._crop(gen, name)
    except BadInput as e:
      self.log.reject(e.path, e.reason, slot=int(slot), epoch=int(epoch))
      return None
    except UserError:
      raise  # a source that cannot be read at all (a bucket's shards): one line, not N rejects
    except (OSError, ValueError, EOFError) as e:  # a decoded image that cannot be cropped
      self.log.reject(
        name, f"preprocess failed: {type(e).__name__}: {e}", slot=int(slot), epoch=int(epoch)
      )
      return None
    out = {
      "gen_image": gen_crop,
      "real_image": real_crop,
      "caption": pair.caption,
      "group": np.int32(pair.group),
      "real_id": np.int32(pair.real_id),
    }
    if self.keep_index:
      out["slot"], out["epoch"] = np.int64(slot), np.int64(epoch)
    return out


class Collate:
  """List of elements -> the contract's batch dict (captions tokenized here, once per batch).

  Real images skipped for the teacher cache (None) are left out, or zero rows + ``real_decoded``
  (module docstring). After :meth:`enable_shared_memory_output` (grain calls it on a batch_fn that
  has it, in worker processes) images are stacked into shared memory: the worker's hand-over to the
  main process then passes the segment's name instead of copying the batch into a new one.
  """

  def __init__(
    self, tokenizer: Callable[[Sequence[str]], np.ndarray] | None, keep_caption: bool = False
  ):
    self.tokenizer, self.keep_caption = tokenizer, keep_caption
    self.shared_memory = False

  def enable_shared_memory_output(self) -> None:
    self.shared_memory = True

  def _stack(self, key: str, values: list) -> np.ndarray:
    if not (self.shared_memory and key in IMAGE_KEYS):
      return np.stack(values)
    from grain.multiprocessing import SharedMemoryArray

    first = np.asarray(values[0])
    out = SharedMemoryArray((len(values), *first.shape), dtype=first.dtype)
    return np.stack(values, out=out)

  def __call__(self, elements: Sequence[dict]) -> dict:
    captions = [e["caption"] for e in elements]
    batch = {}
    for k in elements[0]:
      if k in ("caption", "real_image"):
        continue
      batch[k] = self._stack(k, [e[k] for e in elements])
    reals = [e["real_image"] for e in elements]
    decoded = np.asarray([r is not None for r in reals])
    if decoded.any():
      if not decoded.all():
        zero = np.zeros_like(next(r for r in reals if r is not None))
        reals = [zero if r is None else r for r in reals]
        batch["real_decoded"] = decoded
      batch["real_image"] = self._stack("real_image", reals)
    if self.tokenizer is not None:
      text = np.asarray(self.tokenizer(captions), dtype=np.int32)
      if text.ndim != 2 or text.shape[0] != len(captions):
        raise ValueError(
          f"tokenizer returned shape {text.shape}, expected [{len(captions)}, context_length]"
        )
      batch["text"] = text
    if self.keep_caption or self.tokenizer is None:
      batch["caption"] = np.asarray(captions)
    return batch


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def make_dataset(
  config,
  *,
  tokenizer: Callable[[Sequence[str]], np.ndarray] | None,
  workdir: str | os.PathLike | None,
  process_index: int | None = None,
  process_count: int | None = None,
  num_epochs: int | None = None,
  first_epoch: int = 0,
  shuffle: bool = True,
  batch_size: int | None = None,
  drop_remainder: bool = True,
  keep_index: bool = False,
  keep_caption: bool = False,
  resize: preprocess.ResizeMode = "shortest_edge_crop",
  cached_real: np.ndarray | None = None,
) -> grain.IterDataset:
  """The per-process batched ``grain.IterDataset`` (see module docstring).

  ``batch_size`` is per process; default ``config.batch_size // process_count``. ``num_epochs=None``
  repeats forever. ``keep_index`` adds ``slot``/``epoch`` (tests), ``keep_caption`` the strings.
  ``resize``: how real images become ``image_size`` crops, as the model's image processor does
  (``models.towers.resize_mode(config)``; CLIP's by default). ``cached_real``: bool per
  ``real_id``, True where the teacher embedding is cached (those real images are not decoded).
  """
  data = config.data
  validate(data)
  pi, pc = _process(process_index, process_count)
  seed = int(config.seed)
  log = RejectLog.for_workdir(workdir, data.on_bad_input)
  source = make_source(data, seed=seed, log=log, primary=pi == 0)
  if batch_size is None:
    if config.batch_size % pc:
      raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by {pc} processes")
    batch_size = config.batch_size // pc
  stored_crop = getattr(source, "stored_crop", None)
  if stored_crop is not None and tuple(stored_crop) != (int(data.image_size), resize):
    size, mode = stored_crop
    raise ConfigError(
      f"config.data.root={data.root} holds prepare --store=train crops of {size} px by {mode};"
      f" this run needs {data.image_size} px by {resize}: prepare again with"
      f" --image_size={data.image_size} --resize={resize}, or the default --store=resized"
    )
  order = GlobalOrder(
    len(source), seed=seed, shuffle=shuffle, num_epochs=num_epochs, first_epoch=first_epoch
  )
  load = LoadPair(
    source,
    image_size=data.image_size,
    seed=seed,
    log=log,
    augment=data.augment_generated,
    augment_scale=tuple(data.get("augment_scale", (0.5, 1.0))),
    keep_index=keep_index,
    resize=resize,
    draft_decode=bool(data.get("draft_decode", False)),
    stored_crop=stored_crop is not None,
    cached_real=cached_real,
  )
  ds = grain.MapDataset.source(order)[pi::pc].map(load)  # None = rejected; skipped below
  ds = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=max(1, data.read_threads), prefetch_buffer_size=max(1, data.prefetch * batch_size)
    )
  )
  collate = Collate(tokenizer, keep_caption)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
  if data.num_workers > 0:
    # grain enables it itself only for 2+ workers; with one, a batch would be copied into shm
    collate.enable_shared_memory_output()
    ds = grain.experimental.WithOptionsIterDataset(
      ds, grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES)
    )
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch)
      )
    )
  return ds


def make_train_iterator(
  config,
  *,
  tokenizer: Callable[[Sequence[str]], np.ndarray],
  workdir: str | os.PathLike | None,
  process_index: int | None = None,
  process_count: int | None = None,
  **kwargs,
) -> grain.DatasetIterator:
  """Infinite iterator of per-process training batches (epoch ``e`` shuffled by hash(seed, e))."""
  ds = make_dataset(
    config,
    tokenizer=tokenizer,
    workdir=workdir,
    process_index=process_index,
    process_count=process_count,
    **kwargs,
  )
  return iter(ds)


def make_eval_iterator(
  config,
  *,
  tokenizer: Callable[[Sequence[str]], np.ndarray] | None,
  workdir: str | os.PathLike | None,
  epoch: int = 0,
  shuffle: bool = False,
  batch_size: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  **kwargs,
) -> grain.DatasetIterator:
  """One pass over epoch ``epoch`` (pairing of that epoch; unshuffled by default), last batch
  partial. Across processes every usable pair is delivered exactly once."""
  ds = make_dataset(
    config,
    tokenizer=tokenizer,
    workdir=workdir,
    process_index=process_index,
    process_count=process_count,
    num_epochs=1,
    first_epoch=epoch,
    shuffle=shuffle,
    batch_size=batch_size,
    drop_remainder=False,
    **kwargs,
  )
  return iter(ds)


def global_batch(local: dict, mesh) -> dict:
  """Per-process numpy batch -> jax.Arrays sharded over the batch on the mesh's ('data','fsdp') axes
  (whichever exist); every other axis replicates. Non-numeric entries (captions) are dropped."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  spec = PartitionSpec(axes if len(axes) > 1 else (axes[0] if axes else None))
  sharding = NamedSharding(mesh, spec)
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if value.dtype.kind not in "biuf":
      continue
    shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
  return out
