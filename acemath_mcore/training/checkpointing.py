"""Distributed checkpoints (megatron ``dist_checkpointing``, torch_dist format) with crash-safe publication.

The save directory's layout is in :mod:`acemath_mcore.training.checkpoint_dirs`. Every rank writes its shards
into ``iter_N.partial``; after a barrier rank 0 renames it to ``iter_N`` and only then rewrites ``latest``. A
crash at any point leaves ``latest`` naming the previous complete checkpoint. dist_checkpointing stores global
tensors, so a checkpoint's weights load into any TP/PP layout; so does the distributed optimizer's state in the
``fully_reshardable`` format, while ``dp_reshardable`` state resumes at the TP/PP/VPP that saved it (any DP).
Which one a checkpoint holds is recorded in it, and a resume reads that one.

Megatron's fully parallel strategies (``fully_parallel``) share the work of what data-parallel ranks hold in
common: at save each writes a part instead of DP rank 0 writing it all, at load each reads a part and the ranks
exchange them instead of every rank reading everything.

A trainer's saves go through :class:`CheckpointWriter`, which can leave the writing to a background process per
rank (megatron's asynchronous save); the publication is the same, only later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import multiprocessing
import multiprocessing.managers
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.validation import StrictHandling

from acemath_mcore.models.weights import unwrap_model
from acemath_mcore.runtime import device as device_lib
from acemath_mcore.runtime.distributed import STOP_SIGNALS
from acemath_mcore.training.checkpoint_dirs import (
    FREE_LAYOUT_FORMAT,
    LATEST,
    LAYOUT_BOUND_FORMAT,
    PARTIAL_SUFFIX,
    fresh_start,
    iteration_dir,
    layout_bound_problem,
    resolve_checkpoint_dir,
    same_layout,
    write_optimizer_layout,
)

logger = logging.getLogger("acemath_mcore")

# The distributed optimizer's formats (OPTIMIZER_CHECKPOINT_FORMATS) are both in megatron-core 0.16-0.19;
# 'fully_sharded_model_space' fails to save on 0.16 with "flattened_range is not supported". Checkpoints written
# before the format was recorded (2026-11-24) hold FREE_LAYOUT_FORMAT (fully_reshardable) state.


def _sharding_metadata(optimizer_format: str = FREE_LAYOUT_FORMAT) -> Dict[str, Any]:
    """A fresh dict per call: megatron caches process groups inside it, which would go stale across layouts."""
    return {"distrib_optim_sharding_type": optimizer_format}


def _data_parallel_group():
    """The ranks that hold the same weights (context parallelism included), among which fully parallel saves and
    loads divide the work; None where that is this rank alone (nothing to share) or no layout is set up."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if torch.distributed.get_world_size(group) > 1 else None


def _save_strategy(fully_parallel: bool):
    group = _data_parallel_group() if fully_parallel else None
    strategy = get_default_save_sharded_strategy()
    return strategy if group is None else FullyParallelSaveStrategyWrapper(strategy, group)


def _load_strategy(checkpoint: Path, fully_parallel: bool):
    group = _data_parallel_group() if fully_parallel else None
    strategy = get_default_load_sharded_strategy(str(checkpoint))
    return strategy if group is None else FullyParallelLoadStrategyWrapper(strategy, group)


def model_sharded_state_dict(model_chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """Keys ``model`` (or ``model0``, ``model1``, ... per virtual stage) over the unwrapped GPT models, so a
    checkpoint does not depend on the DDP / Float16 wrappers used while training."""
    chunks = [unwrap_model(chunk) for chunk in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=_sharding_metadata())}
    return {f"model{i}": chunk.sharded_state_dict(metadata=_sharding_metadata()) for i, chunk in enumerate(chunks)}


