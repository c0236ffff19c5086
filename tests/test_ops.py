"""Operations: TensorBoard events and the W&B offline run hold what metrics.jsonl holds (read back
with their own readers, across a resume), and launch/colab_restore.ipynb runs top to bottom on a
trained run."""

import glob
import json
import math
import pathlib
import sys
import tomllib

import ml_collections
import numpy as np
import PIL.Image
import pytest
from config_helpers import load_config
from conftest import xla_flags

from gmail_jax import schema
from gmail_jax.errors import ConfigError
from gmail_jax.training import metrics, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_restore.ipynb"
STEPS = 6


def config(total_steps: int = STEPS, wandb_dir: str = "") -> ml_collections.ConfigDict:
  """The tiny config shrunk to seconds (tests/test_resume.py), logging every step to W&B too."""
  c = load_config("tiny")
  c.model.variant = "mu"
  c.data.image_size = c.data.synthetic_image_size = 16
  c.data.synthetic_size = 48
  c.total_steps, c.checkpoint_every_steps, c.log_every_steps = total_steps, 2, 1
  c.async_checkpoints = False
  c.optim.schedule = "constant"
  c.wandb.enabled = True
  c.wandb.mode = "offline"
  c.wandb.dir = wandb_dir
  c.wandb.tags = ("ops-test",)
  return c


