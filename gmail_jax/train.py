"""GMAIL training: a LoRA student beside its frozen teacher (one copy of the frozen weights).

``train_and_evaluate(config, workdir)`` runs, in this order (big_vision style banner sections):
config checks → mesh → data → model (teacher) → LoRA (student) → optimizer/state → restore →
evals → train loop → report. Outputs under WORKDIR: config.json, metrics.jsonl, tb/,
checkpoints/ (Orbax: trainable state + optimizer + step + data-iterator state), rejects.jsonl.

Init order (see checkpointing.py): 1. resume from WORKDIR/checkpoints, 2. frozen weights from
``config.init`` (or the quickstart's ``config.teacher_pretrain``), 3. random init from
``config.model.variant`` and ``config.seed``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from gmail_jax import checkpointing, optim, tpc_cma, train_step
from gmail_jax import metrics as metrics_lib
from gmail_jax import sharding as shd
from gmail_jax.data import preprocess
from gmail_jax.models import clip as clip_lib
from gmail_jax.models import lora as lora_lib

jax.config.update("jax_threefry_partitionable", True)

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}  # None = float32 compute
# Keys of the config groups this trainer owns; anything else there is a typo (named in the error).
KNOWN = {
  "model": {"variant", "dtype", "remat"},
  "lora": {"rank", "alpha", "dropout", "targets", "mlp", "train_proj"},
  "loss": {"temperature", "learn_temperature", "symmetric", "text_weight", "mask_groups", "mode"},
  "optim": {
    "name",
    "lr",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "clip_norm",
    "schedule",
    "warmup_steps",
    "restart_steps",
    "restart_mult",
    "min_lr_ratio",
    "accum_steps",
  },
}
REQUIRED = (
  "seed",
  "total_steps",
  "batch_size",
  "log_every_steps",
  "checkpoint_every_steps",
  "mesh",
  "data",
)


def write_note(msg: str) -> None:
  if jax.process_index() == 0:
    logging.info("NOTE: %s", msg)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One-line ValueErrors naming the key, before anything is built or compiled."""
  for key in REQUIRED:
    if key not in config:
      raise ValueError(f"config.{key}: missing")
  for group, keys in KNOWN.items():
    if group not in config:
      raise ValueError(f"config.{group}: missing")
    unknown = sorted(set(config[group].keys()) - keys)
    if unknown:
      raise ValueError(f"config.{group}.{unknown[0]}: unknown key (known: {sorted(keys)})")
  for key in ("total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps"):
    if int(config[key]) < 1:
      raise ValueError(f"config.{key}: must be >= 1, got {config[key]}")
  if config.model.variant not in clip_lib.VARIANTS:
    raise ValueError(
      f"config.model.variant: {config.model.variant!r} not in {sorted(clip_lib.VARIANTS)}"
    )
  if config.model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype: {config.model.dtype!r} not in {sorted(DTYPES)}")
  if not config.loss.learn_temperature and not config.loss.temperature > 0:
    raise ValueError(f"config.loss.temperature: must be > 0, got {config.loss.temperature}")
  if config.loss.text_weight < 0:
    raise ValueError(f"config.loss.text_weight: must be >= 0, got {config.loss.text_weight}")
  tpc_cma.validate(config)  # loss.mode, and config.cma in the TPC-CMA mode
  if int(config.optim.accum_steps) < 1:
    raise ValueError(f"config.optim.accum_steps: must be >= 1, got {config.optim.accum_steps}")
  optim.make_schedule(config.optim, config.total_steps)  # validates schedule keys


def lora_targets(config: ml_collections.ConfigDict) -> list[str]:
  targets = list(config.lora.targets)
  if config.lora.mlp:
    targets.append(lora_lib.MLP_TARGETS)
  return targets


# ---------------------------------------------------------------------------------------------
# Model construction (teacher, then student = teacher + LoRA).
# ---------------------------------------------------------------------------------------------