def _rng_sharded_object() -> ShardedObject:
    """Per (PP, TP) rank RNG state, replicated over DP; restored only when the layout is unchanged."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": device_lib.accelerator_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", state, (pp_size, tp_size), (pp, tp),
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    device_lib.set_accelerator_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> Dict[str, int]:
    return {
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "data_parallel": parallel_state.get_data_parallel_world_size(),
    }


def save_checkpoint(save_dir: str | Path, step: int, model_chunks, optimizer, scheduler,
                    train_state: Dict[str, Any], keep_last: int = 2,
                    optimizer_format: str = LAYOUT_BOUND_FORMAT, fully_parallel: bool = True) -> Path:
    """Save everything needed to resume at ``step``; returns the published directory. ``optimizer_format`` and
    ``fully_parallel``: see the module docstring."""
    save = _start_save(Path(save_dir), step, model_chunks, optimizer, scheduler, train_state, keep_last,
                       optimizer_format, fully_parallel, background=False)
    return save.publish()


@dataclasses.dataclass
class _Save:
    """A save whose shards are written (or being written) into ``iter_N.partial``, to be published once every
    rank's writing has finished: rank 0 renames it to ``iter_N`` and only then rewrites ``latest``."""

    save_dir: Path
    step: int
    layout: Dict[str, int]
    optimizer_format: str
    distributed_optimizer: bool
    keep_last: int
    request: Any  # megatron's AsyncRequest for a background save, else None
    started: float

    def publish(self) -> Path:
        """On every rank, after every rank's shards are written."""
        final = iteration_dir(self.save_dir, self.step)
        partial = _partial_dir(final)
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            write_optimizer_layout(partial, self.layout, self.optimizer_format, self.distributed_optimizer)
            if final.exists():  # this step was published before (a run with resume=false in an old save dir)
                # Set aside, not deleted: 'latest' may name it until the marker below moves, and deleting a large
                # checkpoint takes long enough for a crash to leave the marker naming nothing. The name makes it
                # one of the dead saves _remove_old deletes.
                aside = final.with_name(final.name + ".replaced" + PARTIAL_SUFFIX)
                shutil.rmtree(aside, ignore_errors=True)  # one a crash left here before
                os.replace(final, aside)
            os.replace(partial, final)
            marker_tmp = self.save_dir / (LATEST + ".tmp")
            marker_tmp.write_text(final.name + "\n")
            os.replace(marker_tmp, self.save_dir / LATEST)
            _remove_old(self.save_dir, self.keep_last, self.step)
        torch.distributed.barrier()
        return final


def _start_save(save_dir: Path, step: int, model_chunks, optimizer, scheduler, train_state: Dict[str, Any],
                keep_last: int, optimizer_format: str, fully_parallel: bool, background: bool) -> _Save:
    """Write the shards of ``step`` into ``iter_N.partial``; with ``background``, only snapshot them into host
    memory and return the request that writes them (``_Save.request``)."""
    started = time.perf_counter()
    partial = _partial_dir(iteration_dir(save_dir, step))
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    torch.distributed.barrier()
    _finish_param_gather(model_chunks)
    state = model_sharded_state_dict(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_sharding_metadata(optimizer_format))
    state["scheduler"] = scheduler.state_dict()
    layout = _layout()
    state["train_state"] = dict(train_state, step=step, layout=layout, optimizer_format=optimizer_format)
    state["rng_state"] = _rng_sharded_object()
    _writer_queue_deaf_to_stop_signals()
    request = dist_checkpointing.save(state, str(partial), sharded_strategy=_save_strategy(fully_parallel),
                                      **(_BACKGROUND_SAVE_ARGUMENTS if background else {}))
    # optimizer_layout.json also records whether gradients were reduced in buckets (the config checks compare it)
    overlap = any(getattr(getattr(chunk, "ddp_config", None), "overlap_grad_reduce", False) for chunk in model_chunks)
    return _Save(save_dir, step, dict(layout, overlap_grad_reduce=overlap), optimizer_format,
                 _uses_distributed_optimizer(optimizer), keep_last, request, started)


def _partial_dir(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL_SUFFIX)


# megatron-core 0.19 offers two background writers, its own (deprecated there, the only one in 0.16) and
# nvidia-resiliency-ext's (not installed here, so never tested): ask for its own, which CI runs on 0.16.
_BACKGROUND_SAVE_ARGUMENTS = {"async_sharded_save": True}
if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
    _BACKGROUND_SAVE_ARGUMENTS["async_strategy"] = "mcore"


