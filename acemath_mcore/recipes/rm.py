"""Reward-model recipes: AceMath-7B/72B-RM, plus a CPU-sized one.

Paper (arXiv 2412.15084) and model cards: the RM starts from the math-SFT model (AceMath-Instruct) with the LM
head replaced by a scalar head, trained with the listwise Bradley-Terry loss on 6 responses per problem, AdamW,
lr 5e-6 (7B) / 2e-6 (72B), 2 epochs, cosine decay, 256 problems per step. The data is one prefix from
``launch/preprocess.py rm --num-responses 6 --max-length 4096``.

Batch semantics: ``global_batch_size`` counts samples of the RM dataset: with ``data.packed=true`` a sample is a
bin of whole groups under ``data.seq_length`` tokens, with padded rows one problem group (one response per row of
``data.seq_length``). The paper recipes pack, into bins of 24,576 tokens (six responses of up to 4,096 tokens
always fit), and size the step in problems: ``global_batch_problems=256`` becomes the bins that hold about 256
groups on average, in whole micro-batches (logged at start-up). Padding each response to 4,096 tokens instead
made 80-88% of the computed tokens padding on AceMath-like responses (500-840 tokens), 3.8-6.3x the step time
by launch/plan.py's estimate (docs/reward_model.md). The loss is the mean over the step's groups either way.
"""

from __future__ import annotations

import dataclasses

from acemath_mcore.options import ModelOptions, OptimConfig, ParallelConfig
from acemath_mcore.recipes.config import CheckpointConfig, DataConfig, LoggingConfig, RewardConfig, TrainConfig

# A micro-batch is one bin of 24,576 tokens (~8 groups of ~500-token responses). Full recompute keeps its
# activations small next to the weights and optimizer state on 80 GB H100s (launch/plan.py estimates 38 GiB per
# GPU for 7B at TP 2; not measured on a GPU).
_PARALLEL = {
    "qwen2.5-math-7b": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
    "qwen2.5-math-72b": ParallelConfig(tensor_parallel=8, pipeline_parallel=4, virtual_pipeline_parallel=5,
                                       sequence_parallel=True),
}
_LR = {"qwen2.5-math-7b": 5e-6, "qwen2.5-math-72b": 2e-6}
RM_BIN_TOKENS = 6 * 4096  # one group of the paper's six responses of at most 4,096 tokens always fits a bin


def _rm(model: str) -> TrainConfig:
    name = f"{model}-rm"
    return TrainConfig(
        name=name,
        model=model,
        parallel=dataclasses.replace(_PARALLEL[model]),
        model_options=ModelOptions(spec="auto", bf16=True, recompute="full"),
        optim=OptimConfig(lr=_LR[model], min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                          clip_grad=1.0, warmup_steps=0, decay_style="cosine", use_distributed_optimizer=True,
                          overlap_grad_reduce=True, overlap_param_gather=True),
        data=DataConfig(seq_length=RM_BIN_TOKENS, packed=True),
        checkpoint=CheckpointConfig(save_dir=f"checkpoints/{name}", save_interval=200,
                                    init_from=f"checkpoints/{model}-math_sft"),
        logging=LoggingConfig(wandb_project="acemath-mcore", wandb_run=name),
        reward=RewardConfig(loss="listwise_bt"),
        global_batch_size=None,
        global_batch_problems=256,
        micro_batch_size=1,
        epochs=2.0,
    )


def qwen25_math_7b_rm() -> TrainConfig:
    return _rm("qwen2.5-math-7b")


def qwen25_math_72b_rm() -> TrainConfig:
    return _rm("qwen2.5-math-72b")


def tiny_rm() -> TrainConfig:
    """CPU-sized: the tiny preset in fp32 from scratch (or ``checkpoint.init_from=`` a tiny SFT run), packed
    bins of whole groups, a high learning rate so a short run visibly learns."""
    return TrainConfig(
        name="tiny-rm",
        model="tiny",
        model_options=ModelOptions(spec="auto", bf16=False),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.0, clip_grad=1.0, warmup_steps=5,
                          decay_style="cosine"),
        data=DataConfig(seq_length=1024, packed=True, num_workers=0),
        checkpoint=CheckpointConfig(save_dir="checkpoints/tiny-rm", save_interval=0, init_from=None),
        logging=LoggingConfig(wandb_project=None, wandb_run="tiny-rm"),
        reward=RewardConfig(loss="listwise_bt"),
        global_batch_size=4,
        micro_batch_size=1,
        epochs=2.0,
    )
