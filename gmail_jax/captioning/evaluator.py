"""The captioning evaluator: train a captioner on one encoder's embeddings, caption the test set.

Registered as evaluator type 'captioning' (evaluators/common.py), so ``gmail_jax.evaluate`` and the
caption stage run it; ``write_results`` writes captions.jsonl and captioning.json. The metrics are
``evaluators.captioning.score_captions`` (pycocoevalcap); captioning.json records with them how they
were scored (tokenizer, skipped metrics).

Embedding cache (``caption(..., cache_dir=...)``): one file per role (test, train_generated, ...)
holding the raw (not L2-normalised) embeddings and the key they were made under: the encoder's
``identity()`` (weights fingerprints of both towers, configs, preprocessing, tokenizer), the
caller's ``encoder_key``, the evaluator's own image loading (size, resize mode) and a hash of the
image ids (or captions). A different encoder, even one saved at the same workdir and step,
recomputes. Images are decoded only on a miss, a batch at a time (captioning/data.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from gmail_jax import storage
from gmail_jax.captioning import clipcap, decap
from gmail_jax.captioning import data as cap_data
from gmail_jax.errors import ConfigError
from gmail_jax.evaluators import common
from gmail_jax.evaluators.captioning import score_captions


@dataclasses.dataclass
class CaptioningResult:
  metrics: dict[str, float]
  candidates: dict[str, str]  # test image id -> generated caption (direct)
  references: dict[str, list[str]]
  projected: dict[str, str] | None  # DeCap's projection decoding
  losses: list[float]
  settings: dict[str, Any]
  scoring: dict[str, Any] = dataclasses.field(default_factory=dict)  # score_captions' record

  def summary(self) -> dict[str, Any]:
    return {
      "metrics": self.metrics,
      "scoring": self.scoring,
      "settings": self.settings,
      "num_test_images": len(self.candidates),
      "train_steps": len(self.losses),
      "first_loss": self.losses[0] if self.losses else None,
      "final_loss": float(np.mean(self.losses[-10:])) if self.losses else None,
    }


def write_results(out_dir: str | os.PathLike, results: Mapping[str, CaptioningResult]) -> dict:
  """out_dir/captions.jsonl (view, id, caption[, projected], references) and
  out_dir/captioning.json ({view: summary}) for the results of several encoders ("views")."""
  rows = []
  for view, r in results.items():
    for key, caption in r.candidates.items():
      row = {"view": view, "id": key, "caption": caption}
      if r.projected is not None:
        row["projected"] = r.projected[key]
      rows.append({**row, "references": r.references[key]})
  paths = result_paths(out_dir)
  storage.write_text(paths["captions"], "".join(json.dumps(r) + "\n" for r in rows))
  summary = {view: r.summary() for view, r in results.items()}
  storage.write_text(paths["metrics"], json.dumps(summary, indent=2, sort_keys=True))
  return paths


def result_paths(out_dir: str | os.PathLike) -> dict[str, str]:
  """{'captions', 'metrics'}: where ``write_results`` writes (local paths or bucket URLs)."""
  out = storage.path(out_dir)
  return {
    "captions": os.fspath(out / "captions.jsonl"),
    "metrics": os.fspath(out / "captioning.json"),
  }


class CaptioningEvaluator(common.Evaluator):
  """`config.evals.<name> = dict(type='captioning', method='clipcap', train=SPEC, test=SPEC,
  real=None, train_path='generated', templates=(), image_size=224, batch_size=64, captioner={},
  every_steps=0)`; SPEC: a dict of ``captioning/data.py``.

  ``compute(encoder)`` trains a fresh captioner on the encoder's embeddings and captions the test
  images (real) through ``encoder.encode_images`` (f_r):

  clipcap  trains on (``train`` images, captions) embedded by ``encode_generated`` (f_g; with
           ``train_path='real'``, ``encode_images``), plus ``real`` pairs through ``encode_images``
           into the Proj-Real head (dual projection, captioning/clipcap.py).
  decap    trains on the ``train`` captions' text embeddings only (``encode_texts``); reports the
           direct decoding of the test image embeddings (keys as caption_metrics) and the
           projection decoding over the training captions' embeddings (``proj_`` keys).

  Class-folder test sets also report ``class_named``: the fraction of captions that name the
  image's class and no other (captioning/data.py).

  ``captioner``: settings overrides (captioning/clipcap.py DEFAULTS / decap.py SETTINGS); the
  captioner is fed the encoder's raw embeddings, L2-normalised with ``normalize_prefix``.
  ``meteor=False`` leaves METEOR out of the scores (recorded as skipped; it starts a JVM).
  """

  def __init__(
    self,
    name: str,
    *,
    train: Mapping[str, Any],
    test: Mapping[str, Any],
    method: str = "clipcap",
    real: Mapping[str, Any] | None = None,
    train_path: str = "generated",
    templates: Sequence[str] = (),
    image_size: int = 224,
    resize: str = "shortest_edge_crop",
    batch_size: int = 64,
    captioner: Mapping[str, Any] | None = None,
    every_steps: int = 0,
    prefix: str | None = None,
    meteor: bool = True,
  ):
    super().__init__(name, every_steps=every_steps, prefix=prefix)
    self.meteor = meteor
    if method not in ("clipcap", "decap"):
      raise ConfigError(f"config.evals.{name}.method: 'clipcap' or 'decap', got {method!r}")
    if train_path not in ("generated", "real"):
      raise ConfigError(
        f"config.evals.{name}.train_path: 'generated' or 'real', got {train_path!r}"
      )
    self.method, self.train_path, self.batch_size = method, train_path, batch_size
    self.image_size, self.resize = image_size, resize
    overrides = dict(captioner or {})
    self.settings = decap.settings(overrides) if method == "decap" else clipcap.settings(overrides)
    kw = {"image_size": image_size, "resize": resize, "templates": tuple(templates)}
    where = f"config.evals.{name}"
    self.test = cap_data.load(test, where=f"{where}.test", **kw)
    if method == "decap":  # text only: the images of the training set are never read
      self.train_captions = list(
        dict.fromkeys(cap_data.captions_only(train, templates=templates, where=f"{where}.train"))
      )
      self.train = self.real = None
    else:
      self.train = cap_data.load(train, where=f"{where}.train", **kw)
      self.real = cap_data.load(real, where=f"{where}.real", **kw) if real else None

  def compute(self, encoder: Any) -> dict[str, float]:
    return self.caption(encoder).metrics

  def caption(
    self,
    encoder: Any,
    log: Any = None,
    *,
    log_every: int = 1,
    cache_dir: str | None = None,
    encoder_key: str = "",
  ) -> CaptioningResult:
    """Embeds (once: with ``cache_dir``, embeddings of the same encoder identity and images are
    read back, as ClipCap's parse_coco.py), trains the captioner, captions the test images.

    ``encoder_key``: more identity for the cache key; an encoder without ``identity()`` (a dict
    of functions) can be cached only under one."""
    feats = self.embed(encoder, cache_dir=cache_dir, encoder_key=encoder_key)
    return self.caption_embedded(feats, log, log_every=log_every)

  def embed(
    self, encoder: Any, *, cache_dir: str | None = None, encoder_key: str = ""
  ) -> dict[str, np.ndarray]:
    """The first half of ``caption``: {role: raw embeddings} of the test images and of what the
    captioner trains on (cached as ``caption`` says). With several processes the encoders are
    collectives: every process calls this (and gets the same arrays); process 0 writes the cache.
    """
    bs = self.batch_size
    enc = common.as_encoder(encoder)
    identity = _encoder_identity(enc, encoder_key, cached=cache_dir is not None)
    loading = {"image_size": self.image_size, "resize": self.resize}

    def embed(role: str, fn: Any, items: Sequence, ids: Sequence[str]) -> np.ndarray:
      key = {"encoder": identity, "loading": loading, "items": _ids_key(ids), "raw": True}
      return _cached(
        cache_dir,
        role,
        json.dumps(key, sort_keys=True),
        lambda: common.encode_in_batches(_raw(fn), items, bs),
      )

    feats = {"test": embed("test", enc.encode_images, self.test.images, self.test.ids)}
    if self.method == "decap":
      captions = self.train_captions
      feats["train_text"] = embed("train_text", enc.encode_texts, captions, captions)
    else:
      fn = enc.encode_generated if self.train_path == "generated" else enc.encode_images
      role = f"train_{self.train_path}"
      feats[role] = embed(role, fn, self.train.images, self.train.ids)
      if self.real is not None:
        feats["train_real_pairs"] = embed(
          "train_real_pairs", enc.encode_images, self.real.images, self.real.ids
        )
    return feats

  def caption_embedded(
    self, feats: Mapping[str, np.ndarray], log: Any = None, *, log_every: int = 1
  ) -> CaptioningResult:
    """The second half of ``caption``, on ``embed``'s arrays: trains the captioner (on this
    process's own default device), captions the test images and scores them; no collective."""
    # Not over an enclosing jax.set_mesh (evaluation's): there every array the captioner makes
    # would be replicated on all of the mesh's devices, its training run once per device.
    with jax.set_mesh(None):
      return self._caption_embedded(feats, log, log_every)

  def _caption_embedded(
    self, feats: Mapping[str, np.ndarray], log: Any, log_every: int
  ) -> CaptioningResult:
    test_feats = feats["test"]
    projected = None
    if self.method == "decap":
      captions = self.train_captions
      text_feats = feats["train_text"]
      trained = decap.train(self.settings, text_feats, captions, log=log, log_every=log_every)
      direct = trained.caption(test_feats)
      projected = trained.caption(decap.project(test_feats, text_feats))
    else:
      index, captions = self.train.pairs()
      gen = feats[f"train_{self.train_path}"][index]
      real = None
      if self.real is not None:
        r_index, r_captions = self.real.pairs()
        real = (feats["train_real_pairs"][r_index], r_captions)
      trained = clipcap.train(self.settings, (gen, captions), real, log=log, log_every=log_every)
      direct = trained.caption(test_feats)
    ids = self.test.ids
    references = dict(zip(ids, self.test.references, strict=True))
    candidates = dict(zip(ids, direct, strict=True))
    metrics, scoring = score_captions(candidates, references, meteor=self.meteor)
    if self.test.classes is not None:  # class folders: does the caption name the right class?
      metrics["class_named"] = cap_data.class_named(
        direct, self.test.classes, sorted(set(self.test.classes))
      )
    if projected is not None:
      projected = dict(zip(ids, projected, strict=True))
      proj_metrics, proj_scoring = score_captions(projected, references, meteor=self.meteor)
      metrics.update({f"proj_{k}": v for k, v in proj_metrics.items()})
      if proj_scoring != scoring:  # the same scorer twice; should its record differ, keep both
        scoring = {**scoring, "proj": proj_scoring}
    return CaptioningResult(
      metrics, candidates, references, projected, trained.losses, dict(self.settings), scoring
    )


def _ids_key(ids: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def _encoder_identity(enc: Any, encoder_key: str, *, cached: bool) -> Any:
  """The encoder's ``identity()`` (training/encoders.py) with the caller's ``encoder_key``."""
  identity = getattr(enc, "identity", None)
  if callable(identity):
    return {"identity": identity(), "key": encoder_key}
  if cached and not encoder_key:
    raise ValueError(
      "captioning: caching the embeddings of an encoder without identity() needs an encoder_key"
    )
  return {"key": encoder_key}


def _raw(fn: Any) -> Any:
  """``fn`` returning embeddings before L2 normalisation where it can (``normalize=False``);
  functions without that option are taken as they are."""
  try:
    takes = "normalize" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    takes = False
  return (lambda items: fn(items, normalize=False)) if takes else fn


def _cached(cache_dir: str | None, role: str, key: str, compute: Any) -> np.ndarray:
  """``compute()``, or the array saved under ``cache_dir/role.npz`` with the same ``key``.

  With several processes ``compute`` is a collective: they all compute unless every one of them
  found the cache (they agree first), and process 0 alone writes it."""
  if cache_dir is None:
    return compute()
  path = storage.path(cache_dir) / f"{role}.npz"
  x = None
  if path.exists():
    with np.load(io.BytesIO(path.read_bytes())) as saved:
      if str(saved["key"]) == key:
        x = saved["x"]
  if jax.process_count() > 1:
    hits = multihost_utils.process_allgather(np.int32(x is not None))
    x = x if bool(np.all(hits)) else None
  if x is not None:
    return x
  x = np.asarray(compute())
  if jax.process_index() == 0:
    buf = io.BytesIO()  # saved whole: a bucket has no rename, a reader never sees a partial file
    np.savez(buf, x=x, key=np.asarray(key))
    storage.write_bytes(path, buf.getvalue())
  return x
