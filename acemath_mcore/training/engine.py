"""The one training engine under the SFT and reward-model trainers.

It owns the megatron-core pieces that do not depend on the task: model chunks (one per virtual pipeline
stage) wrapped in megatron's DistributedDataParallel, megatron's optimizer (optionally distributed), the LR
schedule, and a train step through ``get_forward_backward_func()`` so 1F1B and interleaved pipeline schedules
are used as-is. A :class:`Task` supplies what differs: how a micro-batch is fed to the model and the loss.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from torch.profiler import record_function

from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.attention import remember_document_bounds
from acemath_mcore.models.builder import (
    CUDA_GRAPH_WARMUP_STEPS,
    ModelOptions,
    build_model_chunk,
    transformer_config,
)
from acemath_mcore.models.specs import packed_qkv_format
from acemath_mcore.models.weights import load_full_weights
from acemath_mcore.options import OptimConfig, ParallelConfig
from acemath_mcore.runtime import device as device_lib

Batch = Dict[str, torch.Tensor]


class Task(Protocol):
    """What a trainer plugs into the engine: a forward pass on one micro-batch and its loss."""

    loss_name: str  # the report key the trainer logs as the stage's loss
    head_outputs: Optional[int]  # output-head width for the FLOPs count (None: the LM head's padded vocabulary)

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple: ...


def packed_seq_params(batch: Batch, qkv_format: str = "thd",
                      device: Optional[torch.device] = None) -> Optional[PackedSeqParams]:
    """PackedSeqParams for a packed micro-batch (document boundaries in ``cu_seqlens``), None for a padded one.
    Given the host batch a loader yields, it reads the boundaries there and moves only ``cu_seqlens`` to
    ``device``: nothing in the forward pass then reads them back from the GPU."""
    if "cu_seqlens" not in batch:
        return None
    cu_seqlens = batch["cu_seqlens"].to(torch.int32).reshape(-1)
    bounds = cu_seqlens.tolist() if cu_seqlens.device.type == "cpu" else None
    if device is not None:
        cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    if qkv_format == "sbhd":
        # megatron sizes the RoPE table by max_seqlen for packed input; sbhd rows use row positions.
        max_seqlen = batch["tokens"].shape[-1]
    elif "max_seqlen" in batch:
        max_seqlen = int(batch["max_seqlen"])
    elif bounds is not None:
        max_seqlen = max(end - start for start, end in zip(bounds[:-1], bounds[1:]))
    else:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    params = PackedSeqParams(qkv_format=qkv_format, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    if bounds is not None:
        remember_document_bounds(params, bounds)
    return params


class Engine:
    """Model chunks + DDP + optimizer + schedule for one rank."""

    def __init__(self, arch: ModelArch, parallel: ParallelConfig, model_options: ModelOptions, optim: OptimConfig,
                 train_steps: int, model_chunk_builder: Callable = build_model_chunk):
        if optim.overlap_problem():  # the recipes' checks say so before set-up; this is for library callers
            raise ValueError(optim.overlap_problem())
        self.arch = arch
        self.config = transformer_config(arch, parallel, model_options, with_ddp=True)
        self.config.calculate_per_token_loss = True
        self.packed_qkv_format = packed_qkv_format(model_options.spec)
        stages = parallel.virtual_pipeline_parallel or 1
        chunks = [
            model_chunk_builder(arch, self.config, model_options.spec, vp_stage=stage if stages > 1 else None)
            for stage in range(stages)
        ]
        if self.config.bf16:
            # Casts first-stage inputs to bf16 and last-stage outputs back to fp32, as Megatron-LM does.
            chunks = [Float16Module(self.config, chunk) for chunk in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=optim.overlap_grad_reduce,
            overlap_param_gather=optim.overlap_param_gather,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        )
        self.model: List[DistributedDataParallel] = [
            DistributedDataParallel(self.config, ddp_config, chunk, disable_bucketing=index > 0)
            for index, chunk in enumerate(chunks)
        ]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=model_options.bf16,
                params_dtype=self.config.params_dtype,
                use_distributed_optimizer=optim.use_distributed_optimizer,
            ),
            self.model,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optim.warmup_steps else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(train_steps, optim.warmup_steps + 1),
            lr_decay_style=optim.decay_style,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=max(train_steps, 1),
            wd_incr_style="constant",
            # On resume the configured schedule wins (the checkpoint gives only the step count), so an lr or
            # length override takes effect; checkpointing.load_checkpoint reports what changed.
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        if optim.overlap_grad_reduce:
            self.config.grad_sync_func = [m.start_grad_sync for m in self.model]
            if len(self.model) == 1:
                self.config.grad_sync_func = self.config.grad_sync_func[0]
        self.step = 0
        self.graphs = LayerGraphs(self) if model_options.cuda_graph else None

    def load_full_weights(self, full: Dict[str, torch.Tensor]) -> None:
        """Load canonical full tensors (e.g. converted from HF) into this rank's shards, then refresh the
        optimizer's fp32 main copies so training starts from exactly these weights."""
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        for chunk in self.model:
            load_full_weights(chunk, full, tp_rank, tp_size)
        self.optimizer.reload_model_params()

    # ---- one optimizer step -------------------------------------------------------------------------------
    def forward_backward(self, task: Task, micro_batches: Sequence[Batch], forward_only: bool = False) -> List[Dict]:
        """Run megatron's schedule over this rank's micro-batches; returns per-micro-batch loss reports
        (non-empty on the last pipeline stage only)."""
        return run_schedule(self.model, task, micro_batches, self.packed_qkv_format, forward_only)

    def train_step(self, task: Task, micro_batches: Sequence[Batch], nan_policy: str = "stop") -> Dict[str, float]:
        """Forward/backward over this rank's share of the global batch, then one optimizer + LR step.

        A non-finite loss, or a finite loss with a non-finite gradient norm (bf16 has no loss scaler to catch it,
        and megatron's clipping lets NaN through), is known on every rank before the optimizer touches the weights:
        it raises (``nan_policy="stop"``) or skips this update (``"skip"``). The host waits for the device once
        before the update, for the gradient norm; the losses are reduced on the device meanwhile.
        """
        for chunk in self.model:
            chunk.train()
        if self.graphs is not None:
            self.graphs.before_step(micro_batches)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        # The named ranges (STEP_PHASES) mark the step's phases in a torch-profiler trace
        # (benchmarks/train_throughput.py --profile reports the GPU's idle time per phase from them).
        with record_function("forward_backward"):
            reports = self.forward_backward(task, micro_batches)
        with record_function("loss_reduction"):
            names, totals = reduce_report_totals(reports)  # queued on the device: no wait here
        with record_function("grad_norm"):
            grad_norm = self._gradient_norm()  # megatron returns a float: the step's wait for the device
        metrics = report_means(names, totals)  # computed by now: a copy, not a second wait
        metrics["grad_norm"] = grad_norm
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies (the scheduler moves on after it)
        non_finite = [k for k, v in metrics.items() if not math.isfinite(v)]
        if non_finite and nan_policy == "stop":
            raise FloatingPointError(f"not finite at step {self.step + 1}: {', '.join(non_finite)} ({metrics}); "
                                     "stopping before the optimizer step (set nan_policy=skip to skip such steps)")
        success = False
        if not non_finite:
            with _precomputed_grad_norm(self.optimizer, grad_norm), record_function("optimizer_step"):
                success, _, _ = self.optimizer.step()
        if success:
            self.scheduler.step(increment=1)
        self.step += 1
        metrics.update(lr=lr, skipped=float(not success))
        return metrics

    @torch.no_grad()
    def evaluate(self, task: Task, global_batches: Iterable[Sequence[Batch]]) -> Dict[str, float]:
        """Forward passes only (no gradients, no update) over this rank's share of each global batch; the metrics
        are means over all of them together, weighted like training's (per loss token, per problem group)."""
        for chunk in self.model:  # with overlap_param_gather, forward pre-hooks still gather the updated weights
            chunk.eval()
        reports = []
        for micro_batches in global_batches:
            reports += self.forward_backward(task, micro_batches, forward_only=True)
        return reduce_reports(reports)

    def _gradient_norm(self) -> float:
        """The global gradient norm, computed before the step: ``prepare_grads`` readies the main gradients (a
        no-op copy when repeated by ``step``; bf16 has no loss scaler to unscale twice)."""
        self.optimizer.prepare_grads()
        return float(self.optimizer.get_grad_norm())