def teacher_source(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the frozen weights are (recorded in checkpoint metadata; see checkpointing.py)."""
  if config.get("teacher_pretrain"):
    return {"source": "teacher_pretrain", "variant": config.model.variant}
  if config.init:
    return {"source": f"init:{config.init}"}
  return {"source": f"scratch:{config.model.variant}:seed={config.seed}"}


def _model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {"dtype": DTYPES[config.model.dtype], "remat": bool(config.model.remat)}


def model_config(config: ml_collections.ConfigDict) -> clip_lib.CLIPConfig:
  """The CLIP architecture a config trains (without loading any weights)."""
  if config.get("teacher_pretrain"):
    from gmail_jax import pretrain  # noqa: PLC0415

    return pretrain.teacher_config(config)
  return clip_lib.clip_config(config.model.variant)


def abstract_train_state(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Shapes only (jax.eval_shape): frozen state, LoRA, trainable params and optimizer state.

  Used by the config tests and by ``api.load_student`` to build a restore target.
  """
  cfg = model_config(config)
  teacher = nnx.eval_shape(lambda: clip_lib.CLIP(cfg, rngs=nnx.Rngs(0), **_model_kwargs(config)))
  models, lora, rng, frozen = make_student(config, teacher)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  params = jax.eval_shape(lambda f: initial_params(config, models, lora, f), frozen)
  state = jax.eval_shape(lambda p: train_step.init_train_state(p, tx), params)
  return {"models": models, "frozen": frozen, "rng": rng, "state": state}


def build_teacher(
  config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, *, fsdp: bool
) -> nnx.Module:
  """The frozen CLIP, its state placed on ``mesh`` (replicated, or FSDP by the size rule)."""
  kw = _model_kwargs(config)
  if config.get("teacher_pretrain"):
    from gmail_jax import pretrain  # noqa: PLC0415 (quickstart stage 1, optional)

    model = pretrain.pretrain_teacher(config, workdir)
    if kw["dtype"] is not None or kw["remat"]:  # re-wrap in the training compute dtype
      model = _rebuild(model, model.config, **kw)
  elif config.init:
    from gmail_jax.models import convert  # noqa: PLC0415

    model = convert.load_pretrained(config.init, **kw)
  else:
    cfg = model_config(config)

    def make():
      return clip_lib.CLIP(cfg, rngs=nnx.Rngs(params=config.seed), **kw)

    # Shapes first, then a jitted init straight into the target shardings.
    gdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = shd.param_shardings(abstract, mesh, fsdp=fsdp)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(gdef, state)
  gdef, state = nnx.split(model)
  return nnx.merge(gdef, place(state, shd.param_shardings(state, mesh, fsdp=fsdp)))


def _rebuild(model: nnx.Module, cfg: clip_lib.CLIPConfig, **kw) -> nnx.Module:
  fresh = nnx.eval_shape(lambda: clip_lib.CLIP(cfg, rngs=nnx.Rngs(0), **kw))
  nnx.update(fresh, nnx.state(model))
  return fresh


def place(tree, shardings):
  """Host/any-device values -> global arrays on ``shardings`` (multi-process safe)."""

  def one(x, s):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(shd.put_global(jax.random.key_data(x), s), impl=impl)
    return shd.put_global(np.asarray(x), s)

  return jax.tree.map(one, tree, shardings)


def make_student(config: ml_collections.ConfigDict, teacher: nnx.Module):
  """Attaches LoRA to ``teacher`` (turning the object into the student) and splits it.

  Returns (models, lora, rng, frozen): ``models.teacher`` is the pre-LoRA graphdef, ``frozen``
  the ONE frozen state both graphdefs run on.
  """
  teacher_def, _ = nnx.split(teacher)
  lora_lib.apply_lora(
    teacher,
    rank=config.lora.rank,
    alpha=config.lora.alpha,
    dropout=config.lora.dropout,
    targets=lora_targets(config),
    rngs=nnx.Rngs(params=config.seed + 1, dropout=config.seed + 2),
  )
  student_def, lora, rng, frozen = lora_lib.split_student(teacher)
  return train_step.Models(teacher=teacher_def, student=student_def), lora, rng, frozen


def initial_params(config, models: train_step.Models, lora, frozen) -> dict[str, Any]:
  """The trainable pytree: LoRA [+ a COPY of the vision projection] [+ log 1/tau]."""
  params: dict[str, Any] = {"lora": lora}
  if config.lora.train_proj:
    proj, _ = nnx.split_state(frozen, train_step.is_proj, ...)
    params["proj"] = jax.tree.map(jnp.copy, proj)  # own buffer: the state is donated
  if config.loss.learn_temperature:
    params["log_scale"] = jnp.asarray(math.log(1.0 / config.loss.temperature), jnp.float32)
  return params


def build(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> dict:
  """Teacher, student, optimizer and the initial train state, all placed on ``mesh``."""
  fsdp = mesh.shape["fsdp"] > 1
  teacher = build_teacher(config, workdir, mesh, fsdp=fsdp)
  if teacher.image_size != config.data.image_size:
    raise ValueError(
      f"config.data.image_size={config.data.image_size} but the model expects"
      f" {teacher.image_size}x{teacher.image_size} images"
    )
  models, lora, rng, frozen = make_student(config, teacher)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  params = initial_params(config, models, lora, frozen)
  params = place(params, shd.param_shardings(params, mesh, fsdp=fsdp))
  rng = place(rng, jax.tree.map(lambda _: shd.replicated(mesh), rng))
  state = train_step.init_train_state(params, tx)
  state = jax.tree.map(lambda x: x if x.ndim else shd.put_global(x, shd.replicated(mesh)), state)
  return {
    "models": models,
    "frozen": frozen,
    "rng": rng,
    "state": state,
    "tx": tx,
    "schedule": schedule,
    "text_context": teacher.config.text.context_length,
  }


def merged_student(models: train_step.Models, params: dict, frozen, rng) -> nnx.Module:
  """A plain CLIP with LoRA (and a trained projection) folded in: the deployable student."""
  states = train_step.student_state(params, frozen, rng)
  # New Variable containers (same buffers): merging in place must not touch the shared state.
  student = nnx.merge(models.student, *(jax.tree.map(lambda x: x, s) for s in states))
  lora_lib.merge_lora(student)
  return student


class TrainEncoder:
  """Evaluator-facing encoder during training (evaluators.common interface).

  ``encode_images``: real images through the frozen teacher f_r (Algorithm 1 inference path);
  ``encode_generated``: generated images through the student f_g; ``encode_texts``: frozen text
  tower. Inputs are replicated on the mesh (small eval batches; multi-process safe).
  """

  def __init__(self, teacher: nnx.Module, student: nnx.Module, tokenizer, mesh):
    self.image_size = teacher.image_size
    self.tokenizer, self.mesh = tokenizer, mesh
    t_def, t_state = nnx.split(teacher)
    s_def, s_state = nnx.split(student)
    norm = lambda e: e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    self._img = jax.jit(lambda s, x: norm(nnx.merge(t_def, s).vision(x)))
    self._gen = jax.jit(lambda s, x: norm(nnx.merge(s_def, s).vision(x)))
    self._txt = jax.jit(lambda s, x: norm(nnx.merge(t_def, s).text(x)))
    self._t_state, self._s_state = t_state, s_state

  def _pixels(self, images) -> jax.Array:
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
      x = images.astype(np.float32)
    else:
      x = preprocess.preprocess(list(images), self.image_size)
    return shd.put_global(x, shd.replicated(self.mesh))

  def encode_images(self, images) -> np.ndarray:
    return np.asarray(self._img(self._t_state, self._pixels(images)))

  def encode_generated(self, images) -> np.ndarray:
    return np.asarray(self._gen(self._s_state, self._pixels(images)))

  def encode_texts(self, texts) -> np.ndarray:
    ids = shd.put_global(
      np.asarray(self.tokenizer(list(texts)), np.int32), shd.replicated(self.mesh)
    )
    return np.asarray(self._txt(self._t_state, ids))


# ---------------------------------------------------------------------------------------------
# train_and_evaluate
# ---------------------------------------------------------------------------------------------


def make_step(config: ml_collections.ConfigDict, built: dict[str, Any], mesh: jax.sharding.Mesh):
  """The jitted update step for ``build``'s output; in/out shardings are read off its arrays."""
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  return train_step.make_train_step(
    config,
    built["models"],
    built["tx"],
    built["schedule"],
    mesh,
    state_shardings=shardings(built["state"]),
    frozen_shardings=shardings(built["frozen"]),
    rng_shardings=shardings(built["rng"]),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the GMAIL student; returns the last logged metrics."""
  workdir = os.path.abspath(workdir)

  # ---------------------------------------------------------------------------- config checks
  validate_config(config)
  metrics_lib.write_config(config, workdir)

  # ------------------------------------------------------------------------------------ mesh
  mesh = shd.make_mesh(config.mesh)
  shd.check_batch_size(config.batch_size, mesh)
  k = int(config.optim.accum_steps)
  if config.batch_size % (k * mesh.size):
    raise ValueError(
      f"config.optim.accum_steps={k}: batch_size {config.batch_size} must split into {k}"
      f" microbatches divisible by {mesh.size} devices"
    )
  write_note(
    f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} processes"
  )

  with jax.set_mesh(mesh):
    # ---------------------------------------------------------------------------------- data
    from gmail_jax.data import pipeline  # noqa: PLC0415
    from gmail_jax.models.tokenizer import Tokenizer  # noqa: PLC0415

    # ------------------------------------------------------------------ model, LoRA, optimizer
    built = build(config, workdir, mesh)
    models, frozen, rng = built["models"], built["frozen"], built["rng"]
    state = built["state"]
    write_note(
      f"teacher {teacher_source(config)['source']}: {lora_lib.count_params(frozen):,} frozen"
      f" params; trainable {lora_lib.count_params(state['params']):,}"
    )
    tokenizer = Tokenizer(context_length=built["text_context"])
    data_iter = pipeline.make_train_iterator(config, tokenizer=tokenizer, workdir=workdir)

    # -------------------------------------------------------------------------------- restore
    ckpt = checkpointing.Checkpointer(
      workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints
    )
    teacher_id = {**teacher_source(config), "checksum": checkpointing.frozen_checksum(frozen)}
    if ckpt.latest_step() is not None:  # 1. auto-resume
      abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
      )
      state, meta = ckpt.restore(abstract, data_iter=data_iter)
      checkpointing.check_teacher(meta.get("teacher", {}), teacher_id, ckpt.directory)
      write_note(f"resumed from step {meta['step']}")
    first_step = int(jax.device_get(state["step"]))

    # ----------------------------------------------------------------------------- update step
    step_fn = make_step(config, built, mesh)  # the restored state has the built shardings

    # ------------------------------------------------------- teacher-embedding cache (optional)
    from gmail_jax import teacher_cache  # noqa: PLC0415

    cache = teacher_cache.from_config(
      config,
      models=models,
      frozen=frozen,
      mesh=mesh,
      workdir=workdir,
      model_config=model_config(config),
    )

    # ---------------------------------------------------------------------------------- evals
    evaluators = []
    if config.get("evals"):
      from gmail_jax.evaluators import common as evals_common  # noqa: PLC0415

      evaluators = evals_common.from_config(config.evals)

    def run_evals(step: int, force: bool = False) -> dict[str, float]:
      due = [ev for ev in evaluators if force or ev.should_run(step)]
      if not due:
        return {}
      teacher = nnx.merge(models.teacher, frozen)
      student = merged_student(models, state["params"], frozen, rng)
      enc = TrainEncoder(teacher, student, tokenizer, mesh)
      out = {}
      for ev in due:
        out.update(ev.run(enc, step))
      return out

    # ----------------------------------------------------------------------------- train loop
    writer = metrics_lib.MetricWriter(
      workdir, total_steps=config.total_steps, first_step=first_step
    )
    last: dict[str, float] = {}
    try:
      for step in range(first_step + 1, config.total_steps + 1):
        local = next(data_iter)
        if cache is not None:  # teacher_emb from the cache; the step skips the teacher
          local = teacher_cache.attach(local, *cache)
        batch = pipeline.global_batch(local, mesh)
        state, m = step_fn(state, frozen, rng, batch)
        is_last = step == config.total_steps
        log_now = step % config.log_every_steps == 0 or is_last
        ckpt_now = step % config.checkpoint_every_steps == 0 or is_last
        if log_now:
          last = writer.write(step, {f"train/{key}": v for key, v in m.items()})
        if log_now or ckpt_now:
          bad = int(jax.device_get(state["bad_step"]))
          if bad >= 0:
            ckpt.wait()
            raise FloatingPointError(
              f"non-finite loss at step {bad} (detected at step {step}); the update was skipped"
              f" and training stopped. Last good checkpoint: step {ckpt.latest_step()} in"
              f" {ckpt.directory} (rerun with a lower config.optim.lr or check the data)"
            )
        if ckpt_now:
          ckpt.save(step, state, data_iter=data_iter, teacher=teacher_id)
        ev = run_evals(step)
        if ev:
          last.update(writer.write(step, ev))
    finally:
      if cache is not None:
        cache[0].flush()
      ckpt.close()
      writer.close()
      close = getattr(data_iter, "close", None)
      if close is not None:
        close()

    # --------------------------------------------------------------------------------- report
    if config.get("report"):
      from gmail_jax import report  # noqa: PLC0415 (quickstart / cifake stage 3)

      report.write_report(
        config,
        workdir,
        teacher=nnx.merge(models.teacher, frozen),
        student=merged_student(models, state["params"], frozen, rng),
      )
  return last
