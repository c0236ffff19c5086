"""Captioning: mappers, the prefix captioner (ClipCap / DeCap), caption data, the evaluator on a
known encoder, and `configs/clipcap.py:mini` end to end (subprocess)."""

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from gmail_jax.captioning import captioner as cap_lib
from gmail_jax.captioning import clipcap, decap, gpt2, mappers, text
from gmail_jax.captioning import data as cap_data
from tests.conftest import shared_path

CLASSES = ("red", "green", "blue")
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TEMPLATES = ("a {} square.", "a picture of the colour {}.")


def tiny_settings(**kw) -> dict:
  base = dict(lm_layers=1, lm_heads=2, lm_width=32, lr=3e-3, warmup_steps=10, steps=200)
  return clipcap.settings({**base, "batch_size": 16, "max_len": 10, **kw})


def class_features(labels: np.ndarray, seed: int, dim: int = 8) -> np.ndarray:
  """Embeddings that carry the class in their first coordinates, plus noise."""
  rng = np.random.default_rng(seed)
  x = rng.normal(scale=0.3, size=(len(labels), dim)).astype(np.float32)
  x[np.arange(len(labels)), labels] += 3.0
  return x


def test_clip_bpe_decode_equals_openai_simple_tokenizer():
  from gmail_jax.models.tokenizer import Tokenizer, default_bpe_path

  path = pathlib.Path(default_bpe_path()).parent / "simple_tokenizer.py"
  spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  ref = module.SimpleTokenizer()
  tok = Tokenizer()
  for caption in ("A man's dog, running.", "héllo wörld 12.5 cats!!", "two  zebras (grazing)"):
    ids = tok(caption)[0]
    inner = [int(i) for i in ids if i not in (tok.sot_id, tok.eot_id)]
    assert tok.decode(ids) == ref.decode(inner).strip()


def test_compact_vocabulary_round_trips_and_keeps_eos():
  full = text.clip_bpe()
  captions = ["a red square.", "a picture of the colour blue."]
  small = text.compact(full, captions)
  assert small.vocab_size < 20
  ids, mask = small.batch(captions, 12)
  assert ids.max() < small.vocab_size and mask.sum(1).tolist() == [5, 8]  # tokens + EOS
  assert [small.decode(r) for r in ids] == ["a red square .", "a picture of the colour blue ."]
  assert small.decode(small.encode("a green square")) == "a square"  # unseen 'green': dropped


@pytest.mark.parametrize("name", ["mlp", "transformer", "linear"])
def test_mappers_give_a_prefix_of_lm_vectors(name):
  kw = {"num_layers": 2, "heads": 2} if name == "transformer" else {}
  m = mappers.make_mapper(name, 8, 16, 3, rngs=nnx.Rngs(0), **kw)
  out = m(jnp.ones((5, 8)))
  assert out.shape == (5, 3, 16) and bool(jnp.isfinite(out).all())


def test_dual_projection_routes_each_row_through_its_head_and_logits_are_teacher_forced():
  lm = gpt2.GPT2(
    gpt2.GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2), rngs=nnx.Rngs(0)
  )
  cap = cap_lib.Captioner(
    lm, mapper="mlp", clip_dim=8, prefix_length=3, heads=("gen", "real"), rngs=nnx.Rngs(1)
  )
  feats = jax.random.normal(jax.random.key(0), (4, 8))
  head = jnp.array([0, 1, 1, 0])
  prefix = cap.prefix(feats, head)
  for i in range(4):
    own = cap.heads[int(head[i])](feats[i : i + 1])[0]
    np.testing.assert_allclose(prefix[i], own, atol=1e-6)
  ids = jnp.array([[5, 6, 7, 2]] * 4)
  logits = cap(feats, head, ids)
  full, _ = lm(inputs_embeds=jnp.concatenate([prefix, lm.embed(ids)], axis=1))
  assert logits.shape == (4, 4, 30)
  np.testing.assert_allclose(logits, full[:, 2:6], atol=1e-5)  # position P-1+t predicts ids[t]
  with pytest.raises(ValueError, match="no head 'x'"):
    cap.head_index("x")


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_clipcap_learns_class_captions_and_decodes_them_for_new_embeddings(mapper):
  labels = np.arange(60) % 3
  feats = class_features(labels, 0)
  captions = [f"a {CLASSES[y]} square." for y in labels]
  extra = {"mapper_layers": 1, "prefix_length": 4} if mapper == "transformer" else {}
  s = tiny_settings(mapper=mapper, dual_projection=False, **extra)
  trained = clipcap.train(s, (feats, captions), None)
  assert trained.real_head == "shared"
  assert np.mean(trained.losses[-10:]) < 0.3 * trained.losses[0]
  test_labels = np.arange(9) % 3
  got = trained.caption(class_features(test_labels, 1))
  assert got == [f"a {CLASSES[y]} square ." for y in test_labels]
  trained.settings = {**trained.settings, "beam_size": 3}
  assert trained.caption(class_features(test_labels, 1)) == got


