"""SFT: next-token cross entropy on response tokens, normalised over the global batch."""

from __future__ import annotations

import torch

from acemath_mcore.training.engine import Batch
from acemath_mcore.training.losses import masked_token_loss


class SFTTask:
    """Feeds padded ``[b, s]`` or packed ``[1, t]`` micro-batches to a GPT model and scores loss tokens only."""

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # Returns per-token cross entropy on the last pipeline stage (megatron's vocab-parallel CE), hidden
        # states elsewhere.
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                     packed_seq_params=batch.get("packed_seq_params"))

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple:
        return masked_token_loss(output, batch["loss_mask"])
