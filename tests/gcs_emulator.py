"""A local Cloud Storage server for tests: gcp-storage-emulator (in memory) with what our clients
need and the stock emulator lacks.

  python tests/gcs_emulator.py --port=P --bucket=B      (tests/conftest.py's ``gcs`` fixture)

Fixes, each needed by a client we use:
1. ``x-goog-generation`` / ``x-goog-metageneration`` on media downloads: tensorstore (Orbax's
   arrays) takes the generation of a ranged read from them; without them a later conditional
   write fails with "Malformed StorageGeneration" (Orbax saves failed about 1 in 8).
2. ``ifGenerationMatch`` / ``ifGenerationNotMatch`` preconditions (412 / 304): tensorstore's
   conditional writes and our create-only-if-absent (storage.create_exclusive) rely on them.
3. Suffix ranges ``Range: bytes=-N`` (array_record's GCS reader reads the footer so; the stock
   emulator answers the whole object and any shard over ~1 MiB fails to open).
4. ``POST .../o/{src}/moveTo/o/{dst}`` (gcsfs' rename; stock: 501, then ~33 s of retries).
5. A threaded server (stock serves one request at a time and pyarrow's parquet reader deadlocks on
   files of a few MB); handlers run under one lock.
The server exits when the process that started it dies, so a killed test run leaves none behind.
"""

import argparse
import functools
import os
import re
import threading
import time
from http import HTTPStatus
from http import server as http_server

from gcp_storage_emulator import server as emu_server
from gcp_storage_emulator.exceptions import Conflict, NotFound
from gcp_storage_emulator.handlers import buckets, objects

_ORIGINAL = {name: getattr(objects, name) for name in ("download", "get", "insert")}
_SUFFIX_RANGE = re.compile(r"^\s*bytes=-(\d+)\s*$")
_LOCK = threading.RLock()


def _current(storage, bucket, name):
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


def _preconditions_hold(request, response, obj, read: bool) -> bool:
  """Applies GCS generation preconditions; False when the request is answered here."""
  generation = str(obj["generation"]) if obj else None
  match = request.query.get("ifGenerationMatch")
  if match:
    want = match[0]
    if (want == "0" and generation is not None) or (want != "0" and generation != want):
      missing = read and obj is None
      response.status = HTTPStatus.NOT_FOUND if missing else HTTPStatus.PRECONDITION_FAILED
      return False
  not_match = request.query.get("ifGenerationNotMatch")
  if read and not_match and generation is not None and generation == not_match[0]:
    response.status = HTTPStatus.NOT_MODIFIED
    return False
  return True


def download(request, response, storage, *args, **kwargs):
  bucket, name = request.params["bucket_name"], request.params["object_id"]
  obj = _current(storage, bucket, name)
  if obj is None:
    response.status = HTTPStatus.NOT_FOUND
    return None
  if not _preconditions_hold(request, response, obj, read=True):
    return None
  headers = request._request_handler.headers
  suffix = _SUFFIX_RANGE.match(headers.get("range", "") or "")
  if suffix:
    del headers["range"]
    headers["Range"] = f"bytes={max(0, int(obj['size']) - int(suffix.group(1)))}-"
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  response["x-goog-stored-content-length"] = str(obj.get("size", ""))
  return _ORIGINAL["download"](request, response, storage, *args, **kwargs)


def get(request, response, storage, *args, **kwargs):
  if request.query.get("alt", [""])[0] != "media" and not request.query.get("softDeleted"):
    obj = _current(storage, request.params["bucket_name"], request.params["object_id"])
    if obj is not None and not _preconditions_hold(request, response, obj, read=True):
      return None
  return _ORIGINAL["get"](request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
  name = request.query.get("name", [None])[0]
  if name is not None and request.query.get("ifGenerationMatch"):
    obj = _current(storage, request.params["bucket_name"], name)
    if not _preconditions_hold(request, response, obj, read=False):
      return None
  return _ORIGINAL["insert"](request, response, storage, *args, **kwargs)


def move(request, response, storage, *args, **kwargs):
  bucket = request.params["bucket_name"]
  src, dst = request.params["object_id"], request.params["dest_object_id"]
  try:
    dest = objects._copy(request.base_url, storage, bucket, src, bucket, dst)
    objects._delete(storage, bucket, src)
    response.json(dest)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
  except Conflict as err:
    objects._handle_conflict(response, err)


def _locked(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with _LOCK:
      return fn(*args, **kwargs)

  return wrapper


class _ThreadingServer(http_server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128


class _ServerModule:  # stands in for http.server inside gcp_storage_emulator.server
  HTTPServer = _ThreadingServer


def patch() -> None:
  replaced = {_ORIGINAL["download"]: download, _ORIGINAL["get"]: get, _ORIGINAL["insert"]: insert}
  objects.download, objects.get, objects.insert = download, get, insert  # internal calls too
  move_route = (
    r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
    r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
  )
  routes = [(move_route, {"POST": move})]
  for regex, handlers in emu_server.HANDLERS:
    routes.append((regex, {k: replaced.get(v, v) for k, v in handlers.items()}))
  emu_server.HANDLERS = tuple((r, {k: _locked(v) for k, v in h.items()}) for r, h in routes)
  emu_server.server = _ServerModule  # APIThread.run() calls server.HTTPServer(...)


def _exit_with_parent() -> None:
  parent = os.getppid()
  while True:
    time.sleep(1)
    if os.getppid() != parent:
      os._exit(0)


def main() -> None:
  threading.Thread(target=_exit_with_parent, daemon=True).start()
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--bucket", action="append", default=[])
  args = parser.parse_args()
  patch()
  srv = emu_server.create_server(args.host, args.port, in_memory=True)
  for bucket in args.bucket:
    buckets.create_bucket(bucket, srv._storage)
  srv.run()


if __name__ == "__main__":
  main()