def test_prefix_only_training_leaves_the_language_model_as_it_was():
  labels = np.arange(30) % 3
  gen = (class_features(labels, 0), [f"a {CLASSES[y]} square." for y in labels])
  s = tiny_settings(steps=5, trainable="prefix")
  trained = clipcap.train(s, gen, None)
  fresh = clipcap.build(s, 8, trained.tokenizer)
  lm_now, lm_then = nnx.state(trained.captioner.lm), nnx.state(fresh.lm)
  jax.tree.map(np.testing.assert_array_equal, lm_now, lm_then)
  heads_now, heads_then = nnx.state(trained.captioner.heads), nnx.state(fresh.heads)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(heads_now), jax.tree.leaves(heads_then), strict=True)
  )


def test_dual_projection_infers_real_through_proj_real_or_proj_gen_without_real_pairs():
  labels = np.arange(30) % 3
  gen = (class_features(labels, 0), [f"a {CLASSES[y]} square." for y in labels])
  s = tiny_settings(steps=20)
  assert clipcap.train(s, gen, None).real_head == "gen"
  assert clipcap.train(s, gen, gen).real_head == "real"
  with pytest.raises(ValueError, match="no training pairs"):
    clipcap.train(s, None, None)
  with pytest.raises(ValueError, match="unknown setting 'prefix_len'"):
    clipcap.settings({"prefix_len": 3})


