"""NNX :class:`~gmail_jax.models.clip.CLIP` -> a Hugging Face (transformers) CLIP directory.

The inverse of :mod:`gmail_jax.models.convert`, with its name mapping (``convert.hf_key``) run
backwards (``convert.to_hf_layout``: kernel -> weight.T, HWIO -> OIHW, LayerNorm scale -> weight).
``save_pretrained(model, out)`` writes

    config.json                 CLIPConfig; ``convert.clip_config_from_hf`` gives back model.config
    model.safetensors           float32, HF key names and layouts
    vocab.json, merges.txt      CLIP BPE (``tokenizer_dir``'s, else openai-clip's)
    tokenizer_config.json       CLIPTokenizer, model_max_length = text context length
    special_tokens_map.json
    preprocessor_config.json    CLIPImageProcessor for image_size (bicubic, CLIP mean/std)

so that ``convert.load_pretrained(out)`` and ``transformers.CLIPModel.from_pretrained(out)`` both
load it. Text pooling follows ``eos_token_id`` as in HF: 2 (legacy configs) pools at argmax(ids),
any other id at the first occurrence of that id. ``logit_scale`` (SigLIP: and ``logit_bias``) is
the model's own, so transformers' ``logits_per_image`` equal the model's ``__call__`` (for a run's
student: the logit head the run trained, gmail_jax/run.py).

``save_siglip_pretrained(model, out, spiece=...)`` does the same for a SigLIP model
(``siglip.hf_key`` run backwards, the MAP head's q/k/v stacked back into ``in_proj``): a
transformers SiglipModel directory with ``spiece.model``, a SiglipTokenizer config and a
SiglipImageProcessor config (squash resize, mean = std = 0.5).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from gmail_jax import storage
from gmail_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from gmail_jax.models import convert, lora
from gmail_jax.models import tokenizer as tk
from gmail_jax.models.clip import CLIP, CLIPConfig

# HF's CLIPTextConfig default: unused by the model (its embedding has no padding_idx) and, like the
# openai checkpoints' configs, not the tokenizer's pad (EOT).
_HF_PAD_TOKEN_ID = 1


def hf_config(config: CLIPConfig, *, bos_token_id: int = 49406) -> dict:
  """``config.json`` (transformers CLIPConfig) for ``config``; ``convert.clip_config_from_hf``
  maps it back to ``config`` exactly."""
  v, t = config.vision, config.text
  common = dict(attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0)
  return {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "dtype": "float32",
    "projection_dim": config.embed_dim,
    "logit_scale_init_value": config.logit_scale_init,
    "initializer_factor": 1.0,
    "text_config": {
      "model_type": "clip_text_model",
      "vocab_size": t.vocab_size,
      "hidden_size": t.width,
      "intermediate_size": t.mlp_dim,
      "num_hidden_layers": t.layers,
      "num_attention_heads": t.heads,
      "max_position_embeddings": t.context_length,
      "hidden_act": t.act,
      "layer_norm_eps": t.ln_eps,
      "projection_dim": config.embed_dim,
      "bos_token_id": bos_token_id,
      "eos_token_id": t.eos_token_id,
      "pad_token_id": _HF_PAD_TOKEN_ID,
      **common,
    },
    "vision_config": {
      "model_type": "clip_vision_model",
      "hidden_size": v.width,
      "intermediate_size": v.mlp_dim,
      "num_hidden_layers": v.layers,
      "num_attention_heads": v.heads,
      "num_channels": 3,
      "image_size": v.image_size,
      "patch_size": v.patch_size,
      "hidden_act": v.act,
      "layer_norm_eps": v.ln_eps,
      "projection_dim": config.embed_dim,
      **common,
    },
  }


def hf_state_dict(
  model: nnx.Module,
  *,
  key_fn: Callable[[tuple], tuple[str, Any]] = convert.hf_key,
  layout_fn: Callable[[Any, np.ndarray], np.ndarray] = convert.to_hf_layout,
) -> dict[str, np.ndarray]:
  """The model's parameters as float32 numpy arrays under HF key names, in HF layouts
  (``key_fn``: the tower's importer mapping, ``layout_fn``: its inverse array map).

  Raises ValueError when LoRA adapters are still attached (HF's models have no place for them).
  """
  adapted = lora.adapted_paths(model)
  if adapted:
    raise ValueError(
      f"save_pretrained: {len(adapted)} layer(s) still have LoRA adapters (e.g. {adapted[0]}); "
      "fold them in with lora.merge_lora(model) first"
    )
  out: dict[str, np.ndarray] = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    try:
      key, fn = key_fn(path)
    except KeyError as e:
      raise ValueError(f"save_pretrained: {e.args[0]}") from None
    value = np.asarray(jax.device_get(var[...])).astype(np.float32)
    # copy(order="C"), not ascontiguousarray: that one turns the 0-d logit_scale into shape (1,).
    out[key] = layout_fn(fn, value).copy(order="C")
  return out


def tokenizer_files(
  vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int
) -> dict[str, str]:
  """File name -> text of an HF ``CLIPTokenizer`` directory for a CLIP BPE vocabulary."""
  specials = {
    "bos_token": tk.SOT,
    "eos_token": tk.EOT,
    "unk_token": tk.EOT,
    "pad_token": tk.EOT,  # CLIP pads with EOT, as gmail_jax.models.tokenizer.Tokenizer does
  }
  # No added_tokens_decoder: CLIPTokenizer registers the specials itself, and so keeps the
  # behaviour tests/test_models_tokenizer.py checks our Tokenizer against.
  tokenizer_config = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": context_length,
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    **specials,
  }
  return {
    "vocab.json": json.dumps(vocab, ensure_ascii=False),
    "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
    "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
    "special_tokens_map.json": json.dumps(specials, indent=2),
  }


def preprocessor_config(image_size: int) -> dict:
  """``preprocessor_config.json``: HF CLIPImageProcessor = gmail_jax.data.preprocess for S."""
  return {
    "image_processor_type": "CLIPImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": image_size},
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": {"height": image_size, "width": image_size},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
  }


def _load_vocab(tokenizer_dir: str | None) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """What ``Tokenizer(path)`` reads: a dir with vocab.json + merges.txt, a
  bpe_simple_vocab_16e6.txt.gz, or None for openai-clip's copy."""
  if tokenizer_dir is None:
    return tk.vocab_from_bpe_gz(tk.default_bpe_path())
  path = os.fspath(tokenizer_dir)
  if not os.path.isdir(path) and path.endswith(".gz"):
    return tk.vocab_from_bpe_gz(path)
  return tk.vocab_from_dir(path)


def _check_vocab(vocab: dict[str, int], config: CLIPConfig) -> None:
  """The written tokenizer must produce ids the exported model can embed and pool."""
  text = config.text
  for special in (tk.SOT, tk.EOT):
    if special not in vocab:
      raise ValueError(f"save_pretrained: tokenizer vocabulary lacks {special}")
  top = max(vocab.values())
  if top >= text.vocab_size:
    raise ValueError(
      f"save_pretrained: tokenizer has id {top}, model vocab_size is {text.vocab_size}"
    )
  # eos_token_id 2 marks a legacy config that pools at argmax(ids), whatever the EOT id.
  if text.eos_token_id != 2 and vocab[tk.EOT] != text.eos_token_id:
    raise ValueError(
      f"save_pretrained: tokenizer's {tk.EOT} id {vocab[tk.EOT]} != model eos_token_id "
      f"{text.eos_token_id} (text pooling would read the wrong token)"
    )


def save_pretrained(
  model: CLIP, out_dir: str, *, tokenizer_dir: str | None = None, overwrite: bool = False
) -> str:
  """Writes ``model`` as a transformers CLIP directory (see module doc); returns ``out_dir``.

  ``tokenizer_dir``: a dir with ``vocab.json`` + ``merges.txt``, or a
  ``bpe_simple_vocab_16e6.txt.gz`` (what a run's ``Tokenizer.path`` holds); None uses openai-clip's
  BPE.
  The directory appears atomically (built in a sibling temp dir, then renamed; in a bucket: built
  locally, then uploaded, ``write_dir``). An existing non-empty ``out_dir`` is refused unless
  ``overwrite=True``, which replaces it.
  """
  out_dir = os.fspath(out_dir)
  _check_out_dir(out_dir, overwrite)
  # Everything that can fail on the model or tokenizer runs before anything touches the disk.
  config = model.config
  state = hf_state_dict(model)
  vocab, merges = _load_vocab(tokenizer_dir)
  _check_vocab(vocab, config)
  texts = {
    "config.json": json.dumps(hf_config(config, bos_token_id=vocab[tk.SOT]), indent=2),
    "preprocessor_config.json": json.dumps(preprocessor_config(config.vision.image_size), indent=2),
    **tokenizer_files(vocab, merges, config.text.context_length),
  }

  return _write_dir(out_dir, state, texts)


def siglip_preprocessor_config(image_size: int) -> dict:
  """``preprocessor_config.json``: HF SiglipImageProcessor (bicubic squash to SxS, no crop)."""
  return {
    "image_processor_type": "SiglipImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"height": image_size, "width": image_size},
    "resample": 3,  # PIL bicubic
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
  }


def siglip_tokenizer_files(context_length: int) -> dict[str, str]:
  """File name -> text of an HF ``SiglipTokenizer`` config (beside ``spiece.model``)."""
  # SigLIP pads with </s>, as gmail_jax.models.siglip_tokenizer.SiglipTokenizer does.
  specials = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
  tokenizer_config = {
    "tokenizer_class": "SiglipTokenizer",
    "model_max_length": context_length,
    "do_lower_case": True,
    **specials,
  }
  return {
    "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
    "special_tokens_map.json": json.dumps(specials, indent=2),
  }


def save_siglip_pretrained(
  model: nnx.Module, out_dir: str, *, spiece: str, overwrite: bool = False
) -> str:
  """Writes a :class:`~gmail_jax.models.siglip.Siglip` as a transformers SiglipModel directory
  (see module doc) with the SentencePiece model ``spiece``; returns ``out_dir``. Atomic and
  ``overwrite`` as :func:`save_pretrained`."""
  from gmail_jax.models import siglip

  out_dir = os.fspath(out_dir)
  _check_out_dir(out_dir, overwrite)
  config = model.config
  state = siglip.join_in_proj(
    hf_state_dict(model, key_fn=siglip.hf_key, layout_fn=siglip.to_hf_layout)
  )
  if not os.path.isfile(spiece):
    raise ValueError(f"save_pretrained: SentencePiece model {spiece} not found")
  texts = {
    "config.json": json.dumps(siglip.hf_config(config), indent=2),
    "preprocessor_config.json": json.dumps(
      siglip_preprocessor_config(config.vision.image_size), indent=2
    ),
    **siglip_tokenizer_files(config.text.context_length),
  }
  return _write_dir(out_dir, state, texts, {"spiece.model": spiece})


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  out = storage.path(out_dir)
  if out.exists():
    if not out.is_dir():
      raise FileExistsError(f"save_pretrained: {out_dir} exists and is not a directory")
    if any(out.iterdir()) and not overwrite:
      raise FileExistsError(
        f"save_pretrained: {out_dir} exists and is not empty (pass overwrite=True to replace it)"
      )


def write_dir(out_dir: str, fill: Callable[[str], Any]) -> None:
  """``fill(d)`` writes the files of ``out_dir`` into the local folder ``d``; then they become
  ``out_dir``, replacing what was there. Local: ``d`` is a sibling temp folder renamed into place
  (atomic). Bucket (no rename): ``d`` is a local temp folder; once ``fill`` returns, ``out_dir``'s
  old objects are removed and ``d``'s uploaded (a crash in between leaves it partial; the export
  stage records it only after the upload, so a rerun writes it again)."""
  if storage.is_remote(out_dir):
    with storage.staged_dir(out_dir) as tmp:
      fill(os.fspath(tmp))
      storage.rmtree(out_dir)  # an overwritten directory's files go; staged_dir uploads
    return
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(os.path.abspath(out_dir))
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    fill(tmp)
    _replace_dir(tmp, out_dir, parent, base)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_dir(
  out_dir: str,
  state: dict[str, np.ndarray],
  texts: dict[str, str],
  copies: dict[str, str] | None = None,
) -> str:
  """``out_dir`` with model.safetensors, the ``texts`` and ``copies`` (name -> source file),
  as ``write_dir`` writes it."""
  from safetensors.numpy import save_file

  def fill(tmp: str) -> None:
    # transformers refuses safetensors files without format metadata.
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for name, text in texts.items():
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        f.write(text)
    for name, src in (copies or {}).items():
      shutil.copyfile(src, os.path.join(tmp, name))

  write_dir(out_dir, fill)
  return out_dir


def _replace_dir(tmp: str, out_dir: str, parent: str, base: str) -> None:
  """Renames ``tmp`` onto ``out_dir``; an existing one is moved aside first and removed after."""
  if not os.path.exists(out_dir):
    os.rename(tmp, out_dir)
    return
  old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
  os.rename(out_dir, os.path.join(old, base))
  try:
    os.rename(tmp, out_dir)
  except BaseException:
    os.rename(os.path.join(old, base), out_dir)  # put the original back
    os.rmdir(old)
    raise
  shutil.rmtree(old, ignore_errors=True)
