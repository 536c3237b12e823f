"""The SFT trainer end to end on real data: it learns, resumes bit-exactly, resumes at another layout, and
stops on a non-finite loss."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import importlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acemath_mcore.options import OPTIMIZER_CHECKPOINT_FORMATS as OPTIMIZER_FORMATS
from acemath_mcore.runtime import release_model_parallel
from distributed_helpers import run_workers
from shared_data import shared_path

STEPS = 20  # preempted after 3, resumed to the end


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    """400 synthetic arithmetic conversations, tokenized with the real 512-piece stories260K tokenizer."""
    from acemath_mcore.data.preprocess import PreprocessConfig, preprocess_sft
    from acemath_mcore.data.synthetic import sft_records, write_jsonl

    root = tmp_path_factory.mktemp("sft_data")
    jsonl = write_jsonl(root / "train.jsonl", sft_records(400, seed=0))
    prefix = str(root / "train")
    preprocess_sft(PreprocessConfig(inputs=[str(jsonl)], output_prefix=prefix,
                                    tokenizer=str(shared_path("models/stories260K_hf/tokenizer.model")),
                                    template="plain", max_length=256, workers=1, progress=False))
    return prefix


def _config(prefix, save_dir, output_dir, steps, tp=1, extra=()):
    from acemath_mcore.recipes import apply_overrides, get_recipe

    return apply_overrides(get_recipe("tiny_sft"), [
        f"data.prefixes=[{prefix}]", "data.seq_length=256", "global_batch_size=8", "micro_batch_size=2",
        f"train_steps={steps}", f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=0",
        f"logging.output_dir={output_dir}", f"parallel.tensor_parallel={tp}", *extra,
    ])


def _losses(summary):
    return {row["step"]: row["lm_loss"] for row in summary["history"]}


@contextlib.contextmanager
def preempted_after(step, rank, sig=signal.SIGUSR1, children_too=False):
    """Rank 0 alone receives ``sig`` after ``step`` (``children_too``: its child processes as well, as Slurm
    signals every process of a job step); every rank must then checkpoint and stop. Yields the names of the
    child processes signalled."""
    from acemath_mcore.training.engine import Engine

    original_step, signalled = Engine.train_step, []

    def step_then_signal(self, *args, **kwargs):
        metrics = original_step(self, *args, **kwargs)
        if self.step == step and rank == 0:
            for child in multiprocessing.active_children() if children_too else ():
                os.kill(child.pid, sig)
                signalled.append(child.name)
            os.kill(os.getpid(), sig)
        return metrics

    Engine.train_step = step_then_signal
    try:
        yield signalled
    finally:
        Engine.train_step = original_step


@contextlib.contextmanager
def slow_summary_on_rank0(rank, seconds):
    """Rank 0's end-of-run summary (wandb sync in real runs) takes ``seconds`` longer; yields when it ended."""
    from acemath_mcore.training.logging import MetricsLogger

    original_finish, finished_at = MetricsLogger.finish, []

    def finish_slowly(self, *args, **kwargs):
        original_finish(self, *args, **kwargs)
        if rank == 0:
            time.sleep(seconds)
            finished_at.append(time.monotonic())

    MetricsLogger.finish = finish_slowly
    try:
        yield finished_at
    finally:
        MetricsLogger.finish = original_finish


@contextlib.contextmanager
def signalled_while_the_data_is_built(rank):
    """Rank 0 receives SIGUSR1 while its training set is being built, before the ranks meet."""
    from acemath_mcore.data import datasets

    original_build = datasets.build_sft_dataset

    def signal_then_build(*args, **kwargs):
        if rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original_build(*args, **kwargs)

    datasets.build_sft_dataset = signal_then_build
    try:
        yield
    finally:
        datasets.build_sft_dataset = original_build


@contextlib.contextmanager
def slow_background_writer(seconds):
    """A background save's writer process (forked by megatron from the rank) sleeps ``seconds`` before writing,
    so that training certainly goes on while it writes. Yields the rank's children alive after each step."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from acemath_mcore.training.engine import Engine

    # The writer's entry point: write_preloaded_data_multiproc in megatron-core 0.16, ..._multithread in 0.19.
    name = next(name for name in ("write_preloaded_data_multiproc", "write_preloaded_data_multithread")
                if hasattr(FileSystemWriterAsync, name))
    original_write, original_step = getattr(FileSystemWriterAsync, name), Engine.train_step
    rank_pid, children = os.getpid(), {}

    def write_slowly(*args, **kwargs):
        if os.getpid() != rank_pid:
            time.sleep(seconds)
        return original_write(*args, **kwargs)

    def step_then_look(self, *args, **kwargs):
        metrics = original_step(self, *args, **kwargs)
        children[self.step] = sorted(child.name for child in multiprocessing.active_children())
        return metrics

    setattr(FileSystemWriterAsync, name, staticmethod(write_slowly))
    Engine.train_step = step_then_look
    try:
        yield children
    finally:
        setattr(FileSystemWriterAsync, name, staticmethod(original_write))
        Engine.train_step = original_step


def _default_signal_handlers():
    """A preempted run returns with SIGTERM and SIGUSR1 ignored; this worker goes on training."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


