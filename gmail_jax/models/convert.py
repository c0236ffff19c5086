"""Hugging Face CLIP checkpoints -> NNX :class:`~gmail_jax.models.clip.CLIP`.

Name mapping (NNX path -> HF key; ``V``/``T`` = ``vision_model.``/``text_model.``,
``L`` = ``encoder.layers.i.``):

    vision/patch_embed/kernel      V embeddings.patch_embedding.weight   OIHW -> HWIO
    vision/class_embedding         V embeddings.class_embedding
    vision/pos_embedding           V embeddings.position_embedding.weight
    vision/ln_pre, ln_post         V pre_layrnorm (sic), V post_layernorm
    */blocks/i/ln1, ln2            L layer_norm1, L layer_norm2         scale/bias <- weight/bias
    */blocks/i/attn/{q,k,v,out}_proj  L self_attn.{q,k,v,out}_proj      kernel = weight.T
    */blocks/i/mlp/{fc1,fc2}       L mlp.{fc1,fc2}                       kernel = weight.T
    text/token_embedding/embedding T embeddings.token_embedding.weight
    text/pos_embedding             T embeddings.position_embedding.weight
    text/ln_final                  T final_layer_norm
    vision/proj, text/proj         visual_projection.weight.T, text_projection.weight.T
    logit_scale                    logit_scale

Loading is strict: every model parameter must come from the checkpoint and every checkpoint tensor
must be used, except the known non-parameter buffers in :data:`IGNORED_SUFFIXES`. Any mismatch
raises :class:`CheckpointError` with a one-line message naming the file and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmail_jax.errors import InputError
from gmail_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from gmail_jax.models.towers import default_residual_loops

# Persistent=False buffers that old transformers versions still wrote to checkpoints.
IGNORED_SUFFIXES = ("embeddings.position_ids",)

_HF_TEXT_DEFAULTS = dict(
  vocab_size=49408,
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=12,
  num_attention_heads=8,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  eos_token_id=49407,
)
_HF_VISION_DEFAULTS = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  num_channels=3,
  image_size=224,
  patch_size=32,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
)


class CheckpointError(InputError):
  """A checkpoint that does not match the model (one-line message naming file and key)."""


def _act(name: str, where: str) -> str:
  if name not in ("quick_gelu", "gelu"):
    raise CheckpointError(f"{where}: unsupported hidden_act {name!r} (expected quick_gelu or gelu)")
  return name


def _square(value, key: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise CheckpointError(f"config.json: {key}={value} is not square; only square CLIP supported")
    value = value[0]
  return int(value)


def clip_config_from_hf(hf_config: dict) -> CLIPConfig:
  """CLIPConfig from a HF ``CLIPConfig`` dict (``config.json``); missing keys take HF defaults."""
  text = dict(_HF_TEXT_DEFAULTS)
  text.update(hf_config.get("text_config") or {})
  text.update(hf_config.get("text_config_dict") or {})  # legacy key, wins like in HF
  vision = dict(_HF_VISION_DEFAULTS)
  vision.update(hf_config.get("vision_config") or {})
  vision.update(hf_config.get("vision_config_dict") or {})
  if int(vision["num_channels"]) != 3:
    raise CheckpointError(f"config.json: vision num_channels={vision['num_channels']}, expected 3")
  eos = text["eos_token_id"]
  if isinstance(eos, (list, tuple)):
    eos = eos[0]
  try:
    return CLIPConfig(
      vision=VisionConfig(
        image_size=_square(vision["image_size"], "vision_config.image_size"),
        patch_size=_square(vision["patch_size"], "vision_config.patch_size"),
        width=int(vision["hidden_size"]),
        layers=int(vision["num_hidden_layers"]),
        heads=int(vision["num_attention_heads"]),
        mlp_dim=int(vision["intermediate_size"]),
        act=_act(vision["hidden_act"], "config.json vision_config"),
        ln_eps=float(vision["layer_norm_eps"]),
      ),
      text=TextConfig(
        vocab_size=int(text["vocab_size"]),
        context_length=int(text["max_position_embeddings"]),
        width=int(text["hidden_size"]),
        layers=int(text["num_hidden_layers"]),
        heads=int(text["num_attention_heads"]),
        mlp_dim=int(text["intermediate_size"]),
        act=_act(text["hidden_act"], "config.json text_config"),
        ln_eps=float(text["layer_norm_eps"]),
        eos_token_id=int(eos),
      ),
      embed_dim=int(hf_config.get("projection_dim", 512)),
      logit_scale_init=float(hf_config.get("logit_scale_init_value", 2.6592)),
    )
  except (TypeError, KeyError) as e:
    raise CheckpointError(f"config.json: bad CLIP config ({type(e).__name__}: {e})") from None


_IDENTITY: Callable[[np.ndarray], np.ndarray] = lambda a: a
_LINEAR_T: Callable[[np.ndarray], np.ndarray] = lambda a: a.T
_OIHW_TO_HWIO: Callable[[np.ndarray], np.ndarray] = lambda a: a.transpose(2, 3, 1, 0)

_TOP = {
  ("logit_scale",): ("logit_scale", _IDENTITY),
  ("vision", "patch_embed", "kernel"): (
    "vision_model.embeddings.patch_embedding.weight",
    _OIHW_TO_HWIO,
  ),
  ("vision", "class_embedding"): ("vision_model.embeddings.class_embedding", _IDENTITY),
  ("vision", "pos_embedding"): ("vision_model.embeddings.position_embedding.weight", _IDENTITY),
  ("vision", "proj", "kernel"): ("visual_projection.weight", _LINEAR_T),
  ("text", "token_embedding", "embedding"): (
    "text_model.embeddings.token_embedding.weight",
    _IDENTITY,
  ),
  ("text", "pos_embedding"): ("text_model.embeddings.position_embedding.weight", _IDENTITY),
  ("text", "proj", "kernel"): ("text_projection.weight", _LINEAR_T),
}
_TOWER = {"vision": "vision_model", "text": "text_model"}
_NORMS = {
  "ln_pre": "pre_layrnorm",
  "ln_post": "post_layernorm",
  "ln_final": "final_layer_norm",
  "ln1": "layer_norm1",
  "ln2": "layer_norm2",
}
_LN_PARAM = {"scale": "weight", "bias": "bias"}


def hf_key(path: tuple) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """(HF state-dict key, HF array -> NNX array) for an NNX parameter path (tuple of names)."""
  path = tuple(str(p) for p in path)
  if path in _TOP:
    return _TOP[path]
  tower = _TOWER[path[0]]
  if len(path) == 3 and path[1] in _NORMS:
    return f"{tower}.{_NORMS[path[1]]}.{_LN_PARAM[path[2]]}", _IDENTITY
  if path[1] == "blocks":
    layer = f"{tower}.encoder.layers.{path[2]}"
    if len(path) == 5 and path[3] in _NORMS:
      return f"{layer}.{_NORMS[path[3]]}.{_LN_PARAM[path[4]]}", _IDENTITY
    if len(path) == 6 and path[3] in ("attn", "mlp"):
      sub = "self_attn" if path[3] == "attn" else "mlp"
      if path[5] == "kernel":
        return f"{layer}.{sub}.{path[4]}.weight", _LINEAR_T
      return f"{layer}.{sub}.{path[4]}.bias", _IDENTITY
  raise KeyError(f"no HF name for NNX parameter {'/'.join(path)}")


def to_hf_layout(fn: Callable[[np.ndarray], np.ndarray], value: np.ndarray) -> np.ndarray:
  """Inverse of ``fn`` from :func:`hf_key`: an NNX-layout array in the HF layout."""
  if fn is _LINEAR_T:
    return value.T
  if fn is _OIHW_TO_HWIO:
    return value.transpose(3, 2, 0, 1)
  return value


def _hf_shape(fn, shape: tuple) -> tuple:
  """The HF-layout shape that ``fn`` maps onto an NNX shape."""
  if fn is _LINEAR_T:
    return shape[::-1]
  if fn is _OIHW_TO_HWIO:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a ``.safetensors`` file (numpy, no torch) or a ``.bin`` (torch, weights_only)."""
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file

      return dict(load_file(path))
    import torch  # lazily: only the legacy .bin format needs it

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
      raise TypeError(f"expected a state dict, got {type(sd).__name__}")
    return {
      k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()
    }
  except ImportError as e:
    raise CheckpointError(
      f"cannot read checkpoint {path}: {_first_line(e)} (pip install torch)"
    ) from None
  except Exception as e:  # any parse failure means a corrupt or truncated file
    raise CheckpointError(
      f"cannot read checkpoint {path}: corrupt or truncated ({_first_line(e)})"
    ) from None