# The record_function names of Engine.train_step's phases, as a profiler trace shows them.
STEP_PHASES = ("forward_backward", "forward", "loss_reduction", "grad_norm", "optimizer_step")


class LayerGraphs:
    """Transformer Engine CUDA graphs of every layer's MLP (``model_options.cuda_graph="mlp"``): a few eager steps
    first, then megatron's ``TECudaGraphHelper`` captures them and each training forward replays them, attention
    still running eagerly with the micro-batch's own ``cu_seqlens``. A graph holds fixed-size buffers, so every
    later micro-batch must have the captured (tokens, rows) shape and every step the captured count."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.eager_steps = 0
        self.captured: Optional[tuple] = None  # ((tokens, rows), micro-batches per step)

    def before_step(self, micro_batches: Sequence[Batch]) -> None:
        shapes = sorted({_activation_shape(batch) for batch in micro_batches})
        if self.captured is None:
            if self.eager_steps < CUDA_GRAPH_WARMUP_STEPS:
                self.eager_steps += 1
                return
            if len(shapes) > 1:
                raise ValueError(f"CUDA graphs need micro-batches of one shape, this step's have (tokens, rows) "
                                 f"{shapes}")
            self._capture(shapes[0], len(micro_batches))
        elif (shapes, len(micro_batches)) != ([self.captured[0]], self.captured[1]):
            raise ValueError(f"the CUDA graphs were captured for {self.captured[1]} micro-batches of (tokens, rows) "
                             f"{self.captured[0]}; this step has {len(micro_batches)} of {shapes}")

    def _capture(self, shape: tuple, num_micro_batches: int) -> None:
        from megatron.core import num_microbatches_calculator as calculator
        from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

        tokens, rows = shape
        dp = parallel_state.get_data_parallel_world_size()
        # The helper sizes its capture from megatron's global micro-batch calculator, which this engine does not
        # otherwise use: describe this step's batch to it.
        calculator.destroy_num_microbatches_calculator()
        calculator.init_num_microbatches_calculator(torch.distributed.get_rank(), None, rows * num_micro_batches * dp,
                                                    rows, dp)
        # TE refuses to graph modules with hooks: the distributed optimizer's parameter all-gather hooks come off
        # for the capture and are then called by hand before each replay.
        hooked = [chunk for chunk in self.engine.model if getattr(chunk, "use_forward_hook", False)]
        for chunk in hooked:
            chunk.disable_forward_pre_hook(param_sync=False)
        helper = TECudaGraphHelper(self.engine.model, self.engine.config, tokens, rows,
                                   optimizers=[self.engine.optimizer])
        helper.create_cudagraphs()  # runs its own warm-up passes on static inputs, then zeroes the gradients
        if not helper.graphs_created():  # megatron only logs a warning when no layer qualifies
            raise RuntimeError("model_options.cuda_graph: megatron found no layer to graph in this model")
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
        if hooked:
            helper.cuda_graph_set_manual_hooks()
        self.captured = (shape, num_micro_batches)


@contextlib.contextmanager
def _precomputed_grad_norm(optimizer, grad_norm: float):
    """Let megatron's ChainedOptimizer.step (what ``get_megatron_optimizer`` returns in 0.16-0.19) clip with the
    norm :meth:`Engine._gradient_norm` already reduced over all ranks, instead of computing it a second time."""
    optimizer.get_grad_norm = lambda: grad_norm
    try:
        yield
    finally:
        del optimizer.get_grad_norm


def run_schedule(model: Sequence[torch.nn.Module], task: Task, micro_batches: Sequence[Batch],
                 packed_qkv_format: str, forward_only: bool = False) -> List[Dict]:
    """megatron's forward(/backward) schedule (no pipelining, 1F1B or interleaved) over model chunks; shared by
    training and by inference that needs no optimizer (reward scoring). Returns the last stage's loss reports."""

    device = device_lib.current_device()

    def forward_step(data_iterator: Iterable[Batch], chunk: torch.nn.Module):
        # Loaders yield host tensors; move them to this rank's device here, once. The packing parameters are
        # built from the host batch, whose document boundaries need no read-back from the device.
        host_batch = next(data_iterator)
        batch = {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                 for key, value in host_batch.items()}
        batch["packed_seq_params"] = packed_seq_params(host_batch, packed_qkv_format, device)
        with record_function("forward"):  # the backward passes run under megatron's schedule, outside this range
            output = task.forward(chunk, batch)
        return output, lambda out: task.loss(batch, out)

    seq_length, micro_batch_size = _activation_shape(micro_batches[0])
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        shapes = sorted({_activation_shape(batch) for batch in micro_batches})
        if len(shapes) > 1:
            # megatron's schedules exchange activations of one (seq_length, micro_batch_size) shape per call.
            raise ValueError(f"pipeline parallelism needs micro-batches of one shape, this step's have (tokens, rows) "
                             f"{shapes}: pad them to a common shape (the padded reward-model loader does so)")
    iterators = [iter(micro_batches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=list(model) if len(model) > 1 else model[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def _activation_shape(batch: Batch) -> tuple:
    """(seq_length, micro_batch_size) of the activations passed between pipeline stages."""
    tokens = batch["tokens"]
    if "cu_seqlens" in batch:
        return tokens.numel(), 1
    return tokens.shape[1], tokens.shape[0]


def reduce_reports(reports: List[Dict]) -> Dict[str, float]:
    """Global-batch means of every ``[sum, count]`` report (see :func:`reduce_report_totals`)."""
    return report_means(*reduce_report_totals(reports))


def reduce_report_totals(reports: List[Dict]) -> Tuple[List[str], torch.Tensor]:
    """(report names, ``[names, 2]`` device tensor of sums and counts): summed over micro-batches on the last
    pipeline stage, all-reduced over data-parallel ranks, then broadcast to every pipeline stage so all ranks log
    them. Nothing here waits for the device (with PP, the names' broadcast does)."""
    keys = sorted(reports[0]) if reports else []
    is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    names = _broadcast_object(keys, is_last)
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=device_lib.current_device())
    for report in reports:
        for i, name in enumerate(names):
            totals[i] += report[name].to(torch.float64)
    if is_last:
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if torch.distributed.get_world_size(pp_group) > 1:
        last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(totals, src=last_rank, group=pp_group)
    return names, totals


def report_means(names: List[str], totals: torch.Tensor) -> Dict[str, float]:
    """``{name: sum / count}`` with log-friendly names, in one device-to-host copy."""
    means = (totals[:, 0] / totals[:, 1].clamp(min=1)).tolist()
    return {name.replace(" ", "_"): mean for name, mean in zip(names, means)}


def _broadcast_object(obj, is_source: bool):
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if torch.distributed.get_world_size(pp_group) == 1:
        return obj
    holder = [obj if is_source else None]
    torch.distributed.broadcast_object_list(holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                            group=pp_group)
    return holder[0]
