"""Captioning: mappers, the prefix captioner (ClipCap / DeCap), caption data, the evaluator on a
known encoder, and `configs/clipcap.py:mini` end to end (subprocess); the embedding cache (keyed by
the encoder's identity, images decoded only on a miss), DeCap's chunked projection, the reference
defaults (ClipCap's transformers AdamW and schedule, GPT-2 dropout, raw prefixes) and the record of
how captions were scored."""

import dataclasses
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


@pytest.mark.slow
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
@pytest.mark.slow
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


@pytest.mark.slow
def test_captioning_evaluator_clipcap_and_decap_caption_a_known_encoder(tmp_path, fit_devices):
  from gmail_jax.captioning import evaluator as captioning
  from gmail_jax.evaluators import common

  write_color_folders(tmp_path / "train", 10, 0)
  write_color_folders(tmp_path / "test", 3, 1)
  specs = {
    "train": {"kind": "classes", "root": str(tmp_path / "train")},
    "test": {"kind": "classes", "root": str(tmp_path / "test")},
  }
  # meteor=False: three JVM starts (clipcap, decap direct and projected) would double this test;
  # the stage's METEOR is checked in test_clipcap_mini_config_runs_end_to_end.
  kw = dict(templates=TEMPLATES, image_size=16, meteor=False, **specs)
  evs = common.from_config(
    {
      "cc": {"type": "captioning", "method": "clipcap", "captioner": tiny_settings(), **kw},
      "dc": {
        "type": "captioning",
        "method": "decap",
        # No warm-up (DeCap's 1000 steps would outlast these 200).
        "captioner": dict(
          lm_layers=1, lm_width=32, lr=3e-3, warmup_steps=0, steps=200, batch_size=16
        ),
        **kw,
      },
    }
  )
  enc = color_encoder()
  # As evaluation runs its evaluators: under the run's mesh (8 devices); the captioner still
  # trains on one device, not replicated 8 times.
  with jax.set_mesh(jax.make_mesh((jax.device_count(),), ("data",))):
    clip = evs[0].caption(enc)
  assert jax.device_count() == 8 and fit_devices == [{jax.devices()[0]}]
  assert len(clip.candidates) == 9 and clip.metrics["CIDEr"] > 1.0
  assert all(CLASSES[0] in c for k, c in clip.candidates.items() if k.startswith("red"))
  assert clip.metrics["class_named"] == 1.0
  assert "METEOR" not in clip.metrics and "METEOR" in clip.scoring["skipped"]
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


