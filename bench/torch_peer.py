"""The PyTorch + PEFT peer of the GMAIL training step (what a user would write without gmail_jax).

    teacher = frozen CLIPVisionModelWithProjection          (forward under torch.no_grad)
    student = peft LoRA(r, alpha=r, q/k/v/out_proj) on the same base weights; adapters only train
    loss    = CE( normalize(student(gen)) @ normalize(teacher(real))ᵀ / τ, arange(B) )   τ = 0.07
    AdamW on the LoRA parameters.

Random weights (no download), pixels NCHW float32. ``compile=True`` wraps the forward+loss in
``torch.compile`` (backward goes through AOTAutograd); the optimizer step stays eager (AdamW over
~0.1% of the weights). The teacher is a deep copy of the base taken before PEFT wraps it, so no
adapter toggling happens inside the compiled graph.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from bench import common


@dataclasses.dataclass(frozen=True)
class PeerConfig:
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  embed_dim: int
  batch: int
  rank: int = 4
  alpha: float = 4.0
  temperature: float = 0.07
  lr: float = 1e-4
  weight_decay: float = 0.01
  dtype: str = "float32"  # 'float32' | 'bfloat16' (torch.autocast on CPU/GPU)
  act: str = "quick_gelu"


def _hf_vision_config(cfg: PeerConfig):
  from transformers import CLIPVisionConfig

  return CLIPVisionConfig(
    hidden_size=cfg.width,
    intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.layers,
    num_attention_heads=cfg.heads,
    image_size=cfg.image_size,
    patch_size=cfg.patch_size,
    projection_dim=cfg.embed_dim,
    hidden_act=cfg.act,
    attn_implementation="sdpa",
  )


def build_peer(
  cfg: PeerConfig,
  *,
  compile: bool = False,
  device: str = "cpu",
  seed: int = 0,
  compile_backend: str = "inductor",
):
  """Returns (step_fn, make_batch) where ``step_fn(gen, real) -> loss tensor`` does one update.

  ``compile_backend``: torch.compile's backend; 'aot_eager' traces the same graphs (dynamo +
  AOTAutograd) without inductor's minutes of code generation, for smoke runs on a CPU.
  """
  import torch
  import torch.nn.functional as F
  from peft import LoraConfig, get_peft_model
  from transformers import CLIPVisionModelWithProjection

  torch.manual_seed(seed)
  base = CLIPVisionModelWithProjection(_hf_vision_config(cfg)).to(device).eval()
  teacher = copy.deepcopy(base).requires_grad_(False)
  student = get_peft_model(
    base,
    LoraConfig(
      r=cfg.rank,
      lora_alpha=cfg.alpha,
      lora_dropout=0.0,
      target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
    ),
  )
  trainable = [p for p in student.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
  autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
  dev_type = torch.device(device).type

  def loss_fn(gen: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
      with torch.no_grad():
        t = teacher(pixel_values=real).image_embeds
      s = student(pixel_values=gen).image_embeds
    s = F.normalize(s.float(), dim=-1)
    t = F.normalize(t.float(), dim=-1)
    logits = s @ t.T / cfg.temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))

  fwd = torch.compile(loss_fn, backend=compile_backend) if compile else loss_fn

  def step(gen: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = fwd(gen, real)
    loss.backward()
    opt.step()
    return loss.detach()

  def make_batch(i: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1000 + i)
    shape = (cfg.batch, 3, cfg.image_size, cfg.image_size)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)

  info = {
    "trainable_params": sum(p.numel() for p in trainable),
    "total_params": sum(p.numel() for p in teacher.parameters()),
  }
  return step, make_batch, info


def bench_peer(
  cfg: PeerConfig,
  *,
  compile: bool,
  threads: int | None = None,
  warmup: int = 3,
  iters: int = 5,
  repeats: int = 3,
  device: str = "cpu",
  compile_backend: str = "inductor",
) -> dict[str, Any]:
  """Pairs/s of the peer step (best window), after ``warmup`` steps (compile happens there).

  On CUDA also ``peak_memory_gib``: the most torch's allocator held (weights, both models'
  activations, AdamW state, batches).
  """
  import time

  import torch

  cuda = device.startswith("cuda")
  torch.set_num_threads(threads or common.cpu_count())
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  step, make_batch, info = build_peer(
    cfg, compile=compile, device=device, compile_backend=compile_backend
  )
  batches = [make_batch(i) for i in range(2)]
  t0 = time.perf_counter()
  for i in range(warmup):
    loss = step(*batches[i % 2])
  loss.item()
  warm_s = time.perf_counter() - t0
  sync = (lambda r: (torch.cuda.synchronize(), r.item())) if cuda else (lambda r: r.item())
  k = [0]

  def run():
    k[0] += 1
    return step(*batches[k[0] % 2])

  t = common.time_windows(run, sync, iters=iters, repeats=repeats)
  return {
    "pairs_per_s": cfg.batch / t.best,
    "compile": compile,
    "compile_backend": compile_backend if compile else None,
    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    "threads": torch.get_num_threads(),
    "warmup_s": warm_s,
    "final_loss": float(loss.item()),
    **t.as_dict("step_"),
    **info,
  }
