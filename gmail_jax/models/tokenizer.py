"""CLIP byte-level BPE tokenizer, id-for-id equal to transformers' ``CLIPTokenizer`` (v5).

Per text (what the ``tokenizers`` pipeline of ``CLIPTokenizer`` does, re-implemented here):

  1. special tokens (``<|startoftext|>``, ``<|endoftext|>``) are cut out of the raw text first;
  2. normalise each remaining segment: Unicode NFC, every ``\\s+`` run -> one space, lower-case
     (per character, like Rust's ``char::to_lowercase``); NO ftfy / html.unescape (OpenCLIP's
     SimpleTokenizer does those, so ``&amp;`` differs between the two);
  3. pre-tokenise with ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`` (whitespace
     dropped; every digit is its own word), then GPT-2's byte-level pattern within each piece;
  4. each word -> UTF-8 bytes -> GPT-2 byte-to-unicode symbols, ``</w>`` appended to the last one;
     merge the adjacent pair of lowest merge rank until none applies (Sennrich et al., 2016);
  5. ``[SOT] + ids[:context_length - 2] + [EOT]``, padded with EOT to ``context_length``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

from gmail_jax.errors import InputError

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_PRETOKENIZE = regex.compile(
  r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# tokenizers' ByteLevel pre-tokenizer (use_regex=True) splits each piece again with GPT-2's pattern;
# this only matters for pieces like "<|endoftext|>" produced by lower-casing "<|ENDOFTEXT|>".
_BYTE_LEVEL = regex.compile(
  r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_WHITESPACE = regex.compile(r"\s+")
_SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP table mapping each byte to a printable unicode character."""
  bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


def default_bpe_path() -> str:
  """``bpe_simple_vocab_16e6.txt.gz`` shipped by the ``openai-clip`` package (not imported: it
  imports torch)."""
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "CLIP BPE vocabulary not found: install openai-clip, or pass a checkpoint dir with "
      "vocab.json + merges.txt or a bpe_simple_vocab_16e6.txt.gz path"
    )
  path = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"CLIP BPE vocabulary missing from the openai-clip package: {path}")
  return path


def vocab_from_bpe_gz(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocab, merges) from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (49408 tokens, 48894 merges)."""
  try:
    lines = gzip.open(path).read().decode("utf-8").split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise InputError(f"cannot read BPE vocabulary {path}: {type(e).__name__}: {e}") from None
  merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
  symbols = list(bytes_to_unicode().values())
  symbols += [s + "</w>" for s in symbols]
  symbols += ["".join(m) for m in merges] + [SOT, EOT]
  return {t: i for i, t in enumerate(symbols)}, merges


def vocab_from_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocab, merges) of a ``tokenizer.json`` (the tokenizers library's file, which transformers 5
  writes instead of vocab.json + merges.txt): its BPE model's ``vocab`` and ``merges`` (pairs as
  ``"a b"`` strings or ``[a, b]`` lists, both tokenizers' formats)."""
  try:
    with open(path, encoding="utf-8") as f:
      model = json.load(f)["model"]
    if model.get("type") != "BPE":
      raise ValueError(f"model type {model.get('type')!r}, expected BPE")
    vocab = dict(model["vocab"])
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"cannot read tokenizer {path}: {type(e).__name__}: {e}") from None
  if any(len(m) != 2 for m in merges):
    raise InputError(f"{path}: a merge that is not a pair")
  return vocab, merges


