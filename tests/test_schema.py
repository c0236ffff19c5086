"""The base config is the schema: a key it does not define fails before anything is built."""

import pathlib
import subprocess
import sys

import ml_collections
import pytest
from config_helpers import load_config

from gmail_jax import schema
from gmail_jax.errors import ConfigError
from gmail_jax.experiments import driver

ROOT = pathlib.Path(__file__).resolve().parents[1]
GROUPS = [k for k, v in schema.base_config().items() if isinstance(v, ml_collections.ConfigDict)]


@pytest.mark.parametrize("group", ["", *[g for g in GROUPS if g not in schema.FREE_FORM]])
def test_unknown_key_in_any_group_is_refused_before_building(group, tmp_path):
  config = load_config("tiny")
  node = config[group] if group else config
  node.typo_key = 1  # what a config file does (ConfigDicts accept new attributes)
  name = f"config.{group}.typo_key" if group else "config.typo_key"
  with pytest.raises(ConfigError, match=rf"^{name}: unknown key"):
    driver.run(config, tmp_path)
  assert not any(tmp_path.iterdir())  # nothing written, nothing compiled


def test_every_group_is_checked():
  assert {"model", "lora", "loss", "cma", "optim", "data", "teacher_cache", "splits"} <= set(GROUPS)
  assert {"teacher_pretrain", "report", "mesh"} <= set(GROUPS)


def test_free_form_groups_are_checked_by_their_owner(tmp_path):
  config = load_config("tiny")
  config.model.overrides = ml_collections.ConfigDict({"vision_depth": 2})
  with pytest.raises(ValueError, match="bad override"):
    driver.run(config, tmp_path)
  config = load_config("tiny")
  config.evals.bad = ml_collections.ConfigDict({"type": "gap", "pairz": "gen_real"})
  with pytest.raises(ValueError, match=r"config\.evals\.bad: unknown keys \['pairz'\]"):
    driver.run(config, tmp_path)


def test_unknown_stage_and_missing_group():
  config = load_config("tiny")
  config.stages = ("align", "caption_me")
  with pytest.raises(ConfigError, match=r"config\.stages: unknown stage 'caption_me'"):
    driver.check(config)
  config = load_config("tiny")
  del config["teacher_cache"]
  with pytest.raises(ConfigError, match=r"config\.teacher_cache: missing"):
    schema.validate(config)


def test_config_file_typo_is_one_line_from_the_command_line(tmp_path):
  cfg = tmp_path / "typo.py"
  cfg.write_text(
    "from configs import tiny\n\n\ndef get_config():\n"
    "  c = tiny.get_config()\n  c.teacher_cache.enable = True\n  return c\n"
  )
  proc = subprocess.run(
    [sys.executable, "-m", "gmail_jax.main", f"--config={cfg}", f"--workdir={tmp_path / 'w'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
  )
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ConfigError: config.teacher_cache.enable: unknown key"), last
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


def test_trainer_imports_no_stage_around_it():
  code = (
    "import sys, gmail_jax.training.train\n"
    "bad = [m for m in sys.modules if m.startswith(('gmail_jax.experiments',"
    " 'gmail_jax.training.contrastive'))]\n"
    "assert not bad, bad\n"
  )
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"JAX_PLATFORMS": "cpu"})


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
  from gmail_jax import cli

  monkeypatch.delenv("GMAIL_TRACEBACK", raising=False)
  with pytest.raises(SystemExit) as e, cli.one_line_errors():
    raise ConfigError("config.lora.rank: must be >= 1, got 0")
  assert e.value.code == 1
  assert capsys.readouterr().err.strip() == (
    "error: ConfigError: config.lora.rank: must be >= 1, got 0"
  )
  with pytest.raises(ValueError, match="shapes"), cli.one_line_errors():
    raise ValueError("incompatible shapes (3,) and (4,)")  # a bug: not swallowed
