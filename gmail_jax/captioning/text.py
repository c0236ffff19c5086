"""Caption token ids for a captioner's language model: GPT-2's BPE or CLIP's.

``hf(path)``: the tokenizer saved with a pretrained GPT-2 (ClipCap); ``clip_bpe(path)``: CLIP's
lower-cased BPE over 49,408 symbols (DeCap trains its decoder from scratch on it, and it is the
only vocabulary available offline, so the offline configs use it too). Both end a caption with the
vocabulary's end-of-text token, which decoding stops at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from gmail_jax.models.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class CaptionTokenizer:
  name: str
  vocab_size: int
  eos_id: int
  encode: Callable[[str], list[int]]  # ids without special tokens
  decode: Callable[[Sequence[int]], str]  # stops at eos_id

  def batch(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 [N, max_len]: the caption's tokens truncated to max_len - 1, then EOS;
    padding (mask 0) after it."""
    ids = np.full((len(captions), max_len), self.eos_id, np.int32)
    mask = np.zeros((len(captions), max_len), np.int32)
    for n, text in enumerate(captions):
      toks = [*self.encode(text)[: max_len - 1], self.eos_id]
      ids[n, : len(toks)] = toks
      mask[n, : len(toks)] = 1
    return ids, mask

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    return [self.decode(row) for row in np.asarray(ids)]


def clip_bpe(path: str | None = None) -> CaptionTokenizer:
  tok = Tokenizer(path)
  return CaptionTokenizer("clip_bpe", tok.vocab_size, tok.eot_id, tok.encode, tok.decode)


def hf(path: str) -> CaptionTokenizer:
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(path)
  eos = tok.eos_token_id

  def decode(ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if eos in ids:
      ids = ids[: ids.index(eos)]
    return tok.decode(ids, skip_special_tokens=True).strip()

  return CaptionTokenizer(
    f"hf:{path}", len(tok), eos, lambda t: tok(t, add_special_tokens=False)["input_ids"], decode
  )


def from_name(name: str) -> CaptionTokenizer:
  """'clip_bpe' (the copy shipped with openai-clip), 'clip_bpe:PATH', or a GPT-2 dir / hub id."""
  if name == "clip_bpe" or name.startswith("clip_bpe:"):
    return clip_bpe(name.partition(":")[2] or None)
  return hf(name)


def compact(tok: CaptionTokenizer, captions: Sequence[str]) -> CaptionTokenizer:
  """``tok`` restricted to the tokens of ``captions`` (+ EOS), renumbered 0..K-1.

  For a language model trained from scratch: only these tokens ever get a positive target, so a
  softmax over all 49,408 CLIP tokens would cost most of each step and change no decision worth
  having. Tokens outside the set are dropped when encoding."""
  used = sorted({i for c in captions for i in tok.encode(c)} | {tok.eos_id})
  new_id = {old: new for new, old in enumerate(used)}

  def encode(text: str) -> list[int]:
    return [new_id[i] for i in tok.encode(text) if i in new_id]

  def decode(ids: Sequence[int]) -> str:
    return tok.decode([used[int(i)] for i in ids if 0 <= int(i) < len(used)])

  return CaptionTokenizer(f"{tok.name}[{len(used)}]", len(used), new_id[tok.eos_id], encode, decode)
