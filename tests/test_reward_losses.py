"""Reward-model losses against brute-force references, their per-group normalisation, metrics and pair sampling.
Pure torch: no process group needed."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acemath_mcore.data.rm_data import RMGroupSample, collate_rm_packed, collate_rm_padded
from acemath_mcore.training.reward import sampled_pairs
from acemath_mcore.training.rm_losses import RM_LOSSES, group_ids, preference_pairs, rm_loss


def random_groups(seed, sizes=(6, 6, 2, 5, 6, 3)):
    """Scores, labels and group sizes with every k in 1..n-1 represented."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for index, size in enumerate(sizes):
        k = 1 + index % (size - 1)
        group = torch.zeros(size)
        group[torch.randperm(size, generator=generator)[:k]] = 1.0
        labels.append(group)
    scores = 2.0 * torch.randn(sum(sizes), generator=generator, dtype=torch.float64)
    return scores, torch.cat(labels), torch.tensor(sizes)


def double_loop_listwise(scores, labels, sizes):
    """The paper's formula, literally: mean over groups of -1/(k(n-k)) sum_{pos, neg} log sigma(r_pos - r_neg)."""
    total, offset = 0.0, 0
    for size in sizes.tolist():
        group_scores, group_labels = scores[offset:offset + size], labels[offset:offset + size]
        offset += size
        k = int(group_labels.sum())
        pair_terms = [torch.log(torch.sigmoid(group_scores[p] - group_scores[q]))
                      for p in range(size) for q in range(size) if group_labels[p] == 1 and group_labels[q] == 0]
        total = total - sum(pair_terms) / (k * (size - k))
    return total / len(sizes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_listwise_loss_and_gradient_equal_double_loop(seed):
    scores, labels, sizes = random_groups(seed)
    mine = scores.clone().requires_grad_(True)
    loss_sum, units, _ = rm_loss("listwise_bt", mine, labels, sizes)
    (loss_sum / units).backward()
    reference_scores = scores.clone().requires_grad_(True)
    reference = double_loop_listwise(reference_scores, labels, sizes)
    reference.backward()
    assert units == len(sizes)
    assert (loss_sum / units).item() == pytest.approx(reference.item(), abs=1e-6)
    assert torch.allclose(mine.grad, reference_scores.grad, atol=1e-7)


def test_one_vs_one_group_is_pairwise_bradley_terry():
    scores = torch.tensor([0.3, 1.7], dtype=torch.float64)
    labels, sizes = torch.tensor([1.0, 0.0]), torch.tensor([2])
    expected = -math.log(1 / (1 + math.exp(-(0.3 - 1.7))))
    listwise, _, _ = rm_loss("listwise_bt", scores, labels, sizes)
    pairwise, _, _ = rm_loss("pairwise_bt", scores, labels, sizes, sampled_pairs=torch.tensor([[False, True],
                                                                                                 [False, False]]))
    assert listwise.item() == pytest.approx(expected, abs=1e-12)
    assert pairwise.item() == pytest.approx(expected, abs=1e-12)


def test_group_mean_does_not_depend_on_how_groups_are_split_into_micro_batches():
    scores, labels, sizes = random_groups(3)
    whole, units, _ = rm_loss("listwise_bt", scores, labels, sizes)
    split_at = int(sizes[:2].sum())
    first, first_units, _ = rm_loss("listwise_bt", scores[:split_at], labels[:split_at], sizes[:2])
    second, second_units, _ = rm_loss("listwise_bt", scores[split_at:], labels[split_at:], sizes[2:])
    assert ((first + second) / (first_units + second_units)).item() == pytest.approx((whole / units).item(), abs=1e-12)


def test_bce_and_mse_are_per_group_means():
    scores, labels, sizes = random_groups(4, sizes=(2, 4))
    for kind, per_response in (("bce", F.binary_cross_entropy_with_logits(scores, labels.double(), reduction="none")),
                               ("mse", (scores - labels) ** 2)):
        loss_sum, units, _ = rm_loss(kind, scores, labels, sizes)
        expected = per_response[:2].mean() + per_response[2:].mean()
        assert units == 2 and loss_sum.item() == pytest.approx(expected.item(), abs=1e-12), kind


def test_groups_without_a_pair_are_not_counted_by_bradley_terry():
    scores = torch.tensor([1.0, 2.0, 0.5, 0.1])
    loss_sum, units, _ = rm_loss("listwise_bt", scores, torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([2, 2]))
    assert units == 1 and loss_sum.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.4))), abs=1e-6)