def wandb_env(root: pathlib.Path) -> dict[str, str]:
  """Offline, silent, no error reports, W&B's own files under ``root`` (never the home dir)."""
  return {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_ERROR_REPORTING": "false",
    "WANDB_CONFIG_DIR": str(root / "wandb_config"),
    "WANDB_CACHE_DIR": str(root / "wandb_cache"),
    "WANDB_DATA_DIR": str(root / "wandb_data"),
  }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(WORKDIR, W&B dir) of a run trained 4 steps, then resumed to STEPS."""
  root = tmp_path_factory.mktemp("ops")
  workdir, wandb_dir = root / "run", root / "wandb_root"
  with pytest.MonkeyPatch.context() as mp:
    for key, value in wandb_env(root).items():
      mp.setenv(key, value)
    train.train_and_evaluate(config(4, str(wandb_dir)), str(workdir))
    train.train_and_evaluate(config(STEPS, str(wandb_dir)), str(workdir))
  return workdir, wandb_dir


def jsonl_rows(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_tensorboard_events_read_back_equal_metrics_jsonl(trained):
  from tensorboard.backend.event_processing import event_accumulator as ea

  workdir, _ = trained
  rows = jsonl_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the resume appended 5, 6
  assert len(list((workdir / "tb").glob("events.out.tfevents.*"))) == 2  # one file per start
  acc = ea.EventAccumulator(str(workdir / "tb"), size_guidance={ea.SCALARS: 0})
  acc.Reload()
  keys = {k for r in rows for k in r} - {"step"}
  assert set(acc.Tags()["scalars"]) == keys
  for key in keys:
    events = acc.Scalars(key)
    assert [e.step for e in events] == [r["step"] for r in rows], key
    # TensorBoard stores float32 scalars.
    np.testing.assert_array_equal(
      np.float32([e.value for e in events]), np.float32([r[key] for r in rows]), err_msg=key
    )
  assert "train/loss" in keys


def read_wandb_run(path: pathlib.Path) -> tuple[dict, dict[int, dict]]:
  """({'id', 'project', 'tags', 'config'}, {step: scalars}) from an offline run's .wandb file,
  with W&B's own record reader."""
  from wandb.proto import wandb_internal_pb2
  from wandb.sdk.internal import datastore

  (file,) = glob.glob(str(path / "run-*.wandb"))
  store = datastore.DataStore()
  store.open_for_scan(file)
  run, history = {}, {}
  while (data := store.scan_data()) is not None:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(data)
    kind = record.WhichOneof("record_type")
    if kind == "run":
      r = record.run
      config = {item.key: json.loads(item.value_json) for item in r.config.update}
      run = {"id": r.run_id, "project": r.project, "tags": list(r.tags), "config": config}
    elif kind == "history":
      items = record.history.item
      row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
      history[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
  store.close()
  return run, history


def test_wandb_offline_run_holds_the_logged_scalars_under_the_chosen_dir(trained):
  workdir, wandb_dir = trained
  assert not (workdir / "wandb").exists()  # config.wandb.dir is honoured
  runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
  assert len(runs) == 2  # one per start
  run_id = (workdir / "wandb_run_id").read_text().strip()
  history = {}
  for path in runs:
    run, part = read_wandb_run(path)
    assert run["id"] == run_id and path.name.endswith(run_id)  # the resume keeps the W&B run
    assert run["project"] == "gmail_jax" and run["tags"] == ["ops-test"]
    assert run["config"]["lora"]["rank"] == 4
    assert run["config"]["wandb"]["enabled"] is True
    assert not set(part) & set(history)
    history.update(part)
  rows = jsonl_rows(workdir)
  assert history == {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in rows}


def test_wandb_missing_or_bad_mode_is_one_config_line(tmp_path, monkeypatch):
  c = config()
  monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec reports when not installed
  with pytest.raises(ConfigError, match=r"^config\.wandb\.enabled: pip install wandb==") as e:
    metrics.MetricWriter(tmp_path, total_steps=1, config=c)
  assert "\n" not in str(e.value)
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  # The advice installs the tested lock, which the extra's compatible range admits.
  from packaging.requirements import Requirement

  (extra,) = (Requirement(r) for r in extras["wandb"])
  assert extra.name == "wandb" and extra.specifier.contains(metrics.WANDB_PIN.split("==")[1])
  assert metrics.WANDB_PIN in (ROOT / "requirements-test.txt").read_text().split()
  c.wandb.mode = "onlin"
  with pytest.raises(ConfigError, match=r"^config\.wandb\.mode: 'onlin' not in"):
    schema.validate(c)
  # Disabled (the default): nothing W&B is touched even without the package.
  w = metrics.MetricWriter(tmp_path, total_steps=1, config=load_config("tiny"))
  w.write(1, {"train/loss": 1.0}, console=False)
  w.close()
  assert not (tmp_path / "wandb").exists()


def test_runs_written_before_the_wandb_group_still_load(tmp_path):
  c = load_config("tiny")
  del c["wandb"]
  (tmp_path / "config.json").write_text(c.to_json_best_effort())
  restored = metrics.read_config(tmp_path)
  schema.check(restored)
  assert restored.wandb.enabled is False
  refused, _ = schema.resume_changes(c, config())  # turning W&B on is a resumable change
  assert not any(k.startswith("wandb.") for k in refused)


def write_digit_folders(root: pathlib.Path, per_class: int) -> None:
  """root/{real,generated}/<class>/NNNN.png: the quickstart's digits, a few per class."""
  from gmail_jax.data import digits

  real, real_y = digits.real_digits()
  gen, gen_y = digits.generated_digits(per_class, seed=0)
  for kind, images, labels in (("real", real, real_y), ("generated", gen, gen_y)):
    for label, name in enumerate(digits.CLASS_NAMES):
      d = root / kind / name
      d.mkdir(parents=True)
      for i, image in enumerate(images[labels == label][:per_class]):
        PIL.Image.fromarray(image, mode="L").save(d / f"{i:04d}.png")


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_on_a_trained_run(trained, tmp_path, monkeypatch):
  import nbclient
  import nbformat

  workdir, _ = trained
  write_digit_folders(tmp_path / "images", per_class=4)
  # A kernelspec for this interpreter (the venv), found through JUPYTER_PATH only.
  spec = tmp_path / "jupyter" / "kernels" / "gmail-ops-test"
  spec.mkdir(parents=True)
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  (spec / "kernel.json").write_text(
    json.dumps({"argv": argv, "display_name": "gmail_jax tests", "language": "python"})
  )
  env = {
    "JUPYTER_PATH": str(tmp_path / "jupyter"),
    "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter_runtime"),
    "IPYTHONDIR": str(tmp_path / "ipython"),
    "MPLCONFIGDIR": str(tmp_path / "mpl"),
    "XLA_FLAGS": xla_flags(1),  # the kernel: one CPU device
    "GMAIL_WORKDIR": str(workdir),
    "GMAIL_IMAGES": str(tmp_path / "images"),
    "GMAIL_PER_CLASS": "4",
  }
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert "google.colab" in nb.cells[1].source  # the install cell only acts on Colab
  assert "parameters" in nb.cells[2].metadata.get("tags", [])
  client = nbclient.NotebookClient(
    nb,
    kernel_name="gmail-ops-test",
    timeout=180,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError naming the failing cell

  def outputs(cell, kind):
    return [o for o in cell.outputs if o.output_type == kind]

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert f"restored step {STEPS}" in "".join(o.text for o in outputs(code[2], "stream"))
  retrieval, tsne = code[4], code[5]
  assert "recall@1" in "".join(o.text for o in outputs(retrieval, "stream"))
  for cell in (retrieval, tsne):
    assert any("image/png" in o.data for o in outputs(cell, "display_data"))
  summary = json.loads("".join(o.text for o in outputs(tsne, "stream")))
  assert summary["step"] == STEPS and summary["classes"] == 10
  assert summary["projection"] == "tsne"  # 80 points
  values = [*summary["recall@1"].values(), *summary["class_centroid_cosine"].values()]
  assert len(values) == 4 and all(math.isfinite(v) for v in values)


def test_metric_writer_starts_without_torch_and_torch_still_imports_after(tmp_path):
  """tensorboardX would import torch (~1 s of every training run's start) to accept its tensors;
  the writer logs floats, so a fresh process that only logs never loads it, and a later
  ``import torch`` gets the real one."""
  import subprocess

  code = f"""
import sys
from gmail_jax.training import metrics
w = metrics.MetricWriter({str(tmp_path)!r}, total_steps=1)
w.write(1, {{"train/loss": 0.5}}, console=False)
w.close()
print("torch loaded:", "torch" in sys.modules)
import torch
print("torch works:", float(torch.ones(2).sum()))
"""
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "torch loaded: False" in out.stdout and "torch works: 2.0" in out.stdout, out.stdout
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
