"""caption_metrics vs pycocoevalcap alone (its Java PTBTokenizer and scorers) on COCO val2017; the
Python PTB tokenizer; errors."""

import contextlib
import io
import json
import logging
import random
import re
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from gmail_jax.evaluators import captioning

HAS_JAVA = shutil.which("java") is not None


_LOADED = {}


@pytest.fixture
def val2017(shared):
  """{image_id: [captions]} of all 5,000 COCO val2017 images (25,014 captions), read once."""
  path = shared("coco-captions-val2017", "captions_val2017.json")
  if path not in _LOADED:
    by_image = {}
    for ann in json.loads(path.read_text())["annotations"]:
      by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    _LOADED[path] = by_image
  return _LOADED[path]


def _split(by_image, n=None):
  """First caption of each image is the candidate, the rest are its references."""
  ids = sorted(by_image)[:n]
  return {i: by_image[i][0] for i in ids}, {i: by_image[i][1:] for i in ids}


def _coco_eval_cap(cands, refs, with_meteor):
  """pycocoevalcap alone, as `COCOEvalCap.evaluate` runs it: its Java PTBTokenizer on the
  references and on the candidates (two calls, as there), then its scorers; nothing of ours."""
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
  res = tokenizer.tokenize({k: [{"caption": c}] for k, c in cands.items()})
  # It zips output lines back to ids: a line break inside a caption would shift them silently.
  assert list(gts) == list(refs) and list(res) == list(cands)
  assert [len(v) for v in gts.values()] == [len(v) for v in refs.values()]
  with contextlib.redirect_stdout(io.StringIO()):
    bleu, _ = Bleu(4).compute_score(gts, res)
  out = {f"BLEU_{n}": b for n, b in enumerate(bleu, 1)}
  out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
  out["CIDEr"] = Cider().compute_score(gts, res)[0]
  if with_meteor:
    meteor = Meteor()
    try:
      out["METEOR"] = meteor.compute_score(gts, res)[0]
    finally:  # stop the JVM now (Meteor.__del__ would only kill it, whenever it runs)
      meteor.meteor_p.stdin.close()
      meteor.meteor_p.kill()
      meteor.meteor_p.wait()
  return out


def _check_equal(got, want):
  assert set(got) == set(want), (set(got), set(want))
  for k, v in want.items():
    assert type(got[k]) is float, k
    assert abs(got[k] - v) <= 1e-6, (k, got[k], v)


needs_java = pytest.mark.skipif(
  not HAS_JAVA, reason="needs java: pycocoevalcap's PTBTokenizer and METEOR are Java programs"
)


@needs_java
@pytest.mark.slow
def test_matches_pycocoevalcap_on_200_images(val2017):
  """METEOR's JVM start (~10 s here) is tested here only, on 200 images."""
  cands, refs = _split(val2017, 200)
  got = captioning.caption_metrics(cands, refs, spice=False)
  _check_equal(got, _coco_eval_cap(cands, refs, with_meteor=True))
  assert set(got) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}
  assert 0.3 < got["BLEU_1"] < 1 and 0.2 < got["CIDEr"] < 2, got  # human vs human: sane range


@needs_java
@pytest.mark.slow
def test_matches_pycocoevalcap_on_all_val2017(val2017):
  """5,000 images: CIDEr document frequencies over the whole reference set."""
  cands, refs = _split(val2017)
  want = _coco_eval_cap(cands, refs, with_meteor=False)
  for method in ("ptb", "python"):  # also the pure-Python tokeniser used where java is missing
    got = captioning.caption_metrics(cands, refs, tokenize=method, meteor=False, spice=False)
    _check_equal(got, want)


@pytest.mark.skipif(not HAS_JAVA, reason="needs java for Stanford PTBTokenizer")
def test_python_tokenizer_equals_java_ptb_on_all_val2017(val2017):
  ptb = captioning.tokenize_captions(val2017, method="ptb")
  py = captioning.tokenize_captions(val2017, method="python")
  diffs = [(a, b) for k in val2017 for a, b in zip(ptb[k], py[k], strict=True) if a != b]
  # PTB reads all captions as one text, so whether a caption-final single letter keeps its period
  # ("... 8th ave/cth d.") depends on the next caption; that is the one documented difference.
  assert all(re.fullmatch(r"(.* )?\w\.", a) and a[:-1] == b for a, b in diffs), diffs[:5]
  assert len(diffs) <= 2, diffs