def test_metrics():
    # group 1: positives 3, 1; negatives 2, 0 -> pairs (3>2, 3>0, 1<2, 1>0): 3 of 4; top (3) is correct.
    # group 2: positive 0.5 tied with negative 0.5, other negative 0.7 -> pairs 0.5 + 0 of 2; top (0.7) wrong.
    scores = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.5, 0.5, 0.7])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    _, _, report = rm_loss("listwise_bt", scores, labels, torch.tensor([4, 3]))
    assert report["pairwise accuracy"].tolist() == [3.5, 6.0]
    assert report["best correct"].tolist() == [1.0, 2.0]
    margin = (2.0 - 1.0) + (0.5 - 0.6)
    assert report["score margin"][0].item() == pytest.approx(margin) and report["score margin"][1] == 2


@pytest.mark.parametrize("scores, labels", [
    ([0.9, 0.9, 0.1], [0.0, 1.0, 0.0]),  # a wrong response first among the tied top scores
    ([0.9, 0.9, 0.1], [1.0, 0.0, 0.0]),  # a right one first
    ([0.2, 0.9, 0.9, 0.9], [1.0, 0.0, 1.0, 1.0]),
    ([0.2, 0.9, 0.9, 0.9], [0.0, 1.0, 0.0, 0.0]),
])
def test_best_correct_breaks_top_score_ties_as_best_of_n_picks(scores, labels):
    """The validation's "best correct" is rm@n of the group: on a tie at the top, the first tied response, as
    launch/bestofn.py's selection keeps the first maximum (its own rule is the reference, beside the hand count)."""
    from acemath_mcore.eval.bestofn import Record, _subset_outcomes

    _, _, report = rm_loss("listwise_bt", torch.tensor(scores), torch.tensor(labels), torch.tensor([len(scores)]))
    picked = _subset_outcomes(Record(tuple(bool(x) for x in labels), tuple(scores), None), range(len(scores)))["rm"]
    assert picked == bool(labels[scores.index(max(scores))])  # list.index: the first maximum
    assert report["best correct"].tolist() == [float(picked), 1.0]


