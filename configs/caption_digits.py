r"""GMAIL Table 1's direction on the quickstart's digits: a captioner trained on *generated* images,
tested on *real* scans, through the frozen teacher, the GMAIL student and the "as if real" baseline.

Command (the rendered quickstart's stages, then 'caption'; a ``configs/quickstart.py:rendered``
WORKDIR is reused: its finished stages are skipped):
  python -m gmail_jax.main --config=configs/caption_digits.py --workdir=/tmp/gmail_quickstart
  (``:smoke`` = the quickstart's smoke run and a short captioner, for tests.)
Captions: the five templates of gmail_jax/data/digits.py per class ("a scan of a handwritten
seven."...); each generated training image is paired with all five, and each held-out real scan
has all five of its class as references. ClipCap's MLP mapper (prefix 10) and a 2-layer GPT-2 from
scratch over CLIP's BPE (no pretrained GPT-2 offline), single projection, the same settings and
seed for every encoder:
  teacher     f_r on generated (train) and real (test) images — no alignment
  student     GMAIL: f_g on generated, f_r on real
  as_if_real  the same LoRA budget fine-tuned on generated images as if real (Table 9 'Synthetic')
Writes WORKDIR/eval/captioning.json ({encoder: metrics}) and WORKDIR/eval/captions.jsonl.
Measured (seeds 0, 1, 2 on the quickstart's runs, mean ± std, ClipCap's own defaults; 217-288 s
per seed for the whole command on 2 shared cores):
  encoder      CIDEr          BLEU-4         class_named (caption names the scan's digit, only it)
  teacher      3.143 ± 0.330  0.931 ± 0.013  0.699 ± 0.052
  student      3.683 ± 0.241  0.985 ± 0.006  0.952 ± 0.022
  as_if_real   3.086 ± 0.157  0.936 ± 0.010  0.748 ± 0.037
(``python -m gmail_jax.report --aggregate DIR0 DIR1 DIR2 --file eval/captioning.json``).
"""

from __future__ import annotations

import ml_collections

from configs import quickstart
from gmail_jax.data import digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = quickstart.get_config(",".join(["rendered", *([arg] if arg else [])]))  # its measured runs
  smoke = c.total_steps < 100
  c.stages = ("splits", "teacher", "align", "caption")
  cc = c.caption
  cc.method = "clipcap"
  cc.views = ("teacher", "student", "as_if_real")
  cc.templates = tuple(t.replace("{name}", "{}") for t in digits.CAPTION_TEMPLATES)
  cc.train = ml_collections.ConfigDict({"kind": "classes", "root": ""})  # splits' train/generated
  cc.test = ml_collections.ConfigDict({"kind": "classes", "root": ""})  # splits' test/real
  if smoke:
    cc.test.per_class = 5
  cc.batch_size = 256
  cc.captioner = ml_collections.ConfigDict(
    {
      "lm_layers": 2,
      "lm_heads": 4,
      "lm_width": 64,
      "dual_projection": False,
      "lr": 1e-3,
      "warmup_steps": 20,
      "steps": 60 if smoke else 400,
      "batch_size": 64,
      "max_len": 16,
    }
  )
  return c
