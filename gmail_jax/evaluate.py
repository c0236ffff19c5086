r"""``python -m gmail_jax.evaluate --workdir=DIR [--config=configs/NAME.py] [--step=N]``.

Runs every evaluator of ``config.evals`` on the run's teacher / student / student_all encoders and
writes DIR/eval/metrics.json and plots (gmail_jax/experiments/evaluation.py). ``--config``
defaults to DIR/config.json (written by training); ``--step`` picks a checkpoint. DIR may be a
bucket URL (``gs://bucket/run``). Errors from bad input, and a DIR that cannot be written, end the
run with one line before anything is built (``GMAIL_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from gmail_jax import cli, storage
from gmail_jax import run as run_lib
from gmail_jax.experiments import evaluation
from gmail_jax.training.encoders import VIEWS

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (default: WORKDIR/config.json).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/, metrics.jsonl).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_ENCODERS = flags.DEFINE_string("encoders", ",".join(VIEWS), "Comma list of " + ", ".join(VIEWS))
_PLOTS = flags.DEFINE_bool("plots", True, "Write the t-SNE and training-curve PNGs.")
_TSNE_POINTS = flags.DEFINE_integer("tsne_points", 500, "Pairs in the t-SNE plot (subsampled).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.one_line_errors():
    config = _CONFIG.value if _CONFIG.value is not None else run_lib.read_config(_WORKDIR.value)
    storage.check_writable(_WORKDIR.value)  # it writes DIR/eval/: refused before any build
    which = tuple(w.strip() for w in _ENCODERS.value.split(",") if w.strip())
    report = evaluation.evaluate(
      config,
      _WORKDIR.value,
      step=_STEP.value,
      which=which,
      plots=_PLOTS.value,
      tsne_points=_TSNE_POINTS.value,
    )
  if jax.process_index() == 0:
    for name, m in report["encoders"].items():
      print(f"[{name}] " + " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())))
    print(f"wrote {storage.join(report['workdir'], 'eval', 'metrics.json')}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
