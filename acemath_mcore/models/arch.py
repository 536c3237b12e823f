"""Framework-neutral description of a decoder-only transformer, shared by presets, the builder and converters."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from acemath_mcore.options import ParallelConfig

# Megatron pads the vocabulary so the embedding splits evenly across tensor-parallel ranks. We pad to a
# fixed multiple (not one that depends on TP) so a checkpoint saved at one TP size loads at any other.
VOCAB_PAD_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class ModelArch:
    """Shapes and numerics of a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    head_dim: Optional[int] = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    # Llama-3.1 style frequency scaling; megatron-core implements exactly (low=1, high=4, original=8192).
    rope_scaling_factor: Optional[float] = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def check_layout(self, parallel: ParallelConfig) -> None:
        """What the converters check before starting any process: the layout can hold this model (numbers named)."""
        pp, vpp = parallel.pipeline_parallel, parallel.virtual_pipeline_parallel
        too_small = parallel.size_problems()
        if too_small:  # PP 0 once ran no process and reported an empty checkpoint as written
            raise ValueError(too_small[0])
        self.check_tensor_parallel(parallel.tensor_parallel)
        if self.num_layers < pp:
            raise ValueError(f"pipeline_parallel={pp} exceeds num_layers={self.num_layers}")
        if vpp and (pp < 2 or self.num_layers % (pp * vpp)):
            raise ValueError(f"virtual pipeline {vpp} needs pipeline_parallel >= 2 and num_layers={self.num_layers} "
                             f"divisible by pipeline_parallel x vpp = {pp * vpp}")

    def check_matches(self, recorded: Optional["ModelArch"], where: str) -> None:
        """Raise when ``recorded`` (the architecture a checkpoint was written with, if known) differs from this one:
        a preset with the same shapes but another RoPE base or context length would load without an error and
        compute something else."""
        if recorded is None or recorded == self:
            return
        differences = "; ".join(f"{field.name} {getattr(recorded, field.name)!r} there, {getattr(self, field.name)!r} "
                                "here" for field in dataclasses.fields(self)
                                if getattr(recorded, field.name) != getattr(self, field.name))
        raise ValueError(f"{where} records another architecture than the one asked for: {differences}")

    def check_tensor_parallel(self, tp: int) -> None:
        """Megatron splits heads, KV groups, FFN and vocabulary across TP ranks; say which one does not divide."""
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.num_query_groups),
            ("ffn_hidden_size", self.ffn_hidden_size),
            ("padded_vocab_size", self.padded_vocab_size),
        ):
            if value % tp:
                raise ValueError(f"tensor_parallel={tp} does not divide {name}={value} of this {self.family} model")

    def num_parameters(self) -> int:
        """Parameter count (padded vocabulary), used for FLOPs and memory estimates."""
        h, kv = self.hidden_size, self.kv_channels
        attention = h * kv * (self.num_attention_heads + 2 * self.num_query_groups) + self.num_attention_heads * kv * h
        if self.qkv_bias:
            attention += kv * (self.num_attention_heads + 2 * self.num_query_groups)
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.padded_vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h
