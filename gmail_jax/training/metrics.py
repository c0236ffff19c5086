"""One metrics API for training: JSONL + TensorBoard (+ optional W&B) on process 0, and a
progress/ETA line.

``WORKDIR/metrics.jsonl`` gets one JSON object per logged step: ``{"step": s, "train/loss": ...}``.
Values are fetched from the device only on log steps (the loop hands over device arrays).
``config.wandb.enabled`` also logs them to Weights & Biases (``wandb`` is imported only then).

WORKDIR may be a bucket URL (``gs://bucket/run``), which has no append: there metrics.jsonl is
kept in memory and rewritten whole (``sync``: before every checkpoint save, after evals, every
``SYNC_SECONDS`` and at ``close``), so every row up to a checkpoint's step is in the bucket before
the checkpoint is, and a resume from it loses none; TensorBoard writes to a local folder whose
event files are uploaded at the same moments.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from gmail_jax import storage
from gmail_jax.errors import ConfigError

WANDB_PIN = "wandb==0.29.0"  # the tested lock (requirements-test.txt), in pyproject's range
SYNC_SECONDS = 30.0  # bucket workdir: the longest that logged rows stay only in memory


def write_config(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  resumed_from: int | None = None,
  changes: Mapping[str, Any] | None = None,
) -> None:
  """``WORKDIR/config.json`` (process 0): what run.load_run rebuilds the model from. Every start
  is appended to ``WORKDIR/config_history.jsonl`` (time, resumed step, changed keys, config)."""
  if jax.process_index() != 0:
    return
  storage.makedirs(workdir)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  storage.write_text(storage.join(workdir, "config.json"), text)
  entry = {
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "resumed_from": resumed_from,
    "changes": {k: list(v) for k, v in (changes or {}).items()},
    "config": json.loads(text),
  }
  history = storage.join(workdir, "config_history.jsonl")
  storage.append_text(history, json.dumps(entry, sort_keys=True) + "\n")  # one writer: process 0


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = storage.path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: missing (not a gmail_jax training workdir?)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if "wandb" not in config:  # written before the group existed; logging only, so its defaults
    from gmail_jax import schema

    config.wandb = schema.base_config().wandb
  if "model" in config and "text_context" not in config.model:
    config.model.text_context = 0  # written before the key existed: never stretched
  if "loss" in config and "text_loss" not in config.loss:
    config.loss.text_loss = "softmax"  # likewise: the CLIP text term
  if "loss" in config and "temperature_from" not in config.loss:
    config.loss.temperature_from = "config"  # likewise: loss.temperature was the only source
  if "cma" in config and "form" not in config.cma:
    config.cma.update(form="additive", nce="infonce", nce_beta=0.5)  # likewise: L_NCE + α·L_CMA
  return config


def _scalar(x: Any) -> float:
  return float(np.asarray(x))


def _start_wandb(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
  """A W&B run for ``config.wandb`` whose id is kept in WORKDIR/wandb_run_id, so that a resumed
  training continues the same W&B run instead of starting a new one (offline, each start writes
  its own offline-run-* directory under that id)."""
  import wandb

  w = config.wandb
  id_path = storage.path(workdir) / "wandb_run_id"
  if id_path.exists():
    run_id = id_path.read_text().strip()
  else:
    run_id = uuid.uuid4().hex[:8]
    storage.write_text(id_path, run_id + "\n")
  if w.dir or not storage.is_remote(workdir):
    root = os.path.abspath(w.dir or workdir)
  else:  # W&B writes local files: a bucket workdir's go to the local cache, by workdir
    digest = hashlib.sha256(os.fspath(workdir).encode()).hexdigest()[:20]
    root = os.fspath(storage.cache_root() / "wandb" / digest)
  os.makedirs(root, exist_ok=True)
  return wandb.init(
    project=w.project,
    entity=w.entity or None,
    name=w.name or None,
    mode=w.mode,
    dir=root,
    tags=list(w.tags) or None,
    config=json.loads(config.to_json_best_effort()),
    id=run_id,
    resume="allow" if w.mode == "online" else None,  # offline runs cannot resume (W&B warns)
  )


def drop_rows_after(path: str | os.PathLike, step: int) -> str:
  """Keeps the rows of ``path`` up to ``step``: a run resumed from a checkpoint at ``step`` (or
  restarted from 0) trains the later steps again, so their rows from the killed attempt go.
  Returns the text kept ('' when there is no file)."""
  path = storage.path(path)
  if not path.exists():
    return ""
  lines = path.read_text().splitlines()
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      continue  # a line torn by the kill
  text = "".join(line + "\n" for line in keep)
  if len(keep) != len(lines):
    storage.write_text(path, text)  # whole or not at all
  return text


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch when torch is not loaded yet.

  tensorboardX imports torch if it is installed (1 s, a quarter of a small run's start) only to
  accept torch tensors; we log Python floats. A torch imported later is the real one.
  """
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # makes tensorboardX's `import torch` raise ImportError
    try:
      import tensorboardX  # noqa: F401
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter

  return SummaryWriter(logdir)


