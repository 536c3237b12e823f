"""Sequence packing and the micro-batch contract the trainer consumes.

Packed micro-batch (THD; documents attend only within themselves through ``cu_seqlens``)::

    tokens       int64   [1, T]
    labels       int64   [1, T]   next token within the same document; a document's last position gets 0
    loss_mask    float32 [1, T]   aligned with labels: 1 where the label token is trained on
    position_ids int64   [1, T]   restart at 0 for every document
    cu_seqlens   int32   [n_docs + 1]   cumulative document lengths, cu_seqlens[-1] == T
    max_seqlen   int
    num_tokens   int      tokens of real documents (T minus the trailing padding): what tokens/s counts

T is fixed (``total_length``); trailing room is one final 'document' of pad tokens with loss_mask 0.

Padded micro-batch: ``tokens/labels/loss_mask/position_ids`` of shape [B, S], one document per row, right
padding with the pad id and loss_mask 0 there; ``num_tokens`` as above (the documents' lengths, no padding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Document = tuple[np.ndarray, np.ndarray]  # (token ids, per-token loss flag), as stored on disk


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[np.ndarray]:
    """Pack items into bins of ``capacity``: longest first, each into the fullest bin it still fits.

    Bins are found through a bitset over remaining capacities (bit r set ⇔ some open bin has exactly r free),
    so each placement is a shift and a lowest-set-bit lookup instead of a scan over bins.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() <= 0 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    bins_with_room: dict[int, list[int]] = {}  # remaining capacity -> open bins with exactly that much
    occupied = 0  # the bitset
    for item in order.tolist():
        size = int(lengths[item])
        fitting = occupied >> size
        if fitting:
            room = size + (fitting & -fitting).bit_length() - 1
            stack = bins_with_room[room]
            target = stack.pop()
            if not stack:
                occupied ^= 1 << room
        else:
            room, target = capacity, len(bins)
            bins.append([])
        bins[target].append(item)
        left = room - size
        if left:
            stack = bins_with_room.setdefault(left, [])
            if not stack:
                occupied |= 1 << left
            stack.append(target)
    return [np.asarray(members, dtype=np.int64) for members in bins]


def fill_ratio(lengths: Sequence[int] | np.ndarray, bins: Sequence[np.ndarray], capacity: int) -> float:
    """Share of the packed token slots that hold real tokens."""
    return float(np.sum(lengths)) / (len(bins) * capacity) if bins else 0.0


def _next_token_targets(tokens: np.ndarray, loss: np.ndarray, document_lengths: np.ndarray):
    """Labels, label-aligned loss mask and position ids of concatenated documents (no label crosses a boundary)."""
    total = len(tokens)
    labels = np.zeros(total, dtype=np.int64)
    labels[:-1] = tokens[1:]
    label_mask = np.zeros(total, dtype=np.float32)
    label_mask[:-1] = loss[1:]
    ends = np.cumsum(document_lengths)
    labels[ends - 1] = 0
    label_mask[ends - 1] = 0.0
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(ends - document_lengths, document_lengths)
    return labels, label_mask, position_ids


def _documents_of(samples: Sequence[Sequence[Document]]) -> list[Document]:
    return [document for sample in samples for document in sample]


def collate_packed(samples: Sequence[Sequence[Document]], pad_id: int, total_length: int) -> dict:
    """All documents of the micro-batch's samples (each a packed bin) in one ``[1, total_length]`` row."""
    documents = _documents_of(samples)
    lengths = np.array([len(tokens) for tokens, _ in documents], dtype=np.int64)
    used = int(lengths.sum())
    if used > total_length:
        raise ValueError(f"micro-batch holds {used} tokens, more than its packed length {total_length}")
    padding = total_length - used
    tokens = np.concatenate([t for t, _ in documents] + [np.full(padding, pad_id)]).astype(np.int64)
    loss = np.concatenate([m for _, m in documents] + [np.zeros(padding)]).astype(np.float32)
    document_lengths = np.append(lengths, padding) if padding else lengths
    labels, label_mask, position_ids = _next_token_targets(tokens, loss, document_lengths)
    cu_seqlens = np.concatenate(([0], np.cumsum(document_lengths))).astype(np.int32)
    return {
        "tokens": torch.from_numpy(tokens)[None],
        "labels": torch.from_numpy(labels)[None],
        "loss_mask": torch.from_numpy(label_mask)[None],
        "position_ids": torch.from_numpy(position_ids)[None],
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(document_lengths.max()),
        "num_tokens": used,
    }


def collate_padded(samples: Sequence[Sequence[Document]], pad_id: int, seq_length: int) -> dict:
    """One document per row, right-padded to ``seq_length``."""
    rows = {key: [] for key in ("tokens", "labels", "loss_mask", "position_ids")}
    num_tokens = 0
    for sample in samples:
        if len(sample) != 1:
            raise ValueError(f"padded batches take one document per sample, got {len(sample)}")
        tokens, loss = sample[0]
        length = len(tokens)
        if length > seq_length:
            raise ValueError(f"document of {length} tokens does not fit seq_length {seq_length}")
        num_tokens += length
        padded_tokens = np.full(seq_length, pad_id, dtype=np.int64)
        padded_tokens[:length] = tokens
        padded_loss = np.zeros(seq_length, dtype=np.float32)
        padded_loss[:length] = loss
        document_lengths = np.array([length, seq_length - length] if length < seq_length else [length])
        labels, label_mask, position_ids = _next_token_targets(padded_tokens, padded_loss, document_lengths)
        for key, value in zip(rows, (padded_tokens, labels, label_mask, position_ids)):
            rows[key].append(value)
    return {**{key: torch.from_numpy(np.stack(values)) for key, values in rows.items()}, "num_tokens": num_tokens}
