"""Packing (best-fit decreasing) and the micro-batch contract of packed and padded collation."""

import numpy as np
import pytest
import torch

from acemath_mcore.data.packing import best_fit_decreasing, collate_packed, collate_padded, fill_ratio


def random_documents(rng, count, max_length):
    documents = []
    for length in rng.integers(1, max_length + 1, size=count):
        documents.append((rng.integers(1, 1000, size=length).astype(np.int32),
                          (rng.random(length) < 0.6).astype(np.uint8)))
    return documents


def test_best_fit_decreasing_places_every_document_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(500), 0.9, 20_000).astype(int), 1, 4096)
    bins = best_fit_decreasing(lengths, 4096)
    assert np.array_equal(np.sort(np.concatenate(bins)), np.arange(len(lengths)))
    assert max(lengths[b].sum() for b in bins) <= 4096
    assert fill_ratio(lengths, bins, 4096) >= 0.98
    assert len(bins) <= int(np.ceil(lengths.sum() / 4096 / 0.98))


def test_best_fit_decreasing_exact_and_small_cases():
    assert [b.tolist() for b in best_fit_decreasing([3, 5, 2, 6], 8)] == [[3, 2], [1, 0]]
    assert best_fit_decreasing([], 8) == []
    with pytest.raises(ValueError, match=r"in \[1, 8\]"):
        best_fit_decreasing([9], 8)
    with pytest.raises(ValueError, match=r"in \[1, 8\]"):
        best_fit_decreasing([0, 3], 8)


def test_collate_packed_hand_checked():
    documents = [(np.array([11, 12, 13]), np.array([0, 1, 1], dtype=np.uint8)),
                 (np.array([21, 22]), np.array([0, 1], dtype=np.uint8))]
    batch = collate_packed([documents], pad_id=0, total_length=8)
    assert batch["tokens"].tolist() == [[11, 12, 13, 21, 22, 0, 0, 0]]
    assert batch["labels"].tolist() == [[12, 13, 0, 22, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 8]
    assert batch["max_seqlen"] == 3
    assert batch["num_tokens"] == 5  # the trailing padding is not counted
    assert (batch["tokens"].dtype, batch["labels"].dtype, batch["loss_mask"].dtype,
            batch["position_ids"].dtype, batch["cu_seqlens"].dtype) == (
        torch.int64, torch.int64, torch.float32, torch.int64, torch.int32)


def test_collate_packed_invariants_on_random_bins():
    rng = np.random.default_rng(1)
    documents = random_documents(rng, 200, 120)
    lengths = np.array([len(t) for t, _ in documents])
    bins = best_fit_decreasing(lengths, 256)
    for first in range(0, len(bins) - 1, 2):  # micro-batches of two bins each
        samples = [[documents[d] for d in bins[b]] for b in (first, first + 1)]
        batch = collate_packed(samples, pad_id=7, total_length=512)
        tokens, labels = batch["tokens"][0].numpy(), batch["labels"][0].numpy()
        loss, positions = batch["loss_mask"][0].numpy(), batch["position_ids"][0].numpy()
        cu = batch["cu_seqlens"].numpy()
        flat = [d for sample in samples for d in sample]
        assert cu[-1] == len(tokens) == 512 and cu[0] == 0
        assert len(cu) - 1 == len(flat) + (1 if cu[len(flat)] < 512 else 0)  # trailing pad is its own document
        assert batch["max_seqlen"] == np.diff(cu).max()
        assert batch["num_tokens"] == sum(len(t) for t, _ in flat) == cu[len(flat)]
        for index, (start, stop) in enumerate(zip(cu[:-1], cu[1:])):
            assert positions[start:stop].tolist() == list(range(stop - start))
            assert labels[stop - 1] == 0 and loss[stop - 1] == 0  # no label crosses a document boundary
            assert np.array_equal(labels[start:stop - 1], tokens[start + 1:stop])
            if index < len(flat):
                doc_tokens, doc_mask = flat[index]
                assert np.array_equal(tokens[start:stop], doc_tokens)
                assert np.array_equal(loss[start:stop - 1], doc_mask[1:])
            else:
                assert (tokens[start:stop] == 7).all() and not loss[start:stop].any()


def test_collate_packed_exact_fill_and_overflow():
    documents = [(np.arange(1, 5), np.ones(4, dtype=np.uint8)), (np.arange(1, 5), np.ones(4, dtype=np.uint8))]
    batch = collate_packed([documents], pad_id=0, total_length=8)
    assert batch["cu_seqlens"].tolist() == [0, 4, 8]  # no padding document when the row is full
    assert batch["num_tokens"] == 8
    with pytest.raises(ValueError, match="more than its packed length"):
        collate_packed([documents], pad_id=0, total_length=7)


def test_collate_padded():
    samples = [[(np.array([5, 6, 7]), np.array([0, 1, 1], dtype=np.uint8))],
               [(np.array([8, 9, 10, 11]), np.array([0, 0, 1, 1], dtype=np.uint8))]]
    batch = collate_padded(samples, pad_id=3, seq_length=4)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "num_tokens"}
    assert batch["num_tokens"] == 7
    assert batch["tokens"].tolist() == [[5, 6, 7, 3], [8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[6, 7, 0, 0], [9, 10, 11, 0]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]
    assert batch["position_ids"][:, :3].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["loss_mask"].dtype == torch.float32 and batch["tokens"].shape == (2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        collate_padded(samples, pad_id=3, seq_length=3)
