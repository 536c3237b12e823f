"""On-disk formats, all megatron-core ``IndexedDataset`` ``.bin/.idx`` pairs (readable by any megatron tool).

SFT, prefix ``P``:
- ``P.bin/.idx``: token ids, one sequence (and one document) per sample; dtype uint16 when the vocabulary
  fits, else int32 (megatron's ``DType.optimal_dtype``).
- ``P_loss_mask.bin/.idx``: uint8, the same sequence lengths; 1 where the token at that position is trained on
  (assistant content and its end-of-turn token). Aligned with the tokens, not yet shifted to labels.

RM, prefix ``P``:
- ``P.bin/.idx``: one sequence per response (its whole rendered conversation, whose last token is the score
  token), one document per problem group (``document_indices``);
- ``P_rm_labels.npy``: float32 label per sequence (1 correct, 0 incorrect).

Writers build under ``P.partial*`` and rename at the end, so an interrupted run never leaves a prefix that
looks complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

LOSS_MASK_SUFFIX = "_loss_mask"
RM_LABELS_SUFFIX = "_rm_labels.npy"
_PARTIAL = ".partial"


def _megatron_indexed_dataset():
    """megatron-core's indexed_dataset module, imported when a dataset is opened or written: importing
    megatron-core takes seconds that ``--help``, argument errors and ``--dry-run`` (the suffixes above) skip."""
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def _files_of(prefix: str) -> list[str]:
    return [prefix + ".bin", prefix + ".idx"]


def _promote(partial_prefix: str, prefix: str) -> None:
    for partial, final in zip(_files_of(partial_prefix), _files_of(prefix)):
        os.replace(partial, final)


def _discard(partial_prefix: str) -> None:
    for path in _files_of(partial_prefix):
        if os.path.exists(path):
            os.remove(path)


class _Builder:
    """An IndexedDatasetBuilder writing to a partial prefix, promoted on `commit`."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.partial = prefix, prefix + _PARTIAL
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self.builder = _megatron_indexed_dataset().IndexedDatasetBuilder(self.partial + ".bin", dtype=dtype)

    def commit(self) -> None:
        self.builder.finalize(self.partial + ".idx")
        _promote(self.partial, self.prefix)

    def discard(self) -> None:
        self.builder.data_file.close()
        _discard(self.partial)


class SFTIndexedWriter:
    """Writes samples (tokens + loss mask) to an SFT prefix; use as a context manager."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        prefix = str(prefix)
        self._tokens = _Builder(prefix, _megatron_indexed_dataset().DType.optimal_dtype(vocab_size))
        self._mask = _Builder(prefix + LOSS_MASK_SUFFIX, np.uint8)

    def add(self, tokens: np.ndarray, loss_mask: np.ndarray) -> None:
        assert len(tokens) == len(loss_mask) > 0
        self._tokens.builder.add_document(tokens, [len(tokens)])
        self._mask.builder.add_document(loss_mask, [len(loss_mask)])

    def __enter__(self) -> "SFTIndexedWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        for builder in (self._tokens, self._mask):
            if error_type is None:
                builder.commit()
            else:
                builder.discard()


class SFTIndexedDataset:
    """Read side of an SFT prefix: ``(tokens, loss_mask)`` numpy arrays per sample."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        for path in _files_of(self.prefix) + _files_of(self.prefix + LOSS_MASK_SUFFIX):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing; preprocess with launch/preprocess.py sft")
        indexed_dataset = _megatron_indexed_dataset()
        self.tokens = indexed_dataset.IndexedDataset(self.prefix)
        self.loss_mask = indexed_dataset.IndexedDataset(self.prefix + LOSS_MASK_SUFFIX)
        if not np.array_equal(self.tokens.sequence_lengths, self.loss_mask.sequence_lengths):
            raise ValueError(f"{self.prefix}: token and loss-mask sequence lengths differ; the pair is corrupt")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.array(self.tokens.sequence_lengths)  # a copy, valid after this object is gone

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # Copies: megatron returns views into its mmap, which is unmapped (segfault on access) once the
        # IndexedDataset is garbage collected.
        return np.array(self.tokens[index]), np.array(self.loss_mask[index])


class RMIndexedWriter:
    """Writes tokenized reward-model groups (all responses to one problem) and their labels."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        self.prefix = str(prefix)
        self._tokens = _Builder(self.prefix, _megatron_indexed_dataset().DType.optimal_dtype(vocab_size))
        self._labels: list[float] = []

    def add_group(self, responses: Sequence[np.ndarray], labels: Sequence[float]) -> None:
        assert len(responses) == len(labels) > 0
        self._tokens.builder.add_document(np.concatenate(responses), [len(r) for r in responses])
        self._labels.extend(labels)

    def __enter__(self) -> "RMIndexedWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:
            self._tokens.discard()
            return
        partial_labels = self.prefix + _PARTIAL + RM_LABELS_SUFFIX
        np.save(partial_labels, np.asarray(self._labels, dtype=np.float32))
        self._tokens.commit()
        os.replace(partial_labels, self.prefix + RM_LABELS_SUFFIX)


class RMIndexedDataset:
    """Read side of an RM prefix: group ``i`` → its response token arrays and labels."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        for path in _files_of(self.prefix) + [self.prefix + RM_LABELS_SUFFIX]:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing; preprocess with launch/preprocess.py rm")
        self.tokens = _megatron_indexed_dataset().IndexedDataset(self.prefix)
        self.labels = np.load(self.prefix + RM_LABELS_SUFFIX)
        self.group_bounds = np.asarray(self.tokens.document_indices, dtype=np.int64)
        if len(self.labels) != len(self.tokens):
            raise ValueError(f"{self.prefix}: {len(self.labels)} labels for {len(self.tokens)} responses")

    def __len__(self) -> int:
        return len(self.group_bounds) - 1

    @property
    def max_group_size(self) -> int:
        """Responses in the largest group: the row count a fixed-shape padded micro-batch needs per group."""
        return int(np.diff(self.group_bounds).max()) if len(self) else 0

    @property
    def group_token_counts(self) -> np.ndarray:
        """Tokens of every group (all its responses), what micro-batch packing budgets against."""
        cumulative = np.concatenate(([0], np.cumsum(self.tokens.sequence_lengths, dtype=np.int64)))
        return cumulative[self.group_bounds[1:]] - cumulative[self.group_bounds[:-1]]

    def group(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        start, stop = self.group_bounds[index], self.group_bounds[index + 1]
        return [np.array(r) for r in self.tokens[start:stop]], self.labels[start:stop]  # copies: see SFTIndexedDataset
