"""More towers: OpenAI / OpenCLIP checkpoints (models/openai_ckpt.py) against openai-clip's own
reference model, and a tiny GMAIL run from such a checkpoint."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import PIL.Image
import pytest
from conftest import shared_path

from gmail_jax import api
from gmail_jax.data import preprocess
from gmail_jax.models import openai_ckpt
from gmail_jax.models.convert import CheckpointError
from gmail_jax.models.tokenizer import Tokenizer

torch = pytest.importorskip("torch")


def _photo_dir() -> pathlib.Path:
  return shared_path("coco-mini", "val2017")


def _photos(n: int = 4) -> list[PIL.Image.Image]:
  return [PIL.Image.open(p).convert("RGB") for p in sorted(_photo_dir().glob("*.jpg"))[:n]]


def _captions(n: int | None = 6) -> list[str]:
  """The first ``n`` COCO val2017 captions (None: all 25,014)."""
  path = shared_path("coco-captions-val2017", "captions_val2017.json")
  anns = json.loads(path.read_text())["annotations"]
  return [a["caption"] for a in anns[:n]]


def _openai_model_module():
  """``clip/model.py`` of the openai-clip package (importing ``clip`` itself needs more)."""
  spec = importlib.util.find_spec("clip")
  if spec is None:
    pytest.skip("openai-clip not installed")
  path = os.path.join(spec.submodule_search_locations[0], "model.py")
  mod_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module


def _openai_clip(seed: int = 0):
  """A random OpenAI ViT CLIP, small widths (64-wide heads as OpenAI's build_model assumes)."""
  module = _openai_model_module()
  torch.manual_seed(seed)
  model = module.CLIP(
    embed_dim=32,
    image_resolution=32,
    vision_layers=2,
    vision_width=128,
    vision_patch_size=8,
    context_length=77,
    vocab_size=49408,
    transformer_width=128,
    transformer_heads=2,
    transformer_layers=2,
  ).eval()
  with torch.no_grad():  # non-zero everywhere, so every mapping (incl. biases) is exercised
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
    model.logit_scale.fill_(3.3)
  return model


def _reference(model, pixels_nhwc: np.ndarray, ids: np.ndarray):
  """OpenAI's encode_image / encode_text, L2-normalised. Ids padded with 0 after the EOT, as
  OpenAI's tokenizer does (ours pads with EOT; the causal mask makes it irrelevant)."""
  ids = ids.copy()
  for row in ids:
    row[int(np.argmax(row == 49407)) + 1 :] = 0
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy()))
    txt = model.encode_text(torch.from_numpy(ids.astype(np.int64)))
  img, txt = img.numpy(), txt.numpy()
  return (
    img / np.linalg.norm(img, axis=-1, keepdims=True),
    txt / np.linalg.norm(txt, axis=-1, keepdims=True),
  )


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
  """(model, {"state_dict": path, "torchscript": path, "openclip": path})."""
  model = _openai_clip()
  out = tmp_path_factory.mktemp("openai")
  paths = {"state_dict": out / "sd.pt", "torchscript": out / "jit.pt", "openclip": out / "oc.pt"}
  torch.save(model.state_dict(), paths["state_dict"])
  traced = torch.jit.trace_module(
    model,
    {
      "encode_image": torch.zeros(1, 3, 32, 32),
      "encode_text": torch.zeros(1, 77, dtype=torch.int64),
    },
  )
  traced.save(str(paths["torchscript"]))
  # An OpenCLIP training checkpoint: wrapped, DDP-prefixed.
  wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
  torch.save({"epoch": 3, "state_dict": wrapped}, paths["openclip"])
  return model, paths


@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "openclip"])
def test_openai_checkpoint_matches_reference(openai_files, kind):
  model, paths = openai_files
  photos, captions = _photos(), _captions()
  captions.append("a much longer caption that keeps going " * 12)  # truncated at 77
  enc = api.load_clip(paths[kind], batch_size=4)
  cfg = enc.model.config
  assert (cfg.vision.width, cfg.vision.heads, cfg.vision.layers, cfg.vision.patch_size) == (
    128,
    2,
    2,
    8,
  )
  assert (cfg.text.width, cfg.text.heads, cfg.text.context_length, cfg.embed_dim) == (
    128,
    2,
    77,
    32,
  )
  assert cfg.vision.act == cfg.text.act == "quick_gelu"
  np.testing.assert_allclose(float(enc.model.logit_scale[...]), 3.3, rtol=1e-6)
  pixels = np.stack([preprocess.resize_center_crop(p, 32) for p in photos])
  pixels = np.asarray(preprocess.normalize(pixels), np.float32)
  ids = Tokenizer(None)(captions)
  want_img, want_txt = _reference(model, pixels, ids)
  got_img, got_txt = enc.encode_images(pixels), enc.encode_texts(captions)
  err_img, err_txt = np.abs(got_img - want_img).max(), np.abs(got_txt - want_txt).max()
  assert err_img <= 1e-4 and err_txt <= 1e-4, (err_img, err_txt)
  # PIL photos through the api's own preprocessing give the same pixels.
  np.testing.assert_allclose(enc.encode_images(photos), got_img, atol=1e-6)