class CheckpointWriter:
    """A run's saves. With ``background`` (``checkpoint.async_save``) a save stops training only while the state
    is copied to host memory; a forked process per rank writes it while training goes on, and the checkpoint is
    published (``latest`` names it) once every rank's writer has finished, as :meth:`publish_finished` finds at the
    end of a step. One save is in flight at a time: the next save waits for the previous one. Every method is a
    collective: all ranks call it at the same step."""

    def __init__(self, save_dir: str | Path, keep_last: int, optimizer_format: str, fully_parallel: bool,
                 background: bool):
        self.save_dir, self.keep_last = Path(save_dir), keep_last
        self.optimizer_format, self.fully_parallel = optimizer_format, fully_parallel
        self._queue = AsyncCallsQueue() if background else None

    def save(self, step: int, model_chunks, optimizer, scheduler, train_state: Dict[str, Any],
             wait: bool = False) -> None:
        """Save ``step``; with ``wait`` (or without ``background``) return once it is published."""
        self.wait()
        background = self._queue is not None and not wait
        save = _start_save(self.save_dir, step, model_chunks, optimizer, scheduler, train_state, self.keep_last,
                           self.optimizer_format, self.fully_parallel, background)
        if not background:
            save.publish()
            logger.info("saved %s in %.1f s", iteration_dir(self.save_dir, step), time.perf_counter() - save.started)
            return
        save.request.add_finalize_fn(functools.partial(self._publish, save))
        self._queue.schedule_async_request(save.request)
        logger.info("saving %s in the background (training paused %.1f s to copy the state)",
                    iteration_dir(self.save_dir, step), time.perf_counter() - save.started)

    def _publish(self, save: _Save) -> None:
        path = save.publish()
        logger.info("saved %s (%.1f s after it started)", path, time.perf_counter() - save.started)

    def publish_finished(self) -> None:
        """Publish a background save whose writers have all finished; returns at once otherwise. A collective
        only while a save is in flight (one all-reduce)."""
        if self._in_flight():
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Return once no save is in flight (the last one published)."""
        if self._in_flight():
            self._queue.maybe_finalize_async_calls(blocking=True)

    def abandon(self) -> None:
        """After a failure, on this rank alone: stop the background writers, leaving their ``.partial`` directory
        unpublished (the next publication removes it). No collective: the other ranks may be gone."""
        if self._in_flight():
            for call in self._queue.async_calls:
                call.async_caller.close(abort=True)

    def _in_flight(self) -> bool:
        return self._queue is not None and self._queue.get_num_unfinalized_calls() > 0


def _writer_queue_deaf_to_stop_signals() -> None:
    """megatron's checkpoint writers report through a queue served by a spawned multiprocessing manager, started
    at the first save and kept for the job. Slurm signals every process of the step (runtime.STOP_SIGNALS): that
    manager, with default signal handling, died of the signal and the checkpoint the signal asked for failed
    (BrokenPipeError). Created here instead, the manager starts with those signals blocked: the mask is set in
    this thread around the start, so the child inherits it from its first instruction, before its imports start
    threads (OpenBLAS's, with OMP_NUM_THREADS > 1) that a mask set later in its main thread would not cover."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:  # megatron 0.16 - 0.19 keep it there
        # The tracker's first start unblocks SIGINT and SIGTERM in this thread: let it start before the mask is set.
        resource_tracker.ensure_running()
        manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("spawn"))
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            manager.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal that came meanwhile is delivered now
        filesystem_async._results_queue = manager.Queue()  # the queue's proxy keeps the manager running


def _finish_param_gather(model_chunks) -> None:
    """With ``overlap_param_gather`` the distributed optimizer leaves each rank holding only its own shard of the
    updated weights until the next forward pass gathers the rest; gather them now, before anything reads the
    full weights (a checkpoint's model tensors are what exports and ``init_from`` use)."""
    for chunk in model_chunks:
        if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False):
            chunk.start_param_sync(force_sync=True)