@pytest.mark.parametrize("kind", RM_LOSSES)
def test_a_nan_score_gives_a_nan_loss_not_an_error(kind):
    """A NaN score (e.g. a bf16 overflow) must reach the engine's non-finite check as a NaN loss, with the
    affected group's best-of-n verdict NaN; a clean group's verdict is unchanged."""
    scores = torch.tensor([0.3, math.nan, -0.2, 0.1, 0.5, -1.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    sizes = torch.tensor([3, 3])
    # pairwise_bt's one sampled pair per group: (0, 1) holds the NaN, (3, 4) is clean.
    sampled = torch.zeros(6, 6, dtype=torch.bool)
    sampled[0, 1] = sampled[3, 4] = True
    assert torch.equal(sampled & preference_pairs(labels, group_ids(sizes, len(labels))), sampled)
    loss_sum, _, report = rm_loss(kind, scores, labels, sizes, sampled_pairs=sampled)
    assert math.isnan(loss_sum.item())
    assert math.isnan(report["best correct"][0].item()) and report["best correct"][1].item() == 2
    clean = rm_loss(kind, scores[3:], labels[3:], sizes[1:], sampled_pairs=sampled[3:, 3:])[2]
    assert clean["best correct"].tolist() == [0.0, 1.0]  # its top score 0.5 is a wrong answer


def test_sampled_pairs_are_one_per_group_deterministic_and_layout_independent():
    rng = np.random.default_rng(0)
    groups = [RMGroupSample([rng.integers(3, 100, size=rng.integers(4, 9)) for _ in range(size)],
                            np.array(labels, dtype=np.float32))
              for size, labels in ((4, [1, 0, 1, 0]), (3, [0, 0, 1]), (5, [1, 1, 0, 1, 0]))]
    padded = collate_rm_padded([[group] for group in groups], pad_id=0, seq_length=16)
    packed = collate_rm_packed([groups], pad_id=0, total_length=128)
    pairs = sampled_pairs(padded, seed=7)
    assert torch.equal(pairs, sampled_pairs(packed, seed=7))
    labels = padded["labels"] > 0.5
    rows, columns = torch.nonzero(pairs, as_tuple=True)
    assert len(rows) == 3 and labels[rows].all() and not labels[columns].any()
    assert torch.equal(torch.repeat_interleave(torch.arange(3), torch.tensor([4, 3, 5]))[rows], torch.arange(3))
    other_seeds = [sampled_pairs(padded, seed=seed) for seed in range(8)]
    assert any(not torch.equal(pairs, other) for other in other_seeds)


@pytest.mark.parametrize("kind", ["listwise_bt", "pairwise_bt", "bce", "mse"])
def test_task_reads_each_response_at_its_score_token_padded_and_packed(kind):
    from acemath_mcore.training.reward import RewardTask

    rng = np.random.default_rng(1)
    groups = [RMGroupSample([rng.integers(3, 100, size=rng.integers(3, 9)) for _ in range(4)],
                            np.array(labels, dtype=np.float32)) for labels in ([1, 0, 0, 1], [0, 1, 0, 0])]
    scores = torch.randn(8, generator=torch.Generator().manual_seed(2))
    task = RewardTask(kind, seed=3)
    losses = []
    for batch in (collate_rm_padded([[group] for group in groups], pad_id=0, seq_length=12),
                  collate_rm_packed([groups], pad_id=0, total_length=64)):
        output = torch.full(batch["tokens"].shape, float("nan"))  # only score tokens may be read
        rows = torch.zeros(8, dtype=torch.long) if "cu_seqlens" in batch else torch.arange(8)
        output[rows, batch["score_index"]] = scores
        loss_sum, units, _ = task.loss(batch, output)
        losses.append(loss_sum.item())
        pairs = sampled_pairs(batch, seed=3) if kind == "pairwise_bt" else None
        expected, _, _ = rm_loss(kind, scores, batch["labels"], batch["group_sizes"], pairs)
        assert loss_sum.item() == pytest.approx(expected.item(), abs=1e-6) and units == 2
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_unknown_loss_is_rejected():
    from acemath_mcore.training.reward import RewardTask

    with pytest.raises(ValueError, match="listwise_bt"):
        RewardTask("hinge")


@pytest.mark.parametrize("kind", RM_LOSSES)
def test_loss_metrics_and_gradient_never_wait_for_the_device(kind):
    """On CUDA a wait here would stall every micro-batch between its forward and its backward."""
    from device_waits import DeviceWaits

    scores, labels, sizes = random_groups(4)
    scores.requires_grad_(True)
    pairs = preference_pairs(labels, group_ids(sizes, len(labels))) if kind == "pairwise_bt" else None
    with DeviceWaits() as waits:
        loss_sum, num_units, report = rm_loss(kind, scores, labels, sizes, pairs)
        loss_sum.backward()
    assert waits.seen == []
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    # The probe itself sees the waits it is meant to see.
    with DeviceWaits() as waits:
        scores.detach()[labels > 0.5].sum().item()
        torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    assert waits.seen == ["aten.index.Tensor with a boolean mask", "aten._local_scalar_dense.default",
                          "aten.repeat_interleave.Tensor without output_size"]