def test_decap_projection_is_the_softmax_weighted_memory():
  rng = np.random.default_rng(0)
  v, memory = rng.normal(size=(5, 8)), rng.normal(size=(12, 8))
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  mn = memory / np.linalg.norm(memory, axis=1, keepdims=True)
  logits = vn @ mn.T / 0.05
  w = np.exp(logits - logits.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  ref = w @ mn
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(decap.project(v, memory, tau=0.05), ref, atol=1e-5)


def write_color_folders(root: pathlib.Path, per_class: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  for name, rgb in COLORS.items():
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      img = np.clip(np.array(rgb) + rng.integers(-20, 20, size=(16, 16, 3)), 0, 255)
      Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.png")


def color_encoder(dim: int = 8) -> dict:
  """A known encoder: images -> their dominant channel, texts -> the colour they name."""

  def images(batch):
    x = np.stack([np.asarray(b, np.float32).mean((0, 1)) for b in batch])
    out = np.zeros((len(batch), dim), np.float32)
    out[np.arange(len(batch)), x.argmax(1)] = 1.0
    return out + 0.01

  def texts(batch):
    out = np.full((len(batch), dim), 0.01, np.float32)
    for i, t in enumerate(batch):
      out[i, next(k for k, c in enumerate(CLASSES) if c in t)] += 1.0
    return out

  return {"images": images, "texts": texts}


def test_captioning_evaluator_clipcap_and_decap_caption_a_known_encoder(tmp_path):
  from gmail_jax.captioning import evaluator as captioning
  from gmail_jax.evaluators import common

  write_color_folders(tmp_path / "train", 10, 0)
  write_color_folders(tmp_path / "test", 3, 1)
  specs = {
    "train": {"kind": "classes", "root": str(tmp_path / "train")},
    "test": {"kind": "classes", "root": str(tmp_path / "test")},
  }
  kw = dict(templates=TEMPLATES, image_size=16, **specs)
  evs = common.from_config(
    {
      "cc": {"type": "captioning", "method": "clipcap", "captioner": tiny_settings(), **kw},
      "dc": {
        "type": "captioning",
        "method": "decap",
        "captioner": dict(lm_layers=1, lm_width=32, lr=3e-3, steps=200, batch_size=16),
        **kw,
      },
    }
  )
  enc = color_encoder()
  clip = evs[0].caption(enc)
  assert len(clip.candidates) == 9 and clip.metrics["CIDEr"] > 1.0
  assert all(CLASSES[0] in c for k, c in clip.candidates.items() if k.startswith("red"))
  assert clip.metrics["class_named"] == 1.0
  dc = evs[1].caption(enc)
  assert dc.projected is not None and dc.metrics["proj_CIDEr"] > 1.0  # onto the text memory
  assert dc.metrics["CIDEr"] > 1.0  # this encoder has no modality gap: direct decoding works
  paths = captioning.write_results(tmp_path / "out", {"clipcap": clip, "decap": dc})
  rows = [json.loads(line) for line in pathlib.Path(paths["captions"]).read_text().splitlines()]
  assert {r["view"] for r in rows} == {"clipcap", "decap"} and len(rows) == 18
  assert all(r["references"] == [t.format(r["id"].split("/")[0]) for t in TEMPLATES] for r in rows)
  summary = json.loads(pathlib.Path(paths["metrics"]).read_text())
  assert summary["decap"]["metrics"]["proj_CIDEr"] == dc.metrics["proj_CIDEr"]
  assert summary["clipcap"]["final_loss"] < summary["clipcap"]["first_loss"]


def test_caption_data_from_coco_manifest_and_errors(tmp_path):
  from gmail_jax.errors import ConfigError

  coco = shared_path("coco-mini")
  spec = {
    "kind": "coco",
    "captions": str(coco / "annotations" / "captions_train2017.json"),
    "images": str(coco / "train2017"),
    "max_images": 4,
  }
  cs = cap_data.load(spec, image_size=32)
  assert len(cs.ids) == 4 and all(len(r) >= 5 for r in cs.references)
  assert cs.images[0].shape == (32, 32, 3)
  index, captions = cs.pairs()
  assert len(index) == len(captions) == sum(len(r) for r in cs.references)
  assert cap_data.captions_only(spec) == captions
  photos = sorted((coco / "train2017").glob("*.jpg"))[:2]
  manifest = tmp_path / "m.jsonl"
  rows = [
    {"caption": f"cap {i}", "real_path": str(photos[0]), "gen_path": str(photos[i % 2])}
    for i in range(4)
  ]
  manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ms = cap_data.load({"kind": "manifest", "path": str(manifest)}, image_size=16)
  assert ms.references == [["cap 0", "cap 2"], ["cap 1", "cap 3"]]
  with pytest.raises(ConfigError, match=r"test\.kind: one of"):
    cap_data.load({"kind": "flickr"}, image_size=16, where="test")
  with pytest.raises(ConfigError, match="needs caption templates"):
    cap_data.load({"kind": "classes", "root": str(tmp_path)}, image_size=16)


def _mini_test_references(n: int) -> dict[str, list[str]]:
  """What configs/clipcap.py:mini tests on, read here from the COCO files: the first ``n``
  coco-mini val2017 photos by image id, each with all its val2017 captions (spaces collapsed)."""
  val = json.loads(shared_path("coco-captions-val2017", "captions_val2017.json").read_text())
  present = {p.name for p in shared_path("coco-mini", "val2017").glob("*.jpg")}
  images = sorted(
    (im for im in val["images"] if im["file_name"] in present), key=lambda im: im["id"]
  )
  name = {im["id"]: im["file_name"] for im in images[:n]}
  refs = {f: [] for f in name.values()}
  for a in val["annotations"]:
    if a["image_id"] in name:
      refs[name[a["image_id"]]].append(" ".join(a["caption"].split()))
  return refs


def test_clipcap_mini_config_runs_end_to_end(tmp_path):
  from gmail_jax.evaluators.captioning import caption_metrics
  from tests.test_quickstart import run_cli

  workdir = tmp_path / "mini"
  proc = run_cli("configs/clipcap.py:mini,short=True", workdir, cache_dir=tmp_path / "cache")
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [
    json.loads(line)
    for line in (workdir / "eval" / "captions.jsonl").read_text().split("\n")
    if line
  ]
  # One row per (view, test image): its caption and that image's own COCO captions as references.
  want_refs = _mini_test_references(16)
  assert [r["view"] for r in rows] == ["teacher"] * 16
  assert sorted(r["id"] for r in rows) == sorted(want_refs)
  for r in rows:
    assert set(r) == {"view", "id", "caption", "references"}, r
    assert isinstance(r["caption"], str), r
    assert sorted(r["references"]) == sorted(want_refs[r["id"]]), r["id"]
  recorded = json.loads((workdir / "eval" / "captioning.json").read_text())
  assert set(recorded) == {"teacher"}
  # The metrics recorded per view are caption_metrics of exactly the captions.jsonl rows of that
  # view. METEOR (recorded where java is) is not recomputed here: its JVM start (~8 s) would add
  # a fifth to this test; tests/test_eval_captioning_metrics.py checks it against pycocoevalcap.
  for view, summary in recorded.items():
    view_rows = [r for r in rows if r["view"] == view]
    got = summary["metrics"]
    want = caption_metrics(
      {r["id"]: r["caption"] for r in view_rows},
      {r["id"]: r["references"] for r in view_rows},
      meteor=False,
    )
    assert set(got) - {"METEOR"} == set(want), (set(got), set(want))
    assert ("METEOR" in got) == (shutil.which("java") is not None), got
    assert all(type(v) is float for v in got.values()), got
    for key, value in want.items():
      assert abs(got[key] - value) <= 1e-9, (view, key, got[key], value)
    assert summary["num_test_images"] == len(view_rows) == 16
  summary = recorded["teacher"]
  assert summary["train_steps"] == 40 and summary["final_loss"] < summary["first_loss"]
  # Other captioner settings: the stage reruns on the embeddings it saved (not re-embedded).
  cached = workdir / "eval" / "features" / "teacher" / "test.npz"
  stamp = cached.stat().st_mtime_ns
  proc = run_cli(
    "configs/clipcap.py:mini,short=True",
    workdir,
    "--config.caption.captioner.steps=30",
    cache_dir=tmp_path / "cache",
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((workdir / "eval" / "captioning.json").read_text())["teacher"]
  assert summary["train_steps"] == 30 and cached.stat().st_mtime_ns == stamp


def test_embedding_cache_recomputes_when_the_key_changes(tmp_path):
  from gmail_jax.captioning.evaluator import _cached

  calls = []

  def compute(v):
    calls.append(v)
    return np.full((2, 3), v, np.float32)

  assert _cached(str(tmp_path), "test", "a", lambda: compute(1))[0, 0] == 1
  assert _cached(str(tmp_path), "test", "a", lambda: compute(2))[0, 0] == 1  # read back
  assert _cached(str(tmp_path), "test", "b", lambda: compute(3))[0, 0] == 3  # other encoder
  assert calls == [1, 3]


def test_class_named_counts_captions_naming_only_their_class():
  got = cap_data.class_named(
    ["a red square.", "a red or blue square", "a picture", "Blue!"],
    ["red", "red", "blue", "blue"],
    CLASSES,
  )
  assert got == 0.5
