"""Our CLIP BPE tokenizer gives exactly transformers' CLIPTokenizer ids (same vocabulary), and
openai-clip's own SimpleTokenizer ids, which share no code or vocabulary parsing with ours."""

import importlib.util
import json
import os

import numpy as np
import pytest
from conftest import shared_path
from hf_tiny import write_clip_tokenizer_files

from gmail_jax.models import tokenizer as tk

HARD = [
  "a photo of a cat",
  "Ünïcödé café naïve  ﬁne ＦＵＬＬ-width Ａｂｃ",
  "emoji 🐱👍🏽 ok!!! ❤️‍🔥 🇫🇷",
  "&amp; &lt;b&gt; html &quot;entities&quot; &#39;",
  "it's I'LL we'd they've you're I'm don't 'sam's ''''s",
  "tabs\tand\nnewlines   and \u00a0nbsp\u2003em\u3000ideographic\x1c\x1dseparators",
  "   leading and trailing   ",
  "",
  "A very long caption " + "with many repeated words and 123 numbers, " * 20,
  "<|endoftext|> literal specials <|startoftext|> and <|ENDOFTEXT|>",
  "ΣΊΣΥΦΟΣ ΟΔΟΣ İstanbul straße ǅemal",
  "数字 12345 3.14 中文字符 日本語のテキスト 한국어",
  "combining e\u0301 vs é, zero\u200bwidth",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  d = write_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tok"))
  hf = transformers.CLIPTokenizer.from_pretrained(str(d), model_max_length=77)
  return tk.Tokenizer(), tk.Tokenizer(str(d)), hf


def _hf_ids(hf, texts):
  out = hf(list(texts), padding="max_length", max_length=77, truncation=True)["input_ids"]
  return np.asarray(out, np.int32)


def test_vocab_files_and_gz_agree(tokenizers):
  ours_gz, ours_dir, _ = tokenizers
  assert ours_gz.vocab == ours_dir.vocab and ours_gz.ranks == ours_dir.ranks
  assert len(ours_gz.vocab) == 49408 and len(ours_gz.ranks) == 48894
  assert (ours_gz.sot_id, ours_gz.eot_id) == (49406, 49407)


def test_known_ids_and_layout(tokenizers):
  tok = tokenizers[0]
  ids = tok(["a photo of a cat"])
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert (ids[0, 7:] == 49407).all()
  long = tok(["word " * 200])[0]
  assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] != 49407).all()


def test_hard_strings_match_hf(tokenizers):
  ours_gz, ours_dir, hf = tokenizers
  ref = _hf_ids(hf, HARD)
  for name, ours in (("gz", ours_gz(HARD)), ("dir", ours_dir(HARD))):
    for i, text in enumerate(HARD):
      assert ours[i].tolist() == ref[i].tolist(), (name, text)


def test_all_coco_val2017_captions_match_hf(tokenizers):
  ours, _, hf = tokenizers
  path = shared_path("coco-captions-val2017", "captions_val2017.json")
  captions = [a["caption"] for a in json.loads(path.read_text())["annotations"]]
  assert len(captions) == 25014
  mine, ref = ours(captions), _hf_ids(hf, captions)
  bad = np.flatnonzero((mine != ref).any(axis=1))
  assert bad.size == 0, [captions[i] for i in bad[:5]]


SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def openai_tokenizer():
  """openai-clip's ``clip/simple_tokenizer.py``, loaded as a file (importing the ``clip`` package
  needs torchvision); it reads its own ``bpe_simple_vocab_16e6.txt.gz`` with its own code."""
  spec = importlib.util.find_spec("clip")
  if spec is None:
    pytest.skip("openai-clip not installed")
  path = os.path.join(spec.submodule_search_locations[0], "simple_tokenizer.py")
  mod_spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def coco_captions():
  path = shared_path("coco-captions-val2017", "captions_val2017.json")
  captions = [a["caption"] for a in json.loads(path.read_text())["annotations"]]
  assert len(captions) == 25014
  return captions


def _long_texts(captions):
  """Consecutive COCO captions joined (48 to 127 tokens; 38 of these 75 texts are over the 75
  that fit), and n x "a" (one token each) around the boundary."""
  joined = [" ".join(captions[i : i + k]) for k in (5, 6, 7, 8, 10) for i in range(0, 1000, 10 * k)]
  return joined + ["a " * n for n in (74, 75, 76, 77, 200)]


def test_all_coco_val2017_captions_match_openai_simple_tokenizer(openai_tokenizer, coco_captions):
  """Where a caption fits in 77 (SOT + ids + EOT): exactly OpenAI's ids, then EOT padding."""
  got = tk.Tokenizer()(coco_captions)
  ref = [[SOT, *openai_tokenizer.encode(c), EOT] for c in coco_captions]
  fits = [i for i, r in enumerate(ref) if len(r) <= 77]
  assert len(fits) == len(coco_captions)  # the longest val2017 caption is 56 tokens + SOT/EOT
  bad = [
    i
    for i in fits
    if got[i, : len(ref[i])].tolist() != ref[i] or (got[i, len(ref[i]) :] != EOT).any()
  ]
  assert not bad, [(coco_captions[i], got[i].tolist(), ref[i]) for i in bad[:3]]


def test_truncation_rule_on_openai_ids(openai_tokenizer, coco_captions):
  """The documented rule, ``[SOT] + ids[:context_length - 2] + [EOT]`` (what ``clip.tokenize(...,
  truncate=True)`` gives), applied to OpenAI's ids of texts longer and shorter than 75 tokens."""
  texts = _long_texts(coco_captions)
  inner = [openai_tokenizer.encode(t) for t in texts]
  lengths = [len(x) for x in inner]
  assert sum(n > 75 for n in lengths) >= 30 and {74, 75, 76, 77, 200} <= set(lengths), lengths
  want = np.full((len(texts), 77), EOT, np.int32)
  for i, ids in enumerate(inner):
    want[i, : min(len(ids), 75) + 2] = [SOT, *ids[:75], EOT]
  got = tk.Tokenizer()(texts)
  for i, text in enumerate(texts):
    assert got[i].tolist() == want[i].tolist(), (lengths[i], text)
  short = tk.Tokenizer(context_length=10)(texts[:3])
  assert short.tolist() == [[SOT, *ids[:8], EOT] for ids in inner[:3]]


def test_matches_hf_tokenizer_built_from_openai_tables(tmp_path, openai_tokenizer, coco_captions):
  """transformers' CLIPTokenizer on vocab.json + merges.txt written here from SimpleTokenizer's
  own tables (not by ``vocab_from_bpe_gz``; no HF CLIP tokenizer files exist offline)."""
  transformers = pytest.importorskip("transformers")
  st = openai_tokenizer
  (tmp_path / "vocab.json").write_text(json.dumps(st.encoder, ensure_ascii=False), "utf-8")
  merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
  assert [st.bpe_ranks[m] for m in merges] == list(range(48894))
  (tmp_path / "merges.txt").write_text(
    "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8"
  )
  hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77)
  texts = coco_captions + _long_texts(coco_captions)
  got, ref = tk.Tokenizer()(texts), _hf_ids(hf, texts)
  bad = np.flatnonzero((got != ref).any(axis=1))
  assert bad.size == 0, [texts[i] for i in bad[:5]]


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="vocab.json"):
    tk.Tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="expected a dir"):
    tk.Tokenizer(str(tmp_path / "vocab.txt"))
  with pytest.raises(TypeError, match="text 1"):
    tk.Tokenizer()(["ok", None])
