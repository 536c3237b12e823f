"""The options a recipe gives the library's layers (model, optimizer, parallel layout) and the values each accepts.

Standard library only, like ``recipes/``: ``launch/train_*.py --help``, argument errors and ``--dry-run`` load
them without megatron-core, whose import alone takes 5-9 s. The layers that act on an option (models/builder,
models/specs, runtime/device, training/engine, training/reward) import its choices from here, so each list of
accepted values has one home and ``recipes/checks.py`` reports against the same list.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

SPEC_CHOICES = ("auto", "te", "native")
RECOMPUTE_GRANULARITIES = ("selective", "full")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
CUDA_GRAPH_SCOPES = ("mlp",)
LM_CROSS_ENTROPY_KERNELS = ("triton", "megatron")
LM_CROSS_ENTROPY_CHOICES = ("auto", *LM_CROSS_ENTROPY_KERNELS)
DECAY_STYLES = ("cosine", "linear", "constant")
NAN_POLICIES = ("stop", "skip")  # what a non-finite loss or gradient norm does: raise, or skip the update
RM_LOSSES = ("listwise_bt", "pairwise_bt", "bce", "mse")
PROFILERS = ("torch", "nsys")  # training/profiling.py
WANDB_MODES = ("offline", "online", "disabled")  # training/logging.py; a WANDB_MODE variable wins
# How a checkpoint stores the distributed optimizer's state (training/checkpointing.py): per-parameter tensors
# that reload at any TP/PP/DP, or each data-parallel rank's own buffer slices (no gather; reload at the same TP/PP).
OPTIMIZER_CHECKPOINT_FORMATS = ("fully_reshardable", "dp_reshardable")


@dataclasses.dataclass
class ModelOptions:
    """How to instantiate a model: layer spec, precision, activation recompute."""

    spec: str = "auto"  # one of SPEC_CHOICES
    bf16: bool = False
    recompute: Optional[str] = None  # None or one of RECOMPUTE_GRANULARITIES
    recompute_num_layers: int = 1
    fp8: Optional[str] = None  # None or one of FP8_FORMATS (TE only)
    fp8_recipe: str = "delayed"  # one of FP8_RECIPES (TE only)
    init_method_std: float = 0.02
    # Accumulate weight gradients into the fp32 main_grad inside the wgrad GEMM (TE's layers, and
    # runtime/wgrad_fusion for megatron's own when apex is absent) instead of a .grad plus an add per layer.
    # Only models trained under megatron's DDP (the Engine) have main_grad buffers, so only they use it.
    gradient_accumulation_fusion: bool = True
    # Language-model loss kernel: auto | triton | megatron (runtime/device.lm_cross_entropy says which runs where).
    cross_entropy: str = "auto"
    # None | "mlp": Transformer Engine CUDA graphs of every layer's MLP, captured after CUDA_GRAPH_WARMUP_STEPS
    # eager training steps, to cut the host's per-module launch work (TE spec, bf16, GPU). Attention stays
    # eager: it reads each packed micro-batch's own document boundaries, which a graph cannot take.
    cuda_graph: Optional[str] = None


@dataclasses.dataclass
class OptimConfig:
    """AdamW with warmup and decay (the AceMath recipes use cosine or linear decay)."""

    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: str = "cosine"  # one of DECAY_STYLES
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    # Distributed optimizer: all-gather the updated parameters bucket by bucket during the next forward pass
    # instead of at the end of the optimizer step (needs overlap_grad_reduce too, as in Megatron-LM).
    overlap_param_gather: bool = False

    def overlap_problem(self) -> Optional[str]:
        """Why ``overlap_param_gather`` cannot be on (megatron-core 0.16 does not check it itself)."""
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            return ("optim.overlap_param_gather=true needs optim.use_distributed_optimizer=true and "
                    "optim.overlap_grad_reduce=true")
        return None


@dataclasses.dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism is whatever is left of the world size."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    context_parallel: int = 1
    sequence_parallel: bool = False
    # How long a collective waits for its peers before NCCL's watchdog aborts the rank (a hang that no crash ends:
    # srun --kill-on-bad-exit ends the step when a rank dies). The 72B checkpoint save must fit in it.
    timeout_minutes: int = 30

    def size_problems(self) -> List[str]:
        """``name=value: must be at least 1`` for each parallel size below 1 (what dividing by them would hide)."""
        sizes = (("tensor_parallel", self.tensor_parallel), ("pipeline_parallel", self.pipeline_parallel),
                 ("virtual_pipeline_parallel", 1 if self.virtual_pipeline_parallel is None else self.virtual_pipeline_parallel),
                 ("context_parallel", self.context_parallel))
        return [f"{name}={value}: must be at least 1" for name, value in sizes if value < 1]

    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size():
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel({self.tensor_parallel}) x "
                f"pipeline_parallel({self.pipeline_parallel}) x context_parallel({self.context_parallel}) "
                f"= {self.model_parallel_size()}"
            )
        return world_size // self.model_parallel_size()
