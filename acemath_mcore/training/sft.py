"""The SFT trainer: next-token cross entropy on response tokens over packed or padded pre-tokenized data."""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List

import torch

from acemath_mcore.recipes.checks import check_config
from acemath_mcore.recipes.config import TrainConfig
from acemath_mcore.runtime.distributed import launch_rank, read_launch_env
from acemath_mcore.training.engine import Batch
from acemath_mcore.training.logging import log_on_rank_0
from acemath_mcore.training.losses import masked_token_loss
from acemath_mcore.training.trainer import TrainingData, preemption_requests, run

logger = logging.getLogger("acemath_mcore")


class SFTTask:
    """Feeds padded ``[b, s]`` or packed ``[1, t]`` micro-batches to a GPT model and scores loss tokens only."""

    loss_name = "lm_loss"
    head_outputs = None  # the LM head: one column per (padded) vocabulary entry, for the FLOPs count

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # Per-token cross entropy on the last pipeline stage (megatron's vocab-parallel CE), hidden states elsewhere.
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                     packed_seq_params=batch.get("packed_seq_params"))

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple:
        return masked_token_loss(output, batch["loss_mask"])


def sequence_lengths(batch: Batch) -> List[int]:
    """Attention spans of a micro-batch: documents of a packed row, or full padded rows."""
    if "cu_seqlens" in batch:
        return torch.diff(batch["cu_seqlens"]).tolist()
    return [batch["tokens"].shape[1]] * batch["tokens"].shape[0]


def sft_training_data(config: TrainConfig, held_out: bool = False) -> TrainingData:
    """The training blend of ``data.prefixes``, or (``held_out``) all of ``data.valid_prefixes``, unweighted."""
    from acemath_mcore.data.datasets import build_sft_dataloader, build_sft_dataset

    prefixes, weights = (config.data.valid_prefixes, None) if held_out else (config.data.prefixes, config.data.weights)
    dataset = build_sft_dataset(prefixes, config.data.seq_length, packed=config.data.packed,
                                weights=weights or None, seed=config.seed)
    fill = f", fill ratio {dataset.fill_ratio:.1%}" if hasattr(dataset, "fill_ratio") else ""

    def make_loader(consumed_samples: int, dp_rank: int, dp_size: int):
        return iter(build_sft_dataloader(dataset, pad_id=0, global_batch_size=config.global_batch_size,
                                         micro_batch_size=config.micro_batch_size, dp_rank=dp_rank,
                                         dp_size=dp_size, seed=config.seed, consumed_samples=consumed_samples,
                                         num_workers=config.data.num_workers))

    layout = "packed rows" if config.data.packed else "padded rows"
    return TrainingData(num_samples=len(dataset), make_loader=make_loader, sequence_lengths=sequence_lengths,
                        description=f"{len(dataset.documents)} documents in {len(dataset)} {layout}{fill}",
                        documents=len(dataset.documents))


def train_sft(config: TrainConfig) -> Dict:
    log_on_rank_0(launch_rank())  # the checks' warnings, once per job
    with preemption_requests() as preemption:
        check_config(config, "sft", world_size=read_launch_env().world_size)
        config = dataclasses.replace(config)  # run() may set the batch size; the caller's config stays as given
        validation = sft_training_data(config, held_out=True) if config.data.valid_prefixes else None
        return run(config, SFTTask(), sft_training_data(config), validation=validation, preemption=preemption)
