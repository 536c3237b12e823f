"""Blended SFT documents, packed/padded datasets, and the resumable data-parallel sampler."""

import itertools

import numpy as np
import pytest

from acemath_mcore.data.datasets import (
    BlendedDocuments,
    PackedSFTDataset,
    ResumableDistributedSampler,
    build_sft_dataloader,
    build_sft_dataset,
)
from acemath_mcore.data.indexed import SFTIndexedDataset, SFTIndexedWriter

SOURCE_SIZES = (300, 100)


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    """Two sources whose first token names the document: source * 10000 + index."""
    root = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(0)
    paths = []
    for source, size in enumerate(SOURCE_SIZES):
        prefix = str(root / f"source{source}")
        with SFTIndexedWriter(prefix, vocab_size=151_646) as writer:
            for index in range(size):
                length = int(rng.integers(5, 60))
                tokens = np.concatenate(([source * 10_000 + index], rng.integers(0, 150_000, length - 1)))
                writer.add(tokens.astype(np.int32), (rng.random(length) < 0.5).astype(np.uint8))
        paths.append(prefix)
    return paths


def document_ids(documents):
    return np.array([documents[i][0][0] for i in range(len(documents))])


def test_blend_proportions_even_spread_and_upsampling(prefixes):
    documents = BlendedDocuments([SFTIndexedDataset(p) for p in prefixes], weights=[0.25, 0.75],
                                 num_documents=4000, seed=3)
    ids = document_ids(documents)
    from_second = ids >= 10_000
    assert documents.source_counts.tolist() == [1000, 3000] and from_second.sum() == 3000
    for window in range(0, 4000, 400):  # every stretch of the blend keeps the proportions
        assert abs(from_second[window:window + 400].mean() - 0.75) <= 0.01
    # The 100-document source is upsampled by whole passes: each document exactly 30 times.
    assert set(np.unique(ids[from_second], return_counts=True)[1]) == {30}
    assert np.array_equal(documents.lengths, [len(documents[i][0]) for i in range(len(documents))])
    again = BlendedDocuments([SFTIndexedDataset(p) for p in prefixes], [0.25, 0.75], 4000, seed=3)
    assert np.array_equal(document_ids(again), ids)
    other_seed = BlendedDocuments([SFTIndexedDataset(p) for p in prefixes], [0.25, 0.75], 4000, seed=4)
    assert not np.array_equal(document_ids(other_seed), ids)


def test_default_blend_is_one_pass_over_everything(prefixes):
    documents = BlendedDocuments([SFTIndexedDataset(p) for p in prefixes])
    ids = document_ids(documents)
    expected = [s * 10_000 + i for s, size in enumerate(SOURCE_SIZES) for i in range(size)]
    assert sorted(ids.tolist()) == expected


def global_batches(sampler, dp_size_per_batch, count):
    iterator = iter(sampler)
    return [list(itertools.chain.from_iterable(next(iterator) for _ in range(dp_size_per_batch)))
            for _ in range(count)]


def test_sampler_resumes_exactly_from_consumed_samples():
    # 50 samples, global batch 8: an epoch is 6 batches (2 samples left out), so resuming at 7 crosses epochs.
    def sampler(consumed):
        return ResumableDistributedSampler(50, global_batch_size=8, micro_batch_size=2, seed=5,
                                           consumed_samples=consumed)

    uninterrupted = global_batches(sampler(0), 4, 17)
    resumed = global_batches(sampler(7 * 8), 4, 10)
    assert resumed == uninterrupted[7:]
    first_epoch = list(itertools.chain.from_iterable(uninterrupted[:6]))
    assert len(set(first_epoch)) == 48  # no sample twice within an epoch
    assert uninterrupted[6:12] != uninterrupted[:6]  # a new permutation each epoch
    with pytest.raises(ValueError, match="whole number of global batches"):
        sampler(12)


def test_sampler_gives_each_rank_a_disjoint_slice_of_every_global_batch():
    reference = global_batches(ResumableDistributedSampler(64, 16, 2, seed=1), 8, 8)
    per_rank = [global_batches(ResumableDistributedSampler(64, 16, 2, dp_rank=r, dp_size=4, seed=1), 2, 8)
                for r in range(4)]
    for step in range(8):
        combined = list(itertools.chain.from_iterable(per_rank[r][step] for r in range(4)))
        assert combined == reference[step]
        assert len(set(combined)) == 16
    with pytest.raises(ValueError, match="not a multiple"):
        ResumableDistributedSampler(64, 16, 3, dp_size=2)


