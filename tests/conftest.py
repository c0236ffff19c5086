"""Test harness: 8 simulated CPU devices, offline Hugging Face, shared data located once.

Under ``CI=true`` nothing skips silently: a missing shared dataset, a missing ``java`` or a missing
test dependency fails the test (and a module that cannot be collected fails the run), unless the
test is marked ``optional_extra`` (it needs an extra that the test environment does not install).
"""

import importlib.metadata
import os

# The suite is compile-bound: about half of an in-process test's time is XLA compiling small
# programs that then run for milliseconds. So its processes compile for compile time:
# - LLVM at -O0: four of the heaviest modules' backend compile 136 -> 90 s; the whole suite
#   (`pytest -q -n 2`, 2 cores) 13:48 against 16:04 and 14:46 with XLA's default -O2 in the runs
#   just before and after.
# - one LLVM module per program, not split for parallel codegen
#   (`xla_cpu_parallel_codegen_split_count=1`; the split buys nothing when both cores are busy
#   with two workers), and XLA:CPU's older LLVM IR emitters for loop and reduction fusions, not
#   its MLIR fusion emitters (`xla_cpu_use_fusion_emitters=false`): five in-process modules
#   (train step, resume, teacher cache, TPC-CMA, towers) 185 -> 134 CPU-s at -O0, the whole
#   suite 12:56 -> 10:15, the quickstart UNet's step compiles 5.7 -> 4.3 s and runs 0.117 ->
#   0.103 s (jaxlib 0.10.2). jaxlib 0.11.2's XLA has no such flag, and XLA aborts a process on an
#   unknown flag: it is passed to the jaxlib it was measured on only.
# Element-wise code may round differently in the last bit (configs/tiny.py, 8 steps: losses within
# 2.4e-7 of -O2's); dots run in YNNPACK/Eigen either way. So that runs compared with each other
# match bit for bit, the test processes and every process a test starts use the same flags:
# ``xla_flags``.
_JAXLIB = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1" + (
  " --xla_cpu_use_fusion_emitters=false" if _JAXLIB < (0, 11) else ""
)


def xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` of a test process with ``devices`` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}"


# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The emulator cannot answer gcsfs' gRPC bucket-layout probe (60 s per open); real GCS can.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# One persistent compilation cache for the session, shared by the xdist workers (they inherit
# this environment) and by every subprocess a test starts: each `python -m gmail_jax.main` would
# otherwise compile the same small programs again (a tiny 8-step run: 10 s cold, 4.8 s warm).
# JAX reads a half-written entry as a miss (a warning) and compiles, so concurrent writers are safe.
_JAX_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _JAX_CACHE_OWNER:
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gmail_jax-test-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain workers read absl flags; tests do not go through absl.app (google/grain#1355).
flags.FLAGS.mark_as_parsed()

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


IN_CI = os.environ.get("CI") == "true"


def shared_path(*parts: str) -> pathlib.Path:
  """A path under ../shared/data; skips locally, fails in CI when the dataset is missing."""
  path = SHARED.joinpath("data", *parts)
  if not path.exists():
    if IN_CI:
      raise FileNotFoundError(f"shared dataset missing in CI: {path}")
    pytest.skip(f"shared dataset not present: {path}")
  return path


def _skip_reason(report) -> str:
  return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """In CI a skip is a failure (see the module docstring)."""
  outcome = yield
  report = outcome.get_result()
  if IN_CI and report.skipped and item.get_closest_marker("optional_extra") is None:
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where every test must run: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """In CI a module skipped at import (``pytest.importorskip``) fails the run."""
  outcome = yield
  report = outcome.get_result()
  if IN_CI and report.skipped:
    report.outcome = "failed"
    report.longrepr = f"{collector.nodeid} skipped in CI, where every test must run: " + (
      _skip_reason(report)
    )


@pytest.fixture
def shared():
  return shared_path


GCS_BUCKET = "test-bucket"


@pytest.fixture
def fit_devices(monkeypatch) -> list[set]:
  """The devices of every model ``training.fit.fit_arrays`` trains during the test, in order (one
  set per call): small models should train on one device, not replicated over a mesh."""
  import jax
  from flax import nnx

  from gmail_jax.training import fit as fit_lib

  seen: list[set] = []
  fit = fit_lib.fit_arrays

  def spy(model, *args, **kwargs):
    seen.append({d for x in jax.tree.leaves(nnx.state(model)) for d in x.devices()})
    return fit(model, *args, **kwargs)

  monkeypatch.setattr(fit_lib, "fit_arrays", spy)
  return seen


@pytest.fixture(scope="session")
def gcs():
  """A local Cloud Storage server (tests/gcs_emulator.py) on 127.0.0.1, and this process's and its
  children's clients pointed at it: gcsfs / google-cloud-storage, tensorstore (Orbax's arrays),
  google-cloud-cpp (array_record's reader, pyarrow). Nothing leaves the machine. Yields its URL."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  script = pathlib.Path(__file__).with_name("gcs_emulator.py")
  cmd = [sys.executable, str(script), f"--port={port}", f"--bucket={GCS_BUCKET}"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      urllib.request.urlopen(url + "/", timeout=1).read()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError("the GCS emulator did not start (tests/gcs_emulator.py)") from None
      time.sleep(0.05)
  env = {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
    "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore: Orbax's array data
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp: array_record, pyarrow
    "NO_GCE_CHECK": "true",  # google-auth: no metadata-server probe
    "GCE_METADATA_ROOT": "127.0.0.1:1",  # tensorstore: no metadata-server DNS lookup
    "FSSPEC_GCS": '{"token": "anon", "use_listings_cache": false}',  # subprocesses' gcsfs
  }
  patch = pytest.MonkeyPatch()
  for key, value in env.items():
    patch.setenv(key, value)
  import fsspec
  import gcsfs
  from etils import epath

  for proto in ("gs", "gcs"):
    patch.setitem(fsspec.config.conf, proto, {"token": "anon", "use_listings_cache": False})
  gcsfs.GCSFileSystem.clear_instance_cache()
  epath.backend.fsspec_backend._get_filesystem.cache_clear()
  try:
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    gcsfs.GCSFileSystem.clear_instance_cache()
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    patch.undo()


@pytest.fixture
def gcs_dir(gcs, request) -> str:
  """A fresh ``gs://`` folder on the local emulator for this test."""
  name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
  return f"gs://{GCS_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "gs"])
def any_dir(request, tmp_path) -> str:
  """A fresh folder, once local and once in a bucket (the emulator): a test taking it passes
  unchanged on both."""
  if request.param == "local":
    return str(tmp_path / "dir")
  return request.getfixturevalue("gcs_dir")


def built_once(tmp_path_factory, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """A read-only artifact of the session (a reference run's workdir), built by ``build(folder)``
  once even when xdist sends the tests that read it to both workers: the first to get here builds
  it under a lock in the workers' shared temp folder, the other waits and reuses it. A failed
  build raises in that test and is tried again by the next."""
  import fcntl
  import shutil

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # basetemp/popen-gwN: the parent is the workers'
  folder, done = root / f"once-{name}", root / f"once-{name}.done"
  with open(root / f"once-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # a failed build's leftovers
      folder.mkdir()
      build(folder)
      done.touch()
  return folder


def pytest_unconfigure(config) -> None:
  """The session's compilation cache goes with the process that made it (the xdist controller)."""
  del config
  if _JAX_CACHE_OWNER:
    import shutil

    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
