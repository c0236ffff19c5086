"""gmail_jax.export: a trained run as a transformers CLIP directory and as a PEFT LoRA adapter.

Offline: tiny runs initialised from a random HF CLIP directory (tests/hf_tiny.py), one with LoRA on
attention + MLP and a trained projection, one from a random (scratch) teacher. transformers and
peft must load the exports and give the embeddings ``api.load_student`` gives (<= 1e-4) on COCO
photos and captions.
"""

import json
import os
import pathlib
import subprocess
import sys

import hf_tiny
import numpy as np
import PIL.Image
import pytest
from config_helpers import load_config

from gmail_jax import api
from gmail_jax.data import preprocess
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.export import exporter as export_lib
from gmail_jax.export import peft_adapter
from gmail_jax.training import train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
TOL = 1e-4
PHOTOS = 4


def _train(workdir: pathlib.Path, **changes) -> pathlib.Path:
  c = load_config("tiny")
  c.total_steps = c.checkpoint_every_steps = STEPS
  c.log_every_steps = 1
  c.async_checkpoints = False
  c.data.synthetic_size = 48
  c.optim.schedule = "constant"  # LoRA B must move off zero in a few steps
  for key, value in changes.items():
    group, _, name = key.rpartition(".")
    (c[group] if group else c)[name] = value
  train.train_and_evaluate(c, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
  return hf_tiny.save_tiny_hf_clip(tmp_path_factory.mktemp("teacher") / "clip", layers=1)


@pytest.fixture(scope="module")
def attn_run(hf_dir, tmp_path_factory) -> pathlib.Path:
  return _train(tmp_path_factory.mktemp("attn") / "run", init=str(hf_dir))


@pytest.fixture(scope="module")
def proj_run(hf_dir, tmp_path_factory) -> pathlib.Path:
  return _train(
    tmp_path_factory.mktemp("proj") / "run",
    init=str(hf_dir),
    **{"lora.targets": ("attn", "mlp"), "lora.train_proj": True},
  )


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory) -> pathlib.Path:
  return _train(
    tmp_path_factory.mktemp("scratch") / "run",
    **{"model.variant": "mu", "data.image_size": 16, "data.synthetic_image_size": 16},
  )


@pytest.fixture
def coco(shared):
  """(photos, captions): the first val2017 photos and captions of coco-mini."""
  root = shared("coco-mini")
  photos = [
    PIL.Image.open(p).convert("RGB") for p in sorted((root / "val2017").glob("*.jpg"))[:PHOTOS]
  ]
  ann = json.loads((root / "annotations" / "captions_val2017.json").read_text())
  return photos, [a["caption"] for a in ann["annotations"][:PHOTOS]]


def _normed(x) -> np.ndarray:
  x = getattr(x, "pooler_output", x)  # transformers 5: a ModelOutput holding the projection
  x = x.detach().numpy()
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hf_embed(model, pixels: np.ndarray, ids: np.ndarray | None = None):
  """L2-normalised (image, text) features of a transformers CLIPModel (or a PeftModel on one)."""
  with torch.no_grad():
    px = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    img = _normed(model.get_image_features(pixel_values=px))
    if ids is None:
      return img, None
    txt = _normed(model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))))
  return img, txt


def _ids(path: pathlib.Path, captions: list[str]) -> np.ndarray:
  """Token ids from the CLIPTokenizer files in ``path`` (77 = the tiny models' context)."""
  tok = transformers.CLIPTokenizer.from_pretrained(str(path))
  return np.asarray(
    tok(captions, padding="max_length", max_length=77, truncation=True)["input_ids"]
  )


def _close(name: str, got: np.ndarray, want: np.ndarray) -> float:
  diff = float(np.abs(got - want).max())
  print(f"{name}: max abs diff {diff:.3g}")
  assert diff <= TOL, f"{name}: {diff}"
  return diff