def test_torchscript_archive_is_read_without_running_it(openai_files, monkeypatch):
  model, paths = openai_files

  def refuse(*a, **k):
    raise AssertionError("torch.jit.load must not be used")

  monkeypatch.setattr(torch.jit, "load", refuse)
  monkeypatch.setattr(torch, "load", refuse)
  sd = openai_ckpt.read_checkpoint(str(paths["torchscript"]))
  want = model.state_dict()
  assert set(want) <= set(sd)
  assert set(sd) - set(want) <= {"transformer.resblocks.0.attn_mask"} | {
    f"transformer.resblocks.{i}.attn_mask" for i in range(2)
  }
  for k, v in want.items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_torchscript_refuses_unknown_globals(tmp_path):
  import pickle
  import zipfile

  class Evil:
    def __reduce__(self):
      return (os.system, ("true",))

  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    zf.writestr("evil/code/__torch__/m.py", "")
  with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|os)\.system"):
    openai_ckpt.read_checkpoint(str(path))


def test_openclip_name_sets_activation_and_heads(openai_files):
  _, paths = openai_files
  model = openai_ckpt.load_pretrained(str(paths["state_dict"]), model_name="ViT-B-32")
  assert model.config.vision.act == model.config.text.act == "gelu"
  model = openai_ckpt.load_pretrained(str(paths["state_dict"]), model_name="ViT-B-8-quickgelu")
  assert model.config.vision.act == "quick_gelu"
  assert openai_ckpt.parse_model_name("ViT-H-14") == ("gelu", 80)
  assert openai_ckpt.parse_model_name("ViT-bigG-14") == ("gelu", 104)
  with pytest.raises(CheckpointError, match="expected an OpenCLIP ViT name"):
    openai_ckpt.parse_model_name("RN50")


def test_openclip_hub_directory(openai_files, tmp_path):
  from safetensors.torch import save_file

  model, _ = openai_files
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(sd, tmp_path / "open_clip_model.safetensors")
  cfg = {"model_cfg": {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {"head_width": 64}}}
  (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
  enc = api.load_clip(tmp_path)
  assert enc.model.config.vision.act == "quick_gelu" and enc.model.config.vision.heads == 2
  captions = _captions(3)
  ids = Tokenizer(None)(captions)
  _, want = _reference(model, np.zeros((1, 32, 32, 3), np.float32), ids)
  assert np.abs(enc.encode_texts(captions) - want).max() <= 1e-4


def test_unknown_layout_names_first_unmapped_key(openai_files, tmp_path):
  model, _ = openai_files
  sd = dict(model.state_dict())
  sd["visual.attn_pool.query"] = torch.zeros(4, 128)
  path = tmp_path / "extra.pt"
  torch.save(sd, path)
  with pytest.raises(CheckpointError) as info:
    api.load_clip(path)
  assert str(info.value) == (
    f"{path}: unmapped key 'visual.attn_pool.query' (not an OpenAI / OpenCLIP ViT CLIP)"
  )
  assert "\n" not in str(info.value)
  # A ResNet CLIP: no ViT patch embedding.
  torch.save({"visual.layer1.0.conv1.weight": torch.zeros(2, 2, 1, 1)}, path)
  with pytest.raises(CheckpointError, match=r"missing key 'visual.conv1.weight'.*visual.layer1"):
    api.load_clip(path)
  torch.save({"a": 1}, path)
  with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
    api.load_clip(path)


def _tiny_train(workdir, **overrides):
  from config_helpers import load_config

  from gmail_jax.training import train

  config = load_config("tiny")
  config.total_steps, config.checkpoint_every_steps, config.log_every_steps = 4, 2, 2
  config.async_checkpoints = False
  for key, value in overrides.items():
    group, _, name = key.rpartition(".")
    (config[group] if group else config)[name] = value
  return train.train_and_evaluate(config, str(workdir))


def _assert_trained_and_resumed(workdir, first: int, last: int, run):
  from gmail_jax.training import checkpointing

  run(total_steps=first)
  assert checkpointing.saved_steps(str(workdir))[-1] == first
  run(total_steps=last)
  assert checkpointing.saved_steps(str(workdir))[-1] == last
  history = [json.loads(line) for line in open(workdir / "config_history.jsonl")]
  assert [h["resumed_from"] for h in history] == [None, first]


@pytest.mark.slow
def test_tiny_run_from_openai_checkpoint_trains_and_resumes(openai_files, tmp_path):
  _, paths = openai_files
  workdir = tmp_path / "run"

  def run(**kw):
    return _tiny_train(workdir, init=str(paths["torchscript"]), batch_size=8, **kw)

  _assert_trained_and_resumed(workdir, 4, 6, run)
  student = api.load_clip(workdir)
  assert student.model.config.text.act == "quick_gelu"
  assert student.encode_texts(["a cat"]).shape == (1, 32)


def _one_device_run(workdir):
  import jax

  from gmail_jax import run as run_lib
  from gmail_jax.training import sharding as shd

  mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])
  return run_lib.load_run(workdir, mesh=mesh)


