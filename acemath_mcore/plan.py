"""Parallel-layout planner: which TP / PP / VPP / CP / DP layouts fit a GPU's memory, and which is fastest.

Plain arithmetic over a :class:`ModelArch` (no process group, no model), so it runs on a login node and feeds the
Slurm templates' defaults (``launch/plan.py --format overrides``). The formulas are stated where they are computed
and collected in docs/planner.md. Memory is per GPU and itemised; for pipelined layouts the first and the last
stage are both estimated (the first holds the most activations, the last the LM head and logits) and the larger
one is reported.

Assumptions, matching the engine and recipes: megatron DDP with fp32 main gradients (``grad_reduce_in_fp32``),
Adam, bf16 parameters with fp32 master copies (or plain fp32), the distributed optimizer sharding optimizer state
over DP x CP, sequence parallelism whenever TP > 1, flash attention (no s x s tensor), 1F1B or interleaved
pipeline schedules, and each row of ``seq_length`` tokens counted as one document (an upper bound for the
attention FLOPs of packed rows).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.presets import get_preset
from acemath_mcore.options import LM_CROSS_ENTROPY_KERNELS
from acemath_mcore.runtime.device import BF16_PEAK_FLOPS
from acemath_mcore.training.flops import matmul_parameters, training_flops

GIB = 2**30

RECOMPUTE_MODES = ("none", "selective", "full")

# Tensor-parallel collectives per layer and micro-batch with sequence parallelism: forward all-gathers before
# QKV and FC1 and reduce-scatters after the output projection and FC2 (4); backward the reverse four plus
# re-gathering the two saved sequence-sharded inputs for the weight gradients (6); full recompute repeats the
# forward's four.
TP_COLLECTIVES_PER_LAYER = 10
TP_COLLECTIVES_PER_RECOMPUTE = 4

# Each model chunk sends its output activations forward and receives their gradient backward (sequence-parallel
# shards, s b h / (TP CP) elements each); more virtual stages mean more of these transfers.
PP_TRANSFERS_PER_CHUNK = 2

# Context parallelism moves every other rank's K and V once forward and K, V and their gradients backward.
CP_KV_TRANSFERS_PER_LAYER = 3

# Bytes per logit element on the last stage while cross entropy runs, by loss kernel (ModelOptions.cross_entropy)
# and bf16. Ours (models/cross_entropy.py): the logits alone, their gradient overwrites them. megatron's, bf16: the
# bf16 logits, the fp32 softmax it keeps for the backward pass and one fp32 temporary of its fused kernel (with
# these 10 bytes the planner reproduced the peaks measured for qwen2.5-1.5b on an H100, and ours the 9.3 GiB less
# measured at micro-batch 2; see docs/planner.md). fp32: the softmax overwrites the logits in place.
LOGIT_BYTES = {("triton", True): 2, ("triton", False): 4, ("megatron", True): 10, ("megatron", False): 4}


@dataclasses.dataclass(frozen=True)
class GpuType:
    """What the planner needs to know about an accelerator."""

    name: str
    memory_bytes: int  # what torch reports as total memory (the datasheet capacity minus the driver's reserve)
    bf16_peak_flops: float  # dense tensor-core peak, from runtime.device's table
    intra_node_bytes_per_s: float  # achievable all-gather / reduce-scatter bus bandwidth over NVLink
    inter_node_bytes_per_s: float  # the same across nodes, per GPU (one 400 Gb/s NIC per H100/H200, 200 for A100)


GPU_TYPES: Dict[str, GpuType] = {
    "h100-80gb": GpuType("h100-80gb", int(79.1 * GIB), BF16_PEAK_FLOPS["H100"], 360e9, 40e9),
    "h200-141gb": GpuType("h200-141gb", int(139.8 * GIB), BF16_PEAK_FLOPS["H200"], 360e9, 40e9),
    "a100-80gb": GpuType("a100-80gb", int(79.2 * GIB), BF16_PEAK_FLOPS["A100"], 230e9, 20e9),
}


def get_gpu_type(name: str) -> GpuType:
    """``h100`` or ``h100-80gb`` (likewise h200, a100)."""
    for key, gpu in GPU_TYPES.items():
        if name.lower() in (key, key.split("-")[0]):
            return gpu
    raise KeyError(f"unknown GPU type {name!r}; known: {', '.join(GPU_TYPES)} (or their first word)")


class PlanError(ValueError):
    """No layout can run this request; the message says why and what to change."""


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """One training job to lay out: model, cluster, batch shape and numerics."""

    arch: ModelArch
    gpus: int
    seq_length: int
    global_batch: int  # samples per step: packed rows for SFT, problems (of ``responses`` rows each) for RM
    micro_batch: int = 1
    model_name: str = "custom"
    gpus_per_node: int = 8
    gpu: GpuType = GPU_TYPES["h100-80gb"]
    task: str = "sft"  # sft (LM head + cross entropy) | rm (scalar head, no LM head, no context parallelism)
    cross_entropy: str = "triton"  # the loss kernel: triton (ours, the default on CUDA) | megatron
    responses: int = 6  # rm: padded rows per problem
    bf16: bool = True
    distributed_optimizer: bool = True
    recompute: Tuple[str, ...] = ("none", "full")  # modes to consider
    context_parallel: Tuple[int, ...] = (1,)  # sizes to consider
    overhead_bytes: int = 4 * GIB  # CUDA context, NCCL buffers, allocator fragmentation
    headroom: float = 0.10  # fraction of GPU memory left free by a layout that "fits"
    mfu: float = 0.5  # assumed fraction of the bf16 peak the matrix multiplies reach
    # (TP, PP, VPP or None) every layout must have: a resume whose optimizer state fits only that split.
    model_parallel: Optional[Tuple[int, int, Optional[int]]] = None

    def __post_init__(self):
        if self.task not in ("sft", "rm"):
            raise ValueError(f"task must be 'sft' or 'rm', got {self.task!r}")
        if self.cross_entropy not in LM_CROSS_ENTROPY_KERNELS:
            raise ValueError(f"cross_entropy must be one of {LM_CROSS_ENTROPY_KERNELS}, got {self.cross_entropy!r}")
        unknown = [mode for mode in self.recompute if mode not in RECOMPUTE_MODES]
        if unknown:
            raise ValueError(f"recompute modes must be among {RECOMPUTE_MODES}, got {unknown}")

    @property
    def rows_per_sample(self) -> int:
        return self.responses if self.task == "rm" else 1

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_bytes * (1.0 - self.headroom)


def request_for(model: str, **fields) -> PlanRequest:
    """A :class:`PlanRequest` for a preset name (``model_name`` set to it)."""
    return PlanRequest(arch=get_preset(model), model_name=model, **fields)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to split the job; ``data_parallel`` is what the GPU count leaves."""

    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline_parallel: Optional[int]  # None: plain 1F1B
    context_parallel: int
    data_parallel: int
    recompute: str  # none | selective | full

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    @property
    def chunks_per_stage(self) -> int:
        return self.virtual_pipeline_parallel or 1

    def describe(self) -> str:
        vpp = self.virtual_pipeline_parallel or "-"
        return (f"TP={self.tensor_parallel} PP={self.pipeline_parallel} VPP={vpp} CP={self.context_parallel} "
                f"DP={self.data_parallel} recompute={self.recompute}")


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU of one pipeline stage at its peak."""

    stage: str  # "first", "last" or "only" (PP = 1)
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits + self.overhead


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step and where they go."""

    micro_batch_s: float  # slowest pipeline stage: compute + TP, CP and pipeline communication
    compute_s: float  # of which matrix multiplies (slowest stage, per micro-batch)
    bubble_fraction: float  # (PP - 1) / (VPP x micro-batches)
    data_parallel_s: float  # exposed parameter all-gather of the distributed optimizer
    step_s: float


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What the planner says about one layout."""

    layout: Layout
    micro_batches: int  # per data-parallel rank and step
    memory: MemoryBreakdown  # the worse of the first and last stage
    time: StepTime
    tokens_per_s: float
    fits: bool


# ---- memory ------------------------------------------------------------------------------------------------------
def layer_parameters_per_rank(arch: ModelArch, tensor_parallel: int) -> int:
    """One transformer layer's parameters on one TP rank: the matrices and QKV bias are split, norms replicated."""
    h, d = arch.hidden_size, arch.kv_channels
    qkv_width = d * (arch.num_attention_heads + 2 * arch.num_query_groups)
    split = h * qkv_width + arch.num_attention_heads * d * h + 3 * h * arch.ffn_hidden_size
    if arch.qkv_bias:
        split += qkv_width
    return split // tensor_parallel + 2 * h