class _WarningRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _trainer_runs(rank, world_size, prefix, root):
    import torch
    from megatron.core import parallel_state

    from acemath_mcore.training.sft import SFTTask, sft_training_data, train_sft

    results = {}
    uninterrupted = train_sft(_config(prefix, f"{root}/a", f"{root}/runs", STEPS))
    results["uninterrupted"] = _losses(uninterrupted)
    results["handlers_after_finished_run"] = [signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)]
    results["uninterrupted_lr"] = {row["step"]: row["lr"] for row in uninterrupted["history"]}
    results["uninterrupted_tokens"] = {row["step"]: row["tokens_per_s"] * row["step_s"]
                                       for row in uninterrupted["history"]}
    if rank == 0:  # the one that logs
        results["final_tokens_per_s"] = (uninterrupted["final_metrics"]["tokens_per_s"],
                                         uninterrupted["history"][-1]["tokens_per_s"])
    # This rank's micro-batches of every step, re-read: their documents' tokens without the packing's padding.
    loader = sft_training_data(_config(prefix, None, f"{root}/runs", STEPS)).make_loader(
        0, parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    results["rank_tokens"] = [sum(next(loader)["num_tokens"] for _ in range(2)) for _ in range(STEPS)]
    release_model_parallel()
    results["interval_history"] = train_sft(_config(prefix, f"{root}/interval", f"{root}/profiled_runs", STEPS,
                                                     extra=["logging.log_interval=6", "checkpoint.save_interval=8",
                                                            "profile.tool=torch", "profile.start_step=2",
                                                            "profile.num_steps=2", "profile.ranks=[1]"]))["history"]
    profiles = Path(f"{root}/profiled_runs/tiny-sft/profile")
    torch.distributed.barrier()
    results["profile_files"] = sorted(path.name for path in profiles.iterdir())
    if rank == 1:
        events = json.loads(gzip.decompress((profiles / "rank1-steps2-3.json.gz").read_bytes()))["traceEvents"]
        results["profiled_phases"] = collections.Counter(event.get("name") for event in events)
    release_model_parallel()
    with preempted_after(3, rank), slow_summary_on_rank0(rank, 1.5) as summary_done_at:
        preempted = train_sft(_config(prefix, f"{root}/b", f"{root}/runs", STEPS))
    results["preempted"] = {"exit_code": preempted["exit_code"], "steps": preempted["steps"],
                            "checkpoint": preempted["checkpoint"], "returned_at": time.monotonic(),
                            "summary_done_at": summary_done_at,
                            "handlers": [signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)]}
    _default_signal_handlers()
    release_model_parallel()
    # SIGTERM as a scheduler's preemption sends it: to every process of the step, the loader's workers included.
    with preempted_after(2, rank, signal.SIGTERM, children_too=True) as signalled:
        with_workers = train_sft(_config(prefix, f"{root}/workers", f"{root}/runs", STEPS,
                                         extra=["data.num_workers=2"]))
    results["preempted_with_loader_workers"] = {key: with_workers[key] for key in ("exit_code", "steps", "checkpoint")}
    results["children"] = {"signalled": sorted(signalled),
                           "left": sorted(child.name for child in multiprocessing.active_children())}
    _default_signal_handlers()
    release_model_parallel()
    with preempted_after(STEPS, rank):  # the stop comes with the last step
        finished = train_sft(_config(prefix, f"{root}/last", f"{root}/runs", STEPS))
    results["stopped_in_the_last_step"] = {**{key: finished[key] for key in ("exit_code", "steps", "checkpoint")},
                                           "handlers": [signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)]}
    _default_signal_handlers()
    release_model_parallel()
    # Background saves every 2 steps, the step-2 one still being written when SIGTERM reaches every process
    # after step 3 (so the writer too). Then the step-2 checkpoint alone is resumed.
    background = _config(prefix, f"{root}/background", f"{root}/runs", STEPS,
                         extra=["checkpoint.async_save=true", "checkpoint.save_interval=2"])
    with slow_background_writer(3.0) as children_after_step:
        with preempted_after(3, rank, signal.SIGTERM, children_too=True) as signalled:
            summary = train_sft(background)
    results["background"] = {**{key: summary[key] for key in ("exit_code", "steps", "checkpoint")},
                             "children_after_step": children_after_step, "signalled": signalled,
                             "saved": sorted(path.name for path in Path(f"{root}/background").iterdir()),
                             "prompt_format": json.loads(Path(f"{root}/background/prompt_format.json").read_text())}
    _default_signal_handlers()
    release_model_parallel()
    if rank == 0:
        shutil.copytree(f"{root}/background", f"{root}/background_step2")
        shutil.rmtree(f"{root}/background_step2/iter_0000003")
        Path(f"{root}/background_step2/latest").write_text("iter_0000002\n")
    torch.distributed.barrier()
    with preempted_after(4, rank):
        results["background_resumed"] = _losses(train_sft(dataclasses.replace(
            background, checkpoint=dataclasses.replace(background.checkpoint, save_dir=f"{root}/background_step2"))))
    _default_signal_handlers()
    release_model_parallel()
    with signalled_while_the_data_is_built(rank):
        early = train_sft(_config(prefix, f"{root}/early", f"{root}/runs", STEPS))
    results["preempted_during_setup"] = {key: early[key] for key in ("exit_code", "steps", "checkpoint")}
    _default_signal_handlers()
    release_model_parallel()
    if rank == 0:
        shutil.copytree(f"{root}/b", f"{root}/d")
    torch.distributed.barrier()
    resumed = train_sft(_config(prefix, f"{root}/b", f"{root}/runs", STEPS))
    results["resumed"] = _losses(resumed)
    results["resumed_losses"] = (resumed["first_loss"], resumed["final_loss"])
    release_model_parallel()
    # Two more steps at another peak lr (and data seed): the configured schedule applies from the checkpoint's step
    # count, and both changes are reported.
    warnings = _WarningRecorder()
    logging.getLogger("acemath_mcore").addHandler(warnings)
    extended = train_sft(_config(prefix, f"{root}/b", f"{root}/runs", STEPS + 2,
                                 extra=["optim.lr=1e-3", "seed=99", f"checkpoint.init_from={root}/elsewhere"]))
    logging.getLogger("acemath_mcore").removeHandler(warnings)
    results["extended_lr"] = {row["step"]: row["lr"] for row in extended["history"]}
    results["extended_warnings"] = warnings.messages
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(extended["checkpoint"])["train_state"]["data"]
    results["saved_data_order"] = (saved, sft_training_data(_config(prefix, None, f"{root}/runs", STEPS)).num_samples)
    release_model_parallel()
    try:
        train_sft(_config(prefix, f"{root}/b", f"{root}/runs", STEPS + 4, extra=["global_batch_size=4"]))
        results["batch_change_error"] = None
    except ValueError as error:
        results["batch_change_error"] = str(error)
    release_model_parallel()
    # A step of about 40 conversations (one epoch): the trainer sizes the packed rows per step from the data.
    in_conversations = _config(prefix, f"{root}/conversations", f"{root}/runs", 0,
                               extra=["global_batch_size=null", "global_batch_conversations=40"])
    data = sft_training_data(in_conversations)
    summary = train_sft(in_conversations)
    release_model_parallel()
    # Resumed with another conversation count (which would round to other rows): the checkpoint's rows stay.
    resumed = train_sft(_config(prefix, f"{root}/conversations", f"{root}/runs", summary["total_steps"] + 1,
                                extra=["global_batch_size=null", "global_batch_conversations=60"]))
    results["conversation_batch"] = {"documents": data.documents, "rows": data.num_samples,
                                     "steps": summary["total_steps"], "consumed": summary["consumed_samples"],
                                     "config_after": in_conversations.global_batch_size,
                                     "resumed": (resumed["steps"], resumed["consumed_samples"])}
    release_model_parallel()

    class CorruptedAtStepTwo(SFTTask):
        """``corrupt(loss_sum, report)`` replaces the loss of step 2's micro-batches (calls 3 and 4: two per rank)."""

        def __init__(self, corrupt):
            self.corrupt, self.calls = corrupt, 0

        def loss(self, batch, output):
            loss_sum, count, report = super().loss(batch, output)
            self.calls += 1
            if self.calls in (3, 4):
                loss_sum = self.corrupt(loss_sum, report)
            return loss_sum, count, report

    def nan_loss(loss_sum, report):
        report["lm loss"][0] = float("nan")
        return loss_sum * float("nan")

    def infinite_gradient(loss_sum, report):
        """A finite loss whose gradient is infinite (d sqrt(x)/dx at 0): bf16 has no loss scaler to see it."""
        return loss_sum + torch.sqrt(loss_sum - loss_sum.detach())

    from acemath_mcore.training.trainer import run

    # Logged every 5 steps: step 1, the only one before the failure, must still reach metrics.jsonl.
    config = _config(prefix, None, f"{root}/nan_runs", 4, extra=["logging.log_interval=5"])
    try:
        run(config, CorruptedAtStepTwo(nan_loss), sft_training_data(config))
        results["nan_error"] = None
    except FloatingPointError as error:
        results["nan_error"] = str(error)
    if rank == 0:
        lines = (Path(root) / "nan_runs" / config.name / "metrics.jsonl").read_text().splitlines()
        results["nan_logged"] = [json.loads(line) for line in lines]
    release_model_parallel()

    for policy in ("stop", "skip"):
        config = _config(prefix, None, f"{root}/runs", 3, extra=[f"nan_policy={policy}"])
        try:
            summary = run(config, CorruptedAtStepTwo(infinite_gradient), sft_training_data(config))
            results[f"inf_grad_{policy}"] = summary["history"]
        except FloatingPointError as error:
            results[f"inf_grad_{policy}"] = str(error)
        release_model_parallel()
    return results


def _resume_at_tp2(rank, world_size, prefix, root):
    """A fresh job (as after a Slurm requeue with a new layout) resuming the step-3 checkpoint at TP=2 for three
    steps (then preempted again)."""
    from acemath_mcore.training.sft import train_sft

    with preempted_after(6, rank):
        return _losses(train_sft(_config(prefix, f"{root}/d", f"{root}/runs", STEPS, tp=2)))