def _check_logits(name, model, pixels, ids, want_img, want_txt, want_logits, scale):
  """A transformers CLIPModel / SiglipModel (or a PeftModel on one) embeds like ``want_*`` (<= 1e-4)
  and its logits_per_image are ``want_logits`` (<= 1e-4 in cosine units: times ``scale``)."""
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids.astype(np.int64)),
      pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))),
    )
  img, txt = (
    o.numpy() / np.linalg.norm(o.numpy(), axis=-1, keepdims=True)
    for o in (out.image_embeds, out.text_embeds)
  )
  err = float(max(np.abs(img - want_img).max(), np.abs(txt - want_txt).max()))
  logit_err = float(np.abs(out.logits_per_image.numpy() - want_logits).max()) / scale
  print(f"{name}: embeddings {err:.3g}, logits {logit_err:.3g} (cosine units)")
  assert err <= 1e-4 and logit_err <= 1e-4, (name, err, logit_err)


def _student_logits(student, pixels, ids) -> np.ndarray:
  logits, _ = student.model(pixels, ids)
  return np.asarray(logits)


@pytest.mark.slow
def test_openai_checkpoint_run_exports_to_transformers(openai_files, tmp_path):
  """A run from an OpenAI .pt: --format=hf needs no tokenizer files beside the .pt and loads in
  transformers; --format=peft ships the teacher as base/ (transformers cannot read a .pt)."""
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from gmail_jax.export import exporter as export
  from gmail_jax.export import peft_adapter

  _, paths = openai_files
  workdir = tmp_path / "run"
  init = str(paths["state_dict"])
  _tiny_train(workdir, init=init, batch_size=8, total_steps=2, **{"optim.schedule": "constant"})
  student = api.load_student(workdir)
  photos, captions = _photos(), _captions()
  pixels = preprocess.preprocess(photos, 32)
  ids = student.tokenize(captions)
  want = (
    student.encode_images(pixels),
    student.encode_texts(captions),
    _student_logits(student, pixels, ids),
    float(np.exp(np.asarray(student.model.logit_scale[...]))),
  )

  out = tmp_path / "hf"
  export.export(workdir, out, format="hf")
  tok = transformers.CLIPTokenizer.from_pretrained(str(out))
  hf_ids = tok(captions, padding="max_length", max_length=77, truncation=True)["input_ids"]
  np.testing.assert_array_equal(np.asarray(hf_ids), ids)
  _check_logits("hf", transformers.CLIPModel.from_pretrained(str(out)).eval(), pixels, ids, *want)

  adapter = tmp_path / "peft"
  export.export(workdir, adapter, format="peft")
  cfg = json.loads((adapter / peft_adapter.PEFT_CONFIG).read_text())
  assert cfg["base_model_name_or_path"] == str(adapter / export.BASE_DIR)
  base = transformers.CLIPModel.from_pretrained(cfg["base_model_name_or_path"]).eval()
  model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
  _check_logits("peft", model, pixels, ids, *want)


# ------------------------------------------------------------------------------------ Long-CLIP


