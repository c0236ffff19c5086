"""Export a run (``python -m gmail_jax.export --workdir=DIR --format=hf|peft --out=OUT``).

  --format=hf     OUT is a transformers directory of the run's tower (config.model.name): CLIP
                  (``hf_dir.save_pretrained``) or SigLIP (``save_siglip_pretrained``): the
                  student with LoRA (and a trained projection) merged and the logit head the run
                  trained, or the frozen teacher with its own head with ``--which=teacher``; both
                  towers, the tokenizer the run tokenized with (config.init's vocab.json +
                  merges.txt when it is a directory that has them, else openai-clip's BPE: an
                  OpenAI / OpenCLIP ``.pt`` init needs no tokenizer files; SigLIP: its
                  spiece.model) and the preprocessor config included.
                  ``transformers.CLIPModel`` / ``SiglipModel.from_pretrained(OUT)`` loads it.
  --format=peft   OUT is a PEFT LoRA adapter over the teacher:
                    adapter_config.json         r, lora_alpha (PEFT's alpha / r = our scale),
                                                target_modules (HF module names), modules_to_save
                                                (["visual_projection"] with lora.train_proj),
                                                base_model_name_or_path (see Base below)
                    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in],
                                                ...lora_B.weight [out, r], and a trained projection
                                                as base_model.model.visual_projection.weight
                    base/                       the base as a transformers directory (tokenizer and
                                                preprocessor included), when config.init is not it
                  ``peft.PeftModel.from_pretrained(CLIPModel.from_pretrained(BASE), OUT)`` with
                  BASE = base_model_name_or_path (SigLIP: SiglipModel; module names from
                  ``siglip.hf_key``).

What a user can rely on:

  Embeddings   ``get_image_features`` / ``get_text_features`` of either export equal the student's
               (``api.load_student(WORKDIR)``: ``encode_images`` / ``encode_texts``) to float32
               rounding (tests: <= 1e-4 after L2 normalisation, on COCO photos and captions).
  Base         The adapter's base is the run's teacher with the student's logit head (an adapter
               holds LoRA and whole modules, not the bare ``logit_scale`` / ``logit_bias``).
               base_model_name_or_path is config.init (absolute when a local directory, a hub id
               as given) only when transformers loads exactly that from it: config.init is a
               transformers directory or hub id (not an OpenAI / OpenCLIP checkpoint), the exact
               weights fingerprint (training/fingerprint.py) of that base equals the one of the
               model our importer builds from config.init with no run-specific change (so a
               Long-CLIP-stretched ``model.text_context`` or a trained logit head differs).
               Otherwise it is OUT/base, an absolute path: after moving OUT, pass its base/
               yourself. A randomly initialised teacher always ships as OUT/base.
  Logits       ``model(input_ids=..., pixel_values=...).logits_per_image`` = exp(logit_scale) *
               cosines [+ logit_bias], the student model's own ``__call__``, with the head the run
               trained its image-text logits with (``objectives.trained_logit_head``):
                 TPC-CMA image_text: logit_scale = log 1/τ, τ the learned temperature
                   (loss.learn_temperature; clamped at 1/100 as training clamps it), or
                   loss.temperature (temperature_from='config'), or the teacher's own scale.
                 GMAIL (and TPC-CMA gen_real): the teacher's logit_scale, learned τ or not: that
                   τ aligns generated with real images, not images with texts, and a text term
                   (loss.text_weight) trains at the teacher's scale.
                 loss.text_loss='sigmoid': logit_bias = the learned bias (SigLIP; CLIP has no
                   logit_bias, so a CLIP export drops it, with a warning).
               ``--which=teacher``: the teacher's own head.

``--step`` picks a checkpoint (default: the latest). A non-empty OUT is refused unless ``--force``,
which replaces it; OUT appears atomically (built in a sibling temp directory, then renamed).
WORKDIR and OUT may be bucket URLs (``gs://``): OUT is then built in a local temp directory and
uploaded once complete (a bucket has no rename: ``hf_dir.write_dir``), and a base written beside
the adapter is named by its ``gs://`` URL (download OUT and pass its base/ to load it).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from gmail_jax import run as run_lib
from gmail_jax import storage
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.export import hf_dir, peft_adapter
from gmail_jax.models import convert, openai_ckpt
from gmail_jax.training import build, checkpointing, fingerprint
from gmail_jax.training import sharding as shd

FORMATS = ("hf", "peft")
WHICH = ("student", "teacher")
BASE_DIR = "base"


def export(
  workdir: str | os.PathLike,
  out: str | os.PathLike,
  *,
  format: str,
  step: int | None = None,
  which: str = "student",
  force: bool = False,
) -> str:
  """Writes the run in ``workdir`` to ``out`` as ``format`` (see module doc); returns ``out``."""
  _check_format(format, which)
  workdir = run_lib.resolve_dir(workdir)
  out = run_lib.resolve_dir(out)
  _check_out(out, workdir, force)  # before loading: a refusal must not cost a model build
  return write(load(workdir, step), out, format=format, which=which, force=force)


def _check_format(format: str, which: str) -> None:
  if format not in FORMATS:
    raise ConfigError(f"--format: unknown {format!r}; choose from {list(FORMATS)}")
  if which not in WHICH:
    raise ConfigError(f"--which: unknown {which!r}; choose from {list(WHICH)}")
  if format == "peft" and which == "teacher":
    raise ConfigError("--which=teacher: a PEFT adapter holds the student's LoRA; use --format=hf")


def write(
  run: run_lib.Run,
  out: str | os.PathLike,
  *,
  format: str,
  which: str = "student",
  force: bool = False,
) -> str:
  """Writes a run ``load`` returned to ``out`` as ``format``; returns ``out`` (absolute, or the
  bucket URL). Host work on the run's local copy: with several processes one of them calls it."""
  _check_format(format, which)
  out = run_lib.resolve_dir(out)
  _check_out(out, run.workdir, force)
  logging.info(
    "exporting the %s of %s at step %d as %s to %s", which, run.workdir, run.step, format, out
  )
  if (
    which == "student"
    and "text_bias" in run.state["params"]
    and not hasattr(run.student, "logit_bias")
  ):
    logging.warning(
      "the run learned a sigmoid text bias, but a %s model has no logit_bias: the export's "
      "logits leave it out",
      run.config.model.name,
    )
  if format == "hf":
    model = run.student if which == "student" else run.teacher
    return _save_model(run, model, out, overwrite=force)
  return _save_peft(run, out)


