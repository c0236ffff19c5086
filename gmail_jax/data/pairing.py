"""Pairing rules: K generated images per (real image, caption) item, and same-class real draws.

Items (rows sharing a real image and a caption) with ``n`` generated images get
``c = min(K, n)`` slots per epoch (``K = 0``: ``c = n``). Slot ``j`` of epoch ``e`` uses generated
image ``(j + e*c) mod n``, so every generated image is used once ``n/c`` epochs have passed, and one
epoch still delivers each slot exactly once.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
  """64-bit hash of integers (splitmix64 chain): deterministic per-(seed, epoch, index) draws."""
  h = 0x9E3779B97F4A7C15
  for v in values:
    h = (h ^ (int(v) & _MASK64)) & _MASK64
    h = (h + 0x9E3779B97F4A7C15) & _MASK64
    z = h
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    h = z ^ (z >> 31)
  return h


class PairIndex:
  """Maps (slot, epoch) -> row for rows grouped into items (see module docstring)."""

  def __init__(self, item_of_row: np.ndarray, gens_per_caption: int = 1):
    item_of_row = np.asarray(item_of_row, dtype=np.int64)
    if item_of_row.ndim != 1:
      raise ValueError("item_of_row must be 1-D")
    order = np.argsort(item_of_row, kind="stable")  # rows of an item, in source order
    items, start, counts = np.unique(item_of_row[order], return_index=True, return_counts=True)
    del items
    k = int(gens_per_caption)
    slots = counts if k <= 0 else np.minimum(counts, k)
    self._rows = order.astype(np.int64)
    self._start = start.astype(np.int64)
    self._count = counts.astype(np.int64)
    self._slots = slots.astype(np.int64)
    self._slot_item = np.repeat(np.arange(len(counts), dtype=np.int64), slots)
    first_slot = np.cumsum(slots) - slots
    self._slot_j = np.arange(int(slots.sum()), dtype=np.int64) - np.repeat(first_slot, slots)

  def __len__(self) -> int:
    return len(self._slot_item)

  @property
  def num_items(self) -> int:
    return len(self._count)

  def row(self, slot: int, epoch: int) -> int:
    it = self._slot_item[slot]
    j = self._slot_j[slot]
    n = self._count[it]
    return int(self._rows[self._start[it] + (j + epoch * self._slots[it]) % n])


def same_class_draw(seed: int, epoch: int, index: int, n: int) -> int:
  """Index in [0, n) of the real image paired with generated image ``index`` in ``epoch``."""
  return mix64(seed, epoch, index) % n