def _longclip_reference(pos: torch.Tensor) -> torch.Tensor:
  """Long-CLIP's published stretching loop (model_longclip.py), verbatim in its arithmetic."""
  length, dim = pos.shape
  keep_len = 20
  new = torch.zeros([4 * length - 3 * keep_len, dim], dtype=pos.dtype)
  for i in range(keep_len):
    new[i] = pos[i]
  for i in range(length - 1 - keep_len):
    new[4 * i + keep_len] = pos[i + keep_len]
    new[4 * i + 1 + keep_len] = 3 * pos[i + keep_len] / 4 + 1 * pos[i + 1 + keep_len] / 4
    new[4 * i + 2 + keep_len] = 2 * pos[i + keep_len] / 4 + 2 * pos[i + 1 + keep_len] / 4
    new[4 * i + 3 + keep_len] = 1 * pos[i + keep_len] / 4 + 3 * pos[i + 1 + keep_len] / 4
  for j in range(4):
    new[4 * length - 3 * keep_len - 4 + j] = (
      pos[length - 1] + j * (pos[length - 1] - pos[length - 2]) / 4
    )
  return new


def _long_captions(n: int = 3) -> list[str]:
  """Real captions joined into texts of 80..240 tokens."""
  caps = _captions(8 * n)
  texts = [" ".join(caps[8 * i : 8 * i + 8]) for i in range(n)]
  lengths = [len(Tokenizer(None).encode(t)) for t in texts]
  assert all(77 < n_tok < 246 for n_tok in lengths), lengths
  return texts


def _hf_text_embeds(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
  out = getattr(out, "pooler_output", out).numpy()
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


def test_stretch_reproduces_longclip_formula():
  from gmail_jax.models import longclip

  pos = torch.randn(77, 48, generator=torch.Generator().manual_seed(0))
  got = longclip.stretch_positions(pos.numpy())
  want = _longclip_reference(pos).numpy()
  assert got.shape == (248, 48)
  np.testing.assert_array_equal(got, want)  # the same fp32 operations, bit for bit
  np.testing.assert_array_equal(got[:20], pos.numpy()[:20])
  np.testing.assert_array_equal(longclip.stretch_positions(pos.numpy(), 100), want[:100])
  with pytest.raises(ValueError, match="gives 78..248 positions"):
    longclip.stretch_positions(pos.numpy(), 249)


def test_longclip_hf_checkpoint_248_positions(tmp_path):
  import hf_tiny

  cfg = hf_tiny.tiny_clip_config(layers=2, text={"max_position_embeddings": 248})
  hf = hf_tiny.hf_clip(cfg, seed=1)
  hf.save_pretrained(tmp_path)
  hf_tiny.write_clip_tokenizer_files(tmp_path)
  enc = api.load_clip(tmp_path)
  assert enc.model.config.text.context_length == enc.tokenizer.context_length == 248
  texts = _long_captions()
  ids = enc.tokenize(texts)
  assert (ids == 49407).argmax(-1).min() > 77  # the EOT lies past the old context
  err = np.abs(enc.encode_texts(texts) - _hf_text_embeds(hf, ids)).max()
  assert err <= 1e-4, err


def test_text_context_stretches_a_77_token_checkpoint(tmp_path):
  import hf_tiny

  src = hf_tiny.save_tiny_hf_clip(tmp_path / "src", layers=2, seed=2)
  plain = api.load_clip(src)
  enc = api.load_clip(src, text_context=248)
  assert enc.model.config.text.context_length == enc.tokenizer.context_length == 248
  pos77 = np.asarray(plain.model.text.pos_embedding[...])
  pos248 = np.asarray(enc.model.text.pos_embedding[...])
  np.testing.assert_array_equal(pos248[:20], pos77[:20])
  np.testing.assert_array_equal(pos248, _longclip_reference(torch.from_numpy(pos77)).numpy())
  # The reference: the same HF model with Long-CLIP's table in a 248-position CLIPModel.
  cfg = hf_tiny.tiny_clip_config(layers=2, text={"max_position_embeddings": 248})
  hf = hf_tiny.hf_clip(cfg, seed=2)
  sd = hf_tiny.hf_clip(hf_tiny.tiny_clip_config(layers=2), seed=2).state_dict()
  key = "text_model.embeddings.position_embedding.weight"
  sd[key] = _longclip_reference(sd[key])
  hf.load_state_dict(sd)
  texts = _long_captions()
  err = np.abs(enc.encode_texts(texts) - _hf_text_embeds(hf, enc.tokenize(texts))).max()
  assert err <= 1e-4, err
  # Short texts still agree with the unstretched model up to the kept 20 positions.
  short = ["a cat"]
  np.testing.assert_allclose(enc.encode_texts(short), plain.encode_texts(short), atol=1e-5)


def test_longclip_own_checkpoint_two_position_tables(tmp_path):
  """longclip-B.pt layout: OpenAI keys at context 248 plus ``positional_embedding_res``; the model
  adds table 1 on the first 20 positions and table 2 on the rest."""
  module = _openai_model_module()
  torch.manual_seed(3)
  kw = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64)
  kw.update(vision_patch_size=8, context_length=248, vocab_size=49408)
  model = module.CLIP(**kw, transformer_width=64, transformer_heads=1, transformer_layers=2)
  model = model.eval()
  sd = dict(model.state_dict())
  res = 0.01 * torch.randn(248, 64)
  sd["positional_embedding_res"] = res
  torch.save(sd, tmp_path / "longclip-B.pt")
  with torch.no_grad():
    model.positional_embedding.copy_(torch.cat([sd["positional_embedding"][:20], res[20:]]))
  enc = api.load_clip(tmp_path / "longclip-B.pt")
  assert enc.model.config.text.context_length == enc.tokenizer.context_length == 248
  texts = _long_captions()
  _, want = _reference(model, np.zeros((1, 32, 32, 3), np.float32), enc.tokenize(texts))
  err = np.abs(enc.encode_texts(texts) - want).max()
  assert err <= 1e-4, err


