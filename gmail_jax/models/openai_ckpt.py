"""OpenAI CLIP and OpenCLIP ViT checkpoints -> NNX :class:`~gmail_jax.models.clip.CLIP`.

Accepted files: an OpenAI TorchScript archive (``ViT-B-32.pt``), a plain state dict saved with
``torch.save`` (optionally wrapped as ``{"state_dict": ...}`` with ``module.`` prefixes, as OpenCLIP
training checkpoints are) or a ``.safetensors`` file; or an OpenCLIP hub directory
(``open_clip_config.json`` + ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``),
or Long-CLIP's own ``longclip-B.pt`` / ``longclip-L.pt`` (:func:`merge_longclip_positions`).

No arbitrary code runs: a TorchScript archive is not loaded with ``torch.jit.load`` (that compiles
the archive's code and runs any TorchScript ``__setstate__``). Its ``data.pkl`` is read with a
restricted unpickler that knows only tensors, storages and plain containers; every module object
becomes an attribute dict, and the tensors are read from the zip's ``data/`` entries. Plain state
dicts go through ``torch.load(weights_only=True)``.

Layout (OpenAI name -> HF name, then :func:`convert.load_state_into` with its strict accounting):

    visual.conv1.weight                 vision_model.embeddings.patch_embedding.weight
    visual.class_embedding / positional_embedding   vision embeddings
    visual.ln_pre / ln_post             vision pre_layrnorm / post_layernorm
    visual.proj [D, E]                  visual_projection.weight = proj.T
    [visual.]transformer.resblocks.i.   {vision,text}_model.encoder.layers.i.
      attn.in_proj_{weight,bias}        self_attn.{q,k,v}_proj (rows split in three)
      attn.out_proj, ln_1, ln_2         self_attn.out_proj, layer_norm1, layer_norm2
      mlp.c_fc, mlp.c_proj              mlp.fc1, mlp.fc2
    token_embedding, positional_embedding, ln_final   text embeddings, final_layer_norm
    text_projection [D, E]              text_projection.weight = text_projection.T
    logit_scale                         logit_scale

The file does not say the activation or the head count. OpenAI checkpoints (``model_name=None``)
use QuickGELU and 64-wide heads; an OpenCLIP ``model_name`` such as ``ViT-B-32`` means exact
GELU unless it ends in ``-quickgelu``, and the H/g/bigG names have wider vision heads.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections import OrderedDict

import numpy as np

from gmail_jax.models import convert
from gmail_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from gmail_jax.models.convert import CheckpointError
from gmail_jax.models.towers import default_residual_loops

# Tensors that are not parameters: the causal mask attribute and OpenAI's JIT metadata buffers.
_IGNORED = ("input_resolution", "context_length", "vocab_size")
_IGNORED_SUFFIXES = (".attn_mask",)
# OpenCLIP vision head widths that differ from 64 (open_clip/model_configs/ViT-*.json).
_VISION_HEAD_WIDTH = {"H": 80, "g": 88, "bigG": 104}
_MODEL_NAME = re.compile(r"^(?:EVA\d*-)?ViT-(?P<size>[A-Za-z]+)-(?P<patch>\d+)(?P<rest>.*)$")

_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "DoubleStorage": np.float64,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "BFloat16Storage": "bfloat16",
}


class _ScriptObject:
  """A TorchScript module or object from ``data.pkl``: only its attributes are kept."""

  def __setstate__(self, state):
    self.state = state


class _Storage:
  def __init__(self, dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
  flat = storage  # the persistent_load result: a 1-D numpy array of the whole storage
  if not size:
    return np.array(flat[offset])
  itemsize = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    flat[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  )
  return np.array(view)


def _rebuild_parameter(data, *_):
  return data


def _identity(value, *_):
  return value


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a TorchScript ``data.pkl`` without importing or running anything else."""

  def __init__(self, file, read_storage, source: str):
    super().__init__(file)
    self.read_storage = read_storage
    self.source = source

  def find_class(self, module: str, name: str):
    if module.startswith("__torch__"):
      return _ScriptObject
    if module == "torch" and name in _STORAGE_DTYPES:
      return _Storage(_STORAGE_DTYPES[name])
    allowed = {
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("collections", "OrderedDict"): OrderedDict,
      ("torch.jit._pickle", "restore_type_tag"): _identity,
      ("torch.jit._pickle", "build_intlist"): _identity,
      ("torch.jit._pickle", "build_doublelist"): _identity,
      ("torch.jit._pickle", "build_boollist"): _identity,
      ("torch.jit._pickle", "build_tensorlist"): _identity,
    }
    if (module, name) not in allowed:
      raise CheckpointError(f"{self.source}: refusing to unpickle {module}.{name}")
    return allowed[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointError(f"{self.source}: unsupported persistent id {pid!r:.60}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _Storage):
      raise CheckpointError(f"{self.source}: unsupported storage type {storage_type!r:.60}")
    return self.read_storage(key, storage_type.dtype)


def _flatten(obj, prefix: str, out: dict[str, np.ndarray]) -> None:
  state = obj.state if isinstance(obj, _ScriptObject) else obj
  if not isinstance(state, dict):
    return
  for name, value in state.items():
    key = f"{prefix}{name}"
    if isinstance(value, np.ndarray):
      out[key] = value
    elif isinstance(value, (_ScriptObject, dict)):
      _flatten(value, key + ".", out)


def _torchscript_prefix(zf: zipfile.ZipFile) -> str | None:
  """The archive's top folder if ``zf`` is a TorchScript archive (it has ``code/``), else None."""
  for name in zf.namelist():
    parts = name.split("/")
    if len(parts) > 2 and parts[1] == "code":
      return parts[0]
  return None


def read_torchscript(path: str, zf: zipfile.ZipFile, prefix: str) -> dict[str, np.ndarray]:
  """Every tensor attribute of a TorchScript archive's module tree, by dotted path."""
  # Archives before torch 1.x have no byteorder entry: they are little-endian.
  order = f"{prefix}/byteorder"
  little = order not in zf.namelist() or zf.read(order).strip() != b"big"

  def read_storage(key: str, dtype) -> np.ndarray:
    if dtype == "bfloat16":
      import ml_dtypes

      dtype = ml_dtypes.bfloat16
    arr = np.frombuffer(zf.read(f"{prefix}/data/{key}"), dtype=np.dtype(dtype))
    return arr if little else arr.byteswap()

  with zf.open(f"{prefix}/data.pkl") as f:
    root = _RestrictedUnpickler(f, read_storage, path).load()
  out: dict[str, np.ndarray] = {}
  _flatten(root, "", out)
  return out


def _as_float(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
    k: np.asarray(v, np.float32)
    if np.issubdtype(np.asarray(v).dtype, np.floating) or str(np.asarray(v).dtype) == "bfloat16"
    else np.asarray(v)
    for k, v in sd.items()
  }


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """The tensors of an OpenAI / OpenCLIP checkpoint file (TorchScript, torch.save, safetensors)."""
  if path.endswith(".safetensors"):
    return _as_float(convert.read_state_dict(path))
  try:
    with zipfile.ZipFile(path) as zf:
      prefix = _torchscript_prefix(zf)
      if prefix is not None:
        return _as_float(read_torchscript(path, zf, prefix))
  except zipfile.BadZipFile:
    pass  # legacy (pre-1.6) torch.save format: torch.load reads it
  except CheckpointError:
    raise
  except Exception as e:  # a damaged archive
    raise CheckpointError(
      f"cannot read TorchScript archive {path}: {convert._first_line(e)}"
    ) from None
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"cannot read checkpoint {path}: {e} (pip install torch)") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # not a weights-only pickle, corrupt or truncated
    raise CheckpointError(f"cannot read checkpoint {path}: {convert._first_line(e)}") from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]  # OpenCLIP training checkpoints
  if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
  return {
    k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()
  }


