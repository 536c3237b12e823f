"""SFT recipes: AceMath's general SFT (two stages) and math SFT, per backbone, with the paper's numbers.

Paper (arXiv 2412.15084): AdamW, lr 5e-6 for general SFT and 3e-6 for math SFT, global batch 128 (256 for 72B),
sequence length 4096, one epoch per stage, loss on response tokens only. Stage 1 starts from the converted base
model, stage 2 from stage 1, math SFT from stage 2 (weights only: fresh optimizer and schedule each stage).
Parallel layouts assume 8xH100 (80 GB) nodes.

Batch semantics: the paper's global batch counts conversations, so these recipes set
``global_batch_conversations`` (128, 256 for 72B) and leave ``global_batch_size`` unset. Conversations are packed
into rows of ``seq_length`` tokens (``data.packed=true``: no padding's compute); at start-up the trainer sets
``global_batch_size`` to the rows that hold about that many conversations on average (AceMath-like data: ~8 per
row, so ~16 rows per step), rounded to whole micro-batches on every data-parallel rank, and logs both counts. A
step then sees about 128 conversations and an epoch has the paper's number of steps; the loss is averaged over
the step's response tokens. ``global_batch_size=N global_batch_conversations=null`` asks for N rows per step
instead; ``data.packed=false`` gives exactly one conversation per padded row.
"""

from __future__ import annotations

import dataclasses

from acemath_mcore.options import ModelOptions, OptimConfig, ParallelConfig
from acemath_mcore.recipes.config import CheckpointConfig, DataConfig, LoggingConfig, TrainConfig

STAGES = ("sft_stage1", "sft_stage2", "math_sft")
_PREVIOUS_STAGE = {"sft_stage2": "sft_stage1", "math_sft": "sft_stage2"}
_STAGE_LR = {"sft_stage1": 5e-6, "sft_stage2": 5e-6, "math_sft": 3e-6}


@dataclasses.dataclass(frozen=True)
class _Layout:
    parallel: ParallelConfig
    recompute: str | None = None
    global_batch_conversations: int = 128
    micro_batch_size: int = 1


# Chosen so the model, fp32 main params and Adam state fit 80 GB with the distributed optimizer at 1 node (8 GPUs)
# for <= 8B and 4 nodes (32 GPUs) for 72B; see launch/plan.py for the memory model.
_LAYOUTS = {
    # Micro-batch 4 measured fastest on an H100 (63.8% MFU, docs/benchmarks.md), but a step of 128 conversations
    # is ~16 packed rows: 2 per GPU on a node of 8.
    "qwen2.5-math-1.5b": _Layout(ParallelConfig(), micro_batch_size=2),
    "qwen2.5-math-7b": _Layout(ParallelConfig(tensor_parallel=2, sequence_parallel=True)),
    "qwen2.5-math-72b": _Layout(ParallelConfig(tensor_parallel=8, pipeline_parallel=4, virtual_pipeline_parallel=5,
                                               sequence_parallel=True), recompute="full", global_batch_conversations=256),
    "llama3.1-8b": _Layout(ParallelConfig(tensor_parallel=2, sequence_parallel=True)),
}
# The general Qwen2.5 bases (the paper's other backbones) have their Math twins' shapes, hence their layouts.
_LAYOUTS.update({f"qwen2.5-{size}": _LAYOUTS[f"qwen2.5-math-{size}"] for size in ("1.5b", "7b", "72b")})


def _sft(stage: str, model: str) -> TrainConfig:
    layout = _LAYOUTS[model]
    name = f"{model}-{stage}"
    previous = _PREVIOUS_STAGE.get(stage)
    return TrainConfig(
        name=name,
        model=model,
        parallel=dataclasses.replace(layout.parallel),
        model_options=ModelOptions(spec="auto", bf16=True, recompute=layout.recompute),
        optim=OptimConfig(lr=_STAGE_LR[stage], min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                          clip_grad=1.0, warmup_steps=0, decay_style="cosine", use_distributed_optimizer=True,
                          overlap_grad_reduce=True, overlap_param_gather=True),
        data=DataConfig(seq_length=4096, packed=True),
        checkpoint=CheckpointConfig(
            save_dir=f"checkpoints/{name}",
            save_interval=500,
            init_from=f"checkpoints/{model}-{previous}" if previous else f"checkpoints/{model}-base",
        ),
        logging=LoggingConfig(wandb_project="acemath-mcore", wandb_run=name),
        global_batch_size=None,
        global_batch_conversations=layout.global_batch_conversations,
        micro_batch_size=layout.micro_batch_size,
        epochs=1.0,
    )