@pytest.fixture(scope="module")
def trainer_results(sft_prefix, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_runs")
    results, peer_results = run_workers(_trainer_runs, 2, sft_prefix, str(root))
    results["peer_preempted"] = peer_results["preempted"]
    results["peer_stopped_in_the_last_step"] = peer_results["stopped_in_the_last_step"]
    results["peer_rank_tokens"] = peer_results["rank_tokens"]
    results["peer_profiled_phases"] = peer_results["profiled_phases"]
    results["resumed_tp2"] = run_workers(_resume_at_tp2, 2, sft_prefix, str(root))[0]
    return results


def test_tiny_model_learns_real_data(trainer_results):
    losses = trainer_results["uninterrupted"]
    assert losses[1] > 5.5, "a fresh model starts near ln(512) = 6.24"
    assert losses[STEPS] < 0.5 * losses[1], f"loss fell only from {losses[1]:.3f} to {losses[STEPS]:.3f}"


def test_preemption_checkpoints_and_exits_with_distinct_code(trainer_results):
    from acemath_mcore.training.trainer import EXIT_PREEMPTED

    preempted = trainer_results["preempted"]
    assert preempted["exit_code"] == EXIT_PREEMPTED
    assert preempted["steps"] == 3
    assert preempted["checkpoint"].endswith("iter_0000003")


def test_preemption_by_sigterm_to_every_process_with_loader_workers(trainer_results):
    """A scheduler's SIGTERM reaches the loader's worker processes and megatron's checkpoint-queue process too:
    they must leave it to the trainer, which checkpoints and then shuts the workers down (before, the workers died
    and the step failed: "DataLoader worker exited unexpectedly"; the queue process died and the checkpoint failed
    with BrokenPipeError)."""
    preempted = trainer_results["preempted_with_loader_workers"]
    assert (preempted["exit_code"], preempted["steps"]) == (75, 2)
    assert preempted["checkpoint"].endswith("iter_0000002")
    signalled, left = trainer_results["children"]["signalled"], trainer_results["children"]["left"]
    queue_process = [name for name in signalled if name.startswith("SyncManager")]  # started at the first save
    assert len(signalled) == len(queue_process) + 2, signalled  # and rank 0's two loader workers
    assert queue_process and left == queue_process  # survived the signal; the workers were shut down


QUEUE_PROCESS_SCRIPT = """
import multiprocessing, os, signal, sys, time
import numpy  # noqa: F401  # as launch/train_*.py: the spawned manager imports this file, OpenBLAS starts threads
from acemath_mcore.training.checkpointing import _writer_queue_deaf_to_stop_signals
from megatron.core.dist_checkpointing.strategies import filesystem_async

if __name__ == "__main__":
    _writer_queue_deaf_to_stop_signals()
    manager = next(child for child in multiprocessing.active_children() if child.name.startswith("SyncManager"))
    time.sleep(1.0)  # its imports are done and their threads started
    tasks = os.listdir(f"/proc/{manager.pid}/task")
    masks = [int(next(line for line in open(f"/proc/{manager.pid}/task/{task}/status")
                      if line.startswith("SigBlk")).split()[1], 16) for task in tasks]
    stop_bits = sum(1 << (number - 1) for number in (signal.SIGTERM, signal.SIGUSR1))
    os.kill(manager.pid, signal.SIGTERM)
    os.kill(manager.pid, signal.SIGUSR1)
    time.sleep(0.5)
    filesystem_async._results_queue.put("served")
    print(len(tasks), all(mask & stop_bits == stop_bits for mask in masks), manager.is_alive(),
          filesystem_async._results_queue.get())
"""


def test_checkpoint_queue_process_survives_stop_signals_with_threads_of_its_own(tmp_path):
    """On the cluster (OMP_NUM_THREADS=8) the manager's import of the launch script starts OpenBLAS threads
    before a mask set in its main thread could cover them, and a SIGTERM to every process of the step killed it:
    the preemption checkpoint failed and the job exited 143, not 75. Every thread of it must block the signals."""
    script = tmp_path / "launch_like.py"
    script.write_text(QUEUE_PROCESS_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "4"})
    assert done.returncode == 0, done.stderr[-3000:]
    threads, all_blocked, alive, served = done.stdout.split()
    assert int(threads) > 1 and (all_blocked, alive, served) == ("True", "True", "served")


def test_a_stop_asked_for_in_the_last_step_ends_the_run_as_finished(trainer_results):
    """Exit 75 there meant a requeue, a wait for Slurm's requeue hold and a restart that found nothing to do."""
    finished = trainer_results["stopped_in_the_last_step"]
    assert (finished["exit_code"], finished["steps"]) == (0, STEPS)
    assert finished["checkpoint"].endswith(f"iter_{STEPS:07d}")
    # A second stop signal cannot turn the 0 into 143, on the rank that got the first one or on the other.
    assert finished["handlers"] == trainer_results["peer_stopped_in_the_last_step"]["handlers"] == [signal.SIG_IGN] * 2


def test_background_saves_let_training_go_on_and_hold_their_own_step(trainer_results):
    """checkpoint.async_save: step 3 ran while the step-2 checkpoint was being written by its own process; the
    preemption after step 3 (SIGTERM to every process, the writer included) waited for it, then saved step 3.
    Resumed alone, the step-2 checkpoint reproduces steps 3 and 4 exactly: it holds step 2's state, not what
    training changed while it was written."""
    background = trainer_results["background"]
    assert (background["exit_code"], background["steps"]) == (75, 3)
    assert background["checkpoint"].endswith("iter_0000003")
    assert background["saved"] == ["iter_0000002", "iter_0000003", "latest", "model_arch.json", "prompt_format.json"]
    writers = [name for name in background["children_after_step"][3] if name.startswith("ForkProcess")]
    assert len(writers) == 1, background["children_after_step"]  # alive after step 3: still writing step 2
    assert writers[0] in background["signalled"]
    assert writers[0] not in background["children_after_step"][2]
    uninterrupted, resumed = trainer_results["uninterrupted"], trainer_results["background_resumed"]
    assert resumed == {3: uninterrupted[3], 4: uninterrupted[4]}


def test_a_signal_while_the_data_is_built_stops_the_run_before_training(trainer_results):
    """The handler is in place before the data is read and packed (minutes for a large blend): the run exits 75
    without a step, leaving the latest checkpoint as it was (before, the default action killed the process)."""
    assert trainer_results["preempted_during_setup"] == {"exit_code": 75, "steps": 0, "checkpoint": None}


def test_preempted_run_returns_ignoring_the_kill_of_its_peers(trainer_results):
    """srun --kill-on-bad-exit SIGTERMs the ranks still exiting once one has exited 75: they must exit 75 too."""
    assert trainer_results["preempted"]["handlers"] == [signal.SIG_IGN, signal.SIG_IGN]
    assert trainer_results["handlers_after_finished_run"] == [signal.SIG_DFL, signal.SIG_DFL]


def test_preempted_ranks_return_only_after_rank0_summary(trainer_results):
    """The first rank to exit 75 makes srun stop the others: none may leave while rank 0 still writes its summary."""
    (summary_done_at,) = trainer_results["preempted"]["summary_done_at"]
    assert trainer_results["peer_preempted"]["returned_at"] >= summary_done_at
    assert trainer_results["peer_preempted"]["exit_code"] == 75


def test_resume_reproduces_uninterrupted_losses_exactly(trainer_results):
    uninterrupted, resumed = trainer_results["uninterrupted"], trainer_results["resumed"]
    assert sorted(resumed) == list(range(4, STEPS + 1))
    for step in resumed:
        assert resumed[step] == uninterrupted[step], f"step {step}: {resumed[step]} != {uninterrupted[step]}"


def test_resume_at_a_different_tensor_parallel_layout(trainer_results):
    uninterrupted, resumed = trainer_results["uninterrupted"], trainer_results["resumed_tp2"]
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-4)


# lr 1e-3: at the recipe's 2e-3 an 8-step cosine schedule spikes at its last step (loss 4.4 -> 7.9, grad norm
# 3 -> 8.7, with or without the distributed optimizer), which would make "it trains" a coin toss here.
# The paper-scale recipes' optimizer settings: distributed optimizer, gradient reduce and parameter gather overlapped.
DISTRIBUTED_OPTIMIZER = ["optim.use_distributed_optimizer=true", "optim.overlap_grad_reduce=true",
                         "optim.overlap_param_gather=true", "optim.lr=1e-3"]
DISTRIBUTED_STEPS = 8


def _distributed_optimizer_config(prefix, root, save_dir, tp=1, extra=()):
    return _config(prefix, save_dir, f"{root}/runs", DISTRIBUTED_STEPS, tp=tp, extra=[*DISTRIBUTED_OPTIMIZER, *extra])