def _remove_old(save_dir: Path, keep_last: int, step: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to ``step`` (the one just published always survives), and
    delete unfinished saves: one save runs at a time, so after a publication every ``.partial`` is a dead save
    (e.g. a preemption checkpoint cut short by Slurm's KillWait) that nothing will read or finish.

    Higher-numbered checkpoints left by an earlier run in the same directory (one started with ``resume=false``)
    are not this run's to delete; they are reported instead, since ``latest`` no longer names them.
    """
    for partial in sorted(save_dir.glob(f"iter_*{PARTIAL_SUFFIX}")):
        logger.info("removing unfinished save %s", partial)
        shutil.rmtree(partial, ignore_errors=True)
    complete = sorted((int(p.name[len("iter_"):]), p) for p in save_dir.glob("iter_*")
                      if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX) and p.name[len("iter_"):].isdigit())
    newer = [p.name for number, p in complete if number > step]
    if newer:
        logger.warning("%s holds checkpoints from an earlier run beyond step %d (%s); 'latest' now names step %d "
                       "and they are left in place", save_dir, step, ", ".join(newer), step)
    if keep_last <= 0:
        return
    ours = [p for number, p in complete if number <= step]
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(checkpoint: Path, model_chunks, optimizer, scheduler, fully_parallel: bool = False) -> Dict[str, Any]:
    """Full resume: weights, optimizer, scheduler, RNG (same layout only) and the saved train state. The optimizer
    state is read in the format it was saved in, whatever the run's ``checkpoint.optimizer_format``."""
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    saved_layout, layout = common["train_state"]["layout"], _layout()
    optimizer_format = common["train_state"].get("optimizer_format", FREE_LAYOUT_FORMAT)
    bucket_state = optimizer_format == LAYOUT_BOUND_FORMAT and _uses_distributed_optimizer(optimizer)
    if bucket_state:
        problem = layout_bound_problem(checkpoint, saved_layout, layout)
        if problem:
            raise ValueError(problem)
    unchanged = same_layout(saved_layout, layout)
    state = model_sharded_state_dict(model_chunks)
    configured_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    with _reloadable_torch_adam_state(optimizer):
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=_sharding_metadata(optimizer_format))
        if bucket_state:
            _check_bucket_shapes(checkpoint, state["optimizer"])
        if unchanged:
            state["rng_state"] = _rng_sharded_object()
        loaded = dist_checkpointing.load(state, str(checkpoint), sharded_strategy=_load_strategy(checkpoint, fully_parallel),
                                         strict=StrictHandling.ASSUME_OK_UNEXPECTED)
        _load_model_chunks(model_chunks, loaded)
        with torch.no_grad():  # megatron's dp_reshardable loader copies into views of the fp32 weights without it
            optimizer.load_state_dict(loaded["optimizer"])
    _keep_configured_hyperparameters(checkpoint, optimizer, configured_groups, loaded["scheduler"],
                                     scheduler.state_dict())
    scheduler.load_state_dict(loaded["scheduler"])
    if unchanged:
        _restore_rng(loaded["rng_state"])
    else:
        logger.info("resuming %s at a different layout (%s -> %s): RNG streams restart", checkpoint,
                    saved_layout, layout)
    return loaded["train_state"]


def _check_bucket_shapes(checkpoint: Path, optimizer_state: Dict[str, Any]) -> None:
    """dp_reshardable state is stored per gradient bucket, and megatron sizes the buckets from
    ``optim.overlap_grad_reduce`` and, above 40 data-parallel ranks, from their number: a checkpoint whose buckets
    differ from this run's would fail deep inside torch's loader on every rank."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    for tensor in nested_values(optimizer_state):
        if not isinstance(tensor, ShardedTensor):
            continue
        saved = stored.get(tensor.key)
        saved_shape = None if saved is None else tuple(saved.global_shape)
        if saved_shape != tuple(tensor.global_shape):
            raise ValueError(
                f"{checkpoint}: its {LAYOUT_BOUND_FORMAT} optimizer state does not fit this run's gradient buckets "
                f"({tensor.key}: saved {'nothing' if saved_shape is None else list(saved_shape)}, this run "
                f"{list(tensor.global_shape)}). Bucket sizes follow optim.overlap_grad_reduce and, above 40 "
                "data-parallel ranks, their number: resume with the settings that saved it, or "
                + fresh_start(checkpoint))


def _keep_configured_hyperparameters(checkpoint: Path, optimizer, configured_groups: List[Dict[str, Any]],
                                     saved_schedule: Dict[str, Any], configured_schedule: Dict[str, Any]) -> None:
    """On resume the configured optimizer settings and LR / weight-decay schedule apply, not the saved ones (the
    checkpoint supplies the step count, moments and data position): loading the optimizer state brought back
    each parameter group's saved peak lr, betas, eps, ...; put the configured values back and say what changed."""
    changed = {f"{key} {saved_schedule[key]} -> {value}" for key, value in configured_schedule.items()
               if key != "num_steps" and key in saved_schedule and saved_schedule[key] != value}
    step_keys = {"step", "lr", "weight_decay"}  # set every step by the scheduler
    for group, configured in zip(optimizer.param_groups, configured_groups):
        for key, value in configured.items():
            if key in step_keys:
                continue
            if key in group and group[key] != value:
                changed.add(f"{key} {group[key]} -> {value}")
            group[key] = value
    if changed:
        logger.warning("resuming %s with settings that differ from the saved ones (the configured ones apply from "
                       "step %d): %s", checkpoint, saved_schedule.get("num_steps", 0), "; ".join(sorted(changed)))


def _distributed_optimizers(optimizer) -> List[Any]:
    """The megatron distributed optimizers inside ``optimizer`` (one per chained part)."""
    from megatron.core.optimizer import distrib_optimizer

    return [part for part in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(part, distrib_optimizer.DistributedOptimizer)]


def _uses_distributed_optimizer(optimizer) -> bool:
    return bool(_distributed_optimizers(optimizer))


def _torch_adam_distributed_optimizers(optimizer) -> List[Any]:
    """The distributed optimizers inside ``optimizer`` that run megatron's torch-Adam fallback (no TE or apex)."""
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return []
    return _distributed_optimizers(optimizer)


@contextlib.contextmanager
def _reloadable_torch_adam_state(optimizer):
    """Work around three bugs that stop megatron's distributed optimizer, with its torch-Adam fallback (CPU, or a
    GPU without TE/apex), from reloading its own checkpoint (read in megatron-core 0.16.1 and 0.19.2):

    1. ``state_dict()`` reads every parameter's Adam 'step' before torch has created any state (AssertionError):
       create the state, zeroed; the checkpoint overwrites every value.
    2. ``load_parameter_state_from_fully_reshardable`` (and ``..._dp_reshardable``) copies a 'step' the
       checkpoint's tensors lack (KeyError): hide 'step' from it (``load_state_dict`` has already set it from the
       saved parameter groups).
    3. ``load_state_dict`` hands every parameter one shared 'step' tensor, which torch's Adam then increments once
       per parameter at each update (wrong bias correction from the first resumed step): give each its own copy.
    """
    parts = _torch_adam_distributed_optimizers(optimizer)
    for part in parts:
        inner = part.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                              exp_avg_sq=torch.zeros_like(param))
        for loader in _PARAMETER_STATE_LOADERS:
            setattr(part, loader, functools.partial(_load_without_step, part, loader))
    try:
        yield
    finally:
        for part in parts:
            for loader in _PARAMETER_STATE_LOADERS:
                delattr(part, loader)  # the class's method again
            for state in part.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


