"""Orbax checkpoints of the TRAINABLE state only, plus the Grain iterator state.

Each step directory under ``WORKDIR/checkpoints/<step>/`` holds three items:

    state  {'step', 'params': {'lora', ['proj'], ['log_scale']}, 'opt'}   (StandardSave)
    data   per-process Grain iterator state                                (grain CheckpointSave)
    meta   {'step', 'teacher': {'source', 'fingerprint'}}                  (JsonSave)

Frozen weights are never written (big_vision distill: "we don't ever modify them"); ``meta``
records where they came from and their exact fingerprint (training/fingerprint.py), so a resume
on other teacher weights is refused by name.

Restore walks back from the newest step to the newest intact one (``restore_latest``): a step
whose items cannot be read (truncated files, a missing item) is named in the log, and once an
older step restores, the unusable newer ones are moved to WORKDIR/checkpoints.unusable/ (kept, and
out of the way of the steps the resumed run saves again). With no intact step the run stops with
one line naming the directory, and nothing is moved.

WORKDIR may be a bucket URL (``gs://bucket/run``). Orbax then marks a finished step by the object
``<step>/commit_success.txt`` instead of renaming a temp folder (a step without it is unfinished
and removed at the next start); a bucket has no rename either, so an unusable step is set aside
by copying its objects and then deleting the original, its commit marker first: a kill part-way
leaves either a step Orbax still lists (set aside again at the next start) or an unfinished one
(removed by Orbax), never a half-deleted step that reads as finished.

Initialisation order of a run (train.py implements it in this order):
  1. the latest committed checkpoint in WORKDIR/checkpoints (auto-resume; also after SIGKILL:
     uncommitted async saves are ignored by Orbax);
  2. otherwise the frozen weights from ``config.init`` (pretrained CLIP), LoRA freshly initialised;
  3. otherwise everything from scratch (``config.model.variant`` with ``config.seed``).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from gmail_jax import storage
from gmail_jax.errors import ResumeError

CHECKPOINT_DIR = "checkpoints"
UNUSABLE_DIR = "checkpoints.unusable"
# What Orbax writes last into a step on a bucket (its CommitFileTemporaryPath); local steps are
# renamed into place instead.
COMMIT_FILE = "commit_success.txt"


def resolve_workdir(workdir: str | os.PathLike) -> str:
  """``workdir`` as a string: a local path made absolute, a bucket URL as given (no trailing /)."""
  workdir = os.fspath(workdir)
  return workdir.rstrip("/") if storage.is_remote(workdir) else os.path.abspath(workdir)


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return storage.join(resolve_workdir(workdir), CHECKPOINT_DIR)


def saved_steps(workdir: str | os.PathLike) -> list[int]:
  """Finished step directories under WORKDIR/checkpoints (read-only: creates nothing)."""
  d = checkpoint_dir(workdir)
  if not storage.is_remote(d):
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []
  try:
    names = [p.name for p in storage.path(d).iterdir()]
  except FileNotFoundError:  # nothing under the prefix yet
    return []
  root = storage.path(d)
  return sorted(int(n) for n in names if n.isdigit() and (root / n / COMMIT_FILE).exists())


def check_teacher(saved: dict, current: dict, where: str) -> None:
  """Raises ResumeError when a checkpoint's teacher weights differ from the ones this run built.

  ``saved`` / ``current``: ``{'source': ..., 'fingerprint': sha256}`` (build.teacher_identity).
  The source (a path, a hub id) is informational: a moved teacher directory with the same
  weights resumes; other weights under the same name do not.
  """
  a, b = saved.get("fingerprint"), current.get("fingerprint")
  if a is None:
    raise ResumeError(
      f"{where}: the checkpoint records no teacher fingerprint (written by an older version);"
      " its teacher cannot be verified — train in a new --workdir"
    )
  if a != b:
    raise ResumeError(
      f"{where}: the teacher differs from the one these checkpoints were trained on"
      f" (teacher {current.get('source')!r}: weights fingerprint {b[:12]}…, checkpoint"
      f" {a[:12]}… from {saved.get('source')!r}); use the original teacher weights or a new"
      " --workdir"
    )


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` (keep-N, async) for the GMAIL train state."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
      cleanup_tmp_directories=True,  # a save interrupted by SIGKILL must not block the rerun
    )
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

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

  def restore_latest(
    self, abstract_state: dict, *, data_iter=None, set_aside: bool = True
  ) -> tuple[dict, dict] | None:
    """Restores the newest intact step (None when there is no checkpoint at all).

    Steps that cannot be restored are skipped, newest first, each named in the log; once an
    older one restores they are moved to WORKDIR/checkpoints.unusable/ (``set_aside``). With no
    intact step: ResumeError naming the directory, nothing moved.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    skipped: list[tuple[int, str]] = []
    for step in steps:
      try:
        out = self.restore(abstract_state, step=step, data_iter=data_iter)
      except Exception as e:  # any unreadable item (truncated file, missing item): not intact
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        logging.warning("checkpoint step %d in %s is unusable: %s", step, self.directory, reason)
        skipped.append((step, reason[:200]))
        continue
      if skipped:
        logging.warning(
          "resuming from step %d; skipped unusable step(s) %s", step, [s for s, _ in skipped]
        )
        if set_aside:
          self._set_aside([s for s, _ in skipped])
      return out
    detail = "; ".join(f"step {s}: {r}" for s, r in skipped)
    raise ResumeError(
      f"{self.directory}: no intact checkpoint ({detail}); move the directory away to start over"
    )

  def _set_aside(self, steps: list[int]) -> None:
    """Moves step directories to WORKDIR/checkpoints.unusable/ (process 0), then re-reads."""
    if jax.process_index() == 0:
      dest = storage.join(os.path.dirname(self.directory), UNUSABLE_DIR)
      storage.makedirs(dest)
      for step in steps:
        target = storage.join(dest, str(step))
        source = storage.join(self.directory, str(step))
        if storage.is_remote(source):
          _move_remote(source, target)
          continue
        if os.path.exists(target):
          shutil.rmtree(target)
        os.replace(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("checkpoint_set_aside")
    self.manager.close()
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _move_remote(source: str, target: str) -> None:
  """Step folder ``source`` to ``target`` in a bucket: copies every object, then deletes the
  original, the commit marker first (so the step stops counting as finished before any of its
  other objects goes)."""
  import fsspec

  fs, src = fsspec.core.url_to_fs(source)
  _, dst = fsspec.core.url_to_fs(target)
  storage.rmtree(target)
  names = fs.find(src)
  for name in names:
    fs.copy(name, dst + name[len(src) :])  # a server-side copy, object by object
  marker = f"{src}/{COMMIT_FILE}"
  if marker in names:
    fs.rm(marker)
  storage.rmtree(source)


def _persisted(state: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in state.items() if k in ("step", "params", "opt")}
