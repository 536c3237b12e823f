"""Checkpoint conversion between Hugging Face safetensors and megatron ``torch_dist`` (see docs/checkpoints.md)."""

from acemath_mcore.convert.from_hf import convert_hf_to_megatron
from acemath_mcore.convert.to_hf import export_megatron_to_hf

__all__ = ["convert_hf_to_megatron", "export_megatron_to_hf"]
