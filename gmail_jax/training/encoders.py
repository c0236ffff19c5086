"""The one encoder: L2-normalised embeddings from a teacher / student pair, batched over a mesh.

    enc = Encoder(model)                                     # one model for everything (api)
    enc = Encoder(teacher, generated=student)                # GMAIL's inference path (Alg. 1)
    enc.encode_images(images) / enc.encode_generated(images) / enc.encode_texts(texts)  # [N, D]

``encode_images`` embeds real images with ``model``'s vision tower, ``encode_generated`` embeds
generated images with ``generated``'s (default: ``model``), ``encode_texts`` uses ``model``'s text
tower. Every call runs in fixed-size global batches through ``evaluators.common.embed_sharded``:
split over the mesh's batch axes (not replicated on every device), padding masked out, one
compilation per model structure; with several processes each embeds its block of the rows.

Images: a list of PIL images / uint8 HWC arrays of any size, a uint8 ``[N, H, W, 3]`` array
(resized like the tower's image processor, ``resize`` mode, unless already ``image_size``), or a
float ``[N, S, S, 3]`` array that is already normalised. ``views(teacher, student)`` gives the
three encoders evaluation compares (teacher / student / student_all). ``normalize=False`` returns
the projected embeddings before L2 normalisation (ClipCap feeds those). ``identity()`` is what the
embeddings depend on (weights fingerprints of both towers, model configs and dtypes, the
preprocessing, the tokenizer): what a cache of embeddings must be keyed on.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmail_jax.data import preprocess as pp
from gmail_jax.evaluators import common
from gmail_jax.models.clip import l2_normalize
from gmail_jax.models.tokenizer import Tokenizer
from gmail_jax.training import sharding as shd
from gmail_jax.training.fingerprint import weights_fingerprint

VIEWS = ("teacher", "student", "student_all")


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _embed_images(graphdef, state, x, mean, std, normalize=True) -> jax.Array:
  pixels = pp.normalize(x, mean, std) if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  z = nnx.merge(graphdef, state).encode_image(pixels)
  return l2_normalize(z) if normalize else z.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _embed_texts(graphdef, state, ids, normalize=True) -> jax.Array:
  z = nnx.merge(graphdef, state).encode_text(ids)
  return l2_normalize(z) if normalize else z.astype(jnp.float32)


def _dtypes(model: nnx.Module) -> list[str]:
  """The compute dtypes of ``model``'s modules (not in its weights; they change its outputs)."""
  found = set()
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and getattr(node, "dtype", None) is not None:
      found.add(f"{type(node).__name__}:{jnp.dtype(node.dtype).name}")
  return sorted(found)


def _tokenizer_identity(tok: Any) -> dict:
  """Type, context length and a sha256 of the vocabulary (CLIP BPE tables or a SentencePiece
  model; else its path)."""
  if hasattr(tok, "ranks") and hasattr(tok, "vocab"):
    ranks = sorted(tok.ranks.items(), key=lambda kv: kv[1])
    table = json.dumps([sorted(tok.vocab.items()), ranks], ensure_ascii=False).encode()
  elif hasattr(tok, "sp"):
    table = tok.sp.serialized_model_proto()
  else:
    table = repr(getattr(tok, "path", None)).encode()
  return {
    "type": type(tok).__name__,
    "context_length": int(tok.context_length),
    "vocabulary": hashlib.sha256(table).hexdigest(),
  }


