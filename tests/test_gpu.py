"""GPU checks (run on the lent H100/H200 with `python -m pytest -m gpu tests/test_gpu.py`; CI has no GPU).

The native spec on CUDA must compute what the CPU reference computes (bf16 tolerances), packed rows must equal
their documents run alone, and the Transformer Engine spec must train when TE is installed.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

DOC_LENGTHS = [300, 17, 1, 900, 2878]  # fills one 4096-token row


@pytest.fixture(scope="module")
def single_rank():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device; deselect them with -m 'not gpu'")
    from acemath_mcore.runtime import ParallelConfig, init_distributed

    os.environ.setdefault("MASTER_PORT", "29731")
    init_distributed(ParallelConfig())
    yield


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_varlen_attention_matches_per_document_reference(single_rank):
    from megatron.core.transformer.enums import AttnMaskType

    from acemath_mcore.models import ModelOptions, get_preset, transformer_config
    from acemath_mcore.models.attention import NativeCoreAttention, _varlen_attn
    from acemath_mcore.runtime import ParallelConfig
    from acemath_mcore.training.engine import packed_seq_params

    assert _varlen_attn is not None, "torch.nn.attention.varlen is missing: packed rows fall back to a loop"
    arch = get_preset("qwen2.5-1.5b")
    config = transformer_config(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True))
    attention = NativeCoreAttention(config, 1, AttnMaskType.causal, "self").cuda()
    total = sum(DOC_LENGTHS)
    q = torch.randn(total, arch.num_attention_heads, arch.kv_channels, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, arch.num_query_groups, arch.kv_channels, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0] + torch.tensor(DOC_LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    out = attention(q, k, v, None, packed_seq_params=packed_seq_params({"tokens": q[None, :, 0, 0], "cu_seqlens": cu}))
    reference = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[start:end].float().transpose(0, 1) for t in (q, k, v))
        reference.append(torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, enable_gqa=True).transpose(0, 1).reshape(end - start, -1))
    assert relative_error(out, torch.cat(reference)) < 1e-2


def test_native_spec_on_cuda_matches_cpu_reference_and_packing(single_rank):
    from acemath_mcore.models import ModelOptions, build_model, get_preset
    from acemath_mcore.models.weights import load_full_weights
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig
    from acemath_mcore.training.engine import packed_seq_params

    arch = dataclasses.replace(get_preset("qwen2.5-0.5b"), num_layers=4)
    full = random_full_weights(arch, seed=0)
    tokens = torch.randint(0, arch.vocab_size, (1, sum(DOC_LENGTHS)), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0] + torch.tensor(DOC_LENGTHS).cumsum(0).tolist(), dtype=torch.int32)

    model = build_model(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True))[0].eval()
    load_full_weights(model, full, 0, 1)
    with torch.no_grad():
        packed = model(tokens.cuda(), None, None, packed_seq_params=packed_seq_params(
            {"tokens": tokens, "cu_seqlens": cu.cuda()}, "sbhd"))[0].float().cpu()
        separate = torch.cat([model(tokens[:, s:e].cuda(), None, None)[0].float().cpu()
                              for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert relative_error(packed, separate) < 2e-2

    # fp32 reference for the longest document (TE kernels, when installed, refuse float64)
    start, end = cu[-2].item(), cu[-1].item()
    fp32_model = build_model(arch, ParallelConfig(), ModelOptions(spec="native", bf16=False))[0].eval()
    load_full_weights(fp32_model, full, 0, 1)
    with torch.no_grad():
        reference = fp32_model(tokens[:, start:end].cuda(), None, None)[0].cpu()
    # bf16 activations through 4 layers and a 152k-way head: measured 0.0216 on an H100 (2026-11-22)
    assert relative_error(separate[start:end], reference) < 3e-2


def test_native_packed_forward_reads_no_document_bounds_back(single_rank):
    """Built from the loader's host batch (as the engine does), the packing parameters give the native
    attention its document boundaries: no layer makes the host wait for the GPU to read ``cu_seqlens``."""
    from acemath_mcore.models import ModelOptions, build_model, get_preset
    from acemath_mcore.runtime import ParallelConfig
    from acemath_mcore.runtime.device import host_waits
    from acemath_mcore.training.engine import packed_seq_params

    arch = dataclasses.replace(get_preset("qwen2.5-0.5b"), num_layers=2)
    model = build_model(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True))[0].eval()
    tokens = torch.randint(0, arch.vocab_size, (1, sum(DOC_LENGTHS)), generator=torch.Generator().manual_seed(0))
    host = {"tokens": tokens, "cu_seqlens": torch.tensor([0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()])}
    device_tokens = tokens.cuda()

    def forward():
        with torch.no_grad():
            model(device_tokens, None, None, packed_seq_params=packed_seq_params(host, "sbhd", torch.device("cuda")))

    waits = host_waits(forward)
    assert not {line: n for line, n in waits.items() if "acemath_mcore" in line}, waits


def test_transformer_engine_spec_trains_a_step(single_rank):
    from acemath_mcore.runtime import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed on this GPU machine")  # GPU-only, TE-only
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.runtime import ParallelConfig
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    arch = dataclasses.replace(get_preset("qwen2.5-0.5b"), num_layers=4)
    engine = Engine(arch, ParallelConfig(), ModelOptions(spec="te", bf16=True), OptimConfig(lr=1e-4), train_steps=3)
    tokens = torch.randint(0, arch.vocab_size, (1, 4097), device="cuda")
    cu = torch.tensor([0] + torch.tensor(DOC_LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, 4096, device="cuda"),
             "position_ids": torch.arange(4096, device="cuda")[None], "cu_seqlens": cu,
             "max_seqlen": max(DOC_LENGTHS)}
    losses = [engine.train_step(SFTTask(), [batch])["lm_loss"] for _ in range(3)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("spec", ["native", "te"])
def test_fused_weight_gradients_match_unfused_on_cuda(single_rank, spec):
    """bf16 into fp32 main_grad: the fused path (runtime/wgrad_fusion's addmm for megatron's layers, TE's own
    kernels for TE's) against a .grad plus an add per layer; two micro-batches, tied embeddings."""
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.weights import canonical_parameters
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig, transformer_engine_available
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    if spec == "te" and not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed on this GPU machine")  # GPU-only, TE-only
    arch = dataclasses.replace(get_preset("qwen2.5-0.5b"), num_layers=2)
    full = random_full_weights(arch, seed=0)
    tokens = torch.randint(0, arch.vocab_size, (2, 2, 1025), generator=torch.Generator().manual_seed(0)).cuda()
    micro_batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(2, 1024, device="cuda"),
                      "position_ids": torch.arange(1024, device="cuda").expand(2, -1)} for t in tokens]
    grads = {}
    for fused in (False, True):
        engine = Engine(arch, ParallelConfig(), ModelOptions(spec=spec, bf16=True, gradient_accumulation_fusion=fused),
                        OptimConfig(), train_steps=1)
        engine.load_full_weights(full)
        engine.forward_backward(SFTTask(), micro_batches)
        grads[fused] = {name: param.main_grad.float().cpu() for name, param in canonical_parameters(engine.model[0])}
        del engine
    for name, unfused in grads[False].items():
        assert unfused.abs().max() > 0, f"{name} has an all-zero gradient"
        assert relative_error(grads[True][name], unfused) < 1e-2, name


