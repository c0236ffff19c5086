"""Train / held-out test split views of a class-folder dataset, materialised under WORKDIR/data.

The small-scale reproductions (configs/quickstart.py, configs/cifake.py) must never evaluate on an
image they trained on. The regular pipeline (``class_folders`` source) reads every image under
``config.data.root``, so we give it a view that holds only the training split::

    WORKDIR/data/train/{real,generated}/<class>/<file>    alignment (pipeline), teacher, probes
    WORKDIR/data/test/{real,generated}/<class>/<file>     held out: probe test set, gap pairs

``config.splits.kind``:
  'digits'        : render the quickstart dataset (gmail_jax/data/digits.py) straight into the view.
  'class_folders' : split SOURCE/{real,generated}/<class>/* (SOURCE = config.data.root as given by
                    the user, e.g. the CIFAKE sample) per class with a fixed seed; the view holds
                    symlinks (or copies where links are unavailable), never modified originals.

``materialize`` returns the paths of both views (the 'splits' stage hands ``train`` to the align
stage as its ``data.root``); it never changes the config. The split depends only on
``config.splits`` (not ``config.seed``), so runs with different seeds are evaluated on the same
held-out images.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import ml_collections
import numpy as np

from gmail_jax.data import digits
from gmail_jax.errors import ConfigError, InputError

KINDS = ("digits", "class_folders")
MODALITIES = ("real", "generated")
_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def split_root(workdir: str | pathlib.Path, split: str) -> pathlib.Path:
  """WORKDIR/data/<split> (split in 'train', 'test')."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  return pathlib.Path(workdir) / "data" / split


def _class_files(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  if not root.is_dir():
    raise FileNotFoundError(f"config.data.root: missing folder {root}")
  out = {}
  for d in sorted(p for p in root.iterdir() if p.is_dir()):
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in _EXTS)
    if files:
      out[d.name] = files
  if not out:
    raise FileNotFoundError(f"config.data.root: no images under {root}/<class>/")
  return out


def _place(src: pathlib.Path, dst: pathlib.Path) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  try:
    os.symlink(src.resolve(), dst)
  except OSError:
    shutil.copyfile(src, dst)


def split_class_folders(
  source: str | pathlib.Path,
  out: str | pathlib.Path,
  *,
  test_per_class: int,
  train_per_class: int = 0,
  seed: int = 0,
) -> dict[str, int]:
  """Split SOURCE/{real,generated}/<class>/* into OUT/{train,test}/... per class and modality.

  ``test_per_class`` files of each (modality, class) go to test, drawn with ``seed``; the rest (at
  most ``train_per_class`` when > 0) to train. Returns file counts per split/modality.
  """
  source, out = pathlib.Path(source), pathlib.Path(out)
  counts = {f"{s}/{m}": 0 for s in ("train", "test") for m in MODALITIES}
  for m_i, modality in enumerate(MODALITIES):
    files = _class_files(source / modality)
    for c_i, (cls, paths) in enumerate(files.items()):
      if len(paths) <= test_per_class:
        raise InputError(
          f"{source / modality / cls}: {len(paths)} images, need more than "
          f"splits.test_per_class={test_per_class}"
        )
      perm = np.random.default_rng([seed, m_i, c_i]).permutation(len(paths))
      test = sorted(perm[:test_per_class])
      train = sorted(perm[test_per_class:])
      if train_per_class > 0:
        train = train[:train_per_class]
      for split, idx in (("train", train), ("test", test)):
        for i in idx:
          _place(paths[i], out / split / modality / cls / paths[i].name)
        counts[f"{split}/{modality}"] += len(idx)
  return counts


def materialize(
  splits: ml_collections.ConfigDict, source: str | None, workdir: str | pathlib.Path
) -> dict:
  """Create WORKDIR/data/{train,test} (idempotent); returns {'train', 'test', 'meta'}.

  ``splits``: config.splits; ``source``: the dataset root with real/ and generated/ (class_folders
  only; the user's ``config.data.root``).
  """
  if splits.kind not in KINDS:
    raise ConfigError(f"config.splits.kind: {splits.kind!r} not in {KINDS}")
  out = pathlib.Path(workdir) / "data"
  if splits.kind == "digits":
    meta = digits.materialize(
      out,
      generated_per_class=splits.generated_per_class,
      test_fraction=splits.test_fraction,
      seed=splits.seed,
    )
  else:
    if not source:
      raise ConfigError("config.data.root: set it to the dataset root (with real/ and generated/)")
    spec = {
      "source": str(pathlib.Path(source).resolve()),
      "test_per_class": splits.test_per_class,
      "train_per_class": splits.train_per_class,
      "seed": splits.seed,
    }
    marker = out / "split.json"
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
      meta = json.loads(marker.read_text())
    else:
      if out.exists():
        for split in ("train", "test"):
          shutil.rmtree(out / split, ignore_errors=True)
      counts = split_class_folders(
        source,
        out,
        test_per_class=splits.test_per_class,
        train_per_class=splits.train_per_class,
        seed=splits.seed,
      )
      meta = {"spec": spec, "counts": counts}
      out.mkdir(parents=True, exist_ok=True)
      marker.write_text(json.dumps(meta, indent=2))
  train, test = split_root(workdir, "train"), split_root(workdir, "test")
  return {"train": str(train), "test": str(test), "meta": meta}


def generated_views(manifest: str | pathlib.Path, out: str | pathlib.Path) -> dict[str, str]:
  """Train / test views like ``materialize``'s whose generated/ sets are a generation manifest's
  images (the quickstart's 'diffusion' variant: one image per caption of each real image).

  A row belongs to its real image's split (``.../<split>/real/<class>/<file>``, this module's
  layout): OUT/<split>/generated/<group>/<image name> links to the row's image and OUT/<split>/real/
  to every file of that split's real/ folder. Rebuilt whole; returns {split: OUT/<split>}.
  """
  import pyarrow.parquet as pq

  manifest, out = pathlib.Path(manifest), pathlib.Path(out)
  rows = pq.read_table(manifest, columns=["gen_path", "real_path", "group"]).to_pylist()
  shutil.rmtree(out, ignore_errors=True)
  roots: dict[str, pathlib.Path] = {}
  for row in rows:
    real = pathlib.Path(row["real_path"] or "")
    split = real.parents[2].name if len(real.parents) > 2 else ""
    if split not in ("train", "test") or real.parents[1].name != "real" or not row["group"]:
      raise InputError(
        f"{manifest}: real_path {row['real_path']!r} (group {row['group']!r}) is not a"
        " <split>/real/<class>/<file> of the splits' views"
      )
    roots[split] = real.parents[2]
    gen = manifest.parent / row["gen_path"]
    _place(gen, out / split / "generated" / row["group"] / gen.name)
  for split, root in roots.items():
    for f in sorted((root / "real").rglob("*")):
      if f.is_file():
        _place(f, out / split / "real" / f.relative_to(root / "real"))
  return {split: str(out / split) for split in sorted(roots)}
