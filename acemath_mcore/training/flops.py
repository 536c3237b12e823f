"""Model FLOPs of a training step, for tokens/s -> MFU.

FLOPs per step = 6 x (matmul parameters) x tokens  +  6 x L x (heads x head_dim) x sum_docs n(n+1)

The first term is forward (2 per multiply-add) plus backward (twice the forward) through every weight matrix,
the output head included (the LM head, or the reward model's one-column scalar head) and the embedding lookup
excluded. The second counts causal attention honestly: in a
document of n tokens query i sees i+1 keys, so QK^T and AV each cost 2 x d x n(n+1)/2 per layer forward,
times 3 for forward + backward. Packed documents only attend within themselves, so packing lowers this term.
No recompute FLOPs are counted (MFU, not hardware FLOPs utilisation).
"""

from __future__ import annotations

from typing import Iterable, Optional

from acemath_mcore.models.arch import ModelArch


def matmul_parameters(arch: ModelArch, head_outputs: Optional[int] = None) -> int:
    """Weights that take part in a matrix product per token: every linear layer and the output head.

    The head has ``head_outputs`` columns: the padded vocabulary for the LM head (the default), 1 for the reward
    model's scalar head, which replaces the LM head (so a reward model's MFU does not count a 150k-way GEMM).
    """
    norms = (2 * arch.num_layers + 1) * arch.hidden_size
    embeddings = arch.padded_vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    head_columns = arch.padded_vocab_size if head_outputs is None else head_outputs
    return arch.num_parameters() - norms - embeddings + head_columns * arch.hidden_size


def training_flops(arch: ModelArch, document_lengths: Iterable[int], head_outputs: Optional[int] = None) -> float:
    lengths = list(document_lengths)
    tokens = sum(lengths)
    attention_width = arch.num_attention_heads * arch.kv_channels
    dense = 6.0 * matmul_parameters(arch, head_outputs) * tokens
    attention = 6.0 * arch.num_layers * attention_width * sum(n * (n + 1) for n in lengths)
    return dense + attention
