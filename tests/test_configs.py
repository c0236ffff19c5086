"""Every config in configs/ builds (shapes only) and bad configs fail before compiling."""

import jax
import numpy as np
import pytest
from config_helpers import CONFIGS
from config_helpers import load_config as load

from gmail_jax import schema
from gmail_jax.models import lora
from gmail_jax.training import build, sharding, train


def config_names() -> list[str]:
  return sorted(p.stem for p in CONFIGS.glob("*.py") if "def get_config" in p.read_text())


@pytest.mark.parametrize("name", config_names())
def test_config_builds_shapes_only(name):
  config = load(name)
  schema.validate(config)
  shapes = build.abstract_train_state(config)
  n_lora = lora.count_params(shapes["state"]["params"]["lora"])
  n_frozen = lora.count_params(shapes["frozen"])
  assert 0 < n_lora < 0.05 * n_frozen
  # Optimizer state covers the trainable params only (LoRA, plus the projection when trained).
  n_trainable = lora.count_params(shapes["state"]["params"])
  assert n_trainable == n_lora or config.lora.train_proj
  opt_leaves = jax.tree.leaves(shapes["state"]["opt"])
  assert sum(int(np.prod(x.shape)) for x in opt_leaves) <= 2 * n_trainable + 16


@pytest.mark.parametrize("arg", ["L/14", "variant=B/32,runlocal=True"])
def test_paper_config_variants(arg):
  config = load("coco", arg)
  assert config.init.startswith("openai/clip-vit-")
  shapes = build.abstract_train_state(config)
  width = 1024 if arg == "L/14" else 768
  q = shapes["state"]["params"]["lora"]["vision"]["blocks"][0]["attn"]["q_proj"]
  assert q["lora_a"].shape == (width, 4)


def test_paper_settings():
  c = load("cc12m")
  assert (c.batch_size, c.optim.lr, c.optim.weight_decay, c.lora.rank) == (256, 1e-4, 0.01, 4)
  assert (c.optim.schedule, c.optim.clip_norm, c.loss.temperature) == ("cosine_restarts", 1.0, 0.07)


@pytest.mark.parametrize(
  "mutate, match",
  [
    (lambda c: c.lora.update({"rnak": 4}), r"config\.lora\.rnak"),
    (lambda c: c.optim.update({"schedule": "linear"}), r"config\.optim\.schedule"),
    (lambda c: c.model.update({"variant": "X/1"}), r"config\.model\.variant"),
    (lambda c: c.update({"total_steps": 0}), r"config\.total_steps"),
  ],
)
def test_bad_config_names_the_key(mutate, match):
  config = load("tiny")
  mutate(config)
  with pytest.raises(ValueError, match=match):
    train.check(config)


def test_bad_mesh_and_batch():
  with pytest.raises(ValueError, match=r"config\.mesh"):
    sharding.make_mesh({"data": 3, "fsdp": -1})
  with pytest.raises(ValueError, match=r"config\.mesh"):
    sharding.make_mesh({"data": -1, "model": 2})
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  with pytest.raises(ValueError, match=r"config\.batch_size=12"):
    sharding.check_batch_size(12, mesh)


def test_bad_config_fails_before_compiling(tmp_path):
  config = load("tiny")
  config.batch_size = 12  # 8 devices
  with pytest.raises(ValueError, match=r"config\.batch_size=12"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_fsdp_size_rule():
  assert sharding.fsdp_spec((768, 3072), 2) == jax.P(None, "fsdp")
  assert sharding.fsdp_spec((768,), 2) == jax.P()
  assert sharding.fsdp_spec((1001, 1001), 2) == jax.P()
  assert sharding.fsdp_spec((768, 3072), 1) == jax.P()


@pytest.mark.parametrize("name", ["coco", "cc3m", "cc12m"])
def test_paper_configs_carry_the_whole_recipe(name):
  from gmail_jax.experiments import driver

  c = load(name)
  assert c.stages[-4:] == ("align", "evaluate", "caption", "export")
  assert set(c.evals) == {"coco5k", "flickr1k", "imagenet"}
  assert (c.evals.coco5k.split, c.evals.imagenet.classnames) == ("test", "imagenet")
  assert (c.caption.test.kind, c.caption.test.split) == ("karpathy", "test")
  # Every stage's own check runs; only the data (absent here) stops it, by name.
  with pytest.raises(ValueError, match=r"config\.\S+: /data/\S+ not found; (COCO|ImageNet|Flickr)"):
    driver.check(c)


def test_a_missing_dataset_is_one_line_before_anything_is_built(tmp_path):
  import subprocess
  import sys

  workdir = tmp_path / "run"
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "gmail_jax.main",
      "--config=configs/coco.py:B/16",
      f"--workdir={workdir}",
    ],
    cwd=CONFIGS.parent,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 1, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith(
    "error: InputError: config.generate.captions: /data/coco/dataset_coco.json"
  )
  assert "caption_datasets.zip" in last and "cocodataset.org" in last
  assert not workdir.exists()  # nothing was built or written
