"""Device mesh from ``config.mesh`` and the shardings of batch, params and train state.

Mesh axes are ``('data', 'fsdp')``, both Auto (GSPMD propagation; ecosystem.md §2). The batch is
split over both axes; parameters are replicated (pure data parallel, ``fsdp`` = 1) or, with
``fsdp`` > 1, every large parameter is sharded on ``fsdp`` along its largest divisible dimension
(ZeRO-3 style; XLA all-gathers it for the matmuls).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from gmail_jax.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)
# Parameters smaller than this stay replicated even under FSDP (biases, LayerNorms, LoRA).
FSDP_MIN_SIZE = 2**16


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves ``{'data': -1, 'fsdp': 2}`` (-1 = the rest) to sizes; errors name ``config.mesh``."""
  unknown = set(mesh_cfg) - set(AXES)
  if unknown:
    raise ConfigError(f"config.mesh: unknown axes {sorted(unknown)}; allowed {AXES}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(mesh_cfg)}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh: sizes must be positive or -1, got {dict(mesh_cfg)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ConfigError(f"config.mesh: {dict(mesh_cfg)} does not divide {n_devices} devices")
    sizes = [n_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n_devices:
    raise ConfigError(
      f"config.mesh: {dict(zip(AXES, sizes, strict=True))} uses {int(np.prod(sizes))} devices,"
      f" but {n_devices} are available"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """Auto-axis ``('data', 'fsdp')`` mesh over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """``P`` sharding the largest dim divisible by ``fsdp`` (size rule), else replicated."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree, mesh: jax.sharding.Mesh, *, fsdp: bool):
  """NamedShardings for a tree of arrays/ShapeDtypeStructs: replicated, or the FSDP size rule."""
  n = mesh.shape["fsdp"]

  def one(x):
    spec = fsdp_spec(tuple(x.shape), n) if fsdp else P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, tree)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """The global batch must split evenly over devices and processes (error names the key)."""
  n = mesh.size
  if batch_size % n:
    raise ConfigError(f"config.batch_size={batch_size} is not divisible by the {n} mesh devices")
  if batch_size % jax.process_count():
    raise ConfigError(
      f"config.batch_size={batch_size} is not divisible by {jax.process_count()} processes"
    )


def put_global(x, sharding: NamedSharding) -> jax.Array:
  """Places a host value that every process holds in full onto a (multi-process) sharding."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
