"""Evaluator interface, registry, and helpers shared by the evaluators.

Interface (small on purpose; the training loop only needs these three names):

    evaluators = common.from_config(config.evals)          # list[Evaluator]
    for ev in evaluators:
      if ev.should_run(step):                               # every_steps > 0 and step % every == 0
        metrics.update(ev.run(encoder_or_fns, step))        # {prefix + key: float}

`config.evals.<name> = dict(type=<'retrieval'|'zeroshot'|'gap'|'clustering'|'probe'>, every_steps=N,
prefix='z/<name>/', **type_specific_kwargs)`; see each evaluator class for its kwargs.
`every_steps=0` means "only when called explicitly" (e.g. from `python -m gmail_jax.evaluate`).

`encoder_or_fns` is either an object with `encode_images(images) -> [N, D]` and
`encode_texts(texts) -> [N, D]` (e.g. `gmail_jax.api.ClipEncoder`; images are lists of PIL images or
uint8 NHWC arrays, texts are lists of str), optionally `encode_generated(images)` (the GMAIL student
path for generated images; defaults to `encode_images`), or a mapping with the same callables under
the keys 'images', 'texts' and optionally 'generated'. Embeddings are L2-normalised by the
evaluators where the metric needs it.

`embed_sharded(fn, inputs, batch_size=..., mesh=...)` runs a jitted batch function over a dataset in
fixed-size, globally sharded batches (padding masked out, multi-host aware); encoders built on raw
model functions use it so that evaluation shards like training does.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmail_jax.errors import ConfigError

# Keys of an evaluator's config that name data on disk (checked before anything is built).
PATH_KEYS = ("images_dir", "captions_json", "karpathy_json", "dataset", "manifest")
# type name -> "module:Class" (imported lazily: the evaluator modules import this one).
REGISTRY: dict[str, str] = {
  "retrieval": "gmail_jax.evaluators.retrieval:RetrievalEvaluator",
  "zeroshot": "gmail_jax.evaluators.zeroshot:ZeroShotEvaluator",
  "gap": "gmail_jax.evaluators.gap:GapEvaluator",
  "clustering": "gmail_jax.evaluators.clustering:ClusteringEvaluator",
  "probe": "gmail_jax.evaluators.probe:ProbeEvaluator",
  "captioning": "gmail_jax.captioning.evaluator:CaptioningEvaluator",
}

# ---------------------------------------------------------------------------------------------
# Arrays.
# ---------------------------------------------------------------------------------------------


def to_numpy(x: Any, dtype=np.float64) -> np.ndarray:
  """numpy copy of a numpy/jax array; a multi-host global jax.Array is all-gathered first."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), dtype=dtype)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Row-wise x / ||x|| (numpy)."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


# ---------------------------------------------------------------------------------------------
# Sharded embedding.
# ---------------------------------------------------------------------------------------------


def embed_sharded(
  fn: Callable[[Any], jax.Array],
  inputs: Any,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  batch_axes: str | Sequence[str] = ("data",),
) -> np.ndarray:
  """Apply a batch function to a dataset in fixed-size, globally sharded batches.

  Each process passes its own slice of the dataset (`inputs`: an array or a pytree of arrays with
  a common leading dim n_local; a process may have fewer rows than another). Every batch has the
  fixed global size `batch_size` (one compilation): the local part is padded with zeros to
  `batch_size // process_count` rows, put on the mesh with `make_array_from_process_local_data`
  on P(batch_axes), passed through `fn`, then all-gathered with `process_allgather`; padded rows are
  dropped with a validity mask gathered the same way. All processes run the same number of batches
  (the maximum over processes), as collectives require.

  Args:
    fn: jitted callable, global batch pytree -> [batch_size, D] (e.g. `jax.jit(model_apply)`).
    inputs: this process's rows.
    batch_size: global batch; must divide by process_count × the devices on `batch_axes`.
    mesh: mesh to shard on; default a 1-axis 'data' mesh over all devices.
    batch_axes: mesh axes the batch dim is sharded over.

  Returns:
    numpy [sum of n_local over processes, D], rows in (process, local index) order, identical on
    every process. With one process: the rows of `inputs` in order.
  """
  if mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_axes = ("data",)
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  n_shards = math.prod(mesh.shape[a] for a in axes)
  nproc = jax.process_count()
  if batch_size % n_shards or batch_size % nproc:
    raise ValueError(
      f"embed_sharded: batch_size={batch_size} must divide by the {n_shards} devices on mesh axes "
      f"{axes} and by process_count={nproc}"
    )
  local_bs = batch_size // nproc
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("embed_sharded: empty inputs")
  n_local = int(np.shape(leaves[0])[0])
  counts = np.asarray(multihost_utils.process_allgather(np.int32(n_local))).reshape(-1)
  steps = max(1, max(math.ceil(int(c) / local_bs) for c in counts))
  sharding = NamedSharding(mesh, P(axes))

  outs, masks = [], []
  for s in range(steps):
    lo, hi = s * local_bs, min((s + 1) * local_bs, n_local)
    n_valid = max(0, hi - lo)

    def _pad(a, lo=lo, n_valid=n_valid):
      a = np.asarray(a)
      out = np.zeros((local_bs,) + a.shape[1:], a.dtype)
      out[:n_valid] = a[lo : lo + n_valid]
      return out

    local = jax.tree.map(_pad, inputs)
    batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)
    out = fn(batch)
    outs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
    mask = np.zeros((local_bs,), bool)
    mask[:n_valid] = True
    masks.append(np.asarray(multihost_utils.process_allgather(mask, tiled=True)).reshape(-1))
  # [steps, nproc * local_bs, D] -> (process, step, row) order, then drop the padding.
  out = np.stack(outs).reshape(steps, nproc, local_bs, -1).transpose(1, 0, 2, 3)
  mask = np.stack(masks).reshape(steps, nproc, local_bs).transpose(1, 0, 2)
  return out.reshape(-1, out.shape[-1])[mask.reshape(-1)]


