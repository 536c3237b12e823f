"""Model families, presets, layer specs and the GPT model builder."""

from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.families import FAMILIES, Family, family_for_hf_config
from acemath_mcore.models.presets import PRESETS, get_preset, resolve_arch
from acemath_mcore.options import ModelOptions

_BUILDER_NAMES = ("build_model", "build_model_chunk", "transformer_config")


def __getattr__(name: str):
    """The builder's names on first use: it imports megatron-core (seconds, and its warnings), which tools that
    only read shapes or presets (evaluate.py --help, best-of-n, preprocessing) do not need."""
    if name in _BUILDER_NAMES:
        from acemath_mcore.models import builder

        return getattr(builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
