"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) through pycocoevalcap.

The numbers come from pycocoevalcap's scorers, the reference implementation of the COCO caption
toolkit; this module only tokenises, validates and calls them the way `COCOEvalCap.evaluate` does.
METEOR and SPICE are Java programs and run only where `java` is on PATH (SPICE also needs the
Stanford CoreNLP 3.6.0 models, which pycocoevalcap would otherwise try to download).
``score_captions`` also returns a record of how the numbers were made (which tokenizer ran, which
metrics were skipped and why), for results files: tokenize='auto' never changes numbers silently.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Hashable, Mapping
from typing import Any

from absl import logging
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

# Tokens pycocoevalcap drops after PTB tokenisation. The bracket names in it are upper case while
# `-lowerCase` makes PTB emit "-lrb-", so brackets survive in the toolkit; we keep that quirk.
PUNCTUATIONS = frozenset(ptbtokenizer.PUNCTUATIONS)

# PTBLexer treats all of these as line breaks; with -preserveLines one would split a caption.
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]")

# Abbreviations PTB keeps with their period ("St. Patrick", "Dr. Who", "Woodfield Rd.").
_ABBREVIATIONS = (
  "mr|mrs|ms|dr|prof|st|mt|jr|sr|vs|etc|inc|corp|ltd|ave|blvd|rd|gen|sgt|capt|lt|col|rev|hon|ft|ky"
)
# A single letter keeps its period before another word ("W. Centre" -> "w.") but not at the end
# of the caption ("reads K." -> "k") nor as "I." ("A person I. A hood" -> "i"); dotted acronyms
# ("U.S.", "p.m.") always do.
_TOKEN = re.compile(
  r"""
  (?P<abbrev>(?<![\w.])(?:(?:[^\W\d_]\.){2,}|(?![iI]\.)[^\W\d_]\.(?=\s+\w)|(?i:"""
  + _ABBREVIATIONS
  + r""")\.)(?!\w))
  | (?P<frac>(?<!\w)\d{1,4}[ \xa0]\d{1,4}/\d{1,4}(?!\w))
  | (?P<ellipsis>\.\.+|…)
  | (?P<dash>--+|[\u2012-\u2015])
  | (?P<word>-?\w+(?:[-/.'’]\w+|(?<=\d)[,:]\d+)*)
  | (?P<other>\S)
  """,
  re.VERBOSE,
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# PTBLexer splits these fused forms in two ("gonna" -> "gon na").
_SPLIT_WORDS = {
  "cannot": ("can", "not"),
  "gonna": ("gon", "na"),
  "gotta": ("got", "ta"),
  "wanna": ("wan", "na"),
  "lemme": ("lem", "me"),
  "gimme": ("gim", "me"),
}
_SYMBOLS = {
  "(": "-lrb-",
  ")": "-rrb-",
  "[": "-lsb-",
  "]": "-rsb-",
  "{": "-lcb-",
  "}": "-rcb-",
  '"': "''",
  "“": "``",
  "”": "''",
  "„": "``",
  "‘": "`",
  "’": "'",
}

_SPICE_MODELS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _clean(caption: str) -> str:
  return _LINE_BREAKS.sub(" ", caption)


def _python_ptb(caption: str) -> str:
  """One caption through the pure-Python PTB equivalent, punctuation removed."""
  tokens = []
  for m in _TOKEN.finditer(_clean(caption)):
    kind, text = m.lastgroup, m.group().lower()
    if kind == "frac":  # PTB joins "22 3/4" into one token with a no-break space.
      text = text.replace(" ", "\xa0")
    elif kind == "word":
      text = text.replace("’", "'")
      if text in _SPLIT_WORDS:
        tokens.extend(_SPLIT_WORDS[text])
        continue
      clitic = _CLITIC.match(text)
      if clitic:
        tokens.extend(clitic.groups())
        continue
    elif kind == "ellipsis":
      text = "..."
    elif kind == "dash":
      text = "--"
    elif kind == "other":
      text = _SYMBOLS.get(text, text)
    tokens.append(text)
  return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def _java_ptb(captions: Mapping[Hashable, list[str]]) -> dict[Hashable, list[str]]:
  """Stanford PTBTokenizer through pycocoevalcap (one JVM for all captions)."""
  wrapped = {k: [{"caption": _clean(c)} for c in v] for k, v in captions.items()}
  out = ptbtokenizer.PTBTokenizer().tokenize(wrapped)
  # pycocoevalcap zips lines back to ids; a dropped or extra line would silently shift captions.
  if any(len(out.get(k, ())) != len(v) for k, v in captions.items() if v):
    raise RuntimeError("tokenize_captions: PTBTokenizer returned a different number of lines")
  return {k: out.get(k, []) for k in captions}


def resolve_tokenizer(method: str) -> tuple[str, str]:
  """(the tokenizer ``method`` runs here: 'ptb' | 'python' | 'none', why); 'auto' is 'ptb' where
  `java` is on PATH, else 'python'."""
  if method == "auto":
    if shutil.which("java"):
      return "ptb", "auto: `java` on PATH"
    return "python", "auto: no `java` on PATH, the pure-Python PTB equivalent ran instead"
  if method not in ("ptb", "python", "none"):
    raise ValueError(f"tokenize_captions: method must be 'auto', 'ptb' or 'python', got {method!r}")
  return method, "requested"


def tokenize_captions(
  captions: Mapping[Hashable, list[str]], *, method: str = "auto"
) -> dict[Hashable, list[str]]:
  """COCO-toolkit tokenisation: lower-cased PTB tokens joined by spaces, punctuation removed.

  method: 'ptb' runs Stanford PTBTokenizer (CoreNLP 3.4.1, `-lowerCase -preserveLines`) through
  pycocoevalcap and needs `java`; 'python' runs the pure-Python equivalent; 'auto' (default) picks
  'ptb' when `java` is on PATH. Both then drop pycocoevalcap's PUNCTUATIONS tokens.

  The Python equivalent implements PTB's main rules: lower-case; split off , ; : ! ? " ( ) [ ] { }
  $ % # & @ < > and quotes (brackets become "-lrb-" etc. and, as in the toolkit, are NOT removed,
  since its punctuation list spells them in upper case); split clitics n't 's 're 've 'll 'd 'm
  ("don't" -> "do n't", "man's" -> "man 's", curly apostrophes too) and cannot/gonna/gotta/wanna/
  lemme/gimme; keep hyphenated words, slashes, numbers with . , : ("3.5", "1,000", "5:30", but
  "5:54pm" -> "5:54 pm"), fractions ("22 3/4", joined by a no-break space as PTB does), dotted
  words ("okay.i"), acronyms and common abbreviations with their period ("u.s.", "st.", "w.")
  together; map "..."/"…" and "--"/dashes to tokens that are removed. On COCO val2017 all 25,014
  captions tokenise exactly as Java PTB does. Known differences: "@home", "<angle>", URLs and
  e-mail addresses are split; apostrophe words follow the clitic rule instead of PTB's exception
  lists ("'90s" -> "90s", "rock'n'roll" and "y'all" stay whole; PTB: "'90s", "rock 'n' roll",
  "y' all"); PTB's abbreviation lists and its sentence-boundary context (which can depend on the
  NEXT caption, as PTB reads all captions as one text) are approximated by the short list here.

  Args:
    captions: {id: [caption, ...]}.
    method: 'auto', 'ptb' or 'python'.

  Returns:
    {id: [tokenised caption, ...]}, same ids and order.
  """
  if method == "auto":
    method = resolve_tokenizer(method)[0]
  if method == "ptb":
    if not shutil.which("java"):
      raise RuntimeError("tokenize_captions: method='ptb' needs `java` on PATH")
    return _java_ptb(captions)
  if method == "python":
    return {k: [_python_ptb(c) for c in v] for k, v in captions.items()}
  raise ValueError(f"tokenize_captions: method must be 'auto', 'ptb' or 'python', got {method!r}")


def _validate(candidates: Mapping[Hashable, Any], references: Mapping[Hashable, Any]) -> None:
  if not candidates:
    raise ValueError("caption_metrics: no candidates")
  for k, cand in candidates.items():
    if not isinstance(cand, str):
      raise TypeError(f"caption_metrics: candidate {k!r} is {type(cand).__name__}, not str")
    if k not in references:
      raise KeyError(f"caption_metrics: candidate id {k!r} missing from references")
    refs = references[k]
    if isinstance(refs, str) or not isinstance(refs, list | tuple):
      raise TypeError(f"caption_metrics: references[{k!r}] must be a list of str")
    if not refs:
      raise ValueError(f"caption_metrics: empty reference list for id {k!r}")
    for r in refs:
      if not isinstance(r, str):
        raise TypeError(f"caption_metrics: a reference of id {k!r} is {type(r).__name__}, not str")


def _spice_missing() -> str | None:
  """Why SPICE cannot run here, or None."""
  if not shutil.which("java"):
    return "no `java` on PATH"
  lib = os.path.join(os.path.dirname(ptbtokenizer.__file__), os.pardir, "spice", "lib")
  absent = [f for f in _SPICE_MODELS if not os.path.exists(os.path.join(lib, f))]
  if absent:
    return (
      f"Stanford CoreNLP models {absent} missing from {os.path.normpath(lib)} (fetch them once with"
      " `python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g;"
      " g()'`)"
    )
  return None


def _meteor(gts: dict, res: dict) -> float:
  from pycocoevalcap.meteor.meteor import Meteor

  meteor = Meteor()
  try:
    score, _ = meteor.compute_score(gts, res)
  finally:
    # Stop the JVM now rather than whenever the object is collected.
    with meteor.lock:
      meteor.meteor_p.stdin.close()
      meteor.meteor_p.kill()
      meteor.meteor_p.wait()
  return float(score)


def _spice(gts: dict, res: dict) -> float:
  from pycocoevalcap.spice.spice import Spice

  score, _ = Spice().compute_score(gts, res)
  return float(score)


def caption_metrics(
  candidates: Mapping[Hashable, str],
  references: Mapping[Hashable, list[str]],
  *,
  tokenize: str = "auto",
  meteor: bool = True,
  spice: bool | None = None,
) -> dict[str, float]:
  """:func:`score_captions`'s metrics (see there)."""
  return score_captions(candidates, references, tokenize=tokenize, meteor=meteor, spice=spice)[0]


def score_captions(
  candidates: Mapping[Hashable, str],
  references: Mapping[Hashable, list[str]],
  *,
  tokenize: str = "auto",
  meteor: bool = True,
  spice: bool | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
  """COCO caption metrics of one candidate per id against its references, as the COCO toolkit.

  Scores are corpus-level over the candidate ids (ids only in `references` are ignored): BLEU
  with the 'closest' reference length, ROUGE-L (beta 1.2) averaged over ids, CIDEr-D
  (pycocoevalcap's `Cider`: sigma 6, clipping, x10) with document frequencies over the references
  of all scored ids, so scoring a split in chunks and averaging is not the same number.
  METEOR runs when `java` is on PATH (meteor=False skips it). SPICE runs when `java`
  and its CoreNLP models are there (spice=None), never (spice=False), or must (spice=True: raises
  if it cannot). A skipped metric is absent from the result, named in the record and (unless the
  caller turned it off) in one warning per call, which also says when 'auto' fell back to the
  Python tokenizer.

  Args:
    candidates: {id: caption}.
    references: {id: [caption, ...]}, non-empty for every candidate id.
    tokenize: 'auto', 'ptb' or 'python' (see tokenize_captions), or 'none' for captions that are
      already tokenised (split on whitespace only).
    meteor: see above (False for a quick CIDEr where a JVM start would dominate).
    spice: see above.

  Returns:
    ({'BLEU_1', 'BLEU_2', 'BLEU_3', 'BLEU_4', 'ROUGE_L', 'CIDEr'[, 'METEOR'][, 'SPICE']} as
    floats, record): record = {'tokenize': as asked, 'tokenizer': 'ptb' (Stanford PTBTokenizer in
    Java) | 'python' (its pure-Python equivalent) | 'none', 'tokenizer_reason': why that one,
    'skipped': {metric: why}}.
  """
  _validate(candidates, references)
  ran, why = resolve_tokenizer(tokenize)
  record: dict[str, Any] = {"tokenize": tokenize, "tokenizer": ran, "tokenizer_reason": why}
  ids = list(candidates)
  if ran == "none":
    res = {k: [" ".join(candidates[k].split())] for k in ids}
    gts = {k: [" ".join(r.split()) for r in references[k]] for k in ids}
  else:
    # One tokeniser call (one JVM) for candidates and references together.
    joint = {("res", k): [candidates[k]] for k in ids}
    joint.update({("gts", k): list(references[k]) for k in ids})
    tok = tokenize_captions(joint, method=ran)
    res = {k: tok["res", k] for k in ids}
    gts = {k: tok["gts", k] for k in ids}

  out = {}
  with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its length ratios.
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  for n, score in enumerate(bleu, 1):
    out[f"BLEU_{n}"] = float(score)
  out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
  out["CIDEr"] = float(Cider().compute_score(gts, res)[0])

  skipped: dict[str, str] = {}  # what could not run here (warned about)
  if not meteor:
    record_only = {"METEOR": "meteor=False"}
  else:
    record_only = {}
    if shutil.which("java"):
      out["METEOR"] = _meteor(gts, res)
    else:
      skipped["METEOR"] = "no `java` on PATH"
  if spice is False:
    record_only["SPICE"] = "spice=False"
  else:
    missing = _spice_missing()
    if missing is None:
      out["SPICE"] = _spice(gts, res)
    elif spice:
      raise RuntimeError(f"caption_metrics: spice=True but SPICE cannot run: {missing}")
    else:
      skipped["SPICE"] = missing
  record["skipped"] = {**skipped, **record_only}
  if skipped or (tokenize == "auto" and ran == "python"):
    parts = []
    if skipped:
      names = ", ".join(k if k == "METEOR" else f"{k} ({v})" for k, v in skipped.items())
      reason = "" if shutil.which("java") else ": no `java` on PATH (install a Java runtime)"
      parts.append(f"skipped {names}{reason}")
    if tokenize == "auto" and ran == "python":
      parts.append("tokenize='auto' ran the pure-Python PTB tokenizer (no `java` on PATH)")
    logging.warning("caption_metrics: %s", "; ".join(parts))
  return out, record
