"""The SFT trainer: next-token cross entropy on response tokens over packed or padded pre-tokenized data."""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional

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


def size_batch_in_conversations(config: TrainConfig, data: TrainingData, world_size: int,
                                saved_rows: Optional[int] = None) -> None:
    """Set ``global_batch_size`` (None) to the rows that hold about ``global_batch_conversations`` conversations
    of ``data`` on average, in whole micro-batches on every data-parallel rank. A resumed run keeps the rows per
    step of its checkpoint (``saved_rows``: its epoch and data position count in them), whatever the layout
    would round to now. A fit off by more than 2x is an error (a 256-GPU job of a 7B recipe would take 8x the
    paper's batch), a lesser one a warning."""
    parallel = config.parallel
    unit = config.micro_batch_size * parallel.data_parallel_size(world_size)
    interleaved = " x pipeline_parallel" if parallel.virtual_pipeline_parallel else ""
    if parallel.virtual_pipeline_parallel:
        unit *= parallel.pipeline_parallel  # the interleaved schedule runs micro-batches in groups of PP
    target = config.global_batch_conversations
    if saved_rows is not None:
        if saved_rows % unit:
            raise ValueError(f"the checkpoint being resumed took {saved_rows} packed rows per step "
                             f"(global_batch_conversations={target}), which do not split into whole micro-batches "
                             f"of micro_batch_size x data-parallel size{interleaved} = {unit} here: resume on a "
                             f"layout where that product divides {saved_rows}, or start a new stage from its weights "
                             "(checkpoint.init_from) in another checkpoint.save_dir")
        config.global_batch_size = saved_rows
        logger.info("global batch: %d rows per step, as in the checkpoint being resumed (global_batch_conversations"
                    "=%d)", saved_rows, target)
        return
    per_row = data.documents / data.num_samples
    config.global_batch_size = config.rows_per_step(per_row, unit)
    held = config.global_batch_size * per_row
    logger.info("global batch: %d rows of %.2f conversations on average, about %.0f conversations per step "
                "(global_batch_conversations=%d)", config.global_batch_size, per_row, held, target)
    advice = (f"its rows come in multiples of {unit} (micro_batch_size x data-parallel size{interleaved}); lower "
              "micro_batch_size, use fewer GPUs, or set global_batch_size (and global_batch_conversations=null)")
    if not 0.5 <= held / target <= 2:
        raise ValueError(f"a step would hold about {held:.0f} conversations, {held / target:.1f}x the "
                         f"global_batch_conversations={target} asked for: {advice}")
    if not 0.8 <= held / target <= 1.25:
        logger.warning("a step holds about %.0f conversations, not the %d asked for: %s", held, target, advice)


def _saved_rows_per_step(config: TrainConfig) -> Optional[int]:
    """The global batch (rows) of the checkpoint this run will resume, None when it starts afresh."""
    from megatron.core import dist_checkpointing

    from acemath_mcore.training.checkpoint_dirs import find_latest

    latest = find_latest(config.checkpoint.save_dir) if config.checkpoint.save_dir and config.checkpoint.resume else None
    if latest is None:
        return None
    return dist_checkpointing.load_common_state_dict(str(latest))["train_state"].get("global_batch_size")


def train_sft(config: TrainConfig) -> Dict:
    log_on_rank_0(launch_rank())  # the checks' warnings, once per job
    with preemption_requests() as preemption:
        check_config(config, "sft")
        config = dataclasses.replace(config)  # the batch size may be set below; the caller's config stays as given
        validation = sft_training_data(config, held_out=True) if config.data.valid_prefixes else None
        data = sft_training_data(config)
        if config.global_batch_size is None:
            size_batch_in_conversations(config, data, read_launch_env().world_size, _saved_rows_per_step(config))
        return run(config, SFTTask(), data, validation=validation, preemption=preemption)
