"""The "fine-tune on generated as if real" baseline of GMAIL Table 9 ('Synthetic').

A LoRA copy of the teacher with GMAIL's own targets, rank, alpha, steps, batch and learning rate,
trained with the CLIP loss on generated image-caption pairs as if they were real. Used by the
report stage and the caption stage, so both compare GMAIL against the same baseline.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from gmail_jax.models import lora as lora_lib
from gmail_jax.models.tokenizer import Tokenizer
from gmail_jax.training import build, contrastive


def synthetic_finetune(
  config: ml_collections.ConfigDict, teacher: nnx.Module, train: Any
) -> tuple[nnx.Module, int]:
  """Baseline: a LoRA copy of the teacher (GMAIL's targets and budget) trained with the CLIP loss
  on generated image-caption pairs (captions from config.data.caption_template); text tower and
  base weights frozen. Returns (model with LoRA merged, trainable parameter count)."""
  model = nnx.clone(teacher)
  lora_lib.apply_lora(
    model,
    rank=config.lora.rank,
    alpha=config.lora.alpha,
    dropout=config.lora.dropout,
    targets=build.lora_targets(config),
    rngs=nnx.Rngs(params=config.seed + 1, dropout=config.seed + 1),
  )
  n_trainable = lora_lib.count_params(nnx.state(model, nnx.LoRAParam))
  template = config.data.caption_template
  captions = [
    template.format(**{"class": train.classnames[y].replace("_", " ")}) for y in train.labels
  ]
  ids = np.asarray(Tokenizer(context_length=model.config.text.context_length)(captions), np.int32)
  contrastive.contrastive_finetune(
    model,
    np.stack(train.images),
    ids,
    train.labels.astype(np.int32),
    wrt=nnx.LoRAParam,
    steps=config.total_steps,
    batch_size=config.batch_size,
    lr=config.optim.lr,
    weight_decay=config.optim.weight_decay,
    warmup_steps=config.optim.warmup_steps,
    seed=config.seed,
  )
  lora_lib.merge_lora(model)
  return model, n_trainable
