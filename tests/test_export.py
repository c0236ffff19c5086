"""gmail_jax.export: a trained run as a transformers CLIP directory and as a PEFT LoRA adapter.

Offline: tiny runs initialised from a random HF CLIP directory (tests/hf_tiny.py), one with LoRA on
attention + MLP and a trained projection, one from a random (scratch) teacher, one whose teacher
is Long-CLIP-stretched, one that learns its image-text temperature (TPC-CMA). transformers and
peft must load the exports and give the embeddings ``api.load_student`` gives (<= 1e-4) on COCO
photos and captions, and the logits the run trained (its temperature).
"""

import json
import os
import pathlib
import subprocess
import sys

import hf_tiny
import jax
import numpy as np
import PIL.Image
import pytest
from config_helpers import load_config

from gmail_jax import api, objectives
from gmail_jax import run as run_lib
from gmail_jax.data import preprocess
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.export import exporter as export_lib
from gmail_jax.export import peft_adapter
from gmail_jax.training import sharding as shd
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


@pytest.fixture(scope="module")
def short_hf_dir(tmp_path_factory) -> pathlib.Path:
  """A teacher with a 24-token text context: Long-CLIP stretching needs more than 21."""
  path = tmp_path_factory.mktemp("short") / "clip"
  return hf_tiny.save_tiny_hf_clip(path, layers=1, text={"max_position_embeddings": 24})


@pytest.fixture(scope="module")
def stretched_run(short_hf_dir, tmp_path_factory) -> pathlib.Path:
  return _train(
    tmp_path_factory.mktemp("stretched") / "run",
    init=str(short_hf_dir),
    **{"model.text_context": 28, "lora.targets": ("attn", "mlp")},
  )


@pytest.fixture(scope="module")
def temperature_run(hf_dir, tmp_path_factory) -> pathlib.Path:
  """TPC-CMA image-text alignment that learns its temperature (from the teacher's logit scale)."""
  return _train(
    tmp_path_factory.mktemp("temperature") / "run",
    init=str(hf_dir),
    **{
      "loss.mode": "tpc_cma",
      "cma.pairs": "image_text",
      "loss.learn_temperature": True,
      "optim.lr": 1e-2,  # the scale must move well past the tolerance in 3 steps
    },
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


def _hf_logits(model, pixels: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """``logits_per_image`` of a transformers model (or a PeftModel on one)."""
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids.astype(np.int64)),
      pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))),
    )
  return out.logits_per_image.detach().numpy()


def _our_logits(student, pixels: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """``logits_per_image`` of the student model itself (models/clip.py DualEncoder.__call__)."""
  logits, _ = student.model(pixels, ids)
  return np.asarray(jax.device_get(logits))


def _one_device_run(workdir) -> run_lib.Run:
  mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])
  return run_lib.load_run(workdir, mesh=mesh)


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
@pytest.mark.slow
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


@pytest.mark.slow
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


def _long_captions(captions: list[str]) -> list[str]:
  """Captions past the 28-token context (three COCO captions each): the EOT pools at the last,
  stretched position, so the text embedding depends on the interpolated rows."""
  return [" ".join(captions[i : i + 3]) for i in range(len(captions) - 2)]


@pytest.mark.slow
def test_peft_adapter_of_a_stretched_teacher_ships_the_base(
  stretched_run, short_hf_dir, coco, tmp_path
):
  """model.text_context stretches config.init's 24 positions to 28 (Long-CLIP): the adapter must
  load onto that teacher, not onto config.init's."""
  photos, captions = coco
  texts = _long_captions(captions)
  student = api.load_student(stretched_run)
  ids = student.tokenize(texts)
  assert ids.shape[1] == 28 and (ids[:, -1] == student.tokenizer.eot_id).all()
  out = tmp_path / "peft"
  export_lib.export(stretched_run, out, format="peft")
  model, cfg = _peft_model(out)
  pixels = preprocess.preprocess(photos, 32)
  img, txt = _hf_embed(model, pixels, ids)
  _close("stretched peft image", img, student.encode_images(pixels))
  _close("stretched peft text", txt, student.encode_texts(texts))
  assert cfg["base_model_name_or_path"] == str(out / export_lib.BASE_DIR)
  # Not vacuous: config.init's own text tower cannot read these ids at all.
  assert _load_clip(short_hf_dir).config.text_config.max_position_embeddings == 24


def _close_logits(name: str, got: np.ndarray, want: np.ndarray, scale: float) -> float:
  """Logits agree to TOL in cosine units (the embeddings' tolerance times the scale)."""
  return _close(name, got / scale, want / scale)


@pytest.mark.slow
def test_learned_temperature_is_the_exported_logit_scale(temperature_run, hf_dir, coco, tmp_path):
  """TPC-CMA image-text alignment trains the student's image-text logits at its learned τ:
  both exports' logits_per_image are cos / τ, not the teacher's scale."""
  photos, captions = coco
  pixels = preprocess.preprocess(photos, 32)
  run = _one_device_run(temperature_run)
  teacher_scale = float(np.exp(np.asarray(jax.device_get(run.teacher.logit_scale[...]))))
  tau = objectives.trained_temperature(run.config, run.state["params"], teacher_scale)
  print(f"teacher scale {teacher_scale:.4f}, trained 1/tau {1 / tau:.4f}")
  assert abs(1 / tau - teacher_scale) > 0.01 * teacher_scale  # the temperature did train
  # The student's head and the adapter's base are copies: the run's teacher keeps its own head.
  base_head = float(np.asarray(jax.device_get(export_lib.base_model(run).logit_scale[...])))
  assert base_head == float(np.asarray(jax.device_get(run.student.logit_scale[...])))
  assert teacher_scale == pytest.approx(np.exp(_load_clip(hf_dir).logit_scale.item()), rel=1e-6)
  student = api.load_student(temperature_run)
  ids = student.tokenize(captions)
  want = student.encode_images(pixels) @ student.encode_texts(captions).T / tau
  _close_logits("student logits", _our_logits(student, pixels, ids), want, 1 / tau)
  out = pathlib.Path(export_lib.export(temperature_run, tmp_path / "hf", format="hf"))
  _close_logits("hf logits", _hf_logits(_load_clip(out), pixels, ids), want, 1 / tau)
  adapter = tmp_path / "peft"
  export_lib.export(temperature_run, adapter, format="peft")
  model, cfg = _peft_model(adapter)
  # The adapter cannot hold a bare logit_scale: the base beside it carries the trained one.
  assert cfg["base_model_name_or_path"] == str(adapter / export_lib.BASE_DIR)
  _close_logits("peft logits", _hf_logits(model, pixels, ids), want, 1 / tau)