# ---------------------------------------------------------------------------------------------
# Encoders.
# ---------------------------------------------------------------------------------------------


class _FnEncoder:
  """Adapter: a mapping {'images': fn, 'texts': fn, 'generated': fn?} -> encoder object."""

  def __init__(self, fns: Mapping[str, Callable]):
    unknown = set(fns) - {"images", "texts", "generated"}
    if unknown:
      raise ValueError(f"encoder fns: unknown keys {sorted(unknown)} (use images/texts/generated)")
    self._fns = dict(fns)

  def _get(self, key: str) -> Callable:
    if key not in self._fns:
      raise ValueError(f"encoder fns: this evaluator needs the '{key}' function")
    return self._fns[key]

  def encode_images(self, images):
    return self._get("images")(images)

  def encode_texts(self, texts):
    return self._get("texts")(texts)

  def encode_generated(self, images):
    return self._fns.get("generated", self._get("images"))(images)


def as_encoder(encoder_or_fns: Any) -> Any:
  """An object with encode_images / encode_texts / encode_generated (see module docstring)."""
  if isinstance(encoder_or_fns, Mapping):
    return _FnEncoder(encoder_or_fns)
  if not (hasattr(encoder_or_fns, "encode_images") or hasattr(encoder_or_fns, "encode_texts")):
    raise TypeError(
      f"evaluator: expected an encoder with encode_images/encode_texts or a dict of fns, got "
      f"{type(encoder_or_fns).__name__}"
    )
  return encoder_or_fns


def encode_generated(encoder: Any, images) -> np.ndarray:
  fn = getattr(encoder, "encode_generated", None) or encoder.encode_images
  return fn(images)


def encode_in_batches(fn: Callable, items: Sequence, batch_size: int) -> np.ndarray:
  """Concatenate fn(items[i:i+batch_size]) as a float64 numpy array (keeps host memory bounded)."""
  if not len(items):
    raise ValueError("encode_in_batches: no items")
  return np.concatenate(
    [to_numpy(fn(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
  )


# ---------------------------------------------------------------------------------------------
# Evaluator base + registry.
# ---------------------------------------------------------------------------------------------


class Evaluator(abc.ABC):
  """Base: `every_steps`, `prefix`, `should_run(step)`, `run(encoder_or_fns, step)`."""

  def __init__(self, name: str, *, every_steps: int = 0, prefix: str | None = None):
    self.name = name
    self.every_steps = int(every_steps)
    self.prefix = f"z/{name}/" if prefix is None else prefix

  def should_run(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  @abc.abstractmethod
  def compute(self, encoder: Any) -> dict[str, float]:
    """Un-prefixed metrics for an encoder (see as_encoder)."""

  def run(self, encoder_or_fns: Any, step: int | None = None) -> dict[str, float]:
    """{prefix + key: float} for this evaluator; `step` is informational."""
    del step
    metrics = self.compute(as_encoder(encoder_or_fns))
    return {self.prefix + k: float(v) for k, v in metrics.items()}


def _resolve(type_name: str) -> type[Evaluator]:
  import importlib

  module, cls = REGISTRY[type_name].split(":")
  return getattr(importlib.import_module(module), cls)


def from_config(
  evals_config: Mapping[str, Mapping[str, Any]] | None, **defaults
) -> list[Evaluator]:
  """Build evaluators from `config.evals` (name -> dict(type=..., every_steps=..., ...)).

  `defaults` are extra kwargs passed to every evaluator whose constructor accepts them (e.g.
  batch_size); per-evaluator keys win.
  """
  import inspect

  evaluators = []
  for name, cfg in (evals_config or {}).items():
    cfg = dict(cfg)
    type_name = cfg.pop("type", None)
    if type_name not in REGISTRY:
      raise ConfigError(
        f"config.evals.{name}.type: must be one of {sorted(REGISTRY)}, got {type_name!r}"
      )
    cls = _resolve(type_name)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in defaults.items() if k in params}
    kwargs.update(cfg)
    unknown = [k for k in kwargs if k not in params]
    if unknown:
      raise ConfigError(
        f"config.evals.{name}: unknown keys {unknown} for type '{type_name}' "
        f"(accepted: {sorted(p for p in params if p not in ('self', 'name'))})"
      )
    evaluators.append(cls(name, **kwargs))
  return evaluators