def _load_clip(path) -> object:
  model, info = transformers.CLIPModel.from_pretrained(str(path), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def _peft_model(out: pathlib.Path):
  cfg = json.loads((out / peft_adapter.PEFT_CONFIG).read_text())
  base = _load_clip(cfg["base_model_name_or_path"])
  return peft.PeftModel.from_pretrained(base, str(out)).eval(), cfg


@pytest.mark.parametrize("run_name", ["attn_run", "proj_run"])
def test_hf_export_equals_the_student(run_name, request, hf_dir, coco, tmp_path):
  workdir = request.getfixturevalue(run_name)
  photos, captions = coco
  out = pathlib.Path(export_lib.export(workdir, tmp_path / "hf", format="hf"))
  assert (out / "vocab.json").exists() and (out / "preprocessor_config.json").exists()
  pixels = preprocess.preprocess(photos, 32)
  student = api.load_student(workdir)
  img, txt = _hf_embed(_load_clip(out), pixels, _ids(out, captions))
  _close(f"{run_name} hf image", img, student.encode_images(pixels))
  _close(f"{run_name} hf text", txt, student.encode_texts(captions))
  # Not vacuous: training moved the student's images away from the teacher's.
  teacher_img, _ = _hf_embed(_load_clip(hf_dir), pixels)
  assert np.abs(img - teacher_img).max() > 1e-3


def test_teacher_hf_export_equals_the_base_directory(attn_run, hf_dir, coco, tmp_path):
  photos, captions = coco
  out = pathlib.Path(export_lib.export(attn_run, tmp_path / "t", format="hf", which="teacher"))
  pixels = preprocess.preprocess(photos, 32)
  ids = _ids(hf_dir, captions)
  np.testing.assert_array_equal(_ids(out, captions), ids)
  img, txt = _hf_embed(_load_clip(out), pixels, ids)
  ref_img, ref_txt = _hf_embed(_load_clip(hf_dir), pixels, ids)
  _close("teacher hf image", img, ref_img)
  _close("teacher hf text", txt, ref_txt)


def test_peft_adapter_attn(attn_run, hf_dir, coco, tmp_path):
  photos, _ = coco
  out = pathlib.Path(export_lib.export(attn_run, tmp_path / "peft", format="peft"))
  assert sorted(p.name for p in out.iterdir()) == [
    peft_adapter.PEFT_CONFIG,
    peft_adapter.PEFT_WEIGHTS,
  ]
  model, cfg = _peft_model(out)
  assert cfg["base_model_name_or_path"] == str(hf_dir)
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 4.0 and cfg["modules_to_save"] is None
  attn = "vision_model.encoder.layers.0.self_attn"
  assert sorted(cfg["target_modules"]) == [
    f"{attn}.{p}" for p in ("k_proj", "out_proj", "q_proj", "v_proj")
  ]
  pixels = preprocess.preprocess(photos, 32)
  img, _ = _hf_embed(model, pixels)
  _close("attn peft image", img, api.load_student(attn_run).encode_images(pixels))


def test_peft_adapter_mlp_and_projection(proj_run, hf_dir, coco, tmp_path):
  from safetensors.numpy import load_file

  photos, _ = coco
  out = pathlib.Path(export_lib.export(proj_run, tmp_path / "peft", format="peft"))
  model, cfg = _peft_model(out)
  assert cfg["modules_to_save"] == ["visual_projection"]
  assert {t.rsplit(".", 1)[1] for t in cfg["target_modules"]} == {
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
  }
  tensors = load_file(str(out / peft_adapter.PEFT_WEIGHTS))
  fc1 = "base_model.model.vision_model.encoder.layers.0.mlp.fc1"
  assert tensors[f"{fc1}.lora_A.weight"].shape == (4, 32)  # (r, in)
  assert tensors[f"{fc1}.lora_B.weight"].shape == (64, 4)  # (out, r)
  # PEFT's own name for a modules_to_save copy: the plain key, no 'modules_to_save.default'.
  proj = tensors["base_model.model.visual_projection.weight"]
  teacher_proj = _load_clip(hf_dir).visual_projection.weight.detach().numpy()
  assert proj.shape == teacher_proj.shape and not np.allclose(proj, teacher_proj)
  loaded = model.base_model.model.visual_projection
  assert isinstance(loaded, peft.utils.ModulesToSaveWrapper)
  np.testing.assert_array_equal(loaded.modules_to_save["default"].weight.detach().numpy(), proj)
  pixels = preprocess.preprocess(photos, 32)
  img, _ = _hf_embed(model, pixels)
  _close("attn+mlp+proj peft image", img, api.load_student(proj_run).encode_images(pixels))


def test_peft_adapter_of_a_random_teacher_ships_the_base(scratch_run, coco, tmp_path):
  photos, _ = coco
  out = tmp_path / "peft"
  export_lib.export(scratch_run, out, format="peft")
  model, cfg = _peft_model(out)
  assert cfg["base_model_name_or_path"] == str(out / export_lib.BASE_DIR)
  pixels = preprocess.preprocess(photos, 16)
  img, _ = _hf_embed(model, pixels)
  _close("scratch peft image", img, api.load_student(scratch_run).encode_images(pixels))
  # --force replaces the whole directory (a stale file goes with it).
  (out / "stale.txt").write_text("x")
  with pytest.raises(InputError, match="not empty"):
    export_lib.export(scratch_run, out, format="peft")
  export_lib.export(scratch_run, out, format="peft", force=True)
  assert not (out / "stale.txt").exists() and (out / export_lib.BASE_DIR).is_dir()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _one_line(excinfo) -> str:
  text = str(excinfo.value)
  assert "\n" not in text
  return text


def test_refusals_are_one_line(attn_run, tmp_path):
  with pytest.raises(ConfigError, match=r"--format: unknown 'onnx'") as e:
    export_lib.export(attn_run, tmp_path / "o", format="onnx")
  _one_line(e)
  with pytest.raises(ConfigError, match=r"--which=teacher") as e:
    export_lib.export(attn_run, tmp_path / "o", format="peft", which="teacher")
  _one_line(e)
  with pytest.raises(InputError, match="not a training run") as e:
    export_lib.export(tmp_path, tmp_path / "o", format="hf")
  _one_line(e)
  empty = tmp_path / "empty_run"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "config.json").write_text((attn_run / "config.json").read_text())
  with pytest.raises(InputError, match="no checkpoint") as e:
    export_lib.export(empty, tmp_path / "o", format="hf")
  _one_line(e)
  with pytest.raises(InputError, match=r"--step=99: no such checkpoint") as e:
    export_lib.export(attn_run, tmp_path / "o", format="hf", step=99)
  _one_line(e)
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  with pytest.raises(InputError, match="exists and is not empty") as e:
    export_lib.export(attn_run, full, format="hf")
  _one_line(e)
  assert [p.name for p in full.iterdir()] == ["keep.txt"]
  with pytest.raises(InputError, match="would replace the run") as e:
    export_lib.export(attn_run, attn_run.parent, format="hf", force=True)
  _one_line(e)
  assert not (tmp_path / "o").exists()


def test_cli_refusal_exits_1_with_one_error_line(attn_run, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "GMAIL_TRACEBACK"}
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  cmd = [
    sys.executable,
    "-m",
    "gmail_jax.export",
    f"--workdir={attn_run}",
    "--format=onnx",
    f"--out={tmp_path / 'o'}",
  ]
  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 1, res.stderr[-2000:]
  errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
  assert errors == [res.stderr.strip().splitlines()[-1]], res.stderr[-2000:]
  assert errors[0].startswith("error: ConfigError: --format: unknown 'onnx'")
  assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()
