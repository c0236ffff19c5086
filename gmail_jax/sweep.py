r"""``python -m gmail_jax.sweep --config=configs/tpc_cma.py --alphas=0,0.2,1 --workdir=DIR``.

One TPC-CMA run per α_target and seed, then held-out gaps, task metrics, their R² and a figure:
DIR/sweep.json, sweep.md, sweep_r2.png (gmail_jax/experiments/sweep.py says what each holds).
Errors from bad input end the run with one line (``GMAIL_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

from absl import app, flags

from gmail_jax import cli
from gmail_jax.errors import ConfigError
from gmail_jax.experiments import sweep

_CONFIG = flags.DEFINE_string("config", None, "Config file path[:arg] with loss.mode='tpc_cma'.")
_ALPHAS = flags.DEFINE_string("alphas", "0,0.05,0.2,0.5,1.0", "Comma list of alpha_target values.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one sub-workdir per seed, α).")
_SEEDS = flags.DEFINE_string("seeds", "", "Comma list of config.seed values ('' = the config's).")
_ARG = flags.DEFINE_string("arg", "", "Extra config arg, e.g. 'mode=smoke,pairs=gen_real'.")
_MAX_PER_CLASS = flags.DEFINE_integer("max_per_class", 100, "Held-out images per class measured.")
_DECAP_STEPS = flags.DEFINE_integer(
  "decap_steps", sweep.DECAP["steps"], "DeCap decoder training steps (image_text; 0 = no DeCap)."
)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.one_line_errors():
    alphas = [float(a) for a in _ALPHAS.value.split(",") if a.strip()]
    if not alphas:
      raise ConfigError("--alphas: empty")
    seeds = [int(x) for x in _SEEDS.value.split(",") if x.strip()] or None
    table = sweep.run_sweep(
      _CONFIG.value,
      alphas,
      _WORKDIR.value,
      extra_arg=_ARG.value,
      max_per_class=_MAX_PER_CLASS.value,
      seeds=seeds,
      decap_steps=_DECAP_STEPS.value,
    )
  print(sweep.markdown(table))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