def _weight_files(ckpt_dir: str) -> list[str]:
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = os.path.join(ckpt_dir, index_name)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {index}: {_first_line(e)}") from None
      return [os.path.join(ckpt_dir, name) for name in sorted(set(weight_map.values()))]
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(ckpt_dir, name)):
      return [os.path.join(ckpt_dir, name)]
  raise CheckpointError(f"{ckpt_dir}: no model.safetensors or pytorch_model.bin found")


def read_hf_config(ckpt_dir: str) -> dict:
  path = os.path.join(ckpt_dir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: not found (not a Hugging Face CLIP directory)") from None
  except ValueError as e:
    raise CheckpointError(f"{path}: invalid JSON ({_first_line(e)})") from None


def load_state_into(
  model_fn: Callable[[], CLIP],
  state_dict: dict[str, np.ndarray],
  source: str,
  key_fn: Callable[[tuple], tuple[str, Callable[[np.ndarray], np.ndarray]]] | None = None,
) -> CLIP:
  """Build ``model_fn()`` abstractly and fill every ``nnx.Param`` from a HF state dict (strict).
  ``key_fn``: NNX path -> (HF key, array map), :func:`hf_key` by default (other towers: theirs)."""
  key_fn = key_fn or hf_key
  abstract = nnx.eval_shape(model_fn)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  flat = list(nnx.to_flat_state(params))
  used, filled = set(), []
  for path, var in flat:
    key, fn = key_fn(path)
    if key not in state_dict:
      raise CheckpointError(f"{source}: missing key {key!r} (for {'/'.join(map(str, path))})")
    raw = np.asarray(state_dict[key])
    try:
      value = fn(raw)
    except ValueError:  # a tensor of another rank: the layout map itself cannot apply
      value = raw
    if tuple(value.shape) != tuple(var.shape):
      raise CheckpointError(
        f"{source}: shape mismatch for {key!r}: checkpoint has {tuple(state_dict[key].shape)}, "
        f"model expects {_hf_shape(fn, tuple(var.shape))}"
      )
    used.add(key)
    filled.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(IGNORED_SUFFIXES))
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r}{more}")
  return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


