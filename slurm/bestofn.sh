#!/usr/bin/env bash
# AceMath best-of-n as a job array: task i scores the sampled candidates of the i-th of BENCHMARKS (written by
# slurm/eval.sh) with a reward model (launch/score.py), then computes rm@k, maj@k and pass@k for k = 1, 2, 4, ... n
# (launch/bestofn.py); the task that completes the set writes bestofn.md. The eval variables find the candidates.
#   NUM_SAMPLES=8 TEMPERATURE=0.7 TOP_P=0.95 CKPT=checkpoints/qwen2.5-math-7b-math_sft \
#     RM_SIZE=72b RM_CKPT=checkpoints/qwen2.5-math-72b-rm slurm/submit.sh bestofn --dependency=afterok:<eval job>
#   CANDIDATES=eval/mine/n8_t0.7_p0.95_len2048 RM_CKPT=... sbatch --array=0-8 slurm/bestofn.sh
# A requeued task does not score again a benchmark it scored with the same RM checkpoint. No --signal: scoring
# keeps nothing mid-benchmark, so SIGUSR1 would only kill it.
#SBATCH --job-name=acemath-bestofn
#SBATCH --array=0-8
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
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
acemath_bestofn_job
