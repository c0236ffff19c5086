"""Export a run (``python -m gmail_jax.export --workdir=DIR --format=hf|peft --out=OUT``).

  --format=hf     OUT is a transformers directory of the run's tower (config.model.name): CLIP
                  (``hf_dir.save_pretrained``) or SigLIP (``save_siglip_pretrained``): the
                  student with LoRA (and a trained vision projection) merged, or the frozen
                  teacher with ``--which=teacher``; both towers, tokenizer and preprocessor config
                  included. ``transformers.CLIPModel`` / ``SiglipModel.from_pretrained(OUT)``
                  loads it.
  --format=peft   OUT is a PEFT LoRA adapter over the teacher:
                    adapter_config.json         r, lora_alpha (PEFT's alpha / r = our scale),
                                                target_modules (HF module names), modules_to_save
                                                (["visual_projection"] with lora.train_proj)
                    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in],
                                                ...lora_B.weight [out, r], and a trained projection
                                                as base_model.model.visual_projection.weight
                    base/                       the teacher as an HF directory, only when it was
                                                randomly initialised (else base_model_name_or_path
                                                is config.init: an HF directory or hub id)
                  ``peft.PeftModel.from_pretrained(CLIPModel.from_pretrained(BASE), OUT)``
                  (SigLIP: SiglipModel; module names from ``siglip.hf_key``).

``--step`` picks a checkpoint (default: the latest). A non-empty OUT is refused unless ``--force``,
which replaces it; OUT appears atomically (built in a sibling temp directory, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_collections
from absl import logging
from flax import nnx

from gmail_jax import run as run_lib
from gmail_jax.errors import ConfigError, InputError
from gmail_jax.export import hf_dir, peft_adapter
from gmail_jax.models import convert
from gmail_jax.training import checkpointing
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
  if format not in FORMATS:
    raise ConfigError(f"--format: unknown {format!r}; choose from {list(FORMATS)}")
  if which not in WHICH:
    raise ConfigError(f"--which: unknown {which!r}; choose from {list(WHICH)}")
  if format == "peft" and which == "teacher":
    raise ConfigError("--which=teacher: a PEFT adapter holds the student's LoRA; use --format=hf")
  workdir = os.path.abspath(os.fspath(workdir))
  out = os.path.abspath(os.fspath(out))
  _check_out(out, workdir, force)  # before loading: a refusal must not cost a model build
  run = _load(workdir, step)
  logging.info(
    "exporting the %s of %s at step %d as %s to %s", which, workdir, run.step, format, out
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
  return hf_dir.save_pretrained(
    model, out, tokenizer_dir=tokenizer_dir(run.config), overwrite=overwrite
  )


def hf_key_fn(config: ml_collections.ConfigDict):
  """NNX path -> (HF key, array map) of the run's tower (what its importer uses)."""
  if config.model.name == "siglip":
    from gmail_jax.models import siglip

    return siglip.hf_key
  return convert.hf_key


def tokenizer_dir(config: ml_collections.ConfigDict) -> str | None:
  """The teacher's source directory when it ships CLIP BPE files, else None (the default BPE)."""
  if not config.init:
    return None
  src = convert.resolve_source(config.init)
  has = all(os.path.isfile(os.path.join(src, f)) for f in ("vocab.json", "merges.txt"))
  return src if has else None


def base_model_name(config: ml_collections.ConfigDict) -> str | None:
  """What PEFT should load as the base: config.init (absolute when a local directory), or None
  for a randomly initialised teacher (the exporter then writes it beside the adapter)."""
  if not config.init:
    return None
  return os.path.abspath(config.init) if os.path.isdir(config.init) else config.init


def _check_out(out: str, workdir: str, force: bool) -> None:
  if out == workdir or workdir.startswith(out + os.sep):
    raise InputError(f"--out={out}: would replace the run it exports; choose another directory")
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise InputError(f"--out={out}: exists and is not a directory")
  if os.listdir(out) and not force:
    raise InputError(f"--out={out}: exists and is not empty (pass --force to replace it)")


def _load(workdir: str, step: int | None) -> run_lib.Run:
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
  base = base_model_name(run.config)
  parent, name = os.path.dirname(out), os.path.basename(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    if base is None:  # a random teacher exists only in the run: ship it with the adapter
      _save_model(run, run.teacher, os.path.join(tmp, BASE_DIR))
      base = os.path.join(out, BASE_DIR)
    cfg = peft_adapter.adapter_config(run.config, base, targets, to_save)
    with open(os.path.join(tmp, peft_adapter.PEFT_CONFIG), "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2)
    # transformers / PEFT refuse safetensors files without format metadata.
    save_file(tensors, os.path.join(tmp, peft_adapter.PEFT_WEIGHTS), metadata={"format": "pt"})
    hf_dir._replace_dir(tmp, out, parent, name)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