class MetricWriter:
  """``write(step, metrics)`` → JSONL line + TensorBoard scalars (+ W&B when
  ``config.wandb.enabled``) + a console progress line."""

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    total_steps: int,
    first_step: int = 0,
    config: ml_collections.ConfigDict | None = None,
  ):
    self.main = jax.process_index() == 0
    self.total_steps = total_steps
    self._t0, self._s0 = time.monotonic(), first_step
    self._jsonl = self._tb = self._wandb = None
    self._remote = storage.is_remote(workdir)
    self._text = ""  # bucket: metrics.jsonl's text, rewritten whole at each sync
    self._dirty, self._synced = False, time.monotonic()
    use_wandb = config is not None and "wandb" in config and bool(config.wandb.enabled)
    # Checked on every process so that all of them stop, not only the one that would log.
    if use_wandb and importlib.util.find_spec("wandb") is None:
      raise ConfigError(f"config.wandb.enabled: pip install {WANDB_PIN} (or gmail_jax[wandb])")
    if self.main:
      storage.makedirs(workdir)
      self._path = storage.join(workdir, "metrics.jsonl")
      kept = drop_rows_after(self._path, first_step)
      if self._remote:
        self._text = kept
        self._tb_dir = tempfile.mkdtemp(prefix="gmail_jax-tb-")
        self._tb_remote = storage.join(workdir, "tb")
      else:
        self._jsonl = open(self._path, "a")
        self._tb_dir = os.path.join(workdir, "tb")
      self._tb = _summary_writer(self._tb_dir)
      if use_wandb:
        self._wandb = _start_wandb(config, workdir)

  def timing(self, step: int) -> dict[str, float]:
    """steps/s since this writer started and the ETA in seconds."""
    dt = max(time.monotonic() - self._t0, 1e-9)
    rate = (step - self._s0) / dt
    eta = (self.total_steps - step) / rate if rate > 0 else math.inf
    return {"steps_per_sec": rate, "eta_sec": eta}

  def write(self, step: int, metrics: Mapping[str, Any], *, console: bool = True) -> dict:
    """Fetches ``metrics`` (device arrays are fine) and writes them; returns the float dict."""
    values = {k: _scalar(v) for k, v in jax.device_get(dict(metrics)).items()}
    if not self.main:
      return values
    row = json.dumps({"step": int(step), **values}) + "\n"
    if self._remote:
      self._text += row
      self._dirty = True
    else:
      self._jsonl.write(row)
      self._jsonl.flush()
    for k, v in values.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._remote and time.monotonic() - self._synced > SYNC_SECONDS:
      self.sync()
    if self._wandb is not None:
      self._wandb.log(values, step=int(step))
    if console:
      t = self.timing(step)
      eta = "?"
      if math.isfinite(t["eta_sec"]):
        eta = time.strftime("%H:%M:%S", time.gmtime(t["eta_sec"]))
      shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items() if "/" in k)
      logging.info(
        "[%d/%d] %.2f steps/s ETA %s | %s", step, self.total_steps, t["steps_per_sec"], eta, shown
      )
    return values

  def sync(self) -> None:
    """Bucket workdir: every row written so far is in the bucket when this returns (metrics.jsonl
    rewritten whole, TensorBoard's event files uploaded). Local: nothing to do, rows are flushed
    as they are written."""
    if self.main and self._remote and self._dirty:
      self._tb.flush()
      self._upload()

  def _upload(self) -> None:
    storage.write_text(self._path, self._text)
    storage.upload_tree(self._tb_dir, self._tb_remote)
    self._dirty, self._synced = False, time.monotonic()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
      if self._remote:
        self._upload()  # the last rows, and the events that close wrote
        shutil.rmtree(self._tb_dir, ignore_errors=True)
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None
