"""Where files live: one path type for local folders and buckets (``gs://bucket/run``).

Every file the project reads or writes in a workdir, data root or cache goes through here, as
``etils.epath`` paths (pathlib's API; ``gs://`` through fsspec / gcsfs, Orbax's own path type).
Local paths behave as they always did. A bucket has no rename and no append, but an object
appears whole when its upload finishes and can be created only if absent (generation
precondition), so the primitives are chosen to mean the same on both:

  write_bytes / write_text / write_json   whole or not at all (local: temp name + rename, fsync
                                          when ``durable``; bucket: one upload)
  create_exclusive                        only if nothing is there (local: hard link; bucket:
                                          ifGenerationMatch=0): two processes never both win
  append_text                             one writer (local: O_APPEND; bucket: the object
                                          rewritten whole)
  append_shared / read_shared             many writers (local: O_APPEND lines, one write each;
                                          bucket: one object per writer beside the file)
  staged_dir / fetch_dir                  libraries that need a local folder (ArrayRecord's
                                          writer, save_pretrained, memmaps) write into a temp
                                          folder uploaded afterwards / read a local copy

Nothing here emulates rename or append on a bucket: callers are designed around whole objects
(generation's per-batch journal entries, per-shard outputs, records rewritten whole).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import posixpath
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath

from gmail_jax.errors import InputError

Path = epath.Path
PathLike = str | os.PathLike

# gcsfs caches directory listings forever by default, so objects that Orbax (tensorstore) or
# another process wrote stay invisible to exists() / iterdir(); every listing must be fresh.
try:
  import fsspec

  for _proto in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)
except ImportError:  # pragma: no cover - fsspec comes with etils[epath]
  pass
# fsspec logs every buffered read of an object at INFO (one line per file read from a bucket).
logging.getLogger("fsspec.caching").setLevel(logging.WARNING)


def path(p: PathLike) -> epath.Path:
  """``p`` as an epath path (local or ``scheme://``); relative local paths stay relative."""
  return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p))


def is_remote(p: PathLike) -> bool:
  """True for an object-store URL (``gs://``, ``s3://`` ...), False for a local path."""
  return "://" in os.fspath(p)


def join(base: PathLike, *parts: str) -> str:
  """``base / parts`` as a string, for APIs that take strings (Orbax, grain, pyarrow via fsspec)."""
  return os.fspath(path(base).joinpath(*parts))


def _tmp_name(name: str) -> str:
  return f"{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def remove_stale_temps(folder: PathLike) -> None:
  """Removes the temp files (``_tmp_name``) that killed processes of this host left in local
  ``folder``; a live writer's, another host's and a bucket's (an upload leaves none) are kept."""
  if is_remote(folder):
    return
  host = socket.gethostname()
  try:
    names = os.listdir(folder)
  except FileNotFoundError:
    return
  for name in names:
    _, sep, tag = name.partition(".tmp-")
    writer, _, pid = tag.rpartition("-")[0].rpartition("-")  # <host>-<pid>-<random>
    if not (sep and writer == host and pid.isdigit()) or _alive(int(pid)):
      continue
    with contextlib.suppress(OSError):  # gone already, or a folder: a sweep never stops a run
      os.unlink(os.path.join(folder, name))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def write_bytes(p: PathLike, data: bytes, *, durable: bool = False) -> None:
  """``data`` at ``p``, whole or not at all; ``durable`` (local): on disk before it is named, so a
  power loss never leaves a named but empty file. Creates missing local parent folders."""
  p = path(p)
  if is_remote(p):
    p.write_bytes(data)  # one upload: the object appears when it is complete
    return
  local = pathlib.Path(p)
  local.parent.mkdir(parents=True, exist_ok=True)
  tmp = local.parent / _tmp_name(local.name)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      if durable:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, local)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(p: PathLike, text: str, *, durable: bool = False) -> None:
  write_bytes(p, text.encode(), durable=durable)


def write_json(p: PathLike, obj: Any, *, durable: bool = False, indent: int | None = 2) -> None:
  write_text(p, json.dumps(obj, indent=indent) + "\n", durable=durable)


def read_json(p: PathLike) -> Any:
  return json.loads(path(p).read_text())