@pytest.mark.slow
def test_tiny_run_stretched_to_248_trains_and_resumes(tmp_path):
  import hf_tiny

  from gmail_jax.errors import ConfigError

  src = hf_tiny.save_tiny_hf_clip(tmp_path / "src", layers=1)
  workdir = tmp_path / "run"

  def run(**kw):
    return _tiny_train(workdir, init=str(src), batch_size=8, **{"model.text_context": 248}, **kw)

  _assert_trained_and_resumed(workdir, 4, 6, run)
  student = api.load_clip(workdir)
  assert student.model.config.text.context_length == student.tokenizer.context_length == 248
  with pytest.raises(ConfigError, match=r"^config\.model\.text_context: stretches a pretrained"):
    _tiny_train(tmp_path / "scratch", **{"model.text_context": 248})


# --------------------------------------------------------------------------------------- SigLIP


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
  """A 1000-piece SentencePiece model trained on the COCO val2017 captions (SigLIP's ids:
  </s> = 1 = pad, <unk> = 2)."""
  import io

  spm = pytest.importorskip("sentencepiece")
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_captions(None)),
    model_writer=buf,
    vocab_size=1000,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    pad_piece="<pad>",
    minloglevel=2,
  )
  path = tmp_path_factory.mktemp("spiece") / "spiece.model"
  path.write_bytes(buf.getvalue())
  return path


@pytest.fixture(scope="module")
def siglip_dir(spiece, tmp_path_factory):
  """A random tiny transformers SiglipModel (non-zero biases, probe, logit bias) + spiece.model."""
  import shutil

  transformers = pytest.importorskip("transformers")
  tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
  cfg = transformers.SiglipConfig(
    text_config=dict(tower, vocab_size=1000, max_position_embeddings=16),
    vision_config=dict(tower, image_size=32, patch_size=8),
  )
  torch.manual_seed(0)
  model = transformers.SiglipModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("siglip")
  model.save_pretrained(path)
  shutil.copy(spiece, path / "spiece.model")
  return model, path


def test_siglip_tokenizer_matches_transformers_on_coco_captions(spiece):
  transformers = pytest.importorskip("transformers")
  from gmail_jax.models.siglip_tokenizer import SiglipTokenizer

  captions = _captions(None)
  assert len(captions) > 25_000
  for ctx in (16, 64):
    ours = SiglipTokenizer(spiece, context_length=ctx)(captions)
    hf = transformers.SiglipTokenizer(str(spiece), model_max_length=ctx)
    want = hf(captions, padding="max_length", truncation=True, max_length=ctx)["input_ids"]
    mismatched = int((ours != np.asarray(want)).any(axis=1).sum())
    assert mismatched == 0, f"{mismatched} of {len(captions)} captions differ at context {ctx}"


