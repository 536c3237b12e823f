"""Checkpoint conversion between Hugging Face safetensors and megatron ``torch_dist`` (see docs/checkpoints.md)."""

import importlib

_CONVERTERS = {"convert_hf_to_megatron": "from_hf", "export_megatron_to_hf": "to_hf"}


def __getattr__(name: str):
    """The converters on first use: they import megatron-core (seconds), which reading a checkpoint's recorded
    model (``megatron_files``, used by ``--dry-run`` and Slurm preflight) does not need."""
    if name in _CONVERTERS:
        return getattr(importlib.import_module(f"{__name__}.{_CONVERTERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["convert_hf_to_megatron", "export_megatron_to_hf"]