def test_triton_cross_entropy_matches_float64_reference_on_cuda(single_rank):
    """Qwen's 151,936-entry vocabulary (not a multiple of the kernel's block: the tail is masked), bf16 logits,
    one target outside the vocabulary (contributes log-sum-exp only, as in megatron)."""
    from acemath_mcore.models.cross_entropy import vocab_parallel_cross_entropy

    generator = torch.Generator(device="cuda").manual_seed(1)
    vocab = 151936
    logits = (torch.randn(1024, 2, vocab, device="cuda", generator=generator) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (1024, 2), device="cuda", generator=generator)
    targets[5, 1] = -100
    grad_loss = torch.rand(1024, 2, device="cuda", generator=generator)
    reference = logits.double().requires_grad_()
    lse = torch.logsumexp(reference, dim=-1)
    picked = reference.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(targets >= 0, lse - picked, lse)
    expected.backward(grad_loss)
    actual_logits = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(actual_logits, targets)
    loss.backward(grad_loss)
    assert loss.dtype == torch.float32 and loss.shape == targets.shape
    assert ((loss.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert relative_error(actual_logits.grad, reference.grad) < 1e-2  # bf16 gradient rounding


def test_training_batches_arrive_in_page_locked_memory(tmp_path):
    """So the engine's non_blocking copies to the GPU do not make the host wait (data/datasets.batch_loader)."""
    import numpy as np

    from acemath_mcore.data.datasets import build_sft_dataloader, build_sft_dataset
    from acemath_mcore.data.indexed import SFTIndexedWriter

    rng = np.random.default_rng(0)
    with SFTIndexedWriter(tmp_path / "data", vocab_size=100) as writer:
        for length in (40, 70, 25, 90):
            writer.add(rng.integers(0, 100, length).astype(np.int32), np.ones(length, dtype=np.uint8))
    dataset = build_sft_dataset([str(tmp_path / "data")], seq_length=128, packed=True)
    loader = build_sft_dataloader(dataset, pad_id=0, global_batch_size=1, micro_batch_size=1, dp_rank=0, dp_size=1)
    batch = next(iter(loader))
    assert all(value.is_pinned() for value in batch.values() if isinstance(value, torch.Tensor))


@pytest.mark.parametrize("kind", ["listwise_bt", "bce"])
def test_reward_loss_never_waits_for_the_device(single_rank, kind):
    """CUDA's own sync check on what tests/device_waits.py checks on CPU: the RM loss, its metrics and its
    backward launch without the host waiting for the GPU."""
    from acemath_mcore.runtime.device import host_waits
    from acemath_mcore.training.rm_losses import rm_loss

    sizes = torch.tensor([6, 6, 3, 5], device="cuda")
    labels = (torch.arange(20, device="cuda") % 3 == 0).float()
    scores = torch.randn(20, device="cuda", requires_grad=True)
    results = []

    def loss_and_backward():
        loss_sum, _, report = rm_loss(kind, scores, labels, sizes)
        loss_sum.backward()
        results.append(report)

    assert host_waits(loss_and_backward) == {}
    assert torch.isfinite(scores.grad).all() and results[0]["pairwise accuracy"][1].item() > 0
    assert sum(host_waits(lambda: scores.sum().item()).values()) == 1  # the count sees a wait where there is one


def test_triton_and_megatron_language_model_losses_agree_on_cuda(single_rank):
    """The whole model: same weights and batch, the loss and every parameter's gradient with our kernel equal
    those with megatron's fused cross entropy (bf16 tolerances)."""
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.weights import canonical_parameters
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    arch = dataclasses.replace(get_preset("qwen2.5-0.5b"), num_layers=2)
    full = random_full_weights(arch, seed=0)
    tokens = torch.randint(0, arch.vocab_size, (2, 1025), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 1024, device="cuda"),
             "position_ids": torch.arange(1024, device="cuda").expand(2, -1)}
    losses, grads = {}, {}
    for kernel in ("megatron", "triton"):
        engine = Engine(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True, cross_entropy=kernel),
                        OptimConfig(), train_steps=1)
        assert engine.config.lm_cross_entropy == kernel
        engine.load_full_weights(full)
        losses[kernel] = engine.forward_backward(SFTTask(), [batch])[0]["lm loss"]
        grads[kernel] = {name: param.main_grad.float().cpu() for name, param in canonical_parameters(engine.model[0])}
        del engine
    assert torch.allclose(losses["triton"].float(), losses["megatron"].float(), rtol=1e-3)
    for name, expected in grads["megatron"].items():
        assert relative_error(grads["triton"][name], expected) < 1e-2, name


