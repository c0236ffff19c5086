"""Test harness: 8 simulated CPU devices, offline Hugging Face, shared data located once.

Under ``CI=true`` nothing skips silently: a missing shared dataset, a missing ``java`` or a missing
test dependency fails the test (and a module that cannot be collected fails the run), unless the
test is marked ``optional_extra`` (it needs an extra that the test environment does not install).
"""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

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
