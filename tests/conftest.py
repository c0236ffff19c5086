"""Test harness: 8 simulated CPU devices, offline Hugging Face, shared data located once."""

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


def shared_path(*parts: str) -> pathlib.Path:
  """A path under ../shared/data; skips locally, fails in CI when the dataset is missing."""
  path = SHARED.joinpath("data", *parts)
  if not path.exists():
    if os.environ.get("CI") == "true":
      raise FileNotFoundError(f"shared dataset missing in CI: {path}")
    pytest.skip(f"shared dataset not present: {path}")
  return path


@pytest.fixture
def shared():
  return shared_path