def strip_module_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drop DistributedDataParallel's ``module.`` prefix when every key has it."""
  if sd and all(k.startswith("module.") for k in sd):
    return {k[len("module.") :]: v for k, v in sd.items()}
  return sd


_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
  "attn.out_proj.weight": "self_attn.out_proj.weight",
  "attn.out_proj.bias": "self_attn.out_proj.bias",
  "ln_1.weight": "layer_norm1.weight",
  "ln_1.bias": "layer_norm1.bias",
  "ln_2.weight": "layer_norm2.weight",
  "ln_2.bias": "layer_norm2.bias",
  "mlp.c_fc.weight": "mlp.fc1.weight",
  "mlp.c_fc.bias": "mlp.fc1.bias",
  "mlp.c_proj.weight": "mlp.fc2.weight",
  "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP = {
  "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
  "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
  "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
  "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", False),
  "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", False),
  "visual.ln_post.weight": ("vision_model.post_layernorm.weight", False),
  "visual.ln_post.bias": ("vision_model.post_layernorm.bias", False),
  "visual.proj": ("visual_projection.weight", True),
  "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
  "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
  "ln_final.weight": ("text_model.final_layer_norm.weight", False),
  "ln_final.bias": ("text_model.final_layer_norm.bias", False),
  "text_projection": ("text_projection.weight", True),
  "logit_scale": ("logit_scale", False),
}


