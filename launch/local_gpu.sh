#!/usr/bin/env bash
# Single host, all local GPUs (one process drives every GPU).
# Usage: launch/local_gpu.sh configs/coco.py:B/16 /path/to/workdir [--config.key=value ...]
set -euo pipefail
CONFIG=${1:?config, e.g. configs/coco.py:B/16}
WORKDIR=${2:?workdir}
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
cd "$(dirname "$0")/.."
exec python -m gmail_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
