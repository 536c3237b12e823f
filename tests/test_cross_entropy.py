"""The Triton language-model loss (acemath_mcore/models/cross_entropy.py) in Triton's CPU interpreter: the kernels'
arithmetic against a float64 reference, and a model trained with it against megatron's own loss, at TP 1 and 2.
tests/test_gpu.py runs the compiled kernels on CUDA at Qwen's vocabulary size."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_workers


def interpreted_cross_entropy_module():
    """The kernel module built for Triton's CPU interpreter. Call it only in a worker with a fresh interpreter:
    Triton reads TRITON_INTERPRET once, and the pytest process and the workers' fork server (through
    megatron-core) may have imported Triton already."""
    os.environ["TRITON_INTERPRET"] = "1"
    import acemath_mcore.models.cross_entropy as module

    return module


def reference_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 per-token loss; a target outside the vocabulary gives log-sum-exp alone (megatron's convention)."""
    flat = logits.double().reshape(-1, logits.shape[-1])
    ids = targets.reshape(-1)
    loss = F.cross_entropy(flat, ids.clamp(0, flat.shape[-1] - 1), reduction="none")
    outside = (ids < 0) | (ids >= flat.shape[-1])
    return torch.where(outside, torch.logsumexp(flat, -1), loss).reshape(targets.shape)


def _kernel_worker(rank, world_size, dtype):
    module = interpreted_cross_entropy_module()
    module.BLOCK = 64  # 1000 = 15 full blocks and a masked tail
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 3, 1000, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, 1000, (7, 3), generator=generator)
    targets[0, 0], targets[6, 2] = -100, 1000  # outside the vocabulary: padding ids
    grad_loss = torch.rand(7, 3, generator=generator)

    expected_input = logits.double().requires_grad_()
    expected = reference_loss(expected_input, targets)
    expected.backward(grad_loss)
    actual_input = logits.clone().requires_grad_()
    actual = module.vocab_parallel_cross_entropy(actual_input * 1, targets)  # non-leaf, as the LM head's output
    actual.backward(grad_loss)
    return actual.detach(), expected.detach(), actual_input.grad, expected_input.grad


@pytest.mark.parametrize("dtype,grad_tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_loss_and_gradient_match_float64_reference(dtype, grad_tolerance):
    actual, expected, actual_grad, expected_grad = run_workers(_kernel_worker, 1, dtype, fresh_interpreter=True)[0]
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.allclose(actual.double(), expected, rtol=1e-5, atol=1e-5)
    assert (actual_grad.double() - expected_grad).norm() / expected_grad.norm() < grad_tolerance


def _model_worker(rank, world_size):
    cross_entropy_module = interpreted_cross_entropy_module()
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.weights import canonical_parameters
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    parallel = ParallelConfig(tensor_parallel=world_size)
    init_distributed(parallel, seed=1)
    arch = get_preset("tiny")
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, arch.vocab_size, (2, 33), generator=generator)
    loss_mask = (torch.rand(2, 32, generator=generator) > 0.3).float()
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
             "position_ids": torch.arange(32).expand(2, -1)}
    engine = Engine(arch, parallel, ModelOptions(spec="native"), OptimConfig(), train_steps=1)
    engine.load_full_weights(random_full_weights(arch, seed=0))
    kernel_calls = []
    ours = cross_entropy_module.vocab_parallel_cross_entropy
    cross_entropy_module.vocab_parallel_cross_entropy = lambda *args: kernel_calls.append(1) or ours(*args)
    results = {}
    for kernel in ("megatron", "triton"):
        # The CPU resolves "auto" to megatron's loss; switching the shared config selects ours in the same model.
        engine.config.lm_cross_entropy = kernel
        for chunk in engine.model:
            chunk.zero_grad_buffer()
        calls_before = len(kernel_calls)
        report = engine.forward_backward(SFTTask(), [batch])[0]["lm loss"]
        grads = {name: param.main_grad.detach().clone() for name, param in canonical_parameters(engine.model[0])}
        results[kernel] = (report.clone(), grads, len(kernel_calls) - calls_before)
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_model_with_triton_loss_matches_megatron_loss(tp):
    """Same weights and batch (30% of tokens masked out of the loss): the loss and every parameter's gradient
    agree with megatron's, with the vocabulary split over TP ranks when tp=2."""
    for results in run_workers(_model_worker, tp, fresh_interpreter=True):  # each rank's own shards
        (expected_loss, expected_grads, megatron_calls), (actual_loss, actual_grads, triton_calls) = (
            results["megatron"], results["triton"])
        assert (megatron_calls, triton_calls) == (0, 1)  # our kernel ran, and only when selected
        assert torch.allclose(actual_loss, expected_loss, rtol=1e-5)
        for name, expected in expected_grads.items():
            assert expected.abs().max() > 0, name
            assert torch.allclose(actual_grads[name], expected, rtol=1e-4, atol=1e-6), name