def resolve_source(src: str) -> str:
  """A local directory for ``src``: itself if it exists, else a hub snapshot (needs network)."""
  if os.path.isdir(src):
    return src
  if os.path.exists(src):
    raise CheckpointError(f"{src}: expected a Hugging Face CLIP directory, got a file")
  if src.count("/") != 1 or src.startswith((".", "/", "~")):
    raise CheckpointError(
      f"{src}: no such directory (and not a hub id like 'openai/clip-vit-base-patch32')"
    )
  from huggingface_hub import snapshot_download

  patterns = ["*.json", "*.txt"]
  try:
    local = snapshot_download(src, allow_patterns=[*patterns, "*.safetensors"])
    if not any(f.endswith(".safetensors") for f in os.listdir(local)):
      local = snapshot_download(src, allow_patterns=[*patterns, "pytorch_model*.bin"])
  except Exception as e:  # network, auth or not found: one line for the user
    raise CheckpointError(
      f"cannot download {src!r} from the Hugging Face hub: {_first_line(e)}"
    ) from None
  return local


def load_pretrained(
  src: str, *, dtype=None, remat: bool = False, residual_loops: bool | None = None
) -> CLIP:
  """A :class:`CLIP` from a HF CLIP directory (model.safetensors / pytorch_model.bin) or hub id
  (OpenAI / OpenCLIP files: models/openai_ckpt.py; the CLIP tower takes either).

  ``dtype``, ``remat``, ``residual_loops``: as in :class:`CLIP` (None = the backend default).
  """
  ckpt_dir = resolve_source(os.fspath(src))
  config = clip_config_from_hf(read_hf_config(ckpt_dir))
  files = _weight_files(ckpt_dir)
  state_dict: dict[str, np.ndarray] = {}
  for path in files:
    state_dict.update(read_state_dict(path))
  source = files[0] if len(files) == 1 else ckpt_dir
  if residual_loops is None:  # decided here, not inside load_state_into's eval_shape
    residual_loops = default_residual_loops()

  def make() -> CLIP:
    return CLIP(config, dtype=dtype, remat=remat, residual_loops=residual_loops, rngs=nnx.Rngs(0))

  return load_state_into(make, state_dict, source)
