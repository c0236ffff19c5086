"""Orbax checkpoints of the TRAINABLE state only, plus the Grain iterator state.

Each step directory under ``WORKDIR/checkpoints/<step>/`` holds three items:

    state  {'step', 'params': {'lora', ['proj'], ['log_scale']}, 'opt'}   (StandardSave)
    data   per-process Grain iterator state                                (grain CheckpointSave)
    meta   {'step', 'teacher': {...source id..., 'checksum'}}              (JsonSave)

Frozen weights are never written (big_vision distill: "we don't ever modify them"); ``meta``
records where they came from and a checksum so a resume on a different teacher fails loudly.

Initialisation order of a run (train.py implements it in this order):
  1. the latest committed checkpoint in WORKDIR/checkpoints (auto-resume; also after SIGKILL:
     uncommitted async saves are ignored by Orbax);
  2. otherwise the frozen weights from ``config.init`` (pretrained CLIP), LoRA freshly initialised;
  3. otherwise everything from scratch (``config.model.variant`` with ``config.seed``).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"
CHECKSUM_RTOL = 1e-3


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def frozen_checksum(frozen) -> float:
  """sum_i |w_i| over every frozen leaf (fp32) — cheap, sharding-agnostic teacher fingerprint."""
  leaves = jax.tree.leaves(frozen)
  total = jax.jit(lambda xs: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in xs))(leaves)
  return float(total)


def check_teacher(saved: dict, current: dict, where: str) -> None:
  """Raises ValueError when a checkpoint's teacher differs from the one this run built."""
  for key in sorted(set(saved) | set(current)):
    if key == "checksum":
      continue
    if saved.get(key) != current.get(key):
      raise ValueError(
        f"{where}: checkpoint was trained on teacher {key}={saved.get(key)!r}, this run has"
        f" {current.get(key)!r}; use a fresh --workdir or the original config"
      )
  a, b = saved.get("checksum"), current.get("checksum")
  if a is not None and b is not None and abs(a - b) > CHECKSUM_RTOL * max(abs(a), abs(b), 1e-12):
    raise ValueError(
      f"{where}: teacher weights changed since the checkpoint (checksum {a:.6g} -> {b:.6g})"
    )


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` (keep-N, async) for the GMAIL train state."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
      cleanup_tmp_directories=True,  # a save interrupted by SIGKILL must not block the rerun
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, *, data_iter=None, teacher: dict | None = None) -> None:
    """Saves ``state`` (minus the in-step ``bad_step`` flag); async unless disabled."""
    items = {
      "state": ocp.args.StandardSave(_persisted(state)),
      "meta": ocp.args.JsonSave({"step": int(step), "teacher": teacher or {}}),
    }
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(
    self, abstract_state: dict, *, step: int | None = None, data_iter=None
  ) -> tuple[dict, dict]:
    """Restores (state, meta) at ``step`` (default latest) onto ``abstract_state``'s shardings.

    ``data_iter`` (if given) is restored in place to the position saved with the step.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = _persisted(abstract_state)
    items = {
      "state": ocp.args.StandardRestore(target),
      "meta": ocp.args.JsonRestore(),
    }
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = dict(restored["state"])
    if "bad_step" in abstract_state:
      state["bad_step"] = jnp.full((), -1, jnp.int32)
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return state, dict(restored["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _persisted(state: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in state.items() if k in ("step", "params", "opt")}