def qwen25_math_1p5b_sft_stage1() -> TrainConfig:
    return _sft("sft_stage1", "qwen2.5-math-1.5b")


def qwen25_math_1p5b_sft_stage2() -> TrainConfig:
    return _sft("sft_stage2", "qwen2.5-math-1.5b")


def qwen25_math_1p5b_math_sft() -> TrainConfig:
    return _sft("math_sft", "qwen2.5-math-1.5b")


def qwen25_math_7b_sft_stage1() -> TrainConfig:
    return _sft("sft_stage1", "qwen2.5-math-7b")


def qwen25_math_7b_sft_stage2() -> TrainConfig:
    return _sft("sft_stage2", "qwen2.5-math-7b")


def qwen25_math_7b_math_sft() -> TrainConfig:
    return _sft("math_sft", "qwen2.5-math-7b")


def qwen25_math_72b_sft_stage1() -> TrainConfig:
    return _sft("sft_stage1", "qwen2.5-math-72b")


def qwen25_math_72b_sft_stage2() -> TrainConfig:
    return _sft("sft_stage2", "qwen2.5-math-72b")


def qwen25_math_72b_math_sft() -> TrainConfig:
    return _sft("math_sft", "qwen2.5-math-72b")


def qwen25_1p5b_sft_stage1() -> TrainConfig:
    return _sft("sft_stage1", "qwen2.5-1.5b")


def qwen25_1p5b_sft_stage2() -> TrainConfig:
    return _sft("sft_stage2", "qwen2.5-1.5b")


def qwen25_1p5b_math_sft() -> TrainConfig:
    return _sft("math_sft", "qwen2.5-1.5b")


def qwen25_7b_sft_stage1() -> TrainConfig:
    return _sft("sft_stage1", "qwen2.5-7b")


def qwen25_7b_sft_stage2() -> TrainConfig:
    return _sft("sft_stage2", "qwen2.5-7b")


def qwen25_7b_math_sft() -> TrainConfig:
    return _sft("math_sft", "qwen2.5-7b")


def qwen25_72b_sft_stage1() -> TrainConfig:
    return _sft("sft_stage1", "qwen2.5-72b")


def qwen25_72b_sft_stage2() -> TrainConfig:
    return _sft("sft_stage2", "qwen2.5-72b")


def qwen25_72b_math_sft() -> TrainConfig:
    return _sft("math_sft", "qwen2.5-72b")


def llama31_8b_sft_stage1() -> TrainConfig:
    return _sft("sft_stage1", "llama3.1-8b")


def llama31_8b_sft_stage2() -> TrainConfig:
    return _sft("sft_stage2", "llama3.1-8b")


def llama31_8b_math_sft() -> TrainConfig:
    return _sft("math_sft", "llama3.1-8b")


def tiny_sft() -> TrainConfig:
    """CPU-sized: the tiny preset, fp32, short packed rows, a high learning rate so a few steps visibly learn."""
    return TrainConfig(
        name="tiny-sft",
        model="tiny",
        model_options=ModelOptions(spec="auto", bf16=False),
        optim=OptimConfig(lr=2e-3, min_lr=2e-4, weight_decay=0.0, clip_grad=1.0, warmup_steps=2,
                          decay_style="cosine"),
        data=DataConfig(seq_length=512, packed=True, num_workers=0),
        checkpoint=CheckpointConfig(save_dir="checkpoints/tiny-sft", save_interval=0, init_from=None),
        logging=LoggingConfig(wandb_project=None, wandb_run="tiny-sft"),
        global_batch_size=8,
        micro_batch_size=2,
        epochs=1.0,
    )
