# shellcheck shell=bash
# What the sbatch templates (job side) and submit.sh / pipeline.sh (submit side) share. Sourced, never run.
# Every knob is an environment variable; the table is in docs/slurm.md.

# The eval array's benchmarks, in the paper's order (Table 3, then Table 4); BENCHMARKS overrides.
ACEMATH_BENCHMARKS="gsm8k math minerva_math gaokao2023en olympiadbench college_math mmlu_stem aime24 amc23"
# 72B jobs: the node count of
#   python launch/plan.py --model qwen2.5-72b --gpus 256 --seq-length 4096 --global-batch 256 --format nodes
# (#SBATCH headers are static, so rm_72b.sh repeats it; submit.sh / pipeline.sh pass it to the SFT templates).
ACEMATH_NODES_72B=32
# acemath_mcore.training.trainer.EXIT_PREEMPTED: checkpoint written after SIGUSR1/SIGTERM, "run me again".
ACEMATH_EXIT_PREEMPTED=75

acemath_log() { echo "acemath-slurm: $*" >&2; }
# Exit status 2 for every configuration error, never 75: a job that cannot start must not requeue itself.
acemath_die() { echo "acemath-slurm: error: $*" >&2; exit 2; }

acemath_init() {
  [[ -n ${REPO_DIR:-} ]] || acemath_die "REPO_DIR is not set (the acemath-mcore checkout)"
  [[ -f $REPO_DIR/launch/train_sft.py && -f $REPO_DIR/slurm/common.sh ]] ||
    acemath_die "REPO_DIR=$REPO_DIR is not an acemath-mcore checkout (no launch/train_sft.py)"
  REPO_DIR=$(cd "$REPO_DIR" && pwd)
  export REPO_DIR
  PYTHON=${PYTHON:-python}
  # Relative DATA / CKPT_DIR / INIT_FROM / CKPT paths mean: relative to where you submitted from.
  ACEMATH_BASE_DIR=${SLURM_SUBMIT_DIR:-$PWD}
  export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"  # launch/*.py import the checkout, installed or not
}

