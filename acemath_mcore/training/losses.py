"""Loss functions in the form megatron-core's schedules expect with ``calculate_per_token_loss=True``.

Each returns ``(loss_sum, num_units, report)``: the schedule sums ``num_units`` over micro-batches, and
``finalize_model_grads`` all-reduces it over data-parallel ranks and divides the gradients by it. The
gradient is therefore d(sum of losses)/d(theta) / (units in the *global* batch), independent of micro-batch
size, packing and DP size (the classic per-micro-batch-mean bug, Megatron-LM #4590, cannot happen).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Sum of next-token cross entropy over loss tokens (assistant content + end of turn), and their count."""
    loss_mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach().clone(), num_tokens.float()])}
    return loss_sum, num_tokens, report
