r"""TPC-CMA controllable alignment on the quickstart's digits (gmail_jax/objectives/tpc_cma.py).

Commands:
  python -m gmail_jax.main --config=configs/tpc_cma.py:alpha_target=0.5 --workdir=/tmp/tpc_a0.5
  python -m gmail_jax.evaluate --workdir=/tmp/tpc_a0.5           (config read from config.json)
  python -m gmail_jax.sweep --config=configs/tpc_cma.py --alphas=0,0.05,0.2,0.5,1.0 \
      --seeds=0,1,2 --workdir=/tmp/tpc_sweep          (one run per α and seed, table + R² + plot)
  python -m gmail_jax.sweep --config=configs/tpc_cma.py --arg=dataset=cifake,root=DIR ...
Arg (after ``:`` or the sweep's ``--arg``, comma-separated ``key=value``): alpha_target (float,
  default 0.5), pairs (image_text | gen_real), mode (full | smoke, the quickstart's size), kind
  (gram | residual), dataset (digits | cifake: configs/cifake.py's data and teacher; root = the
  cifake-sd14-test-sample dir), form (additive | convex), nce (infonce | reweighted),
  temperature_from (auto | config | teacher; auto = the teacher's logit scale for image_text,
  0.07 for gen_real), learn_temperature (bool, starts from that value), teacher_steps (teacher
  pretraining steps; 0 = the dataset config's).

Setup: the quickstart's tiny CLIP teacher, pretrained with the CLIP loss on real digit scans
(configs/quickstart.py, stage 1), then TPC-CMA fine-tuning of the student's image tower (LoRA on
q/k/v/out + the vision projection) with L = L_InfoNCE + α_eff(t)·(L_C + λ_D·L_D):
  pairs=image_text (default, the paper's setting): x = student(real scan), y = frozen text tower
    (class caption); L_InfoNCE = symmetric CLIP loss at the teacher's learned logit scale,
    same-class captions masked;
  pairs=gen_real: x = student(rendered digit), y = teacher(real scan of the same class);
    L_InfoNCE = GMAIL Eq. 1.
Curriculum: Anchor 15% (α = 0) → linear Ramp 45% → Stabilize at alpha_target; gradient-aware cap
ρ = 1.
Hardware: 2 CPU cores, a few minutes per run (the teacher is pretrained once per workdir; the sweep
shares one teacher between all α).
Measured (3 seeds, results/tpc_cma/<sweep>/sweep.md; README "Evaluation and TPC-CMA"): digits
image_text, α 0 -> 1: centroid gap 0.414 -> 0.021, raw gap -42.1 ± 2.6 % vs α = 0, zero-shot
0.968 -> 0.966 (saturated), DeCap direct CIDEr 2.62 -> 4.16 (teacher 3.79); the centroid gap, not
the distribution gap, predicts DeCap (R² 0.777 vs 0.078 on the per-α means). gen_real: centroid
gap -59 %, nothing else moves. 10-20 min per sweep on 2 shared cores.
"""

from __future__ import annotations

import ml_collections

from configs import cifake, common, quickstart
from gmail_jax.objectives import tpc_cma

DATASETS = ("digits", "cifake")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(
    arg,
    alpha_target=0.5,
    pairs="image_text",
    mode="full",
    kind="gram",
    dataset="digits",
    root="",
    form="additive",
    nce="infonce",
    temperature_from="auto",
    learn_temperature=False,
    teacher_steps=0,
  )
  if a.pairs not in tpc_cma.PAIRS:
    raise ValueError(f"configs/tpc_cma.py:pairs={a.pairs}: expected one of {tpc_cma.PAIRS}")
  if a.dataset not in DATASETS:
    raise ValueError(f"configs/tpc_cma.py:dataset={a.dataset}: expected one of {DATASETS}")
  if a.dataset == "cifake":
    if not a.root:
      raise ValueError("configs/tpc_cma.py:dataset=cifake needs root=<cifake-sd14-test-sample dir>")
    c = cifake.get_config(a.mode)  # its teacher: pretrained on the CIFAR-10 photos not held out
    c.data.root = a.root
  else:
    c = quickstart.get_config(f"rendered,{a.mode}")  # the rendered digits: the measured sweeps
    c.log_every_steps = 5
  if a.teacher_steps:  # a longer-trained (stronger) teacher than the dataset's default
    c.teacher_pretrain.steps = a.teacher_steps
  c.loss.mode = "tpc_cma"
  c.loss.temperature_from = a.temperature_from
  c.loss.learn_temperature = a.learn_temperature
  c.lora.train_proj = True  # the projection moves the embedding geometry directly
  c.cma.alpha_target = a.alpha_target
  c.cma.pairs = a.pairs
  c.cma.kind = a.kind
  c.cma.form = a.form
  c.cma.nce = a.nce
  # The quickstart's GMAIL report (probe transfer, Synthetic baseline) does not apply here; the
  # sweep (gmail_jax/experiments/sweep.py) measures held-out gaps and task metrics instead.
  c.stages = ("splits", "teacher", "align")
  return c