def _on_mesh(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """Leaves already placed on the mesh's devices stay (e.g. FSDP-sharded); others are replicated."""
  devices = set(mesh.devices.flat)
  rep = NamedSharding(mesh, P())

  def one(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, rep)

  return jax.tree.map(one, state)


class Encoder:
  """Encode images / generated images / texts into L2-normalised embeddings (numpy fp32)."""

  def __init__(
    self,
    model: nnx.Module,
    tokenizer: Tokenizer | None = None,
    *,
    generated: nnx.Module | None = None,
    mesh: jax.sharding.Mesh | None = None,
    batch_size: int = 64,
    mean: Sequence[float] = pp.CLIP_MEAN,
    std: Sequence[float] = pp.CLIP_STD,
    resize: pp.ResizeMode = "shortest_edge_crop",
  ):
    self.model = model
    self.mesh = mesh if mesh is not None else shd.make_mesh({"data": -1})
    ctx = model.config.text.context_length
    self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(context_length=ctx)
    if self.tokenizer.context_length != ctx:
      raise ValueError(f"tokenizer context_length {self.tokenizer.context_length} != model's {ctx}")
    n = self.mesh.size
    self.batch_size = max(n, -(-batch_size // n) * n)  # a multiple of the devices
    self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if resize not in pp.RESIZE_MODES:
      raise ValueError(f"resize mode {resize!r} not in {list(pp.RESIZE_MODES)}")
    self.resize = resize
    self._model = nnx.split(model)
    self._model = (self._model[0], _on_mesh(self._model[1], self.mesh))
    self.generated = model if generated is None else generated
    if generated is None or generated is model:
      self._generated = self._model
    else:
      gdef, state = nnx.split(generated)
      self._generated = (gdef, _on_mesh(state, self.mesh))
    self._identity: dict | None = None

  def identity(self) -> dict:
    """What this encoder's embeddings depend on, JSON-able (computed once): the exact weights
    fingerprint (training/fingerprint.py) of the real-image/text model and of the generated-image
    model, their configs and compute dtypes, the pixel preprocessing (image size, resize mode,
    mean, std) and the tokenizer. Equal identities give equal embeddings of equal inputs."""
    if self._identity is None:

      def tower(model: nnx.Module, state) -> dict:
        return {
          "weights": weights_fingerprint(state),
          "config": repr(getattr(model, "config", None)),
          "dtypes": _dtypes(model),
        }

      model = tower(self.model, self._model[1])
      same = self._generated is self._model
      self._identity = {
        "model": model,
        "generated": model if same else tower(self.generated, self._generated[1]),
        "image_size": self.image_size,
        "resize": self.resize,
        "mean": list(self.mean),
        "std": list(self.std),
        "tokenizer": _tokenizer_identity(self.tokenizer),
      }
    return self._identity

  @property
  def image_size(self) -> int:
    return self.model.config.vision.image_size

  @property
  def embed_dim(self) -> int:
    return self.model.config.embed_dim

  def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 [N, context_length], like HF CLIPTokenizer(padding='max_length', truncation=True)."""
    return np.asarray(self.tokenizer(texts), np.int32)

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
        return np.stack([pp.resize(im, s, self.resize) for im in arr]) if len(arr) else arr
      # Floats are taken as normalised pixels; the vision tower checks their size.
      self.model.vision.check_pixels(arr.shape)
      return arr.astype(np.float32)
    if isinstance(images, (list, tuple)):
      if not images:
        return np.zeros((0, s, s, 3), np.uint8)
      return np.stack([pp.resize(im, s, self.resize) for im in images])
    raise TypeError(
      f"images: expected a list of PIL images/uint8 arrays or an array, got {type(images).__name__}"
    )

  def _run(self, fn, rows: np.ndarray) -> np.ndarray:
    n = len(rows)
    if n == 0:
      return np.zeros((0, self.embed_dim), np.float32)
    # Each process embeds its contiguous block; embed_sharded returns them in process order.
    nproc, pid = jax.process_count(), jax.process_index()
    per = -(-n // nproc)
    local = rows[pid * per : (pid + 1) * per]
    out = common.embed_sharded(
      fn, local, batch_size=self.batch_size, mesh=self.mesh, batch_axes=self._batch_axes()
    )
    return out.astype(np.float32)

  def _batch_axes(self) -> tuple[str, ...]:
    return tuple(a for a in self.mesh.axis_names if a in shd.AXES)

  def _images(self, model: tuple, images, normalize: bool) -> np.ndarray:
    gdef, state = model
    return self._run(
      lambda x: _embed_images(gdef, state, x, self.mean, self.std, normalize),
      self.prepare_images(images),
    )

  def encode_images(self, images, *, normalize: bool = True) -> np.ndarray:
    """[N, embed_dim] real-image embeddings (``model``'s vision tower); L2-normalised unless
    ``normalize=False``."""
    return self._images(self._model, images, normalize)

  def encode_generated(self, images, *, normalize: bool = True) -> np.ndarray:
    """[N, embed_dim] generated-image embeddings (``generated``'s vision tower)."""
    return self._images(self._generated, images, normalize)

  def encode_texts(self, texts: str | Sequence[str], *, normalize: bool = True) -> np.ndarray:
    """[N, embed_dim] text embeddings (``model``'s text tower)."""
    gdef, state = self._model
    return self._run(lambda ids: _embed_texts(gdef, state, ids, normalize), self.tokenize(texts))


def views(
  teacher: nnx.Module, student: nnx.Module, names: tuple[str, ...] = VIEWS, **kw
) -> dict[str, Encoder]:
  """The encoders evaluation compares (``VIEWS``; only ``names`` are built: each places its
  weights on the mesh):

  teacher      f_r for every image, frozen text tower              (before alignment)
  student      generated images through f_g, real images through f_r (GMAIL Algorithm 1)
  student_all  f_g for every image (the §3.2 variant; image-text alignment trains this path)
  """
  make = {
    "teacher": lambda: Encoder(teacher, **kw),
    "student": lambda: Encoder(teacher, generated=student, **kw),
    "student_all": lambda: Encoder(student, **kw),
  }
  return {name: make[name]() for name in names}
