"""Tiny random Hugging Face CLIP checkpoints and CLIP tokenizer files, built offline for tests.

torch / transformers are imported lazily with ``pytest.importorskip``: a test that uses these
helpers is skipped, not failed, where they are not installed.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from gmail_jax.models import tokenizer as tk


def write_clip_tokenizer_files(path: str | pathlib.Path) -> pathlib.Path:
  """OpenAI's CLIP BPE (shipped by ``openai-clip``) as HF ``vocab.json`` + ``merges.txt``."""
  path = pathlib.Path(path)
  vocab, merges = tk.vocab_from_bpe_gz(tk.default_bpe_path())
  (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (path / "merges.txt").write_text(
    "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
  )
  return path


def tiny_clip_config(
  *,
  act: str = "quick_gelu",
  layers: int = 2,
  eos_token_id: int = 49407,
  text: dict | None = None,
  vision: dict | None = None,
):
  """A ``transformers.CLIPConfig``: both towers width 32, mlp 64, 4 heads, ``layers`` blocks;
  full CLIP vocab and 77-token context; 32px images in 8px patches; projection 16.
  ``text`` / ``vision`` override single keys of either tower."""
  transformers = pytest.importorskip("transformers")
  tower = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4
  )
  text_cfg = dict(
    tower,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act=act,
    eos_token_id=eos_token_id,
  )
  vision_cfg = dict(tower, image_size=32, patch_size=8, hidden_act=act)
  return transformers.CLIPConfig(
    text_config={**text_cfg, **(text or {})},
    vision_config={**vision_cfg, **(vision or {})},
    projection_dim=16,
  )


def hf_clip(config, *, seed: int = 0, logit_scale: float | None = None):
  """A random ``transformers.CLIPModel`` (torch seeded with ``seed``) in eval mode.
  ``logit_scale``: overwrite HF's default log-scale init (to test its mapping)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  if logit_scale is not None:
    with torch.no_grad():
      model.logit_scale.fill_(logit_scale)
  return model


def save_tiny_hf_clip(
  path: str | pathlib.Path,
  *,
  act: str = "quick_gelu",
  layers: int = 1,
  seed: int = 0,
  text: dict | None = None,
  vision: dict | None = None,
) -> pathlib.Path:
  """A random tiny CLIPModel (:func:`tiny_clip_config`) saved with ``save_pretrained`` into
  ``path``, plus its tokenizer files (:func:`write_clip_tokenizer_files`): a complete offline
  checkpoint dir for ``api.load_clip``."""
  path = pathlib.Path(path)
  cfg = tiny_clip_config(act=act, layers=layers, text=text, vision=vision)
  hf_clip(cfg, seed=seed).save_pretrained(path)
  return write_clip_tokenizer_files(path)