def _distributed_optimizer_runs(rank, world_size, prefix, root):
    """DP=2 with the distributed optimizer: uninterrupted; then per optimizer checkpoint format, preempted after step
    3 (a copy of that checkpoint kept for the tests' other layouts) and resumed at the same layout, the
    fully_reshardable state through the fully parallel load (each rank reads half and they exchange)."""
    import torch

    from acemath_mcore.training.sft import train_sft

    results = {"uninterrupted": _losses(train_sft(_distributed_optimizer_config(prefix, root, f"{root}/a")))}
    for optimizer_format in OPTIMIZER_FORMATS:
        config = _distributed_optimizer_config(prefix, root, f"{root}/{optimizer_format}",
                                               extra=[f"checkpoint.optimizer_format={optimizer_format}"])
        release_model_parallel()
        with preempted_after(3, rank):
            train_sft(config)
        release_model_parallel()
        if rank == 0:
            shutil.copytree(f"{root}/{optimizer_format}", f"{root}/{optimizer_format}_step3")
        torch.distributed.barrier()
        parallel_load = optimizer_format == "fully_reshardable"
        results[optimizer_format] = _losses(train_sft(dataclasses.replace(
            config, checkpoint=dataclasses.replace(config.checkpoint, fully_parallel_load=parallel_load))))
    return results


