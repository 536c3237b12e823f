"""Config checks before set-up: every problem listed at once with its key, the data's tokenizer checked against the
model and its starting checkpoint, and ids beyond the vocabulary stopped at the batch."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_helpers import run_workers
from shared_data import shared_path

REPO = Path(__file__).resolve().parents[1]
STORIES_TOKENIZER = "models/stories260K_hf/tokenizer.model"  # 512 pieces: fits the tiny model
LLAMA2_TOKENIZER = "tokenizers/llama2_sp/tokenizer.model"  # 32,000 pieces


def _prefix(root: Path, name: str, tokenizer: str) -> str:
    from acemath_mcore.data.preprocess import PreprocessConfig, preprocess_sft
    from acemath_mcore.data.synthetic import sft_records, write_jsonl

    jsonl = write_jsonl(root / f"{name}.jsonl", sft_records(40, seed=0))
    prefix = str(root / name)
    preprocess_sft(PreprocessConfig(inputs=[str(jsonl)], output_prefix=prefix, tokenizer=str(shared_path(tokenizer)),
                                    template="plain", max_length=256, workers=1, progress=False))
    return prefix


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("check_data")
    return {"stories": _prefix(root, "stories", STORIES_TOKENIZER), "llama2": _prefix(root, "llama2", LLAMA2_TOKENIZER)}


NO_DATA = {kind: f"data.prefixes: none given: pass data.prefixes=[PREFIX,...], outputs of launch/preprocess.py {kind}"
           for kind in ("sft", "rm")}


def _tiny(overrides, kind="sft"):
    from acemath_mcore.recipes import apply_overrides, get_recipe

    return apply_overrides(get_recipe(f"tiny_{kind}"), overrides)


def _fake_checkpoint(directory: Path, tokenizer: str) -> Path:
    """What init_from reads before any weight: a dist checkpoint's metadata.json, the recorded architecture and
    the HF assets holding the tokenizer."""
    from acemath_mcore.convert.megatron_files import ASSETS_DIR, write_model_description
    from acemath_mcore.models import resolve_arch

    (directory / ASSETS_DIR).mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")
    write_model_description(directory, resolve_arch("tiny"))
    shutil.copyfile(shared_path(tokenizer), directory / ASSETS_DIR / "tokenizer.model")
    return directory


def test_every_problem_is_listed_with_its_key():
    from acemath_mcore.models.presets import PRESETS
    from acemath_mcore.recipes.checks import config_problems

    config = _tiny(["nan_policy=skp", "model_options.recompute=sel", "model_options.fp8=e5m2",
                    "model_options.fp8_recipe=delay", "model_options.cross_entropy=fused",
                    "model_options.cuda_graph=attn", "optim.decay_style=cos", "model_options.spec=tee",
                    "checkpoint.optimizer_format=dp", "profile.tool=perf", "profile.num_steps=0",
                    "reward.loss=listwise", "parallel.tensor_parallel=3", "parallel.pipeline_parallel=3",
                    "data.prefixes=[a,b]", "data.weights=[1]", "global_batch_size=6", "micro_batch_size=4",
                    "logging.log_interval=0", "eval_interval=-1", "checkpoint.save_interval=-5",
                    "parallel.context_parallel=2"])
    assert config_problems(config, "rm") == [
        "model_options.spec=tee: choose one of auto, te, native",
        "model_options.recompute=sel: choose one of none, selective, full",
        "model_options.fp8=e5m2: choose one of none, hybrid, e4m3",
        "model_options.fp8_recipe=delay: choose one of delayed, tensorwise, blockwise, mxfp8",
        "model_options.cross_entropy=fused: choose one of auto, triton, megatron",
        "model_options.cuda_graph=attn: choose one of none, mlp",
        "optim.decay_style=cos: choose one of cosine, linear, constant",
        "nan_policy=skp: choose one of stop, skip",
        "checkpoint.optimizer_format=dp: choose one of fully_reshardable, dp_reshardable",
        "profile.tool=perf: choose one of none, torch, nsys",
        "reward.loss=listwise: choose one of listwise_bt, pairwise_bt, bce, mse",
        "logging.log_interval=0: must be at least 1",
        "eval_interval=-1: must be at least 0 (0: only after the last step)",
        "checkpoint.save_interval=-5: must be at least 0 (0: only at the end)",
        "profile.num_steps=0: must be at least 1",
        "global_batch_size=6 is not a multiple of micro_batch_size=4",
        "data.prefixes: a reward model trains on exactly one RM prefix and no blend weights, got 2 prefix(es) and "
        "weights [1.0]",
        "data.prefixes: prefix a is missing a.bin, a.idx, a_rm_labels.npy (write it with launch/preprocess.py rm "
        "--output a)",
        "data.prefixes: prefix b is missing b.bin, b.idx, b_rm_labels.npy (write it with launch/preprocess.py rm "
        "--output b)",
        "parallel.tensor_parallel=3 does not divide num_attention_heads=4 of this qwen2 model",
        "parallel.pipeline_parallel=3 does not divide the model's num_layers=4",
        "parallel.context_parallel=2: context parallelism is not supported (the data path does not split sequences "
        "across CP ranks); use 1, and tensor parallelism with sequence parallelism or recompute for long sequences",
    ]
    sft_problems = config_problems(config, "sft")
    assert "reward.loss" not in " ".join(sft_problems)  # SFT ignores the reward section
    assert "data.weights: 1 weight(s) for 2 prefix(es) in data.prefixes; give one per prefix, or none to blend in " \
        "proportion to size" in sft_problems
    assert config_problems(_tiny([]), "sft") == [NO_DATA["sft"]]
    assert config_problems(_tiny([], "rm"), "rm") == [NO_DATA["rm"]]
    assert config_problems(_tiny(["model=tiny-qwen"]), "sft") == [
        NO_DATA["sft"], f"model: model 'tiny-qwen' is neither a preset ({', '.join(sorted(PRESETS))}), nor a "
        "config.json, nor a megatron checkpoint with model_arch.json"]


def test_transformer_engine_options_on_the_native_spec_are_refused_on_any_machine():
    """A login node without TE can tell: spec=native never builds TE's layers, whatever machine the job runs on
    (spec=auto is only resolved there)."""
    from acemath_mcore.recipes.checks import config_problems

    te_only = ["model_options.fp8=hybrid", "model_options.cuda_graph=mlp"]
    assert config_problems(_tiny(["model_options.spec=native", *te_only]), "sft") == [
        *(f"{option} needs Transformer Engine's layer spec, not model_options.spec=native" for option in te_only),
        NO_DATA["sft"]]
    assert config_problems(_tiny(["model_options.spec=auto", *te_only]), "sft") == [NO_DATA["sft"]]


def test_sizes_below_one_and_a_missing_starting_checkpoint_are_problems_not_tracebacks():
    """TP or PP of 0 used to reach a modulo (ZeroDivisionError, exit 1), negative ones and negative lengths passed,
    and a checkpoint.init_from that does not exist surfaced only after the model was built."""
    from acemath_mcore.recipes.checks import config_problems

    assert config_problems(_tiny(["parallel.tensor_parallel=0", "parallel.pipeline_parallel=-2"]), "sft") == [
        NO_DATA["sft"], "parallel.tensor_parallel=0: must be at least 1", "parallel.pipeline_parallel=-2: must be at least 1"]
    assert config_problems(_tiny(["train_steps=-5"]), "sft") == [
        "train_steps=-5, epochs=1.0: train_steps must be at least 0 (0: run for the epochs) and epochs above 0",
        NO_DATA["sft"]]
    missing = "checkpoint.init_from=/nowhere/base"
    assert config_problems(_tiny([missing]), "sft") == [
        NO_DATA["sft"], "checkpoint.init_from: /nowhere/base does not exist (convert the base model with "
        "checkpoints_tools/convert_from_hf.py, or point it at the previous stage's save dir)"]
    assert config_problems(_tiny([missing]), "sft", read_checkpoint=False) == [NO_DATA["sft"]]  # an earlier job writes it


def test_values_megatron_or_torch_would_refuse_after_the_model_is_built_are_problems():
    """These passed --dry-run and Slurm's preflight, then failed on every rank after set-up: a bare assertion from
    megatron's scheduler (min_lr above lr), its VPP assertion (VPP=1), torch's DataLoader, wandb's settings."""
    from acemath_mcore.recipes.checks import config_problems

    config = _tiny(["optim.min_lr=1", "optim.weight_decay=-0.1", "optim.adam_beta2=1", "optim.adam_eps=-1e-8",
                    "optim.overlap_param_gather=true", "data.num_workers=-1", "logging.wandb_mode=bogus",
                    "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=1",
                    "parallel.timeout_minutes=0"])
    assert config_problems(config, "sft") == [
        "logging.wandb_mode=bogus: choose one of offline, online, disabled",
        "data.num_workers=-1: must be at least 0 (0: load in the training process)",
        "parallel.timeout_minutes=0: must be at least 1",
        "optim.min_lr=1.0: must be between 0 and optim.lr=0.002 (the decay's floor)",
        "optim.weight_decay=-0.1: must be at least 0",
        "optim.adam_beta2=1.0: must be in [0, 1)",
        "optim.adam_eps=-1e-08: must be at least 0",
        "optim.overlap_param_gather=true needs optim.use_distributed_optimizer=true and optim.overlap_grad_reduce=true",
        NO_DATA["sft"],
        "parallel.virtual_pipeline_parallel=1: use null (no interleaving) or at least 2 model chunks per pipeline "
        "stage",
    ]
    assert config_problems(_tiny(["optim.lr=-1", "optim.min_lr=1"]), "sft")[0] == "optim.lr=-1.0: must be at least 0"
    # Sequence parallelism splits a row's tokens over the TP ranks (megatron asserts it at the first forward).
    split = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "micro_batch_size=1"]
    assert config_problems(_tiny([*split, "data.seq_length=511"]), "sft") == [
        NO_DATA["sft"], "data.seq_length=511: with parallel.sequence_parallel megatron splits each row's 511 tokens "
        "over the tensor_parallel=2 ranks; use a multiple of 2"]
    assert config_problems(_tiny([*split, "data.seq_length=512"]), "sft") == [NO_DATA["sft"]]
    assert config_problems(_tiny([*split[:2], "micro_batch_size=2", "data.seq_length=511"]), "sft") == [
        NO_DATA["sft"]]  # a packed micro-batch is one row of 2 x 511 tokens
    assert config_problems(_tiny(["optim.lr=0", "optim.min_lr=0", "optim.adam_eps=0"]), "sft") == [NO_DATA["sft"]]
    assert config_problems(_tiny(["data.valid_prefixes=[a,b]"], "rm"), "rm")[:2] == [
        NO_DATA["rm"], "data.valid_prefixes: a reward model validates on one RM prefix, got 2"]


