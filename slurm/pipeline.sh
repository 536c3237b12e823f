#!/usr/bin/env bash
# The AceMath chain as dependent jobs: sft_stage1 -> sft_stage2 -> math_sft -> rm, eval of the math-SFT model, and
# (STAGES with bestofn) its rm@k: sampled candidates from the math-SFT model scored by the chain's RM.
# Each job starts only after the previous one succeeded (--dependency=afterok); a preempted job requeues itself and
# its dependants keep waiting. Everything is checked before the first sbatch, so a missing path queues nothing.
#
#   SIZE=7b DATA_STAGE1=/data/s1 DATA_STAGE2=/data/s2 DATA_MATH_SFT=/data/math DATA_RM=/data/rm \
#     INIT_FROM=checkpoints/qwen2.5-math-7b-base bash slurm/pipeline.sh
#   DRY_RUN=1 ... bash slurm/pipeline.sh            # print the sbatch commands instead of submitting
#
# STAGES (default "sft_stage1 sft_stage2 math_sft rm eval"; no rm for 1.5B) picks a sub-chain, e.g.
# STAGES="math_sft rm eval". Checkpoints go to CKPT_ROOT/<model>-<stage> (default checkpoints/, as in the
# recipes); each stage starts from the previous one's (rm from math_sft's), the first one from INIT_FROM, by
# default the checkpoint of the stage before it in the chain (CKPT_ROOT/<model>-base for sft_stage1).
# OVERRIDES apply to every training stage, OVERRIDES_<STAGE> (e.g. OVERRIDES_MATH_SFT) to one. Eval depends on
# math_sft only: it evaluates that model, so it runs beside the RM training rather than after it.
# bestofn submits two arrays: eval.sh with BESTOFN_SAMPLES (8) candidates per problem at BESTOFN_TEMPERATURE (0.7)
# and BESTOFN_TOP_P (0.95) (after math_sft), then bestofn.sh (after that and rm; without rm in STAGES, RM_CKPT, else
# CKPT_ROOT/<RM_SIZE model>-rm).
# Other knobs (SBATCH_ACCOUNT, CONTAINER_IMAGE, LOG_DIR, ...): docs/slurm.md.
set -euo pipefail
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
acemath_init
SIZE=$(acemath_size "${SIZE:-7b}")
export SIZE
model=$(acemath_model_for_size "$SIZE")
default_stages="sft_stage1 sft_stage2 math_sft rm eval"
if [[ $SIZE == 1p5b ]]; then default_stages="sft_stage1 sft_stage2 math_sft eval"; fi
read -r -a stages <<<"${STAGES:-$default_stages}"
ckpt_root=$(acemath_abspath "${CKPT_ROOT:-$REPO_DIR/checkpoints}")
common_overrides=${OVERRIDES:-}
# Without INIT_FROM a sub-chain starts where the recipes' defaults do: from the checkpoint of the stage before its
# first one (the base model only for sft_stage1), never silently from the base model.
declare -A previous_of=([sft_stage1]=base [sft_stage2]=sft_stage1 [math_sft]=sft_stage2 [rm]=math_sft [eval]=math_sft
  [bestofn]=math_sft)
first_stage=${stages[0]:-sft_stage1}
first_init=$(acemath_abspath "${INIT_FROM:-$ckpt_root/$model-${previous_of[$first_stage]:-base}}")
if [[ ${INIT_FROM:-} == none ]]; then first_init=none; fi  # random weights, as for a single stage
user_init=${INIT_FROM:-} user_ckpt=${CKPT:-}
# The eval stage's sampling is the user's (greedy by default); the bestofn stage sets its own, and its RM.
declare -A user_env=()
for var in NUM_SAMPLES TEMPERATURE TOP_P RM_CKPT RM_SIZE; do
  if [[ -n ${!var+set} ]]; then user_env[$var]=${!var}; fi
done
# These are per stage here: a global RECIPE / DATA / CKPT_DIR would silently apply to every stage.
unset RECIPE DATA CKPT_DIR CKPT

declare -A template_for=([sft_stage1]=sft_stage1 [sft_stage2]=sft_stage2 [math_sft]=math_sft [rm]=rm_$SIZE
  [eval]=eval [bestofn]=bestofn)
declare -A data_var_for=([sft_stage1]=DATA_STAGE1 [sft_stage2]=DATA_STAGE2 [math_sft]=DATA_MATH_SFT [rm]=DATA_RM)

# Where each stage starts from and saves to, in chain order. Eval and bestofn evaluate the last SFT stage's
# checkpoint; on their own (or after rm only), CKPT, else INIT_FROM, else math SFT's default directory.
declare -A init_for ckpt_for upstream_for
init=$first_init
upstream=0
policy_ckpt="" rm_ckpt=""
for stage in "${stages[@]}"; do
  [[ -n ${template_for[$stage]:-} ]] || acemath_die "STAGES: unknown stage $stage (${!template_for[*]})"
  if [[ $stage == rm && $SIZE == 1p5b ]]; then acemath_die "no AceMath reward model for 1.5B: drop rm from STAGES"; fi
  if [[ $stage == eval || $stage == bestofn ]]; then
    upstream_for[$stage]=0
    if [[ -n $policy_ckpt ]]; then
      init_for[$stage]=$policy_ckpt upstream_for[$stage]=1
    elif [[ -n $user_ckpt ]]; then
      init_for[$stage]=$(acemath_abspath "$user_ckpt")
    elif [[ -n $user_init ]]; then
      init_for[$stage]=$first_init
    else
      init_for[$stage]=$ckpt_root/$model-math_sft
    fi
    continue
  fi
  if [[ $stage == rm ]]; then rm_ckpt=$ckpt_root/$model-rm; fi
  init_for[$stage]=$init
  upstream_for[$stage]=$upstream
  ckpt_for[$stage]=$ckpt_root/$model-$stage
  upstream=1
  if [[ $stage != rm ]]; then  # rm is a leaf: nothing starts from it
    init=${ckpt_for[$stage]}
    policy_ckpt=$init
  fi
