#!/usr/bin/env bash
# AceMath evaluation as a job array: task i runs launch/evaluate.py (megatron backend) on the i-th of BENCHMARKS
# (default: gsm8k math minerva_math gaokao2023en olympiadbench college_math mmlu_stem aime24 amc23); the task that
# completes the set writes summary.md. Greedy pass@1 by default; NUM_SAMPLES/TEMPERATURE/TOP_P for sampled candidates.
#   CKPT=checkpoints/qwen2.5-math-7b-math_sft sbatch slurm/eval.sh      # SIZE picks TP (and CKPT's default)
#   BENCHMARKS="gsm8k math500" slurm/submit.sh eval                      # submit.sh sizes --array to BENCHMARKS
#   BENCHMARKS="math:4 gsm8k" NUM_SAMPLES=8 TEMPERATURE=0.7 slurm/submit.sh eval   # math over 4 tasks: 5 in all
# A requeued or resubmitted task skips benchmarks already written with the same settings and resumes a half-done
# one after its last finished chunk. No --signal: only finished chunks are kept, so SIGUSR1 would only kill it.
#SBATCH --job-name=acemath-eval
#SBATCH --array=0-8
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=08:00:00
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
acemath_eval_job
