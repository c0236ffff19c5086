"""User-facing encoders: ``load_clip(src)`` / ``load_student(workdir)`` -> :class:`ClipEncoder`.

    from gmail_jax import api
    clip = api.load_clip("openai/clip-vit-base-patch32")      # HF CLIP directory or hub id
    student = api.load_clip("/tmp/gmail_run")                  # a training workdir: the student
    student = api.load_clip("gs://bucket/run")                 # ... or one in a bucket
    img = clip.encode_images(pil_images)                       # [N, D] L2-normalised (numpy fp32)
    txt = clip.encode_texts(["a photo of a cat", "a dog"])     # [N, D] L2-normalised
    sims = img @ txt.T                                         # cosine similarities

Images may be a list of PIL images / uint8 HWC arrays of any size, a uint8 ``[N, H, W, 3]`` array
(resized like the tower's image processor unless already ``image_size``), or a float
``[N, S, S, 3]`` array that is already CLIP-normalised. Forwards are jitted and run in fixed-size
batches of ``batch_size`` split over the local devices (gmail_jax/training/encoders.py).
"""

from __future__ import annotations

import os

import jax

from gmail_jax import storage
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.models import towers
from gmail_jax.models.tokenizer import Tokenizer
from gmail_jax.training import sharding as shd
from gmail_jax.training.encoders import Encoder

ClipEncoder = Encoder  # the public name (DESIGN.md §3)

__all__ = ["ClipEncoder", "load_clip", "load_student"]


def load_clip(
  src: str | os.PathLike,
  *,
  dtype=None,
  batch_size: int = 64,
  model_name: str | None = None,
  text_context: int = 0,
) -> ClipEncoder:
  """A :class:`ClipEncoder` from a HF CLIP directory (safetensors or .bin), a hub id, an OpenAI /
  OpenCLIP ViT checkpoint file or OpenCLIP directory, or a training workdir (then the trained
  student, LoRA merged: ``load_student(src)``). A bucket URL (``gs://``) may name a workdir or a
  checkpoint directory (read from a local copy, ``storage.fetch_dir``).

  ``model_name``: for an OpenCLIP file, its model name (``ViT-B-32``: GELU; ``...-quickgelu``);
  None = an OpenAI checkpoint (QuickGELU). ``text_context``: stretch the text positions to this
  many tokens on load (Long-CLIP, models/longclip.py; 248 from 77); 0 = the checkpoint's own.
  The tokenizer runs at the model's context, from the checkpoint's ``vocab.json`` +
  ``merges.txt`` when present, else from the BPE file of the ``openai-clip`` package.
  """
  from gmail_jax import run as run_lib
  from gmail_jax.models import convert, longclip, openai_ckpt

  src = os.fspath(src)
  if run_lib.is_run(src):
    if text_context:
      raise ConfigError(f"{src}: text_context is for checkpoints; a run keeps its own context")
    return load_student(src, batch_size=batch_size)
  if storage.is_remote(src):  # the importers and tokenizers read local files
    if not storage.path(src).is_dir():
      raise InputError(f"{src}: not a training workdir or checkpoint directory in the bucket")
    src = os.fspath(storage.fetch_dir(src))
  if openai_ckpt.is_openai_source(src):
    model = openai_ckpt.load_pretrained(src, model_name=model_name, dtype=dtype)
    if text_context:
      model = longclip.stretch_text_context(model, text_context)
    tokenizer = Tokenizer(None, context_length=model.config.text.context_length)
    return ClipEncoder(model, tokenizer=tokenizer, batch_size=batch_size)
  if model_name is not None:
    raise convert.CheckpointError(f"{src}: model_name is only for OpenAI / OpenCLIP files")
  ckpt_dir = convert.resolve_source(src)
  if convert.read_hf_config(ckpt_dir).get("model_type") == "siglip":
    return _load_siglip(ckpt_dir, dtype=dtype, batch_size=batch_size, text_context=text_context)
  model = towers.get("clip").load_pretrained(ckpt_dir, dtype=dtype)
  if text_context:
    model = longclip.stretch_text_context(model, text_context)
  ctx = model.config.text.context_length
  has_vocab = all(os.path.exists(os.path.join(ckpt_dir, f)) for f in ("vocab.json", "merges.txt"))
  tokenizer = Tokenizer(ckpt_dir if has_vocab else None, context_length=ctx)
  return ClipEncoder(model, tokenizer=tokenizer, batch_size=batch_size)


def _load_siglip(ckpt_dir: str, *, dtype, batch_size: int, text_context: int) -> ClipEncoder:
  """A HF SiglipModel directory: the SigLIP tower and its SentencePiece tokenizer."""
  from gmail_jax.models.siglip_tokenizer import SiglipTokenizer

  if text_context:
    raise ConfigError(f"{ckpt_dir}: text_context stretching is for CLIP, not SigLIP")
  tower = towers.get("siglip")
  model = tower.load_pretrained(ckpt_dir, dtype=dtype)
  tokenizer = SiglipTokenizer(ckpt_dir, context_length=model.config.text.context_length)
  spec = tower.preprocess
  return ClipEncoder(
    model,
    tokenizer=tokenizer,
    batch_size=batch_size,
    mean=spec.mean,
    std=spec.std,
    resize=spec.resize,
  )


def load_student(
  workdir: str | os.PathLike, step: int | None = None, *, batch_size: int = 64
) -> ClipEncoder:
  """The trained GMAIL student f_g as a :class:`ClipEncoder` (LoRA merged into a plain model),
  restored by ``run.load_run`` on one local device."""
  from gmail_jax import run as run_lib

  mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])
  run = run_lib.load_run(workdir, step, mesh=mesh)
  spec = run.tower.preprocess
  return ClipEncoder(
    run.student,
    tokenizer=run.tokenizer,
    mesh=mesh,
    batch_size=batch_size,
    mean=spec.mean,
    std=spec.std,
    resize=spec.resize,
  )
