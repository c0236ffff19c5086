"""Our CLIP BPE tokenizer gives exactly transformers' CLIPTokenizer ids (same vocabulary)."""

import json

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


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="vocab.json"):
    tk.Tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="expected a dir"):
    tk.Tokenizer(str(tmp_path / "vocab.txt"))
  with pytest.raises(TypeError, match="text 1"):
    tk.Tokenizer()(["ok", None])