def to_hf_names(sd: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """The OpenAI-layout state dict under HF CLIP names; the first unmapped key fails in one line."""
  out: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    if key in _IGNORED or key.endswith(_IGNORED_SUFFIXES):
      continue
    if key in _TOP:
      name, transpose = _TOP[key]
      out[name] = value.T if transpose else value
      continue
    m = _BLOCK.match(key)
    part = m and m.group(3)
    if m and (part in _BLOCK_PARTS or part in ("attn.in_proj_weight", "attn.in_proj_bias")):
      tower = "vision_model" if m.group(1) else "text_model"
      layer = f"{tower}.encoder.layers.{m.group(2)}."
      if part in _BLOCK_PARTS:
        out[layer + _BLOCK_PARTS[part]] = value
      else:  # q, k, v stacked along the output rows, in that order
        kind = part.rsplit("_", 1)[1]
        for proj, chunk in zip("qkv", np.split(value, 3, axis=0), strict=True):
          out[f"{layer}self_attn.{proj}_proj.{kind}"] = chunk
      continue
    raise CheckpointError(f"{source}: unmapped key {key!r} (not an OpenAI / OpenCLIP ViT CLIP)")
  return out


def merge_longclip_positions(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Long-CLIP's own checkpoints (longclip-B.pt) keep two text position tables and add
  ``positional_embedding * mask1 + positional_embedding_res * mask2`` (mask1 = the first 20
  rows, mask2 = the rest): one table, those rows from each."""
  if "positional_embedding_res" not in sd:
    return sd
  from gmail_jax.models.longclip import KEEP

  sd = dict(sd)
  res, pos = sd.pop("positional_embedding_res"), sd.get("positional_embedding")
  if pos is None or pos.shape != res.shape:
    return {**sd, "positional_embedding_res": res}  # left for to_hf_names to refuse
  sd["positional_embedding"] = np.concatenate([pos[:KEEP], res[KEEP:]])
  return sd


def _count_layers(sd: dict, prefix: str) -> int:
  pattern = re.compile(rf"^{re.escape(prefix)}resblocks\.(\d+)\.")
  ids = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
  return max(ids) + 1 if ids else 0


def parse_model_name(model_name: str | None) -> tuple[str, int]:
  """(activation, vision head width) of an OpenCLIP model name; None = OpenAI's own."""
  if model_name is None:
    return "quick_gelu", 64
  m = _MODEL_NAME.match(model_name)
  if not m:
    raise CheckpointError(
      f"model_name {model_name!r}: expected an OpenCLIP ViT name like 'ViT-B-32' or "
      "'ViT-B-16-quickgelu'"
    )
  act = "quick_gelu" if m.group("rest").endswith("-quickgelu") else "gelu"
  return act, _VISION_HEAD_WIDTH.get(m.group("size"), 64)


def config_from_state_dict(
  sd: dict[str, np.ndarray], source: str, *, act: str = "quick_gelu", head_width: int = 64
) -> CLIPConfig:
  """The architecture of an OpenAI-layout ViT state dict, read from its tensor shapes (the head
  count as width // ``head_width``: shapes do not show it)."""
  for key in ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight"):
    if key not in sd:
      first = next(iter(sd), None)
      raise CheckpointError(
        f"{source}: missing key {key!r} (not an OpenAI / OpenCLIP ViT CLIP; first key {first!r})"
      )
  conv = sd["visual.conv1.weight"]
  vision_width, patch = int(conv.shape[0]), int(conv.shape[-1])
  grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  text_width = int(sd["ln_final.weight"].shape[0]) if "ln_final.weight" in sd else 0
  try:
    return CLIPConfig(
      vision=VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=vision_width,
        layers=_count_layers(sd, "visual.transformer."),
        heads=max(vision_width // head_width, 1),
        mlp_dim=int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        act=act,
      ),
      text=TextConfig(
        vocab_size=int(sd["token_embedding.weight"].shape[0]),
        context_length=int(sd["positional_embedding"].shape[0]),
        width=text_width,
        layers=_count_layers(sd, "transformer."),
        heads=max(text_width // 64, 1),
        mlp_dim=int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        act=act,
        # OpenAI pools argmax(ids): the EOT, the largest id of the CLIP vocabulary.
        eos_token_id=int(sd["token_embedding.weight"].shape[0]) - 1,
      ),
      embed_dim=int(sd["text_projection"].shape[1]),
    )
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{source}: not an OpenAI / OpenCLIP ViT CLIP ({e})") from None


def checkpoint_file(src: str) -> tuple[str, dict | None]:
  """(weights file, OpenCLIP ``model_cfg`` or None) of a checkpoint file or OpenCLIP hub dir."""
  if os.path.isfile(src):
    return src, None
  cfg_path = os.path.join(src, "open_clip_config.json")
  try:
    with open(cfg_path) as f:
      model_cfg = json.load(f).get("model_cfg", {})
  except (OSError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{cfg_path}: {convert._first_line(e)}") from None
  for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
    if os.path.exists(os.path.join(src, name)):
      return os.path.join(src, name), model_cfg
  raise CheckpointError(f"{src}: no open_clip_model.safetensors or open_clip_pytorch_model.bin")


def is_openai_source(src: str) -> bool:
  """Whether ``src`` is a checkpoint file or an OpenCLIP hub directory (not an HF CLIP dir)."""
  return os.path.isfile(src) or os.path.isfile(os.path.join(src, "open_clip_config.json"))


def load_pretrained(
  src: str,
  *,
  model_name: str | None = None,
  dtype=None,
  remat: bool = False,
  residual_loops: bool | None = None,
) -> CLIP:
  """A :class:`CLIP` from an OpenAI / OpenCLIP ViT checkpoint (see the module docstring).

  ``model_name``: the OpenCLIP name (``ViT-B-32``, ``ViT-L-14-quickgelu``, ...) when the file is
  not OpenAI's own; None = OpenAI (QuickGELU).
  """
  path, model_cfg = checkpoint_file(os.fspath(src))
  act, head_width = parse_model_name(model_name)
  if model_name is None and model_cfg is not None:  # an OpenCLIP hub directory says it itself
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    head_width = int((model_cfg.get("vision_cfg") or {}).get("head_width", 64))
  sd = merge_longclip_positions(strip_module_prefix(read_checkpoint(path)))
  config = config_from_state_dict(sd, path, act=act, head_width=head_width)
  hf_sd = to_hf_names(sd, path)
  if residual_loops is None:  # decided here, not inside load_state_into's eval_shape
    residual_loops = default_residual_loops()

  def make() -> CLIP:
    from flax import nnx

    return CLIP(config, dtype=dtype, remat=remat, residual_loops=residual_loops, rngs=nnx.Rngs(0))

  return convert.load_state_into(make, hf_sd, path)
