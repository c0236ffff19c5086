#!/usr/bin/env bash
# Generation (captions -> images) on the N GPUs of one host: one process per GPU, each pinned with
# CUDA_VISIBLE_DEVICES and given its shard (--num_shards=N --shard_index=i). A diffusers pipeline
# uses one GPU per process, so this is how a multi-GPU host generates N times faster; use it for
# mode='generate' on a workstation or one node (for several nodes, run one such process per GPU
# under SLURM: gmail_jax.generate reads SLURM_NTASKS / SLURM_PROCID). The processes share WORKDIR
# (chunks are written atomically; the last one to finish writes WORKDIR/manifest.parquet), and a
# rerun of the same command resumes. Logs: WORKDIR/logs/shard-<i>.log.
# Usage: launch/generate_multi_gpu.sh configs/generate/coco_sd21.py /path/to/workdir [--config.k=v ...]
#   GPUS=0,1,2,3 launch/generate_multi_gpu.sh ...     # a subset (default: every GPU nvidia-smi lists)
set -euo pipefail
CONFIG=${1:?config, e.g. configs/generate/coco_sd21.py}
WORKDIR=${2:?workdir}
shift 2
if [[ -z "${GPUS:-}" ]]; then
  GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi
IFS=, read -r -a DEVICES <<< "$GPUS"
N=${#DEVICES[@]}
cd "$(dirname "$0")/.."
mkdir -p "$WORKDIR/logs"
# Each process has one GPU and few CPU-side ops: keep torch's CPU pools from oversubscribing.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
pids=()
# Preemption: SIGTERM to this script goes to every shard, which finishes and journals its batch
# and exits 0; rerun the same command to resume.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
for i in "${!DEVICES[@]}"; do
  CUDA_VISIBLE_DEVICES=${DEVICES[$i]} python -m gmail_jax.generate --config="$CONFIG" \
    --workdir="$WORKDIR" --num_shards="$N" --shard_index="$i" "$@" \
    > "$WORKDIR/logs/shard-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  while true; do  # a trapped signal interrupts `wait`: wait again until the shard has exited
    rc=0
    wait "${pids[$i]}" || rc=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if [[ $rc -ne 0 ]]; then
    echo "shard $i failed (exit $rc): see $WORKDIR/logs/shard-$i.log" >&2
    status=1
  fi
done
if [[ $status -eq 0 ]]; then
  cat "$WORKDIR/summary.json"
fi
exit $status