def _save_model(run: run_lib.Run, model: nnx.Module, out: str, *, overwrite: bool = False) -> str:
  """``model`` as a transformers directory of the run's tower (CLIPModel or SiglipModel)."""
  if run.config.model.name == "siglip":
    # The run's SiglipTokenizer read config.init's spiece.model; the export ships that file.
    return hf_dir.save_siglip_pretrained(model, out, spiece=run.tokenizer.path, overwrite=overwrite)
  # The vocabulary the run tokenized with (a checkpoint dir's files or a BPE .gz), whatever
  # config.init is: a .pt or a hub id holds no tokenizer files of its own to look up.
  return hf_dir.save_pretrained(model, out, tokenizer_dir=run.tokenizer.path, overwrite=overwrite)


def hf_key_fn(config: ml_collections.ConfigDict):
  """NNX path -> (HF key, array map) of the run's tower (what its importer uses)."""
  if config.model.name == "siglip":
    from gmail_jax.models import siglip

    return siglip.hf_key
  return convert.hf_key


HEAD = ("logit_scale", "logit_bias")


def base_model(run: run_lib.Run) -> nnx.Module:
  """The model a PEFT adapter of the run loads onto: the run's teacher with the student's logit
  head (an adapter holds LoRA and whole modules, not bare parameters like logit_scale)."""
  graphdef, state = nnx.split(run.teacher)
  # New Variable containers (same buffers): setting the head must not touch run.teacher's.
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  for name in HEAD:
    var = getattr(model, name, None)
    if var is not None:
      var[...] = getattr(run.student, name)[...]
  return model