def _packed_micro_batch(vocab: int, generator: torch.Generator, cuts: list) -> dict:
    """One packed 4096-token row whose documents end at ``cuts`` (a different set per micro-batch)."""
    tokens = torch.randint(0, vocab, (1, 4097), generator=generator).cuda()
    bounds = [0, *cuts, 4096]
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    positions = torch.cat([torch.arange(end - start) for start, end in zip(bounds, bounds[1:])]).cuda()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, 4096, device="cuda"),
            "position_ids": positions[None], "cu_seqlens": cu,
            "max_seqlen": max(end - start for start, end in zip(bounds, bounds[1:]))}


@pytest.mark.parametrize("fp8", [None, "hybrid"], ids=["bf16", "fp8"])
def test_mlp_cuda_graphs_train_like_eager_layers(single_rank, fp8):
    """model_options.cuda_graph="mlp": the same weights and packed micro-batches (other document boundaries in
    each) give the same losses with and without the graphs, before and after the capture step."""
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.builder import CUDA_GRAPH_WARMUP_STEPS
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig, transformer_engine_available
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    if not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed on this GPU machine")  # GPU-only, TE-only
    arch = dataclasses.replace(get_preset("qwen2.5-0.5b"), num_layers=4)
    full = random_full_weights(arch, seed=0)
    steps = CUDA_GRAPH_WARMUP_STEPS + 3
    generator = torch.Generator().manual_seed(0)
    batches = [[_packed_micro_batch(arch.vocab_size, generator, sorted(torch.randperm(4000, generator=generator)[:n]
                                                                        .add(50).tolist()))
                for n in (3, 9, 1)] for _ in range(steps)]
    losses = {}
    for graph in (None, "mlp"):
        engine = Engine(arch, ParallelConfig(), ModelOptions(spec="te", bf16=True, fp8=fp8, cuda_graph=graph),
                        OptimConfig(lr=1e-4), train_steps=steps)
        engine.load_full_weights(full)
        losses[graph] = [engine.train_step(SFTTask(), step)["lm_loss"] for step in batches]
        if graph:
            assert engine.graphs.captured == ((4096, 1), 3)
            layers = engine.model[0].module.module.decoder.layers
            assert all(len(layer.cuda_graphs) == 1 for layer in layers)  # one graph per layer, every micro-batch
        del engine
    tolerance = 1e-3 if fp8 is None else 2e-2  # FP8: the capture's warm-up passes feed the amax history
    assert losses["mlp"] == pytest.approx(losses[None], rel=tolerance), losses
    assert losses["mlp"][-1] < losses["mlp"][0]


