"""CIFAKE reproduction (configs/cifake.py:smoke) on the shared sample: no image both trains and
evaluates, and the same seed gives the same report.json."""

import json
import math
import zipfile

import pytest
from test_quickstart import ROOT, report_fields, run_main


@pytest.mark.slow
def test_cifake_smoke_is_reproducible_and_leak_free(shared, tmp_path):
  data = shared("cifake-sd14-test-sample")
  zip_path = shared("cifar10-test-jpeg", "cifar10_test_jpeg.zip")
  flags = (f"--config.data.root={data}", f"--config.teacher_pretrain.path={zip_path}")
  a = run_main("configs/cifake.py:smoke", tmp_path / "a", *flags)
  run_main("configs/cifake.py:smoke", tmp_path / "b", *flags)
  # Same seed -> byte-identical report.json.
  first, second = ((tmp_path / d / "report.json").read_bytes() for d in ("a", "b"))
  assert first == second
  for stage in ("before", "after"):
    for key in report_fields():
      assert math.isfinite(a[stage][key]), (stage, key)
  syn = a["baselines"]["synthetic_finetune"]
  assert all(math.isfinite(syn[k]) for k in report_fields())
  # The "as if real" baseline trains exactly GMAIL's adapters (same targets, same budget).
  assert syn["lora_targets"] == a["after"]["lora_targets"] and len(syn["lora_targets"]) == 2
  assert syn["trainable_params"] == a["after"]["trainable_params"] > 0
  assert a["counts"] == {"train_gen": 300, "train_real": 300, "test_gen": 100, "test_real": 100}

  # Held-out test images are not in the alignment view, and the teacher's pretraining images
  # (the CIFAR-10 zip) exclude every CIFAKE real image.
  wd = tmp_path / "a"
  train = {(p.parent.name, p.name) for p in (wd / "data" / "train" / "real").rglob("*.jpg")}
  test = {(p.parent.name, p.name) for p in (wd / "data" / "test" / "real").rglob("*.jpg")}
  assert len(test) == 100 and not train & test
  from gmail_jax.experiments.stages.teacher import list_class_folder, zip_class_members

  sample = {(c, p.name) for p, c in zip(*list_class_folder(data / "real"), strict=True)}
  with zipfile.ZipFile(zip_path) as zf:
    names = {tuple(n.split("/")[1:]) for n in zf.namelist() if n.endswith(".jpg")}
    kept = zip_class_members(zf, exclude=sample)
  assert sample <= names  # the exclusion keys really name zip members
  kept = {(c, n.split("/")[-1]) for n, c in kept}
  assert len(kept) == len(names) - len(sample) and not kept & sample
  info = json.loads((wd / "teacher" / "info.json").read_text())
  assert info["images"] == 400  # smoke: max_per_class=40 of the non-sample photos
  assert ROOT.joinpath("configs", "cifake.py").exists()
