"""Named model shapes: the AceMath backbones with their exact Hugging Face shapes, plus a CPU-sized ``tiny``."""

from __future__ import annotations

from typing import Dict

from acemath_mcore.models.arch import ModelArch


def _qwen25(layers, hidden, ffn, heads, groups, vocab, tie, theta=1_000_000.0, max_pos=32768,
            eps=1e-6) -> ModelArch:
    return ModelArch(family="qwen2", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab, qkv_bias=True,
                     tie_embeddings=tie, rope_theta=theta, rms_norm_eps=eps, max_position_embeddings=max_pos)


def _llama31(layers, hidden, ffn, heads) -> ModelArch:
    return ModelArch(family="llama", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_attention_heads=heads, num_query_groups=8, vocab_size=128256, rope_theta=500000.0,
                     rope_scaling_factor=8.0, rms_norm_eps=1e-5, max_position_embeddings=131072)


# Qwen2.5-Math keeps Qwen2.5's shapes but uses rope theta 1e4 and a 4k context.
_MATH = dict(theta=10000.0, max_pos=4096)

PRESETS: Dict[str, ModelArch] = {
    # Runs a training step in well under a second on two CPU cores. The vocabulary fits the 512-piece
    # SentencePiece tokenizer of the real stories260K model in ../shared (lossless on arithmetic text).
    "tiny": ModelArch(family="qwen2", num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
                      num_query_groups=2, vocab_size=512, qkv_bias=True, tie_embeddings=True,
                      rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096),
    "qwen2.5-0.5b": _qwen25(24, 896, 4864, 14, 2, 151936, tie=True),
    # The base checkpoints' config.json values: 0.5B keeps a 32k context, 1.5B and up 128k; the 72B models
    # (base and Math) use RMSNorm epsilon 1e-5, the smaller ones 1e-6.
    "qwen2.5-1.5b": _qwen25(28, 1536, 8960, 12, 2, 151936, tie=True, max_pos=131072),
    "qwen2.5-7b": _qwen25(28, 3584, 18944, 28, 4, 152064, tie=False, max_pos=131072),
    "qwen2.5-72b": _qwen25(80, 8192, 29568, 64, 8, 152064, tie=False, max_pos=131072, eps=1e-5),
    "qwen2.5-math-1.5b": _qwen25(28, 1536, 8960, 12, 2, 151936, tie=True, **_MATH),
    "qwen2.5-math-7b": _qwen25(28, 3584, 18944, 28, 4, 152064, tie=False, **_MATH),
    "qwen2.5-math-72b": _qwen25(80, 8192, 29568, 64, 8, 152064, tie=False, **_MATH, eps=1e-5),
    "llama3.1-8b": _llama31(32, 4096, 14336, 32),
    "llama3.1-70b": _llama31(80, 8192, 28672, 64),
}


def get_preset(name: str) -> ModelArch:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def resolve_arch(model: str) -> ModelArch:
    """A preset by name, else the shapes in a Hugging Face ``config.json`` (or a directory holding one), else those
    a converted or trained megatron checkpoint records (its ``model_arch.json``, or its save dir's)."""
    import json
    from pathlib import Path

    from acemath_mcore.convert.megatron_files import find_model_description
    from acemath_mcore.models.families import family_for_hf_config

    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir() and not (path / "config.json").is_file():
        recorded = find_model_description(path)[0]
        if recorded is not None:
            return recorded
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}), nor a config.json, "
                         "nor a megatron checkpoint with model_arch.json")
    hf_config = json.loads(path.read_text())
    return family_for_hf_config(hf_config).arch_from_hf(hf_config)