def create_exclusive(p: PathLike, data: bytes) -> bool:
  """Writes ``p`` whole only if nothing is there; returns whether this call created it (of two
  processes starting together exactly one does)."""
  p = path(p)
  if is_remote(p):
    fs, key = _fs(p)
    try:
      with fs.open(key, "xb") as f:  # an upload with ifGenerationMatch=0
        f.write(data)
      return True
    except FileExistsError:
      return False
  local = pathlib.Path(p)
  local.parent.mkdir(parents=True, exist_ok=True)
  tmp = local.parent / _tmp_name(local.name)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  try:
    os.link(tmp, local)  # fails when the name exists, unlike a rename
    return True
  except FileExistsError:
    return False
  finally:
    tmp.unlink()


def sync_dir(p: PathLike) -> None:
  """Makes the renames into local folder ``p`` durable (its entries, not only the files); a
  bucket's objects are durable when their upload returns."""
  if is_remote(p):
    return
  fd = os.open(os.fspath(p), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def makedirs(p: PathLike) -> epath.Path:
  """Creates local folder ``p`` (and parents); a bucket has no folders, only object names."""
  p = path(p)
  if not is_remote(p):
    p.mkdir(parents=True, exist_ok=True)
  return p


def rmtree(p: PathLike) -> None:
  """Removes ``p`` and everything under it; nothing there is fine."""
  p = path(p)
  if is_remote(p):
    fs, key = _fs(p)
    if fs.exists(key):
      fs.rm(key, recursive=True)
    return
  shutil.rmtree(os.fspath(p), ignore_errors=True)


def append_text(p: PathLike, text: str) -> None:
  """Appends ``text`` to ``p`` (one writer at a time: a bucket's object is read and rewritten
  whole, which is cheap for the small logs this is for)."""
  p = path(p)
  if is_remote(p):
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)
    return
  makedirs(p.parent)
  with open(os.fspath(p), "a") as f:
    f.write(text)


def _segments(p: epath.Path) -> epath.Path:
  return p.parent / f"{p.name}.writers"


def append_shared(p: PathLike, line: str) -> None:
  """Appends one line to ``p`` from any number of processes at once. Local: one O_APPEND write
  (whole lines, never interleaved). Bucket: this writer's own object ``P.writers/<host>-<pid>``
  rewritten whole; ``read_shared`` reads both."""
  p = path(p)
  line = line.rstrip("\n") + "\n"
  if is_remote(p):
    append_text(_segments(p) / f"{socket.gethostname()}-{os.getpid()}", line)
    return
  makedirs(p.parent)
  fd = os.open(os.fspath(p), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, line.encode())
  finally:
    os.close(fd)


def read_shared(p: PathLike) -> list[str]:
  """The lines ``append_shared`` wrote to ``p`` (the file's, then each writer's), without
  newlines; a missing file has none."""
  p = path(p)
  lines = p.read_text().splitlines() if p.exists() else []
  seg = _segments(p)
  if is_remote(p) and seg.exists():
    for part in sorted(seg.iterdir(), key=lambda q: q.name):
      lines += part.read_text().splitlines()
  return lines


def remove_shared(p: PathLike) -> None:
  """Removes ``p`` and its writers' objects."""
  p = path(p)
  if p.exists():
    p.unlink()
  if is_remote(p):
    rmtree(_segments(p))


def upload_tree(local: PathLike, dst: PathLike) -> None:
  """Copies local folder ``local`` to ``dst`` (any path), file by file, each written whole (links
  are followed: their files are copied). A bucket gets the files concurrently (one request each,
  batched by fsspec), so thousands of small images take seconds, not minutes."""
  local = pathlib.Path(local)
  files = [src for src in sorted(local.rglob("*")) if src.is_file()]
  if not is_remote(dst):
    for src in files:
      write_bytes(path(dst).joinpath(*src.relative_to(local).parts), src.read_bytes())
    return
  fs, root = filesystem(dst)
  targets = [posixpath.join(root, *src.relative_to(local).parts) for src in files]
  if files:
    fs.put([os.fspath(src) for src in files], targets)


