"""``python -m gmail_jax.report --aggregate DIR0 DIR1 DIR2 [--out FILE] [--file F]``.

Prints mean ± std (sample std) of every number of DIR/report.json (or DIR/F, e.g.
``--file eval/captioning.json``) over runs, as a Markdown table; ``--out`` also writes it as JSON
and Markdown (gmail_jax/experiments/report.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from gmail_jax import storage
from gmail_jax.experiments import report


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m gmail_jax.report", description=__doc__.split("\n")[0])
  p.add_argument("--aggregate", nargs="+", required=True, metavar="WORKDIR")
  p.add_argument("--out", default=None, help="write the aggregate JSON here (and .md next to it)")
  p.add_argument("--file", default="report.json", help="the JSON in each WORKDIR to aggregate")
  args = p.parse_args(argv)
  try:
    agg, md = report.aggregate_workdirs(args.aggregate, args.file)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(md)
  if args.out:  # a local path or a bucket URL
    storage.write_text(args.out, json.dumps(agg, indent=2))
    storage.write_text(storage.path(args.out).with_suffix(".md"), md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
