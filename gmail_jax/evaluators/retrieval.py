"""Image-text retrieval Recall@K (COCO 5k / Flickr 1k protocols, several captions per image).

GMAIL (Mo & Yun, ICML 2025) Tables 3-4 and TPC-CMA (arXiv 2604.00279) report zero-shot COCO and
Flickr30k retrieval R@1/5/10 in both directions. Scores are dot products of the given embeddings:
pass L2-normalised embeddings (what `encode_images` / `encode_texts` return) to rank by cosine.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gmail_jax.data import eval_sets
from gmail_jax.errors import ConfigError
from gmail_jax.evaluators import common


@functools.partial(jax.jit, static_argnames=("kmax",))
def _ranks(img_chunks: jax.Array, txt: jax.Array, t2i: jax.Array, n_img: int, kmax: int):
  """One pass of ``txt @ img_chunk.T`` blocks [Nt, C] (each score computed once, both directions).

  image→text is local to a block (all texts are in it): count the negatives >= the best positive.
  text→image needs every image: carry each text's top-``kmax`` negative scores across blocks
  (partial top-k, no sort of all Ni) and its own score. Returns (i2t rank per padded image row
  [Nc*C], t2i kmax largest negatives [Nt, kmax], t2i own score [Nt]).
  """
  n_chunks, c, _ = img_chunks.shape

  def step(carry, xs):
    top, own = carry
    chunk, lo = xs
    block = txt @ chunk.T  # [Nt, C]
    cols = lo + jnp.arange(c)
    pos = t2i[:, None] == cols[None, :]
    neg_ok = ~pos & (cols < n_img)[None, :]  # padded image rows are nobody's negative
    best = jnp.max(jnp.where(pos, block, -jnp.inf), axis=0)
    i2t = jnp.sum(jnp.where(neg_ok & (block >= best[None, :]), 1, 0), axis=0)
    neg = jnp.where(neg_ok, block, -jnp.inf)
    top = jax.lax.top_k(jnp.concatenate([top, jax.lax.top_k(neg, kmax)[0]], axis=1), kmax)[0]
    own = own + jnp.sum(jnp.where(pos, block, 0.0), axis=1)  # each text's image is in one block
    return (top, own), i2t

  init = (jnp.full((txt.shape[0], kmax), -jnp.inf, txt.dtype), jnp.zeros(txt.shape[0], txt.dtype))
  starts = jnp.arange(n_chunks) * c
  (top, own), i2t = jax.lax.scan(step, init, (img_chunks, starts))
  return i2t.reshape(-1), top, own


def recall_at_k(
  image_emb: Any,
  text_emb: Any,
  text_to_image: Any,
  ks: Sequence[int] = (1, 5, 10),
  *,
  chunk: int = 1024,
) -> dict[str, float]:
  """Recall@K in both directions, as fractions in [0, 1] (not percent).

  s_ij = <image_i, text_j> (pass L2-normalised embeddings for cosine). P(i) = {j : text_to_image[j]
  == i} are image i's captions (several per image: COCO 5, Flickr 5).

      image→text: rank_i = #{j ∉ P(i) : s_ij ≥ max_{p ∈ P(i)} s_ip}     hit@k ⇔ rank_i < k
      text→image: rank_j = #{i' ≠ i(j) : s_i'j ≥ s_i(j)j}                 hit@k ⇔ rank_j < k
      i2t_rK = mean_i hit@K,  t2i_rK = mean_j hit@K

  i.e. an image is a hit if ANY of its captions is in the top K, and a caption if its image is.
  Ties are pessimistic and deterministic: every negative scoring exactly equal to the (best)
  positive is ranked ahead of it (so a constant model scores 0, not chance). An image with no
  caption is skipped with an error rather than counted as a miss.

  Args:
    image_emb: [Ni, D] (numpy or jax).
    text_emb: [Nt, D].
    text_to_image: int [Nt], index into image_emb of each caption's image.
    ks: the K values.
    chunk: image rows per similarity block (bounds device memory: chunk × Nt scores).

  Each score is computed once (one ``Nt × Ni`` matmul in blocks); text→image ranks are not counted
  but read off a partial top-k: rank_j < k ⇔ the k-th largest negative score < s_i(j)j (the same
  pessimistic tie rule). Equal, bit for bit, to counting on the same scores.

  Returns:
    {'i2t_r1': ..., 'i2t_r5': ..., 'i2t_r10': ..., 't2i_r1': ..., ...} as Python floats.
  """
  img = np.asarray(common.to_numpy(image_emb, np.float32))
  txt = np.asarray(common.to_numpy(text_emb, np.float32))
  t2i = np.asarray(text_to_image, np.int64).reshape(-1)
  if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
    raise ValueError(f"recall_at_k: need [Ni, D] and [Nt, D], got {img.shape} and {txt.shape}")
  if t2i.shape[0] != txt.shape[0]:
    raise ValueError(
      f"recall_at_k: text_to_image has {t2i.shape[0]} entries for {txt.shape[0]} texts"
    )
  if t2i.size and (t2i.min() < 0 or t2i.max() >= img.shape[0]):
    raise ValueError(f"recall_at_k: text_to_image out of range [0, {img.shape[0]})")
  n_caps = np.bincount(t2i, minlength=img.shape[0])
  if (n_caps == 0).any():
    raise ValueError(f"recall_at_k: images without captions: {np.flatnonzero(n_caps == 0)[:10]}")

  kmax = max(ks)
  chunk = max(min(int(chunk), img.shape[0]), kmax)  # a block's top-k needs >= kmax columns
  n_chunks = -(-img.shape[0] // chunk)
  padded = np.zeros((n_chunks * chunk, img.shape[1]), np.float32)
  padded[: img.shape[0]] = img
  i2t_rank, top, own = _ranks(
    jnp.asarray(padded.reshape(n_chunks, chunk, -1)),
    jnp.asarray(txt),
    jnp.asarray(t2i, jnp.int32),
    img.shape[0],
    kmax,
  )
  i2t_rank = np.asarray(i2t_rank)[: img.shape[0]]
  top, own = np.asarray(top), np.asarray(own)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
  for k in ks:
    out[f"t2i_r{k}"] = float(np.mean(top[:, k - 1] < own))  # < k negatives score >= own
  return out


class RetrievalEvaluator(common.Evaluator):
  """`config.evals.<name> = dict(type='retrieval', every_steps=..., images_dir=...,
  captions_json=... | karpathy_json=..., split='test', max_images=None, batch_size=64,
  ks=(1, 5, 10), prefix='z/<name>/')`.

  Captions from a COCO captions JSON (``captions_json``: images of ``images_dir`` by id), or from a
  Karpathy-split JSON (``karpathy_json`` + ``split``: COCO-5k is dataset_coco.json's 'test' split,
  Flickr30k-1k dataset_flickr30k.json's). Loads the images once (at construction), embeds them
  with `encode_images` and the captions with `encode_texts`, and reports recall_at_k (fractions in
  [0, 1]) in both directions.
  """

  def __init__(
    self,
    name: str,
    *,
    images_dir: str,
    captions_json: str | None = None,
    karpathy_json: str | None = None,
    split: str = "test",
    max_images: int | None = None,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    every_steps: int = 0,
    prefix: str | None = None,
  ):
    super().__init__(name, every_steps=every_steps, prefix=prefix)
    if (captions_json is None) == (karpathy_json is None):
      raise ConfigError(f"config.evals.{name}: give one of captions_json or karpathy_json")
    if karpathy_json is not None:
      paths, self.captions, self.text_to_image = eval_sets.karpathy_captions(
        karpathy_json, images_dir, split=split, max_images=max_images
      )
    else:
      paths, self.captions, self.text_to_image = eval_sets.coco_captions(
        captions_json, images_dir, max_images=max_images
      )
    self.images = eval_sets.load_images(paths)
    self.batch_size = batch_size
    self.ks = tuple(ks)

  def compute(self, encoder) -> dict[str, float]:
    img = common.encode_in_batches(encoder.encode_images, self.images, self.batch_size)
    txt = common.encode_in_batches(encoder.encode_texts, self.captions, self.batch_size)
    return recall_at_k(
      common.l2_normalize(img), common.l2_normalize(txt), self.text_to_image, self.ks
    )