@pytest.mark.slow
def test_clipcap_mini_config_runs_end_to_end(tmp_path):
  from gmail_jax.evaluators.captioning import caption_metrics
  from tests.test_quickstart import run_cli

  workdir = tmp_path / "mini"
  proc = run_cli("configs/clipcap.py:mini,short=True", workdir)
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
    # How they were scored is recorded: 'auto' ran Java PTB where java is, else the Python one.
    java = shutil.which("java") is not None
    assert summary["scoring"]["tokenizer"] == ("ptb" if java else "python"), summary["scoring"]
    assert ("METEOR" in summary["scoring"]["skipped"]) != java, summary["scoring"]
  summary = recorded["teacher"]
  assert summary["train_steps"] == 40 and summary["final_loss"] < summary["first_loss"]
  # Other captioner settings: the stage reruns on the embeddings it saved (not re-embedded).
  cached = workdir / "eval" / "features" / "teacher" / "test.npz"
  stamp = cached.stat().st_mtime_ns
  proc = run_cli(
    "configs/clipcap.py:mini,short=True",
    workdir,
    "--config.caption.captioner.steps=30",
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((workdir / "eval" / "captioning.json").read_text())["teacher"]
  assert summary["train_steps"] == 30 and cached.stat().st_mtime_ns == stamp


def test_embedding_cache_recomputes_when_the_key_changes(any_dir):
  from gmail_jax.captioning.evaluator import _cached

  calls = []

  def compute(v):
    calls.append(v)
    return np.full((2, 3), v, np.float32)

  assert _cached(str(any_dir), "test", "a", lambda: compute(1))[0, 0] == 1
  assert _cached(str(any_dir), "test", "a", lambda: compute(2))[0, 0] == 1  # read back
  assert _cached(str(any_dir), "test", "b", lambda: compute(3))[0, 0] == 3  # other encoder
  assert calls == [1, 3]


def test_results_are_written_whole_to_a_bucket(gcs_dir):
  from gmail_jax import storage
  from gmail_jax.captioning import evaluator as captioning

  result = captioning.CaptioningResult(
    {"CIDEr": 0.5}, {"a.png": "a cat"}, {"a.png": ["a cat", "a small cat"]}, None, [2.0, 1.0], {}
  )
  paths = captioning.write_results(f"{gcs_dir}/eval", {"teacher": result})
  assert paths == captioning.result_paths(f"{gcs_dir}/eval")
  assert paths["metrics"] == f"{gcs_dir}/eval/captioning.json"
  assert storage.read_json(paths["metrics"])["teacher"]["metrics"] == {"CIDEr": 0.5}
  rows = [json.loads(line) for line in storage.path(paths["captions"]).read_text().splitlines()]
  assert rows == [
    {"view": "teacher", "id": "a.png", "caption": "a cat", "references": ["a cat", "a small cat"]}
  ]


def test_class_named_counts_captions_naming_only_their_class():
  got = cap_data.class_named(
    ["a red square.", "a red or blue square", "a picture", "Blue!"],
    ["red", "red", "blue", "blue"],
    CLASSES,
  )
  assert got == 0.5


# ---------------------------------------------------------------------------------------------
# The embedding cache, lazy images, chunked projection, reference defaults, the scoring record.
# ---------------------------------------------------------------------------------------------


class _Stop(Exception):
  """Raised by the training stub: what the evaluator fed the captioner is all these tests need."""


def stop_training(monkeypatch) -> list[np.ndarray]:
  """captioner.fit replaced by a stub that records the embeddings it is given and stops."""
  seen = []

  def stub(model, feats, *a, **kw):
    seen.append(np.asarray(feats))
    raise _Stop

  monkeypatch.setattr(cap_lib, "fit", stub)
  return seen


def color_evaluator(root: pathlib.Path, **kw):
  from gmail_jax.captioning.evaluator import CaptioningEvaluator

  return CaptioningEvaluator(
    "cc",
    method="clipcap",
    train={"kind": "classes", "root": str(root / "train")},
    test={"kind": "classes", "root": str(root / "test")},
    templates=TEMPLATES,
    image_size=16,
    **{"batch_size": 4, "captioner": tiny_settings(steps=2), **kw},
  )


def mu_encoder(seed: int, generated_seed: int | None = None, **kw):
  """A random 16-pixel CLIP ('mu') as an Encoder; ``generated_seed``: another f_g tower."""
  from gmail_jax.models import clip
  from gmail_jax.training import encoders

  make = lambda s: clip.CLIP(clip.clip_config("mu"), rngs=nnx.Rngs(s))
  gen = None if generated_seed is None else make(generated_seed)
  return encoders.Encoder(make(seed), generated=gen, **kw)


def test_caption_cache_is_keyed_by_the_encoders_weights_not_the_workdir_step(tmp_path, monkeypatch):
  """The caption stage keyed its cache 'run:WORKDIR@STEP': a run retrained to the same step (or
  another as-if-real baseline) must not get the previous encoder's embeddings back."""
  write_color_folders(tmp_path / "train", 4, 0)
  write_color_folders(tmp_path / "test", 1, 1)
  ev = color_evaluator(tmp_path)
  seen = stop_training(monkeypatch)
  same_key = f"run:{tmp_path}@5:seed=0:size=16:teacher"  # what the stage passed before
  cache = tmp_path / "features"
  for enc in (mu_encoder(0), mu_encoder(1)):
    with pytest.raises(_Stop):
      ev.caption(enc, cache_dir=str(cache), encoder_key=same_key)
  stamp = (cache / "train_generated.npz").stat().st_mtime_ns
  with pytest.raises(_Stop):  # the same weights again: read back, not recomputed
    ev.caption(mu_encoder(1), cache_dir=str(cache), encoder_key=same_key)
  assert (cache / "train_generated.npz").stat().st_mtime_ns == stamp
  with pytest.raises(_Stop):  # no cache: what encoder 1 really gives
    ev.caption(mu_encoder(1))
  assert not np.allclose(seen[0], seen[1])
  np.testing.assert_array_equal(seen[1], seen[3])
  np.testing.assert_array_equal(seen[2], seen[3])
  # ClipCap's prefixes are the raw embeddings, not the unit vectors the encoder returns by default.
  assert not np.allclose(np.linalg.norm(seen[3], axis=1), 1.0, atol=1e-3)


def test_encoder_identity_covers_both_towers_and_the_preprocessing():
  base = mu_encoder(0).identity()
  assert mu_encoder(0).identity() == base  # the same weights rebuilt: the same identity
  others = {
    "teacher weights": mu_encoder(1),
    "student (f_g) weights": mu_encoder(0, generated_seed=1),
    "mean": mu_encoder(0, mean=(0.5, 0.5, 0.5)),
    "std": mu_encoder(0, std=(0.5, 0.5, 0.5)),
    "resize": mu_encoder(0, resize="squash"),
  }
  for what, enc in others.items():
    assert enc.identity() != base, what
  assert len({json.dumps(e.identity(), sort_keys=True) for e in others.values()}) == len(others)


def test_a_cache_hit_decodes_no_image_and_a_miss_decodes_batch_by_batch(tmp_path, monkeypatch):
  from gmail_jax.data import eval_sets

  write_color_folders(tmp_path / "train", 4, 0)
  write_color_folders(tmp_path / "test", 1, 1)
  decoded = []
  load = eval_sets._load
  monkeypatch.setattr(
    eval_sets, "_load", lambda data, name, *a: decoded.append(name) or load(data, name, *a)
  )
  seen = stop_training(monkeypatch)
  enc = color_encoder()
  at_call = []  # images decoded when the encoder was called, per call

  def images(batch):
    at_call.append((len(decoded), len(batch)))
    return enc["images"](batch)

  counted = {"images": images, "texts": enc["texts"]}
  cache = str(tmp_path / "features")
  ev = color_evaluator(tmp_path)
  assert decoded == []  # building the evaluator reads no image
  with pytest.raises(_Stop):
    ev.caption(counted, cache_dir=cache, encoder_key="colors")
  assert len(decoded) == 3 + 12  # a miss reads each test and training image once ...
  done = 0
  for n_decoded, n in at_call:  # ... one embedding batch at a time, never all first
    done += n
    assert n_decoded == done, at_call
  decoded.clear()
  ev = color_evaluator(tmp_path)
  with pytest.raises(_Stop):
    ev.caption(counted, cache_dir=cache, encoder_key="colors")
  assert decoded == []  # a hit reads none
  np.testing.assert_array_equal(seen[0], seen[1])


def _largest_intermediate(jaxpr) -> int:
  """Elements of the largest value any equation of ``jaxpr`` (and its sub-jaxprs) makes."""
  big = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      big = max(big, int(np.prod(v.aval.shape)))
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          big = max(big, _largest_intermediate(inner))
  return big


def test_decap_projection_runs_in_query_chunks_with_the_unchunked_result():
  rng = np.random.default_rng(0)
  n, m, c = 37, 53, 4
  v, memory = rng.normal(size=(n, c)), rng.normal(size=(m, c))
  whole = decap.project(v, memory, tau=0.05, chunk_size=n)
  for chunk in (1, 5, 36):
    np.testing.assert_allclose(
      decap.project(v, memory, tau=0.05, chunk_size=chunk), whole, rtol=0, atol=1e-6
    )
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda a, b: decap._project(a, b, 0.05, chunk=5))(f32(v), f32(memory))
  # The largest value is the similarities of 5 queries at a time, never N x M (for COCO: 5k test
  # images x 560k captions, 11 GB in fp32).
  assert _largest_intermediate(jaxpr.jaxpr) == 5 * m
  assert decap.default_chunk(5000, 560_000) * 560_000 <= decap.MAX_SIMILARITIES