@pytest.fixture(scope="module")
def distributed_optimizer_runs(sft_prefix, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_optimizer")
    return root, run_workers(_distributed_optimizer_runs, 2, sft_prefix, str(root))[0]


@pytest.mark.parametrize("optimizer_format", OPTIMIZER_FORMATS)
def test_distributed_optimizer_resumes_exactly(distributed_optimizer_runs, optimizer_format):
    """Without TE/apex megatron's distributed optimizer runs torch's Adam, whose state megatron cannot reload
    unaided (training/checkpointing._reloadable_torch_adam_state): this is the path CPU runs take."""
    runs = distributed_optimizer_runs[1]
    uninterrupted, resumed = runs["uninterrupted"], runs[optimizer_format]
    assert uninterrupted[DISTRIBUTED_STEPS] < uninterrupted[1]
    assert sorted(resumed) == list(range(4, DISTRIBUTED_STEPS + 1))
    for step in resumed:
        assert resumed[step] == uninterrupted[step], f"step {step}: {resumed[step]} != {uninterrupted[step]}"


def _resume(rank, world_size, prefix, root, save_dir, other_format, tp, stop_after):
    """A run that saves in ``other_format`` resuming ``save_dir`` at TP=``tp``: its losses, or the error that
    stopped it."""
    from acemath_mcore.training.sft import train_sft

    config = _distributed_optimizer_config(prefix, root, save_dir, tp=tp,
                                           extra=[f"checkpoint.optimizer_format={other_format}"])
    try:
        with preempted_after(stop_after, rank):
            return _losses(train_sft(config))
    except ValueError as error:
        return str(error)


def _resume_in_small_buckets(rank, world_size, *args):
    """``_resume`` with gradient buckets of 20k elements instead of megatron's 40M (one bucket for this model)."""
    import functools

    from acemath_mcore.training import engine

    engine.DistributedDataParallelConfig = functools.partial(engine.DistributedDataParallelConfig, bucket_size=20_000)
    return _resume(rank, world_size, *args)


def _copy_step3(root: Path, optimizer_format: str, name: str) -> Path:
    """A copy of the save dir whose latest is the step-3 checkpoint of ``optimizer_format``."""
    save_dir = root / name
    shutil.copytree(root / f"{optimizer_format}_step3", save_dir)
    return save_dir


def _resume_copy(prefix, root: Path, optimizer_format: str, ranks: int, tp: int, resume=_resume,
                 layout_record: bool = True) -> list:
    """Every rank's result of resuming a copy of the step-3 checkpoint of ``optimizer_format`` at TP=``tp`` over
    ``ranks`` ranks, stopped after step 5, by a run that saves in the other format. Without ``layout_record`` the
    copy lacks the optimizer_layout.json that the config checks read (as checkpoints saved before it existed)."""
    save_dir = _copy_step3(root, optimizer_format, f"{optimizer_format}_tp{tp}_ranks{ranks}_{resume.__name__}"
                           + ("" if layout_record else "_unrecorded"))
    if not layout_record:
        (save_dir / "iter_0000003" / "optimizer_layout.json").unlink()
    other_format = next(name for name in OPTIMIZER_FORMATS if name != optimizer_format)
    return run_workers(resume, ranks, prefix, str(root), str(save_dir), other_format, tp, 5)


def test_fully_reshardable_optimizer_state_resumes_at_another_tensor_parallel_size(sft_prefix,
                                                                                   distributed_optimizer_runs):
    """The DP=2 optimizer shards re-gathered for TP=2 x DP=1."""
    root, runs = distributed_optimizer_runs
    resumed = _resume_copy(sft_prefix, root, "fully_reshardable", ranks=2, tp=2)[0]
    assert sorted(resumed) == [4, 5]
    for step in resumed:
        assert resumed[step] == pytest.approx(runs["uninterrupted"][step], abs=1e-4)


def test_dp_reshardable_optimizer_state_resumes_at_another_data_parallel_size_only(sft_prefix,
                                                                                   distributed_optimizer_runs):
    """Each rank saved only its own slice of the optimizer's buffers: one rank (DP=1) takes both slices back. That
    run saved its step 5 in the fully_reshardable format, which then resumes at TP=2 (the way out the refusals
    name)."""
    root, runs = distributed_optimizer_runs
    resumed = _resume_copy(sft_prefix, root, "dp_reshardable", ranks=1, tp=1)[0]
    assert sorted(resumed) == [4, 5]
    moved = run_workers(_resume, 2, sft_prefix, str(root), str(root / "dp_reshardable_tp1_ranks1__resume"),
                        "dp_reshardable", 2, 6)[0]
    assert sorted(moved) == [6]
    resumed.update(moved)
    for step in resumed:
        assert resumed[step] == pytest.approx(runs["uninterrupted"][step], abs=1e-4)


def _layout_refusal(checkpoint: Path) -> str:
    return (f"{checkpoint} holds its optimizer state in the dp_reshardable format, which resumes only at the layout "
            "that saved it: tensor_parallel 1, pipeline_parallel 1, virtual_pipeline 1 (this run: tensor_parallel 2, "
            "pipeline_parallel 1, virtual_pipeline 1); the number of data-parallel ranks may change. Resume at the "
            "saved layout, or resume it once as it was saved with checkpoint.optimizer_format=fully_reshardable, "
            "whose next checkpoint is free of both, or start a new stage from its weights with "
            f"checkpoint.init_from={checkpoint} (fresh optimizer)")


def test_dp_reshardable_optimizer_state_at_another_tensor_parallel_size_is_refused_by_the_config_checks(
        sft_prefix, distributed_optimizer_runs):
    """From the checkpoint's optimizer_layout.json, without megatron-core: --dry-run, Slurm preflight and the
    trainer's first check, before any process group or model exists."""
    from acemath_mcore.recipes.checks import config_problems

    save_dir = _copy_step3(distributed_optimizer_runs[0], "dp_reshardable", "dp_reshardable_config_check")
    config = _distributed_optimizer_config(sft_prefix, save_dir.parent, str(save_dir), tp=2)
    assert config_problems(config, "sft") == [f"parallel: {_layout_refusal(save_dir / 'iter_0000003')}"]
    unbound = _distributed_optimizer_config(sft_prefix, save_dir.parent, str(save_dir), tp=2,
                                            extra=["optim.use_distributed_optimizer=false",
                                                   "optim.overlap_param_gather=false"])
    assert config_problems(unbound, "sft") == []  # nothing of the distributed optimizer's is loaded then
    # The record also says the gradients were reduced in buckets (overlap_grad_reduce), which decides their shapes.
    step3 = save_dir / "iter_0000003"
    assert json.loads((step3 / "optimizer_layout.json").read_text())["layout"]["overlap_grad_reduce"] is True
    one_bucket = _distributed_optimizer_config(sft_prefix, save_dir.parent, str(save_dir), extra=[
        "optim.overlap_grad_reduce=false", "optim.overlap_param_gather=false"])
    assert config_problems(one_bucket, "sft") == [
        f"parallel: {step3} holds its optimizer state in the dp_reshardable format, stored per gradient bucket, and "
        "was saved with optim.overlap_grad_reduce=true (this run: false), which decides the buckets. Resume with "
        "optim.overlap_grad_reduce=true, or resume it once as it was saved with "
        "checkpoint.optimizer_format=fully_reshardable, whose next checkpoint is free of both, or start a new stage "
        f"from its weights with checkpoint.init_from={step3} (fresh optimizer)"]


def test_dp_reshardable_optimizer_state_at_another_tensor_parallel_size_is_refused_before_loading(
        sft_prefix, distributed_optimizer_runs):
    """A checkpoint without the record (or a library caller that skips the config checks): the loader refuses on
    every rank, from the layout saved in the checkpoint itself."""
    root = distributed_optimizer_runs[0]
    errors = _resume_copy(sft_prefix, root, "dp_reshardable", ranks=2, tp=2, layout_record=False)
    assert errors == [_layout_refusal(root / "dp_reshardable_tp2_ranks2__resume_unrecorded" / "iter_0000003")] * 2


def test_dp_reshardable_optimizer_state_in_other_buckets_is_refused_before_loading(sft_prefix,
                                                                                   distributed_optimizer_runs):
    root = distributed_optimizer_runs[0]
    errors = _resume_copy(sft_prefix, root, "dp_reshardable", ranks=2, tp=1, resume=_resume_in_small_buckets)
    step3 = root / "dp_reshardable_tp1_ranks2__resume_in_small_buckets" / "iter_0000003"
    for error in errors:
        assert error.startswith(f"{step3}: its dp_reshardable optimizer state does not fit this run's gradient "
                                "buckets (optimizer.distributed.dp_group_idx_0."), error
        saved, now = re.search(r"bucket_idx_0\.param: saved \[(\d+)\], this run \[(\d+)\]", error).groups()
        assert int(now) < int(saved), error  # the whole model's gradients, against a 20k-element bucket's
        assert "optim.overlap_grad_reduce" in error and f"checkpoint.init_from={step3}" in error


@pytest.mark.parametrize("optimizer_format", OPTIMIZER_FORMATS)
def test_fully_parallel_save_shares_the_writing_between_data_parallel_ranks(distributed_optimizer_runs,
                                                                            optimizer_format):
    """torch_dist names each file after the rank that wrote it (``__<rank>_<n>.distcp``). Without the fully parallel
    strategy data-parallel rank 0 alone writes the weights and, in the fully_reshardable format, all of the
    gathered optimizer state (measured: 13.1 MB against 0)."""
    root = distributed_optimizer_runs[0]
    written = [sum(path.stat().st_size for path in (root / f"{optimizer_format}_step3" / "iter_0000003").glob(
        f"__{rank}_*.distcp")) for rank in (0, 1)]
    assert min(written) > 0.4 * sum(written), written


def test_non_finite_loss_stops_before_the_update_naming_the_step(trainer_results):
    assert trainer_results["nan_error"] is not None
    assert "not finite at step 2: lm_loss" in trainer_results["nan_error"]
    logged = trainer_results["nan_logged"]  # log_interval=5: the step before the failure is written on the way out
    assert [(row["step"], row["interval_steps"]) for row in logged] == [(1, 1)] and math.isfinite(logged[0]["lm_loss"])


def test_non_finite_gradient_with_a_finite_loss_never_reaches_the_weights(trainer_results):
    assert "not finite at step 2: grad_norm (" in trainer_results["inf_grad_stop"]
    history = trainer_results["inf_grad_skip"]
    assert [row["skipped"] for row in history] == [0.0, 1.0, 0.0]
    assert not math.isfinite(history[1]["grad_norm"])
    # The skipped step left the weights alone: step 3 trains from finite weights.
    assert math.isfinite(history[2]["lm_loss"]) and math.isfinite(history[2]["grad_norm"])
    # ... and the schedule: step 3 applies the rate step 2 would have (megatron's rule: no update, no scheduler step).
    expected = [_megatron_lr(step, 2e-3, 2e-4, 2, 3) for step in (1, 2, 2)]
    assert [row["lr"] for row in history] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected[1] != _megatron_lr(3, 2e-3, 2e-4, 2, 3)


def _megatron_lr(step, peak, minimum, warmup, decay_steps):
    """The lr a 1-based step applies: megatron's schedule at num_steps = step - 1 (linear warmup from 0, cosine)."""
    n = step - 1
    if n <= warmup:
        return peak * n / warmup
    ratio = (n - warmup) / (decay_steps - warmup)
    return minimum + 0.5 * (math.cos(math.pi * ratio) + 1) * (peak - minimum)


def test_logged_lr_is_the_rate_each_step_applied(trainer_results):
    logged = trainer_results["uninterrupted_lr"]
    assert logged[1] == 0.0  # the first warmup step: tiny_sft warms up from 0 over 2 steps
    for step, lr in logged.items():
        assert lr == pytest.approx(_megatron_lr(step, 2e-3, 2e-4, 2, STEPS), rel=1e-9, abs=1e-12), step


def test_log_interval_lines_sum_up_the_steps_since_the_previous_line(trainer_results):
    """log_interval=6 and a checkpoint every 8 steps over 20: lines at 6, 8 (no line spans a checkpoint, so a resume
    replaces whole lines), 12, 16, 18 and the last step; each line's loss is the mean of its steps' losses in the
    run logged every step (same data and seed), its learning rate the last step's."""
    per_step, rates = trainer_results["uninterrupted"], trainer_results["uninterrupted_lr"]
    rows = trainer_results["interval_history"]
    assert [row["step"] for row in rows] == [6, 8, 12, 16, 18, STEPS]
    previous = 0
    for row in rows:
        steps = range(previous + 1, row["step"] + 1)
        assert row["interval_steps"] == len(steps)
        assert row["lm_loss"] == pytest.approx(sum(per_step[s] for s in steps) / len(steps), rel=1e-9)
        assert row["lr"] == rates[row["step"]]
        assert row["skipped"] == 0.0
        previous = row["step"]


def test_tokens_per_second_counts_documents_not_padding(trainer_results):
    """Two DP ranks, two packed micro-batches of 2 x 256 tokens each per rank and step: tokens/s x step time is the
    documents' tokens of both ranks' micro-batches, never the rows' full 1,024 per rank when they hold padding, and
    not rank 0's share times DP where the ranks' documents differ."""
    logged = trainer_results["uninterrupted_tokens"]
    documents, peer_documents = trainer_results["rank_tokens"], trainer_results["peer_rank_tokens"]
    for step, tokens in logged.items():
        assert tokens == pytest.approx(documents[step - 1] + peer_documents[step - 1], rel=1e-9), step
    assert all(0 < n <= 1024 for n in documents + peer_documents) and min(documents) < 1024
    assert documents != peer_documents, "the ranks' documents must differ for this test to tell sum from share x DP"
    summary_rate, last_line_rate = trainer_results["final_tokens_per_s"]
    assert summary_rate == last_line_rate


def test_profile_records_the_asked_steps_on_the_asked_ranks(trainer_results):
    """profile.tool=torch, steps 2-3, rank 1 only: one trace and one operator table, holding each of the engine's
    phases once per step (so neither step 1 nor step 4)."""
    from acemath_mcore.training.engine import STEP_PHASES

    assert trainer_results["profile_files"] == ["rank1-steps2-3.json.gz", "rank1-steps2-3.txt"]
    phases = trainer_results["peer_profiled_phases"]
    micro_batches = 2  # per rank and step: forward runs once per micro-batch
    assert {phase: phases[phase] for phase in STEP_PHASES} == {
        phase: 2 * (micro_batches if phase == "forward" else 1) for phase in STEP_PHASES}


def test_profiling_a_rank_the_job_does_not_have_is_reported(tmp_path, caplog):
    from acemath_mcore.recipes.config import ProfileConfig
    from acemath_mcore.training.profiling import StepProfiler

    with caplog.at_level(logging.INFO, logger="acemath_mcore"):
        StepProfiler(ProfileConfig(tool="torch", ranks=[0, 4]), rank=0, world_size=2, run_dir=tmp_path)
    assert [record.getMessage() for record in caplog.records] == [
        "profile.ranks=[0, 4]: this job's ranks are 0-1, so [4] profile(s) nothing",
        f"profile: steps 5-6 with torch on ranks [0, 4], into {tmp_path / 'profile'}"]


@pytest.mark.parametrize("run_steps, warned", [(range(1, 7), None), (range(6, 20), None), (range(1, 5), "1-4"),
                                               (range(7, 11), "7-10"), (range(11, 11), "(none left)")])
def test_a_profile_window_outside_the_run_is_reported(tmp_path, caplog, run_steps, warned):
    """profile.start_step beyond a short run (or before a resumed one) profiled nothing, silently."""
    from acemath_mcore.recipes.config import ProfileConfig
    from acemath_mcore.training.profiling import StepProfiler

    with caplog.at_level(logging.WARNING, logger="acemath_mcore"):
        StepProfiler(ProfileConfig(tool="torch"), rank=0, world_size=1, run_dir=tmp_path, run_steps=run_steps)
    assert caplog.messages == ([] if warned is None else [
        f"profile: steps 5-6 are outside this run's steps {warned}, so nothing is profiled (set profile.start_step)"])


def test_nsys_profiling_without_cuda_is_refused_before_training(tmp_path):
    from acemath_mcore.recipes.config import ProfileConfig
    from acemath_mcore.training.profiling import StepProfiler

    with pytest.raises(RuntimeError, match="profile.tool=nsys .* needs a CUDA device; use profile.tool=torch here"):
        StepProfiler(ProfileConfig(tool="nsys"), rank=0, world_size=2, run_dir=tmp_path)
    StepProfiler(ProfileConfig(tool="nsys", ranks=[1]), rank=0, world_size=2, run_dir=tmp_path)  # not profiled here


def test_interval_metrics_weight_rates_by_time_and_keep_peaks_and_counts():
    from acemath_mcore.training.logging import IntervalMetrics

    interval = IntervalMetrics()
    interval.add({"lm_loss": 2.0, "tokens_per_s": 100.0, "mfu": 0.2, "step_s": 1.0, "memory_gib": 5.0, "lr": 1e-3,
                  "skipped": 0.0, "consumed_samples": 8})
    interval.add({"lm_loss": 4.0, "tokens_per_s": 300.0, "mfu": 0.6, "step_s": 3.0, "memory_gib": 7.0, "lr": 2e-3,
                  "skipped": 1.0, "consumed_samples": 16, "valid_lm_loss": 3.5})
    record = interval.reduce()
    assert record == pytest.approx({"lm_loss": 3.0, "tokens_per_s": 250.0, "mfu": 0.5, "step_s": 2.0,
                                    "memory_gib": 7.0, "lr": 2e-3, "skipped": 1.0, "consumed_samples": 16,
                                    "valid_lm_loss": 3.5, "interval_steps": 2}, rel=1e-12)
    single = {"lm_loss": 1.25, "step_s": 0.5}
    interval.add(single)
    assert interval.reduce() == {**single, "interval_steps": 1} and interval.steps == []
    # A step skipped for a NaN loss / infinite gradient is counted, not averaged into the line.
    for loss, grad_norm, skipped in ((2.0, 1.0, 0.0), (math.nan, math.inf, 1.0), (4.0, 3.0, 0.0)):
        interval.add({"lm_loss": loss, "grad_norm": grad_norm, "skipped": skipped, "step_s": 1.0})
    assert interval.reduce() == {"lm_loss": 3.0, "grad_norm": 2.0, "skipped": 1.0, "step_s": 1.0,
                                 "interval_steps": 3}
    interval.add({"lm_loss": math.nan, "step_s": 1.0})
    interval.add({"lm_loss": math.nan, "step_s": 1.0})
    assert math.isnan(interval.reduce()["lm_loss"])  # no finite value: the line shows NaN


def test_resume_applies_the_configured_schedule(trainer_results):
    extended = trainer_results["extended_lr"]
    assert sorted(extended) == [STEPS + 1, STEPS + 2]
    for step, lr in extended.items():
        assert lr == pytest.approx(_megatron_lr(step, 1e-3, 2e-4, 2, STEPS + 2), rel=1e-9), step
    warnings = "\n".join(trainer_results["extended_warnings"])
    assert "max_lr 0.002 -> 0.001" in warnings and f"lr_decay_steps {STEPS} -> {STEPS + 2}" in warnings
    assert "data settings that differ" in warnings and "seed 1234 -> 99" in warnings
    assert "num_samples" not in warnings  # the same data
    assert "init_from=" in warnings and "/elsewhere is not used: resuming" in warnings
    assert "a stage that started from random weights" in warnings
    saved, num_samples = trainer_results["saved_data_order"]
    assert saved["num_samples"] == num_samples and saved["seed"] == 99  # a prefix rebuilt under its name is seen


def test_fractional_epochs_round_to_the_nearest_step_count_first():
    from acemath_mcore.recipes import apply_overrides, get_recipe
    from acemath_mcore.training.trainer import total_steps

    for epochs, steps in (("0.29", 29), ("2.3", 230), ("0.57", 57), ("0.005", 1), ("0.999", 99)):
        config = apply_overrides(get_recipe("tiny_sft"), [f"epochs={epochs}", "global_batch_size=10"])
        assert total_steps(config, num_samples=1000) == steps, epochs


def test_resume_reports_the_stage_first_loss_and_refuses_another_batch_size(trainer_results):
    first, final = trainer_results["resumed_losses"]
    assert first == trainer_results["uninterrupted"][1] and final == trainer_results["uninterrupted"][STEPS]
    error = trainer_results["batch_change_error"]
    assert error is not None and "global_batch_size=8, this run has 4" in error


def test_a_step_of_about_n_conversations_is_the_nearest_whole_micro_batches_of_packed_rows(trainer_results):
    run = trainer_results["conversation_batch"]
    per_row = run["documents"] / run["rows"]
    assert per_row >= 2  # several conversations per packed row, or the sizing would be trivial
    unit = 2 * 2  # micro_batch_size x DP
    batch = min(range(unit, run["rows"] + 1, unit), key=lambda rows: abs(rows * per_row - 40))
    assert run["steps"] == run["rows"] // batch and run["consumed"] == run["steps"] * batch
    assert run["config_after"] is None  # the caller's config is left as given
    assert run["resumed"] == (run["steps"] + 1, (run["steps"] + 1) * batch)  # 60 would have rounded to more rows
    assert min(range(unit, run["rows"] + 1, unit), key=lambda rows: abs(rows * per_row - 60)) != batch


def test_retention_keeps_the_new_checkpoint_and_leaves_an_earlier_runs_later_ones(tmp_path, caplog):
    from acemath_mcore.training.checkpointing import _remove_old

    for step in (1, 2, 3, 4, 6):
        (tmp_path / f"iter_{step:07d}").mkdir()
    for step in (2, 5):  # saves cut short (e.g. preemption checkpoints killed at KillWait), with shards inside
        (tmp_path / f"iter_{step:07d}.partial" / "shard").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="acemath_mcore"):
        _remove_old(tmp_path, keep_last=2, step=3)  # a fresh run (resume=false) just published step 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000003", "iter_0000004",
                                                         "iter_0000006"]
    assert "iter_0000004, iter_0000006" in caplog.text and "left in place" in caplog.text


