"""Core attention for the native (Transformer-Engine-free) layer spec.

megatron-core's own ``DotProductAttention`` materialises the full s x s score matrix (out of memory at
seq 4096 for 1.5B models on an H100) and refuses packed (THD) input. This module computes the same function
through fused kernels and supports packed sequences:

* padded/unpacked input (``[s, b, heads, dim]``): ``scaled_dot_product_attention`` with ``is_causal``, which
  dispatches to flash / memory-efficient kernels on CUDA and to a blocked kernel on CPU;
* packed input with ``cu_seqlens``: flash varlen attention (``torch.nn.attention.varlen``) for half precision
  on CUDA; otherwise batched causal SDPA over the documents, right-padded and grouped by length, which
  is exact and never builds scores across documents.

Packed rows reach this module in one of two layouts. ``thd`` (``[t, heads, dim]``) is megatron's packed format;
megatron then applies RoPE document by document (a Python loop with host syncs in every layer). The native
spec instead feeds packed rows as ``sbhd`` with batch 1 (see :func:`acemath_mcore.models.specs.packed_qkv_format`):
RoPE then uses the row position, which shifts every token of a document by the same offset. Attention scores
depend only on the distance between query and key, and documents never attend to each other here, so the
result is the same as restarting positions at every document, without the per-document RoPE loop.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # torch < 2.10
    _varlen_attn, _VARLEN_PARAMS = None, set()

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class NativeCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule for megatron-core's ``SelfAttention`` (same constructor/forward)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **unused_kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("the native core attention does not implement context parallelism; use the TE spec")
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported by the native core attention")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"the native core attention is causal-only, got attn_mask_type={attn_mask_type}")
        tp_size = config.tensor_model_parallel_size
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.groups_per_partition = (config.num_query_groups or config.num_attention_heads) // tp_size
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the native core attention")
        if attention_mask is not None:
            raise ValueError(
                "the native core attention is causal-only and takes no explicit attention mask; "
                "pass attention_mask=None and use packed sequences to separate documents"
            )
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is None:
            return self._padded(query, key, value, dropout)
        if packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, dropout)
        if query.shape[1] != 1:
            raise ValueError(f"packed sbhd input must have batch size 1, got {query.shape[1]}")
        out = self._packed(query.squeeze(1), key.squeeze(1), value.squeeze(1), packed_seq_params, dropout)
        return out.unsqueeze(1)

    def _padded(self, query, key, value, dropout: float) -> torch.Tensor:
        sq, batch = query.shape[0], query.shape[1]
        sk = key.shape[0]
        if sq != sk and sq != 1:
            raise ValueError(f"causal attention with {sq} queries over {sk} keys is not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        out = self._sdpa(q, k, v, is_causal=sq == sk and sq > 1, dropout=dropout)
        return out.permute(2, 0, 1, 3).reshape(sq, batch, -1)

    def _packed(self, query, key, value, params: PackedSeqParams, dropout: float) -> torch.Tensor:
        padded = params.cu_seqlens_q_padded
        if padded is not None and not torch.equal(padded, params.cu_seqlens_q):
            raise ValueError("padded cu_seqlens (context-parallel padding) need the TE spec")
        if self._can_use_varlen(query, dropout):
            return self._varlen(query, key, value, params)
        documents = _documents_by_length(params, query.device)
        outputs: List[torch.Tensor] = []
        # index_select, not advanced indexing: its backward is index_add, not the slower accumulating index_put.
        for gather, kept in documents.buckets:
            q, k, v = (t.index_select(0, gather.flatten()).unflatten(0, gather.shape).transpose(1, 2)
                       for t in (query, key, value))  # [docs, heads, width, dim]
            out = self._sdpa(q, k, v, is_causal=True, dropout=dropout).transpose(1, 2)  # [docs, width, heads, dim]
            outputs.append(out.flatten(0, 1).index_select(0, kept))
        return torch.cat(outputs).index_select(0, documents.token_order).reshape(query.shape[0], -1)

    def _sdpa(self, q, k, v, is_causal: bool, dropout: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=dropout, scale=self.softmax_scale,
            enable_gqa=self.heads_per_partition != self.groups_per_partition,
        )

    @staticmethod
    def _can_use_varlen(query: torch.Tensor, dropout: float) -> bool:
        return _varlen_attn is not None and query.is_cuda and query.dtype in _HALF_DTYPES and dropout == 0.0

    def _varlen(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        # Keys and values keep their own (fewer) heads: the flash kernel shares them across query heads, which
        # torch 2.11 accepts without an ``enable_gqa`` argument (measured equal to repeating them, and the
        # repeats cost memory and time: benchmarks/varlen_attention_speed.py). Later versions ask for the flag.
        kwargs = {"scale": self.softmax_scale}
        if "window_size" in _VARLEN_PARAMS:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = self.heads_per_partition != self.groups_per_partition
        bounds = _document_bounds(params)
        longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:]))
        out = _varlen_attn(query, key, value, params.cu_seqlens_q, params.cu_seqlens_kv, longest, longest, **kwargs)
        return out.reshape(query.shape[0], -1)


@dataclasses.dataclass
class _DocumentsByLength:
    """A packed row's documents as right-padded batches, one per length bucket: ``gather`` [docs, width] picks
    each document's tokens (padding repeats its last token: causal attention never lets a real query see it),
    ``kept`` the real positions of the flattened batch, and ``token_order`` puts the kept outputs of all
    buckets back in row order."""

    buckets: List[Tuple[torch.Tensor, torch.Tensor]]
    token_order: torch.Tensor


# Documents this long run alone: their attention work dwarfs a kernel call's overhead, and padding them would
# add work (benchmarks/packed_attention_cpu.py).
_ALONE_FROM_TOKENS = 128


def _documents_by_length(params: PackedSeqParams, device: torch.device) -> _DocumentsByLength:
    """Short documents grouped by length rounded up to a power of two, each group padded to its longest: a few
    batched attention calls per layer instead of one per document (a 2048-token row of 40-token documents
    made 50), at most 4x the exact attention work for the shortest documents of a group; long documents
    alone. Built once per packed batch and shared by every layer."""
    cached = getattr(params, "_acemath_documents", None)
    if cached is not None and cached.token_order.device == device:
        return cached
    bounds = _document_bounds(params)
    by_size: Dict[object, List[Tuple[int, int]]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            group = ("alone", start) if end - start >= _ALONE_FROM_TOKENS else (end - start - 1).bit_length()
            by_size.setdefault(group, []).append((start, end - start))
    buckets, kept_tokens = [], []
    for documents in by_size.values():
        starts, lengths = (torch.tensor(column) for column in zip(*documents))
        offsets = torch.arange(int(lengths.max()))
        gather = starts[:, None] + torch.minimum(offsets, lengths[:, None] - 1)
        kept = (offsets < lengths[:, None]).flatten().nonzero().squeeze(1)
        buckets.append((gather.to(device), kept.to(device)))
        kept_tokens.append(gather.flatten()[kept])
    token_order = torch.argsort(torch.cat(kept_tokens))  # the inverse of the buckets' token permutation
    cached = _DocumentsByLength(buckets, token_order.to(device))
    params._acemath_documents = cached
    return cached


def remember_document_bounds(params: PackedSeqParams, bounds: List[int]) -> None:
    """Hand every layer's attention the document boundaries the host already holds (the loader built them), so
    none reads ``cu_seqlens`` back from the device."""
    params._acemath_bounds = list(bounds)


def _document_bounds(params: PackedSeqParams) -> List[int]:
    """Document boundaries as Python ints, shared by every layer: those remembered when the batch was built, or
    else read back from ``cu_seqlens`` once per packed batch (a host wait on CUDA)."""
    cached = getattr(params, "_acemath_bounds", None)
    if cached is None:
        cached = params.cu_seqlens_q.tolist()
        params._acemath_bounds = cached
    return cached
