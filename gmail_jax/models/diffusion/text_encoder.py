"""Stable Diffusion's text encoder (transformers ``CLIPTextModel``) and its prompt tokenizer.

    ids  = SDTokenizer(texts)                 int32 [N, 77]: SOT, BPE ids (<= 75), EOT, pad_id...
    cond = TextEncoder(ids)                   fp32 [N, 77, width]: last_hidden_state (after
                                              final_layer_norm; causal mask, no padding mask)

The encoder is our NNX CLIP text tower (:class:`~gmail_jax.models.clip.TextTower`, no projection)
through :meth:`~gmail_jax.models.clip.TextTower.hidden_states`. Configs come from the folder's
``config.json``: SD 1.x is OpenAI's ViT-L/14 text model (12 layers, 768 wide, ``quick_gelu``);
SD 2.x is OpenCLIP ViT-H/14's text model cut to its first 23 of 24 layers (1024 wide, ``gelu``),
so its ``last_hidden_state`` is OpenCLIP's penultimate layer through ``final_layer_norm``.

Padding is what the pipeline's ``CLIPTokenizer(padding="max_length", max_length=77,
truncation=True)`` gives, and it changes the conditioning (the UNet cross-attends to all 77
positions): SD 1.x pads with ``<|endoftext|>`` (49407), SD 2.x with ``"!"`` (id 0, its
``special_tokens_map.json``). transformers registers the pad token as a special token, so with
``"!"`` every ``!`` in a prompt is also cut out of the text and becomes id 0 (``"wow!"`` ->
``wow</w>, 0`` instead of ``wow</w>, !</w>``); :class:`SDTokenizer` does the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmail_jax.errors import ConfigError, InputError
from gmail_jax.models import convert
from gmail_jax.models.clip import TextConfig, TextTower
from gmail_jax.models.diffusion import weights
from gmail_jax.models.tokenizer import EOT, Tokenizer


def text_config_from_hf(config: dict) -> TextConfig:
  """:class:`TextConfig` from a ``CLIPTextModel`` ``config.json`` (flat: ``hidden_size``, ...;
  missing keys take transformers' defaults); one-line error for what the tower cannot run."""
  model_type = config.get("model_type", "clip_text_model")
  if model_type != "clip_text_model":
    raise ConfigError(
      f"text_encoder config: model_type={model_type!r}, expected 'clip_text_model' "
      "(transformers CLIPTextModel)"
    )
  if config.get("use_attention_mask"):
    # diffusers then passes the padding mask to the encoder; the tower only has the causal mask.
    raise ConfigError("text_encoder config: use_attention_mask=true is not supported")
  return convert.clip_config_from_hf({"text_config": config}).text


class TextEncoder(nnx.Module):
  """``TextEncoder(ids [N, L]) -> [N, L, width]`` fp32: ``CLIPTextModel(ids).last_hidden_state``.

  ``text_model`` is a :class:`~gmail_jax.models.clip.TextTower` without projection; ``dtype`` is
  its compute dtype (LayerNorm and softmax stay fp32), params ``param_dtype``.
  """

  def __init__(
    self, config: TextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
  ) -> None:
    self.config = config
    # Inference only: no remat, and no residual-loop boundaries (an XLA:CPU aid for training).
    self.text_model = TextTower(
      config, None, dtype=dtype, param_dtype=param_dtype, residual_loops=False, rngs=rngs
    )

  def __call__(self, ids: jax.Array, clip_skip: int = 0) -> jax.Array:
    """``clip_skip=k``: the output of layer ``layers - k`` through ``final_layer_norm`` (diffusers'
    ``clip_skip``); 0 is the last layer."""
    return self.text_model.hidden_states(ids, clip_skip).astype(jnp.float32)


def text_encoder_key(path: tuple, prefix: str = "text_model."):
  """(transformers key, array map) of a :class:`TextEncoder` parameter, e.g.
  ``text_model/blocks/0/attn/q_proj/kernel`` <- ``text_model.encoder.layers.0.self_attn.q_proj
  .weight`` transposed. ``prefix=""``: the keys of files saved by transformers >= 5, whose
  ``CLIPTextModel`` lost its ``text_model`` submodule (it strips the prefix of older files on load:
  ``conversion_mapping`` ``PrefixChange``)."""
  if not path or str(path[0]) != "text_model":
    raise KeyError(f"no transformers name for NNX parameter {'/'.join(map(str, path))}")
  key, fn = convert.hf_key(("text", *path[1:]))
  return prefix + key.removeprefix("text_model."), fn


def load_text_encoder(
  path: str, *, dtype=None, param_dtype=jnp.float32, variant: str | None = None
) -> TextEncoder:
  """A :class:`TextEncoder` from a ``text_encoder/`` folder (``config.json`` + ``model.safetensors``
  or ``pytorch_model.bin``) or a pipeline root holding one. Strict: a missing, unexpected or
  misshapen tensor is a one-line :class:`~gmail_jax.models.convert.CheckpointError` naming the key
  (only the ``position_ids`` buffer old files carry is skipped). Keys are ``text_model.*`` (every
  Stable Diffusion release, saved by transformers 4) or, in a file without any ``text_model.`` key,
  unprefixed (saved by transformers 5); errors name them as the file does."""
  folder = weights.component_dir(path, "text_encoder")
  config = text_config_from_hf(weights.read_config(folder))
  state_dict, source = weights.read_weights(folder, weights.TRANSFORMERS_STEMS, variant)
  prefix = "text_model." if any(k.startswith("text_model.") for k in state_dict) else ""

  def make() -> TextEncoder:
    return TextEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))

  key_fn = lambda p: text_encoder_key(p, prefix)
  return convert.load_state_into(make, state_dict, source, key_fn=key_fn)