def _publish_over_a_published_step(rank, world_size, save_dir):
    """Publish a new step-4 save where an earlier run (resume=false) left its own step 4, named by 'latest'.
    Returns each directory deleted and what 'latest' named at that moment, then the final state."""
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training import checkpointing
    from acemath_mcore.training.checkpoint_dirs import find_latest

    init_distributed(ParallelConfig())
    save_dir = Path(save_dir)
    for name, content in (("iter_0000004", "old"), ("iter_0000004.partial", "new")):
        (save_dir / name).mkdir()
        (save_dir / name / "metadata.json").write_text(content)
    (save_dir / "latest").write_text("iter_0000004\n")
    deletions, rmtree = [], shutil.rmtree

    def recording_rmtree(path, *args, **kwargs):
        deletions.append((Path(path).name, (save_dir / "latest").read_text().strip()))
        rmtree(path, *args, **kwargs)

    checkpointing.shutil.rmtree = recording_rmtree
    save = checkpointing._Save(save_dir, 4, {}, "dp_reshardable", False, keep_last=2, request=None, started=0.0)
    save.publish()
    latest = find_latest(save_dir)
    return deletions, latest.name, (latest / "metadata.json").read_text(), sorted(p.name for p in save_dir.iterdir())


def test_a_step_published_again_never_deletes_what_latest_names(tmp_path):
    """A run with resume=false in an old save dir reaching a step the old run published: the old directory used to
    be deleted while 'latest' still named it (a crash during a long delete left the marker naming nothing)."""
    deletions, latest, content, left = run_workers(_publish_over_a_published_step, 1, str(tmp_path))[0]
    assert (latest, content) == ("iter_0000004", "new")
    assert deletions and all(name != named for name, named in deletions), deletions
    assert left == ["iter_0000004", "latest"]


