"""Linear-probe transfer: a classifier fitted on one set of embeddings, tested on another.

GMAIL's claim is that what is learned on generated images transfers to real ones (Table 9):
the probe is fitted on *generated* train images embedded by the generated path (f_g for the
student) and tested on *held-out real* images embedded by the real path (f_r).

`config.evals.<name> = dict(type='probe', train=DIR, test=DIR, train_path='generated',
test_path='real', c=1.0, seed=0, image_size=None)`; ``train`` / ``test`` are class-folder datasets
(``<class>/<image>``, or a zip) with the same class names. ``train_path`` / ``test_path`` pick the
encoder function: 'generated' = ``encode_generated``, 'real' = ``encode_images``. ``image_size``
pre-crops the images in the run's tower's ``resize`` mode (training and ``evaluate`` pass it).
Reports {'transfer_accuracy': top-1}.
"""

from __future__ import annotations

import numpy as np

from gmail_jax.data import eval_sets
from gmail_jax.errors import ConfigError
from gmail_jax.evaluators import common

PATHS = ("generated", "real")


def probe_accuracy(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  *,
  c: float = 1.0,
  seed: int = 0,
) -> float:
  """Top-1 accuracy of a multinomial logistic-regression probe (lbfgs, L2 penalty C) fitted on
  L2-normalised ``train_x`` and evaluated on L2-normalised ``test_x``."""
  from sklearn.linear_model import LogisticRegression

  clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
  clf.fit(common.l2_normalize(np.asarray(train_x, np.float64)), train_y)
  pred = clf.predict(common.l2_normalize(np.asarray(test_x, np.float64)))
  return float(np.mean(pred == test_y))


class ProbeEvaluator(common.Evaluator):
  """See the module docstring."""

  def __init__(
    self,
    name: str,
    *,
    train: str,
    test: str,
    train_path: str = "generated",
    test_path: str = "real",
    c: float = 1.0,
    seed: int = 0,
    image_size: int | None = None,
    resize: str = "shortest_edge_crop",
    batch_size: int = 256,
    every_steps: int = 0,
    prefix: str | None = None,
  ):
    super().__init__(name, every_steps=every_steps, prefix=prefix)
    for key, value in (("train_path", train_path), ("test_path", test_path)):
      if value not in PATHS:
        raise ConfigError(f"config.evals.{name}.{key}: one of {PATHS}, got {value!r}")
    self.train = eval_sets.load_class_set(train, image_size=image_size, resize=resize)
    self.test = eval_sets.load_class_set(test, image_size=image_size, resize=resize)
    if self.train.classnames != self.test.classnames:
      raise ConfigError(f"config.evals.{name}: {train} and {test} have different classes")
    self.train_path, self.test_path = train_path, test_path
    self.c, self.seed, self.batch_size = float(c), int(seed), batch_size

  def _embed(self, encoder, path: str, images) -> np.ndarray:
    fn = (
      encoder.encode_images if path == "real" else (lambda b: common.encode_generated(encoder, b))
    )
    return common.encode_in_batches(fn, images, self.batch_size)

  def compute(self, encoder) -> dict[str, float]:
    x_train = self._embed(encoder, self.train_path, self.train.images)
    x_test = self._embed(encoder, self.test_path, self.test.images)
    acc = probe_accuracy(
      x_train, self.train.labels, x_test, self.test.labels, c=self.c, seed=self.seed
    )
    return {"transfer_accuracy": acc}
