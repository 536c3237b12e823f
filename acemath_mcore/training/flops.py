"""Model FLOPs of a training step, for tokens/s -> MFU.

FLOPs per step = 6 x (matmul parameters) x tokens  +  6 x L x (heads x head_dim) x sum_docs n(n+1)

The first term is forward (2 per multiply-add) plus backward (twice the forward) through every weight matrix,
the LM head included and the embedding lookup excluded. The second counts causal attention honestly: in a
document of n tokens query i sees i+1 keys, so QK^T and AV each cost 2 x d x n(n+1)/2 per layer forward,
times 3 for forward + backward. Packed documents only attend within themselves, so packing lowers this term.
No recompute FLOPs are counted (MFU, not hardware FLOPs utilisation).
"""

from __future__ import annotations

from typing import Iterable

from acemath_mcore.models.arch import ModelArch


def matmul_parameters(arch: ModelArch) -> int:
    """Weights that take part in a matrix product per token: all linear layers and the LM head."""
    norms = (2 * arch.num_layers + 1) * arch.hidden_size
    embedding_lookup = 0 if arch.tie_embeddings else arch.padded_vocab_size * arch.hidden_size
    return arch.num_parameters() - norms - embedding_lookup


def training_flops(arch: ModelArch, document_lengths: Iterable[int]) -> float:
    lengths = list(document_lengths)
    tokens = sum(lengths)
    attention_width = arch.num_attention_heads * arch.kv_channels
    dense = 6.0 * matmul_parameters(arch) * tokens
    attention = 6.0 * arch.num_layers * attention_width * sum(n * (n + 1) for n in lengths)
    return dense + attention
