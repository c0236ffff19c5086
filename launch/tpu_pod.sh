#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; `--distributed` lets JAX detect the topology
# (process count, coordinator) from the TPU metadata. Use it for v4/v5e/v5p slices of any size;
# the workdir must be a bucket (gs://...) every worker can write.
# Usage: launch/tpu_pod.sh TPU_NAME ZONE configs/cc12m.py:L/14 gs://BUCKET/workdir [overrides ...]
# The repo must be at ~/gmail_jax on every worker (e.g. `gcloud ... scp --worker=all`), with
# `pip install -e .[tpu]` run there once.
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}
shift 4
EXTRA=$(printf ' %q' "$@")
# TPU_STDERR_LOG_LEVEL keeps libtpu quiet; the logs of worker 0 are the ones to read.
# Preemption (spot / preemptible VMs): the OS sends every process SIGTERM before the VM stops;
# `exec` makes python the command itself, so it gets the signal, saves a checkpoint at a step all
# workers agree on and exits 0. Rerun this script (on the recreated slice) to resume.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="\
  cd ~/gmail_jax && TPU_STDERR_LOG_LEVEL=2 exec python -m gmail_jax.main --distributed --platform=tpu \
  --config=$CONFIG --workdir=$WORKDIR$EXTRA"
