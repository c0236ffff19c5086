"""GMAIL / TPC-CMA training: a LoRA student beside its frozen teacher (one copy of frozen weights).

``train_and_evaluate(config, workdir)`` runs, in this order (big_vision style banner sections):
config checks → mesh → model (teacher, student) → data → restore → update step → evals → train
loop. Outputs under WORKDIR: config.json, metrics.jsonl, tb/, checkpoints/ (Orbax: trainable state
+ optimizer + step + data-iterator state), rejects.jsonl. It is the 'align' stage of an experiment
(gmail_jax/experiments/driver.py); it knows nothing of the stages around it.

Init order (see checkpointing.py): 1. resume from WORKDIR/checkpoints, 2. frozen weights from
``config.init``, 3. random init from ``config.model`` and ``config.seed`` (build.py).

WORKDIR may be a bucket URL (``gs://bucket/run``): every file goes through gmail_jax/storage.py
(metrics.py for the logs, Orbax for the checkpoints, teacher_cache.py for a cache there).
"""

from __future__ import annotations

import importlib.util

import jax
import ml_collections
from absl import logging
from flax import nnx

from gmail_jax import faults, objectives, preemption, schema, storage
from gmail_jax.errors import ConfigError, ResumeError
from gmail_jax.models import lora as lora_lib
from gmail_jax.models import towers
from gmail_jax.training import build, checkpointing, encoders, optim
from gmail_jax.training import metrics as metrics_lib
from gmail_jax.training import sharding as shd

jax.config.update("jax_threefry_partitionable", True)


def write_note(msg: str) -> None:
  if jax.process_index() == 0:
    logging.info("NOTE: %s", msg)