def test_trained_logit_head_by_objective():
  """Which runs replace the teacher's logit_scale / logit_bias in their exports (module doc)."""
  learned = {"log_scale": np.float32(np.log(20.0)), "text_bias": np.float32(-3.0)}

  def head(params, **changes) -> dict[str, float]:
    c = load_config("tiny")
    for key, value in changes.items():
      group, _, name = key.rpartition(".")
      c[group][name] = value
    return {k: float(v) for k, v in objectives.trained_logit_head(c, params).items()}

  # GMAIL: its τ aligns generated with real images; only a sigmoid text term's bias is a head.
  assert head({"log_scale": learned["log_scale"]}) == {}
  assert head(learned) == {"logit_bias": -3.0}
  image_text = {"loss.mode": "tpc_cma", "cma.pairs": "image_text"}
  assert head({"log_scale": learned["log_scale"]}, **image_text) == {
    "logit_scale": pytest.approx(np.log(20.0))
  }
  # Clamped at 1/τ = 100, as training's temperature_of clamps it.
  assert head({"log_scale": np.float32(7.0)}, **image_text) == {
    "logit_scale": pytest.approx(np.log(100.0))
  }
  assert head({}, **image_text) == {}  # 'auto': the teacher's own scale, not learned
  fixed = {**image_text, "loss.temperature_from": "config", "loss.temperature": 0.05}
  assert head({}, **fixed) == {"logit_scale": pytest.approx(np.log(20.0))}
  gen_real = {"loss.mode": "tpc_cma", "cma.pairs": "gen_real"}
  assert head({"log_scale": learned["log_scale"]}, **gen_real) == {}


def test_gmail_run_keeps_the_teachers_logit_scale(attn_run, hf_dir, coco, tmp_path):
  """GMAIL's τ is the generated-real alignment's, not an image-text scale: the exported
  logit_scale stays the teacher's (and the adapter's base stays config.init)."""
  photos, captions = coco
  pixels = preprocess.preprocess(photos, 32)
  student = api.load_student(attn_run)
  ids = student.tokenize(captions)
  out = pathlib.Path(export_lib.export(attn_run, tmp_path / "hf", format="hf"))
  model, teacher = _load_clip(out), _load_clip(hf_dir)
  assert model.logit_scale.item() == teacher.logit_scale.item()
  scale = float(np.exp(teacher.logit_scale.item()))
  _close_logits(
    "gmail hf logits", _hf_logits(model, pixels, ids), _our_logits(student, pixels, ids), scale
  )


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


def _files(root: str | pathlib.Path, tmp: pathlib.Path) -> dict[str, bytes]:
  """{relative path: bytes} of the files under ``root`` (a folder, or a bucket URL: copied to
  ``tmp`` first)."""
  from gmail_jax import storage

  if storage.is_remote(root):
    storage.download_tree(root, tmp)
    root = tmp
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_export_from_a_bucket_workdir_equals_the_local_export(attn_run, gcs_dir, tmp_path):
  """The run in a bucket exports, to a local folder and to the bucket, the bytes its local copy
  exports (hf and peft); a non-empty bucket OUT is refused in one line, and --force replaces it."""
  from gmail_jax import storage

  run_dir = f"{gcs_dir}/run"
  storage.upload_tree(attn_run / "checkpoints", f"{run_dir}/checkpoints")
  storage.write_bytes(f"{run_dir}/config.json", (attn_run / "config.json").read_bytes())
  local, remote = export_lib.load(attn_run), export_lib.load(run_dir)
  assert remote.workdir == run_dir
  for fmt in export_lib.FORMATS:
    want = _files(export_lib.write(local, tmp_path / "ref" / fmt, format=fmt), tmp_path)
    assert want and (fmt != "peft" or "base" not in {k.split("/")[0] for k in want})
    got = export_lib.write(remote, tmp_path / "local" / fmt, format=fmt)
    assert _files(got, tmp_path) == want, fmt
    out = export_lib.write(remote, f"{gcs_dir}/out/{fmt}", format=fmt)
    assert out == f"{gcs_dir}/out/{fmt}"
    assert _files(out, tmp_path / "dl" / fmt) == want, fmt
  # export(): refused before loading (one line), then --force replaces every object of OUT.
  out = f"{gcs_dir}/out/hf"
  storage.write_text(f"{out}/stray/old.txt", "from an earlier export")
  with pytest.raises(InputError, match="exists and is not empty") as e:
    export_lib.export(run_dir, out, format="hf")
  _one_line(e)
  with pytest.raises(InputError, match="would replace the run") as e:
    export_lib.export(run_dir, gcs_dir, format="hf", force=True)
  _one_line(e)
  assert export_lib.export(run_dir, out, format="hf", force=True) == out
  assert _files(out, tmp_path / "forced") == _files(tmp_path / "ref" / "hf", tmp_path)