def test_memory_sized_decoding_stays_within_its_budget(single_rank):
    """--batch-size auto's per-row estimate (DecodeMemory) against the caching allocator: what decoding allocates
    beyond the weights stays under the budget its batches were cut for, with rows that never stop early."""
    from acemath_mcore.eval.generation import MegatronGenerator, SamplingParams
    from acemath_mcore.models import ModelOptions, build_model, get_preset
    from acemath_mcore.runtime import ParallelConfig

    arch, new_tokens, budget = get_preset("qwen2.5-1.5b"), 512, 2 * 2**30
    model = build_model(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True))[0].eval()
    generator = MegatronGenerator(model, arch, stop_ids=[arch.vocab_size], max_batch_size=512,
                                  max_sequence_length=4096, memory_budget=budget)
    random = torch.Generator().manual_seed(0)
    lengths = sorted(torch.randint(50, 1500, (64,), generator=random).tolist())
    prompts = [torch.randint(0, arch.vocab_size, (n,), generator=random).tolist() for n in lengths]
    batches = generator.batches(lengths, new_tokens)
    assert len(batches) >= 2 and len(batches[0]) > 8, batches
    predicted = max(len(b) * generator.memory.row_bytes(lengths[b[-1]], lengths[b[-1]] + new_tokens) for b in batches)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights_and_rest = torch.cuda.memory_allocated()
    generations = generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
    used = torch.cuda.max_memory_allocated() - weights_and_rest
    print(f"decoding allocated at most {used / 2**30:.2f} GiB; largest batch predicted {predicted / 2**30:.2f} GiB; "
          f"budget {budget / 2**30:.2f} GiB; batches {[len(b) for b in batches]}")
    assert all(len(g.token_ids) == new_tokens for g in generations)
    assert used <= predicted <= budget