def stage_parameters(request: PlanRequest, layout: Layout, first: bool, last: bool) -> int:
    """Parameters of one GPU of a pipeline stage. The first stage holds the word embeddings; the last the final
    norm and the LM head (a separate copy even for tied embeddings once PP > 1) or, for the RM, the scalar head."""
    arch, tp = request.arch, layout.tensor_parallel
    count = arch.num_layers // layout.pipeline_parallel * layer_parameters_per_rank(arch, tp)
    vocab_rows = arch.padded_vocab_size * arch.hidden_size // tp
    if first:
        count += vocab_rows
    if last:
        count += arch.hidden_size  # final norm
        if request.task == "rm":
            count += arch.hidden_size  # scalar head, replicated
        elif not (arch.tie_embeddings and first):
            count += vocab_rows
    return count


def layer_activation_elements(arch: ModelArch) -> int:
    """Elements per token one transformer layer keeps for its backward pass (Korthikanti et al. 2022, counted
    for this architecture: RMSNorm, GQA, SwiGLU, no dropout, flash attention so no s x s term):
    attention: norm input, QKV input (h each), Q (heads x d), K and V (2 x groups x d), attention output = output
    projection input (heads x d); MLP: norm input, FC1 input (h each), FC1 output (2 x ffn, SwiGLU's input),
    SwiGLU output = FC2 input (ffn)."""
    h, d = arch.hidden_size, arch.kv_channels
    attention = 2 * h + 2 * arch.num_attention_heads * d + 2 * arch.num_query_groups * d
    mlp = 2 * h + 3 * arch.ffn_hidden_size
    return attention + mlp