def test_reference_defaults_of_clipcap_and_decap():
  s = clipcap.settings()
  # ClipCap's train.py: transformers' AdamW(model.parameters(), lr=2e-5) -> weight decay 0,
  # eps 1e-6; get_linear_schedule_with_warmup(5000); GPT-2 in train mode (dropout 0.1); prefixes
  # the raw CLIP embeddings (--normalize_prefix off).
  assert (s["lr"], s["warmup_steps"], s["epochs"], s["batch_size"]) == (2e-5, 5000, 10, 40)
  assert (s["weight_decay"], s["adam_eps"], s["dropout"]) == (0.0, 1e-6, 0.1)
  assert s["normalize_prefix"] is False
  d = decap.settings()
  # DeCap: 1000 warm-up steps, captions decoded up to 30 tokens, normalised embeddings.
  assert (d["warmup_steps"], d["decode_len"], d["max_len"]) == (1000, 30, 20)
  assert d["normalize_prefix"] is True and d["dropout"] == 0.1
  small = {**d, "lm_width": 32, "lm_heads": 2, "lm_layers": 1}
  trained_lm = clipcap.build(small, 8, text.compact(text.clip_bpe(), ["a cat"])).lm
  assert trained_lm.config.n_positions >= 1 + 30 + 1  # prefix + decode_len + EOS


def test_transformer_mapper_attention_has_no_query_key_value_bias():
  m = mappers.make_mapper("transformer", 8, 16, 3, rngs=nnx.Rngs(0), num_layers=1, heads=2)
  attn = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m.layers[0].attn))}
  # ClipCap's MultiHeadAttention: to_queries / to_keys_values Linear(bias=False) (TransformerLayer
  # bias=False), project Linear with its default bias.
  assert attn == {"to_queries.kernel", "to_keys_values.kernel", "project.kernel", "project.bias"}


