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
