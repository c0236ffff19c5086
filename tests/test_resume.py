"""Resume refuses what it cannot honour: a changed meaning, another teacher; it falls back over a
corrupt newest checkpoint and finishes bitwise equal to an uninterrupted run. The corrupt-checkpoint
tests run in a local workdir and in a ``gs://`` one (the GCS emulator of tests/conftest.py)."""

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from config_helpers import load_config
from flax import nnx

from gmail_jax import api, storage
from gmail_jax.errors import ResumeError
from gmail_jax.export import hf_dir
from gmail_jax.models import clip as clip_lib
from gmail_jax.training import checkpointing, train

STEPS = 6


def config(**changes):
  c = load_config("tiny")
  c.model.variant = "mu"
  c.data.image_size = c.data.synthetic_image_size = 16
  c.data.synthetic_size = 48
  c.total_steps, c.checkpoint_every_steps, c.log_every_steps = STEPS, 2, 1
  c.keep_checkpoints = 5
  c.async_checkpoints = False
  c.optim.schedule = "constant"
  for key, value in changes.items():
    group, _, name = key.rpartition(".")
    (c[group] if group else c)[name] = value
  return c


def final_params(workdir, step=STEPS) -> list[np.ndarray]:
  mgr = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir))
  r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  return [np.asarray(x) for x in jax.tree.leaves(r["state"]["params"])]


@pytest.fixture(params=["local", pytest.param("gs", marks=pytest.mark.slow)])
def any_dir(request, tmp_path) -> str:
  """A fresh workdir, local and in a bucket (the emulator)."""
  return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("gcs_dir")


def files(folder) -> list[storage.Path]:
  """Every file under a local or bucket folder (epath's rglob does not list buckets)."""
  if not storage.is_remote(folder):
    return sorted(storage.path(p) for p in pathlib.Path(folder).rglob("*") if p.is_file())
  import fsspec

  fs, key = fsspec.core.url_to_fs(os.fspath(folder))
  return [storage.path(fs.unstrip_protocol(name)) for name in sorted(fs.find(key))]


def snapshot(workdir: pathlib.Path) -> dict:
  files = sorted(p for p in (workdir / "checkpoints").rglob("*") if p.is_file())
  return {
    "config": (workdir / "config.json").read_bytes(),
    "checkpoints": {str(p): p.read_bytes() for p in files},
  }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(config(), str(workdir))
  return workdir


def test_changed_meaning_is_refused_by_name_and_nothing_is_touched(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(config(total_steps=4), str(workdir))
  before = snapshot(workdir)
  for key, value in (("lora.alpha", 64.0), ("loss.temperature", 0.1), ("lora.rank", 8)):
    with pytest.raises(ResumeError, match=rf"config\.{key} ") as e:
      train.train_and_evaluate(config(total_steps=4, **{key: value}), str(workdir))
    assert "\n" not in str(e.value)
    assert snapshot(workdir) == before  # config.json and checkpoints untouched
  x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  assert api.load_student(workdir).encode_images(x).shape == (2, 32)
  # Extending the run (and changing logging) is allowed, and recorded.
  train.train_and_evaluate(config(total_steps=STEPS, log_every_steps=2), str(workdir))
  assert checkpointing.saved_steps(workdir)[-1] == STEPS
  history = [json.loads(line) for line in open(workdir / "config_history.jsonl")]
  assert [h["resumed_from"] for h in history] == [None, 4]
  assert history[1]["changes"] == {"log_every_steps": [1, 2], "total_steps": [4, STEPS]}


def test_corrupt_newest_checkpoint_falls_back_and_ends_bitwise_equal(reference, any_dir):
  workdir = storage.path(any_dir)
  train.train_and_evaluate(config(), str(workdir))
  for f in files(workdir / "checkpoints" / str(STEPS)):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
  train.train_and_evaluate(config(), str(workdir))  # resumes from step 4, trains 5 and 6 again
  assert (workdir / checkpointing.UNUSABLE_DIR / str(STEPS)).is_dir()  # kept, set aside
  for a, b in zip(final_params(reference), final_params(workdir), strict=True):
    np.testing.assert_array_equal(a, b)


def test_every_checkpoint_corrupt_is_one_line_naming_the_directory(any_dir):
  workdir = storage.path(any_dir)
  train.train_and_evaluate(config(total_steps=4), str(workdir))
  for step in checkpointing.saved_steps(workdir):
    (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text("{truncated")
  with pytest.raises(ResumeError, match="no intact checkpoint") as e:
    train.train_and_evaluate(config(total_steps=4), str(workdir))
  assert str(workdir / "checkpoints") in str(e.value) and "\n" not in str(e.value)
  assert checkpointing.saved_steps(workdir) == [2, 4]  # nothing moved


@pytest.mark.parametrize("any_dir", ["local", "gs"], indirect=True)
def test_perturbed_teacher_in_the_init_directory_is_refused(tmp_path, any_dir, monkeypatch):
  """config.init in a local folder or a bucket one (read from a local copy, fetched again when
  its objects change)."""
  monkeypatch.setenv("GMAIL_JAX_CACHE", str(tmp_path / "cache_root"))
  saved, teacher_dir = tmp_path / "saved", storage.path(any_dir) / "teacher"
  model = clip_lib.CLIP(clip_lib.clip_config("mu"), rngs=nnx.Rngs(0))
  hf_dir.save_pretrained(model, str(saved))
  storage.upload_tree(saved, teacher_dir)
  workdir = tmp_path / "run"
  train.train_and_evaluate(config(total_steps=2, init=str(teacher_dir)), str(workdir))
  # 1 % noise on every weight: a float checksum with a tolerance would accept this teacher.
  state = nnx.state(model)
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(
    lambda w: w * (1 + 0.01 * rng.standard_normal(w.shape)).astype(w.dtype), state
  )
  nnx.update(model, noisy)
  hf_dir.save_pretrained(model, str(saved), overwrite=True)
  storage.upload_tree(saved, teacher_dir)
  with pytest.raises(ResumeError, match=r"the teacher differs") as e:
    train.train_and_evaluate(config(total_steps=4, init=str(teacher_dir)), str(workdir))
  assert str(teacher_dir) in str(e.value)