acemath_abspath() {
  case $1 in
    /*) realpath -m -- "$1" ;;
    *) realpath -m -- "$ACEMATH_BASE_DIR/$1" ;;
  esac
}

acemath_size() {  # 1.5b|1p5b|7b|72b -> 1p5b|7b|72b (the recipe-name spelling)
  case ${1,,} in
    1.5b | 1p5b) echo 1p5b ;;
    7b | 72b) echo "${1,,}" ;;
    *) acemath_die "SIZE=$1: expected 1.5b, 7b or 72b" ;;
  esac
}

acemath_model_for_size() { # the preset name the recipes use
  case $1 in 1p5b) echo qwen2.5-math-1.5b ;; *) echo "qwen2.5-math-$1" ;; esac
}

# acemath_stage_config STAGE [key=value ...]: STAGE is sft_stage1 | sft_stage2 | math_sft | rm; SIZE picks the
# backbone. Sets ACEMATH_KIND (sft|rm), ACEMATH_SIZE, ACEMATH_RECIPE, ACEMATH_ENTRY and ACEMATH_ARGS, the overrides
# in the order they apply: DATA, CKPT_DIR, INIT_FROM, OVERRIDES, then the arguments (later ones win).
acemath_stage_config() {
  local stage=$1
  shift
  ACEMATH_SIZE=$(acemath_size "${SIZE:-7b}")
  # A named recipe decides the size (node count, planner, defaults); SIZE may only agree with it.
  local recipe_size=""
  case ${RECIPE:-} in *_72b_*) recipe_size=72b ;; *_7b_*) recipe_size=7b ;; *_1p5b_*) recipe_size=1p5b ;; esac
  if [[ -n $recipe_size && $recipe_size != "$ACEMATH_SIZE" ]]; then
    [[ -z ${SIZE:-} ]] || acemath_die "RECIPE=$RECIPE is a $recipe_size recipe, but SIZE=$SIZE"
    ACEMATH_SIZE=$recipe_size
  fi
  case $stage in
    sft_stage1 | sft_stage2 | math_sft) ACEMATH_KIND=sft ACEMATH_ENTRY=launch/train_sft.py ;;
    rm) ACEMATH_KIND=rm ACEMATH_ENTRY=launch/train_rm.py ;;
    *) acemath_die "unknown stage $stage" ;;
  esac
  if [[ $stage == rm && $ACEMATH_SIZE == 1p5b && -z ${RECIPE:-} ]]; then
    acemath_die "AceMath has reward models for 7B and 72B only (SIZE=$SIZE); set RECIPE to train another"
  fi
  ACEMATH_RECIPE=${RECIPE:-qwen25_math_${ACEMATH_SIZE}_${stage}}
  ACEMATH_ARGS=()
  if [[ -n ${DATA:-} ]]; then
    local -a prefixes
    local prefix joined=""
    IFS=, read -r -a prefixes <<<"$DATA"
    for prefix in "${prefixes[@]}"; do
      prefix=${prefix#"${prefix%%[![:space:]]*}"}  # trim the spaces around a comma, keep those inside a path
      prefix=${prefix%"${prefix##*[![:space:]]}"}
      if [[ -n $prefix ]]; then joined+="${joined:+,}$(acemath_abspath "$prefix")"; fi
    done
    ACEMATH_ARGS+=("data.prefixes=[$joined]")
  fi
  if [[ -n ${CKPT_DIR:-} ]]; then ACEMATH_ARGS+=("checkpoint.save_dir=$(acemath_abspath "$CKPT_DIR")"); fi
  if [[ ${INIT_FROM:-} == none ]]; then
    ACEMATH_ARGS+=("checkpoint.init_from=none")
  elif [[ -n ${INIT_FROM:-} ]]; then
    ACEMATH_ARGS+=("checkpoint.init_from=$(acemath_abspath "$INIT_FROM")")
  fi
  local -a extra=()
  read -r -a extra <<<"${OVERRIDES:-}"
  ACEMATH_ARGS+=("${extra[@]}" "$@")
}

# Container (pyxis/enroot) options for srun when CONTAINER_IMAGE is set. The checkout is mounted at the same path
# unless CONTAINER_MOUNTS already mounts it; data and checkpoint paths must be mounted at the same paths too.
acemath_container_args() {
  ACEMATH_CONTAINER=()
  [[ -n ${CONTAINER_IMAGE:-} ]] || return 0
  local mounts=${CONTAINER_MOUNTS:-}
  if [[ ",$mounts" != *",$REPO_DIR:"* ]]; then mounts="$REPO_DIR:$REPO_DIR${mounts:+,$mounts}"; fi
  # One named container per job: the preflight step and the training step share one image import.
  ACEMATH_CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
    --container-workdir="$REPO_DIR" --container-name="acemath-${SLURM_JOB_ID:-0}")
}

# "$PYTHON" ARGS on this host; inside a job with a container, as a one-task step in the container (the batch
# host may have no python environment of its own).
acemath_python() {
  if [[ ${ACEMATH_IN_JOB:-0} == 1 && -n ${CONTAINER_IMAGE:-} ]]; then
    srun --nodes=1 --ntasks=1 "${ACEMATH_CONTAINER[@]}" "$PYTHON" "$@"
  else
    "$PYTHON" "$@"
  fi
}

# acemath_preflight [--planner-args] [--stage KIND:RECIPE[:upstream] key=value ...]...: slurm/preflight.py resolves
# each recipe with its overrides as the launcher will and checks the paths it reads; exit 2 with its messages on
# failure. Where that python cannot import acemath_mcore (e.g. a login node of a container-only cluster) only the
# explicit data.prefixes / init_from paths are checked here; the job checks everything again when it starts.
# PREFLIGHT=0 skips the submit-side check (e.g. paths that exist only inside the container), never the job's.
acemath_preflight() {
  if [[ ${PREFLIGHT:-1} == 0 && ${ACEMATH_IN_JOB:-0} != 1 ]]; then
    acemath_log "PREFLIGHT=0: paths are checked when the job starts"
    return 0
  fi
  local rc=0
  # From the checkout, like the job: the recipes' default paths (checkpoints/..., data/...) are relative to it.
  (cd "$REPO_DIR" && acemath_python "$REPO_DIR/slurm/preflight.py" "$@") || rc=$?
  case $rc in
    0) return 0 ;;
    2) acemath_die "preflight failed (see above); nothing was started" ;;
    3 | 126 | 127)
      acemath_log "$PYTHON cannot run acemath_mcore here: checking the explicit DATA / INIT_FROM paths only"
      acemath_check_spec_paths "$@" ;;
    *) acemath_die "slurm/preflight.py failed with status $rc" ;;
  esac
}

acemath_check_spec_paths() {  # the preflight arguments, without python: the explicit paths of each --stage group
  local arg data="" init="" upstream=0 prefix suffix
  local -a prefixes
  for arg in "$@" --stage; do  # the trailing --stage checks the last group
    case $arg in
      --stage)
        IFS=, read -r -a prefixes <<<"${data//[\[\]]/}"
        for prefix in "${prefixes[@]}"; do
          for suffix in .bin .idx; do
            [[ -f $prefix$suffix ]] || acemath_die "DATA: $prefix$suffix does not exist (from launch/preprocess.py)"
          done
        done
        if [[ -n $init && $init != none && $upstream == 0 && ! -e $init ]]; then
          acemath_die "INIT_FROM: checkpoint.init_from=$init does not exist"
        fi
        data="" init="" upstream=0 ;;
      data.prefixes=*) data=${arg#data.prefixes=} ;;
      checkpoint.init_from=*) init=${arg#checkpoint.init_from=} ;;
      *:upstream) upstream=1 ;;
    esac
  done
}

acemath_banner() {
  acemath_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}," \
    "${SLURM_JOB_NUM_NODES:-1} node(s) [${SLURM_JOB_NODELIST:-}], ${SLURM_NTASKS:-1} task(s), $(date -Is)"
}

# One task per GPU: every task runs the same python command and reads its rank, world size and local rank from
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID inside the srun step (acemath_mcore.runtime.distributed.read_launch_env;
# a plain python in the batch script runs as one process). Tasks see all
# of the node's GPUs and pick theirs by local rank, so no --gpus-per-task binding.
acemath_rendezvous() {
  local -a hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  export MASTER_ADDR=${hosts[0]}
  # Derived from the job id: two jobs sharing a node do not collide, and a requeued job gets the same port. Kept
  # below Linux's ephemeral ports (32768-60999), which another socket may hold (the same as read_launch_env).
  export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
  # Torch's thread pools default to every core of the node; one task gets only its share.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # One hardware work queue per GPU, the environment megatron-core is written for: its tensor-parallel
  # (sequence-parallel) layers and its grad-reduce bucketing count on kernels starting in launch order to overlap
  # communication with compute, and it warns on every rank without it (needed before Blackwell; not measured here).
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
}

# --kill-on-bad-exit: a rank that dies (error, segfault, OOM kill) ends the step (SIGTERM, then SIGKILL after
# KillWait) instead of leaving its peers blocked in an NCCL collective until the distributed timeout (30 min).
# Ranks that exit 75 after a preemption checkpoint ignore the SIGTERM this sends the others (trainer.py), so srun
# still returns 75.
acemath_srun() {
  local -a args=(--kill-on-bad-exit=1)
  # Slurm 22.05-23.02 srun does not inherit the job's --cpus-per-task.
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
  args+=("${ACEMATH_CONTAINER[@]}")
  acemath_log "srun ${args[*]} $(printf '%q ' "$@")"
  srun "${args[@]}" "$@"
}

# Layout overrides from launch/plan.py for this job's GPU count: with USE_PLANNER=1, and by default (USE_PLANNER=auto)
# for the 72B recipes. They go before the user's overrides, so OVERRIDES still win.
acemath_use_planner() {
  case ${USE_PLANNER:-auto} in
    1) [[ -f $REPO_DIR/launch/plan.py ]] || acemath_die "USE_PLANNER=1 but $REPO_DIR/launch/plan.py does not exist" ;;
    0) return 1 ;;
    auto) [[ $ACEMATH_SIZE == 72b && -z ${RECIPE:-} && -f $REPO_DIR/launch/plan.py ]] || return 1 ;;
    *) acemath_die "USE_PLANNER=$USE_PLANNER: expected 1, 0 or auto" ;;
  esac
}

acemath_planner() {  # SHAPE: "--model M --task T --seq-length S --global-batch G --micro-batch B" (preflight.py)
  local -a shape planned per_node=()
  read -r -a shape <<<"$1"
  ((${#shape[@]})) || acemath_die "cannot resolve the recipe for the planner"
  if [[ ${SLURM_NTASKS_PER_NODE:-} =~ ^[0-9]+$ ]]; then per_node=(--gpus-per-node "$SLURM_NTASKS_PER_NODE"); fi
  local layout
  layout=$(acemath_python "$REPO_DIR/launch/plan.py" "${shape[@]}" --gpus "${SLURM_NTASKS:?}" "${per_node[@]}" \
    --format overrides) || acemath_die "launch/plan.py ${shape[*]} --gpus $SLURM_NTASKS failed"
  read -r -a planned <<<"$layout"
  [[ ${#planned[@]} -gt 0 && ${planned[*]} == *=* ]] || acemath_die "launch/plan.py printed no overrides: '$layout'"
  acemath_log "planner layout for $SLURM_NTASKS GPUs: ${planned[*]}"
  ACEMATH_ARGS=("${planned[@]}" "${ACEMATH_ARGS[@]}")
}

acemath_require_job() {
  [[ -n ${SLURM_JOB_ID:-} ]] ||
    acemath_die "not inside a Slurm job: submit with 'sbatch slurm/$1.sh' or 'slurm/submit.sh $1'"
  ACEMATH_IN_JOB=1
}

# NSYS=1: Nsight Systems around every training task, recording only the steps the trainer brackets with
# cudaProfilerStart/Stop (profile.tool=nsys; profile.start_step, profile.num_steps and profile.ranks choose them):
# one report per profiled rank in NSYS_DIR. Fills ACEMATH_PROFILER, the command srun runs the python under.
acemath_profiler() {
  ACEMATH_PROFILER=()
  case ${NSYS:-0} in
    0) return 0 ;;
    1) ;;
    *) acemath_die "NSYS=$NSYS: expected 1 or 0" ;;
  esac
  local dir
  dir=$(acemath_abspath "${NSYS_DIR:-$REPO_DIR/logs/nsys}")
  mkdir -p "$dir" || acemath_die "cannot create NSYS_DIR $dir"
  ACEMATH_PROFILER=(nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop "--trace=cuda,nvtx,osrt"
    --force-overwrite=true "--output=$dir/${SLURM_JOB_ID:-job}-rank%q{SLURM_PROCID}")
  ACEMATH_ARGS=(profile.tool=nsys "${ACEMATH_ARGS[@]}")
}

# acemath_job_start NAME CONFIG [args...]: how every job begins: inside Slurm, in the checkout, configured by
# CONFIG (a function, given the args), with its container and a banner.
acemath_job_start() {
  acemath_require_job "$1"
  acemath_init
  cd "$REPO_DIR" || acemath_die "cannot cd to $REPO_DIR"
  "${@:2}"
  acemath_container_args
  acemath_banner
}

# The body of sft_stage1.sh, sft_stage2.sh, math_sft.sh, rm_7b.sh and rm_72b.sh.
acemath_train_job() {  # STAGE [key=value ...]
  local stage=$1
  acemath_job_start "$stage" acemath_stage_config "$@"
  if acemath_use_planner; then
    local shape
    shape=$(acemath_preflight --planner-args --world-size="${SLURM_NTASKS:-1}" \
      --stage "$ACEMATH_KIND:$ACEMATH_RECIPE" "${ACEMATH_ARGS[@]}")
    acemath_planner "$shape"
  else
    acemath_preflight --world-size="${SLURM_NTASKS:-1}" --stage "$ACEMATH_KIND:$ACEMATH_RECIPE" "${ACEMATH_ARGS[@]}"
  fi
  acemath_rendezvous
  acemath_profiler
  local rc=0
  acemath_srun "${ACEMATH_PROFILER[@]}" "$PYTHON" "$ACEMATH_ENTRY" --recipe "$ACEMATH_RECIPE" "${ACEMATH_ARGS[@]}" || rc=$?
  acemath_after_training "$rc"
}

# SIGUSR1 (--signal=USR1@300 before the time limit, or scancel --signal=USR1) reaches every srun task; the trainer
# checkpoints and all ranks exit 75. Then this job puts itself back in the queue: the next run resumes from
# CKPT_DIR/latest (checkpoint.resume defaults to true). Slurm holds a requeued job for its credential lifetime
# (AuthInfo cred_expire, default 120 s) before it can start again.
acemath_after_training() {
  local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
  if [[ $rc == "$ACEMATH_EXIT_PREEMPTED" ]]; then
    if ((restarts >= ${MAX_RESTARTS:-50})); then
      acemath_log "checkpointed and stopped, but restarted $restarts times already (MAX_RESTARTS): not requeueing"
    elif scontrol requeue "$SLURM_JOB_ID"; then
      acemath_log "checkpointed and stopped (exit $rc): job $SLURM_JOB_ID requeued (restart $((restarts + 1))) to" \
        "resume from the latest checkpoint"
    else
      acemath_log "checkpointed and stopped, but 'scontrol requeue' failed: resubmit; it resumes from latest"
    fi
    exit "$rc"  # never 0: an afterok dependency must not fire on a stopped run
  fi
  acemath_log "training finished with status $rc at $(date -Is)"
  exit "$rc"
}

# Evaluation (eval.sh) --------------------------------------------------------------------------------------

acemath_checkpoint_label() {  # a checkpoint's name in result folders: its dir, or <save dir>-iter_N
  local label
  label=$(basename "$1")
  if [[ $label == iter_* ]]; then label="$(basename "$(dirname "$1")")-$label"; fi
  echo "$label"
}

acemath_bench_list() {  # the benchmark names, comma-separated, as the table-writing tools take them
  local IFS=,
  echo "${ACEMATH_BENCH[*]}"
}

acemath_size_tp() {  # the default tensor-parallel size for generation or scoring at a size
  case $1 in 1p5b) echo 1 ;; 72b) echo 8 ;; *) echo 2 ;; esac
}

# Sets ACEMATH_BENCH (the benchmark names), ACEMATH_EVAL_TASKS (one per array task: "NAME" or "NAME I/N" for part I
# of a benchmark listed as NAME:N), ACEMATH_CKPT, ACEMATH_EVAL_OUT and ACEMATH_EVAL_ARGS (all but --benchmarks).
acemath_eval_config() {
  ACEMATH_SIZE=$(acemath_size "${SIZE:-7b}")
  local benchmarks=${BENCHMARKS:-$ACEMATH_BENCHMARKS}
  local -a entries=()
  read -r -a entries <<<"${benchmarks//,/ }"  # commas or spaces
  ACEMATH_BENCH=() ACEMATH_EVAL_TASKS=()
  local entry name shards shard
  for entry in "${entries[@]}"; do
    name=${entry%%:*} shards=1
    if [[ $entry == *:* ]]; then shards=${entry#*:}; fi
    [[ $shards =~ ^[1-9][0-9]*$ ]] ||
      acemath_die "BENCHMARKS: '$entry': a benchmark, or NAME:N to split it over N array tasks (N >= 1)"
    ACEMATH_BENCH+=("$name")
    if ((shards == 1)); then
      ACEMATH_EVAL_TASKS+=("$name")
    else
      for ((shard = 0; shard < shards; shard++)); do ACEMATH_EVAL_TASKS+=("$name $shard/$shards"); done
    fi
  done
  local model=${MODEL:-$(acemath_model_for_size "$ACEMATH_SIZE")}
  local ckpt=${CKPT:-${CKPT_DIR:-$REPO_DIR/checkpoints/$model-math_sft}}  # math SFT's recipe save_dir
  ACEMATH_CKPT=$(acemath_abspath "$ckpt")
  local samples=${NUM_SAMPLES:-1} temperature=${TEMPERATURE:-0} top_p=${TOP_P:-1.0} max_new=${MAX_NEW_TOKENS:-2048}
  # One folder per checkpoint and sampling settings: the harness regenerates results made with other settings,
  # so a sampled run (rm@8) sharing the greedy run's folder deleted its results. iter_N dirs are named by their
  # save dir too.
  local label
  label=$(acemath_checkpoint_label "$ACEMATH_CKPT")/n${samples}_t${temperature}_p${top_p}_len${max_new}
  ACEMATH_EVAL_OUT=$(acemath_abspath "${EVAL_OUTPUT_DIR:-$REPO_DIR/eval/$label}")
  ACEMATH_EVAL_DATA=$(acemath_abspath "${EVAL_DATA_DIR:-$REPO_DIR/../shared/data/eval}")
  ACEMATH_TOKENIZER=$(acemath_abspath "${TOKENIZER:-$REPO_DIR/../shared/tokenizers/qwen2}")
  local tp_default
  tp_default=$(acemath_size_tp "$ACEMATH_SIZE")
  local -a extra=() model_args=() precision=(--bf16) template_args=()
  # Precision is its own knob: extra arguments (EVAL_ARGS="--top-k 20") must not turn bf16 off as a side effect.
  if [[ ${EVAL_BF16:-1} == 0 ]]; then precision=(); fi
  read -r -a extra <<<"${EVAL_ARGS:-}"
  # The checkpoint records its architecture (model_arch.json); an explicit MODEL is checked against it.
  if [[ -n ${MODEL:-} ]]; then model_args=(--model "$MODEL"); fi
  # So does its training data's chat template (prompt_format.json); TEMPLATE overrides it.
  if [[ -n ${TEMPLATE:-} ]]; then template_args=(--template "$TEMPLATE"); fi
  ACEMATH_EVAL_ARGS=(--backend megatron --checkpoint "$ACEMATH_CKPT" "${model_args[@]}"
    --tokenizer "$ACEMATH_TOKENIZER" "${template_args[@]}" --data-dir "$ACEMATH_EVAL_DATA"
    --output-dir "$ACEMATH_EVAL_OUT" --num-samples "$samples" --temperature "$temperature"
    --top-p "$top_p" --max-new-tokens "$max_new" --tensor-parallel "${TP:-$tp_default}"
    "${precision[@]}" "${extra[@]}")
}

acemath_check_eval() {  # now | upstream (the checkpoint is written by an earlier job)
  [[ -f $REPO_DIR/launch/evaluate.py ]] || acemath_die "$REPO_DIR/launch/evaluate.py does not exist"
  if [[ $1 != upstream && ! -f $ACEMATH_CKPT/latest && ! -f $ACEMATH_CKPT/metadata.json ]]; then
    acemath_die "CKPT: $ACEMATH_CKPT is neither a checkpoint nor a save dir with 'latest' (set CKPT or CKPT_DIR)"
  fi
  [[ -e $ACEMATH_TOKENIZER ]] || acemath_die "TOKENIZER: $ACEMATH_TOKENIZER does not exist"
  local bench
  for bench in "${ACEMATH_BENCH[@]}"; do
    [[ -f $ACEMATH_EVAL_DATA/$bench/test.jsonl ]] ||
      acemath_die "EVAL_DATA_DIR: $ACEMATH_EVAL_DATA/$bench/test.jsonl does not exist (benchmark $bench)"
  done
}

# The body of eval.sh: array task i evaluates the i-th benchmark (or benchmark part); each task then tries the table,
# which only the one that completes the set writes.
acemath_eval_job() {
  acemath_job_start eval acemath_eval_config
  local index=${SLURM_ARRAY_TASK_ID:-0}
  local count=${#ACEMATH_EVAL_TASKS[@]}
  ((index < count)) ||
    acemath_die "array index $index, but BENCHMARKS makes $count array tasks (--array=0-$((count - 1)))"
  local bench shard
  read -r bench shard <<<"${ACEMATH_EVAL_TASKS[index]}"
  local -a shard_args=()
  if [[ -n $shard ]]; then shard_args=(--shard "$shard"); fi
  acemath_check_eval now
  acemath_rendezvous
  acemath_log "benchmark $bench${shard:+ part $shard} -> $ACEMATH_EVAL_OUT"
  local rc=0
  acemath_srun "$PYTHON" launch/evaluate.py "${ACEMATH_EVAL_ARGS[@]}" --benchmarks "$bench" "${shard_args[@]}" ||
    rc=$?
  ((rc == 0)) || acemath_die "launch/evaluate.py failed on $bench${shard:+ part $shard} with status $rc"
  acemath_python launch/evaluate.py --summarize-only --if-complete --benchmarks "$(acemath_bench_list)" \
    --output-dir "$ACEMATH_EVAL_OUT"
}

# Best-of-n (slurm/bestofn.sh): an eval run's sampled candidates scored by a reward model, then rm@k, maj@k, pass@k.
# The eval variables (CKPT, NUM_SAMPLES, TEMPERATURE, ... or EVAL_OUTPUT_DIR) find the candidates, CANDIDATES
# overrides. Sets those of acemath_eval_config and ACEMATH_CANDIDATES, ACEMATH_RM_CKPT, ACEMATH_BON_OUT
# (CANDIDATES/rm-<RM name>, or BESTOFN_OUTPUT_DIR) and ACEMATH_SCORE_ARGS (launch/score.py but --input/--output).
acemath_bestofn_config() {
  acemath_eval_config
  ACEMATH_CANDIDATES=$(acemath_abspath "${CANDIDATES:-$ACEMATH_EVAL_OUT}")
  local rm_size
  rm_size=$(acemath_size "${RM_SIZE:-7b}")
  [[ $rm_size != 1p5b ]] || acemath_die "RM_SIZE=$RM_SIZE: AceMath's reward models are 7b and 72b"
  ACEMATH_RM_CKPT=$(acemath_abspath "${RM_CKPT:-$REPO_DIR/checkpoints/$(acemath_model_for_size "$rm_size")-rm}")
  ACEMATH_BON_OUT=$(acemath_abspath \
    "${BESTOFN_OUTPUT_DIR:-$ACEMATH_CANDIDATES/rm-$(acemath_checkpoint_label "$ACEMATH_RM_CKPT")}")
  # The RM's training data's template and system prompt are recorded in its save dir; these override them.
  local -a precision=(--bf16) format=()
  if [[ ${RM_BF16:-1} == 0 ]]; then precision=(); fi
  if [[ -n ${RM_TEMPLATE:-} ]]; then format+=(--template "$RM_TEMPLATE"); fi
  if [[ -n ${RM_SYSTEM_PROMPT:-} ]]; then format+=(--system-prompt "$RM_SYSTEM_PROMPT"); fi
  ACEMATH_SCORE_ARGS=(--checkpoint "$ACEMATH_RM_CKPT" --tokenizer "$ACEMATH_TOKENIZER" "${format[@]}"
    --tensor-parallel "${RM_TP:-$(acemath_size_tp "$rm_size")}" "${precision[@]}" --no-progress)
}

# acemath_check_bestofn RM [CANDIDATES]: each now | upstream (written by an earlier job; CANDIDATES defaults to RM's)
acemath_check_bestofn() {
  [[ -f $REPO_DIR/launch/score.py ]] || acemath_die "$REPO_DIR/launch/score.py does not exist"
  [[ -e $ACEMATH_TOKENIZER ]] || acemath_die "TOKENIZER: $ACEMATH_TOKENIZER does not exist"
  if [[ $1 != upstream && ! -f $ACEMATH_RM_CKPT/latest && ! -f $ACEMATH_RM_CKPT/metadata.json ]]; then
    acemath_die "RM_CKPT: $ACEMATH_RM_CKPT is neither a checkpoint nor a save dir with 'latest' (set RM_CKPT or RM_SIZE)"
  fi
  [[ ${2:-$1} == upstream ]] && return 0
  local bench
  for bench in "${ACEMATH_BENCH[@]}"; do
    [[ -f $ACEMATH_CANDIDATES/$bench.jsonl ]] || acemath_die "CANDIDATES: $ACEMATH_CANDIDATES/$bench.jsonl does" \
      "not exist (slurm/eval.sh with the same CKPT, NUM_SAMPLES, TEMPERATURE, TOP_P, MAX_NEW_TOKENS writes it)"
  done
}

# The body of bestofn.sh: array task i scores the i-th benchmark's candidates (all tasks of the allocation), then
# computes its metrics; each task then tries the table, which only the one that completes the set writes.
acemath_bestofn_job() {
  acemath_job_start bestofn acemath_bestofn_config
  local index=${SLURM_ARRAY_TASK_ID:-0}
  local count=${#ACEMATH_BENCH[@]}
  ((index < count)) || acemath_die "array index $index, but BENCHMARKS has $count entries (--array=0-$((count - 1)))"
  local bench=${ACEMATH_BENCH[index]}
  acemath_check_bestofn now
  local candidates=$ACEMATH_CANDIDATES/$bench.jsonl scored=$ACEMATH_BON_OUT/$bench.scored.jsonl
  # A requeued task does not score again what a finished one scored with this RM checkpoint (a save dir's
  # 'latest' moving on makes it stale).
  if [[ -f $scored && $scored -nt $candidates && ! ($ACEMATH_RM_CKPT/latest -nt $scored) ]]; then
    acemath_log "$scored is newer than the candidates and the RM checkpoint: not scored again"
  else
    acemath_rendezvous
    acemath_log "scoring $candidates with $ACEMATH_RM_CKPT -> $scored"
    local rc=0
    acemath_srun "$PYTHON" launch/score.py "${ACEMATH_SCORE_ARGS[@]}" --input "$candidates" --output "$scored" ||
      rc=$?
    ((rc == 0)) || acemath_die "launch/score.py failed on $bench with status $rc"
  fi
  # k up to BESTOFN_K, else up to the candidates' own count (CANDIDATES made elsewhere carry no NUM_SAMPLES).
  acemath_python launch/bestofn.py --input "$scored" ${BESTOFN_K:+--k "$BESTOFN_K"} --table \
    --json "$ACEMATH_BON_OUT/$bench.bestofn.json" || acemath_die "launch/bestofn.py failed on $scored"
  acemath_python launch/bestofn.py --summarize "$ACEMATH_BON_OUT" --benchmarks "$(acemath_bench_list)" --if-complete
}

# Submit side -----------------------------------------------------------------------------------------------

# acemath_sbatch SCRIPT [sbatch args...]: sbatch --parsable with logs under LOG_DIR; prints the job id (or, with
# DRY_RUN=1, the command). REPO_DIR is exported, so the job does not have to look for the checkout.
acemath_sbatch() {
  local script=$1
  shift
  local log_dir
  log_dir=$(acemath_abspath "${LOG_DIR:-$REPO_DIR/logs/slurm}")
  local pattern="%x-%j.out"
  if [[ $script == eval.sh || $script == bestofn.sh ]]; then pattern="%x-%A_%a.out"; fi  # one log per array task
  local -a cmd=(sbatch --parsable --export=ALL --output="$log_dir/$pattern")
  if [[ ${ACEMATH_SIZE:-} == 72b && $script != rm_72b.sh && $script != eval.sh && $script != bestofn.sh ]]; then
    cmd+=(--nodes="${NODES:-$ACEMATH_NODES_72B}")
  elif [[ -n ${NODES:-} && $script != eval.sh && $script != bestofn.sh ]]; then  # NODES sizes training jobs
    cmd+=(--nodes="$NODES")
  fi
  cmd+=("$@" "$REPO_DIR/slurm/$script")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    local var assignments=""
    for var in REPO_DIR SIZE RECIPE DATA CKPT_DIR INIT_FROM OVERRIDES CKPT BENCHMARKS NUM_SAMPLES TEMPERATURE TOP_P \
      RM_CKPT CANDIDATES CONTAINER_IMAGE; do
      if [[ -n ${!var:-} ]]; then assignments+="$var=$(printf '%q' "${!var}") "; fi
    done
    echo "${assignments}$(printf '%q ' "${cmd[@]}")" >&2
    echo "DRYRUN_${script%.sh}"
    return 0
  fi
  mkdir -p "$log_dir"
  local id
  id=$("${cmd[@]}") || acemath_die "sbatch failed: ${cmd[*]}"
  echo "${id%%;*}"
}

acemath_upstream_in() {  # sbatch args...: true when they carry a dependency (its job may write INIT_FROM / CKPT)
  local arg
  for arg in "$@"; do
    case $arg in --dependency* | -d*) return 0 ;; esac
  done
  return 1
}

# acemath_training_spec TEMPLATE UPSTREAM: preflight arguments for one training template with the current
# environment (also sets ACEMATH_SIZE etc. for acemath_sbatch).
acemath_training_spec() {
  local template=$1 upstream=$2 stage
  case $template in
    rm_7b) SIZE=7b acemath_stage_config rm ;;
    rm_72b) SIZE=72b acemath_stage_config rm ;;
    sft_stage1 | sft_stage2 | math_sft) acemath_stage_config "$template" ;;
    *) acemath_die "unknown training template $template" ;;
  esac
  stage="$ACEMATH_KIND:$ACEMATH_RECIPE"
  if [[ $upstream == 1 ]]; then stage+=":upstream"; fi
  # shellcheck disable=SC2034  # read by submit.sh and pipeline.sh
  ACEMATH_SPEC=(--stage "$stage" "${ACEMATH_ARGS[@]}")
}
