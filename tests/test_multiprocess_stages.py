"""Every stage on several processes, through the driver (``python -m gmail_jax.main`` on 2 processes
x 4 CPU devices, gloo): each run equals 1 process x 8 devices, every process returns the same
outputs, and no file under WORKDIR is written by both processes.

Which files a process writes is recorded by an audit hook (``sys.addaudithook``: Python's opens
for writing, renames, removals) installed before ``gmail_jax.main`` runs. Orbax writes its array
data from C++ (tensorstore), unseen here; those are per-process files by Orbax's design.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import portpicker
import pytest
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
WRITES = "GMAIL_TEST_WRITES"  # where the hook lists this process's writes under WORKDIR
WORKDIR = "GMAIL_TEST_WORKDIR"
DONE = "stages done, outputs: "  # driver.run's last log line, on every process

# Runs gmail_jax.main (argv after -c) with an audit hook listing the paths under $WORKDIR that
# this process opens for writing, renames a file onto or removes. Not os.link, nor a folder's
# rename: neither replaces what is there (generation's create_exclusive, and a random pipeline
# saved by each process and renamed into place: of processes racing to publish one, one does).
MAIN = f"""
import os, runpy, sys
log = open(os.environ[{WRITES!r}], "w", buffering=1)
root = os.path.abspath(os.environ[{WORKDIR!r}]) + os.sep
flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def written(path):
  if isinstance(path, (str, bytes, os.PathLike)):
    path = os.path.abspath(os.fsdecode(path))
    if path.startswith(root):
      log.write(path[len(root):] + "\\n")
def hook(event, args):
  if event == "open":
    path, mode, flag = args
    if (mode and any(c in mode for c in "wax+")) or (mode is None and flag & flags):
      written(path)
  elif event == "os.rename" and not os.path.isdir(args[0]):  # os.rename and os.replace
    written(args[1])
  elif event in ("os.remove", "shutil.rmtree"):
    written(args[0])