def download_tree(src: PathLike, local: PathLike) -> None:
  """Copies folder ``src`` (any path) into local folder ``local``."""
  local = pathlib.Path(local)
  if not is_remote(src):
    shutil.copytree(os.fspath(src), local, dirs_exist_ok=True)
    return
  fs, key = _fs(src)
  key = key.rstrip("/")
  for name in fs.find(key):
    out = local / pathlib.PurePosixPath(name).relative_to(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(fs.cat_file(name))


@contextlib.contextmanager
def staged_dir(dst: PathLike) -> Iterator[pathlib.Path]:
  """A local folder to write ``dst``'s files into. Local ``dst``: the folder itself (created).
  Bucket: a temp folder, uploaded to ``dst`` when the block finishes without an exception and
  removed either way (for writers that need local files: ArrayRecord, save_pretrained)."""
  if not is_remote(dst):
    local = pathlib.Path(os.fspath(dst))
    local.mkdir(parents=True, exist_ok=True)
    yield local
    return
  with tempfile.TemporaryDirectory(prefix="gmail_jax-stage-") as tmp:
    yield pathlib.Path(tmp)
    upload_tree(tmp, dst)


def cache_root() -> pathlib.Path:
  """Where bucket folders are copied to be read locally: $GMAIL_JAX_CACHE, else
  ~/.cache/gmail_jax."""
  return pathlib.Path(os.environ.get("GMAIL_JAX_CACHE", "~/.cache/gmail_jax")).expanduser()


def fetch_dir(src: PathLike) -> pathlib.Path:
  """A local folder with ``src``'s files (for readers that need local paths: transformers,
  safetensors, memmaps). Local ``src``: itself. Bucket: copied once into ``cache_root()/gcs``
  (keyed by the URL and each object's size and modification time, so a changed folder is copied
  again)."""
  if not is_remote(src):
    return pathlib.Path(os.fspath(src))
  src = path(src)
  if not src.is_dir():
    raise InputError(f"{src}: no such folder")
  fs, key = _fs(src)
  listing = sorted(
    (info["name"], info.get("size"), str(info.get("updated") or info.get("mtime")))
    for info in fs.find(key, detail=True).values()
  )
  digest = hashlib.sha256(json.dumps([os.fspath(src), listing]).encode()).hexdigest()[:20]
  local = cache_root() / "gcs" / digest
  if not (local / ".complete").exists():
    tmp = local.with_name(_tmp_name(local.name))
    download_tree(src, tmp)
    (tmp / ".complete").write_text(os.fspath(src) + "\n")
    try:
      os.replace(tmp, local)
    except OSError:  # another process finished the same copy first
      shutil.rmtree(tmp, ignore_errors=True)
  return local


def check_writable(p: PathLike, flag: str = "--workdir") -> None:
  """InputError in one line unless a file can be created and removed in ``p`` (run before
  anything is built or compiled)."""
  probe = path(p) / f".write-check-{socket.gethostname()}-{os.getpid()}"
  try:
    makedirs(p)
    write_bytes(probe, b"")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - any failure is reported as this one line
    raise InputError(f"{flag}={os.fspath(p)}: cannot write there ({type(e).__name__}: {e})") from e


def filesystem(p: PathLike) -> tuple[Any, str]:
  """(fsspec filesystem, key) of a bucket URL, for what epath does not offer (one-GET reads,
  recursive listings with sizes, streamed uploads)."""
  import fsspec

  return fsspec.core.url_to_fs(os.fspath(p))


_fs = filesystem


def list_files(root: PathLike) -> list[str]:
  """Every file below ``root`` (any depth), sorted, as paths or URLs; none when it is missing (a
  bucket's from one recursive listing: epath has no recursive glob there and its walk() drops the
  scheme)."""
  if not is_remote(root):
    return sorted(str(q) for q in pathlib.Path(os.fspath(root)).rglob("*") if q.is_file())
  fs, key = filesystem(root)
  base, key = os.fspath(root).rstrip("/"), key.rstrip("/")
  return sorted(base + name[len(key) :] for name in fs.find(key))


def list_sizes(folder: PathLike) -> dict[str, int]:
  """``{name: size}`` of the files directly in ``folder`` (one listing); {} when it is missing."""
  if not is_remote(folder):
    try:
      return {e.name: e.stat().st_size for e in os.scandir(os.fspath(folder)) if e.is_file()}
    except FileNotFoundError:
      return {}
  fs, key = filesystem(folder)
  try:
    entries = fs.ls(key.rstrip("/"), detail=True)
  except FileNotFoundError:
    return {}
  return {e["name"].rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e["type"] == "file"}


def upload_file(local: PathLike, dst: PathLike) -> None:
  """Local file -> ``dst``, streamed (shards can be GBs; write_bytes takes bytes): one upload to a
  bucket, so the object appears only whole; a local ``dst`` is a whole write as write_bytes."""
  if not is_remote(dst):
    target = pathlib.Path(os.fspath(dst))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / _tmp_name(target.name)
    try:
      shutil.copyfile(os.fspath(local), tmp)
      os.replace(tmp, target)
    finally:
      tmp.unlink(missing_ok=True)
    return
  fs, key = filesystem(dst)
  fs.put_file(os.fspath(local), key)