_PARAMETER_STATE_LOADERS = ("load_parameter_state_from_fully_reshardable", "load_parameter_state_from_dp_reshardable")


def _load_without_step(part, loader: str, param_state: Dict) -> None:
    states = part.optimizer.state
    steps = {param: state.pop("step") for param, state in states.items() if "step" in state}
    try:
        getattr(type(part), loader)(part, param_state)
    finally:
        for param, step in steps.items():
            states[param]["step"] = step


def load_weights(checkpoint: str | Path, model_chunks, keep_missing_optional: bool = False,
                 fully_parallel: bool = False) -> None:
    """Weights only (stage initialisation, inference): the optimizer and schedule start fresh. Tensors the model
    does not have (e.g. an LM head when initialising a reward model) are ignored; missing ones are an error. With
    ``keep_missing_optional`` (a new stage's start) the tensors a model lists in ``optional_weight_keys`` may be
    missing and keep their initial values: a reward head started from an SFT checkpoint. Inference never allows
    it, since an untrained head scores at random."""
    path = resolve_checkpoint_dir(checkpoint)
    state = model_sharded_state_dict(model_chunks)
    kept = _set_aside_absent_optional_tensors(state, model_chunks, path, keep_missing_optional)
    loaded = dist_checkpointing.load(state, str(path), sharded_strategy=_load_strategy(path, fully_parallel),
                                     strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    for chunk_key, tensors in kept.items():
        loaded[chunk_key].update(tensors)
    _load_model_chunks(model_chunks, loaded)


def _set_aside_absent_optional_tensors(state: Dict[str, Any], model_chunks, path: Path,
                                       allowed: bool) -> Dict[str, Dict]:
    """Remove from ``state`` the optional tensors that ``path`` does not store; returns their current values."""
    optional = [set(getattr(unwrap_model(chunk), "optional_weight_keys", ())) for chunk in model_chunks]
    if not any(optional):
        return {}
    stored = dist_checkpointing.load_tensors_metadata(str(path))
    kept: Dict[str, Dict] = {}
    for (chunk_key, chunk_state), keys in zip(state.items(), optional):
        for name, tensor in list(chunk_state.items()):
            if getattr(tensor, "key", None) in keys and tensor.key not in stored:
                if not allowed:
                    raise ValueError(f"{path} has no {tensor.key}: it holds no trained head for this model (a "
                                     "language model's checkpoint, e.g. an SFT stage's, where a reward model's "
                                     "was expected?)")
                kept.setdefault(chunk_key, {})[name] = chunk_state.pop(name).data
                logger.info("%s has no %s: keeping its initial value", path, tensor.key)
    return kept


def _load_model_chunks(model_chunks, loaded: Dict[str, Any]) -> None:
    chunks = [unwrap_model(chunk) for chunk in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
