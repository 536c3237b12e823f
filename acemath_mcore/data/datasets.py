"""What the SFT trainer reads: a deterministic document blend, packed or padded samples, and a data-parallel
sampler that resumes exactly from a consumed-samples count.

Determinism: everything is a pure function of (prefixes, weights, seed, epoch), so every rank builds the same
indices without communication and a restart rebuilds them bit for bit.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from acemath_mcore.data.indexed import SFTIndexedDataset
from acemath_mcore.data.packing import Document, best_fit_decreasing, collate_packed, collate_padded, fill_ratio
from acemath_mcore.runtime.device import pin_host_batches
from acemath_mcore.runtime.distributed import STOP_SIGNALS


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` in the proportions of ``weights``."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    shortfall = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:shortfall]] += 1
    return counts


class BlendedDocuments:
    """Document-level blend of several preprocessed prefixes by weight (stage-2 SFT is such a blend).

    Source ``i`` contributes its share ``w_i / sum(w)`` of ``num_documents`` (largest-remainder rounding, so the
    counts add up exactly), spread evenly over the blend; within a source, documents come from a fresh seeded
    permutation each time the source is exhausted, so a small source with a large weight is upsampled by whole
    passes. A weight of 0 leaves its source out (the config checks ask for positive weights).
    """

    def __init__(self, sources: Sequence[SFTIndexedDataset], weights: Optional[Sequence[float]] = None,
                 num_documents: Optional[int] = None, seed: int = 1234):
        if not sources:
            raise ValueError("a blend needs at least one source")
        self.sources = list(sources)
        sizes = np.array([len(source) for source in self.sources], dtype=np.int64)
        if sizes.min() == 0:
            raise ValueError(f"empty source in blend: {[s.prefix for s, n in zip(self.sources, sizes) if n == 0]}")
        weights = np.asarray(sizes if weights is None else weights, dtype=np.float64)
        if len(weights) != len(self.sources) or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError(f"need one non-negative weight per source (not all zero), got {weights.tolist()}")
        total = int(sizes.sum()) if num_documents is None else num_documents
        self.source_counts = _largest_remainder(total, weights)
        # Even spread: the j-th of n draws of a source sits at (j + 0.5) / n of the blend.
        positions = [(np.arange(n) + 0.5) / n for n in self.source_counts]
        source_of_draw = np.concatenate([np.full(n, i) for i, n in enumerate(self.source_counts)])
        order = np.lexsort((source_of_draw, np.concatenate(positions)))
        document_of_draw = np.concatenate([
            self._draws(i, int(n), int(size), seed) for i, (n, size) in enumerate(zip(self.source_counts, sizes))
        ])
        self.source_index = source_of_draw[order].astype(np.int32)
        self.document_index = document_of_draw[order]
        first_of_source = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        all_lengths = np.concatenate([source.lengths for source in self.sources])
        self.lengths = all_lengths[first_of_source[self.source_index] + self.document_index]

    @staticmethod
    def _draws(source: int, count: int, size: int, seed: int) -> np.ndarray:
        """The first ``count`` documents of the source's endless stream of seeded per-pass permutations."""
        passes = [np.random.default_rng([seed, source, epoch]).permutation(size) for epoch in range(-(-count // size))]
        return np.concatenate(passes + [np.zeros(0, dtype=np.int64)])[:count]

    def __len__(self) -> int:
        return len(self.source_index)

    def __getitem__(self, index: int) -> Document:
        return self.sources[self.source_index[index]][int(self.document_index[index])]


def _check_fits(documents: BlendedDocuments, seq_length: int) -> None:
    too_long = int((documents.lengths > seq_length).sum())
    if too_long:
        raise ValueError(
            f"{too_long} documents are longer than seq_length {seq_length} (longest {documents.lengths.max()}); "
            f"preprocess with --max-length {seq_length} or raise seq_length"
        )


class PackedSFTDataset(torch.utils.data.Dataset):
    """Samples are bins of whole documents, each bin at most ``seq_length`` tokens (best-fit decreasing)."""

    def __init__(self, documents: BlendedDocuments, seq_length: int):
        _check_fits(documents, seq_length)
        self.documents, self.seq_length = documents, seq_length
        self.bins = best_fit_decreasing(documents.lengths, seq_length)
        self.fill_ratio = fill_ratio(documents.lengths, self.bins, seq_length)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> list[Document]:
        return [self.documents[int(d)] for d in self.bins[index]]


class PaddedSFTDataset(torch.utils.data.Dataset):
    """Samples are single documents, padded at collate time."""

    def __init__(self, documents: BlendedDocuments, seq_length: int):
        _check_fits(documents, seq_length)
        self.documents, self.seq_length = documents, seq_length

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> list[Document]:
        return [self.documents[index]]


class ResumableDistributedSampler:
    """Yields this data-parallel rank's micro-batches (lists of sample indices), forever, epoch after epoch.

    Each epoch is a seeded permutation of all samples, cut into global batches (an incomplete last one is left
    out); rank ``r`` takes the r-th contiguous slice of every global batch and splits it into micro-batches.
    The only state is ``consumed_samples`` (global, a multiple of the global batch size): a sampler built with
    ``consumed_samples = k * global_batch_size`` continues exactly where the k-th global batch ended. Checkpoint
    the trainer's own count (steps × global batch): a prefetching DataLoader runs the sampler ahead of training.
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234, consumed_samples: int = 0):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch {global_batch_size} is not a multiple of micro batch {micro_batch_size} "
                             f"× data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if num_samples < global_batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch_size}")
        if consumed_samples % global_batch_size:
            raise ValueError(f"consumed_samples {consumed_samples} is not a whole number of global batches")
        self.num_samples, self.global_batch_size, self.micro_batch_size = num_samples, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_samples = consumed_samples
        self.samples_per_epoch = num_samples // global_batch_size * global_batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.dp_size
        order_epoch, order = None, None
        while True:
            epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self._epoch_order(epoch)
            global_batch = order[offset:offset + self.global_batch_size]
            mine = global_batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank].tolist()
            micro_batches = [mine[i:i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]
            yield from micro_batches[:-1]
            self.consumed_samples += self.global_batch_size  # counted once the last micro-batch is handed out
            yield micro_batches[-1]


def build_sft_dataset(prefixes: Sequence[str], seq_length: int, packed: bool = True,
                      weights: Optional[Sequence[float]] = None, num_documents: Optional[int] = None,
                      seed: int = 1234) -> PackedSFTDataset | PaddedSFTDataset:
    documents = BlendedDocuments([SFTIndexedDataset(p) for p in prefixes], weights, num_documents, seed)
    return (PackedSFTDataset if packed else PaddedSFTDataset)(documents, seq_length)


def build_sft_dataloader(dataset: PackedSFTDataset | PaddedSFTDataset, pad_id: int, global_batch_size: int,
                         micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 1234,
                         consumed_samples: int = 0, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """An endless loader of micro-batch dicts in the packing.py contract; packed rows are ``micro_batch_size *
    seq_length`` long."""
    sampler = ResumableDistributedSampler(len(dataset), global_batch_size, micro_batch_size, dp_rank, dp_size,
                                          seed, consumed_samples)
    if isinstance(dataset, PackedSFTDataset):
        collate = functools.partial(collate_packed, pad_id=pad_id, total_length=micro_batch_size * dataset.seq_length)
    else:
        collate = functools.partial(collate_padded, pad_id=pad_id, seq_length=dataset.seq_length)
    return batch_loader(dataset, sampler, collate, num_workers)


def batch_loader(dataset, batch_sampler, collate: Callable, num_workers: int) -> torch.utils.data.DataLoader:
    """The DataLoader of the SFT and RM trainers. Its worker processes ignore the signals the trainer answers
    (runtime.STOP_SIGNALS), which Slurm sends every process of the job step: a worker left with torch's SIGTERM
    handler died of a preemption, and the trainer raised "DataLoader worker exited unexpectedly" in the middle of
    a step instead of checkpointing. The trainer shuts its workers down itself when it returns.

    On CUDA the batches come in page-locked memory: the engine's ``non_blocking`` copies to the GPU are then
    queued without the host waiting for the device (from pageable memory the driver may wait for the stream)."""
    if num_workers:
        _kill_leftover_workers_at_exit()
    return _StopSignalDeafLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                                 worker_init_fn=_leave_signals_to_the_trainer if num_workers else None,
                                 pin_memory=pin_host_batches())


class _StopSignalDeafLoader(torch.utils.data.DataLoader):
    """Starts its workers with the stop signals blocked (a forked worker inherits the mask), so one that arrives
    before a worker has run its ``worker_init_fn`` waits, and is then ignored, instead of killing it (measured:
    10 of 10 loaders lost their workers to a SIGTERM sent right after ``iter`` without this, none with it). The
    ``worker_init_fn`` still matters where workers are not forked from here (Python 3.14's forkserver default)."""

    def _get_iterator(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@functools.cache
def _kill_leftover_workers_at_exit() -> None:
    """multiprocessing stops the daemonic children still alive at exit (a loader whose iterator a traceback
    keeps) with SIGTERM and then waits for them: a loader worker ignores SIGTERM, so the exit would hang. This
    hook, registered after multiprocessing's, runs before it and kills them."""
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()
