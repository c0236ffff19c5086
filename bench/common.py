"""Shared benchmark helpers: timing, thread setup, analytic FLOPs of the GMAIL step, JSON output.

Nothing here imports jax or torch at module level, so a benchmark can set ``XLA_FLAGS`` /
thread counts before either framework initialises.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def cpu_count() -> int:
  """Cores this process may run on (respects taskset / cgroup affinity, unlike os.cpu_count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - non-Linux
    return os.cpu_count() or 1


def load_average() -> float:
  """1-minute load average (context for noisy numbers on a shared machine)."""
  try:
    return os.getloadavg()[0]
  except OSError:  # pragma: no cover
    return float("nan")


@dataclasses.dataclass
class Timing:
  """Per-iteration wall times (seconds) of ``repeats`` timed windows of ``iters`` calls each."""

  per_iter: list[float]

  @property
  def best(self) -> float:
    return min(self.per_iter)

  @property
  def median(self) -> float:
    return statistics.median(self.per_iter)

  def as_dict(self, prefix: str = "") -> dict[str, float]:
    return {
      f"{prefix}best_s": self.best,
      f"{prefix}median_s": self.median,
      f"{prefix}spread": (max(self.per_iter) - self.best) / self.best,
    }


def time_windows(
  run: Callable[[], Any], sync: Callable[[Any], Any], *, iters: int, repeats: int
) -> Timing:
  """Time ``repeats`` windows of ``iters`` back-to-back calls; one sync at the end of each window.

  Syncing only at window ends measures pipelined steady-state throughput (what a training loop with
  no host syncs sees). ``run`` must already be warmed up (compiled).
  """
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    r = None
    for _ in range(iters):
      r = run()
    sync(r)
    out.append((time.perf_counter() - t0) / iters)
  return Timing(out)


def best_call_seconds(
  run: Callable[[], Any], sync: Callable[[Any], Any], *, window_s: float, repeats: int
) -> float:
  """Best seconds per call of ``run`` over ``repeats`` windows of about ``window_s`` each.

  Warms ``run`` up, times one call to size the windows (enough calls that dispatch is negligible),
  then returns ``time_windows(...).best``: on a shared machine the least-disturbed window.
  """
  sync(run())
  t0 = time.perf_counter()
  sync(run())
  iters = max(1, int(window_s / max(time.perf_counter() - t0, 1e-6)))
  return time_windows(run, sync, iters=iters, repeats=repeats).best


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs (multiply-add = 2 FLOPs) of the CLIP ViT image tower and the GMAIL step.
# ---------------------------------------------------------------------------------------------


def vit_forward_flops(
  *,
  image_size: int,
  patch_size: int,
  width: int,
  layers: int,
  mlp_dim: int,
  embed_dim: int,
  lora_rank: int = 0,
  pooled_last_block: bool = False,
) -> dict[str, float]:
  """Forward FLOPs of one image through a CLIP ViT tower (matmuls only; LN/softmax/GELU ignored).

  P = (S/p)², N = P + 1 (class token), W width, M mlp_dim, L layers, E embed_dim
  patch = 2·P·(3p²)·W
  block(n) = 4·N·W² (k,v) + 4·n·W² (q,out) + 4·n·N·W (QKᵀ and A·V) + 4·n·W·M (fc1, fc2)
             for n query rows: n = N in every block, except n = 1 in the last one when only the
             class token is read out (``pooled_last_block``: what gmail_jax computes; HF computes
             all N rows)
  lora(n) = 2·(4·N·W·r) + 2·(4·n·W·r)   (x·A then ·B on the k,v and the q,out adapters)
  proj  = 2·W·E (class token only)
  F     = patch + Σ_blocks (block + lora) + proj
  """
  p = (image_size // patch_size) ** 2
  n = p + 1

  def block(rows):
    return (
      4.0 * n * width * width
      + 4.0 * rows * width * width
      + 4.0 * rows * n * width
      + 4.0 * rows * width * mlp_dim
    )

  def lora(rows):
    return 2 * 4.0 * n * width * lora_rank + 2 * 4.0 * rows * width * lora_rank

  last_rows = 1 if pooled_last_block else n
  patch = 2.0 * p * (3 * patch_size * patch_size) * width
  blocks = (layers - 1) * block(n) + block(last_rows)
  loras = (layers - 1) * lora(n) + lora(last_rows)
  proj = 2.0 * width * embed_dim
  return {
    "patch": patch,
    "blocks": blocks,
    "lora": loras,
    "proj": proj,
    "forward": patch + blocks + loras + proj,
    "forward_no_lora": patch + blocks + proj,
  }


def gmail_step_flops_per_pair(**vit: Any) -> dict[str, float]:
  """FLOPs per (generated, real) pair of one GMAIL training step with a frozen base + LoRA.

      teacher forward (real image, no LoRA)        F₀
      student forward (generated image, LoRA)      F
      student backward, activations only           F − patch      (frozen W: dX = dY·Wᵀ costs one
                                                                    forward matmul; no dW; pixels
                                                                    need no gradient, so the patch
                                                                    embedding has no backward)
      LoRA weight grads                            lora            (dA, dB: same cost as forward)
      step = F₀ + 2F − patch + lora                ≈ 3·F for ViT-B/32 (loss/optimizer negligible)

  The loss (B² logits) and AdamW on the ~0.1% LoRA params are ignored (<1e-4 of the total).
  """
  f = vit_forward_flops(**vit)
  teacher = f["forward_no_lora"]
  student_fwd = f["forward"]
  student_bwd = f["forward"] - f["patch"] + f["lora"]
  return {
    "teacher_forward": teacher,
    "student_forward": student_fwd,
    "student_backward": student_bwd,
    "total": teacher + student_fwd + student_bwd,
    "total_cached_teacher": student_fwd + student_bwd,
  }


def versions() -> dict[str, Any]:
  """Python and the versions of the frameworks this process imported, with the devices they ran on.

  Only modules already in ``sys.modules`` are reported ("where used"). JAX's devices are listed
  only when a backend is already up, so reporting never starts one (which, on a GPU, would
  preallocate most of its memory in a process that ran torch only).
  """
  import platform

  out: dict[str, Any] = {"python": platform.python_version()}
  mods = sys.modules
  if "jax" in mods:
    import jax
    import jaxlib

    out["jax"] = jax.__version__
    out["jaxlib"] = getattr(jaxlib, "__version__", None) or jaxlib.version.__version__
    if "flax" in mods:
      out["flax"] = mods["flax"].__version__
    try:
      from jax._src import xla_bridge

      started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API moved: ask anyway
      started = True
    if started:
      devs = jax.devices()
      out["jax_backend"] = jax.default_backend()
      out["device_kind"] = devs[0].device_kind
      out["device_count"] = len(devs)
  if "torch" in mods:
    import torch

    out["torch"] = torch.__version__
    if torch.cuda.is_available():
      out["torch_cuda"] = torch.version.cuda
      out["torch_device"] = torch.cuda.get_device_name()
  for name in ("transformers", "diffusers", "peft"):
    if name in mods:
      out[name] = getattr(mods[name], "__version__", None)
  return out


def jax_peak_bytes() -> int | None:
  """Peak bytes the JAX allocator held on any local device since the process started (GPU/TPU),
  or None where the backend keeps no allocator statistics (CPU)."""
  import jax

  peaks = [s.get("peak_bytes_in_use") for s in (d.memory_stats() for d in jax.local_devices()) if s]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def emit(result: dict[str, Any]) -> None:
  """Print the result as one JSON object on the last line of stdout."""
  sys.stdout.flush()
  print(json.dumps(result, sort_keys=False, default=float), flush=True)