def transformers_reads(init: str) -> bool:
  """Whether ``transformers.*Model.from_pretrained(init)`` reads the checkpoint our importer read:
  a transformers directory or a hub id (ours reads its transformers files), not an OpenAI /
  OpenCLIP checkpoint file or directory; nor a bucket URL, which transformers does not read)."""
  if storage.is_remote(init) or openai_ckpt.is_openai_source(init):
    return False
  if os.path.isdir(init):
    return os.path.isfile(os.path.join(init, "config.json"))
  return not os.path.exists(init)


def _params_fingerprint(model: nnx.Module) -> str:
  return fingerprint.weights_fingerprint(nnx.state(model, nnx.Param))


def base_model_name(run: run_lib.Run, base: nnx.Module) -> str | None:
  """config.init (absolute when a local directory) when transformers loads exactly ``base`` from
  it, else None (the exporter then writes ``base`` beside the adapter).

  Exactly: the weights fingerprint of ``base`` equals that of the model our importer builds from
  config.init with no run-specific change, so any change the run made to its teacher (Long-CLIP
  stretching, a trained logit head, whatever comes next) ships the base rather than a wrong one.
  """
  init = run.config.init
  if not init:
    logging.info("the teacher was randomly initialised: writing it beside the adapter")
    return None
  if not transformers_reads(init):
    logging.info(
      "transformers cannot load config.init=%s: writing the base beside the adapter", init
    )
    return None
  plain = run.tower.load_pretrained(init, **build.model_kwargs(run.config))
  if _params_fingerprint(plain) != _params_fingerprint(base):
    logging.info(
      "the adapter's base (the run's teacher, its trained logit head) is not config.init=%s "
      "as transformers loads it: writing it beside the adapter",
      init,
    )
    return None
  return os.path.abspath(init) if os.path.isdir(init) else init


def _check_out(out: str, workdir: str, force: bool) -> None:
  if out == workdir or workdir.startswith(out + "/"):
    raise InputError(f"--out={out}: would replace the run it exports; choose another directory")
  path = storage.path(out)
  if not path.exists():
    return
  if not path.is_dir():
    raise InputError(f"--out={out}: exists and is not a directory")
  if any(path.iterdir()) and not force:
    raise InputError(f"--out={out}: exists and is not empty (pass --force to replace it)")


def load(workdir: str | os.PathLike, step: int | None = None) -> run_lib.Run:
  """The run ``write`` exports, on one local device. With several processes every one of them
  calls it (Orbax restores collectively) and gets its own full copy."""
  workdir = run_lib.resolve_dir(workdir)
  if not run_lib.is_run(workdir):
    raise InputError(
      f"--workdir={workdir}: not a training run (no config.json and checkpoints/; "
      "train with gmail_jax.main first)"
    )
  steps = checkpointing.saved_steps(workdir)
  where = checkpointing.checkpoint_dir(workdir)
  if not steps:
    raise InputError(f"{where}: no checkpoint (train first with gmail_jax.main)")
  if step is not None and step not in steps:
    raise InputError(f"--step={step}: no such checkpoint in {where} (saved: {steps})")
  # One local device, as api.load_student: the export must not depend on the training topology.
  mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])
  return run_lib.load_run(workdir, step, mesh=mesh)


def _save_peft(run: run_lib.Run, out: str) -> str:
  from safetensors.numpy import save_file

  params = run.state["params"]
  tensors, targets, to_save = peft_adapter.peft_tensors(params, hf_key_fn(run.config))
  rank = int(run.config.lora.rank)
  for name, t in tensors.items():
    if name.endswith(".lora_A.weight") and t.shape[0] != rank:
      raise ValueError(f"export: {name} has rank {t.shape[0]}, config.lora.rank is {rank}")
  model = base_model(run)
  base = base_model_name(run, model)

  def fill(tmp: str) -> None:
    name = base
    if name is None:  # the base exists only in the run: ship it with the adapter
      _save_model(run, model, os.path.join(tmp, BASE_DIR))
      name = storage.join(out, BASE_DIR)
    cfg = peft_adapter.adapter_config(run.config, name, targets, to_save)
    with open(os.path.join(tmp, peft_adapter.PEFT_CONFIG), "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2)
    # transformers / PEFT refuse safetensors files without format metadata.
    save_file(tensors, os.path.join(tmp, peft_adapter.PEFT_WEIGHTS), metadata={"format": "pt"})

  hf_dir.write_dir(out, fill)
  return out
