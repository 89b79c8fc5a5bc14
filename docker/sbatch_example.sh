#!/bin/bash
# Example SLURM job: `recpost fit` with DDP over 2 nodes x 4 GPUs (one task per GPU, 8 processes).
# Lightning reads the ranks from SLURM's environment (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID,
# SLURM_NTASKS, SLURM_NODELIST), so srun starts the very same command once per GPU.
#
# Submit from the repository root (configs/ and runs/ are relative to it), optionally with a config
# and extra recpost flags, which apply last:
#   sbatch docker/sbatch_example.sh
#   CONFIG=configs/pretrain/ml100k.yaml sbatch docker/sbatch_example.sh --trainer.max_epochs 50
# To run inside the image (docker/Dockerfile) with Apptainer/Singularity, convert it once and point
# RECPOST_IMAGE at the .sif file:
#   apptainer build recpost.sif docker-daemon://recpost:0.1.0-cuda
#   RECPOST_IMAGE=$PWD/recpost.sif sbatch docker/sbatch_example.sh
# Another GPU count per node: change --ntasks-per-node and --gpus-per-node together; the recpost
# flags below follow them. See docs/cluster.md.

#SBATCH --job-name=recpost-fit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
# (Above, one line each: job name; machines; processes per machine = trainer.devices; GPUs per
# machine, all visible to every task, which picks its own by local rank; data-loading cores per
# process; wall-clock limit; log file in the submit directory, %x = job name, %j = job id.)

set -euo pipefail  # stop at the first failing command, unset variable or failing pipe stage

CONFIG="${CONFIG:-configs/pretrain/sim.yaml}"  # the data + model config to train (compose more with "$@")
NUM_NODES="${SLURM_NNODES:?run this script through sbatch}"  # trainer.num_nodes = --nodes
DEVICES="${SLURM_NTASKS_PER_NODE:?submit with --ntasks-per-node}"  # trainer.devices = tasks per node

# Preprocessed interactions are cached here (recpost's default); keep it on a filesystem that all
# nodes share. Every process builds the cache at start-up if it is missing (safely: the first
# complete copy wins); for a large dataset build it once beforehand with one process, e.g. on the
# login node: python -m recpost fit --config "$CONFIG" --trainer.accelerator cpu --trainer.fast_dev_run 1
export RECPOST_CACHE_DIR="${RECPOST_CACHE_DIR:-$HOME/.cache/recpost/cache}"
mkdir -p "$RECPOST_CACHE_DIR"  # create it before the ranks start
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"  # CPU threads per process: its share of the node
export PYTHONUNBUFFERED=1  # logs of every rank reach the job's output file as they are written
# W&B (when the config has a WandbLogger): export WANDB_API_KEY before sbatch, which passes the
# environment on, to log online; without a key, log offline (upload later with `wandb sync`).
if [ -z "${WANDB_API_KEY:-}" ]; then export WANDB_MODE="${WANDB_MODE:-offline}"; fi

# The command every task runs: recpost from this environment, or from the image when RECPOST_IMAGE is set.
if [ -n "${RECPOST_IMAGE:-}" ]; then
  # --nv: the host's GPU driver; --bind: this checkout (configs/, runs/) and the cache at the same
  # paths; --pwd: run from here; --env: the image's own RECPOST_CACHE_DIR would win over the host's.
  RECPOST=(apptainer exec --nv --bind "$PWD" --bind "$RECPOST_CACHE_DIR" --pwd "$PWD"
           --env "RECPOST_CACHE_DIR=$RECPOST_CACHE_DIR" "$RECPOST_IMAGE" recpost)
else
  RECPOST=(python -m recpost)  # the active Python environment (pip install -e . on the cluster)
fi

echo "recpost fit: $NUM_NODES nodes x $DEVICES GPUs, config $CONFIG, job $SLURM_JOB_ID on $SLURM_JOB_NODELIST"

# One task per GPU on every node (srun takes --nodes/--ntasks-per-node from the job); if a task
# fails, the others are stopped instead of waiting for it. The multinode preset comes after the
# data config and before the flags, so the flags (and "$@") win.
srun --kill-on-bad-exit=1 "${RECPOST[@]}" fit \
  --config "$CONFIG" \
  --config configs/trainer/multinode.yaml \
  --trainer.num_nodes "$NUM_NODES" \
  --trainer.devices "$DEVICES" \
  "$@"