def chunk_micro_batches_in_flight(layout: Layout, micro_batches: int, stage: int) -> int:
    """Model-chunk forward passes whose activations a pipeline rank holds at its peak (megatron's warm-up count
    plus the one in the steady state). 1F1B: PP - stage; interleaved: 2 (PP - stage - 1) + (VPP - 1) PP + 1,
    so the first stage holds L (1 + (PP - 1) / (PP VPP)) layers' worth; never more than the step has."""
    pp, chunks = layout.pipeline_parallel, layout.chunks_per_stage
    if pp == 1:
        return 1
    if chunks == 1:
        return min(pp - stage, micro_batches)
    return min(2 * (pp - stage - 1) + (chunks - 1) * pp + 1, micro_batches * chunks)


def stage_memory(request: PlanRequest, layout: Layout, micro_batches: int, stage: int) -> MemoryBreakdown:
    """Itemised peak bytes of one GPU of pipeline stage ``stage`` (0-based).

    parameters 2 B (bf16) or 4 B (fp32) per parameter; gradients 4 B (fp32 main grads, never sharded);
    optimizer 12 B (fp32 master, Adam m and v) or 8 B (fp32 training: m and v), divided by DP x CP with the
    distributed optimizer; activations per layer and micro-batch ``layer_activation_elements`` x s b / (TP CP)
    elements times the layers in flight (full recompute: only each layer's input, h elements, plus one layer
    being recomputed); the last stage adds the final norm's and head's inputs (2 h) and the logits.
    """
    arch, tp, pp, cp = request.arch, layout.tensor_parallel, layout.pipeline_parallel, layout.context_parallel
    first, last = stage == 0, stage == pp - 1
    parameters = stage_parameters(request, layout, first, last)
    shards = layout.data_parallel * cp if request.distributed_optimizer else 1
    optimizer_bytes = 12 if request.bf16 else 8
    activation_bytes = 2 if request.bf16 else 4
    # Sequence parallelism shards every stored activation over TP; context parallelism over CP.
    rank_tokens = request.seq_length * request.micro_batch * request.rows_per_sample // cp
    tokens = rank_tokens // tp
    layers_per_chunk = arch.num_layers // (pp * layout.chunks_per_stage)
    layers_in_flight = layers_per_chunk * chunk_micro_batches_in_flight(layout, micro_batches, stage)
    layer_elements = layer_activation_elements(arch)
    if layout.recompute == "full":
        stored = layers_in_flight * arch.hidden_size + layer_elements
    else:  # selective recompute of core attention only drops flash attention's softmax statistics
        stored = layers_in_flight * layer_elements
    logits = 0
    if last:
        stored += 2 * arch.hidden_size
        if request.task == "sft":
            # The LM head gathers the sequence and splits the vocabulary over TP.
            logits = rank_tokens * (arch.padded_vocab_size // tp) * LOGIT_BYTES[request.cross_entropy, request.bf16]
    return MemoryBreakdown(
        stage="only" if pp == 1 else ("first" if first else "last"),
        parameters=parameters * (2 if request.bf16 else 4),
        gradients=parameters * 4,
        optimizer=-(-parameters * optimizer_bytes // shards),
        activations=stored * tokens * activation_bytes,
        logits=logits,
        overhead=request.overhead_bytes,
    )


def peak_memory(request: PlanRequest, layout: Layout, micro_batches: int) -> MemoryBreakdown:
    """The worse of the first and the last pipeline stage (the stages between hold less than the first)."""
    stages = {0, layout.pipeline_parallel - 1}
    return max((stage_memory(request, layout, micro_batches, s) for s in sorted(stages)), key=lambda m: m.total)


# ---- time --------------------------------------------------------------------------------------------------------
def step_time(request: PlanRequest, layout: Layout, micro_batches: int) -> StepTime:
    """Step time from model FLOPs at an assumed MFU, plus communication megatron does not overlap.

    Per micro-batch the slowest stage (the last one, with the LM head) takes FLOPs / (TP CP peak MFU) plus its TP
    collectives, CP K/V exchange and pipeline transfers; the pipeline takes that x (m + (PP - 1) / VPP) for m
    micro-batches per DP rank; the distributed optimizer's parameter all-gather follows (the gradient
    reduce-scatter overlaps the backward pass). Full recompute adds a forward pass of every layer, selective
    recompute one of core attention.
    """
    arch, gpu = request.arch, request.gpu
    tp, pp, cp = layout.tensor_parallel, layout.pipeline_parallel, layout.context_parallel
    chunks = layout.chunks_per_stage
    rows, s = request.micro_batch * request.rows_per_sample, request.seq_length
    tokens = rows * s
    model_flops = training_flops(arch, [s] * rows)
    head_flops = 6.0 * arch.padded_vocab_size * arch.hidden_size * tokens
    attention_flops = model_flops - 6.0 * matmul_parameters(arch) * tokens
    layer_flops = (model_flops - head_flops) / arch.num_layers
    if layout.recompute == "full":
        layer_flops += layer_flops / 3
    elif layout.recompute == "selective":
        layer_flops += attention_flops / arch.num_layers / 3
    layers = arch.num_layers // pp
    stage_flops = layers * layer_flops + (head_flops if request.task == "sft" else 0.0)
    compute_s = stage_flops / (tp * cp) / (gpu.bf16_peak_flops * request.mfu)

    activation_bytes = 2 if request.bf16 else 4
    communication_s = 0.0
    if tp > 1:
        collectives = TP_COLLECTIVES_PER_LAYER + (TP_COLLECTIVES_PER_RECOMPUTE if layout.recompute == "full" else 0)
        per_collective = (tp - 1) / tp * tokens / cp * arch.hidden_size * activation_bytes
        communication_s += layers * collectives * per_collective / gpu.intra_node_bytes_per_s
    if cp > 1:
        kv_bytes = tokens * 2 * arch.num_query_groups * arch.kv_channels // tp * activation_bytes
        bandwidth = _bandwidth(request, tp * cp)
        communication_s += layers * CP_KV_TRANSFERS_PER_LAYER * (cp - 1) / cp * kv_bytes / bandwidth
    if pp > 1:
        # PP is the outermost rank dimension: neighbouring stages share a node only when the whole job does.
        boundary_bytes = tokens // (tp * cp) * arch.hidden_size * activation_bytes
        transfers = PP_TRANSFERS_PER_CHUNK * chunks
        communication_s += transfers * boundary_bytes / _bandwidth(request, request.gpus)
    micro_batch_s = compute_s + communication_s
    pipeline_s = micro_batch_s * (micro_batches + (pp - 1) / chunks)

    data_parallel_s = 0.0
    shards = layout.data_parallel * cp
    if request.distributed_optimizer and shards > 1:
        parameters = max(stage_parameters(request, layout, first=stage == 0, last=stage == pp - 1)
                         for stage in {0, pp - 1})
        gathered = (shards - 1) / shards * parameters * (2 if request.bf16 else 4)
        data_parallel_s = gathered / _bandwidth(request, tp * cp * layout.data_parallel)
    return StepTime(micro_batch_s=micro_batch_s, compute_s=compute_s,
                    bubble_fraction=(pp - 1) / (chunks * micro_batches),
                    data_parallel_s=data_parallel_s, step_s=pipeline_s + data_parallel_s)


def _bandwidth(request: PlanRequest, group_span: int) -> float:
    """megatron orders ranks TP, CP, DP, PP (TP fastest): a group whose span fits a node talks over NVLink."""
    if group_span <= request.gpus_per_node:
        return request.gpu.intra_node_bytes_per_s
    return request.gpu.inter_node_bytes_per_s


# ---- layouts -----------------------------------------------------------------------------------------------------
def check_layout(request: PlanRequest, layout: Layout) -> int:
    """Raise ValueError naming the broken rule; return micro-batches per DP rank and step."""
    arch, tp, pp, cp = request.arch, layout.tensor_parallel, layout.pipeline_parallel, layout.context_parallel
    vpp = layout.virtual_pipeline_parallel
    arch.check_tensor_parallel(tp)
    if tp > request.gpus_per_node:
        raise ValueError(f"tensor_parallel={tp} spans more than one node of {request.gpus_per_node} GPUs")
    if arch.num_layers % pp:
        raise ValueError(f"pipeline_parallel={pp} does not divide num_layers={arch.num_layers}")
    if layout.model_parallel_size * layout.data_parallel != request.gpus:
        raise ValueError(f"TP x PP x CP x DP = {layout.model_parallel_size * layout.data_parallel} "
                         f"is not the {request.gpus} GPUs")
    if cp > 1 and request.task == "rm":
        raise ValueError("the reward model does not support context parallelism")
    if cp > 1 and request.seq_length % (2 * cp):
        raise ValueError(f"context_parallel={cp} needs seq_length divisible by 2 x CP = {2 * cp}")
    per_step = request.micro_batch * layout.data_parallel
    if request.global_batch % per_step:
        raise ValueError(f"global batch {request.global_batch} is not divisible by micro-batch "
                         f"{request.micro_batch} x DP {layout.data_parallel} = {per_step}")
    micro_batches = request.global_batch // per_step
    if vpp is not None:
        if pp < 2 or vpp < 2:
            raise ValueError("virtual pipelining needs pipeline_parallel >= 2 and virtual_pipeline_parallel >= 2")
        if arch.num_layers % (pp * vpp):
            raise ValueError(f"PP x VPP = {pp * vpp} does not divide num_layers={arch.num_layers}")
        if micro_batches % pp:
            raise ValueError(f"the interleaved schedule runs micro-batches in groups of PP={pp}; "
                             f"{micro_batches} per DP rank is not a multiple")
    return micro_batches


def candidate_layouts(request: PlanRequest) -> List[Layout]:
    """Every TP x PP x VPP x CP x recompute combination worth checking on ``request.gpus`` GPUs."""
    layers, gpus = request.arch.num_layers, request.gpus
    layouts = []
    for tp in _divisors(gpus):
        for cp in request.context_parallel:
            for pp in _divisors(layers):
                if gpus % (tp * pp * cp):
                    continue
                virtual = [None] + [v for v in _divisors(layers // pp) if v > 1 and pp > 1]
                for vpp in virtual:
                    if request.model_parallel not in (None, (tp, pp, vpp)):
                        continue
                    for recompute in request.recompute:
                        layouts.append(Layout(tp, pp, vpp, cp, gpus // (tp * pp * cp), recompute))
    return layouts


def estimate(request: PlanRequest, layout: Layout) -> Estimate:
    """Memory and step time of one layout (ValueError if it is not valid for the request)."""
    micro_batches = check_layout(request, layout)
    memory = peak_memory(request, layout, micro_batches)
    time = step_time(request, layout, micro_batches)
    tokens = request.global_batch * request.rows_per_sample * request.seq_length
    return Estimate(layout=layout, micro_batches=micro_batches, memory=memory, time=time,
                    tokens_per_s=tokens / time.step_s, fits=memory.total <= request.usable_bytes)


def plan(request: PlanRequest) -> List[Estimate]:
    """Every valid layout: those that fit, fastest first, then the rest, leanest first."""
    estimates = []
    for layout in candidate_layouts(request):
        try:
            check_layout(request, layout)
        except ValueError:  # not a valid split for this model, GPU count or batch: not a candidate
            continue
        estimates.append(estimate(request, layout))  # a failure here is a bug in the model, not a skip
    if not estimates and request.model_parallel:
        tp, pp, vpp = request.model_parallel
        raise PlanError(
            f"no valid layout of {request.model_name} on {request.gpus} GPUs with TP={tp}, PP={pp}, VPP={vpp or 1} "
            f"(required: the checkpoint's optimizer state fits only that split): the data-parallel size left must "
            f"divide global batch {request.global_batch} / micro-batch {request.micro_batch}, and TP x PP must "
            "divide the GPU count")
    if not estimates:
        raise PlanError(
            f"no valid layout of {request.model_name} on {request.gpus} GPUs: no TP x PP x CP split gives a "
            f"data-parallel size that divides global batch {request.global_batch} / micro-batch "
            f"{request.micro_batch} while TP divides the heads, query groups and FFN and stays within a node "
            f"of {request.gpus_per_node}")
    return sorted(estimates, key=lambda e: (0, e.time.step_s) if e.fits else (1, e.memory.total))


# Layouts within this fraction of the fastest step time count as equally fast.
TIE_FRACTION = 0.01


def recommend(estimates: Sequence[Estimate], request: PlanRequest) -> Estimate:
    """The fastest layout that fits with the headroom; among layouts within ``TIE_FRACTION`` of it, the one with
    the least model parallelism (fewer ranks to coordinate, more data parallelism to scale with). Layouts with
    context parallelism are estimates only: the trainer refuses them, so they are never recommended."""
    fitting = [e for e in estimates if e.fits and e.layout.context_parallel == 1]
    if not fitting:
        remedies = ["more GPUs (launch/plan.py without --gpus finds the smallest count that fits)",
                    "a GPU with more memory"]
        if "full" not in request.recompute:
            remedies.append("full recompute")
        if request.micro_batch > 1:
            remedies.append("a smaller micro-batch")
        with_cp = [e for e in estimates if e.fits]
        if with_cp:
            lean = min(with_cp, key=lambda e: (e.layout.model_parallel_size, e.time.step_s))
            raise PlanError(
                f"only layouts with context parallelism fit {request.gpus} x {request.gpu.name} (e.g. "
                f"{lean.layout.describe()}), and the trainer refuses CP > 1 (its loaders do not split sequences "
                f"across CP ranks). Use {', or '.join(remedies)}.")
        leanest = min(estimates, key=lambda e: e.memory.total)
        raise PlanError(
            f"no layout of {request.model_name} fits {request.gpus} x {request.gpu.name} "
            f"({request.gpu.memory_bytes / GIB:.1f} GiB, {request.usable_bytes / GIB:.1f} GiB usable with "
            f"{request.headroom:.0%} headroom): the leanest, {leanest.layout.describe()}, needs "
            f"{leanest.memory.total / GIB:.1f} GiB per GPU. Use {', or '.join(remedies)}.")
    fastest = min(e.time.step_s for e in fitting)
    near = [e for e in fitting if e.time.step_s <= fastest * (1 + TIE_FRACTION)]
    return min(near, key=lambda e: (e.layout.model_parallel_size, e.time.step_s))


def smallest_cluster(request: PlanRequest, max_gpus: int = 512) -> Tuple[PlanRequest, List[Estimate], Estimate]:
    """The fewest GPUs (1, 2, 4, ... nodes, up to ``max_gpus``) on which some layout fits; ``request.gpus`` is
    ignored. Returns the request at that size, its estimates and the recommendation."""
    gpus, last_error = request.gpus_per_node, None
    while gpus <= max_gpus:
        sized = dataclasses.replace(request, gpus=gpus)
        try:
            estimates = plan(sized)
            return sized, estimates, recommend(estimates, sized)
        except PlanError as error:
            last_error = error
        gpus *= 2
    raise PlanError(f"nothing fits on up to {max_gpus} GPUs; at {max_gpus}: {last_error}")


def recipe_overrides(estimate: Estimate, request: PlanRequest) -> List[str]:
    """``key=value`` overrides of a TrainConfig (launch/train_*.py) that select this layout."""
    layout = estimate.layout
    vpp = layout.virtual_pipeline_parallel
    return [
        f"parallel.tensor_parallel={layout.tensor_parallel}",
        f"parallel.pipeline_parallel={layout.pipeline_parallel}",
        f"parallel.virtual_pipeline_parallel={vpp if vpp else 'none'}",
        f"parallel.context_parallel={layout.context_parallel}",
        f"parallel.sequence_parallel={'true' if layout.tensor_parallel > 1 else 'false'}",
        f"model_options.recompute={layout.recompute}",
        f"micro_batch_size={request.micro_batch}",
    ] + ([f"model_options.cross_entropy={request.cross_entropy}"] if request.cross_entropy != "triton" else [])


def nodes(request: PlanRequest) -> int:
    return -(-request.gpus // request.gpus_per_node)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
