"""ClipCap (Mokady et al. 2021) with GMAIL's dual projection, on precomputed CLIP embeddings.

Defaults are ClipCap's ``train.py`` (papers.md A.6 #5): MLP mapper with prefix 10 and GPT-2
fine-tuned (``trainable='all'``) in train mode (dropout 0.1), or ``mapper='transformer'``, prefix
40, GPT-2 frozen (``trainable='prefix'``, eval mode); ``transformers.AdamW(model.parameters(),
lr=2e-5)`` with that class's defaults (weight decay 0, eps 1e-6; captioner.py ``hf_adamw``),
``get_linear_schedule_with_warmup(5000)``, 10 epochs, batch 40; prefixes are the raw CLIP
embeddings (``--normalize_prefix`` off; ``normalize_prefix=True`` L2-normalises them).

Deviations, each a named setting: ``lm=''`` builds a small GPT-2 from scratch (no pretrained
weights offline) and ``compact_vocab`` restricts its softmax to the training captions' tokens
(CPU speed); ``max_len`` truncates training captions (ClipCap: from the data's length statistics)
and bounds decoding (``decode_len``, 0 = ``max_len``; ClipCap's generation allows 67 tokens and
stops at '.'; here decoding stops at the end-of-text token).

GMAIL's dual projection: generated pairs train the ``gen`` head (Proj-Gen, fed f_g(x_g)), real
pairs the ``real`` head (Proj-Real, fed f_r(x_r)); both share the language model. Real images are
captioned through f_r + Proj-Real. With no real training pairs Proj-Real never sees data, so it
is the trained Proj-Gen (GMAIL's premise: f_g(x_g) was aligned onto f_r(x_r)). Without dual
projection one ``shared`` head serves both (ClipCap as published).

Embeddings are computed once (by the caller, see ``evaluators/captioning.py``) and the captioner
trains on them, as ClipCap's ``parse_coco.py`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np
from flax import nnx

from gmail_jax.captioning import captioner as cap_lib
from gmail_jax.captioning import gpt2, text

DEFAULTS = dict(
  lm="",  # GPT-2 dir or hub id; '' = a GPT-2 of lm_layers/lm_heads/lm_width from scratch
  tokenizer="",  # '' = the lm's own tokenizer, or CLIP's BPE for a from-scratch lm
  compact_vocab=True,  # from-scratch lm: predict over the training captions' tokens only
  lm_layers=4,
  lm_heads=4,
  lm_width=256,
  mapper="mlp",
  prefix_length=10,
  mapper_layers=8,  # transformer mapper only
  trainable="all",  # 'prefix' = ClipCap --only_prefix (GPT-2 frozen, in eval mode)
  dual_projection=True,
  normalize_prefix=False,  # ClipCap --normalize_prefix: L2-normalise the embeddings fed
  lr=2e-5,
  warmup_steps=5000,
  epochs=10,
  steps=0,  # > 0 overrides epochs
  batch_size=40,
  weight_decay=0.0,  # transformers.AdamW's default (ClipCap passes none)
  adam_eps=1e-6,  # transformers.AdamW's default
  dropout=0.1,  # GPT-2's dropout (embedding, attention, residual) while it trains; 0 = off
  label_smoothing=0.0,
  max_len=30,  # caption tokens trained on (EOS included)
  decode_len=0,  # most tokens decoded; 0 = max_len
  beam_size=1,
  seed=0,
)


def settings(overrides: dict | ml_collections.ConfigDict | None = None) -> dict:
  """DEFAULTS with ``overrides``; an unknown key is an error naming it."""
  out = dict(DEFAULTS)
  for key, value in dict(overrides or {}).items():
    if key not in DEFAULTS:
      raise ValueError(f"captioner: unknown setting {key!r} (known: {sorted(DEFAULTS)})")
    out[key] = value
  return out


def tokenizer(s: dict) -> text.CaptionTokenizer:
  return text.from_name(s["tokenizer"] or s["lm"] or "clip_bpe")


def decode_len(s: dict) -> int:
  return s["decode_len"] or s["max_len"]


def language_model(s: dict, tok: text.CaptionTokenizer, max_positions: int) -> gpt2.GPT2:
  """The GPT-2 of ``s`` with the dropout rate ``s['dropout']`` at its three sites."""
  rate = float(s["dropout"])
  rates = dict(embd_pdrop=rate, attn_pdrop=rate, resid_pdrop=rate)
  if s["lm"]:
    lm = gpt2.from_pretrained(s["lm"])
    lm.config = dataclasses.replace(lm.config, **rates)
    return lm
  config = gpt2.GPT2Config(
    vocab_size=tok.vocab_size,
    n_positions=max_positions,
    n_embd=s["lm_width"],
    n_layer=s["lm_layers"],
    n_head=s["lm_heads"],
    bos_token_id=tok.eos_id,
    eos_token_id=tok.eos_id,
    **rates,
  )
  return gpt2.GPT2(config, rngs=nnx.Rngs(s["seed"]))


def build(s: dict, clip_dim: int, tok: text.CaptionTokenizer) -> cap_lib.Captioner:
  lm = language_model(s, tok, s["prefix_length"] + max(s["max_len"], decode_len(s)) + 1)
  kw = {"num_layers": s["mapper_layers"]} if s["mapper"] == "transformer" else {}
  return cap_lib.Captioner(
    lm,
    mapper=s["mapper"],
    clip_dim=clip_dim,
    prefix_length=s["prefix_length"],
    heads=("gen", "real") if s["dual_projection"] else ("shared",),
    rngs=nnx.Rngs(s["seed"] + 1),
    **kw,
  )


def prefixes(s: dict, feats: np.ndarray) -> np.ndarray:
  """The embeddings a captioner of ``s`` is fed: as they are, or L2-normalised with
  ``normalize_prefix`` (ClipCap's ``prefix / prefix.norm(2, -1)``), float32."""
  feats = np.asarray(feats, np.float32)
  if not s["normalize_prefix"]:
    return feats
  return feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)


