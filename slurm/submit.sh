#!/usr/bin/env bash
# Submit slurm/train.sbatch sized from environment variables, as one job or a chain of jobs.
#
#   NODES=4 GPUS_PER_NODE=8 CONFIG=configs/llama-8b-zero3.json slurm/submit.sh
#   CHAIN=6 TIME=04:00:00 CONFIG=... slurm/submit.sh        # six 4-hour jobs, one after the other
#   GPUS_PER_NODE=0 TASKS_PER_NODE=2 slurm/submit.sh --wait  # CPU nodes; arguments go to sbatch
#
#   NODES           nodes per job                                          [2]
#   GPUS_PER_NODE   GPUs per node, one task each; 0 on CPU nodes           [8]
#   TASKS_PER_NODE  ranks per node                                         [GPUS_PER_NODE, or 1 without GPUs]
#   CPUS_PER_TASK   CPU cores per rank                                     [train.sbatch's]
#   TIME            time limit per job                                     [train.sbatch's]
#   CHAIN           jobs to submit                                         [1]
#   NAME            job name: the chain's identity                         [ds_fp4-<config file name>]
# CONFIG, SET, LAUNCHER, ... reach the job through sbatch's environment (see train.sbatch).
#
# Chaining: every job is submitted with --dependency=singleton under one name, so Slurm runs at most one of
# them at a time, each resuming from the latest checkpoint; running submit.sh again extends the chain. Give
# concurrent runs different NAMEs. The job that finishes the run cancels the chain's pending jobs. Chains
# are for clusters that do not allow requeueing, or to queue the links early (they accrue priority while
# pending); otherwise one job that requeues itself at each time limit does the same.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
export REPO=${REPO:-$(dirname "$here")}
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
default_tasks=$GPUS_PER_NODE
[ "$GPUS_PER_NODE" -gt 0 ] || default_tasks=1
TASKS_PER_NODE=${TASKS_PER_NODE:-$default_tasks}
CHAIN=${CHAIN:-1}
config=${CONFIG:-configs/llama-1b-zero2.json}
NAME=${NAME:-ds_fp4-$(basename "$config" .json)}
export CHAIN_NAME=$NAME

opts=(--nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE"
      --job-name="$NAME" --dependency=singleton)
[ -n "${CPUS_PER_TASK:-}" ] && opts+=(--cpus-per-task="$CPUS_PER_TASK")
[ -n "${TIME:-}" ] && opts+=(--time="$TIME")

for _ in $(seq "$CHAIN"); do
    sbatch "${opts[@]}" "$@" "$here/train.sbatch"
done
