#!/usr/bin/env bash
# TPU pod slice: run the same command on every worker; JAX auto-detects the topology.
# Usage: launch/tpu_pod.sh TPU_NAME ZONE configs/cc12m.py:L/14 gs://BUCKET/workdir [overrides ...]
# The repo must be at ~/gmail_jax on every worker (e.g. via `gcloud ... --worker=all scp`).
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}
shift 4
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="\
  cd ~/gmail_jax && python -m gmail_jax.main --distributed \
  --config=$CONFIG --workdir=$WORKDIR$EXTRA"