def check(config: ml_collections.ConfigDict) -> None:
  """Every check of the training config that can fail before anything is built (one line)."""
  schema.validate(config)
  if int(config.optim.accum_steps) < 1:
    raise ConfigError(f"config.optim.accum_steps: must be >= 1, got {config.optim.accum_steps}")
  optim.make_schedule(config.optim, config.total_steps)  # validates the schedule's keys
  if config.teacher_cache.enabled and not objectives.make(config).needs_real:
    raise ConfigError(
      f"config.teacher_cache.enabled: loss.mode={config.loss.mode!r} with these pairs never uses"
      " teacher image embeddings; disable the cache"
    )
  if config.wandb.enabled and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"config.wandb.enabled: pip install {metrics_lib.WANDB_PIN} (or [wandb])")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the GMAIL student in ``workdir`` (a local folder or a bucket URL);
  returns the last logged metrics."""
  workdir = checkpointing.resolve_workdir(workdir)

  # ---------------------------------------------------------------------------- config checks
  check(config)
  # One line before anything is built or compiled (the driver checks too; this is the library
  # entry point).
  storage.check_writable(workdir)
  objective = objectives.make(config)
  # A resume may not change what the saved state means: compared before anything is written.
  resumed_from, allowed = None, {}
  saved_steps = checkpointing.saved_steps(workdir)
  if saved_steps and (storage.path(workdir) / "config.json").exists():
    refused, allowed = schema.resume_changes(metrics_lib.read_config(workdir), config)
    if refused:
      listed = ", ".join(f"config.{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
      raise ResumeError(
        f"{workdir}: resuming with {listed} would change what the saved checkpoints mean;"
        " use the saved values or a new --workdir"
      )
    resumed_from = saved_steps[-1]

  # ------------------------------------------------------------------------------------ mesh
  mesh = shd.make_mesh(config.mesh)
  shd.check_batch_size(config.batch_size, mesh)
  k = int(config.optim.accum_steps)
  if config.batch_size % (k * mesh.size):
    raise ConfigError(
      f"config.optim.accum_steps={k}: batch_size {config.batch_size} must split into {k}"
      f" microbatches divisible by {mesh.size} devices"
    )
  write_note(
    f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} processes"
  )

  with jax.set_mesh(mesh):
    # ---------------------------------------------------------------------------------- data
    from gmail_jax.data import pipeline

    # ------------------------------------------------------------------ model, LoRA, optimizer
    built = build.build(config, mesh)
    models, frozen, rng = built["models"], built["frozen"], built["rng"]
    state = built["state"]
    write_note(
      f"teacher {build.teacher_source(config)['source']}: {lora_lib.count_params(frozen):,} frozen"
      f" params; trainable {lora_lib.count_params(state['params']):,}"
    )
    tokenizer = build.tokenizer(config, built["text_context"])

    # ------------------------------------------------------- teacher-embedding cache (optional)
    from gmail_jax.training import teacher_cache

    # Before the input pipeline: the rows filled now are real images it need not decode.
    cache = teacher_cache.from_config(
      config,
      models=models,
      frozen=frozen,
      mesh=mesh,
      workdir=workdir,
      model_config=built["model_config"],
    )
    data_iter = pipeline.make_train_iterator(
      config,
      tokenizer=tokenizer,
      workdir=workdir,
      resize=towers.resize_mode(config),
      cached_real=None if cache is None else cache[0].filled_mask(),
    )

    # -------------------------------------------------------------------------------- restore
    ckpt = checkpointing.Checkpointer(
      workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints
    )
    teacher_id = build.teacher_identity(config, frozen)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = ckpt.restore_latest(abstract, data_iter=data_iter)  # 1. auto-resume
    if restored is not None:
      state, meta = restored
      checkpointing.check_teacher(meta.get("teacher", {}), teacher_id, ckpt.directory)
      write_note(f"resumed from step {meta['step']}")
      resumed_from = int(meta["step"])
    # Written once every check passed: a refused resume leaves config.json as it was.
    metrics_lib.write_config(config, workdir, resumed_from=resumed_from, changes=allowed)
    first_step = int(jax.device_get(state["step"]))

    # ----------------------------------------------------------------------------- update step
    # The restored state has the built shardings.
    step_fn = build.make_step(config, built, mesh, objective)

    # ---------------------------------------------------------------------------------- evals
    evaluators = []
    if config.evals:
      from gmail_jax.evaluators import common as evals_common

      # Pre-cropped eval images follow the tower's resize (evaluators that take ``resize``).
      evaluators = evals_common.from_config(config.evals, resize=towers.resize_mode(config))

    # The student's own path: generated images (GMAIL), or every image (image-text alignment).
    view = "student_all" if objective.student_input == "real" else "student"

    def run_evals(step: int, force: bool = False) -> dict[str, float]:
      due = [ev for ev in evaluators if force or ev.should_run(step)]
      if not due:
        return {}
      teacher = nnx.merge(models.teacher, frozen)
      student = build.merged_student(models, state["params"], frozen, rng, config=config)
      spec = towers.get(config.model.name).preprocess  # the tower's normalisation and resize
      enc = encoders.views(
        teacher,
        student,
        (view,),  # only the view this objective trains
        tokenizer=tokenizer,
        mesh=mesh,
        mean=spec.mean,
        std=spec.std,
        resize=spec.resize,
      )[view]
      out = {}
      for ev in due:
        out.update(ev.run(enc, step))
      return out

    # ----------------------------------------------------------------------------- train loop
    writer = metrics_lib.MetricWriter(
      workdir, total_steps=config.total_steps, first_step=first_step, config=config
    )
    last: dict[str, float] = {}
    if not preemption.distributed():  # several processes: JAX's preemption service has SIGTERM
      preemption.install()
    try:
      for step in range(first_step + 1, config.total_steps + 1):
        local = next(data_iter)
        if cache is not None:  # teacher_emb from the cache; the step skips the teacher
          local = teacher_cache.attach(local, *cache)
        batch = pipeline.global_batch(local, mesh)
        state, m = step_fn(state, frozen, rng, batch)
        faults.kill_point("step", step)
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
          writer.sync()  # a bucket's rows up to this step are stored before the checkpoint is
          ckpt.save(step, state, data_iter=data_iter, teacher=teacher_id)
          faults.kill_point("async_save", step)
          faults.kill_point("checkpoint", step, before=ckpt.wait)
        ev = run_evals(step)
        if ev:
          last.update(writer.write(step, ev))
          writer.sync()  # rows of a step that may already be checkpointed
        if preemption.sync_point(step):  # every process agrees on this step: save and stop
          if not ckpt_now:
            writer.sync()
            ckpt.save(step, state, data_iter=data_iter, teacher=teacher_id)
          ckpt.wait()
          raise preemption.Preempted(
            f"preempted: checkpoint of step {step} saved in {ckpt.directory}; rerun the same"
            " command to resume from it"
          )
    finally:
      if cache is not None:
        cache[0].close()
      ckpt.close()
      writer.close()
      close = getattr(data_iter, "close", None)
      if close is not None:
        close()

  return last
