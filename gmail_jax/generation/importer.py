"""mode='import': images made elsewhere (MaxDiffusion on TPUs, FLUX, ...) become the manifest.

Files named ``<caption_id>_<k>.<ext>`` (K=1: ``<caption_id>.<ext>``) anywhere below
``config.import_dir`` (a local folder or a bucket folder) are matched to their caption, each
decoded once to verify it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import pathlib
from typing import Any

import ml_collections

from gmail_jax import storage
from gmail_jax.data.rejects import BadInput, RejectLog
from gmail_jax.errors import InputError
from gmail_jax.generation import store
from gmail_jax.generation.captions import read_captions
from gmail_jax.generation.config import check

IMPORT_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def match_name(stem: str, K: int, known: set[str]) -> list[tuple[str, int]]:
  """The (caption_id, k) a file name can mean: ``<caption_id>_<k>`` with k < K, or, with K = 1,
  ``<caption_id>`` alone. Ids may themselves end in ``_<digits>`` (``img_001``), so both readings
  are tried against the known ids; two matches are an ambiguous name."""
  out = []
  cid, sep, k = stem.rpartition("_")
  if sep and k.isdigit() and str(int(k)) == k and int(k) < K and cid in known:
    out.append((cid, int(k)))
  if K == 1 and stem in known:
    out.append((stem, 0))
  return out


def import_images(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """mode='import': ``config.import_dir`` images named ``<caption_id>_<k>.<ext>`` become the
  manifest, each decoded once to verify it. Missing, corrupt, duplicate and unmatched files are
  rejects (DIR/rejects.jsonl) and counted; the images stay where they are (absolute gen_path)."""
  from gmail_jax.data.images import decode_image
  from gmail_jax.data.sources import read_bytes

  check(config)
  workdir = store.workdir_path(workdir)
  storage.makedirs(workdir)
  root = storage.path(config.import_dir)
  if not root.is_dir():
    raise InputError(f"config.import_dir: not a directory: {root}")
  captions = read_captions(config)
  K = config.images_per_caption
  log = RejectLog.for_workdir(workdir)
  known = set(captions.ids)
  found: dict[tuple[str, int], str] = {}
  reasons: list[str] = []

  def reject(path: str, reason: str, **extra) -> None:
    log.reject(path, reason, **extra)
    reasons.append(reason)

  for f in _files(root):
    if f.suffix.lower() not in IMPORT_EXTS:
      continue
    keys = match_name(f.stem, K, known)
    if not keys:
      reject(str(f), f"unmatched: no caption_id / k < {K} for this file name")
      continue
    key = keys[0]
    if len(keys) > 1:
      named = " or ".join(f"caption {c!r} image {k}" for c, k in keys)
      reject(str(f), f"ambiguous: the name could mean {named}; rename it <caption_id>_<k>")
    elif key in found:
      reject(str(f), f"duplicate: ({key[0]}, {key[1]}) is also {found[key]}")
    else:
      found[key] = str(f) if storage.is_remote(f) else str(f.resolve())

  def verify(path: str) -> str | None:
    try:
      decode_image(_read(path) if storage.is_remote(path) else read_bytes(path), path)
    except BadInput as e:
      return e.reason
    return None

  with concurrent.futures.ThreadPoolExecutor(max(1, config.import_workers)) as pool:
    bad = dict(zip(found, pool.map(verify, found.values()), strict=True))
  rows: dict[str, list] = {"caption_id": [], "k": []}
  gen_path = []
  for cid in captions.ids:
    for k in range(K):
      path = found.get((cid, k))
      if path is None:
        reject(f"{root}/{cid}_{k}.*", "missing image", caption_id=cid, k=k)
      elif bad[(cid, k)] is not None:
        reject(path, bad[(cid, k)], caption_id=cid, k=k)
      else:
        rows["caption_id"].append(cid)
        rows["k"].append(k)
        gen_path.append(path)
  if not gen_path:
    raise InputError(f"config.import_dir: no usable image for any caption under {root}")
  table = store.manifest_table(captions, rows, gen_path, [None] * len(gen_path))
  path = store.write_manifest(workdir, table)
  kinds = collections.Counter(r.split(":")[0] for r in reasons)
  return store.write_summary(
    workdir,
    {
      "mode": "import",
      "complete": True,
      "manifest": str(path),
      "captions": len(captions),
      "images_per_caption": K,
      "images": len(gen_path),
      "rejected": len(reasons),
      "reject_reasons": dict(kinds),
      "missing": kinds.get("missing image", 0),
    },
  )


def _files(root: storage.Path) -> list[os.PathLike]:
  """The files below ``root``, sorted by path (local: by path parts, as always)."""
  if not storage.is_remote(root):
    return [f for f in sorted(pathlib.Path(root).rglob("*")) if f.is_file()]
  return [storage.path(f) for f in storage.list_files(root)]


def _read(url: str) -> bytes:
  """A bucket object's bytes, or :class:`BadInput` (as data.sources.read_bytes for a file)."""
  try:
    return storage.path(url).read_bytes()
  except FileNotFoundError:
    raise BadInput(url, "missing file") from None
  except OSError as e:
    raise BadInput(url, f"unreadable: {e}") from None