def num_steps(s: dict, n: int) -> int:
  return s["steps"] or s["epochs"] * max(1, -(-n // s["batch_size"]))


@dataclasses.dataclass
class Trained:
  captioner: cap_lib.Captioner
  tokenizer: text.CaptionTokenizer
  settings: dict
  losses: list[float]
  real_head: str  # the head real images are captioned through

  def caption(self, feats: np.ndarray, batch_size: int = 64) -> list[str]:
    """Captions of embeddings [N, C] (fed as in training: ``prefixes``)."""
    ids = cap_lib.generate(
      self.captioner,
      prefixes(self.settings, feats),
      head=self.real_head,
      eos_id=self.tokenizer.eos_id,
      max_len=decode_len(self.settings),
      beam_size=self.settings["beam_size"],
      batch_size=batch_size,
    )
    return self.tokenizer.decode_batch(ids)


def train(
  s: dict,
  generated: tuple[np.ndarray, list[str]] | None,
  real: tuple[np.ndarray, list[str]] | None = None,
  *,
  log: Callable[[int, float], None] | None = None,
  log_every: int = 1,
) -> Trained:
  """Trains on (embeddings [N, C], one caption per row) of generated and/or real pairs, fed
  through ``prefixes`` (raw, or L2-normalised with ``normalize_prefix``)."""
  parts = [(name, p) for name, p in (("gen", generated), ("real", real)) if p is not None]
  if not parts:
    raise ValueError("clipcap.train: no training pairs (neither generated nor real)")
  captions = [c for _, p in parts for c in p[1]]
  tok = tokenizer(s)
  if not s["lm"] and s["compact_vocab"]:
    tok = text.compact(tok, captions)
  clip_dim = parts[0][1][0].shape[1]
  model = build(s, clip_dim, tok)
  feats = prefixes(s, np.concatenate([np.asarray(p[0], np.float32) for _, p in parts]))
  if len(captions) != len(feats):
    raise ValueError(f"clipcap.train: {len(feats)} embeddings for {len(captions)} captions")
  names = [name if s["dual_projection"] else "shared" for name, p in parts for _ in p[1]]
  head = np.asarray([model.head_index(n) for n in names], np.int32)
  ids, mask = tok.batch(captions, s["max_len"])
  losses = cap_lib.fit(
    model,
    feats,
    head,
    ids,
    mask,
    steps=num_steps(s, len(feats)),
    batch_size=s["batch_size"],
    lr=s["lr"],
    warmup_steps=s["warmup_steps"],
    weight_decay=s["weight_decay"],
    eps=s["adam_eps"],
    label_smoothing=s["label_smoothing"],
    trainable=s["trainable"],
    seed=s["seed"],
    log=log,
    log_every=log_every,
  )
  real_head = "shared"
  if s["dual_projection"]:
    real_head = "real" if real is not None else "gen"
  return Trained(model, tok, s, losses, real_head)