@pytest.mark.slow
def test_siglip_matches_transformers(siglip_dir, spiece):
  transformers = pytest.importorskip("transformers")
  hf, path = siglip_dir
  enc = api.load_clip(path, batch_size=4)
  assert type(enc.model).__name__ == "Siglip"
  assert (enc.mean, enc.std) == ((0.5,) * 3, (0.5,) * 3)
  photos, captions = _photos(), _captions()
  pixels = np.stack([preprocess.resize_center_crop(p, 32) for p in photos])
  pixels = np.asarray(preprocess.normalize(pixels, enc.mean, enc.std), np.float32)
  tok = transformers.SiglipTokenizer(str(spiece), model_max_length=16)
  ids = np.asarray(tok(captions, padding="max_length", truncation=True)["input_ids"])
  np.testing.assert_array_equal(enc.tokenize(captions), ids)
  with torch.no_grad():
    out = hf(
      input_ids=torch.from_numpy(ids),
      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
    )
  err_img = np.abs(enc.encode_images(pixels) - out.image_embeds.numpy()).max()
  err_txt = np.abs(enc.encode_texts(captions) - out.text_embeds.numpy()).max()
  assert err_img <= 1e-4 and err_txt <= 1e-4, (err_img, err_txt)
  import jax.numpy as jnp

  logits, _ = enc.model(jnp.asarray(pixels), jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), out.logits_per_image.numpy(), atol=1e-4)
  assert float(enc.model.logit_bias[...]) == pytest.approx(float(hf.logit_bias), abs=1e-6)


def test_siglip_tower_registered():
  from gmail_jax.models import lora, siglip, towers

  tower = towers.get("siglip")
  assert tower.preprocess.mean == tower.preprocess.std == (0.5, 0.5, 0.5)
  assert tower.lora_targets["attn"] == lora.ATTN_TARGETS
  cfg = tower.arch_config("tiny", text_context_length=8)
  assert cfg.text.context_length == 8
  from flax import nnx

  model = nnx.eval_shape(lambda: tower.make(cfg, rngs=nnx.Rngs(0)))
  assert isinstance(model, siglip.Siglip)
  got = lora.select_targets(model, tower.lora_targets["attn"])
  assert len(got) == 4 * cfg.vision.layers and all("/head/" not in p for p in got)


def test_sigmoid_loss_matches_transformers(siglip_dir):
  from gmail_jax.objectives import losses

  hf, _ = siglip_dir
  rng = np.random.default_rng(0)
  ids = torch.from_numpy(rng.integers(3, 1000, (5, 16)))
  pixels = torch.from_numpy(rng.normal(size=(5, 3, 32, 32)).astype(np.float32))
  with torch.no_grad():
    out = hf(input_ids=ids, pixel_values=pixels, return_loss=True)
  loss, _ = losses.sigmoid_loss(
    out.image_embeds.numpy(),
    out.text_embeds.numpy(),
    float(hf.logit_scale.exp()),
    float(hf.logit_bias),
  )
  assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)
  # Same-group off-diagonal pairs drop out of the sum.
  z = rng.normal(size=(4, 8)).astype(np.float32)
  masked, _ = losses.sigmoid_loss(z, z, 10.0, 5.0, group=np.array([0, 0, 1, 2]))
  full, _ = losses.sigmoid_loss(z, z, 10.0, 5.0)
  zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
  pair = 10.0 * float(zn[0] @ zn[1]) + 5.0
  dropped = 2 * np.log1p(np.exp(pair)) / 4  # -log sigmoid(-x), both orders, over B = 4
  assert float(full) - float(masked) == pytest.approx(dropped, rel=1e-4)


@pytest.mark.slow
def test_tiny_siglip_run_trains_and_resumes(siglip_dir, tmp_path):
  _, path = siglip_dir
  workdir = tmp_path / "run"
  kw = {"model.name": "siglip", "model.variant": "tiny"}
  kw.update({"loss.text_weight": 0.5, "loss.text_loss": "sigmoid"})  # SigLIP's own text term
  logged = []

  def run(**more):
    logged.append(_tiny_train(workdir, init=str(path), batch_size=8, **kw, **more))

  _assert_trained_and_resumed(workdir, 4, 6, run)
  text_losses = [v for k, v in logged[-1].items() if k.endswith("text_loss")]
  assert text_losses and all(np.isfinite(v) for v in text_losses), logged[-1]
  student = api.load_clip(workdir)
  assert type(student.model).__name__ == "Siglip" and student.tokenizer.context_length == 16
  assert student.encode_texts(["a cat on a mat"]).shape == (1, 32)