class SDTokenizer:
  """``SDTokenizer(texts) -> int32 [N, context_length]``, id for id transformers'
  ``CLIPTokenizer(texts, padding="max_length", max_length=context_length, truncation=True)``
  with ``pad_token``: ``[SOT] + ids[:context_length - 2] + [EOT]``, then ``pad_id`` to the end.

  A pad token other than ``<|endoftext|>`` is a special token in transformers: each occurrence
  in the raw text is cut out before normalisation and becomes ``pad_id`` (see module docstring).
  """

  def __init__(self, tokenizer: Tokenizer, pad_token: str = EOT, context_length: int = 77):
    if pad_token not in tokenizer.vocab:
      raise InputError(f"pad token {pad_token!r} is not in the vocabulary of {tokenizer.path}")
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2, got {context_length}")
    self.tokenizer = tokenizer
    self.pad_token = pad_token
    self.pad_id = int(tokenizer.vocab[pad_token])
    self.context_length = context_length

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without SOT/EOT and without truncation."""
    if self.pad_token == EOT:
      return self.tokenizer.encode(text)
    ids: list[int] = []
    for i, segment in enumerate(text.split(self.pad_token)):
      if i:
        ids.append(self.pad_id)
      ids.extend(self.tokenizer.encode(segment))
    return ids

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    tok = self.tokenizer
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    for n, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"text {n} is {type(text).__name__}, expected str")
      ids = [tok.sot_id, *self.encode(text)[: self.context_length - 2], tok.eot_id]
      out[n, : len(ids)] = ids
    return out


def sd_tokenize(
  texts: str | Sequence[str],
  pad_id: int,
  context: int = 77,
  *,
  tokenizer: Tokenizer | None = None,
) -> np.ndarray:
  """int32 ``[N, context]`` padded with ``pad_id`` (49407 = ``<|endoftext|>`` for SD 1.x, 0 =
  ``"!"`` for SD 2.x), as :class:`SDTokenizer`. ``tokenizer``: the BPE (None: OpenAI's vocabulary
  shipped by ``openai-clip``, which SD 1.x and 2.x both use)."""
  tokenizer = tokenizer or Tokenizer()
  inverse = {i: t for t, i in tokenizer.vocab.items()}
  if pad_id not in inverse:
    raise InputError(f"pad_id {pad_id} is not in the vocabulary of {tokenizer.path}")
  return SDTokenizer(tokenizer, inverse[pad_id], context)(texts)


def _token_content(value) -> str | None:
  """A special token as transformers stores it: a string or ``{"content": ...}``."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def read_pad_token(path: str) -> str:
  """The pad token transformers' ``CLIPTokenizer.from_pretrained(path)`` (v5) uses.

  ``tokenizer_config.json``'s ``pad_token`` (default ``<|endoftext|>``), overridden by
  ``special_tokens_map.json``'s unless the config carries ``added_tokens_decoder`` (files saved by
  transformers >= 4.34, where the legacy map is not read). SD 2.x ships a config saying
  ``<|endoftext|>`` and a map saying ``"!"``: the map wins.
  """
  config: dict = {}
  special: dict = {}
  for name, target in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
    file = os.path.join(path, name)
    if os.path.exists(file):
      try:
        with open(file, encoding="utf-8") as f:
          target.update(json.load(f))
      except (OSError, ValueError) as e:
        raise InputError(f"cannot read {file}: {type(e).__name__}: {e}") from None
  pad = _token_content(config.get("pad_token")) or EOT
  if "added_tokens_decoder" not in config and _token_content(special.get("pad_token")):
    pad = _token_content(special["pad_token"])
  return pad


def load_sd_tokenizer(path: str) -> SDTokenizer:
  """The prompt tokenizer of a ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``, or the
  ``tokenizer.json`` transformers 5 writes; pad token
  as :func:`read_pad_token`, ``model_max_length`` from ``tokenizer_config.json``, default 77) or of
  a pipeline root holding one."""
  path = os.fspath(path)
  files = ("vocab.json", "tokenizer.json")
  sub = os.path.join(path, "tokenizer")
  if not any(os.path.exists(os.path.join(path, f)) for f in files) and any(
    os.path.exists(os.path.join(sub, f)) for f in files
  ):
    path = sub
  context = 77
  config_file = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(config_file):
    try:
      with open(config_file, encoding="utf-8") as f:
        context = int(json.load(f).get("model_max_length", 77))
    except (OSError, ValueError, TypeError) as e:
      raise InputError(f"cannot read {config_file}: {type(e).__name__}: {e}") from None
    if context > 77:  # transformers' "unset" sentinel is ~1e30; CLIP's positions are 77
      context = 77
  return SDTokenizer(Tokenizer(path, context_length=context), read_pad_token(path), context)
