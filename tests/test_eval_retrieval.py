"""Recall@K vs a brute-force numpy reference; sharded embedding helper; evaluator wiring."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmail_jax.evaluators import common, retrieval


def _brute_force(img, txt, t2i, ks):
  """Sort every row by (score desc, negatives before positives at equal score)."""
  sims = img.astype(np.int64) @ txt.astype(np.int64).T  # integer embeddings: exact ties
  out = {}
  i2t_first = []
  for i in range(len(img)):
    pos = (t2i == i).astype(int)
    order = np.lexsort((pos, -sims[i]))  # primary: -score; ties: negatives (0) first
    i2t_first.append(np.flatnonzero(pos[order])[0])
  t2i_first = []
  for j in range(len(txt)):
    pos = (np.arange(len(img)) == t2i[j]).astype(int)
    order = np.lexsort((pos, -sims[:, j]))
    t2i_first.append(np.flatnonzero(pos[order])[0])
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(np.array(i2t_first) < k))
  for k in ks:
    out[f"t2i_r{k}"] = float(np.mean(np.array(t2i_first) < k))
  return out


@pytest.mark.parametrize("caps_per_image", [1, 5])
def test_recall_matches_brute_force_with_ties(caps_per_image):
  rng = np.random.default_rng(caps_per_image)
  n_img, d = 40, 3
  img = rng.integers(-1, 2, size=(n_img, d))  # {-1,0,1}^3: only 27 distinct rows -> many exact ties
  t2i = np.repeat(np.arange(n_img), caps_per_image)
  rng.shuffle(t2i)
  txt = rng.integers(-1, 2, size=(len(t2i), d))
  txt[::3] = img[t2i[::3]]  # some captions equal their image
  ks = (1, 5, 10)
  got = retrieval.recall_at_k(img, txt, t2i, ks, chunk=7)  # chunking crosses the row blocks
  want = _brute_force(img, txt, t2i, ks)
  assert got == want
  assert set(got) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
  assert all(0.0 <= v <= 1.0 for v in got.values())


def _counting_recall(img, txt, t2i, ks, chunk):
  """The previous implementation: two matmuls, ranks by counting every negative >= the positive."""
  img_j, txt_j, t2i_j = jnp.asarray(img), jnp.asarray(txt), jnp.asarray(t2i, jnp.int32)
  i2t_rank, t2i_rank = [], []
  for lo in range(0, len(img), chunk):
    rows = jnp.arange(lo, min(lo + chunk, len(img)))
    sims, positive = img_j[rows] @ txt_j.T, t2i_j[None, :] == rows[:, None]
    best = jnp.max(jnp.where(positive, sims, -jnp.inf), axis=1, keepdims=True)
    i2t_rank.append(np.asarray(jnp.sum((sims >= best) & ~positive, axis=1)))
  for lo in range(0, len(txt), chunk):
    sims, target = txt_j[lo : lo + chunk] @ img_j.T, t2i_j[lo : lo + chunk]
    onehot = jnp.arange(sims.shape[1])[None, :] == target[:, None]
    own = jnp.sum(jnp.where(onehot, sims, 0.0), axis=1, keepdims=True)
    t2i_rank.append(np.asarray(jnp.sum((sims >= own) & ~onehot, axis=1)))
  i2t_rank, t2i_rank = np.concatenate(i2t_rank), np.concatenate(t2i_rank)
  out = {f"i2t_r{k}": float(np.mean(i2t_rank < k)) for k in ks}
  return out | {f"t2i_r{k}": float(np.mean(t2i_rank < k)) for k in ks}


@pytest.mark.parametrize(("n_img", "chunk", "ks"), [(300, 64, (1, 5, 10)), (7, 3, (1, 3, 20))])
def test_partial_top_k_equals_counting_with_ties(n_img, chunk, ks):
  # Small-integer embeddings (exact fp32 dot products) -> many exactly tied scores; ragged chunks,
  # and ks beyond the number of negatives (n_img=7, k=20: every caption is a hit).
  rng = np.random.default_rng(n_img)
  img = rng.integers(-2, 3, size=(n_img, 6)).astype(np.float32)
  t2i = rng.permutation(np.concatenate([np.arange(n_img), rng.integers(0, n_img, 4 * n_img)]))
  txt = rng.integers(-2, 3, size=(len(t2i), 6)).astype(np.float32)
  txt[::4] = img[t2i[::4]]
  got = retrieval.recall_at_k(img, txt, t2i, ks, chunk=chunk)
  assert got == _counting_recall(img, txt, t2i, ks, chunk)
  assert got == _brute_force(img.astype(int), txt.astype(int), t2i, ks)


def test_recall_pessimistic_ties_constant_model():
  # Every score equal: the positive is ranked behind all negatives.
  img, txt = np.ones((20, 4)), np.ones((100, 4))
  t2i = np.repeat(np.arange(20), 5)
  r = retrieval.recall_at_k(img, txt, t2i, (1, 10))
  assert r == {"i2t_r1": 0.0, "i2t_r10": 0.0, "t2i_r1": 0.0, "t2i_r10": 0.0}


def test_recall_perfect_model_and_bad_input():
  rng = np.random.default_rng(0)
  img = common.l2_normalize(rng.normal(size=(50, 64)))
  t2i = np.repeat(np.arange(50), 5)
  txt = img[t2i]
  r = retrieval.recall_at_k(jnp.asarray(img), txt, t2i)
  assert all(v == 1.0 for v in r.values())
  with pytest.raises(ValueError, match="without captions"):
    retrieval.recall_at_k(img, txt[:5], t2i[:5])
  with pytest.raises(ValueError, match="out of range"):
    retrieval.recall_at_k(img, txt, t2i + 1)


@pytest.mark.parametrize("mesh_shape", [(8,), (4, 2)])
def test_embed_sharded_equals_unsharded(mesh_shape):
  assert jax.device_count() == 8
  names = ("data", "fsdp")[: len(mesh_shape)]
  mesh = jax.make_mesh(mesh_shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  x = rng.normal(size=(37, 6)).astype(np.float32)  # 37 rows: last batch of 16 is padded
  ids = rng.integers(0, 9, size=(37, 3)).astype(np.int32)

  @jax.jit
  def fn(batch):
    return jnp.tanh(batch["x"] @ w) + batch["ids"].sum(-1, keepdims=True)

  got = common.embed_sharded(fn, {"x": x, "ids": ids}, batch_size=16, mesh=mesh, batch_axes=names)
  want = np.asarray(fn({"x": x, "ids": ids}))
  assert got.shape == (37, 5)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="divide"):
    common.embed_sharded(fn, {"x": x, "ids": ids}, batch_size=12, mesh=mesh, batch_axes=names)


def test_embed_sharded_default_mesh_is_sharded():
  seen = []

  @jax.jit
  def fn(x):
    return x * 2.0

  def spy(x):
    seen.append(len(x.sharding.device_set))
    return fn(x)

  x = np.arange(20, dtype=np.float32).reshape(10, 2)
  np.testing.assert_array_equal(common.embed_sharded(spy, x, batch_size=8), 2 * x)
  assert seen == [8, 8]


class _PerfectEncoder:
  """Image -> random vector keyed by its pixels; caption -> the vector of its image."""

  def __init__(self, ev):
    rng = np.random.default_rng(0)
    self.table = {}
    keys = [hashlib.sha1(np.asarray(im).tobytes()).hexdigest() for im in ev.images]
    vecs = rng.normal(size=(len(keys), 32))
    self.table = dict(zip(keys, vecs, strict=True))
    self.caption = {c: vecs[i] for c, i in zip(ev.captions, ev.text_to_image, strict=True)}

  def encode_images(self, images):
    return np.stack(
      [self.table[hashlib.sha1(np.asarray(im).tobytes()).hexdigest()] for im in images]
    )

  def encode_texts(self, texts):
    return np.stack([self.caption[t] for t in texts])


def test_retrieval_evaluator_from_config_on_coco_mini(shared):
  cfg = {
    "coco": dict(
      type="retrieval",
      every_steps=100,
      images_dir=str(shared("coco-mini", "val2017")),
      captions_json=str(shared("coco-captions-val2017", "captions_val2017.json")),
      max_images=12,
      batch_size=5,
    )
  }
  (ev,) = common.from_config(cfg)
  assert ev.should_run(200) and not ev.should_run(150)
  assert len(ev.images) == 12 and len(ev.captions) >= 60
  m = ev.run(_PerfectEncoder(ev), step=200)
  assert m == {f"z/coco/{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
  # Shuffled captions -> a bad model, well below 1.
  enc = _PerfectEncoder(ev)
  enc.caption = dict(
    zip(enc.caption, np.random.default_rng(1).permutation(list(enc.caption.values())), strict=True)
  )
  assert ev.run(enc)["z/coco/t2i_r1"] < 0.5
  with pytest.raises(ValueError, match="config.evals.coco: unknown keys"):
    common.from_config({"coco": dict(cfg["coco"], foo=1)})
  with pytest.raises(ValueError, match="config.evals.x.type"):
    common.from_config({"x": dict(type="nope")})


def test_karpathy_split_retrieval_equals_the_coco_captions_it_was_made_from(shared, tmp_path):
  """COCO-5k / Flickr30k-1k are Karpathy JSON splits: a Karpathy file written from coco-mini's
  COCO captions (a test split and one train image that must be left out) gives the same images,
  captions and caption->image map as the COCO captions of those images."""
  import json

  coco_json = shared("coco-captions-val2017", "captions_val2017.json")
  images_dir = shared("coco-mini", "val2017")
  kw = dict(type="retrieval", images_dir=str(images_dir), batch_size=4)
  (coco,) = common.from_config({"c": dict(kw, captions_json=str(coco_json), max_images=7)})
  data = json.loads(coco_json.read_text())
  by_id = {im["id"]: im["file_name"] for im in data["images"]}
  sentences = {}
  for a in sorted(data["annotations"], key=lambda a: a["id"]):
    sentences.setdefault(a["image_id"], []).append({"raw": a["caption"]})
  present = [i for i in sorted(by_id) if (images_dir / by_id[i]).exists()][:7]
  karpathy = {
    "images": [
      {"filepath": "", "filename": by_id[i], "split": "train" if n == 3 else "test",
       "sentences": sentences[i]}
      for n, i in enumerate(present)
    ]
  }  # fmt: skip
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps(karpathy))
  (kp,) = common.from_config({"k": dict(kw, karpathy_json=str(path), split="test")})
  keep = [n for n in range(7) if n != 3]
  assert len(kp.images) == 6
  for j, n in enumerate(keep):
    np.testing.assert_array_equal(np.asarray(kp.images[j]), np.asarray(coco.images[n]))
  pairs = list(zip(coco.captions, coco.text_to_image, strict=True))
  want_caps = [c for n in keep for c, i in pairs if i == n]
  assert kp.captions == want_caps
  want_t2i = [j for j, n in enumerate(keep) for i in coco.text_to_image if i == n]
  assert kp.text_to_image.tolist() == want_t2i
  got = kp.run(_PerfectEncoder(kp))
  assert got == {f"z/k/{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
  with pytest.raises(ValueError, match="one of captions_json or karpathy_json"):
    common.from_config({"b": dict(kw)})