def vocab_from_dir(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocab, merges) from a HF checkpoint dir's ``vocab.json`` + ``merges.txt``, else its
  ``tokenizer.json``."""
  vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
  tokenizer_json = os.path.join(path, "tokenizer.json")
  if not os.path.exists(vocab_file) and os.path.exists(tokenizer_json):
    return vocab_from_tokenizer_json(tokenizer_json)
  try:
    with open(vocab_file, encoding="utf-8") as f:
      vocab = json.load(f)
    with open(merges_file, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, ValueError) as e:
    raise InputError(f"cannot read tokenizer files in {path}: {type(e).__name__}: {e}") from None
  merges = []
  for line in lines:
    if line.startswith("#version") or not line.strip():
      continue
    pair = tuple(line.split())
    if len(pair) != 2:
      raise InputError(f"{merges_file}: bad merge line {line!r}")
    merges.append(pair)
  return vocab, merges


def _lower(text: str) -> str:
  # str.lower() applies the context-dependent final-sigma rule; Rust's per-char lowercase does not.
  return "".join(c.lower() for c in text) if "\u03a3" in text else text.lower()


class Tokenizer:
  """``Tokenizer(path)(texts) -> np.int32 [N, context_length]``.

  ``path``: a checkpoint dir with ``vocab.json`` + ``merges.txt``, a
  ``bpe_simple_vocab_16e6.txt.gz``, or None for the copy shipped by the ``openai-clip`` package.
  """

  def __init__(self, path: str | None = None, context_length: int = 77):
    if path is None:
      path = default_bpe_path()
    path = os.fspath(path)
    if os.path.isdir(path):
      self.vocab, merges = vocab_from_dir(path)
    elif path.endswith(".gz"):
      self.vocab, merges = vocab_from_bpe_gz(path)
    else:
      raise InputError(
        f"{path}: expected a dir with vocab.json + merges.txt or a bpe_simple_vocab_16e6.txt.gz"
      )
    for special in (SOT, EOT):
      if special not in self.vocab:
        raise InputError(f"{path}: vocabulary lacks the special token {special}")
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2, got {context_length}")
    self.path = path
    self.context_length = context_length
    self.ranks = {pair: i for i, pair in enumerate(merges)}
    self.sot_id, self.eot_id = self.vocab[SOT], self.vocab[EOT]
    self.pad_id = self.eot_id
    self.byte_encoder = bytes_to_unicode()
    self._cache: dict[str, list[int]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def bpe(self, word: str) -> list[str]:
    """BPE symbols of one pre-token (byte-to-unicode mapped); the last one ends in ``</w>``."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      pairs = {(a, b) for a, b in zip(symbols, symbols[1:], strict=False)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _word_ids(self, word: str) -> list[int]:
    ids = self._cache.get(word)
    if ids is None:
      mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
      ids = [self.vocab.get(s, self.eot_id) for s in self.bpe(mapped)]  # unk = EOT, as in HF
      if len(self._cache) < 200_000:
        self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without SOT/EOT and without truncation."""
    ids: list[int] = []
    for segment in _SPECIAL.split(text):
      if segment in (SOT, EOT):
        ids.append(self.vocab[segment])
        continue
      norm = _lower(_WHITESPACE.sub(" ", unicodedata.normalize("NFC", segment)))
      for piece in _PRETOKENIZE.findall(norm):
        for word in _BYTE_LEVEL.findall(piece):
          ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids: stops at the first EOT, skips SOT, ``</w>`` ends a word (as in
    OpenAI's ``SimpleTokenizer.decode``)."""
    if not hasattr(self, "_inverse"):
      self._inverse = {i: s for s, i in self.vocab.items()}
      self._byte_decoder = {u: b for b, u in self.byte_encoder.items()}
    symbols = []
    for i in ids:
      i = int(i)
      if i == self.eot_id:
        break
      if i != self.sot_id:
        symbols.append(self._inverse.get(i, ""))
    raw = bytearray(self._byte_decoder[c] for c in "".join(symbols))
    return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 [N, context_length]: SOT, ids truncated to ``context_length - 2``, EOT, EOT padding."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    for n, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"text {n} is {type(text).__name__}, expected str")
      ids = [self.sot_id, *self.encode(text)[: self.context_length - 2], self.eot_id]
      out[n, : len(ids)] = ids
    return out
