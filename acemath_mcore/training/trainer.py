"""The training loop shared by the SFT and reward-model trainers.

The trainers differ only in the :class:`TrainingData` they pass (dataset, loader, what counts as a unit of
work) and the :class:`~acemath_mcore.training.engine.Task` (forward + loss). Everything else lives here once:
distributed set-up, resume or weights-only initialisation, the step loop, logging, checkpoints, preemption.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state

from acemath_mcore.convert.hf_files import copy_assets
from acemath_mcore.convert.megatron_files import (
    ASSETS_DIR,
    HF_CONFIG_FILE,
    find_model_description,
    write_model_description,
    write_prompt_format,
)
from acemath_mcore.models import resolve_arch
from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.builder import build_model_chunk
from acemath_mcore.models.specs import resolve_spec_name
from acemath_mcore.recipes.checks import data_prompt_format
from acemath_mcore.recipes.config import TrainConfig
from acemath_mcore.runtime import device as device_lib
from acemath_mcore.runtime import init_distributed
from acemath_mcore.runtime.distributed import STOP_SIGNALS, read_launch_env
from acemath_mcore.training import checkpointing
from acemath_mcore.training.checkpoint_dirs import find_latest, resolve_checkpoint_dir
from acemath_mcore.training.engine import Batch, Engine, Task
from acemath_mcore.training.flops import training_flops
from acemath_mcore.training.logging import IntervalMetrics, MetricsLogger, setup_console_logging
from acemath_mcore.training.profiling import StepProfiler

logger = logging.getLogger("acemath_mcore")

# Exit status after a preemption signal was handled (checkpoint saved): "temporary failure, run me again".
EXIT_PREEMPTED = 75


@dataclasses.dataclass
class TrainingData:
    """What a trainer feeds the loop: how many samples one epoch has and a loader that resumes mid-stream."""

    num_samples: int
    # (consumed_samples, dp_rank, dp_size) -> endless iterator of this rank's micro-batches
    make_loader: Callable[[int, int, int], Iterator[Batch]]
    # micro-batch -> lengths of the sequences attention runs over (for the FLOPs model); each micro-batch also
    # carries ``num_tokens``, its documents' tokens without padding (data/packing.py), which tokens/s counts
    sequence_lengths: Callable[[Batch], List[int]]
    description: str = ""
    # conversations (SFT) or problem groups (RM) in the samples, for a step sized in those units
    documents: Optional[int] = None


def size_batch_in_units(config: TrainConfig, data: TrainingData, world_size: int,
                        saved_rows: Optional[int] = None) -> None:
    """Set ``global_batch_size`` (None) to the rows that hold about ``global_batch_conversations`` conversations
    (SFT) or ``global_batch_problems`` problem groups (RM) of ``data`` on average, in whole micro-batches on every
    data-parallel rank. A resumed run keeps the rows per step of its checkpoint (``saved_rows``: its epoch and data
    position count in them), whatever the layout would round to now. A fit off by more than 2x is an error (a
    256-GPU job of a 7B recipe would take 8x the paper's batch), a lesser one a warning."""
    key, target, noun = config.batch_in_units()
    parallel = config.parallel
    unit = config.micro_batch_size * parallel.data_parallel_size(world_size)
    interleaved = " x pipeline_parallel" if parallel.virtual_pipeline_parallel else ""
    if parallel.virtual_pipeline_parallel:
        unit *= parallel.pipeline_parallel  # the interleaved schedule runs micro-batches in groups of PP
    if saved_rows is not None:
        if saved_rows % unit:
            raise ValueError(f"the checkpoint being resumed took {saved_rows} rows per step "
                             f"({key}={target}), which do not split into whole micro-batches "
                             f"of micro_batch_size x data-parallel size{interleaved} = {unit} here: resume on a "
                             f"layout where that product divides {saved_rows}, or start a new stage from its weights "
                             "(checkpoint.init_from) in another checkpoint.save_dir")
        config.global_batch_size = saved_rows
        logger.info("global batch: %d rows per step, as in the checkpoint being resumed (%s=%d)", saved_rows, key,
                    target)
        return
    per_row = data.documents / data.num_samples
    config.global_batch_size = config.rows_per_step(per_row, unit)
    held = config.global_batch_size * per_row
    logger.info("global batch: %d rows of %.2f %s on average, about %.0f %s per step (%s=%d)",
                config.global_batch_size, per_row, noun, held, noun, key, target)
    advice = (f"its rows come in multiples of {unit} (micro_batch_size x data-parallel size{interleaved}); lower "
              f"micro_batch_size, use fewer GPUs, or set global_batch_size (and {key}=null)")
    if not 0.5 <= held / target <= 2:
        raise ValueError(f"a step would hold about {held:.0f} {noun}, {held / target:.1f}x the {key}={target} asked "
                         f"for: {advice}")
    if not 0.8 <= held / target <= 1.25:
        logger.warning("a step holds about %.0f %s, not the %d asked for: %s", held, noun, target, advice)


def resume_point(config: TrainConfig) -> Optional[Path]:
    """The checkpoint this stage resumes: its save dir's latest, when it has one and ``checkpoint.resume``."""
    ckpt = config.checkpoint
    return find_latest(ckpt.save_dir) if ckpt.save_dir and ckpt.resume else None


def saved_rows_per_step(config: TrainConfig) -> Optional[int]:
    """The global batch (rows) of the checkpoint this run will resume, None when it starts afresh. Its rows must
    be this run's rows: a checkpoint written with other packing or row length (an RM run saved with padded
    4,096-token rows, resumed under packed bins) is refused, since its rows per step would count other samples."""
    latest = resume_point(config)
    if latest is None:
        return None
    state = dist_checkpointing.load_common_state_dict(str(latest))["train_state"]
    saved = {key: state.get("data", {}).get(key, getattr(config.data, key)) for key in ("packed", "seq_length")}
    if saved != {"packed": config.data.packed, "seq_length": config.data.seq_length}:
        rows = f"data.packed={str(saved['packed']).lower()} data.seq_length={saved['seq_length']}"
        batch = f"global_batch_size={state.get('global_batch_size')} {config.batch_in_units()[0]}=null"
        raise ValueError(f"{latest} was trained on other rows ({rows}, {batch.split()[0]}): its step count and data "
                         f"position count in them. Resume it with {rows} {batch}, or start a new stage from its "
                         f"weights with checkpoint.init_from={latest} and another checkpoint.save_dir")
    return state.get("global_batch_size")


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (Slurm's warning before time-out or preemption) request a checkpoint and a clean exit.
    A stage's entry point creates it before it builds anything (:func:`preemption_requests`): a signal that
    arrives while the data is read and packed, or while the ranks meet, is answered too, not fatal."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        logger.warning("received signal %d (a time limit or preemption, or Slurm stopping the step after another "
                       "rank failed): will checkpoint after this step and exit", signum)
        self.requested = True

    def any_rank_requested(self) -> bool:
        flag = torch.tensor([1 if self.requested else 0], device=device_lib.current_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def ignore_until_exit(self):
        """After the preemption checkpoint every rank exits 75. Under ``srun --kill-on-bad-exit`` the first rank to
        exit makes Slurm SIGTERM the others: ignoring it lets them exit 75 too (killed, they would report 143 and the
        job would not requeue); Slurm's SIGKILL still ends one that takes longer than its ``KillWait``."""
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def preemption_requests() -> Iterator[PreemptionFlag]:
    """A stage's preemption flag, from before its set-up (config checks, datasets) through :func:`run`; the
    handlers are put back if anything fails (a run that returns puts them back, or ignores the signals after a
    preemption, itself)."""
    flag = PreemptionFlag()
    try:
        yield flag
    except BaseException:
        flag.restore()
        raise


class _IntervalWork:
    """This rank's documents' tokens and FLOPs since the last log line. Each step's own tokens/s and MFU are this
    rank's share times DP (no collective per step); a log line sums them over the data-parallel ranks, whose
    packed documents differ, so the rates it shows are the job's. It also reports the slowest rank's wait for data
    (``data_s_max``, per step): one stalled loader stalls every rank at the next collective."""

    def __init__(self):
        self.tokens = self.flops = 0.0

    def add(self, tokens: float, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def job_rates(self, peak_flops: Optional[float], interval: Dict[str, float]) -> Dict[str, float]:
        """``interval``: this rank's reduced record of the same steps (IntervalMetrics: mean step and data time,
        ``interval_steps``). Collectives over the data-parallel group and the world: every rank calls it at the
        same log lines."""
        device = device_lib.current_device()
        totals = torch.tensor([self.tokens, self.flops], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        data_wait = torch.tensor([interval["data_s"]], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(data_wait, op=torch.distributed.ReduceOp.MAX)
        tokens, flops = totals.tolist()
        seconds = interval["step_s"] * interval["interval_steps"]
        rates = {"tokens_per_s": tokens / seconds, "data_s_max": data_wait.item()}
        if peak_flops:
            rates["mfu"] = flops / seconds / (peak_flops * torch.distributed.get_world_size())
        self.tokens = self.flops = 0.0
        return rates


def total_steps(config: TrainConfig, num_samples: int) -> int:
    if config.train_steps > 0:
        return config.train_steps
    steps_per_epoch = num_samples // config.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                         f"({config.global_batch_size}); lower global_batch_size or add data")
    left_out = num_samples % config.global_batch_size
    if left_out:
        logger.warning("%d of the %d samples do not fill a last global batch of %d: every epoch leaves that many "
                       "out (drawn anew each epoch by its shuffle)", left_out, num_samples, config.global_batch_size)
    # Rounded first: 0.29 * 100 is 28.999999999999996 in floating point, which must give 29 steps, not 28.
    return max(1, math.floor(round(config.epochs * steps_per_epoch, 6)))


def check_batch_arithmetic(config: TrainConfig, dp_size: int) -> int:
    """Micro-batches per step on each rank; a batch that does not divide is an error with the numbers."""
    per_step = config.micro_batch_size * dp_size
    if config.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by micro_batch_size "
                         f"{config.micro_batch_size} x data-parallel size {dp_size} = {per_step}")
    micro_batches = config.global_batch_size // per_step
    pp = config.parallel.pipeline_parallel
    if config.parallel.virtual_pipeline_parallel and micro_batches % pp:
        # megatron's interleaved schedule runs micro-batches in groups of PP per virtual stage.
        raise ValueError(f"the interleaved pipeline schedule needs the micro-batches per rank and step "
                         f"({config.global_batch_size} / ({config.micro_batch_size} x DP {dp_size}) = {micro_batches}) "
                         f"to be a multiple of pipeline_parallel {pp}")
    return micro_batches


def run(config: TrainConfig, task: Task, data: TrainingData, arch: Optional[ModelArch] = None,
        model_chunk_builder: Callable = build_model_chunk, validation: Optional[TrainingData] = None,
        preemption: Optional[PreemptionFlag] = None) -> Dict:
    """Train one stage; returns the summary (also written to ``<output_dir>/<name>/summary.json``).
    ``model_chunk_builder`` builds one model chunk (the reward model passes its GPTModel subclass);
    ``validation``, held-out data whose loss is logged as ``valid_*`` every ``eval_interval`` steps and at the end;
    ``preemption``, the flag the entry point installed before building the data (else one is installed here).
    A preempted run (``exit_code`` 75) returns with SIGTERM and SIGUSR1 ignored: its process is meant to exit now.
    A step sized in conversations or problems gets its ``global_batch_size`` here, in ``config`` itself (whose
    copy the data's loaders read), before any process group exists."""
    if config.global_batch_size is None:
        size_batch_in_units(config, data, read_launch_env().world_size, saved_rows_per_step(config))
    if preemption is None:
        with preemption_requests() as preemption:
            return _run(config, task, data, arch, model_chunk_builder, validation, preemption)
    return _run(config, task, data, arch, model_chunk_builder, validation, preemption)


def _run(config: TrainConfig, task: Task, data: TrainingData, arch: Optional[ModelArch],
         model_chunk_builder: Callable, validation: Optional[TrainingData], preemption: PreemptionFlag) -> Dict:
    launch = init_distributed(config.parallel, seed=config.seed)
    setup_console_logging(launch.rank)
    arch = arch or resolve_arch(config.model)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    micro_batches_per_step = check_batch_arithmetic(config, dp_size)
    steps = total_steps(config, data.num_samples)
    data_order = _data_order(config, data.num_samples)
    valid_batches = 0 if validation is None else _validation_batches(config, validation)
    logger.info("%s: %s, %d samples/epoch, %d steps of %d samples (%d micro-batches of %d per rank, DP=%d)",
                config.name, data.description, data.num_samples, steps, config.global_batch_size,
                micro_batches_per_step, config.micro_batch_size, dp_size)

    engine = Engine(arch, config.parallel, config.model_options, config.optim, train_steps=steps,
                    model_chunk_builder=model_chunk_builder)
    options = config.model_options
    logger.info("model %s: %s layer spec, %s%s%s", config.model, resolve_spec_name(options.spec),
                "bf16" if options.bf16 else "fp32", f", FP8 {options.fp8_recipe}" if options.fp8 else "",
                f", loss kernel {engine.config.lm_cross_entropy}" if task.head_outputs is None else "")
    resumed = _initialise(config, engine, data_order)
    if config.checkpoint.save_dir and launch.rank == 0:  # what the scorer and the evaluator render prompts with
        write_prompt_format(Path(config.checkpoint.save_dir), data_prompt_format(config.data.prefixes),
                            [_absolute(prefix) for prefix in config.data.prefixes])
    start_step, consumed_samples = resumed["step"], resumed["consumed_samples"]
    metrics_logger = MetricsLogger(config.name, config.logging.output_dir, config.to_dict(), steps,
                                   launch.rank, config.logging.wandb_project, config.logging.wandb_mode,
                                   wandb_run=config.logging.wandb_run, start_step=start_step)
    peak = device_lib.bf16_peak_flops()
    step, exit_code, metrics, unlogged, work = start_step, 0, {}, IntervalMetrics(), _IntervalWork()
    # The stage's losses, carried through checkpoints so a resumed (or re-run, finished) stage reports them too.
    first_loss, final_loss = resumed.get("first_loss"), resumed.get("final_loss")
    started = time.perf_counter()
    # Closed when the loop ends, however it ends: its worker processes exit with it (data/datasets.batch_loader).
    loader = within_vocabulary(data.make_loader(consumed_samples, dp_rank, dp_size), arch.padded_vocab_size)
    checkpoints = _checkpoint_writer(config)
    profiler = StepProfiler(config.profile, launch.rank, launch.world_size,
                            Path(config.logging.output_dir) / config.name, run_steps=range(start_step + 1, steps + 1))
    stop_asked = False  # on any rank, as of the last step
    try:
        if preemption.any_rank_requested():  # during the set-up: the latest checkpoint already holds this state
            logger.warning("preemption requested before the first step: exiting without training")
            exit_code = EXIT_PREEMPTED
        while exit_code == 0 and step < steps:
            profiler.before_step(step + 1)
            step_start = time.perf_counter()
            micro_batches = [next(loader) for _ in range(micro_batches_per_step)]
            data_seconds = time.perf_counter() - step_start
            metrics = engine.train_step(task, micro_batches, nan_policy=config.nan_policy)
            device_lib.synchronize()
            seconds = time.perf_counter() - step_start
            step += 1
            profiler.after_step(step)
            consumed_samples += config.global_batch_size
            metrics.update(_step_rates(arch, task, data, micro_batches, work, seconds, dp_size, peak),
                           step_s=seconds, data_s=data_seconds, consumed_samples=consumed_samples)
            final_loss = metrics.get(task.loss_name)
            first_loss = final_loss if first_loss is None else first_loss
            validated = validation is not None and (
                step == steps or (config.eval_interval and step % config.eval_interval == 0))
            if validated:
                metrics.update(_validate(engine, task, validation, valid_batches, micro_batches_per_step,
                                         dp_rank, dp_size, arch.padded_vocab_size))
            unlogged.add(metrics)
            if checkpoints is not None:
                checkpoints.publish_finished()
            # A stop asked for in the last step is no preemption: the run ends as finished (exit 0, its final
            # save below) rather than exit 75, a requeue and a restart that only finds the work done.
            stop_asked = preemption.any_rank_requested()
            preempted = stop_asked and step < steps
            interval = config.checkpoint.save_interval
            saving = checkpoints is not None and (
                preempted or (interval and step % interval == 0 and step < steps))
            # A line never spans a checkpoint: after a resume, the re-run steps' lines replace whole old lines only.
            if validated or saving or preempted or step % config.logging.log_interval == 0 or step == steps:
                record = unlogged.reduce()
                rates = work.job_rates(peak, record)
                metrics.update(rates)  # the summary's final_metrics: the last line's job-wide rates
                metrics_logger.log_step(step, {**record, **rates})
            if saving:  # a preemption's save is published before the process exits
                _save(checkpoints, config, engine, data_order, step, consumed_samples, first_loss, final_loss,
                      wait=preempted)
            if preempted:
                exit_code = EXIT_PREEMPTED
                break
        if exit_code == 0 and checkpoints is not None and step > start_step:
            _save(checkpoints, config, engine, data_order, step, consumed_samples, first_loss, final_loss, wait=True)
    except BaseException:
        if checkpoints is not None:
            checkpoints.abandon()
        if unlogged.steps:  # the steps before a failure are worth reading (rank 0 only, no collective: estimates)
            metrics_logger.log_step(step, unlogged.reduce())
        raise
    finally:
        profiler.close(step)
        loader.close()
        if exit_code == EXIT_PREEMPTED or stop_asked:  # after a stop in the last step every rank exits 0 undisturbed
            preemption.ignore_until_exit()
        else:
            preemption.restore()
    summary = {
        "name": config.name, "model": config.model, "steps": step, "total_steps": steps,
        "consumed_samples": consumed_samples, "first_loss": first_loss, "final_loss": final_loss,
        "wall_s": time.perf_counter() - started, "preempted": exit_code == EXIT_PREEMPTED,
        "checkpoint": str(checkpointing.iteration_dir(config.checkpoint.save_dir, step))
        if config.checkpoint.save_dir and step > start_step else None,
        "final_metrics": metrics,
    }
    metrics_logger.finish(summary)
    if exit_code == EXIT_PREEMPTED:
        # No rank exits 75 before rank 0 has written its summary and synced wandb: the first exit makes srun
        # --kill-on-bad-exit stop the rest, and one still busy after Slurm's KillWait would be killed (status 137,
        # and the job would not requeue).
        torch.distributed.barrier()
    summary.update(exit_code=exit_code, history=metrics_logger.history)
    return summary


def _step_rates(arch: ModelArch, task: Task, data: TrainingData, micro_batches: List[Batch], work: _IntervalWork,
                seconds: float, dp_size: int, peak: Optional[float]) -> Dict[str, float]:
    """A step's tokens/s, MFU (when the GPU's peak is known) and peak memory, and its work added to ``work``.
    FLOPs count the rows as computed, padding included; tokens/s counts the documents' tokens only. A step's own
    rates are this rank's share times DP; the logged lines' are summed over the ranks (_IntervalWork)."""
    lengths = [n for batch in micro_batches for n in data.sequence_lengths(batch)]
    flops = training_flops(arch, lengths, task.head_outputs)
    tokens = sum(batch["num_tokens"] for batch in micro_batches)
    work.add(tokens, flops)
    rates = {"tokens_per_s": tokens * dp_size / seconds, "memory_gib": device_lib.peak_memory_bytes() / 2**30}
    if peak:
        rates["mfu"] = flops * dp_size / seconds / (peak * torch.distributed.get_world_size())
    return rates


def _validation_batches(config: TrainConfig, validation: TrainingData) -> int:
    """The whole global batches of held-out data each validation pass runs (logged, with what is left out)."""
    batches = validation.num_samples // config.global_batch_size
    if batches == 0:
        raise ValueError(f"data.valid_prefixes hold {validation.num_samples} samples, fewer than one global batch "
                         f"({config.global_batch_size}); add held-out data or leave data.valid_prefixes empty")
    unscored = validation.num_samples - batches * config.global_batch_size
    logger.info("validation: %s; %d global batches every %s%s", validation.description, batches,
                f"{config.eval_interval} steps and at the end" if config.eval_interval else "run, at the end",
                f" ({unscored} held-out samples left out: not a whole global batch)" if unscored else "")
    return batches


def _initialise(config: TrainConfig, engine: Engine, data_order: Dict) -> Dict:
    """Resume this stage from its latest checkpoint (returns its train state), else start from ``init_from``
    weights, else from scratch (step 0)."""
    latest = resume_point(config)
    if latest is not None:
        engine.arch.check_matches(find_model_description(latest)[0], str(latest))
        state = checkpointing.load_checkpoint(latest, engine.model, engine.optimizer, engine.scheduler,
                                              fully_parallel=config.checkpoint.fully_parallel_load)
        saved_batch = state.get("global_batch_size", config.global_batch_size)
        if saved_batch != config.global_batch_size:
            sized = "" if config.batch_in_units() is None else f" {config.batch_in_units()[0]}=null"
            raise ValueError(f"{latest} was trained with global_batch_size={saved_batch}, this run has "
                             f"{config.global_batch_size}: the step count and data position would no longer match "
                             f"the epoch. Resume with global_batch_size={saved_batch}{sized}, or start a new stage "
                             f"from it with checkpoint.init_from={latest} and another checkpoint.save_dir")
        saved_data = state.get("data", data_order)
        changed = {key: (saved_data[key], value) for key, value in data_order.items()
                   if key in saved_data and saved_data[key] != value}  # num_samples: recorded since 2026-11
        if changed:
            logger.warning("resuming %s with data settings that differ from the saved run's (saved -> now: %s): the "
                           "sample order from step %d on is not the one the run started with (this epoch may repeat "
                           "some samples and skip others)", latest,
                           "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()), state["step"])
        started_from = state.get("init_from", config.checkpoint.init_from)  # recorded since 2026-11
        if config.checkpoint.init_from and _absolute(config.checkpoint.init_from) != _absolute(started_from):
            logger.warning("checkpoint.init_from=%s is not used: resuming %s, a stage that started from %s (to start "
                           "the stage over from these weights, set checkpoint.resume=false or another "
                           "checkpoint.save_dir)", config.checkpoint.init_from, latest, started_from or "random weights")
        engine.step = state["step"]
        logger.info("resumed from %s at step %d (%d samples consumed)", latest, state["step"],
                    state["consumed_samples"])
        return state
    if config.checkpoint.init_from:
        # Resolved once: the weights loaded are the ones whose description is checked and inherited.
        init_dir = resolve_checkpoint_dir(config.checkpoint.init_from)
        recorded_arch, hf_config, assets = find_model_description(init_dir)
        engine.arch.check_matches(recorded_arch, f"checkpoint.init_from={config.checkpoint.init_from}")
        if config.checkpoint.save_dir and torch.distributed.get_rank() == 0:
            _inherit_description(Path(config.checkpoint.save_dir), engine.arch, hf_config, assets)
        checkpointing.load_weights(init_dir, engine.model, keep_missing_optional=True,
                                   fully_parallel=config.checkpoint.fully_parallel_load)
        engine.optimizer.reload_model_params()
        logger.info("initialised weights from %s (fresh optimizer and schedule)", config.checkpoint.init_from)
    else:
        logger.info("no checkpoint to resume or initialise from: training from random initialisation")
    if not config.checkpoint.save_dir:
        logger.warning("no checkpoint.save_dir: nothing is saved, and a preemption loses the whole run")
    return {"step": 0, "consumed_samples": 0}


def _absolute(path: Optional[str]) -> Optional[str]:
    """A path as the same checkpoint is named from any directory (a recipe's relative default, Slurm's absolute)."""
    return None if path is None else os.path.abspath(path)


def _validate(engine: Engine, task: Task, validation: TrainingData, global_batches: int, micro_batches: int,
              dp_rank: int, dp_size: int, vocab_rows: int) -> Dict[str, float]:
    """One pass over the first ``global_batches`` global batches of the held-out data (the same ones every time)."""
    loader = within_vocabulary(validation.make_loader(0, dp_rank, dp_size), vocab_rows)
    batches = ([next(loader) for _ in range(micro_batches)] for _ in range(global_batches))
    try:
        return {f"valid_{name}": value for name, value in engine.evaluate(task, batches).items()}
    finally:
        loader.close()


def within_vocabulary(loader: Iterator[Batch], vocab_rows: int) -> Iterator[Batch]:
    """The loader's micro-batches, each checked for token ids the model's embedding has no row for (data
    tokenized for another model): on a GPU such an id is a device-side assert far from its cause. Costs a max
    over the micro-batch's ids on the host."""
    for batch in loader:
        for key in ("tokens", "labels"):
            largest = int(batch[key].max()) if key in batch and batch[key].numel() else -1
            if largest >= vocab_rows:
                raise ValueError(f"the data holds token id {largest} but the model has only {vocab_rows} "
                                 "embedding rows: the data was tokenized for another model; re-run "
                                 "launch/preprocess.py with the model's tokenizer")
        yield batch


def _data_order(config: TrainConfig, num_samples: int) -> Dict:
    """What the sample order is a function of; a resume with other values continues in another order. The
    number of samples catches a prefix rebuilt under the same name (each epoch's shuffle is over that count)."""
    data = config.data
    return {"prefixes": list(data.prefixes), "weights": list(data.weights), "seq_length": data.seq_length,
            "packed": data.packed, "seed": config.seed, "num_samples": num_samples}


def _inherit_description(save_dir: Path, arch, hf_config: Optional[Dict], assets: Optional[Path]) -> None:
    """The stage's save dir takes over what its starting checkpoint records (the original HF config, tokenizer and
    generation files), so exporting or evaluating any later stage needs no --hf-template or --tokenizer."""
    save_dir.mkdir(parents=True, exist_ok=True)
    write_model_description(save_dir, arch, hf_config)
    if hf_config is None:
        (save_dir / HF_CONFIG_FILE).unlink(missing_ok=True)  # an earlier init_from's, not this one's
    shutil.rmtree(save_dir / ASSETS_DIR, ignore_errors=True)
    if assets is not None:
        copy_assets(assets, save_dir / ASSETS_DIR)


def _checkpoint_writer(config: TrainConfig) -> Optional[checkpointing.CheckpointWriter]:
    checkpoint = config.checkpoint
    if not checkpoint.save_dir:
        return None
    return checkpointing.CheckpointWriter(checkpoint.save_dir, checkpoint.keep_last, checkpoint.optimizer_format,
                                          checkpoint.fully_parallel_save, background=checkpoint.async_save)


def _save(checkpoints: checkpointing.CheckpointWriter, config: TrainConfig, engine: Engine, data_order: Dict,
          step: int, consumed_samples: int, first_loss: Optional[float], final_loss: Optional[float],
          wait: bool) -> None:
    train_state = {"consumed_samples": consumed_samples, "global_batch_size": config.global_batch_size,
                   "first_loss": first_loss, "final_loss": final_loss, "data": data_order,
                   "init_from": _absolute(config.checkpoint.init_from)}
    checkpoints.save(step, engine.model, engine.optimizer, engine.scheduler, train_state, wait=wait)
    if torch.distributed.get_rank() == 0:  # the save dir describes its model: evaluation and export need no --model
        write_model_description(Path(config.checkpoint.save_dir), engine.arch)
