r"""``python -m gmail_jax.export --workdir=DIR --format=hf|peft --out=OUT [--step=N] [--which=W]``.

--format=hf: a transformers directory of the run's tower (the student with LoRA merged, or the
teacher with ``--which=teacher``); --format=peft: a PEFT LoRA adapter over the teacher
(gmail_jax/export/exporter.py says what each holds). Errors from bad input end the run with one
line (``GMAIL_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

from absl import app, flags

from gmail_jax import cli
from gmail_jax.export import exporter

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_FORMAT = flags.DEFINE_string("format", None, "hf (transformers directory) or peft (LoRA adapter).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_WHICH = flags.DEFINE_string("which", "student", "student or teacher (teacher: --format=hf only).")
_FORCE = flags.DEFINE_bool("force", False, "Replace a non-empty --out.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.one_line_errors():
    out = exporter.export(
      _WORKDIR.value,
      _OUT.value,
      format=_FORMAT.value,
      step=_STEP.value,
      which=_WHICH.value,
      force=_FORCE.value,
    )
  print(f"wrote {out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "format", "out"])
  app.run(main)
