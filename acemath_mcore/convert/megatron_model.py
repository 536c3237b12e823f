"""Megatron model chunks for conversion and checking: built without initialisation (every weight is about to be
overwritten), full-vocabulary logits gathered over TP, and a plain greedy decoding loop.

Must run inside an initialised megatron parallel state (see :mod:`acemath_mcore.runtime.local_workers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from megatron.core.models.gpt import GPTModel

from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.builder import ModelOptions, build_model_chunk, transformer_config
from acemath_mcore.runtime.distributed import ParallelConfig


def build_weightless_model(arch: ModelArch, parallel: ParallelConfig, bf16: bool = False,
                           reward: bool = False) -> List[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage), native spec, parameters allocated but not initialised;
    ``reward`` builds the reward model (scalar head instead of the LM head).

    When PP does not divide the layers the first stage takes the remainder: the checkpoint is layout-free, so
    the split only decides which process writes which layers.
    """
    arch.check_layout(parallel)
    config = transformer_config(arch, parallel, ModelOptions(spec="native", bf16=bf16))
    config.perform_initialization = False
    pp = parallel.pipeline_parallel
    if arch.num_layers % pp:
        config.num_layers_in_first_pipeline_stage = arch.num_layers - (pp - 1) * (arch.num_layers // pp)
    model_class = GPTModel
    if reward:
        from acemath_mcore.models.reward import RewardGPTModel as model_class
    stages = parallel.virtual_pipeline_parallel or 1
    return [build_model_chunk(arch, config, "native", vp_stage=stage if stages > 1 else None,
                              model_class=model_class)
            for stage in range(stages)]


def load_for_inference(checkpoint: str | Path, arch: ModelArch, bf16: bool = False,
                       reward: bool = False) -> torch.nn.Module:
    """One evaluation-mode model chunk (TP from the parallel state, PP must be 1) with the checkpoint's weights,
    loaded through the trainer's own :func:`~acemath_mcore.training.checkpointing.load_weights`."""
    from megatron.core import parallel_state

    from acemath_mcore.convert.megatron_files import holds_reward_head
    from acemath_mcore.training.checkpoint_dirs import resolve_checkpoint_dir
    from acemath_mcore.training.checkpointing import load_weights

    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("inference here runs without pipeline parallelism (PP=1); use TP to split the model")
    if not reward and holds_reward_head(resolve_checkpoint_dir(checkpoint)):
        # With tied embeddings the trunk alone would load and generate: refuse rather than decode with an RM.
        raise ValueError(f"{checkpoint} is a reward model (a scalar head, no LM head): it scores responses "
                         "(launch/score.py) and does not generate")
    parallel = ParallelConfig(tensor_parallel=parallel_state.get_tensor_model_parallel_world_size())
    (model,) = build_weightless_model(arch, parallel, bf16=bf16, reward=reward)
    load_weights(checkpoint, [model])
    return model.eval()


@torch.no_grad()
def vocab_logits(model: torch.nn.Module, arch: ModelArch, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[batch, seq, vocab_size]`` (vocabulary padding dropped), gathered from the TP ranks."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens = tokens.reshape(-1, tokens.shape[-1])
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
    return logits[..., : arch.vocab_size].float()


@torch.no_grad()
def last_token_scores(reward_model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A reward model's fp32 score of each row, read at its last token (as ``*ForSequenceClassification`` does
    for unpadded rows)."""
    tokens = tokens.reshape(-1, tokens.shape[-1])
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return reward_model(tokens, positions, None)[:, -1].float()