sys.addaudithook(hook)
sys.argv = ["gmail_jax.main", *sys.argv[1:]]
runpy.run_module("gmail_jax.main", run_name="__main__", alter_sys=True)
"""


def start(workdir, args, *, devices: int, log: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=xla_flags(devices),
    JAX_PLATFORMS="cpu",
    OMP_NUM_THREADS="1",
    GMAIL_TRACEBACK="1",
    HF_HUB_OFFLINE="1",
    PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    **{WRITES: str(log), WORKDIR: str(workdir)},
  )
  cmd = [sys.executable, "-c", MAIN, *args, f"--workdir={workdir}"]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def outputs(log: str) -> dict:
  lines = [line for line in log.splitlines() if DONE in line]
  assert len(lines) == 1, log[-3000:]
  return json.loads(lines[0].split(DONE, 1)[1])


def run_experiment(workdir: pathlib.Path, args, *, processes: int, tag: str) -> dict:
  """Runs ``args`` in ``workdir`` on 1 process x 8 devices or 2 x 4; returns {'outputs': the
  driver's outputs per process, 'writes': the paths each process wrote under workdir, 'logs':
  each process's output}, also kept beside workdir as TAG.log.<process> and TAG.writes.<process>.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  logs = [workdir.parent / f"{tag}.writes.{i}" for i in range(processes)]
  if processes == 1:
    procs = [start(workdir, args, devices=8, log=logs[0])]
  else:
    port = portpicker.pick_unused_port()
    dist = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
    procs = [
      start(workdir, [*args, *dist, f"--process_id={i}"], devices=8 // processes, log=logs[i])
      for i in range(processes)
    ]
  texts = []
  for i, p in enumerate(procs):
    out, _ = p.communicate(timeout=400)
    (workdir.parent / f"{tag}.log.{i}").write_text(out)  # for a failure's post-mortem
    texts.append(out)
  for p, out in zip(procs, texts, strict=True):
    assert p.returncode == 0, out[-4000:]
  return {
    "outputs": [outputs(t) for t in texts],
    # Each process's own probe that the workdir is writable (storage.check_writable) aside.
    "writes": [{f for f in log.read_text().split() if ".write-check-" not in f} for log in logs],
    "logs": texts,
  }


def copy_to_redo(src: pathlib.Path, dst: pathlib.Path, redo, outputs) -> None:
  """``dst``: a copy of finished workdir ``src`` without the records of stages ``redo`` and
  without ``outputs`` (their files and folders under it), so that a run there redoes those stages
  and skips the others as complete. Not the probes of a concurrent rerun in ``src`` that it is
  writable (storage.check_writable)."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".write-check-*"))
  for name in redo:
    (dst / "stages" / f"{name}.json").unlink()
  for out in outputs:
    if (dst / out).is_dir():
      shutil.rmtree(dst / out)
    else:
      (dst / out).unlink()


def assert_redid(log: str, stages, redo) -> None:
  """The run that wrote ``log`` ran the stages ``redo`` and skipped the other ``stages``."""
  for name in stages:
    assert (f"stage {name}: complete, skipped" in log) == (name not in redo), name


def check_processes(result: dict) -> None:
  """Both processes returned the same outputs and wrote no file in common."""
  first, second = result["outputs"]
  assert first == second
  both = result["writes"][0] & result["writes"][1]
  assert not both, sorted(both)[:20]


def numbers(tree, prefix="") -> dict[str, float]:
  """{path: value} of every number in a JSON tree."""
  out = {}
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  for k, v in items:
    if isinstance(v, dict | list):
      out.update(numbers(v, f"{prefix}{k}/"))
    elif isinstance(v, int | float) and not isinstance(v, bool):
      out[f"{prefix}{k}"] = float(v)
  return out


def assert_close(got: dict, want: dict, *, atol: float, item: dict[str, float]) -> None:
  """Every number of ``got`` within ``atol`` of ``want``'s; a key containing one of ``item``'s
  substrings (a fraction of test items: accuracies, recalls) within one item, 1 / count."""
  ng, nw = numbers(got), numbers(want)
  assert set(ng) == set(nw)
  for key, value in nw.items():
    tol = max([atol] + [1 / n + 1e-9 for sub, n in item.items() if sub in key])
    np.testing.assert_allclose(ng[key], value, rtol=0, atol=tol, err_msg=key)


# The quickstart's smoke run with an evaluate stage before the report: a generated-real gap eval
# on the held-out split, whose t-SNE points every process embeds. And the report's "as if real"
# baseline: its LoRA trains on the run's mesh, on every process. A half (align) and a sixth
# (teacher) of the smoke run's steps: the test compares processes, not quality.
QUICKSTART_EVAL = """
import ml_collections

from configs import quickstart


def get_config(workdir):
  c = quickstart.get_config("rendered,smoke")
  c.stages = ("splits", "teacher", "align", "evaluate", "report")
  c.total_steps = c.checkpoint_every_steps = 20
  c.teacher_pretrain.steps = 10
  c.report.synthetic_baseline = True
  gap = dict(type="gap", pairs="class_gen_real", root=f"{workdir}/data/test", max_pairs=100)
  c.evals = ml_collections.ConfigDict({"gen_real": {**gap, "batch_size": 256}})
  return c
"""


STAGES = ("splits", "teacher", "align", "evaluate", "report")  # QUICKSTART_EVAL's
REDONE = ("evaluate", "report")  # the stages the 1-process reference redoes


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
  """The run on 2 processes; then a copy of its workdir where 1 process x 8 devices redoes the
  evaluate and report stages on the same teacher and checkpoint (the others are skipped as
  complete): the reference. That 2 x 4 trains like 1 x 8 is test_train_main's."""
  root = tmp_path_factory.mktemp("quickstart")
  (root / "quickstart_eval.py").write_text(QUICKSTART_EVAL)
  two = root / "p2"
  args = [f"--config={root / 'quickstart_eval.py'}:{two}"]  # the data of p2 for both
  runs = {2: run_experiment(two, args, processes=2, tag="p2"), "args": args}
  ref = root / "p1"
  copy_to_redo(two, ref, REDONE, ("eval", "report.json", "report.md", "tsne.png", "curves.png"))
  runs[1] = run_experiment(ref, args, processes=1, tag="p1")
  runs["ref"] = ref
  return runs


@pytest.mark.slow
def test_quickstart_on_two_processes_reports_what_one_does(quickstart):
  """('splits', 'teacher', 'align', 'evaluate', 'report'): process 0 alone splits and pretrains
  the teacher (on its own default device), both align, evaluate and report (load_run, embeddings,
  the baseline), and process 0 writes. A rerun skips every stage on both processes."""
  check_processes(quickstart[2])
  assert_redid(quickstart[1]["logs"][0], STAGES, REDONE)
  one, two = (quickstart[n]["outputs"][0] for n in (1, 2))
  assert set(one) == set(two) == {"train", "test", "model_dir", "run", "step", "metrics", "report"}
  wd1, wd2 = quickstart["ref"], pathlib.Path(two["run"])
  a, b = (json.loads((wd / "report.json").read_text()) for wd in (wd1, wd2))
  assert b["counts"] == a["counts"] and b["classes"] == a["classes"]
  assert b["test_pairs"] == a["test_pairs"]
  # Means of float32 cosines (and probe accuracies) of the same teacher and checkpoint, embedded on
  # 1 x 8 and 2 x 4 devices, and of the baseline's LoRA trained on each mesh (2 x 4 trains like
  # 1 x 8 to ~1e-5, test_train_main): float rounding only. An accuracy may move by one held-out
  # scan (a prediction at a tie); a wrong row order or a missing process block would move
  # everything by >= 1e-2.
  counts = a["counts"]
  items = {"accuracy": counts["test_real"], "zeroshot_real": counts["test_real"]}
  assert_close(b, a, atol=1e-4, item={**items, "zeroshot_generated": counts["test_gen"]})
  assert "synthetic_finetune" in b["baselines"]
  for name in ("report.md", "tsne.png", "curves.png", "eval/tsne_gen_real.png"):
    assert (wd2 / name).is_file(), name
  a, b = (json.loads((wd / "eval" / "metrics.json").read_text()) for wd in (wd1, wd2))
  assert a["step"] == b["step"] == 20
  assert_close(b["encoders"], a["encoders"], atol=1e-4, item={})
  # gap_reduction = 100 (1 - G_student / G_teacher): ~100 / G_teacher = 400 x the gaps' rounding.
  assert_close(b["gap_reduction"], a["gap_reduction"], atol=1e-3, item={})

  # A rerun: every process finds every stage complete (they agree) and returns the same outputs.
  rerun = run_experiment(wd2, quickstart["args"], processes=2, tag="rerun")
  check_processes(rerun)
  for log in rerun["logs"]:
    assert_redid(log, STAGES, redo=())
  assert rerun["outputs"][0] == two
  assert not rerun["writes"][1], sorted(rerun["writes"][1])[:20]