@pytest.mark.parametrize(
  "caption, tokens",
  [
    ("A man's dog, running.", "a man 's dog running"),
    ("I don't know; they're here!", "i do n't know they 're here"),
    ("We've got it, you'll see, I'd go, I'm done?", "we 've got it you 'll see i 'd go i 'm done"),
    ("Can't won't cannot gonna", "ca n't wo n't can not gon na"),
    (
      'A well-known man (left) holds a 3.5 inch "sign".',
      "a well-known man -lrb- left -rrb- holds a 3.5 inch sign",
    ),  # fmt: skip
    ("It's 5:30 p.m. in the U.S. now.", "it 's 5:30 p.m. in the u.s. now"),
    ("She said 'hello' to the dogs' owner -- twice...", "she said hello to the dogs owner twice"),
    ("A $5 bill, 50% off and 1,000 cats/dogs.", "a $ 5 bill 50 % off and 1,000 cats/dogs"),
    ("{Curly} [square] St. Patrick", "-lcb- curly -rcb- -lsb- square -rsb- st. patrick"),
    ("don’t stop, it’s “smart”\nquotes", "do n't stop it 's smart quotes"),
    ("22 3/4 St. at 5:54pm", "22\xa03/4 st. at 5:54 pm"),
    ("", ""),
  ],
)
def test_python_tokenizer_hand_written_ptb(caption, tokens):
  assert captioning.tokenize_captions({0: [caption]}, method="python") == {0: [tokens]}
  if HAS_JAVA:  # the hand-written expectations are what Stanford PTB + punctuation removal give
    assert captioning.tokenize_captions({0: [caption]}, method="ptb") == {0: [tokens]}


def test_identical_candidate_scores_higher_than_shuffled(val2017):
  _, refs = _split(val2017, 50)
  same = {k: v[0] for k, v in refs.items()}
  keys = list(refs)
  shuffled = dict(
    zip(keys, [same[k] for k in random.Random(0).sample(keys, len(keys))], strict=True)
  )
  a = captioning.caption_metrics(same, refs, tokenize="python", meteor=False, spice=False)
  b = captioning.caption_metrics(shuffled, refs, tokenize="python", meteor=False, spice=False)
  assert a["BLEU_4"] > 1 - 1e-6 and a["ROUGE_L"] > 1 - 1e-6
  assert a["CIDEr"] > b["CIDEr"] + 1 and a["BLEU_4"] > b["BLEU_4"]


@pytest.mark.parametrize(
  "cands, refs, error, match",
  [
    ({}, {}, ValueError, "no candidates"),
    ({1: "a cat"}, {2: ["a cat"]}, KeyError, "candidate id 1 missing from references"),
    ({1: "a cat"}, {1: []}, ValueError, "empty reference list for id 1"),
    ({1: 3}, {1: ["a cat"]}, TypeError, "candidate 1 is int, not str"),
    ({1: "a cat"}, {1: ["a cat", None]}, TypeError, "reference of id 1 is NoneType"),
    ({1: "a cat"}, {1: "a cat"}, TypeError, r"references\[1\] must be a list of str"),
  ],
)
def test_invalid_inputs(cands, refs, error, match):
  with pytest.raises(error, match=match):
    captioning.caption_metrics(cands, refs, tokenize="python")


def test_bad_tokenize_method():
  with pytest.raises(ValueError, match="method must be"):
    captioning.caption_metrics({1: "a"}, {1: ["a"]}, tokenize="nltk")


def test_no_java_skips_meteor_and_spice_with_one_message(monkeypatch, caplog):
  monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
  with caplog.at_level(logging.WARNING):
    got = captioning.caption_metrics({1: "a black cat"}, {1: ["a black cat", "a dark cat"]})
  assert set(got) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"}
  msgs = [r.getMessage() for r in caplog.records if "caption_metrics" in r.getMessage()]
  assert len(msgs) == 1 and "METEOR" in msgs[0] and "SPICE" in msgs[0] and "java" in msgs[0], msgs
  with pytest.raises(RuntimeError, match="spice=True but SPICE cannot run: no `java`"):
    captioning.caption_metrics({1: "a cat"}, {1: ["a cat"]}, spice=True)
  with pytest.raises(RuntimeError, match="needs `java`"):
    captioning.tokenize_captions({1: ["a cat"]}, method="ptb")


def test_scoring_record_names_the_tokenizer_and_the_skipped_metrics(monkeypatch):
  cands, refs = {1: "a black cat"}, {1: ["a black cat", "a dark cat"]}
  metrics, record = captioning.score_captions(cands, refs, tokenize="python", meteor=False)
  assert metrics == captioning.caption_metrics(cands, refs, tokenize="python", meteor=False)
  assert record["tokenize"] == "python" and record["tokenizer"] == "python"
  assert record["skipped"]["METEOR"] == "meteor=False"
  monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
  _, record = captioning.score_captions(cands, refs)  # 'auto' without java: said, not silent
  assert record["tokenize"] == "auto" and record["tokenizer"] == "python"
  assert "no `java` on PATH" in record["tokenizer_reason"]
  assert set(record["skipped"]) == {"METEOR", "SPICE"}
  assert all("java" in why for why in record["skipped"].values())
