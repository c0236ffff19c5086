"""Bad-input policy: rejected inputs go to WORKDIR/rejects.jsonl; ``fail`` stops with one line.

Each rejected pair is one JSON object per line: ``{"path", "reason", "policy", ...}``. Lines are
written with a single ``O_APPEND`` write, so grain worker processes can share the file; in a
bucket workdir, which has no append, each process writes its own object beside it
(storage.append_shared; ``read_rejects`` reads both). Training
repeats epochs, so the same bad file can be logged once per epoch; counts are by unique
(path, reason).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from gmail_jax import storage
from gmail_jax.errors import InputError

REJECTS_FILE = "rejects.jsonl"


class BadInputError(InputError):
  """A bad input under ``on_bad_input='fail'``; the message is one line naming file and reason."""


class BadInput(Exception):
  """Raised by sources/decoders for one unusable input; the pipeline turns it into a reject."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = str(path)
    self.reason = " ".join(str(reason).split())  # one line

  def __reduce__(self):
    return (BadInput, (self.path, self.reason))


@dataclasses.dataclass(frozen=True)
class RejectLog:
  """Where rejects go and what to do about them; picklable (travels into grain workers)."""

  path: str | None
  policy: str = "skip"

  @classmethod
  def for_workdir(cls, workdir: str | os.PathLike | None, policy: str = "skip") -> RejectLog:
    if policy not in ("skip", "fail"):
      raise ValueError(f"on_bad_input={policy!r}: expected skip or fail")
    if workdir is None:
      return cls(None, policy)
    storage.makedirs(workdir)
    return cls(storage.join(workdir, REJECTS_FILE), policy)

  def reject(self, path: str, reason: str, **extra) -> None:
    """Log one reject; under ``fail`` raise :class:`BadInputError` after logging it."""
    reason = " ".join(str(reason).split())
    if self.path is not None:
      line = json.dumps({"path": str(path), "reason": reason, "policy": self.policy, **extra})
      storage.append_shared(self.path, line)
    if self.policy == "fail":
      raise BadInputError(f"bad input {path}: {reason} (config.data.on_bad_input='fail')")


def read_rejects(workdir: str | os.PathLike, unique: bool = True) -> list[dict]:
  """Rejects logged under ``workdir`` (first occurrence of each (path, reason) if ``unique``)."""
  out, seen = [], set()
  for line in storage.read_shared(storage.path(workdir) / REJECTS_FILE):
    if not line.strip():
      continue
    rec = json.loads(line)
    key = (rec.get("path"), rec.get("reason"))
    if unique and key in seen:
      continue
    seen.add(key)
    out.append(rec)
  return out


def count_rejects(workdir: str | os.PathLike) -> int:
  """Number of distinct rejected inputs so far (what the trainer logs as ``data/rejects``)."""
  return len(read_rejects(workdir))


def reject_summary(workdir: str | os.PathLike) -> dict[str, int]:
  """Distinct rejects per reason kind (the text before the first ':' of the reason)."""
  return dict(collections.Counter(r["reason"].split(":")[0] for r in read_rejects(workdir)))
