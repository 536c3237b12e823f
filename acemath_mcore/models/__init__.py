"""Model families, presets, layer specs and the GPT model builder."""

from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.builder import ModelOptions, build_model, build_model_chunk, transformer_config
from acemath_mcore.models.families import FAMILIES, Family, family_for_hf_config
from acemath_mcore.models.presets import PRESETS, get_preset, resolve_arch

__all__ = [
    "FAMILIES",
    "Family",
    "ModelArch",
    "ModelOptions",
    "PRESETS",
    "build_model",
    "build_model_chunk",
    "family_for_hf_config",
    "get_preset",
    "resolve_arch",
    "transformer_config",
]
