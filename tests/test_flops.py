"""The MFU numerator: model FLOPs per step, checked against hand arithmetic on Qwen2.5-1.5B's published shapes."""

from __future__ import annotations

import pytest

from acemath_mcore.models import get_preset
from acemath_mcore.training.flops import matmul_parameters, training_flops

# Qwen2.5-1.5B: 28 layers, hidden 1536, 12 query heads and 2 KV groups of width 128, QKV bias, SwiGLU 8960,
# vocabulary 151936 tied with the LM head.
LAYERS, HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, VOCAB = 28, 1536, 12, 2, 128, 8960, 151936
ATTENTION = HIDDEN * HEAD_DIM * (HEADS + 2 * GROUPS) + HEAD_DIM * (HEADS + 2 * GROUPS) + HEADS * HEAD_DIM * HIDDEN
TRUNK = LAYERS * (ATTENTION + 3 * HIDDEN * FFN)


def test_lm_counts_the_vocabulary_head_and_the_reward_model_its_scalar_head():
    arch = get_preset("qwen2.5-1.5b")
    assert matmul_parameters(arch) == TRUNK + VOCAB * HIDDEN
    assert matmul_parameters(arch, head_outputs=1) == TRUNK + HIDDEN
    # Qwen's model card gives 1.31B non-embedding parameters; the scalar head adds one column.
    assert matmul_parameters(arch, head_outputs=1) == pytest.approx(1.31e9, rel=5e-3)


def test_causal_attention_is_counted_per_document():
    arch = get_preset("qwen2.5-1.5b")
    lengths = [3000, 1000, 96]
    tokens = sum(lengths)
    attention = 6 * LAYERS * HEADS * HEAD_DIM * sum(n * (n + 1) for n in lengths)
    assert training_flops(arch, lengths) == 6 * (TRUNK + VOCAB * HIDDEN) * tokens + attention
    assert training_flops(arch, lengths, head_outputs=1) == 6 * (TRUNK + HIDDEN) * tokens + attention
    # One 4096-token document costs more attention than the same tokens packed as three documents.
    assert training_flops(arch, [tokens]) > training_flops(arch, lengths)