def test_a_run_sets_aside_the_metric_lines_it_redoes(tmp_path):
    """A failed run's last line (step 7, covering step 7 alone) beside the resumed run's line at 8 (steps 7-8)
    counted step 7 twice; a run started over (resume=false) kept the old run's later lines."""
    from acemath_mcore.training.logging import MetricsLogger

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old_lines = [json.dumps({"step": step, "lm_loss": 1.0}) + "\n" for step in (2, 4, 6, 7)]
    (run_dir / "metrics.jsonl").write_text("".join(old_lines) + '{"step": 8, "lm_lo')  # torn by the crash
    MetricsLogger("run", str(tmp_path), {}, total_steps=10, rank=0, start_step=6).log_step(8, {"lm_loss": 0.5})
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    assert (run_dir / "metrics.superseded.jsonl").read_text() == old_lines[3] + '{"step": 8, "lm_lo\n'
    MetricsLogger("run", str(tmp_path), {}, total_steps=10, rank=0, start_step=0)  # resume=false: all set aside
    assert (run_dir / "metrics.jsonl").read_text() == ""
    assert len((run_dir / "metrics.superseded.jsonl").read_text().splitlines()) == 6


def test_config_errors_before_any_set_up():
    from acemath_mcore.recipes import apply_overrides, get_recipe
    from acemath_mcore.training.trainer import check_batch_arithmetic

    config = apply_overrides(get_recipe("tiny_sft"), ["parallel.pipeline_parallel=4",
                                                      "parallel.virtual_pipeline_parallel=2",
                                                      "global_batch_size=12", "micro_batch_size=1"])
    with pytest.raises(ValueError, match=r"interleaved pipeline schedule needs .* = 6\) to be a multiple of "
                                         r"pipeline_parallel 4"):
        check_batch_arithmetic(config, dp_size=2)
    assert check_batch_arithmetic(config, dp_size=3) == 4