done

# Exports the environment the stage's template reads (sbatch --export=ALL hands it to the job).
stage_env() {
  local stage=$1
  unset DATA CKPT_DIR INIT_FROM OVERRIDES CKPT NUM_SAMPLES TEMPERATURE TOP_P RM_CKPT RM_SIZE
  local var
  for var in "${!user_env[@]}"; do export "$var=${user_env[$var]}"; done
  if [[ $stage == eval ]]; then
    export CKPT=${init_for[eval]}
    return 0
  fi
  if [[ $stage == bestofn ]]; then
    export CKPT=${init_for[bestofn]} NUM_SAMPLES=${BESTOFN_SAMPLES:-8} TEMPERATURE=${BESTOFN_TEMPERATURE:-0.7}
    export TOP_P=${BESTOFN_TOP_P:-0.95}
    if [[ -n $rm_ckpt ]]; then export RM_CKPT=$rm_ckpt RM_SIZE=$SIZE; fi
    if [[ -z ${RM_CKPT:-} ]]; then
      local rm_model
      rm_model=$(acemath_model_for_size "$(acemath_size "${RM_SIZE:-7b}")")
      export RM_CKPT=$ckpt_root/$rm_model-rm
    fi
    return 0
  fi
  local data_var=${data_var_for[$stage]} extra_var="OVERRIDES_${stage^^}"
  [[ -n ${!data_var:-} ]] || acemath_die "$data_var is not set (the preprocessed prefixes for $stage)"
  export DATA=${!data_var} CKPT_DIR=${ckpt_for[$stage]} INIT_FROM=${init_for[$stage]}
  local stage_extra=${!extra_var:-}
  local overrides=${common_overrides}${common_overrides:+${stage_extra:+ }}${stage_extra}
  if [[ -n $overrides ]]; then export OVERRIDES=$overrides; fi
}

# Pass 1: check everything (one python process for all training stages) before anything is queued.
specs=()
for stage in "${stages[@]}"; do
  stage_env "$stage"
  if [[ $stage == eval ]]; then
    acemath_eval_config
    if [[ ${upstream_for[eval]} == 1 ]]; then acemath_check_eval upstream; else acemath_check_eval now; fi
    eval_array="0-$((${#ACEMATH_EVAL_TASKS[@]} - 1))"
  elif [[ $stage == bestofn ]]; then
    ((NUM_SAMPLES > 1)) || acemath_die "BESTOFN_SAMPLES=$NUM_SAMPLES: best-of-n needs more than one candidate"
    acemath_bestofn_config
    acemath_check_eval "$( ((upstream_for[bestofn])) && echo upstream || echo now)"
    # The candidates come from this pipeline's sampled eval array; the RM from its rm stage, or already exists.
    acemath_check_bestofn "$([[ -n $rm_ckpt ]] && echo upstream || echo now)" upstream
    sampled_array="0-$((${#ACEMATH_EVAL_TASKS[@]} - 1))" bestofn_array="0-$((${#ACEMATH_BENCH[@]} - 1))"
  else
    acemath_training_spec "${template_for[$stage]}" "${upstream_for[$stage]}"
    specs+=("${ACEMATH_SPEC[@]}")
  fi
done
if ((${#specs[@]})); then acemath_preflight "${specs[@]}"; fi

# Pass 2: submit in chain order; each job waits for the one it starts from.
previous="" policy_job="" rm_job=""
for stage in "${stages[@]}"; do
  stage_env "$stage"
  dependency=()
  if [[ $stage == eval ]]; then
    if [[ -n $policy_job ]]; then dependency=(--dependency="afterok:$policy_job"); fi
    id=$(ACEMATH_SIZE=$SIZE acemath_sbatch eval.sh --array="$eval_array" "${dependency[@]}")
  elif [[ $stage == bestofn ]]; then
    if [[ -n $policy_job ]]; then dependency=(--dependency="afterok:$policy_job"); fi
    sampled=$(ACEMATH_SIZE=$SIZE acemath_sbatch eval.sh --array="$sampled_array" "${dependency[@]}")
    printf '%-11s %s\n' "bestofn_gen" "$sampled"
    id=$(acemath_sbatch bestofn.sh --array="$bestofn_array" --dependency="afterok:$sampled${rm_job:+:$rm_job}")
  else
    if [[ -n $previous ]]; then dependency=(--dependency="afterok:$previous"); fi
    acemath_training_spec "${template_for[$stage]}" 0  # sets ACEMATH_SIZE for the node count
    id=$(acemath_sbatch "${template_for[$stage]}.sh" "${dependency[@]}")
    previous=$id
    if [[ $stage != rm ]]; then policy_job=$id; else rm_job=$id; fi
  fi
  printf '%-11s %s\n' "$stage" "$id"
done
