"""SigLIP's SentencePiece tokenizer, id-for-id equal to transformers' ``SiglipTokenizer`` with
``padding="max_length", truncation=True`` (as SigLIP was trained).

Per text (what ``SiglipTokenizer`` does):

  1. prefix ``▁``, lower-case, delete ``string.punctuation``, ``\\s+`` runs -> one space, strip;
  2. SentencePiece pieces of ``<unk>`` + that text, minus the pieces of ``<unk>`` itself (so that no
     dummy prefix is added); a lone leading ``▁`` is dropped;
  3. ``ids[:context_length - 1] + [</s>]``, padded with the pad id (``</s>`` too) to the context.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Sequence

import numpy as np

from gmail_jax.errors import InputError

SPIECE = "spiece.model"
_UNDERLINE = "\u2581"
_PUNCT = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


class SiglipTokenizer:
  """``SiglipTokenizer(path, context_length)(texts) -> np.int32 [N, context_length]``.

  ``path``: a ``spiece.model`` or a checkpoint directory holding one.
  """

  def __init__(self, path: str | os.PathLike, context_length: int = 64):
    import sentencepiece as spm

    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, SPIECE)
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise InputError(f"cannot read SentencePiece model {path}: {e}") from None
    if context_length < 1:
      raise ValueError(f"context_length must be >= 1, got {context_length}")
    self.path = path
    self.context_length = context_length
    self.eot_id = self.pad_id = self.sp.piece_to_id("</s>")
    self._unk_len = len(self.sp.encode("<unk>", out_type=str))
    self._specials = {"</s>", "<unk>", "<pad>"}

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without ``</s>`` and without truncation."""
    text = (_UNDERLINE + text.replace(_UNDERLINE, " ")).lower().translate(_PUNCT)
    text = _WHITESPACE.sub(" ", text).strip()
    pieces = self.sp.encode("<unk>" + text, out_type=str)
    pieces = pieces[self._unk_len :] if len(pieces) >= self._unk_len else pieces
    if len(pieces) > 1 and pieces[0] == _UNDERLINE and pieces[1] in self._specials:
      pieces = pieces[1:]
    return [self.sp.piece_to_id(p) for p in pieces]

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 [N, context_length]: ids truncated to ``context_length - 1``, ``</s>``, padding."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    for n, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"text {n} is {type(text).__name__}, expected str")
      ids = [*self.encode(text)[: self.context_length - 1], self.eot_id]
      out[n, : len(ids)] = ids
    return out