def test_siglip_squash_resize_matches_image_processor(siglip_dir):
  """Non-square photos: load_clip squashes like SiglipImageProcessor (PIL backend), no crop."""
  transformers = pytest.importorskip("transformers")
  hf, path = siglip_dir
  enc = api.load_clip(path, batch_size=4)
  assert enc.resize == "squash"
  photos = _photos()
  assert any(p.size[0] != p.size[1] for p in photos)
  proc = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
  pixels = proc(photos, return_tensors="np")["pixel_values"]  # NCHW
  ours = preprocess.preprocess(photos, 32, enc.mean, enc.std, mode="squash")
  np.testing.assert_allclose(ours, pixels.transpose(0, 2, 3, 1), atol=1e-6)
  assert not np.allclose(preprocess.preprocess(photos, 32, enc.mean, enc.std), ours, atol=1e-2)
  with torch.no_grad():
    out = hf.get_image_features(pixel_values=torch.from_numpy(pixels))
  want = getattr(out, "pooler_output", out).numpy()
  want = want / np.linalg.norm(want, axis=-1, keepdims=True)
  err = float(np.abs(enc.encode_images(photos) - want).max())
  assert err <= 1e-4, err
  with pytest.raises(ValueError, match="resize mode"):
    preprocess.resize(photos[0], 32, "bogus")


