"""Model families against Hugging Face transformers: same logits for the same weights, exact round trips."""

from __future__ import annotations


import pytest
import torch

from distributed_helpers import run_workers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def tiny_hf_model(kind: str, num_layers: int = 2):
    """A tiny random HF model whose norms and biases are perturbed too, so every mapped tensor matters."""
    import transformers

    torch.manual_seed(num_layers)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "llama3":
        config = transformers.LlamaConfig(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(tie_word_embeddings=kind == "qwen2-tied", rope_theta=10000.0, **common)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif "bias" in name:
                param.normal_(0, 0.1)
    config_dict = config.to_dict()
    config_dict["architectures"] = [type(model).__name__]
    return model.eval(), config_dict


KINDS = ["qwen2-tied", "qwen2-untied", "llama3"]


def _logits_worker(rank, world_size):
    from acemath_mcore.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    return {kind: _compare_with_transformers(kind) for kind in KINDS}


def _compare_with_transformers(kind):
    from acemath_mcore.models import ModelOptions, build_model, family_for_hf_config
    from acemath_mcore.models.weights import load_full_weights
    from acemath_mcore.runtime import ParallelConfig

    hf_model, hf_config = tiny_hf_model(kind)
    family = family_for_hf_config(hf_config)
    arch = family.arch_from_hf(hf_config)
    model = build_model(arch, ParallelConfig(), ModelOptions(spec="native"))[0].eval()
    mcore_weights = family.hf_to_megatron(arch, hf_model.state_dict())
    load_full_weights(model, mcore_weights, 0, 1)
    tokens = torch.randint(0, arch.vocab_size, (2, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        actual = model(tokens, torch.arange(77).expand(2, -1), None)
    back = family.megatron_to_hf(arch, mcore_weights)
    reference = hf_model.state_dict()
    return {
        "arch": arch,
        "max_error": (actual[..., : arch.vocab_size] - expected).abs().max().item(),
        "padding_rows": actual.shape[-1] - arch.vocab_size,
        "round_trip_exact": back.keys() == reference.keys() and all(torch.equal(back[k], reference[k]) for k in back),
    }


@pytest.fixture(scope="module")
def comparisons():
    return run_workers(_logits_worker, 1)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_megatron_logits_match_transformers(comparisons, kind):
    result = comparisons[kind]
    assert result["max_error"] <= 1e-4
    assert result["round_trip_exact"]
    assert result["padding_rows"] == 84  # vocab 300 padded to 384 (a multiple of 128, independent of TP)
    arch = result["arch"]
    assert arch.tie_embeddings == (kind == "qwen2-tied")
    assert arch.qkv_bias == kind.startswith("qwen2")
    assert arch.rope_scaling_factor == (8.0 if kind == "llama3" else None)


def test_hf_config_round_trip_through_transformers():
    """The config we export for a preset is read back by transformers into the same architecture."""
    import transformers

    from acemath_mcore.models import FAMILIES, get_preset

    for preset in ("qwen2.5-math-7b", "qwen2.5-1.5b", "llama3.1-8b"):
        arch = get_preset(preset)
        family = FAMILIES[arch.family]
        exported = family.hf_config_from_arch(arch)
        config_class = transformers.Qwen2Config if arch.family == "qwen2" else transformers.LlamaConfig
        reread = config_class(**{k: v for k, v in exported.items() if k != "architectures"}).to_dict()
        reread["architectures"] = exported["architectures"]
        assert family.arch_from_hf(reread) == arch, preset


def test_unsupported_inputs_give_clear_errors():
    from acemath_mcore.models import get_preset
    from acemath_mcore.models.families import LLAMA, QWEN2, family_for_hf_config

    with pytest.raises(ValueError, match="unsupported architecture.*MistralForCausalLM"):
        family_for_hf_config({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    base = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
            "vocab_size": 300}
    with pytest.raises(ValueError, match="high_freq_factor=2.0 differs"):
        LLAMA.arch_from_hf({**base, "rope_scaling": {**LLAMA3_ROPE, "high_freq_factor": 2.0}})
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        LLAMA.arch_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        LLAMA.arch_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="attention_bias=true .* not supported"):  # o_proj would lose its bias
        LLAMA.arch_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match=r"qwen2: use_sliding_window=true \(sliding-window attention\) is not"):
        QWEN2.arch_from_hf({**base, "use_sliding_window": True, "sliding_window": 32})
    assert QWEN2.arch_from_hf({**base, "use_sliding_window": False, "sliding_window": 32}).num_layers == 2
    with pytest.raises(ValueError, match=r"rope_theta=10000.5 is not a whole number"):
        LLAMA.arch_from_hf({**base, "rope_theta": 10000.5})
    with pytest.raises(ValueError, match="tensor_parallel=4 does not divide num_query_groups=2"):
        get_preset("qwen2.5-1.5b").check_tensor_parallel(4)
    with pytest.raises(ValueError, match="unknown model preset 'qwen3'"):
        get_preset("qwen3")


# The shape fields of the published base checkpoints' config.json (huggingface.co/<org>/<name>/blob/main/config.json),
# the values convert_from_hf records: a preset that differs blocks init_from on the real weights.
_QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", use_sliding_window=False)
PUBLISHED_CONFIGS = {
    "qwen2.5-1.5b": dict(_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=131072, tie_word_embeddings=False),
    "qwen2.5-72b": dict(_QWEN, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=152064, rms_norm_eps=1e-5, rope_theta=1e6,
                        max_position_embeddings=131072, tie_word_embeddings=False),
    "qwen2.5-math-1.5b": dict(_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
                              rope_theta=1e4, max_position_embeddings=4096, tie_word_embeddings=True),
    "qwen2.5-math-7b": dict(_QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
                            rope_theta=1e4, max_position_embeddings=4096, tie_word_embeddings=False),
    "qwen2.5-math-72b": dict(_QWEN, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, rms_norm_eps=1e-5,
                             rope_theta=1e4, max_position_embeddings=4096, tie_word_embeddings=False),
    "llama3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                        tie_word_embeddings=False,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_CONFIGS))
def test_presets_match_the_published_base_configs(preset):
    from acemath_mcore.models import family_for_hf_config, get_preset

    config = PUBLISHED_CONFIGS[preset]
    recorded = family_for_hf_config(config).arch_from_hf(config)
    get_preset(preset).check_matches(recorded, f"published {preset}")  # raises naming the field that differs


@pytest.mark.parametrize("preset,expected_billions", [
    ("qwen2.5-0.5b", 0.494), ("qwen2.5-1.5b", 1.544), ("qwen2.5-7b", 7.616), ("qwen2.5-72b", 72.71),
    ("llama3.1-8b", 8.030), ("llama3.1-70b", 70.55),
])
def test_preset_parameter_counts_match_published_sizes(preset, expected_billions):
    """Published parameter counts (model cards) pin the preset shapes; our count pads the vocab to 128."""
    from acemath_mcore.models import get_preset

    arch = get_preset(preset)
    unpadded = arch.num_parameters() - (arch.padded_vocab_size - arch.vocab_size) * arch.hidden_size * (
        1 if arch.tie_embeddings else 2)
    assert unpadded / 1e9 == pytest.approx(expected_billions, rel=2e-3)


def test_a_preset_that_differs_from_the_recorded_architecture_is_refused_by_name():
    from acemath_mcore.models import get_preset

    math_7b, base_7b = get_preset("qwen2.5-math-7b"), get_preset("qwen2.5-7b")
    math_7b.check_matches(None, "unrecorded")  # nothing recorded: nothing to compare
    math_7b.check_matches(get_preset("qwen2.5-math-7b"), "same")
    # Same shapes, another RoPE base and context: weights would load and compute something else.
    with pytest.raises(ValueError, match=r"ckpt records another architecture than the one asked for: rope_theta "
                                         r"1000000.0 there, 10000.0 here; max_position_embeddings 131072 there, "
                                         r"4096 here"):
        math_7b.check_matches(base_7b, "ckpt")


def test_context_parallelism_is_refused_until_the_data_path_splits_sequences():
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.builder import transformer_config
    from acemath_mcore.runtime import ParallelConfig

    with pytest.raises(ValueError, match="context_parallel=2: context parallelism is not supported"):
        transformer_config(get_preset("tiny"), ParallelConfig(context_parallel=2), ModelOptions(spec="native"))


def test_fp8_on_the_native_spec_says_it_needs_transformer_engine():
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.builder import transformer_config
    from acemath_mcore.runtime import ParallelConfig

    with pytest.raises(RuntimeError, match=r"FP8 needs Transformer Engine's layer spec \(model_options.spec=te\); this "
                                           r"model is built with the native spec \(Transformer Engine is not available"):
        transformer_config(get_preset("tiny"), ParallelConfig(), ModelOptions(spec="native", fp8="hybrid"))


def test_cuda_graph_options_are_checked_before_any_model_exists():
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.builder import transformer_config
    from acemath_mcore.runtime import ParallelConfig

    arch = get_preset("tiny")
    with pytest.raises(ValueError, match=r"model_options.cuda_graph='attn': choose none or one of \('mlp',\)"):
        transformer_config(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True, cuda_graph="attn"))
    with pytest.raises(RuntimeError, match=r"cuda_graph needs Transformer Engine's layer spec on a GPU \(model_options"
                                           r".spec=te\); this model is built with the native spec on a machine"):
        transformer_config(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True, cuda_graph="mlp"))


def test_cuda_graph_fields_are_ones_the_installed_megatron_accepts():
    """The scope field changed name between megatron-core 0.16 and 0.17; the fields chosen for the installed one
    must construct a TransformerConfig whose normalised scope is the MLP alone."""
    from megatron.core.transformer import TransformerConfig

    from acemath_mcore.models.builder import CUDA_GRAPH_WARMUP_STEPS, cuda_graph_fields

    fields = cuda_graph_fields("mlp")
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, bf16=True, **fields)
    scope = getattr(config, "cuda_graph_modules", None) or config.cuda_graph_scope
    assert [item.name for item in scope] == ["mlp"]
    assert config.cuda_graph_impl == "transformer_engine"
    assert config.cuda_graph_warmup_steps == CUDA_GRAPH_WARMUP_STEPS
