"""Gradient-accumulation fusion without apex (acemath_mcore.runtime.wgrad_fusion).

The fp32 multi-rank equivalence (fused layouts against an unfused one, TP/PP included) is in
test_parallel_equivalence.py; here: the accumulation itself, megatron accepting the option, and a bf16 model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from acemath_mcore.runtime import release_model_parallel
from distributed_helpers import run_workers


def _operands(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total_input = torch.randn(96, 40, generator=generator).to(dtype)   # [tokens, in]
    grad_output = torch.randn(96, 24, generator=generator).to(dtype)   # [tokens, out]
    return total_input, grad_output


@pytest.mark.parametrize("operand_dtype", [torch.float32, torch.bfloat16])
def test_accumulates_grad_output_transposed_times_input(operand_dtype):
    from acemath_mcore.runtime.wgrad_fusion import accumulate_weight_gradient

    main_grad = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    expected = main_grad.double().clone()
    for seed in (0, 1):  # two micro-batches accumulate
        total_input, grad_output = _operands(operand_dtype, seed)
        accumulate_weight_gradient(total_input, grad_output, main_grad)
        expected += grad_output.double().t() @ total_input.double()
    assert main_grad.dtype == torch.float32
    # fp32: one addmm_; bf16 operands: a bf16 product (rounded to 8 bits) added in fp32, or a fused fp32 GEMM.
    tolerance = 1e-5 if operand_dtype == torch.float32 else 1e-2
    error = ((main_grad.double() - expected).abs().max() / expected.abs().max()).item()
    assert error < tolerance, error


def test_megatron_linear_layers_accept_the_option_after_install():
    from megatron.core.tensor_parallel import layers

    from acemath_mcore.runtime import wgrad_fusion

    implementation = wgrad_fusion.install()
    assert layers._grad_accum_fusion_available
    if implementation == "torch":
        assert layers.fused_weight_gradient_mlp_cuda is wgrad_fusion.TORCH_WGRAD_EXTENSION
    assert wgrad_fusion.install() == implementation, "installing twice must change nothing"


def _bf16_main_grads(rank, world_size):

    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.weights import canonical_parameters
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    arch = dataclasses.replace(get_preset("tiny"), vocab_size=256)
    full = random_full_weights(arch, seed=7)
    tokens = torch.randint(0, arch.vocab_size, (4, 25), generator=torch.Generator().manual_seed(0))
    micro_batches = [{"tokens": tokens[i:i + 2, :-1].contiguous(), "labels": tokens[i:i + 2, 1:].contiguous(),
                      "loss_mask": torch.ones(2, 24), "position_ids": torch.arange(24).expand(2, -1).contiguous()}
                     for i in (0, 2)]
    grads = {}
    for fused in (False, True):
        init_distributed(ParallelConfig(), seed=1)
        engine = Engine(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True,
                                                             gradient_accumulation_fusion=fused),
                        OptimConfig(), train_steps=1)
        engine.load_full_weights(full)
        engine.forward_backward(SFTTask(), micro_batches)
        grads[fused] = {name: param.main_grad.clone() for name, param in canonical_parameters(engine.model[0])}
        release_model_parallel()
    return grads


def test_bf16_model_main_grads_match_the_unfused_path():
    """Two micro-batches into fp32 main_grad, tied embeddings: megatron marks the shared weight zero_out_wgrad so
    the fused output layer's dummy gradient does not swallow the embedding's gradient."""
    grads = run_workers(_bf16_main_grads, 1)[0]
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 4 * 7 + 2
    for name, unfused in grads[False].items():
        fused = grads[True][name]
        assert fused.dtype == torch.float32
        assert unfused.abs().max() > 0, f"{name} has an all-zero gradient"
        # Only the order of bf16 roundings differs (the tied embedding's two gradients are summed in bf16 unfused).
        error = ((fused - unfused).abs().max() / unfused.abs().max()).item()
        assert error < 1e-2, f"{name}: fused main_grad differs by {error:.2e} (relative)"