@pytest.mark.slow
def test_siglip_run_exports_to_transformers(siglip_dir, spiece, tmp_path):
  """A trained SigLIP run exported with --format=hf loads as transformers' SiglipModel (and its
  tokenizer / image processor) and embeds like load_student; --format=peft over the teacher too."""
  transformers = pytest.importorskip("transformers")
  from gmail_jax.export import exporter as export
  from gmail_jax.export import peft_adapter

  hf, path = siglip_dir
  workdir = tmp_path / "run"
  _tiny_train(workdir, init=str(path), batch_size=8, total_steps=4, **{"model.name": "siglip"})
  student = api.load_student(workdir)
  photos, captions = _photos(), _captions()
  want_img, want_txt = student.encode_images(photos), student.encode_texts(captions)
  with torch.no_grad():
    teacher_img = hf.get_image_features(
      pixel_values=torch.from_numpy(
        transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})(
          photos, return_tensors="np"
        )["pixel_values"]
      )
    )
  teacher_img = getattr(teacher_img, "pooler_output", teacher_img).numpy()
  teacher_img /= np.linalg.norm(teacher_img, axis=-1, keepdims=True)
  assert np.abs(want_img - teacher_img).max() > 1e-3  # LoRA trained: the student moved

  def embed(model, out):
    proc = transformers.SiglipImageProcessorPil.from_pretrained(str(out))
    tok = transformers.SiglipTokenizer.from_pretrained(str(out))
    ids = tok(captions, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    np.testing.assert_array_equal(ids.numpy(), student.tokenize(captions))
    pixels = proc(photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
      img, txt = model.get_image_features(pixel_values=pixels), model.get_text_features(ids)
    img, txt = (getattr(o, "pooler_output", o).numpy() for o in (img, txt))
    return (o / np.linalg.norm(o, axis=-1, keepdims=True) for o in (img, txt))

  out = tmp_path / "hf"
  export.export(workdir, out, format="hf")
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "siglip" and (out / "spiece.model").is_file()
  model = transformers.SiglipModel.from_pretrained(str(out)).eval()
  img, txt = embed(model, out)
  err = float(max(np.abs(img - want_img).max(), np.abs(txt - want_txt).max()))
  assert err <= 1e-4, err
  again = api.load_clip(out)  # our own importer reads the export back
  np.testing.assert_allclose(again.encode_images(photos), want_img, atol=1e-5)

  peft = pytest.importorskip("peft")
  adapter = tmp_path / "peft"
  export.export(workdir, adapter, format="peft")
  cfg = json.loads((adapter / peft_adapter.PEFT_CONFIG).read_text())
  assert cfg["base_model_name_or_path"] == str(path)
  assert all(
    t.startswith(("vision_model.encoder.", "text_model.encoder.")) for t in cfg["target_modules"]
  )
  base = transformers.SiglipModel.from_pretrained(str(path)).eval()
  merged = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
  img, txt = embed(merged, out)
  err = float(max(np.abs(img - want_img).max(), np.abs(txt - want_txt).max()))
  assert err <= 1e-4, err


@pytest.mark.slow
def test_siglip_learned_bias_is_exported(siglip_dir, tmp_path):
  """GMAIL's sigmoid text term (loss.text_loss='sigmoid') learns a bias: both exports' logits are
  exp(teacher logit_scale) * cos + that bias, the logits the term trained."""
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from gmail_jax.export import exporter as export
  from gmail_jax.export import peft_adapter

  hf, path = siglip_dir
  workdir = tmp_path / "run"
  kw = {"model.name": "siglip", "loss.text_weight": 0.5, "loss.text_loss": "sigmoid"}
  kw.update({"optim.lr": 1e-2, "optim.schedule": "constant"})  # the bias must move in 2 steps
  _tiny_train(workdir, init=str(path), batch_size=8, total_steps=2, **kw)
  bias = float(np.asarray(_one_device_run(workdir).state["params"]["text_bias"]))
  print(f"teacher bias {hf.logit_bias.item():.4f}, trained {bias:.4f}")
  assert abs(bias - hf.logit_bias.item()) > 1e-3
  student = api.load_student(workdir)
  photos, captions = _photos(), _captions()
  pixels = preprocess.preprocess(photos, 32, student.mean, student.std, student.resize)
  ids = student.tokenize(captions)
  img, txt = student.encode_images(pixels), student.encode_texts(captions)
  scale = float(np.exp(hf.logit_scale.item()))
  want_logits = scale * img @ txt.T + bias
  ours = _student_logits(student, pixels, ids)
  assert float(np.abs(ours - want_logits).max()) / scale <= 1e-4

  out = tmp_path / "hf"
  export.export(workdir, out, format="hf")
  model = transformers.SiglipModel.from_pretrained(str(out)).eval()
  _check_logits("siglip hf", model, pixels, ids, img, txt, want_logits, scale)
  adapter = tmp_path / "peft"
  export.export(workdir, adapter, format="peft")
  cfg = json.loads((adapter / peft_adapter.PEFT_CONFIG).read_text())
  assert cfg["base_model_name_or_path"] == str(adapter / export.BASE_DIR)
  base = transformers.SiglipModel.from_pretrained(cfg["base_model_name_or_path"]).eval()
  model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
  _check_logits("siglip peft", model, pixels, ids, img, txt, want_logits, scale)


def test_siglip_training_evals_use_the_towers_preprocessing(siglip_dir, tmp_path, monkeypatch):
  """Training-time evals of a SigLIP run embed with SigLIP's mean/std and squash resize."""
  from gmail_jax.training import encoders

  _, path = siglip_dir
  seen = []
  views = encoders.views

  def spy(*args, **kw):
    out = views(*args, **kw)
    seen.extend((e.mean, e.std, e.resize) for e in out.values())
    return out

  monkeypatch.setattr(encoders, "views", spy)
  gap = dict(
    type="gap",
    pairs="image_text",
    images_dir=str(_photo_dir()),
    captions_json=str(shared_path("coco-captions-val2017", "captions_val2017.json")),
    max_pairs=8,
    batch_size=8,
    every_steps=2,
  )
  _tiny_train(
    tmp_path / "run", init=str(path), batch_size=8, total_steps=2, **{"model.name": "siglip"},
    **{"evals.gap": gap},
  )  # fmt: skip
  assert seen and set(seen) == {((0.5,) * 3, (0.5,) * 3, "squash")}


def test_eval_crops_follow_the_towers_resize(tmp_path):
  """Evaluators that pre-crop (image_size) take the run's resize mode from from_config."""
  from gmail_jax.evaluators import common

  photos = sorted(_photo_dir().glob("*.jpg"))[:4]
  for k, p in enumerate(photos):
    (tmp_path / "real" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
    (tmp_path / "real" / f"c{k % 2}" / p.name).symlink_to(p)
  cfg = {"g": dict(type="gap", pairs="class_real_real", root=str(tmp_path), image_size=32)}
  (ev,) = common.from_config(cfg, resize="squash")
  (clip_ev,) = common.from_config(cfg)
  with PIL.Image.open(sorted((tmp_path / "real" / "c0").iterdir())[0]) as im:
    np.testing.assert_array_equal(ev.x_items[0], preprocess.resize_squash(im, 32))
    np.testing.assert_array_equal(clip_ev.x_items[0], preprocess.resize_center_crop(im, 32))
