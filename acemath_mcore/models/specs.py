"""Transformer layer specs: Transformer Engine's when available, otherwise megatron's local modules + our attention."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from acemath_mcore.models.attention import NativeCoreAttention
from acemath_mcore.options import SPEC_CHOICES
from acemath_mcore.runtime import transformer_engine_available


def resolve_spec_name(spec: str) -> str:
    """``auto`` means TE when it imports on CUDA, native otherwise; asking for TE without it is an error."""
    if spec not in SPEC_CHOICES:
        raise ValueError(f"unknown layer spec {spec!r}; choose one of {SPEC_CHOICES}")
    if spec == "auto":
        return "te" if transformer_engine_available() else "native"
    if spec == "te" and not transformer_engine_available():
        raise RuntimeError("layer spec 'te' needs Transformer Engine on a CUDA machine; use spec=native")
    return spec


def native_layer_spec() -> ModuleSpec:
    """megatron-core's local spec with RMSNorm, with the core attention replaced by :class:`NativeCoreAttention`."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = NativeCoreAttention
    return spec


def packed_qkv_format(spec: str) -> str:
    """Layout of packed rows: TE attends over ``thd``; the native attention takes ``sbhd`` rows of batch 1
    (RoPE by row position, exact because documents never attend to each other; see models/attention.py)."""
    return "thd" if resolve_spec_name(spec) == "te" else "sbhd"


def native_block_spec(config: TransformerConfig, vp_stage=None) -> ModuleSpec:
    """This stage's layers plus a torch final norm: megatron's default final norm is TE's whenever TE is
    installed, which would make the 'native' path depend on TE (and refuse fp64)."""
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[native_layer_spec()] * layers, layer_norm=WrappedTorchNorm))


def layer_spec(spec: str, config: TransformerConfig, vp_stage=None) -> ModuleSpec:
    if resolve_spec_name(spec) == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    return native_block_spec(config, vp_stage)