def test_a_step_is_sized_in_rows_or_in_conversations_never_both():
    from acemath_mcore.recipes.checks import config_problems

    assert config_problems(_tiny(["global_batch_conversations=64"]), "sft") == [
        "global_batch_size=8, global_batch_conversations=64: set exactly one, a step of that many rows or of about "
        "that many conversations (add global_batch_conversations=null to use global_batch_size, or the other way "
        "round)", NO_DATA["sft"]]
    assert config_problems(_tiny(["global_batch_size=null"]), "sft") == [
        "global_batch_size=none, global_batch_conversations=none: set exactly one, a step of that many rows or of "
        "about that many conversations (add global_batch_conversations=null to use global_batch_size, or the other "
        "way round)", NO_DATA["sft"]]
    assert config_problems(_tiny(["global_batch_size=null", "global_batch_conversations=0"]), "sft") == [
        "global_batch_conversations=0: must be at least 1", NO_DATA["sft"]]
    assert config_problems(_tiny(["global_batch_size=null", "global_batch_conversations=64"]), "sft") == [NO_DATA["sft"]]
    assert config_problems(_tiny(["global_batch_size=null", "global_batch_conversations=64"], "rm"), "rm") == [
        "global_batch_conversations=64: SFT only; size this RM stage's step with global_batch_problems or "
        "global_batch_size",
        "global_batch_size=none, global_batch_problems=none: set exactly one, a step of that many rows or of about "
        "that many problems (add global_batch_problems=null to use global_batch_size, or the other way round)",
        NO_DATA["rm"]]
    assert config_problems(_tiny(["global_batch_size=null", "global_batch_problems=64"], "rm"), "rm") == [NO_DATA["rm"]]
    assert config_problems(_tiny(["global_batch_size=null", "global_batch_problems=64"]), "sft") == [
        "global_batch_problems=64: RM only; size this SFT stage's step with global_batch_conversations or "
        "global_batch_size",
        "global_batch_size=none, global_batch_conversations=none: set exactly one, a step of that many rows or of "
        "about that many conversations (add global_batch_conversations=null to use global_batch_size, or the other "
        "way round)", NO_DATA["sft"]]


