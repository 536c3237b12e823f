#!/usr/bin/env bash
# AceMath general SFT, stage 2: from stage 1's weights (paper: lr 5e-6, global batch 128, seq 4096).
#   DATA=/data/stage2 INIT_FROM=checkpoints/qwen2.5-math-7b-sft_stage1 sbatch slurm/sft_stage2.sh
#   slurm/submit.sh sft_stage2 [sbatch args]                   # checks every path before it queues anything
#SBATCH --job-name=acemath-sft-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
# USR1 goes to every srun task (not to this shell) 300 s before the time limit: the trainer checkpoints, exits 75,
# and the job requeues itself; --open-mode=append keeps each run's output in the one per-job log.
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
# Slurm runs a spooled copy of this file: find the checkout from REPO_DIR, else from the path that was submitted.
if [[ -z ${REPO_DIR:-} ]]; then
  script=${BASH_SOURCE[0]}
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  fi
  REPO_DIR=$(dirname "$script")/..
fi
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
acemath_train_job sft_stage2 "$@"
