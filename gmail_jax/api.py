"""User-facing encoders: ``load_clip(src)`` -> :class:`ClipEncoder`.

    from gmail_jax import api
    clip = api.load_clip("openai/clip-vit-base-patch32")      # or a local HF CLIP directory
    img = clip.encode_images(pil_images)                       # [N, D] L2-normalised (numpy fp32)
    txt = clip.encode_texts(["a photo of a cat", "a dog"])     # [N, D] L2-normalised
    sims = img @ txt.T                                         # cosine similarities

Images may be a list of PIL images / uint8 HWC arrays of any size, a uint8 ``[N, H, W, 3]`` array
(resized/cropped like ``CLIPImageProcessor`` unless already ``image_size``), or a float
``[N, S, S, 3]`` array that is already CLIP-normalised. Forwards are jitted and run in batches of
``batch_size`` (the last batch is padded, so only one shape is compiled per encoder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmail_jax.data import preprocess as pp
from gmail_jax.models import convert
from gmail_jax.models.clip import CLIP, l2_normalize
from gmail_jax.models.tokenizer import Tokenizer


@jax.jit
def _pixels(x: jax.Array) -> jax.Array:
  return pp.normalize(x) if x.dtype == jnp.uint8 else x.astype(jnp.float32)


@nnx.jit
def _encode_images(model: CLIP, x: jax.Array) -> jax.Array:
  return l2_normalize(model.encode_image(_pixels(x)))


@nnx.jit
def _encode_texts(model: CLIP, ids: jax.Array) -> jax.Array:
  return l2_normalize(model.encode_text(ids))


class ClipEncoder:
  """Encode images / texts with a CLIP model into L2-normalised embeddings (numpy fp32)."""

  def __init__(self, model: CLIP, tokenizer: Tokenizer | None = None, *, batch_size: int = 64):
    self.model = model
    ctx = model.config.text.context_length
    self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(context_length=ctx)
    if self.tokenizer.context_length != ctx:
      raise ValueError(f"tokenizer context_length {self.tokenizer.context_length} != model's {ctx}")
    self.batch_size = batch_size

  @property
  def image_size(self) -> int:
    return self.model.config.vision.image_size

  @property
  def embed_dim(self) -> int:
    return self.model.config.embed_dim

  def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 [N, context_length], like HF CLIPTokenizer(padding='max_length', truncation=True)."""
    return self.tokenizer(texts)

  def prepare_images(self, images) -> np.ndarray:
    """uint8 [N,S,S,3] crops, or float32 [N,S,S,3] already-normalised pixels, for the model."""
    s = self.image_size
    if isinstance(images, (np.ndarray, jax.Array)):
      arr = np.asarray(images)
      if arr.ndim == 3 and arr.dtype == np.uint8 and arr.shape[-1] in (3, 4):
        arr = arr[None]  # one HWC image
      if arr.ndim != 4:
        raise ValueError(f"images: expected [N,H,W,3] or a list of images, got shape {arr.shape}")
      if arr.dtype == np.uint8:
        if arr.shape[1:] == (s, s, 3):
          return arr
        return np.stack([pp.resize_center_crop(im, s) for im in arr]) if len(arr) else arr
      # Floats are taken as CLIP-normalised pixels; the vision tower checks their size.
      self.model.vision.check_pixels(arr.shape)
      return arr.astype(np.float32)
    if isinstance(images, (list, tuple)):
      if not images:
        return np.zeros((0, s, s, 3), np.uint8)
      return np.stack([pp.resize_center_crop(im, s) for im in images])
    raise TypeError(
      f"images: expected a list of PIL images/uint8 arrays or an array, got {type(images).__name__}"
    )

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    n = len(x)
    if n == 0:
      return np.zeros((0, self.embed_dim), np.float32)
    bs = min(self.batch_size, n)
    out = []
    for i in range(0, n, bs):
      chunk = x[i : i + bs]
      pad = bs - len(chunk)
      if pad:  # one compiled shape per encoder
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      out.append(np.asarray(fn(self.model, jnp.asarray(chunk)))[: bs - pad])
    return np.concatenate(out).astype(np.float32)

  def encode_images(self, images) -> np.ndarray:
    """[N, embed_dim] L2-normalised image embeddings."""
    return self._batched(_encode_images, self.prepare_images(images))

  def encode_texts(self, texts: str | Sequence[str]) -> np.ndarray:
    """[N, embed_dim] L2-normalised text embeddings."""
    return self._batched(_encode_texts, self.tokenize(texts))


def load_clip(src: str, *, dtype=None, batch_size: int = 64) -> ClipEncoder:
  """A :class:`ClipEncoder` from a HF CLIP directory (safetensors or .bin) or a hub id.

  The tokenizer comes from the checkpoint's ``vocab.json`` + ``merges.txt`` when present, else from
  the BPE file of the ``openai-clip`` package.
  """
  src = os.fspath(src)
  # --- training workdirs (trained runs) are handled here by the training helper ---
  ckpt_dir = convert.resolve_source(src)
  model = convert.load_pretrained(ckpt_dir, dtype=dtype)
  ctx = model.config.text.context_length
  has_vocab = all(os.path.exists(os.path.join(ckpt_dir, f)) for f in ("vocab.json", "merges.txt"))
  tokenizer = Tokenizer(ckpt_dir if has_vocab else None, context_length=ctx)
  return ClipEncoder(model, tokenizer, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------
# Trained students (LoRA merged) from an Orbax workdir: `load_student(workdir, step=None)` is added
# below by the training helper; it returns a ClipEncoder built from the merged in-memory model.
# ------------------------------------------------------------------------------------------------


def load_student(workdir: str | os.PathLike, step: int | None = None, *, batch_size: int = 64):
  """The trained GMAIL student f_g as a :class:`ClipEncoder` (LoRA merged into a plain CLIP).

  Rebuilds the frozen teacher exactly as training did (from WORKDIR/config.json: ``config.init``,
  the cached quickstart teacher, or the seeded random init), restores the trainable state of
  ``step`` (default: latest) from WORKDIR/checkpoints, checks it was trained on that teacher, and
  folds the adapters (and a trained projection) into the weights. Runs on one local device.
  """
  from gmail_jax import checkpointing, train  # noqa: PLC0415 (training stack, heavy)
  from gmail_jax import metrics as metrics_lib  # noqa: PLC0415
  from gmail_jax import sharding as shd  # noqa: PLC0415

  workdir = os.path.abspath(os.fspath(workdir))
  config = metrics_lib.read_config(workdir)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])
  with jax.set_mesh(mesh):
    built = train.build(config, workdir, mesh)
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
      abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), built["state"]
      )
      state, meta = ckpt.restore(abstract, step=step)
    finally:
      ckpt.close()
    teacher_id = {
      **train.teacher_source(config),
      "checksum": checkpointing.frozen_checksum(built["frozen"]),
    }
    checkpointing.check_teacher(meta.get("teacher", {}), teacher_id, ckpt.directory)
    model = train.merged_student(built["models"], state["params"], built["frozen"], built["rng"])
  ctx = model.config.text.context_length
  return ClipEncoder(model, Tokenizer(context_length=ctx), batch_size=batch_size)
