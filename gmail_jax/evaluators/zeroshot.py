"""Zero-shot classification with prompt ensembles (CLIP, Radford et al. 2021, §3.1.4).

Each class c gets w_c = normalise(mean_t normalise(h(template_t(c)))) over the prompt templates;
an image is classified by argmax_c <normalise(f(x)), w_c>. Top-1 / top-5 accuracy are reported as
fractions in [0, 1]. Works with any encoder exposing encode_images / encode_texts (common.py).

Data: class-folder datasets (`<root>/<class>/<image>`), as a directory or a zip whose entries end
in `<class>/<image>` (e.g. the CIFAR-10 test zip `test/<class>/NNNN.jpg`); the label is the folder.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gmail_jax.data import eval_sets
from gmail_jax.errors import ConfigError
from gmail_jax.evaluators import common

# CLIP's CIFAR-10 classes and 18 prompts (openai/CLIP data/prompts.md).
CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
CIFAR10_TEMPLATES = (
  "a photo of a {}.",
  "a blurry photo of a {}.",
  "a black and white photo of a {}.",
  "a low contrast photo of a {}.",
  "a high contrast photo of a {}.",
  "a bad photo of a {}.",
  "a good photo of a {}.",
  "a photo of a small {}.",
  "a photo of a big {}.",
  "a photo of the {}.",
  "a blurry photo of the {}.",
  "a black and white photo of the {}.",
  "a low contrast photo of the {}.",
  "a high contrast photo of the {}.",
  "a bad photo of the {}.",
  "a good photo of the {}.",
  "a photo of the small {}.",
  "a photo of the big {}.",
)
# CLIP's 80 ImageNet prompts (same source).
IMAGENET_TEMPLATES = (
  "a bad photo of a {}.",
  "a photo of many {}.",
  "a sculpture of a {}.",
  "a photo of the hard to see {}.",
  "a low resolution photo of the {}.",
  "a rendering of a {}.",
  "graffiti of a {}.",
  "a bad photo of the {}.",
  "a cropped photo of the {}.",
  "a tattoo of a {}.",
  "the embroidered {}.",
  "a photo of a hard to see {}.",
  "a bright photo of a {}.",
  "a photo of a clean {}.",
  "a photo of a dirty {}.",
  "a dark photo of the {}.",
  "a drawing of a {}.",
  "a photo of my {}.",
  "the plastic {}.",
  "a photo of the cool {}.",
  "a close-up photo of a {}.",
  "a black and white photo of the {}.",
  "a painting of the {}.",
  "a painting of a {}.",
  "a pixelated photo of the {}.",
  "a sculpture of the {}.",
  "a bright photo of the {}.",
  "a cropped photo of a {}.",
  "a plastic {}.",
  "a photo of the dirty {}.",
  "a jpeg corrupted photo of a {}.",
  "a blurry photo of the {}.",
  "a photo of the {}.",
  "a good photo of the {}.",
  "a rendering of the {}.",
  "a {} in a video game.",
  "a photo of one {}.",
  "a doodle of a {}.",
  "a close-up photo of the {}.",
  "a photo of a {}.",
  "the origami {}.",
  "the {} in a video game.",
  "a sketch of a {}.",
  "a doodle of the {}.",
  "a origami {}.",
  "a low resolution photo of a {}.",
  "the toy {}.",
  "a rendition of the {}.",
  "a photo of the clean {}.",
  "a photo of a large {}.",
  "a rendition of a {}.",
  "a photo of a nice {}.",
  "a photo of a weird {}.",
  "a blurry photo of a {}.",
  "a cartoon {}.",
  "art of a {}.",
  "a sketch of the {}.",
  "a embroidered {}.",
  "a pixelated photo of a {}.",
  "itap of the {}.",
  "a jpeg corrupted photo of the {}.",
  "a good photo of a {}.",
  "a plushie {}.",
  "a photo of the nice {}.",
  "a photo of the small {}.",
  "a photo of the weird {}.",
  "the cartoon {}.",
  "art of the {}.",
  "a drawing of the {}.",
  "a photo of the large {}.",
  "a black and white photo of a {}.",
  "the plushie {}.",
  "a dark photo of a {}.",
  "itap of a {}.",
  "graffiti of the {}.",
  "a toy {}.",
  "itap of my {}.",
  "a photo of a cool {}.",
  "a photo of a small {}.",
  "a tattoo of the {}.",
)
TEMPLATES = {
  "cifar10": CIFAR10_TEMPLATES,
  "imagenet": IMAGENET_TEMPLATES,
  "simple": ("a photo of a {}.",),
}
# Class names for prompts, by name: ImageNet-1k's folders are WordNet ids (n01440764), not words.
CLASSNAMES = {"cifar10": CIFAR10_CLASSES, "imagenet": None}  # None: read from the package file


def imagenet_classnames() -> tuple[str, ...]:
  """CLIP's 1,000 curated ImageNet class names, in the order of the sorted WordNet-id folders
  (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb; shipped as imagenet_classes.txt,
  one per line; 'missile' and 'sunglasses' appear twice there, as in every CLIP evaluation)."""
  path = pathlib.Path(__file__).with_name("imagenet_classes.txt")
  names = tuple(path.read_text(encoding="utf-8").splitlines())
  assert len(names) == 1000, (path, len(names))
  return names


def named_classes(name: str) -> tuple[str, ...]:
  if name not in CLASSNAMES:
    raise ConfigError(f"classnames: {name!r} is not one of {sorted(CLASSNAMES)} (or give a list)")
  return CLASSNAMES[name] or imagenet_classnames()


def class_text_embeddings(
  encode_texts, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> np.ndarray:
  """[C, D] classifier: w_c = normalise(mean_t normalise(encode_texts(template_t.format(c))))."""
  if not templates:
    raise ValueError("zeroshot: empty template list")
  texts = [t.format(c) for c in classnames for t in templates]
  emb = common.l2_normalize(common.encode_in_batches(encode_texts, texts, batch_size))
  emb = emb.reshape(len(classnames), len(templates), -1).mean(1)
  return common.l2_normalize(emb)


def zeroshot_accuracy(
  image_emb: Any, class_emb: Any, labels: Any, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
  """Top-k accuracy (fractions): label among the k highest <normalise(x), w_c> (ties pessimistic).

  A class is counted ahead of the true one when its score is >= the true class's score, as in
  retrieval.recall_at_k. k larger than the number of classes is clipped.
  """
  x = common.l2_normalize(common.to_numpy(image_emb))
  w = common.to_numpy(class_emb)
  labels = np.asarray(labels, np.int64)
  logits = x @ w.T
  own = logits[np.arange(len(labels)), labels][:, None]
  rank = np.sum(logits >= own, axis=1) - 1  # the own class is always >= itself
  return {f"top{k}": float(np.mean(rank < min(k, w.shape[0]))) for k in ks}


class ZeroShotEvaluator(common.Evaluator):
  """`config.evals.<name> = dict(type='zeroshot', every_steps=..., dataset=<dir or zip>,
  templates='cifar10'|'imagenet'|'simple'|[...], classnames=None|'imagenet'|'cifar10'|[...],
  per_class=None, max_images=None,
  batch_size=64, prefix='z/<name>/')` -> {top1, top5}.

  `classnames` overrides the folder names in prompts (same sorted order; 'imagenet' = CLIP's 1,000
  names for the sorted WordNet-id folders of ImageNet val); by default folder names
  with '_' replaced by spaces.
  """

  def __init__(
    self,
    name: str,
    *,
    dataset: str,
    templates: str | Sequence[str] = "imagenet",
    classnames: str | Sequence[str] | None = None,
    per_class: int | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
    every_steps: int = 0,
    prefix: str | None = None,
  ):
    super().__init__(name, every_steps=every_steps, prefix=prefix)
    if isinstance(templates, str):
      if templates not in TEMPLATES:
        raise ConfigError(f"config.evals.{name}.templates: one of {sorted(TEMPLATES)} or a list")
      templates = TEMPLATES[templates]
    self.templates = tuple(templates)
    data = eval_sets.load_class_set(dataset, per_class=per_class, max_images=max_images)
    self.images, self.labels, folders = data.images, data.labels, data.classnames
    if isinstance(classnames, str):
      classnames = named_classes(classnames)
    if classnames is not None and len(classnames) != len(folders):
      raise ConfigError(
        f"config.evals.{name}.classnames: {len(classnames)} names for {len(folders)} class folders"
      )
    self.classnames = list(classnames or [f.replace("_", " ") for f in folders])
    self.batch_size = batch_size

  def compute(self, encoder) -> dict[str, float]:
    w = class_text_embeddings(
      encoder.encode_texts, self.classnames, self.templates, self.batch_size
    )
    x = common.encode_in_batches(encoder.encode_images, self.images, self.batch_size)
    return zeroshot_accuracy(x, w, self.labels)
