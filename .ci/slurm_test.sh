#!/usr/bin/env bash
# The slurm/ templates on a real single-node Slurm (Debian's packages) with the tiny recipes on CPU, 2 tasks each:
#   1. sbatch slurm/sft_stage1.sh (DP=2, 2 loader workers per rank, a checkpoint every 2 steps) is sent SIGTERM
#      mid-run, as a scheduler's preemption sends it to every process of the step: it checkpoints, exits 75,
#      requeues itself and finishes from that checkpoint; the loss falls over the whole run;
#   2. slurm/submit.sh rm_7b (--dependency=afterok on 1, INIT_FROM = 1's checkpoints, USE_PLANNER=1 and TP=2 on top)
#      waits through the requeue, then trains the RM from the SFT weights, saving every 4 steps in the background;
#      the loss falls;
#   3. a missing path: submit.sh refuses before sbatch; a job submitted anyway fails at start with status 2;
#   4. pipeline.sh DRY_RUN=1 prints the chained sbatch commands;
#   5. slurm/submit.sh eval: a 3-task array (gsm8k; math split in 2 parts; 4 problems x 2 samples each) on the SFT
#      checkpoint, the parts merged, one table; then slurm/submit.sh bestofn (afterok on 2 and the eval array):
#      a 2-task array scores those candidates with the RM, rm@k / maj@k / pass@k and one table;
#   6. a running job sent USR2 logs every rank's Python stacks and goes on; then a crashed rank: rank 1 is
#      SIGKILLed while rank 0 is stopped (as if blocked in a collective); the job must end FAILED within seconds
#      and not requeue itself (without srun --kill-on-bad-exit it would hang).
# Needs root (installs Slurm and runs its daemons); everything else lives in a temp dir. The cluster is up ~2 s after
# the packages are; the jobs take 2-4 min on 2 cores. Daemons are stopped by PID on exit; job logs are printed on
# failure (KEEP=1 keeps the temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
T0=$SECONDS
SFT_STEPS=40  # the SFT job is preempted after step >= 3 and must still finish all of them
RM_STEPS=12
say() { printf '[slurm-ci %3ds] %s\n' $((SECONDS - T0)) "$*"; }
fail() { say "FAIL: $*"; exit 1; }

[[ $(id -u) == 0 ]] || fail "needs root: it installs Slurm and runs slurmctld/slurmd/munged"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
  ! command -v munged >/dev/null; then
  say "installing Slurm from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