def test_packed_dataloader_contract_and_resume(prefixes):
    dataset = build_sft_dataset(prefixes, seq_length=128, packed=True, weights=[1, 1], num_documents=600, seed=2)
    assert isinstance(dataset, PackedSFTDataset) and dataset.fill_ratio > 0.95
    assert sorted(np.concatenate(dataset.bins).tolist()) == list(range(600))
    loader = build_sft_dataloader(dataset, pad_id=0, global_batch_size=4, micro_batch_size=2, seed=2)
    batches = list(itertools.islice(loader, 6))
    for batch in batches:
        assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (1, 256)
        assert batch["position_ids"].shape == (1, 256) and int(batch["cu_seqlens"][-1]) == 256
    keys = ("tokens", "labels", "loss_mask", "cu_seqlens")
    resumed = list(itertools.islice(build_sft_dataloader(dataset, 0, 4, 2, seed=2, consumed_samples=8), 2))
    for original, again in zip(batches[4:], resumed):
        assert all(np.array_equal(original[key], again[key]) for key in keys)
    # The recipes' default data.num_workers=2: worker processes deliver the same batches, resumed or not.
    with_workers = list(itertools.islice(build_sft_dataloader(dataset, 0, 4, 2, seed=2, num_workers=2), 6))
    resumed = list(itertools.islice(build_sft_dataloader(dataset, 0, 4, 2, seed=2, consumed_samples=8,
                                                         num_workers=2), 2))
    assert len(with_workers) == 6 and len(resumed) == 2
    for original, again in zip(batches + batches[4:], with_workers + resumed):
        assert all(np.array_equal(original[key], again[key]) for key in keys)


def test_padded_dataloader_contract(prefixes):
    dataset = build_sft_dataset(prefixes[:1], seq_length=64, packed=False)
    batch = next(iter(build_sft_dataloader(dataset, pad_id=9, global_batch_size=8, micro_batch_size=4)))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "num_tokens"}
    assert batch["tokens"].shape == (4, 64)
    rows = next(iter(ResumableDistributedSampler(len(dataset), 8, 4)))
    assert batch["num_tokens"] == sum(len(dataset[index][0][0]) for index in rows)
    for row, index in enumerate(rows):
        tokens, mask = dataset[index][0]
        length = len(tokens)
        assert batch["tokens"][row, :length].tolist() == tokens.tolist()
        assert (batch["tokens"][row, length:] == 9).all()
        assert batch["loss_mask"][row, :length - 1].tolist() == mask[1:].tolist()
        assert not batch["loss_mask"][row, length - 1:].any()


def test_documents_longer_than_seq_length_are_an_error(prefixes):
    with pytest.raises(ValueError, match="longer than seq_length 16"):
        build_sft_dataset(prefixes, seq_length=16)


LOADER_WORKERS_SCRIPT = """
import multiprocessing, os, signal, sys, time
from acemath_mcore.data.datasets import batch_loader

loader = iter(batch_loader(list(range(100)), [[i] for i in range(100)], lambda rows: rows, num_workers=2))
workers = multiprocessing.active_children()
for worker in workers:  # as Slurm signals every process of a job step, here while the workers still start
    os.kill(worker.pid, signal.SIGTERM)
first = next(loader)
for worker in workers:  # and once they run
    os.kill(worker.pid, signal.SIGTERM)
time.sleep(0.5)
rest = [next(loader) for _ in range(5)]  # a worker that died would make this raise
print(len(workers), first + [row for batch in rest for row in batch], flush=True)
sys.exit(3)  # with the iterator, and so the workers, still alive
"""


def test_loader_workers_leave_sigterm_to_the_trainer_and_never_hold_up_the_exit(tmp_path):
    """A worker with torch's SIGTERM handler dies of Slurm's preemption signal and the trainer then fails mid-step;
    a worker that ignores SIGTERM would hang the exit (multiprocessing stops leftover daemonic children with
    SIGTERM, then waits for them) unless it is killed first."""
    import subprocess
    import sys

    script = tmp_path / "loader.py"
    script.write_text(LOADER_WORKERS_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout.split() == ["2", "[0,", "1,", "2,", "3,", "4,", "5]"]
