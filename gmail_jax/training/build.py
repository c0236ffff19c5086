"""Models and train state of a run: teacher, student (teacher + LoRA), optimizer, initial state.

One place builds them, for the trainer, the run loader (evaluate, api, sweep, export) and the
benches, so every consumer sees exactly what training saw:

    built = build.build(config, mesh)      # teacher from config.init (HF dir / hub id) or random
    step  = build.make_step(config, built, mesh)

The teacher and the student are two graphdefs over ONE frozen state (``Models``); the trainable
pytree is LoRA [+ a copy of the vision projection] [+ log 1/tau] (``initial_params``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gmail_jax import objectives, storage
from gmail_jax.errors import ConfigError
from gmail_jax.models import lora as lora_lib
from gmail_jax.models import towers
from gmail_jax.models.tokenizer import Tokenizer
from gmail_jax.training import fingerprint, optim, train_step
from gmail_jax.training import sharding as shd

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}  # None = float32 compute


def tower(config: ml_collections.ConfigDict) -> towers.Tower:
  return towers.get(config.model.name)


def lora_targets(config: ml_collections.ConfigDict) -> list[str]:
  """Path regexes of the adapted layers: the tower's named groups (attn, mlp) or raw regexes."""
  named = tower(config).lora_targets
  return [named.get(t, t) for t in config.lora.targets]


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Compute options of the model (dtype, remat, the XLA:CPU residual loops), fixed at build."""
  return {
    "dtype": DTYPES[config.model.dtype],
    "remat": bool(config.model.remat),
    "residual_loops": bool(config.model.cpu_residual_loops) and towers.default_residual_loops(),
  }


def model_config(config: ml_collections.ConfigDict):
  """The architecture a config trains from scratch (``config.init`` empty): variant + overrides."""
  return tower(config).arch_config(config.model.variant, **config.model.overrides.to_dict())


def init_path(config: ml_collections.ConfigDict) -> str:
  """``config.init`` as the loaders take it: a bucket folder (``gs://``) is read from a local copy
  (``storage.fetch_dir``, copied once and again only when its objects change); a local path or a
  hub id as given."""
  init = config.init
  return os.fspath(storage.fetch_dir(init)) if init and storage.is_remote(init) else init


def teacher_source(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Where the frozen weights come from (informational; the identity is the fingerprint)."""
  if config.init:
    return {"source": f"init:{config.init}"}
  return {"source": f"scratch:{config.model.variant}:seed={config.seed}"}


def teacher_identity(config: ml_collections.ConfigDict, frozen) -> dict[str, Any]:
  """What checkpoints record of their teacher: the source and the exact weights fingerprint."""
  return {**teacher_source(config), "fingerprint": fingerprint.weights_fingerprint(frozen)}


def build_teacher(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, fsdp: bool
) -> nnx.Module:
  """The frozen model, its state placed on ``mesh`` (replicated, or FSDP by the size rule)."""
  kw = model_kwargs(config)
  t = tower(config)
  if config.init:
    model = t.load_pretrained(init_path(config), **kw)
    if config.model.text_context:
      from gmail_jax.models import longclip  # CLIP only: a text positional table to stretch

      model = longclip.stretch_text_context(model, int(config.model.text_context))
    gdef, state = nnx.split(model)
    return nnx.merge(gdef, place(state, shd.param_shardings(state, mesh, fsdp=fsdp)))
  if config.model.text_context:
    raise ConfigError(
      "config.model.text_context: stretches a pretrained config.init; for a random init set "
      "config.model.overrides.text_context_length"
    )
  cfg = model_config(config)

  def make():
    return t.make(cfg, rngs=nnx.Rngs(params=config.seed), **kw)

  # Shapes first, then a jitted init straight into the target shardings.
  gdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = shd.param_shardings(abstract, mesh, fsdp=fsdp)
  state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
  return nnx.merge(gdef, state)


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


def initial_params(config: ml_collections.ConfigDict, lora, frozen) -> dict[str, Any]:
  """The trainable pytree: LoRA [+ a COPY of the vision projection] [+ log 1/tau, from
  loss.temperature or the teacher's logit_scale (loss.temperature_from)] [+ the sigmoid
  text term's bias, from the teacher's logit_bias when it has one (SigLIP), else -10]."""
  params: dict[str, Any] = {"lora": lora}
  if config.lora.train_proj:
    proj, _ = nnx.split_state(frozen, train_step.is_proj, ...)
    params["proj"] = jax.tree.map(jnp.copy, proj)  # own buffer: the state is donated
  if config.loss.learn_temperature:
    if objectives.get(config.loss.mode).temperature_from(config) == "teacher":
      # Starts at the teacher's learned scale (clamped as temperature_of clamps it).
      log_scale = jnp.minimum(frozen["logit_scale"][...], objectives.base.MAX_LOG_SCALE)
    else:
      log_scale = math.log(1.0 / config.loss.temperature)
    params["log_scale"] = jnp.asarray(log_scale, jnp.float32).reshape(())
  if config.loss.text_weight and config.loss.text_loss == "sigmoid":
    bias = frozen["logit_bias"][...] if "logit_bias" in frozen else -10.0
    params["text_bias"] = jnp.asarray(bias, jnp.float32).reshape(())
  return params


def abstract_train_state(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Shapes only (jax.eval_shape): frozen state, LoRA, trainable params and optimizer state."""
  cfg = model_config(config)
  kw = model_kwargs(config)
  teacher = nnx.eval_shape(lambda: tower(config).make(cfg, rngs=nnx.Rngs(0), **kw))
  models, lora, rng, frozen = make_student(config, teacher)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  params = jax.eval_shape(lambda f: initial_params(config, lora, f), frozen)
  state = jax.eval_shape(lambda p: train_step.init_train_state(p, tx), params)
  return {"models": models, "frozen": frozen, "rng": rng, "state": state}


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  """Teacher, student, optimizer and the initial train state, all placed on ``mesh``."""
  fsdp = mesh.shape["fsdp"] > 1
  teacher = build_teacher(config, mesh, fsdp=fsdp)
  if teacher.image_size != config.data.image_size:
    raise ConfigError(
      f"config.data.image_size={config.data.image_size} but the model expects"
      f" {teacher.image_size}x{teacher.image_size} images"
    )
  models, lora, rng, frozen = make_student(config, teacher)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  params = initial_params(config, lora, frozen)
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
    "model_config": teacher.config,
  }


def merged_student(
  models: train_step.Models, params: dict, frozen, rng, *, config: ml_collections.ConfigDict
) -> nnx.Module:
  """A plain model with LoRA (and a trained projection) folded in, and the image-text logit head
  the run trained (``objectives.trained_logit_head``: a learned or configured TPC-CMA image-text
  temperature, a sigmoid text term's bias): the deployable student, whose logits are the ones
  training optimised. A CLIP tower has no ``logit_bias``: a bias trained on one is not kept."""
  states = train_step.student_state(params, frozen, rng)
  # New Variable containers (same buffers): merging in place must not touch the shared state.
  student = nnx.merge(models.student, *(jax.tree.map(lambda x: x, s) for s in states))
  lora_lib.merge_lora(student)
  for name, value in objectives.trained_logit_head(config, params).items():
    var = getattr(student, name, None)
    if var is not None:  # only the student's container changes: the teacher keeps its own head
      old = var[...]
      var[...] = jax.device_put(jnp.asarray(value, old.dtype).reshape(old.shape), old.sharding)
  return student


def make_step(
  config: ml_collections.ConfigDict,
  built: dict[str, Any],
  mesh: jax.sharding.Mesh,
  objective: objectives.Objective | None = None,
):
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
    objective=objective,
  )


def tokenizer(config: ml_collections.ConfigDict, context_length: int) -> Tokenizer:
  """The teacher checkpoint's own vocabulary when ``config.init`` is a directory that has one
  (vocab.json + merges.txt), else the CLIP BPE of the openai-clip package. SigLIP: the
  SentencePiece model (spiece.model) of ``config.init``."""
  init = init_path(config)
  if config.model.name == "siglip":
    from gmail_jax.models.siglip_tokenizer import SPIECE, SiglipTokenizer

    if not (init and os.path.isfile(os.path.join(init, SPIECE))):
      raise ConfigError(f"config.init: SigLIP needs a checkpoint directory with {SPIECE}")
    return SiglipTokenizer(init, context_length=context_length)
  has_vocab = bool(init) and all(
    os.path.isfile(os.path.join(init, f)) for f in ("vocab.json", "merges.txt")
  )
  return Tokenizer(init if has_vocab else None, context_length=context_length)
