#!/usr/bin/env bash
# Submit one stage after checking, here and now, every path it will read: a missing DATA prefix, INIT_FROM or CKPT
# is an error naming the variable, and nothing is queued. Same environment knobs as the templates
# (docs/slurm.md); extra arguments go to sbatch; prints the job id. Logs: LOG_DIR (default logs/slurm)/%x-%j.out.
#   DATA=/data/stage1 INIT_FROM=checkpoints/qwen2.5-math-7b-base slurm/submit.sh sft_stage1 --time=12:00:00
#   SIZE=72b DATA=/data/rm slurm/submit.sh rm_72b --dependency=afterok:1234
#   NUM_SAMPLES=8 TEMPERATURE=0.7 TOP_P=0.95 RM_CKPT=checkpoints/qwen2.5-math-72b-rm slurm/submit.sh bestofn
# With --dependency, INIT_FROM (or eval's CKPT, or bestofn's candidates and RM_CKPT) may be written by that job, so
# it need not exist yet.
set -euo pipefail
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
usage="usage: slurm/submit.sh STAGE [sbatch args...]; STAGE: sft_stage1 sft_stage2 math_sft rm_7b rm_72b eval bestofn"
[[ $# -ge 1 ]] || acemath_die "$usage"
stage=$1
shift
acemath_init
upstream=0
if acemath_upstream_in "$@"; then upstream=1; fi
case $stage in
  sft_stage1 | sft_stage2 | math_sft | rm_7b | rm_72b)
    acemath_training_spec "$stage" "$upstream"
    acemath_preflight "${ACEMATH_SPEC[@]}"
    acemath_sbatch "$stage.sh" "$@"
    ;;
  eval)
    acemath_eval_config
    if [[ $upstream == 1 ]]; then acemath_check_eval upstream; else acemath_check_eval now; fi
    acemath_sbatch eval.sh --array="0-$((${#ACEMATH_EVAL_TASKS[@]} - 1))" "$@"
    ;;
  bestofn)
    acemath_bestofn_config
    if [[ $upstream == 1 ]]; then acemath_check_bestofn upstream; else acemath_check_bestofn now; fi
    acemath_sbatch bestofn.sh --array="0-$((${#ACEMATH_BENCH[@]} - 1))" "$@"
    ;;
  *) acemath_die "$usage" ;;
esac
