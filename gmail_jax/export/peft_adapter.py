"""A PEFT LoRA adapter of a run's trainable parameters (``peft.PeftModel.from_pretrained``).

adapter_config.json         r, lora_alpha (PEFT's alpha / r = our scale), target_modules (HF
                            module names), modules_to_save (["visual_projection"] with
                            lora.train_proj)
adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], ...lora_B.weight
                            [out, r], and a trained projection as
                            base_model.model.visual_projection.weight
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from gmail_jax.errors import ConfigError
from gmail_jax.models import convert

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def peft_tensors(
  params: dict[str, Any], key_fn=convert.hf_key
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(tensors, target_modules, modules_to_save) of a PEFT adapter for the trainable ``params``.

  Module names come from ``key_fn`` (the tower's ``hf_key``) of each adapted Dense's kernel, so
  they follow the same NNX -> HF mapping as the full export. PEFT names a ``modules_to_save`` copy
  by the original parameter key (it strips ``modules_to_save.default`` when saving and restores it
  on load).
  """
  tensors: dict[str, np.ndarray] = {}
  targets: list[str] = []
  for path, var in nnx.to_flat_state(params["lora"]):
    *module, name = (str(p) for p in path)
    key, _ = key_fn((*module, "kernel"))
    target = key.removesuffix(".weight")
    if ".head.attention." in key:
      # SigLIP's MAP head is torch's MultiheadAttention (q/k/v stacked in in_proj): no Linears.
      raise ConfigError(f"--format=peft: {target} is not a module PEFT can adapt; use --format=hf")
    if target not in targets:
      targets.append(target)
    value = np.asarray(jax.device_get(var[...]), np.float32)
    # Ours: x @ A @ B with A [in, r], B [r, out]; torch Linear weights are [out, in].
    kind = {"lora_a": "lora_A", "lora_b": "lora_B"}[name]
    tensors[f"{PEFT_PREFIX}{target}.{kind}.weight"] = value.T.copy(order="C")
  to_save: list[str] = []
  if "proj" in params:
    for path, var in nnx.to_flat_state(params["proj"]):
      key, fn = key_fn(path)
      value = np.asarray(jax.device_get(var[...]), np.float32)
      tensors[PEFT_PREFIX + key] = convert.to_hf_layout(fn, value).copy(order="C")
      module = key.rsplit(".", 1)[0]
      if module not in to_save:
        to_save.append(module)
  return tensors, targets, to_save


def adapter_config(
  config: ml_collections.ConfigDict,
  base: str | None,
  targets: list[str],
  modules_to_save: list[str],
) -> dict[str, Any]:
  """``adapter_config.json`` (peft.LoraConfig); keys it omits take PEFT's defaults."""
  return {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": base,
    "r": int(config.lora.rank),
    # PEFT scales by lora_alpha / r (no rslora): the same alpha gives our scale alpha / rank.
    "lora_alpha": float(config.lora.alpha),
    "lora_dropout": float(config.lora.dropout),
    "target_modules": targets,
    "modules_to_save": modules_to_save or None,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "inference_mode": True,
  }
