"""Probe transfer and class-paired gaps (the report's numbers) on class folders of real PNGs,
with encoders whose embeddings are known: sklearn and numpy give the expected values."""

import numpy as np
import PIL.Image
import pytest
from sklearn.linear_model import LogisticRegression

from gmail_jax.evaluators import common, gap, probe

CLASSES = ("cat", "dog", "eel")
D = 16
RNG = np.random.default_rng(0)
CENTRES = RNG.normal(size=(len(CLASSES), D)) * 3
SHIFT = 1  # a "modality gap": generated images of class c land where real class c+1 lies


def write_set(root, modality, per_class, split):
  """root/<modality>/<class>/<i>.png where pixel (0,0) encodes (class, i, split) for the fake
  encoder (the split id keeps test noise apart from train noise)."""
  for c, name in enumerate(CLASSES):
    d = root / modality / name
    d.mkdir(parents=True)
    for i in range(per_class):
      img = np.zeros((8, 8, 3), np.uint8)
      img[0, 0] = (c, i, split)
      PIL.Image.fromarray(img).save(d / f"{i:03d}.png")


def embedding(images, shift: int, noise: float = 0.5, scaled: bool = False):
  """CENTRES[class + shift] + noise · N(0, I) (the same draw for both modalities of an image);
  ``scaled``: times a random per-image norm, which only an L2-normalising consumer ignores."""
  out = []
  for im in images:
    c, i, split = (int(v) for v in np.asarray(im)[0, 0])
    rng = np.random.default_rng([c, i, split])
    v = CENTRES[(c + shift) % len(CLASSES)] + rng.normal(size=D) * noise
    out.append(v * np.exp(rng.normal()) if scaled else v)
  return np.stack(out)


def encoder(gen_shift, **kw):
  return {
    "images": lambda ims: embedding(ims, 0, **kw),
    "generated": lambda ims: embedding(ims, gen_shift, **kw),
  }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("sets")
  for split, (name, n) in enumerate((("train", 12), ("test", 6))):
    for m in ("real", "generated"):
      write_set(root / name, m, n, split)
  return root


def _l2(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_probe_equals_sklearn_and_transfer_needs_alignment(data):
  """Overlapping classes (noise 5 around centres ~17 apart) and per-image norms: accuracies
  strictly between 0 and 1, each equal to sklearn's LogisticRegression with probe.py's settings
  (C=1, lbfgs, max_iter=2000, random_state=0) on the L2-normalised train / test embeddings."""
  ev = probe.ProbeEvaluator("t", train=str(data / "train/generated"), test=str(data / "test/real"))
  kw = dict(noise=5.0, scaled=True)
  got = {s: ev.run(encoder(s, **kw))["z/t/transfer_accuracy"] for s in (0, SHIFT)}
  for s, acc in got.items():
    x_tr = _l2(embedding(ev.train.images, s, **kw))
    x_te = _l2(embedding(ev.test.images, 0, **kw))
    clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=2000, random_state=0)
    want = float(np.mean(clf.fit(x_tr, ev.train.labels).predict(x_te) == ev.test.labels))
    assert acc == want, (s, acc, want)
    assert 0.0 < acc < 1.0, (s, acc)
  assert got[SHIFT] < got[0]  # transfer needs the generated path aligned with the real one


def test_class_pairs_gap_and_real_real_reference(data):
  ev = gap.GapEvaluator("g", pairs="class_gen_real", root=str(data / "test"), image_size=8)
  assert len(ev.x_items) == 18
  before = ev.compute(common.as_encoder(encoder(SHIFT)))
  after = ev.compute(common.as_encoder(encoder(0)))
  assert after["centroid"] < before["centroid"] and after["raw"] < before["raw"]
  # k-th generated with k-th real of the same class: numpy on the same pairs.
  x = common.l2_normalize(embedding(ev.x_items, SHIFT))
  y = common.l2_normalize(embedding(ev.y_items, 0))
  assert before["paired_cosine"] == pytest.approx(float(np.mean(np.sum(x * y, 1))), abs=1e-12)
  assert [int(np.asarray(a)[0, 0, 0]) for a in ev.x_items] == [
    int(np.asarray(b)[0, 0, 0]) for b in ev.y_items
  ]
  ref = gap.GapEvaluator("r", pairs="class_real_real", root=str(data / "test"))
  m = ref.compute(common.as_encoder(encoder(0)))
  assert m["centroid"] == pytest.approx(0.0, abs=1e-12)  # a class-preserving permutation
  assert m["raw"] ** 2 == pytest.approx(m["centroid"] ** 2 + m["distribution"] ** 2)