def test_prefixes_are_the_raw_embeddings_unless_normalize_prefix(tmp_path, monkeypatch):
  write_color_folders(tmp_path / "train", 2, 0)
  write_color_folders(tmp_path / "test", 1, 1)
  seen = stop_training(monkeypatch)
  enc = color_encoder()
  scaled = {"images": lambda b: 3.0 * enc["images"](b), "texts": enc["texts"]}
  for normalize in (False, True):
    ev = color_evaluator(tmp_path, captioner=tiny_settings(normalize_prefix=normalize))
    with pytest.raises(_Stop):
      ev.caption(scaled)
  norms = [np.linalg.norm(x, axis=1) for x in seen]
  assert np.all(norms[0] > 2.9) and np.allclose(norms[1], 1.0)


@pytest.mark.slow
def test_dropout_is_on_while_training_only(tmp_path):
  labels = np.arange(30) % 3
  gen = (class_features(labels, 0), [f"a {CLASSES[y]} square." for y in labels])
  on = clipcap.train(tiny_settings(steps=4, dropout=0.1), gen, None)
  off = clipcap.train(tiny_settings(steps=4, dropout=0.0), gen, None)
  assert on.losses[0] != off.losses[0]  # the same weights, batch and step: only dropout differs
  feats = class_features(labels[:6], 1)
  prefix = cap_lib._prefix(on.captioner, jnp.asarray(feats), jnp.zeros(6, jnp.int32))
  tokens = lambda lm: gpt2.greedy_decode(lm, prefix, max_len=8, eos_id=on.tokenizer.eos_id)
  no_dropout = nnx.clone(on.captioner.lm)
  no_dropout.config = dataclasses.replace(
    no_dropout.config, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
  )
  np.testing.assert_array_equal(tokens(on.captioner.lm), tokens(no_dropout))


def test_captioning_json_records_the_tokenizer_and_skipped_metrics(tmp_path, monkeypatch):
  from gmail_jax.captioning import evaluator as captioning
  from gmail_jax.evaluators import captioning as metrics_lib

  monkeypatch.setattr(metrics_lib.shutil, "which", lambda name: None)
  write_color_folders(tmp_path / "train", 2, 0)
  write_color_folders(tmp_path / "test", 1, 1)
  result = color_evaluator(tmp_path).caption(color_encoder())
  paths = captioning.write_results(tmp_path / "out", {"teacher": result})
  scoring = json.loads(pathlib.Path(paths["metrics"]).read_text())["teacher"]["scoring"]
  assert scoring["tokenize"] == "auto" and scoring["tokenizer"] == "python", scoring
  assert "java" in scoring["tokenizer_reason"], scoring
  assert set(scoring["skipped"]) == {"METEOR", "SPICE"}, scoring
  assert all("java" in why for why in scoring["skipped"].values()), scoring
  assert "METEOR" not in result.metrics and "SPICE" not in result.metrics


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_optimizer_is_transformers_adamw_under_its_linear_warmup_schedule(weight_decay):
  """Against transformers v4's AdamW.step (which ClipCap imports; v5 dropped the class, so it is
  transcribed here) driven by transformers' own get_linear_schedule_with_warmup."""
  import math

  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")

  class TransformersAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
      super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
      for group in self.param_groups:
        for p in group["params"]:
          state = self.state[p]
          if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
          exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
          beta1, beta2 = group["betas"]
          state["step"] += 1
          exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
          exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
          denom = exp_avg_sq.sqrt().add_(group["eps"])
          step_size = group["lr"]
          bias_correction1 = 1.0 - beta1 ** state["step"]
          bias_correction2 = 1.0 - beta2 ** state["step"]
          step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
          p.addcdiv_(exp_avg, denom, value=-step_size)
          if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

  rng = np.random.default_rng(0)
  init = {"a": rng.normal(size=(5,)), "b": rng.normal(size=(3, 2))}
  # Gradients near eps, where placing eps before or after the bias correction matters.
  grads = [{k: 2e-6 * rng.normal(size=v.shape) for k, v in init.items()} for _ in range(6)]
  lr, warmup, total = 0.1, 3, 6
  tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in init.items()}
  opt = TransformersAdamW(tp.values(), lr=lr, weight_decay=weight_decay)
  sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
  tx = cap_lib.hf_adamw(
    cap_lib.linear_warmup_schedule(lr, warmup, total), weight_decay=weight_decay
  )
  jp = {k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
  state = tx.init(jp)
  for g in grads:
    for k, p in tp.items():
      p.grad = torch.tensor(g[k])
    opt.step()
    sched.step()
    updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, jp)
    jp = jax.tree.map(lambda p, u: p + u, jp, updates)
    for k in init:
      np.testing.assert_allclose(jp[k], tp[k].detach().numpy(), rtol=0, atol=2e-6)
  assert any(not np.allclose(jp[k], init[k], atol=1e-3) for k in init)  # it did move
