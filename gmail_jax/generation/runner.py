"""Captions -> generated images (GMAIL's second modality), exactly once, sharded and resumable.

``run(config, workdir)`` is ``python -m gmail_jax.generate``: ``mode='generate'`` runs the text-to-
image backend of ``config.backend`` (generation/config.py BACKENDS; diffusers: PyTorch,
``pip install -e .[gen]``); ``mode='import'`` turns images made elsewhere (MaxDiffusion on TPUs,
FLUX, ...) into the same manifest (importer.py). Captions: captions.py; seeds: seeds.py.

Output (DIR = --workdir: a local folder or a bucket folder, ``gs://bucket/run``; store.py says how
each file is written without append or rename):
  DIR/manifest.parquet   one row per image: caption_id, k, caption, gen_path (relative to DIR),
                         seed, and real_path / group when the captions know them. It trains as is:
                         --config.data.source=manifest --config.data.manifest=DIR/manifest.parquet
  DIR/images/<chunk>/<caption_id>_<k>.jpg|png
  DIR/rejects.jsonl      per-caption failures (empty or over-long prompt, NSFW-blocked,
                         non-finite pixels that reproduce alone), counted in summary.json (on a
                         bucket: one object per writing process, DIR/rejects.jsonl.writers/)
  DIR/summary.json       counts; DIR/generate.json the plan (values that define the outputs);
                         DIR/weights.json the fingerprint of the weights that generated them

An exception from the backend (a device fault, out of memory, a bug) is never a caption's
reject: the batch is retried ``config.retries`` times, then the run stops naming the error with
nothing of the batch recorded, and a rerun generates it (with another batch_size if needed).

Work split: chunk c (store.py) belongs to shard c % num_shards (from --num_shards/--shard_index,
else JAX_NUM_PROCESSES / JAX_PROCESS_ID, else SLURM_NTASKS / SLURM_PROCID). A restart (SIGKILL,
preemption) skips finished chunks and the finished batches of a partial chunk: no (caption_id, k)
is missing or duplicated, and the batches are the ones an uninterrupted run forms. The process that
finds every chunk done writes the manifest (whole; concurrent writers write the same bytes).
Captions, real images and a diffusers model folder (``model``) may be in a bucket too; the model
is copied once to a local cache (storage.fetch_dir), as is ``model='random'``'s pipeline, which a
bucket workdir keeps in a local folder (storage.cache_root()) rather than in DIR/pipeline.

Safety checker (``safety_checker``): 'none' (default) loads none and keeps every image (SD 2.x
ships none; SD 1.x ships one and it is dropped); 'pipeline' uses the one the model ships (an error
if it ships none); a hub id / directory loads a ``StableDiffusionSafetyChecker`` and its
``CLIPImageProcessor`` from there. An image it flags is not saved (the pipeline blacks it out): it
is a reject ('nsfw: blocked by the safety checker'), and a rerun does not retry it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import importlib
import math
import os
import pathlib
import time
from types import ModuleType
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from gmail_jax import faults, preemption, storage
from gmail_jax.cli import resolve_shard
from gmail_jax.data.rejects import RejectLog
from gmail_jax.errors import first_line
from gmail_jax.generation import store
from gmail_jax.generation.captions import Captions, read_captions
from gmail_jax.generation.config import (
  BACKENDS,
  IMAGE_FORMATS,
  check,
  check_plan,
  check_weights,
  make_plan,
)
from gmail_jax.generation.importer import import_images
from gmail_jax.generation.seeds import image_seed
from gmail_jax.generation.store import (
  chunk_items,
  journal_path,
  num_chunks,
  part_path,
  shard_chunks,
)


def backend(config: ml_collections.ConfigDict) -> ModuleType:
  """The module of ``config.backend`` (generation/config.py BACKENDS)."""
  return importlib.import_module(BACKENDS[config.backend])


# ---------------------------------------------------------------------------------- generation


class Progress:
  """A progress line every ``every_s`` seconds: done / total, images/s and ETA."""

  def __init__(self, total: int, label: str, every_s: float):
    self.total, self.label, self.every_s = total, label, every_s
    self.done = self.rejected = 0
    self.t0 = self.last = time.monotonic()

  def update(self, images: int, rejected: int = 0, force: bool = False) -> None:
    self.done += images + rejected
    self.rejected += rejected
    now = time.monotonic()
    if force or now - self.last >= self.every_s:
      self.last = now
      rate = self.done / max(now - self.t0, 1e-9)
      left = (self.total - self.done) / rate if rate > 0 else float("inf")
      eta = "?"
      if math.isfinite(left):
        m, sec = divmod(int(left), 60)
        eta = f"{m // 60}:{m % 60:02d}:{sec:02d}"  # hours unbounded: CC12M runs for days
      pct = 100.0 * self.done / max(self.total, 1)
      print(
        f"generate {self.label}: {self.done}/{self.total} images ({pct:.0f}%), {rate:.2f}"
        f" images/s, ETA {eta}, {self.rejected} rejected",
        flush=True,
      )


class _Chunker:
  """Generates the chunks of one shard into DIR (see the module docstring)."""

  def __init__(self, config, workdir: storage.Path, captions: Captions, engine, log: RejectLog):
    self.config, self.workdir, self.captions, self.log = config, workdir, captions, log
    self.engine = engine
    self.ext = IMAGE_FORMATS[config.image_format]
    self.images_written = self.batches_journaled = 0  # by this process (crash points)
    self._tokens: dict[int, int] = {}

  def _prompt_issue(self, ci: int) -> tuple[str | None, bool]:
    """(reject reason or None, truncated) of caption ``ci`` before any generation."""
    text = self.captions.texts[ci]
    if not text:
      return "empty caption", False
    limit = self.engine.max_prompt_tokens
    if limit is None:
      return None, False
    if ci not in self._tokens:
      self._tokens[ci] = self.engine.prompt_tokens(text)
    if self._tokens[ci] <= limit:
      return None, False
    if self.config.long_prompt == "reject":
      return f"prompt too long: {self._tokens[ci]} tokens > {limit}", False
    return None, True

  def _reject(self, row: dict, reason: str) -> dict:
    cid, k = row["caption_id"], row["k"]
    self.log.reject(f"{self.captions.source}#{cid}_{k}", reason, caption_id=cid, k=k)
    return {**row, "gen_path": None, "reject": reason}

  def _generate(self, c: int, batch: list) -> list[tuple[Any, str | None]]:
    """One image or a reject reason per item. A reason belongs to the caption: the safety
    checker blocked it, or its pixels are non-finite and stay so when generated alone (an
    overflow may come from the batch)."""
    prompts = [self.captions.texts[ci] for _, ci, _ in batch]
    seeds = [row["seed"] for _, _, row in batch]
    images, nsfw = self._call(c, batch, prompts, seeds)
    out = []
    for i, (image, flagged) in enumerate(zip(images, nsfw, strict=True)):
      if not flagged and not np.all(np.isfinite(image)) and len(prompts) > 1:
        (image,), (flagged,) = self._call(c, batch[i : i + 1], prompts[i : i + 1], seeds[i : i + 1])
      if flagged:
        out.append((None, "nsfw: blocked by the safety checker"))
      elif not np.all(np.isfinite(image)):
        out.append(
          (None, "non-finite pixels: the model overflowed (try dtype bfloat16 or float32)")
        )
      else:
        out.append(((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), None))
    return out

  def _call(self, c: int, batch: list, prompts: list[str], seeds: list[int]):
    """The engine on one batch, retried ``config.retries`` times on an exception (a device
    fault is not a caption's fault); then the run stops, nothing of the batch recorded."""
    for attempt in range(self.config.retries + 1):
      try:
        return self.engine(prompts, seeds)
      except Exception as e:
        oom = self.engine.out_of_memory(e)
        if oom or attempt == self.config.retries:
          first = batch[0][2]
          raise RuntimeError(
            f"generation stopped in chunk {c} at {first['caption_id']}_{first['k']} ({len(batch)}"
            f" images, {attempt + 1} tries): {type(e).__name__}: {first_line(e)}. Nothing of"
            " this batch was recorded: rerun the same command to generate it"
            + (" with a lower config.batch_size" if oom else "")
          ) from e
        logging.warning("generation: %s on try %d, retrying the batch", first_line(e), attempt + 1)
    raise AssertionError("unreachable")

  def run_chunk(self, c: int, progress: Progress) -> None:
    K = self.config.images_per_caption
    n_items = len(self.captions) * K
    part, journal = part_path(self.workdir, c), journal_path(self.workdir, c)
    done = store.read_journal(journal)
    images_dir = self.workdir / "images" / f"{c:06d}"
    storage.remove_stale_temps(images_dir)
    storage.makedirs(images_dir)
    rows: dict[int, dict] = {}  # item -> its row, written in item order
    todo = []
    for item in chunk_items(c, n_items, self.config.chunk_size):
      ci, k = divmod(item, K)
      cid = self.captions.ids[ci]
      row = {"caption_id": cid, "k": k, "seed": image_seed(self.config.seed, cid, k)}
      reason, truncated = self._prompt_issue(ci)
      row["truncated"] = truncated
      if reason:
        rows[item] = self._reject(row, reason)
        progress.update(0, rejected=1)
      elif (cid, k) in done:
        rows[item] = done[cid, k]
      else:
        todo.append((item, ci, row))
    # The noise is per image, so batches may differ from an earlier run's (another batch_size).
    bs = self.config.batch_size
    for start in range(0, len(todo), bs):
      batch = todo[start : start + bs]
      results = self._generate(c, batch)
      out = []
      for (item, _, row), (pixels, reason) in zip(batch, results, strict=True):
        if reason is not None:
          rows[item] = self._reject(row, reason)
          out.append(rows[item])
          continue
        name = f"{row['caption_id']}_{row['k']}.{self.ext}"
        data = store.encode_image(pixels, self.config.image_format, self.config.jpeg_quality)
        storage.write_bytes(images_dir / name, data, durable=True)
        self.images_written += 1
        faults.kill_point("image", self.images_written)
        rows[item] = {**row, "gen_path": f"images/{c:06d}/{name}", "reject": None}
        out.append(rows[item])
      storage.sync_dir(images_dir)  # the images' names are on disk before the entry naming them
      store.write_journal_entry(journal, batch[0][0], out)
      self.batches_journaled += 1
      faults.kill_point("batch", self.batches_journaled)
      if preemption.requested():  # SIGTERM: the batch in flight is finished and journaled
        raise preemption.Preempted(
          f"preempted: generation stopped after a journaled batch of chunk {c} in"
          f" {self.workdir}; rerun the same command to generate the rest"
        )
      n_bad = sum(r["reject"] is not None for r in out)
      progress.update(len(out) - n_bad, rejected=n_bad)
    store.write_part(part, [rows[i] for i in sorted(rows)])
    store.remove_journal(journal)
    faults.kill_point("chunk", c)


def _local_inputs(
  config: ml_collections.ConfigDict, workdir: storage.Path
) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
  """(config, folder) for ``backend.load``, both local, as the backends read weights from local
  files and build ``model='random'`` into FOLDER/pipeline: a bucket ``model`` / ``safety_checker``
  folder becomes its cached local copy; a bucket workdir's folder is a local cache folder."""
  remote = {k: config[k] for k in ("model", "safety_checker") if storage.is_remote(config[k])}
  if remote:
    config = config.copy_and_resolve_references()
    for key, url in remote.items():
      config[key] = str(storage.fetch_dir(url))
  if not storage.is_remote(workdir):
    return config, pathlib.Path(os.fspath(workdir))
  key = hashlib.sha256(os.fspath(workdir).encode()).hexdigest()[:20]
  return config, storage.cache_root() / "generate" / key  # created if a pipeline is built there


def generate(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  shard_index: int = 0,
  num_shards: int = 1,
  pipeline: Any = None,
  finalize_when_done: bool = True,
) -> dict[str, Any]:
  """Generates this shard's chunks into ``workdir``; writes the manifest when every chunk is done.

  ``pipeline``: a loaded pipeline of ``config.backend`` (else the backend loads it). Returns the
  summary (``complete``: whether the manifest was written by this call).
  """
  check(config)
  workdir = store.workdir_path(workdir)
  for d in ("parts", "images"):
    storage.makedirs(workdir / d)
  for d in (workdir, workdir / "parts"):
    storage.remove_stale_temps(d)
  captions = read_captions(config)
  runs = backend(config)
  plan = make_plan(config, captions, runs.dtype_of(config, pipeline))
  check_plan(workdir, plan)
  label = f"[shard {shard_index}/{num_shards}]"
  n_items = plan["items"]
  mine = list(shard_chunks(plan["chunks"], shard_index, num_shards))
  parts, journals = store.scan_parts(workdir)
  todo = [c for c in mine if c not in parts]
  left = sum(len(chunk_items(c, n_items, config.chunk_size)) for c in todo)
  left -= sum(len(store.read_journal(journal_path(workdir, c))) for c in todo if c in journals)
  print(
    f"generate {label}: {len(captions)} captions x {config.images_per_caption} = {n_items}"
    f" images in {plan['chunks']} chunks; this shard: {len(mine)} chunks, {left} images to go",
    flush=True,
  )
  if todo:
    if not preemption.distributed():  # several processes: JAX's preemption service has SIGTERM
      preemption.install()
    pipe = pipeline if pipeline is not None else runs.load(*_local_inputs(config, workdir))
    fingerprint = runs.weights_fingerprint(pipe)
    if fingerprint is not None:
      check_weights(workdir, config.model, fingerprint)
    engine = runs.Engine(pipe, config)
    chunker = _Chunker(config, workdir, captions, engine, RejectLog.for_workdir(workdir))
    progress = Progress(left, label, config.progress_every_s)
    for c in todo:
      if not part_path(workdir, c).exists():  # another process of the same shard may have done it
        chunker.run_chunk(c, progress)
    progress.update(0, force=True)
  summary = finalize(config, workdir, captions=captions) if finalize_when_done else None
  return summary or {"complete": False, "shard": shard_index, "num_shards": num_shards}


def finalize(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  captions: Captions | None = None,
) -> dict[str, Any] | None:
  """Writes DIR/manifest.parquet and DIR/summary.json when every chunk is done; else None."""
  import pyarrow as pa
  import pyarrow.compute as pc

  workdir = store.workdir_path(workdir)
  captions = captions or read_captions(config)
  n_items = len(captions) * config.images_per_caption
  n_chunks = num_chunks(n_items, config.chunk_size)
  parts_done, journals = store.scan_parts(workdir)
  if not set(range(n_chunks)) <= parts_done:
    return None
  for c in journals:  # a kill between a part's write and its journal's removal
    store.remove_journal(journal_path(workdir, c))
  paths = [part_path(workdir, c) for c in range(n_chunks)]
  if storage.is_remote(workdir):  # one request per part: many in flight
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      tables = list(pool.map(store.read_parquet, paths))
  else:
    tables = [store.read_parquet(p) for p in paths]
  parts = pa.concat_tables(tables)
  keys = list(
    zip(parts.column("caption_id").to_pylist(), parts.column("k").to_pylist(), strict=True)
  )
  if len(keys) != n_items or len(set(keys)) != n_items:  # a bug, not a user error
    raise RuntimeError(
      f"{workdir}/parts: {len(set(keys))} distinct (caption_id, k) in {len(keys)} rows,"
      f" {n_items} expected"
    )
  ok = parts.filter(pc.is_null(parts.column("reject")))
  rows = {"caption_id": ok.column("caption_id").to_pylist(), "k": ok.column("k").to_pylist()}
  table = store.manifest_table(captions, rows, ok.column("gen_path"), ok.column("seed"))
  path = store.write_manifest(workdir, table)
  if not storage.is_remote(workdir):
    storage.rmtree(workdir / "tmp")  # where earlier versions wrote their temp files
  rejects = [r for r in parts.column("reject").to_pylist() if r is not None]
  return store.write_summary(
    workdir,
    {
      "mode": "generate",
      "complete": True,
      "manifest": str(path),
      "captions": len(captions),
      "images_per_caption": config.images_per_caption,
      "images": ok.num_rows,
      "rejected": len(rejects),
      "reject_reasons": dict(collections.Counter(r.split(":")[0] for r in rejects)),
      "truncated_prompts": int(pc.sum(parts.column("truncated")).as_py() or 0),
    },
  )


def run(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  shard_index: int | None = None,
  num_shards: int | None = None,
) -> dict[str, Any]:
  """What ``python -m gmail_jax.generate`` does: import, or generate this process's shard."""
  check(config)
  storage.check_writable(workdir)  # one line before any model loads
  if config.mode == "import":
    return import_images(config, workdir)
  i, n = resolve_shard(num_shards, shard_index)
  return generate(config, workdir, shard_index=i, num_shards=n)
