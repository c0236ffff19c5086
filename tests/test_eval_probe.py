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


def write_set(root, modality, per_class):
  """root/<modality>/<class>/<i>.png where pixel (0,0) encodes (class, i) for the fake encoder."""
  for c, name in enumerate(CLASSES):
    d = root / modality / name
    d.mkdir(parents=True)
    for i in range(per_class):
      img = np.zeros((8, 8, 3), np.uint8)
      img[0, 0] = (c, i, 0)
      PIL.Image.fromarray(img).save(d / f"{i:03d}.png")


def embedding(images, shift: int):
  out = []
  for im in images:
    c, i = int(np.asarray(im)[0, 0, 0]), int(np.asarray(im)[0, 0, 1])
    noise = np.random.default_rng([c, i]).normal(size=D) * 0.5
    out.append(CENTRES[(c + shift) % len(CLASSES)] + noise)
  return np.stack(out)


def encoder(gen_shift):
  return {
    "images": lambda ims: embedding(ims, 0),
    "generated": lambda ims: embedding(ims, gen_shift),
  }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("sets")
  for split, n in (("train", 12), ("test", 6)):
    for m in ("real", "generated"):
      write_set(root / split, m, n)
  return root


def test_probe_equals_sklearn_and_transfer_needs_alignment(data):
  ev = probe.ProbeEvaluator("t", train=str(data / "train/generated"), test=str(data / "test/real"))
  shifted = ev.run(encoder(SHIFT))["z/t/transfer_accuracy"]
  aligned = ev.run(encoder(0))["z/t/transfer_accuracy"]
  assert aligned == 1.0 and shifted == 0.0
  # The same number straight from sklearn on the same (L2-normalised) embeddings.
  x_tr = common.l2_normalize(embedding(ev.train.images, SHIFT))
  x_te = common.l2_normalize(embedding(ev.test.images, 0))
  clf = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(x_tr, ev.train.labels)
  assert shifted == float(np.mean(clf.predict(x_te) == ev.test.labels))


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