WORK=$(mktemp -d /tmp/acemath-slurm-ci.XXXXXX)
chmod 755 "$WORK"  # munged wants its socket directory reachable by everyone
mkdir -p "$WORK"/{munge,state,spool,log,jobs,data}
DAEMON_PIDS=()
JOBS=()
cleanup() {
  local status=$?
  set +e
  if ((${#JOBS[@]})); then
    scancel "${JOBS[@]}" 2>/dev/null
    for _ in $(seq 80); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5; done  # KillWait=10, then reaped
  fi
  if ((status != 0)); then
    for log in "$WORK"/log/*.err "$WORK"/jobs/*.out "$WORK"/jobs/logs/*.out; do
      [[ -f $log ]] && { echo "===== $log"; tail -n 60 "$log"; }
    done
    for log in "$WORK"/log/slurmctld.log "$WORK"/log/slurmd.log; do
      [[ -f $log ]] && { echo "===== $log (tail)"; tail -n 25 "$log"; }
    done
  fi
  # Stop our daemons, newest first, by the PIDs we started; then give them a moment before insisting.
  local pid i
  for ((i = ${#DAEMON_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${DAEMON_PIDS[i]}
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [[ ${KEEP:-0} == 1 || $status != 0 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  say "$([[ $status == 0 ]] && echo PASSED || echo FAILED) in $((SECONDS - T0)) s"
  exit "$status"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM  # a CI timeout still stops the daemons and shows the logs

# --- a private one-node cluster: own munge key/socket, own ports, all state under $WORK --------------------------
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge/munge.key"
munged --foreground --force --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/munge.socket" \
  --pid-file="$WORK/munge/munged.pid" --seed-file="$WORK/munge/munged.seed" --log-file="$WORK/log/munged.log" \
  >"$WORK/log/munged.out" 2>&1 &
DAEMON_PIDS+=($!)
mkdir -p "$WORK/spool/localhost"
cat >"$WORK/slurm.conf" <<EOF
ClusterName=acemath-ci
SlurmctldHost=localhost
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job is held before it may start (default 120 s).
AuthInfo=socket=$WORK/munge/munge.socket,cred_expire=10
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool/%n
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
NodeName=localhost CPUs=${SLURM_CI_CPUS:-2} State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$WORK/slurm.conf
for _ in $(seq 50); do [[ -S $WORK/munge/munge.socket ]] && break; sleep 0.1; done
slurmctld -D -i -f "$SLURM_CONF" >"$WORK/log/slurmctld.out" 2>&1 &
DAEMON_PIDS+=($!)
slurmd -D -N localhost -f "$SLURM_CONF" >"$WORK/log/slurmd.out" 2>&1 &
DAEMON_PIDS+=($!)
for _ in $(seq 100); do
  [[ $(sinfo -h -o %T 2>/dev/null) == idle ]] && break
  sleep 0.2
done
[[ $(sinfo -h -o %T 2>/dev/null) == idle ]] || fail "the node did not come up: $(sinfo 2>&1)"
say "slurm up: $(sinfo -h -o '%P %D node(s) %T, %c CPUs')"

# --- tiny data: synthetic arithmetic SFT conversations and the shared RM file, stories260K tokenizer -------------
TOKENIZER=$REPO/../shared/models/stories260K_hf/tokenizer.model
RM_JSONL=$REPO/../shared/data/rm/math_cot_100.jsonl
python - "$WORK/data" "$TOKENIZER" "$RM_JSONL" >"$WORK/log/data.out" 2>&1 <<'EOF' || { cat "$WORK/log/data.out"; fail "data preparation"; }
import sys, warnings
warnings.filterwarnings("ignore")
from acemath_mcore.data.preprocess import PreprocessConfig, preprocess_sft
from acemath_mcore.data.rm_data import RMPreprocessConfig, preprocess_rm
from acemath_mcore.data.synthetic import sft_records, write_jsonl
out, tokenizer, rm_jsonl = sys.argv[1:]
jsonl = write_jsonl(f"{out}/sft.jsonl", sft_records(400, seed=0))
sft = preprocess_sft(PreprocessConfig(inputs=[str(jsonl)], output_prefix=f"{out}/sft", tokenizer=tokenizer,
                                      template="plain", max_length=256, workers=1, progress=False))
# Two responses per problem keep each group under the tiny model's 4096 positions (10 problems have mixed labels).
rm = preprocess_rm(RMPreprocessConfig(inputs=[rm_jsonl], output_prefix=f"{out}/rm", tokenizer=tokenizer,
                                      template="plain", max_length=2048, num_responses=2))
print(f"sft: {sft['samples']} samples; rm: {rm['groups']} groups, {rm['responses']} responses")
EOF
say "data: $(tail -n1 "$WORK/log/data.out")"

job_field() { scontrol show job -o "$1" 2>/dev/null | grep -o "\b$2=[^ ]*" | head -n1 | cut -d= -f2; }
wait_for() {  # JOB SECONDS STATE...: until the job is in one of the states
  local job=$1 limit=$2 state
  shift 2
  for _ in $(seq $((limit * 5))); do
    state=$(job_field "$job" JobState)
    for wanted in "$@"; do [[ $state == "$wanted" ]] && return 0; done
    case $state in FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE)
      fail "job $job ended $state (exit $(job_field "$job" ExitCode)), expected $*" ;;
    esac
    sleep 0.2
  done
  fail "job $job still $state after ${limit}s, expected $*"
}
wait_for_line() {  # FILE SECONDS REGEX
  for _ in $(seq $(($2 * 5))); do
    grep -Eq "$3" "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  fail "no line matching '$3' in $1 after $2 s"
}
losses() { grep -oE 'step +[0-9]+/[0-9]+ \| loss [0-9.]+' "$1" | awk '{print $2, $5}'; }
check_losses() {  # LOG TOTAL: steps 1..TOTAL once each, in order; mean loss of the last 3 < 0.8 x the first 3
  local log=$1 total=$2 steps first last
  steps=$(losses "$log" | awk '{split($1, s, "/"); print s[1]}' | tr '\n' ' ')
  [[ $steps == "$(seq -s ' ' 1 "$total") " ]] || fail "$log: steps logged: $steps, expected 1..$total once each"
  first=$(losses "$log" | head -n3 | awk '{m += $2} END {printf "%.3f", m / NR}')
  last=$(losses "$log" | tail -n3 | awk '{m += $2} END {printf "%.3f", m / NR}')
  awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.8 * a) }' || fail "$log: mean loss $first -> $last did not fall"
  echo "$first -> $last (means of the first and last 3 steps)"
}

# Submit from a scratch directory with relative paths, as a user would from their project directory; the job
# finds the checkout itself (REPO_DIR is not set) and reads paths relative to the submit directory.
cd "$WORK/jobs"
unset REPO_DIR
# megatron's "no Transformer Engine / apex" notices from every rank drown the logs on CPU.
export PYTHONWARNINGS=ignore::UserWarning,ignore::FutureWarning
cpu=(--gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 --time=15)

# 3b. A job with a missing path, submitted straight with sbatch: it fails at start with status 2 (so it is not
# requeued) and names the variable. Queued first: it takes the node for the few seconds its check needs.
bad=$(RECIPE=tiny_rm DATA=../data/missing sbatch --parsable --gpus-per-node=0 --ntasks-per-node=1 \
  --cpus-per-task=1 --time=5 "$REPO/slurm/rm_7b.sh")
JOBS+=("$bad")

# 1. SFT, DP=2, direct sbatch of the template; it is sent SIGTERM once training steps are logged. The periodic
# checkpoint before it starts megatron's writer-queue process, the loader has worker processes and rank 0 has
# wandb's service (offline): Slurm signals those too, and the run must still checkpoint and requeue (before, the
# preemption checkpoint failed with BrokenPipeError).
sft=$(RECIPE=tiny_sft DATA=../data/sft CKPT_DIR=ckpt/sft INIT_FROM=none \
  OVERRIDES="train_steps=$SFT_STEPS data.seq_length=256 global_batch_size=8 micro_batch_size=2 checkpoint.save_interval=2 data.num_workers=2 logging.wandb_project=ci logging.output_dir=$WORK/runs" \
  sbatch --parsable "${cpu[@]}" "$REPO/slurm/sft_stage1.sh")
JOBS+=("$sft")
sft_log=$WORK/jobs/acemath-sft-stage1-$sft.out

# 2. RM, TP=2, through submit.sh, after the SFT job and from its checkpoint (not written yet: --dependency).
# USE_PLANNER=1: launch/plan.py's layout for the job's 2 GPUs goes first, OVERRIDES' TP=2 still wins.
# global_batch_size=4: the 5 groups pack into 4 bins, so every step sees all of them and the loss falls smoothly.
rm_overrides="train_steps=$RM_STEPS data.seq_length=4096 global_batch_size=4 optim.lr=3e-3 optim.warmup_steps=2"
rm_overrides+=" parallel.tensor_parallel=2 logging.output_dir=$WORK/runs checkpoint.save_interval=4 checkpoint.async_save=true"
rm_job=$(RECIPE=tiny_rm DATA=../data/rm CKPT_DIR=ckpt/rm INIT_FROM=ckpt/sft LOG_DIR=logs USE_PLANNER=1 OVERRIDES=$rm_overrides \
  "$REPO/slurm/submit.sh" rm_7b "${cpu[@]}" --dependency="afterok:$sft" 2>"$WORK/log/submit_rm.err") ||
  { cat "$WORK/log/submit_rm.err"; fail "submit.sh rm_7b"; }
JOBS+=("$rm_job")
rm_log=$WORK/jobs/logs/acemath-rm-7b-$rm_job.out

# 5. Evaluation of the SFT model, after it (the pipeline's order): a job array, one benchmark per task, except math,
# split over two (its 2 chunks of 2 problems, one per task).
# No TEMPLATE: the SFT save dir records its data's (plain), and generation uses it.
eval_env=(CKPT=ckpt/sft MODEL=tiny TOKENIZER="$TOKENIZER" BENCHMARKS="gsm8k math:2" TP=1 NUM_SAMPLES=2
  TEMPERATURE=0.7 MAX_NEW_TOKENS=16 EVAL_BF16=0 EVAL_ARGS="--limit 4 --chunk-problems 2" EVAL_OUTPUT_DIR=eval LOG_DIR=logs)
one_task=(--gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=1 --time=10)
eval_job=$(env "${eval_env[@]}" "$REPO/slurm/submit.sh" eval "${one_task[@]}" --dependency="afterok:$sft" \
  2>"$WORK/log/submit_eval.err") || { cat "$WORK/log/submit_eval.err"; fail "submit.sh eval"; }
JOBS+=("$eval_job")
# Best-of-n of those candidates with the RM of 2 (the same variables find them; the RM save dir records its data's
# prompt format: plain, no system turn).
bon_job=$(env "${eval_env[@]}" RM_CKPT=ckpt/rm RM_TP=1 RM_BF16=0 \
  "$REPO/slurm/submit.sh" bestofn "${one_task[@]}" --dependency="afterok:$rm_job:$eval_job" \
  2>"$WORK/log/submit_bon.err") || { cat "$WORK/log/submit_bon.err"; fail "submit.sh bestofn"; }
JOBS+=("$bon_job")
say "submitted: job $bad (missing DATA), SFT job $sft, RM job $rm_job and eval array $eval_job (both afterok:$sft)," \
  "best-of-n array $bon_job (afterok:$rm_job:$eval_job)"

# 3a. A missing prefix is refused on the submit side: nothing is queued.
if out=$(DATA=../data/nope RECIPE=tiny_sft INIT_FROM=none "$REPO/slurm/submit.sh" sft_stage1 "${cpu[@]}" 2>&1); then
  fail "submit.sh accepted a missing DATA prefix: $out"
fi
grep -q "DATA: data.prefixes: prefix $WORK/data/nope is missing" <<<"$out" || fail "submit.sh error does not name DATA: $out"
! scontrol show job $((bon_job + 1)) >/dev/null 2>&1 || fail "submit.sh queued a job despite the error"
say "submit.sh refused before sbatch: $(grep -m1 -o 'DATA: data.prefixes: prefix [^ ]* is missing' <<<"$out")"

wait_for "$bad" 120 FAILED COMPLETED
[[ $(job_field "$bad" JobState) == FAILED && $(job_field "$bad" ExitCode) == 2:0 ]] ||
  fail "job $bad with missing DATA: $(job_field "$bad" JobState) $(job_field "$bad" ExitCode), expected FAILED 2:0"
bad_log=$WORK/jobs/acemath-rm-7b-$bad.out
grep -q "DATA: data.prefixes: prefix $WORK/data/missing is missing" "$bad_log" || fail "$bad_log does not name DATA"
say "job $bad failed at start: FAILED, exit 2 (not requeued), log names DATA"

wait_for_line "$sft_log" 240 'step +3/'
scancel --signal=TERM "$sft"
say "SFT job $sft: sent SIGTERM after '$(grep -oE 'step +[0-9]+/[0-9]+' "$sft_log" | tail -n1)'"
wait_for_line "$sft_log" 120 'requeued \(restart 1\)'
saved=$(grep -oE 'saved .*iter_[0-9]+' "$sft_log" | tail -n1 | grep -oE '[0-9]+$')
grep -q "received signal 15" "$sft_log" || fail "the trainer did not log SIGTERM"
[[ -n $saved ]] || fail "no checkpoint was saved after SIGTERM"
((10#$saved >= 3 && 10#$saved < SFT_STEPS)) || fail "preemption checkpoint at step $saved"
wait_for "$sft" 60 PENDING
[[ $(job_field "$sft" Restarts) == 1 ]] || fail "job $sft: Restarts=$(job_field "$sft" Restarts), expected 1"
[[ $(job_field "$rm_job" JobState) == PENDING ]] || fail "the dependent RM job did not wait for the requeued SFT job"
say "SFT job $sft: checkpointed iter_$saved, exited 75, requeued (held until $(job_field "$sft" EligibleTime)); RM job pending"

wait_for "$sft" 300 COMPLETED
resumed=$(grep -oE 'resumed from [^ ]+ at step [0-9]+' "$sft_log" | tail -n1)
[[ $resumed == *"iter_$saved at step $((10#$saved))" ]] || fail "the requeued run did not resume from iter_$saved: $resumed"
[[ $(cat ckpt/sft/latest) == "iter_$(printf %07d "$SFT_STEPS")" ]] || fail "ckpt/sft/latest is $(cat ckpt/sft/latest)"
[[ $(job_field "$sft" ExitCode) == 0:0 ]] || fail "job $sft exit code $(job_field "$sft" ExitCode)"
sft_losses=$(check_losses "$sft_log" "$SFT_STEPS")
say "SFT job $sft COMPLETED after 1 requeue: ${resumed#resumed from "$WORK"/jobs/}, $SFT_STEPS steps, loss $sft_losses"

# 4. The whole chain, printed: every stage checked, then chained with afterok (runs beside the RM job). The 7B
# chain refuses the tiny SFT checkpoint as its start (another architecture); from random weights it goes through.
pipeline_env=(DRY_RUN=1 SIZE=7b DATA_STAGE1=../data/sft DATA_STAGE2=../data/sft DATA_MATH_SFT=../data/sft
  DATA_RM=../data/rm TOKENIZER="$TOKENIZER")
if refused=$(env "${pipeline_env[@]}" INIT_FROM=ckpt/sft bash "$REPO/slurm/pipeline.sh" 2>&1); then
  echo "$refused"; fail "pipeline.sh accepted a 7B chain starting from the tiny checkpoint"
fi
grep -q "RECIPE: model: the starting checkpoint .* records another architecture" <<<"$refused" ||
  { echo "$refused"; fail "pipeline.sh did not name the architecture mismatch"; }
plan=$(env "${pipeline_env[@]}" INIT_FROM=none bash "$REPO/slurm/pipeline.sh" 2>&1) ||
  { echo "$plan"; fail "pipeline.sh DRY_RUN=1"; }
chained=$(grep -c -- '--dependency=afterok:DRYRUN_' <<<"$plan" || true)
[[ $chained == 4 ]] || { echo "$plan"; fail "pipeline.sh printed $chained chained submissions, expected 4"; }
say "pipeline.sh DRY_RUN=1: the tiny checkpoint refused as a 7B start; from random weights all stages checked," \
  "5 submissions printed, 4 chained with afterok"

wait_for "$rm_job" 300 COMPLETED
grep -q "initialised weights from $WORK/jobs/ckpt/sft" "$rm_log" || fail "the RM job did not start from the SFT checkpoint"
grep -q "planner layout for 2 GPUs: parallel.tensor_parallel=" "$rm_log" || fail "the RM job did not use launch/plan.py"
grep -q "per rank, DP=1)" "$rm_log" || fail "OVERRIDES' TP=2 did not win over the planner's layout (DP should be 1)"
[[ $(cat ckpt/rm/latest) == "iter_$(printf %07d "$RM_STEPS")" ]] || fail "ckpt/rm/latest is $(cat ckpt/rm/latest)"
rm_losses=$(check_losses "$rm_log" "$RM_STEPS")
for step in 4 8; do
  grep -q "saving .*/ckpt/rm/iter_000000$step in the background" "$rm_log" ||
    fail "the RM job did not start saving step $step in the background"
  grep -q "saved .*/ckpt/rm/iter_000000$step (" "$rm_log" || fail "the RM job did not publish its step-$step checkpoint"
done
say "RM job $rm_job COMPLETED: from the SFT weights, planner layout + TP=2 override, $RM_STEPS steps," \
  "loss $rm_losses, steps 4 and 8 saved in the background, latest=$(cat ckpt/rm/latest)"

for task in 0 1 2; do wait_for "${eval_job}_$task" 300 COMPLETED; done
for bench in gsm8k math; do
  [[ $(wc -l <"eval/$bench.jsonl") == 4 ]] || fail "eval/$bench.jsonl does not hold 4 graded problems"
  grep -q "^| $bench | 4 | 2 |" eval/summary.md || fail "eval/summary.md has no $bench row: $(cat eval/summary.md)"
done
grep -q '"shards": 2' eval/math.meta.json || fail "eval/math.meta.json does not say it merged 2 shards"
grep -q '"template": "plain"' eval/math.meta.json || fail "the eval did not render with the SFT data's template"
[[ -z $(ls -A eval/shards) ]] || fail "the merged shards were left in eval/shards: $(ls eval/shards)"
say "eval array $eval_job COMPLETED: tasks 0 (gsm8k), 1 and 2 (math's two parts, merged), 4 problems x 2" \
  "samples each, one summary.md"

for task in 0 1; do wait_for "${bon_job}_$task" 300 COMPLETED; done
for bench in gsm8k math; do
  python - "eval/rm-rm/$bench.scored.jsonl" <<'PY' || fail "eval/rm-rm/$bench.scored.jsonl: not 4 records of 2 scores"
import json, math, sys
records = [json.loads(line) for line in open(sys.argv[1])]
assert len(records) == 4 and all(len(r["pred_score"]) == 2 and all(map(math.isfinite, r["pred_score"])) for r in records)
PY
  grep -q "^| $bench | 4 | 2 | " eval/rm-rm/bestofn.md || fail "eval/rm-rm/bestofn.md has no $bench row"
done
grep -q "rendering prompts for the reward model .* in its recorded format: template 'plain', no system prompt" \
  logs/acemath-bestofn-"${bon_job}"_0.out || fail "the RM did not score with its recorded prompt format"
say "best-of-n array $bon_job COMPLETED: the candidates scored by the RM, $(grep -c '^| ' eval/rm-rm/bestofn.md)-line" \
  "table eval/rm-rm/bestofn.md"

# 6. A rank dies mid-run while its peer cannot notice (stopped, as if blocked in an NCCL collective, which never
# learns of a dead peer): srun --kill-on-bad-exit must end the step, the job must fail and must not requeue.
crash=$(RECIPE=tiny_sft DATA=../data/sft CKPT_DIR=ckpt/crash INIT_FROM=none \
  OVERRIDES="train_steps=1000 data.seq_length=256 global_batch_size=8 micro_batch_size=2 logging.output_dir=$WORK/crash_runs" \
  sbatch --parsable "${cpu[@]}" "$REPO/slurm/sft_stage1.sh")
JOBS+=("$crash")
crash_log=$WORK/jobs/acemath-sft-stage1-$crash.out
wait_for_line "$crash_log" 240 'step +2/'
# First, where is every rank? USR2 makes each write its Python stacks to the log and go on training.
scancel --signal=USR2 "$crash"
in_loop() { grep -cE 'File ".*/training/trainer.py", line [0-9]+ in run$' "$crash_log" || true; }
for _ in $(seq 150); do  # each rank's stack passes through the training loop once
  (($(in_loop) >= 2)) && break
  sleep 0.2
done
stacks=$(in_loop)
((stacks >= 2)) || fail "job $crash: $stacks stacks in the training loop in $crash_log after USR2, expected 2"
dumped_at=$(grep -oE 'step +[0-9]+/' "$crash_log" | tail -n1 | grep -oE '[0-9]+')
wait_for_line "$crash_log" 60 "step +$((dumped_at + 1))/"
say "crash job $crash: USR2 -> both ranks' stacks (in the training loop) in the log, still training" \
  "(step $((dumped_at + 1)))"
declare -A rank_pid=()
for pid in $(pgrep -f "logging.output_dir=$WORK/crash_runs"); do
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == python* ]] || continue  # srun's own command line matches too
  rank=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n 's/^SLURM_PROCID=//p' || true)
  if [[ -n $rank && -z ${rank_pid[$rank]:-} ]]; then rank_pid[$rank]=$pid; fi  # its data-loader workers come later
done
[[ -n ${rank_pid[0]:-} && -n ${rank_pid[1]:-} ]] || fail "job $crash: did not find both ranks' python processes"
kill -STOP "${rank_pid[0]}"
kill -KILL "${rank_pid[1]}"
killed_at=$SECONDS
wait_for "$crash" 60 FAILED
[[ $(job_field "$crash" Restarts) == 0 ]] || fail "job $crash requeued itself after a crash"
grep -q "task 1: Killed" "$crash_log" || fail "$crash_log does not report rank 1's death"
say "crash job $crash: rank 1 killed, rank 0 stopped -> FAILED (exit $(job_field "$crash" ExitCode)) after" \
  "$((SECONDS - killed_at)) s, not requeued"
