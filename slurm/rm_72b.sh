#!/usr/bin/env bash
# AceMath-72B-RM: scalar head on the math-SFT model, listwise Bradley-Terry over 6 responses per problem
# (paper: lr 2e-6, 256 problems per step, 2 epochs).
#   DATA=/data/rm INIT_FROM=checkpoints/qwen2.5-math-72b-math_sft sbatch slurm/rm_72b.sh
#   slurm/submit.sh rm_72b [sbatch args]                       # checks every path before it queues anything
#SBATCH --job-name=acemath-rm-72b
# From the planner (headers are static; keep in step with ACEMATH_NODES_72B in common.sh); the RM's step of ~32
# packed bins of 24,576 tokens fits the same 256 GPUs (DP 8 x PP 4 in the recipe's layout, or the planner's):
#   python launch/plan.py --model qwen2.5-72b --gpus 256 --seq-length 4096 --global-batch 256 --format nodes
#SBATCH --nodes=32
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
SIZE=72b  # this template is the 72B reward model (RECIPE still overrides)
acemath_train_job rm "$@"