def test_unfinished_saves_are_ignored_with_a_warning(tmp_path, caplog):
    from acemath_mcore.training.checkpoint_dirs import find_latest

    complete = tmp_path / "iter_0000003"
    complete.mkdir()
    (complete / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000006.partial").mkdir()
    (tmp_path / "latest").write_text("iter_0000003\n")
    with caplog.at_level(logging.WARNING, logger="acemath_mcore"):
        assert find_latest(tmp_path) == complete
        assert find_latest(tmp_path) == complete  # the trainer looks again after the config checks: one warning
    assert "ignoring incomplete checkpoint" in caplog.text and "iter_0000006.partial" in caplog.text
    assert caplog.text.count("ignoring incomplete checkpoint") == 1



@pytest.mark.parametrize("marker", ["iter_0000006\n", "", "iter_0000009\n"],
                         ids=["unfinished", "empty", "removed"])
def test_a_latest_marker_naming_no_checkpoint_is_an_error_not_a_fresh_start(tmp_path, marker):
    from acemath_mcore.training.checkpoint_dirs import find_latest

    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "iter_0000003" / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000006.partial").mkdir()
    (tmp_path / "latest").write_text(marker)
    with pytest.raises(FileNotFoundError, match=r"latest names '.*', which is not a complete checkpoint; published "
                                                r"checkpoints there: iter_0000003\. Write the name"):
        find_latest(tmp_path)


def test_missing_latest_marker_is_reported(tmp_path, caplog):
    from acemath_mcore.training.checkpoint_dirs import find_latest

    (tmp_path / "iter_0000003").mkdir()
    with caplog.at_level(logging.WARNING, logger="acemath_mcore"):
        assert find_latest(tmp_path) is None
    assert "no 'latest' marker" in caplog.text


def test_batch_arithmetic_errors_name_the_numbers():
    from acemath_mcore.recipes import get_recipe
    from acemath_mcore.training.trainer import check_batch_arithmetic, total_steps

    config = get_recipe("tiny_sft")
    config.global_batch_size, config.micro_batch_size = 12, 4
    with pytest.raises(ValueError, match=r"global_batch_size 12 is not divisible by micro_batch_size 4 x "
                                         r"data-parallel size 2 = 8"):
        check_batch_arithmetic(config, dp_size=2)
    assert check_batch_arithmetic(config, dp_size=3) == 1
    with pytest.raises(ValueError, match="5 samples, fewer than one global batch"):
        total_steps(config, 5)
    config.epochs = 2.0
    assert total_steps(config, 60) == 10


def test_samples_an_epoch_leaves_out_are_reported(caplog):
    from acemath_mcore.recipes import get_recipe
    from acemath_mcore.training.trainer import total_steps

    config = get_recipe("tiny_sft")
    config.global_batch_size = 12
    with caplog.at_level(logging.WARNING, logger="acemath_mcore"):
        assert total_steps(config, 65) == 5
    assert "5 of the 65 samples do not fill a last global batch of 12" in caplog.text


def _validation_runs(rank, world_size, prefix, root):
    """DP=2, distributed optimizer with overlapped param gather: validation every 2 steps of 4, then the held-out
    loss recomputed by hand from the saved weights (model forward, masked token sum, all-reduce)."""
    import torch

    from acemath_mcore.models import resolve_arch
    from acemath_mcore.training import checkpointing
    from acemath_mcore.training.engine import Engine, packed_seq_params
    from acemath_mcore.training.sft import SFTTask, sft_training_data, train_sft

    config = _config(prefix, f"{root}/v", f"{root}/runs", 4,
                     extra=[*DISTRIBUTED_OPTIMIZER, f"data.valid_prefixes=[{prefix}]", "eval_interval=2"])
    history = train_sft(config)["history"]
    release_model_parallel()
    plain = _losses(train_sft(_config(prefix, f"{root}/p", f"{root}/runs", 4, extra=DISTRIBUTED_OPTIMIZER)))
    engine = Engine(resolve_arch(config.model), config.parallel, config.model_options, config.optim, train_steps=1)
    checkpointing.load_weights(f"{root}/v", engine.model)
    validation = sft_training_data(config, held_out=True)
    loader = validation.make_loader(0, torch.distributed.get_rank(), world_size)
    micro_batches = (config.global_batch_size // world_size // config.micro_batch_size
                     * (validation.num_samples // config.global_batch_size))
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(micro_batches):
            batch = next(loader)
            batch["packed_seq_params"] = packed_seq_params(batch, engine.packed_qkv_format)
            token_losses = SFTTask().forward(engine.model[0].eval(), batch).double()
            mask = batch["loss_mask"].double()
            total += torch.stack([(token_losses * mask).sum(), mask.sum()])
    torch.distributed.all_reduce(total)
    return {"history": history, "reference": (total[0] / total[1]).item(), "without_validation": plain}


def test_validation_loss_is_the_held_out_token_mean_of_the_trained_weights(sft_prefix, tmp_path):
    results = run_workers(_validation_runs, 2, sft_prefix, str(tmp_path))[0]
    validated = {row["step"]: row["valid_lm_loss"] for row in results["history"] if "valid_lm_loss" in row}
    assert sorted(validated) == [2, 4]
    assert validated[4] < validated[2]
    assert validated[4] == pytest.approx(results["reference"], rel=1e-6)
    # Validating between steps changes nothing in training (with the param all-gather overlapped into forwards).
    assert _losses({"history": results["history"]}) == results["without_validation"]


def _job_rates(rank, world_size):
    from acemath_mcore.runtime import ParallelConfig, destroy_distributed, init_distributed
    from acemath_mcore.training.trainer import _IntervalWork

    init_distributed(ParallelConfig())
    try:
        work = _IntervalWork()
        # rank 0: 100 tokens, rank 1: 200; steps of 1.5 and 0.5 s; rank 1 waits 0.4 s for data in its first step
        work.add(tokens=100.0 * (rank + 1), flops=1e6 * (rank + 1))
        work.add(tokens=50.0, flops=5e5)
        first = work.job_rates(1e6, {"step_s": 1.0, "data_s": (0.4 * rank + 0.1) / 2, "interval_steps": 2})
        work.add(tokens=10.0, flops=1e4)
        return first, work.job_rates(None, {"step_s": 1.0, "data_s": 0.01, "interval_steps": 1})
    finally:
        destroy_distributed()


def test_logged_rates_sum_the_data_parallel_ranks_work():
    """(100 + 50) + (200 + 50) tokens in 2 s; FLOPs 1.5e6 + 2.5e6 over 2 s on two ranks of peak 1e6: MFU 1.0; the
    slowest loader (rank 1) waited 0.5 s in 2 steps. A log line starts a new interval; without a peak, no MFU."""
    first, second = run_workers(_job_rates, 2)[0]
    assert first == pytest.approx({"tokens_per_s": 200.0, "mfu": 1.0, "data_s_max": 0.25})
    assert second == pytest.approx({"tokens_per_s": 20.0, "data_s_max": 0.01})


def test_durations_read_as_a_person_says_them():
    from acemath_mcore.progress import format_duration

    assert [format_duration(s) for s in (0.4, 42, 425, 3599.6, 11_520, 200_000)] == [
        "0 s", "42 s", "7 min 5 s", "1 h 0 min", "3 h 12 min", "55 h 33 min"]


def test_log_line_names_a_data_stall_only_when_it_costs_time(tmp_path, caplog):
    """The slowest rank's wait for data shows on the console from 5% of the step time on (metrics.jsonl always)."""
    from acemath_mcore.training.logging import MetricsLogger

    metrics_logger = MetricsLogger("run", str(tmp_path), {}, total_steps=2, rank=0)
    with caplog.at_level(logging.INFO, logger="acemath_mcore"):
        metrics_logger.log_step(1, {"lm_loss": 1.0, "step_s": 2.0, "data_s_max": 0.05})
        metrics_logger.log_step(2, {"lm_loss": 1.0, "step_s": 2.0, "data_s_max": 0.5})
    first, second = [record.getMessage() for record in caplog.records]
    assert "for data" not in first and first.endswith("2.00 s/step | 2 s left")  # one step of 2 s to go
    assert second.endswith("waited 0.50 s/step for data (slowest rank)")  # the last step: nothing left
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["data_s_max"] for row in rows] == [0.05, 0.5]


def test_wandb_gets_the_config_every_logged_step_and_the_summary(tmp_path, monkeypatch, caplog):
    """Rank 0 opens one wandb run (offline unless WANDB_MODE says otherwise, so no network is needed), logs each
    line's metrics at its step, and closes it with the run's scalar summary; other ranks never touch wandb."""
    import types

    from acemath_mcore.training.logging import MetricsLogger

    calls = []

    class RecordingRun:
        summary = {}

        def log(self, metrics, step):
            calls.append(("log", step, dict(metrics)))

        def finish(self):
            calls.append(("finish", dict(self.summary)))

    def init(**kwargs):
        calls.append(("init", kwargs, os.environ.get("WANDB_MODE")))
        return RecordingRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_MODE", "recorded")  # so that teardown restores the variable the logger sets
    monkeypatch.delenv("WANDB_MODE")
    assert MetricsLogger("run", str(tmp_path), {"lr": 1.0}, total_steps=2, rank=1, wandb_project="p").wandb is None
    assert calls == []
    metrics_logger = MetricsLogger("run", str(tmp_path), {"lr": 1.0}, total_steps=2, rank=0, wandb_project="p")
    metrics_logger.log_step(1, {"lm_loss": 2.0, "interval_steps": 1})
    metrics_logger.log_step(2, {"lm_loss": 1.5, "lr": 0.5})
    metrics_logger.finish({"final_loss": 1.5, "steps": 2, "history_note": ["not a scalar"]})
    assert calls == [
        ("init", {"project": "p", "name": "run", "config": {"lr": 1.0}, "dir": str(tmp_path / "run")}, "offline"),
        ("log", 1, {"lm_loss": 2.0}),
        ("log", 2, {"lm_loss": 1.5, "lr": 0.5}),
        ("finish", {"final_loss": 1.5, "steps": 2}),
    ]
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins, and says so
    with caplog.at_level(logging.WARNING, logger="acemath_mcore.training.logging"):
        MetricsLogger("run2", str(tmp_path), {}, total_steps=1, rank=0, wandb_project="p", wandb_mode="offline")
    assert calls[-1][2] == "disabled"
    assert "WANDB_MODE=disabled from the environment overrides logging.wandb_mode=offline" in caplog.text


def test_a_preemption_that_kills_wandbs_service_costs_only_wandb(tmp_path, monkeypatch, caplog):
    """Slurm's SIGTERM reaches wandb's service process (wandb-core) too; the next wandb call then raised
    ConnectionResetError, which failed rank 0 before its preemption checkpoint. The real wandb, offline."""
    import psutil

    from acemath_mcore.training.logging import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics_logger = MetricsLogger("run", str(tmp_path), {"lr": 1.0}, total_steps=3, rank=0, wandb_project="p")
    metrics_logger.log_step(1, {"lm_loss": 2.0})
    services = [child for child in psutil.Process().children(recursive=True) if "wandb-core" in " ".join(child.cmdline())]
    assert services, "no wandb service process to signal"
    for service in services:
        service.send_signal(signal.SIGTERM)
    psutil.wait_procs(services, timeout=10)
    with caplog.at_level(logging.WARNING, logger="acemath_mcore"):
        metrics_logger.log_step(2, {"lm_loss": 1.5})
        metrics_logger.log_step(3, {"lm_loss": 1.0})
        metrics_logger.finish({"final_loss": 1.0, "steps": 3})
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_loss"] == 1.0
    # wandb's own loggers may add records (its version and the handlers set up before decide which): ours only.
    ours = [record for record in caplog.records if record.name.startswith("acemath_mcore")]
    assert [record.getMessage().split(" (")[0] for record in ours] == ["wandb failed"]
    # The wandb run hooked the import of huggingface_hub (among ~100 modules); with its service gone, importing it
    # raised ConnectionResetError. Imported afresh, whichever test imported it first.
    monkeypatch.delitem(sys.modules, "huggingface_hub", raising=False)
    importlib.import_module("huggingface_hub")


def test_the_save_dir_records_its_datas_prompt_format(trainer_results, sft_prefix):
    """Scoring and evaluation default to the chat template and system prompt the training data was rendered with
    (here plain, no system turn), read from the prefix's _stats.json."""
    assert trainer_results["background"]["prompt_format"] == {"template": "plain", "system_prompt": None,
                                                              "data": [sft_prefix]}
