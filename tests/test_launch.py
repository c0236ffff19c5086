"""The launch scripts parse (bash -n) and name an entry point that exists."""

import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def test_there_are_launch_scripts():
  assert {p.name for p in SCRIPTS} >= {"local_gpu.sh", "tpu_pod.sh", "slurm_multinode.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_runs_a_gmail_module(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  text = script.read_text()
  assert "python -m gmail_jax." in text
  module = text.split("python -m gmail_jax.")[1].split()[0]
  assert (LAUNCH.parent / "gmail_jax" / f"{module}.py").exists(), module


def test_gpu_launch_refuses_to_train_on_the_cpu(tmp_path):
  """A CPU-only jaxlib (this machine's) must not make launch/local_gpu.sh train on the CPU."""
  import os
  import sys

  env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
  env.pop("GMAIL_PLATFORM", None)
  res = subprocess.run(
    [str(LAUNCH / "local_gpu.sh"), "configs/tiny.py", str(tmp_path / "run")],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 1, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ConfigError: --platform=gpu: JAX runs on cpu"), last
  assert "pip install -e '.[cuda]'" in last and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_python_gets_the_preemption_signal(script):
  """SIGTERM must reach python (it saves and exits 0): the script execs it, no shell in between;
  under SLURM the job asks for the signal before the kill."""
  text = script.read_text()
  if "&\n" in text:  # starts several processes: forwards the signal to each
    assert "trap 'kill -TERM" in text, script.name
  else:
    assert "exec python -m gmail_jax." in text, script.name
  if script.suffix == ".sbatch":
    assert "#SBATCH --signal=TERM@" in text
