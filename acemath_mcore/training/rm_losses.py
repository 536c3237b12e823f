"""Reward-model losses over problem groups, in the engine's ``(loss_sum, num_units, report)`` form.

A micro-batch holds whole groups (all responses to one problem): flat ``scores`` and ``labels`` [R] in group
order and ``group_sizes`` [G]. The unit is one group, so after megatron divides by the units of the global batch
the objective is the mean over the step's groups of the per-group loss, whatever the micro-batch size, packing
or data-parallel size. For group g with positives P and negatives N (k = |P|, n - k = |N|):

- ``listwise_bt`` (AceMath): L_g = -1/(k(n-k)) sum_{p in P, q in N} log sigma(s_p - s_q), all pairs, one pass;
- ``pairwise_bt``: L_g = -log sigma(s_p - s_q) for one sampled pair (p, q) per group;
- ``bce``: L_g = mean over the group of binary cross-entropy(sigma(s_i), y_i);
- ``mse``: L_g = mean over the group of (s_i - y_i)^2.

The Bradley-Terry losses count groups that have at least one positive and one negative; BCE and MSE count all.
Reported metrics (``[sum, count]``, over groups with both labels): pairwise accuracy over all positive-negative
pairs (a tie counts half), the margin mean(s_P) - mean(s_N), and whether the top-scored response is correct.

Nothing here waits for the device: no boolean-mask indexing (its output size is data-dependent), sizes that are
known on the host are passed along, so a micro-batch's backward is launched while its forward still runs.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from acemath_mcore.options import RM_LOSSES


def group_ids(group_sizes: torch.Tensor, num_responses: int) -> torch.Tensor:
    """Group index of every response, ``[R]`` (``R = num_responses``, the sum of ``group_sizes``, given so that
    the device need not be asked for it)."""
    return torch.repeat_interleave(torch.arange(len(group_sizes), device=group_sizes.device), group_sizes,
                                   output_size=num_responses)


def preference_pairs(labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``[R, R]`` bool: row i positive, column j negative, same group."""
    positive = labels > 0.5
    return (groups[:, None] == groups[None, :]) & positive[:, None] & ~positive[None, :]


def _per_group_sum(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)


def bradley_terry(scores: torch.Tensor, pairs: torch.Tensor, groups: torch.Tensor,
                  num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group -mean over the group's ``pairs`` of log sigma(s_pos - s_neg), and which groups have a pair."""
    log_sigmoid = F.logsigmoid(scores[:, None] - scores[None, :])
    per_positive = torch.where(pairs, log_sigmoid, torch.zeros_like(log_sigmoid)).sum(dim=1)
    counts = _per_group_sum(pairs.sum(dim=1).to(scores.dtype), groups, num_groups)
    return -_per_group_sum(per_positive, groups, num_groups) / counts.clamp(min=1), counts > 0


def check_rm_loss(kind: str) -> None:
    if kind not in RM_LOSSES:
        raise ValueError(f"unknown reward-model loss {kind!r}; choose one of {RM_LOSSES}")


def rm_loss(kind: str, scores: torch.Tensor, labels: torch.Tensor, group_sizes: torch.Tensor,
            sampled_pairs: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Sum of per-group losses, the number of groups counted, and the ``[sum, count]`` report.
    ``sampled_pairs`` (``[R, R]`` bool, one pair per group) is required by ``pairwise_bt``."""
    check_rm_loss(kind)
    labels = labels.to(scores.device, scores.dtype)
    group_sizes = group_sizes.to(scores.device)
    groups, num_groups = group_ids(group_sizes, len(scores)), len(group_sizes)
    all_pairs = preference_pairs(labels, groups)
    if kind == "listwise_bt":
        per_group, counted = bradley_terry(scores, all_pairs, groups, num_groups)
    elif kind == "pairwise_bt":
        if sampled_pairs is None:
            raise ValueError("pairwise_bt needs sampled_pairs (one positive-negative pair per group)")
        per_group, counted = bradley_terry(scores, sampled_pairs.to(scores.device), groups, num_groups)
    else:
        if kind == "bce":
            per_response = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
        else:
            per_response = (scores - labels) ** 2
        per_group = _per_group_sum(per_response, groups, num_groups) / group_sizes.to(scores.dtype)
        counted = torch.ones(num_groups, dtype=torch.bool, device=scores.device)
    loss_sum = torch.where(counted, per_group, 0.0).sum()
    num_units = counted.sum().to(torch.int)
    report = {"rm loss": torch.stack([loss_sum.detach(), num_units.to(scores.dtype)])}
    report.update(ranking_metrics(scores.detach(), labels, groups, num_groups, all_pairs))
    return loss_sum, num_units, report


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int,
                    pairs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``[sum, count]`` of pairwise accuracy, score margin and best-is-correct over groups with both labels."""
    positive, dtype = labels > 0.5, scores.dtype
    wins = (scores[:, None] > scores[None, :]).to(dtype) + 0.5 * (scores[:, None] == scores[None, :]).to(dtype)
    num_positive = _per_group_sum(positive.to(dtype), groups, num_groups)
    num_negative = _per_group_sum((~positive).to(dtype), groups, num_groups)
    mixed = (num_positive > 0) & (num_negative > 0)
    mean_positive = _per_group_sum(torch.where(positive, scores, 0.0), groups, num_groups) / num_positive.clamp(min=1)
    mean_negative = _per_group_sum(torch.where(positive, 0.0, scores), groups, num_groups) / num_negative.clamp(min=1)
    # Top-scored response of each group (the first one on ties, as best-of-n picks it). A group with a NaN score
    # has no top response: its verdict is NaN, so the step's non-finite check sees it (no out-of-range index).
    group_max = scores.new_full((num_groups,), -torch.inf).scatter_reduce(0, groups, scores, "amax")
    index = torch.arange(len(scores), device=scores.device)
    is_max = scores == group_max[groups]
    last = len(scores) - 1
    first_best = torch.full((num_groups,), last, device=scores.device).scatter_reduce(
        0, groups, torch.where(is_max, index, last), "amin")
    best_correct = torch.where(group_max.isnan(), torch.nan, positive[first_best].to(dtype))
    groups_counted = mixed.sum().to(dtype)
    return {
        "pairwise accuracy": torch.stack([(wins * pairs).sum(), pairs.sum().to(wins.dtype)]),
        "score margin": torch.stack([torch.where(mixed, mean_positive - mean_negative, 0.0).sum(), groups_counted]),
        "best correct": torch.stack([torch.where(mixed, best_correct, 0.0).sum(), groups_counted]),
    }