def test_the_launched_trainer_logs_the_rows_a_step_of_conversations_takes(prefixes, tmp_path):
    """Through launch/train_sft.py (its console set up before the data is built), the sizing is on stdout and is
    the batch the run then uses."""
    done = subprocess.run([sys.executable, str(REPO / "launch/train_sft.py"), "--recipe", "tiny_sft",
                           f"data.prefixes=[{prefixes['stories']}]", "data.seq_length=256", "global_batch_size=null",
                           "global_batch_conversations=8", "train_steps=1", "checkpoint.save_dir=none",
                           f"logging.output_dir={tmp_path}", "data.num_workers=0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sized = re.search(r"global batch: (\d+) rows of ([\d.]+) conversations on average, about (\d+) conversations per "
                      r"step \(global_batch_conversations=8\)", done.stdout)
    assert sized, done.stdout
    rows, per_row = int(sized.group(1)), float(sized.group(2))
    assert f"steps of {rows} samples" in done.stdout and abs(rows * per_row - 8) <= per_row


def test_trainer_refuses_a_bad_config_before_any_set_up(tmp_path):
    import torch

    from acemath_mcore.recipes.checks import ConfigError
    from acemath_mcore.training.sft import train_sft

    with pytest.raises(ConfigError, match=r"recipe 'tiny-sft' \(sft\): 3 problem\(s\):\n  - optim.decay_style=cos: "
                                          r"choose one of .*\n  - nan_policy=skp.*\n  - data.prefixes: prefix "
                                          r"/nowhere/train is missing /nowhere/train.bin"):
        train_sft(_tiny(["nan_policy=skp", "optim.decay_style=cos", "data.prefixes=[/nowhere/train]"]))
    assert not torch.distributed.is_initialized()  # nothing was set up, not even the data


def test_data_tokenizer_must_fit_the_model_and_be_one(prefixes):
    from acemath_mcore.recipes.checks import config_problems

    stories, llama2 = prefixes["stories"], prefixes["llama2"]
    assert config_problems(_tiny([f"data.prefixes=[{stories}]"]), "sft") == []
    problems = config_problems(_tiny([f"data.prefixes=[{stories}]", f"data.valid_prefixes=[{llama2}]"]), "sft")
    llama2_named = f"{shared_path(LLAMA2_TOKENIZER)} (32000 ids, bos_id 1)"
    stories_named = f"{shared_path(STORIES_TOKENIZER)} (512 ids, bos_id 1)"
    assert problems == [
        f"data.prefixes: {llama2} was tokenized with {llama2_named}, more ids than the model's 512 embedding rows: "
        "re-run launch/preprocess.py with the model's tokenizer",
        f"data.prefixes: the prefixes come from different tokenizers: {stories}: {stories_named}; "
        f"{llama2}: {llama2_named}",
    ]


def test_data_tokenizer_must_match_the_starting_checkpoints(prefixes, tmp_path):
    from acemath_mcore.recipes.checks import config_problems

    stories = prefixes["stories"]
    same = _fake_checkpoint(tmp_path / "same", STORIES_TOKENIZER)
    assert config_problems(_tiny([f"data.prefixes=[{stories}]", f"checkpoint.init_from={same}"]), "sft") == []
    # model= may name the converted checkpoint itself: the architecture it records
    assert config_problems(_tiny([f"model={same}", f"data.prefixes=[{stories}]", f"checkpoint.init_from={same}"]),
                           "sft") == []
    other = _fake_checkpoint(tmp_path / "other", LLAMA2_TOKENIZER)
    config = _tiny([f"data.prefixes=[{stories}]", f"checkpoint.init_from={other}"])
    assert config_problems(config, "sft") == [
        f"data.prefixes: {stories} was tokenized with {shared_path(STORIES_TOKENIZER)} (512 ids, bos_id 1), but the "
        f"starting checkpoint's tokenizer is {other}/hf_assets/tokenizer.model (32000 ids, bos_id 1): re-run "
        f"launch/preprocess.py with --tokenizer {other}/hf_assets/tokenizer.model"]
    assert config_problems(config, "sft", read_checkpoint=False) == []  # an upstream job has yet to write it
    # Resuming: the save dir's latest checkpoint is where the weights come from, and init_from is not read.
    save_dir = tmp_path / "save"
    _fake_checkpoint(save_dir / "iter_0000002", STORIES_TOKENIZER)
    (save_dir / "latest").write_text("iter_0000002")
    assert config_problems(_tiny([f"data.prefixes=[{stories}]", f"checkpoint.init_from={other}",
                                  f"checkpoint.save_dir={save_dir}"]), "sft") == []
    (save_dir / "latest").write_text("iter_0000009")  # names no checkpoint: an error, not a silent fresh start
    problems = config_problems(_tiny([f"data.prefixes=[{stories}]", f"checkpoint.save_dir={save_dir}"]), "sft")
    assert len(problems) == 1 and problems[0].startswith(
        f"checkpoint.save_dir: {save_dir}/latest names 'iter_0000009', which is not a complete checkpoint")
    # A checkpoint written for another architecture.
    arch = json.loads((same / "model_arch.json").read_text())
    (same / "model_arch.json").write_text(json.dumps({**arch, "rope_theta": 1e6}))
    assert config_problems(_tiny([f"data.prefixes=[{stories}]", f"checkpoint.init_from={same}"]), "sft") == [
        f"model: the starting checkpoint {same} records another architecture than the one asked for: rope_theta "
        "1000000.0 there, 10000.0 here"]


def _train_and_report(rank, world_size, config):
    from acemath_mcore.training.sft import train_sft

    try:
        train_sft(config)
    except ValueError as error:
        return str(error)
    return None


def test_ids_beyond_the_vocabulary_stop_at_the_first_batch(prefixes, tmp_path):
    """Data without a stats file (written by another tool) is not checked up front; its first batch is."""
    root = tmp_path / "data"
    root.mkdir()
    for path in Path(prefixes["llama2"]).parent.glob("llama2*"):
        if not path.name.endswith("_stats.json"):
            shutil.copyfile(path, root / path.name)
    config = _tiny([f"data.prefixes=[{root / 'llama2'}]", "data.seq_length=256", "train_steps=2",
                    "checkpoint.save_dir=none", f"logging.output_dir={tmp_path / 'runs'}"])
    [error] = run_workers(_train_and_report, 1, config)  # a worker: the trainer sets up torch.distributed
    assert re.fullmatch(r"the data holds token id \d+ but the model has only 512 embedding rows: the data was "
                        r"tokenized for another model; re-run launch/preprocess.py with the model's tokenizer", error)


def test_dry_run_reports_problems_with_exit_status_2(prefixes):
    command = [sys.executable, str(REPO / "launch/train_sft.py"), "--recipe", "tiny_sft", "--dry-run"]
    good = subprocess.run([*command, f"data.prefixes=[{prefixes['stories']}]"], capture_output=True, text=True)
    assert good.returncode == 0 and json.loads(good.stdout)["data"]["prefixes"] == [prefixes["stories"]]
    bad = subprocess.run([*command, f"data.prefixes=[{prefixes['llama2']}]", "optim.decay_style=cos"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: optim.decay_style=cos: choose one of cosine, linear, constant",
                      f"error: data.prefixes: {prefixes['llama2']} was tokenized with {shared_path(LLAMA2_TOKENIZER)} "
                      "(32000 ids, bos_id 1), more ids than the model's 512 embedding rows: re-run "
                      "launch/preprocess.py with the model's tokenizer"]


def test_overrides_convert_to_the_declared_types():
    from acemath_mcore.recipes.config import OverrideError

    config = _tiny(['data.prefixes=["/d/a", \'/d/b\',/d/c]', "data.weights=[1,2.5,3e-1]", "train_steps=1e3",
                    "checkpoint.init_from=none", "data.packed=off", "optim.lr=3e-6", "data.valid_prefixes=[]"])
    assert config.data.prefixes == ["/d/a", "/d/b", "/d/c"]  # JSON-style quotes are not part of a path
    assert config.data.weights == [1.0, 2.5, 0.3] and config.train_steps == 1000
    assert config.checkpoint.init_from is None and config.data.packed is False and config.optim.lr == 3e-6
    assert config.data.valid_prefixes == []
    for override, message in [
        ("micro_batch_size=abc", "micro_batch_size='abc': expected an integer"),
        ("micro_batch_size=1.5", "micro_batch_size='1.5': expected an integer"),
        ("optim.lr=fast", "optim.lr='fast': expected a number"),
        ("data.packed=maybe", "data.packed='maybe': expected a boolean (true/false)"),
        ("optim.lrr=1", "unknown config key 'optim.lrr'; OptimConfig has: lr, min_lr,"),
        ("optimizer.lr=1", "unknown config key 'optimizer.lr' (no section 'optimizer')"),
        ("optim.lr", "override 'optim.lr' is not of the form key=value"),
    ]:
        with pytest.raises(OverrideError) as error:
            _tiny([override])
        assert str(error.value).startswith(message), str(error.value)


def test_missing_or_wrong_kind_of_data_is_named(prefixes, tmp_path):
    from acemath_mcore.recipes.checks import config_problems

    stories = prefixes["stories"]
    assert config_problems(_tiny([f"data.prefixes=[{stories}]"], "rm"), "rm") == [
        f"data.prefixes: prefix {stories} is missing {stories}_rm_labels.npy (it is SFT data: write RM data with "
        "launch/preprocess.py rm)"]
    missing = tmp_path / "held_out"
    assert config_problems(_tiny([f"data.prefixes=[{stories}]", f"data.valid_prefixes=[{missing}]"]), "sft") == [
        f"data.valid_prefixes: prefix {missing} is missing {missing}.bin, {missing}.idx, {missing}_loss_mask.bin, "
        f"{missing}_loss_mask.idx (write it with launch/preprocess.py sft --output {missing})"]
    # The launcher prints the problems once, without a traceback, and exits 2 (Slurm does not requeue that).
    run = subprocess.run([sys.executable, str(REPO / "launch/train_rm.py"), "--recipe", "tiny_rm",
                          f"data.prefixes=[{stories}]"], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"error: recipe 'tiny-rm' (rm): 1 problem(s):\n  - data.prefixes: prefix {stories} is missing" in run.stderr


def _run_reporting_imports(script: str, *args: str) -> dict:
    """Run ``python script args``, then report its exit status and whether it imported torch and megatron-core."""
    code = "\n".join([
        "import json, runpy, sys",
        "sys.argv = sys.argv[1:]",
        "try:",
        "    runpy.run_path(sys.argv[0], run_name='__main__')",
        "    status = 0",
        "except SystemExit as done:",
        "    status = done.code",
        "print(json.dumps({'status': status, 'torch': 'torch' in sys.modules, 'megatron': 'megatron.core' in sys.modules}))",
    ])
    run = subprocess.run([sys.executable, "-c", code, str(REPO / script), *args], capture_output=True, text=True,
                         timeout=120)
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("script,args", [
    ("launch/train_sft.py", ["--help"]),
    ("launch/train_rm.py", ["--recipe", "tiny_rm", "optim.lrr=1"]),
    ("launch/train_rm.py", ["--recipe", "tiny_sft"]),
])
def test_help_and_argument_errors_import_neither_torch_nor_megatron(script, args):
    """They answer on a login node in well under a second (megatron-core's import alone takes 5-9 s)."""
    assert _run_reporting_imports(script, *args) == {"status": 0 if "--help" in args else 2, "torch": False,
                                                     "megatron": False}


def test_dry_run_and_the_tools_help_do_not_import_megatron(prefixes):
    dry_run = _run_reporting_imports("launch/train_sft.py", "--recipe", "tiny_sft", "--dry-run",
                                     f"data.prefixes=[{prefixes['llama2']}]", "checkpoint.init_from=/nonexistent")
    assert dry_run["status"] == 2 and not dry_run["megatron"]
    for script in ("launch/preprocess.py", "checkpoints_tools/convert_from_hf.py", "checkpoints_tools/convert_to_hf.py",
                   "checkpoints_tools/verify.py", "launch/evaluate.py", "launch/plan.py"):
        report = _run_reporting_imports(script, "--help")
        assert report["status"] == 0 and not report["megatron"], script


def test_samples_longer_than_a_row_are_found_in_the_stats_before_set_up(prefixes, tmp_path, caplog):
    """The loader refuses them only after the process groups are up; the stats record the longest sample."""
    import json as json_lib

    from acemath_mcore.data.rm_data import RMPreprocessConfig, preprocess_rm
    from acemath_mcore.recipes.checks import config_problems

    stories = prefixes["stories"]
    longest = json_lib.loads(Path(stories + "_stats.json").read_text())["max_sample_tokens"]
    assert config_problems(_tiny([f"data.prefixes=[{stories}]", f"data.seq_length={longest}"]), "sft") == []
    assert config_problems(_tiny([f"data.prefixes=[{stories}]", f"data.seq_length={longest - 1}"]), "sft") == [
        f"data.seq_length={longest - 1}: {stories} has conversations of up to {longest} tokens (its _stats.json); "
        f"raise data.seq_length to at least {longest}, or preprocess with --max-length {longest - 1}"]

    groups = tmp_path / "groups.jsonl"
    groups.write_text("".join(json_lib.dumps({"prompt": f"{a} + 1", "responses": [str(a + 1), "x " * a],
                                              "labels": [1, 0]}) + "\n" for a in range(1, 30)))
    rm = str(tmp_path / "rm")
    stats = preprocess_rm(RMPreprocessConfig(inputs=[str(groups)], output_prefix=rm,
                                             tokenizer=str(shared_path(STORIES_TOKENIZER)), template="plain"))
    group, response = stats["max_group_tokens"], stats["max_response_tokens"]
    assert response < group < 2 * response
    assert config_problems(_tiny([f"data.prefixes=[{rm}]", f"data.seq_length={group}"], "rm"), "rm") == []
    assert config_problems(_tiny([f"data.prefixes=[{rm}]", f"data.seq_length={group - 1}"], "rm"), "rm") == [
        f"data.seq_length={group - 1}: {rm} has problem groups (a packed bin holds whole groups) of up to {group} "
        f"tokens (its _stats.json); raise data.seq_length to at least {group}"]
    split = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]  # bins of an even length then
    even = group + group % 2
    assert config_problems(_tiny([f"data.prefixes=[{rm}]", f"data.seq_length={even - 2}", *split], "rm"), "rm") == [
        f"data.seq_length={even - 2}: {rm} has problem groups (a packed bin holds whole groups) of up to {group} "
        f"tokens (its _stats.json); raise data.seq_length to at least {even}"]
    padded = _tiny([f"data.prefixes=[{rm}]", "data.packed=false", f"data.seq_length={group - 1}"], "rm")
    assert config_problems(padded, "rm") == []  # a padded row holds one response
    with caplog.at_level(logging.WARNING, logger="acemath_mcore"):
        padded.data.seq_length = 24576  # the packed recipe's bin length, left in place with data.packed=false
        assert config_problems(padded, "rm") == []
    assert caplog.messages == [f"data.seq_length=24576 pads every row to 24576 tokens, while {rm}'s longest sample "
                               f"has {response}: most of the computed tokens would be padding (lower data.seq_length)"]
    padded.data.seq_length = response - 1
    assert config_problems(padded, "rm") == [
        f"data.seq_length={response - 1}: {rm} has responses (a padded row holds one) of up to {response} tokens "
        f"(its _stats.json); raise data.seq_length to at least {response}, or preprocess with --max-length "
        f"{response - 1}"]


def test_a_resume_across_40_data_parallel_ranks_is_refused_once_the_rank_count_is_known(prefixes, tmp_path):
    """megatron sizes gradient buckets max(40M, 1M x DP) with an overlapped reduction, and dp_reshardable state is
    stored per bucket: DP 48 -> 64 would fail in the loader after the model is built on every GPU."""
    from acemath_mcore.recipes.checks import config_problems
    from acemath_mcore.training.checkpoint_dirs import write_optimizer_layout

    save_dir = tmp_path / "save"
    checkpoint = _fake_checkpoint(save_dir / "iter_0000002", STORIES_TOKENIZER)
    (save_dir / "latest").write_text("iter_0000002")
    write_optimizer_layout(checkpoint, {"tensor_parallel": 1, "pipeline_parallel": 1, "virtual_pipeline": 1,
                                        "data_parallel": 48}, "dp_reshardable", distributed_optimizer=True)
    config = _tiny([f"data.prefixes=[{prefixes['stories']}]", f"checkpoint.save_dir={save_dir}",
                    "optim.use_distributed_optimizer=true", "optim.overlap_grad_reduce=true"])
    assert config_problems(config, "sft") == []  # the rank count is not known (--dry-run, submit-side preflight)
    assert config_problems(config, "sft", world_size=48) == []
    assert config_problems(config, "sft", world_size=64) == [
        f"parallel: {checkpoint} holds its optimizer state in the dp_reshardable format, stored per gradient bucket, "
        "and megatron sizes the buckets from the number of data-parallel ranks above 40: saved at 48, this run has "
        "64. Resume with 48 data-parallel ranks, or resume it once as it was saved with "
        "checkpoint.optimizer_format=fully_reshardable, whose next checkpoint is free of both, or start a new stage "
        f"from its weights with checkpoint.init_from={checkpoint} (fresh optimizer)"]
    config.optim.overlap_grad_reduce = False  # one bucket whatever the rank count
    assert config_problems(config, "sft", world_size=64) == []
    config.optim.overlap_grad_reduce = True
    write_optimizer_layout(checkpoint, {"tensor_parallel": 1, "pipeline_parallel": 1, "virtual_pipeline": 1,
                                        "data_parallel": 16}, "dp_reshardable", distributed_optimizer=True)
    assert config_problems(config, "sft", world_size=40) == []  # both at megatron's 40M floor
    assert "Resume with at most 40 data-parallel ranks" in config_problems(config, "sft", world_size=41)[0]
    # Recorded since 2026-11-25: whether the gradients were reduced in buckets at all, known without the rank count.
    write_optimizer_layout(checkpoint, {"tensor_parallel": 1, "pipeline_parallel": 1, "virtual_pipeline": 1,
                                        "data_parallel": 16, "overlap_grad_reduce": False}, "dp_reshardable",
                           distributed_optimizer=True)
    assert "was saved with optim.overlap_grad_reduce=false (this run: true)" in config_problems(config, "sft")[0]
