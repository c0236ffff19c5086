#!/usr/bin/env bash
# One host, all its GPUs, one process (JAX drives every local GPU from a single process).
# Use it for a workstation or a single 8-GPU node; for several nodes use slurm_multinode.sbatch.
# Usage: launch/local_gpu.sh configs/coco.py:B/16 /path/to/workdir [--config.key=value ...]
#   CUDA_VISIBLE_DEVICES=0,1 launch/local_gpu.sh ...    # a subset of the GPUs
set -euo pipefail
CONFIG=${1:?config, e.g. configs/coco.py:B/16}
WORKDIR=${2:?workdir}
shift 2
# JAX preallocates this fraction of each GPU's memory (the default 0.75 wastes a quarter).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Overlap the data-parallel all-reduce with the backward pass.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
cd "$(dirname "$0")/.."
# --platform=gpu: a CPU-only jaxlib stops here in one line instead of training on the CPU.
exec python -m gmail_jax.main --platform=gpu --config="$CONFIG" --workdir="$WORKDIR" "$@"
