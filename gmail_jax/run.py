"""One way to load a trained run: ``load_run(workdir, step=None)`` -> :class:`Run`.

    run = load_run("/tmp/gmail_quickstart/align")     # config from WORKDIR/config.json
    run.teacher, run.student                          # nnx models; the student has LoRA merged
                                                      # and the logit head the run trained
    run.encoders()["student"].encode_generated(images)

Rebuilds the frozen teacher exactly as training did (``build.build``: ``config.init`` or the seeded
random init), restores the trainable state of ``step`` (default: the latest) from
WORKDIR/checkpoints, checks that the checkpoint was trained on this teacher, and folds the adapters
(and a trained projection) into a plain model whose ``logit_scale`` / ``logit_bias`` are the ones
the run trained its image-text logits with (``objectives.trained_logit_head``; else the
teacher's). The only loader used by ``gmail_jax.evaluate``, ``api.load_student`` /
``api.load_clip(WORKDIR)``, ``gmail_jax.sweep`` and the exporters. WORKDIR may be a bucket URL
(``gs://bucket/run``): config.json is read through ``storage``, the checkpoints by Orbax.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import jax
import ml_collections
from flax import nnx

from gmail_jax import schema, storage
from gmail_jax.models import towers
from gmail_jax.models.tokenizer import Tokenizer
from gmail_jax.training import build, checkpointing, encoders
from gmail_jax.training import metrics as metrics_lib
from gmail_jax.training import sharding as shd


@dataclasses.dataclass
class Run:
  """A restored run: models on ``mesh``, the restored train state and what it was trained with."""

  config: ml_collections.ConfigDict
  workdir: str
  step: int
  mesh: jax.sharding.Mesh
  teacher: nnx.Module
  student: nnx.Module  # LoRA (and a trained projection) merged; the trained logit head
  state: dict[str, Any]  # {'step', 'params', 'opt', 'bad_step'} as restored
  tokenizer: Tokenizer

  @property
  def tower(self) -> towers.Tower:
    return towers.get(self.config.model.name)

  def encoders(
    self, batch_size: int = 64, names: tuple[str, ...] = encoders.VIEWS
  ) -> dict[str, encoders.Encoder]:
    """teacher / student / student_all (encoders.views; only ``names``), preprocessing of the
    run's tower."""
    spec = self.tower.preprocess
    return encoders.views(
      self.teacher,
      self.student,
      tokenizer=self.tokenizer,
      mesh=self.mesh,
      batch_size=batch_size,
      mean=spec.mean,
      std=spec.std,
      resize=spec.resize,
      names=names,
    )


def resolve_dir(path: str | os.PathLike) -> str:
  """``path`` as a string: a local path made absolute, a bucket URL as given (no trailing /)."""
  path = os.fspath(path)
  return path.rstrip("/") if storage.is_remote(path) else os.path.abspath(path)


def is_run(path: str | os.PathLike) -> bool:
  """A training workdir (config.json + checkpoints/), as opposed to a model directory."""
  p = storage.path(path)
  return (p / "config.json").is_file() and (p / checkpointing.CHECKPOINT_DIR).is_dir()


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """WORKDIR/config.json (what training wrote, with ``metrics.read_config``'s upgrades of older
  files); WORKDIR local or in a bucket."""
  if not storage.is_remote(workdir):
    return metrics_lib.read_config(workdir)
  path = storage.path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing (not a gmail_jax training workdir?)")
  # metrics.read_config reads local files: it reads a local copy, so the upgrades stay in one place.
  with tempfile.TemporaryDirectory(prefix="gmail_jax-config-") as tmp:
    storage.write_bytes(os.path.join(tmp, "config.json"), path.read_bytes())
    return metrics_lib.read_config(tmp)


def load_run(
  workdir: str | os.PathLike,
  step: int | None = None,
  *,
  config: ml_collections.ConfigDict | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> Run:
  """The run in ``workdir`` at ``step`` (default: latest). ``config`` defaults to the run's
  config.json; ``mesh`` to ``config.mesh`` over all devices."""
  workdir = resolve_dir(workdir)
  config = config if config is not None else read_config(workdir)
  schema.validate(config)
  mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    if (step if step is not None else ckpt.latest_step()) is None:
      raise FileNotFoundError(f"{ckpt.directory}: no checkpoint (train first with gmail_jax.main)")
    with jax.set_mesh(mesh):
      built = build.build(config, mesh)
      abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), built["state"]
      )
      if step is None:  # the newest intact step (nothing is moved: loading is read-only)
        state, meta = ckpt.restore_latest(abstract, set_aside=False)
      else:
        state, meta = ckpt.restore(abstract, step=step)
      models, frozen, rng = built["models"], built["frozen"], built["rng"]
      teacher_id = build.teacher_identity(config, frozen)
      checkpointing.check_teacher(meta.get("teacher", {}), teacher_id, ckpt.directory)
      teacher = nnx.merge(models.teacher, frozen)
      student = build.merged_student(models, state["params"], frozen, rng, config=config)
  finally:
    ckpt.close()
  tokenizer = build.tokenizer(config, built["text_context"])
  return Run(config, workdir, int(meta["step"]), mesh, teacher, student, state, tokenizer)
