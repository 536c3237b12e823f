"""The native core attention: exact causal attention, and packed (THD) sequences equal separate documents."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from distributed_helpers import run_workers

DOC_LENGTHS = [5, 17, 7, 1, 9, 6, 3, 32]  # length buckets of one document and of several (17 padded to 32)


def naive_causal_attention(q, k, v, scale):
    """float64 reference: explicit scores, causal mask, softmax; q [L, hq, d], k/v [L, hkv, d]."""
    q, k, v = (t.double() for t in (q, k, v))
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    length = q.shape[0]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _attention_worker(rank, world_size):
    from megatron.core.transformer.enums import AttnMaskType

    from acemath_mcore.models import ModelOptions, get_preset, transformer_config
    from acemath_mcore.models.attention import NativeCoreAttention
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training.engine import packed_seq_params

    init_distributed(ParallelConfig())
    arch = get_preset("tiny")  # 4 heads over 2 KV groups: exercises GQA
    config = transformer_config(arch, ParallelConfig(), ModelOptions(spec="native"))
    attention = NativeCoreAttention(config, 1, AttnMaskType.causal, "self")
    generator = torch.Generator().manual_seed(0)
    heads, groups, dim = arch.num_attention_heads, arch.num_query_groups, arch.kv_channels
    total = sum(DOC_LENGTHS)
    q = torch.randn(total, heads, dim, generator=generator, requires_grad=True)
    k = torch.randn(total, groups, dim, generator=generator, requires_grad=True)
    v = torch.randn(total, groups, dim, generator=generator, requires_grad=True)
    cu = torch.tensor([0] + list(torch.tensor(DOC_LENGTHS).cumsum(0)), dtype=torch.int32)
    params = packed_seq_params({"tokens": torch.zeros(1, total), "cu_seqlens": cu})
    packed = attention(q, k, v, None, packed_seq_params=params)
    upstream = torch.randn(packed.shape, generator=generator)
    packed_grads = torch.autograd.grad((packed * upstream).sum(), (q, k, v))

    scale = 1 / math.sqrt(dim)
    reference = torch.cat([naive_causal_attention(q[s:e], k[s:e], v[s:e], scale)
                           for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]).reshape(total, -1)
    reference_grads = torch.autograd.grad((reference * upstream.double()).sum(), (q, k, v))
    # Padded [s, b, h, d] input: one batch row per document length 32 doc, compared with the same reference.
    s, e = cu[-2].item(), cu[-1].item()
    padded = attention(q[s:e].unsqueeze(1), k[s:e].unsqueeze(1), v[s:e].unsqueeze(1), None)
    return {
        "packed_error": (packed.double() - reference).abs().max().item(),
        "grad_errors": [(a.double() - b).abs().max().item() for a, b in zip(packed_grads, reference_grads)],
        "padded_error": (padded.reshape(e - s, -1).double() - reference[s:e]).abs().max().item(),
    }


def test_core_attention_matches_float64_reference():
    result = run_workers(_attention_worker, 1)[0]
    assert result["packed_error"] <= 1e-5
    assert max(result["grad_errors"]) <= 1e-5
    assert result["padded_error"] <= 1e-5


def _packed_model_worker(rank, world_size):
    from acemath_mcore.models import ModelOptions, build_model, get_preset
    from acemath_mcore.models.weights import load_full_weights
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training.engine import packed_seq_params

    init_distributed(ParallelConfig())
    arch = dataclasses.replace(get_preset("tiny"), vocab_size=256)
    model = build_model(arch, ParallelConfig(), ModelOptions(spec="native"))[0]
    load_full_weights(model, random_full_weights(arch, seed=3), 0, 1)
    generator = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, arch.vocab_size, (n,), generator=generator) for n in DOC_LENGTHS]
    weights = [torch.randn(n, arch.padded_vocab_size, generator=generator) for n in DOC_LENGTHS]

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    separate_logits, separate_loss = [], 0.0
    for doc, weight in zip(docs, weights):
        logits = model(doc.unsqueeze(0), torch.arange(len(doc)).unsqueeze(0), None)[0]
        separate_logits.append(logits.detach())
        separate_loss = separate_loss + (logits * weight).sum()
    separate_grads = grads_of(separate_loss)

    tokens = torch.cat(docs).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in DOC_LENGTHS]).unsqueeze(0)
    cu = torch.tensor([0] + list(torch.tensor(DOC_LENGTHS).cumsum(0)), dtype=torch.int32)
    results = {"grad_scale": max(g.abs().max().item() for g in separate_grads.values())}
    # thd: megatron's packed layout (RoPE restarts per document); sbhd: the native spec's layout (RoPE by row
    # position, relative distances unchanged).
    for qkv_format in ("thd", "sbhd"):
        params = packed_seq_params({"tokens": tokens, "cu_seqlens": cu}, qkv_format)
        packed_logits = model(tokens, positions, None, packed_seq_params=params).reshape(-1, arch.padded_vocab_size)
        packed_grads = grads_of((packed_logits * torch.cat(weights)).sum())
        results[qkv_format] = {
            "logit_error": (packed_logits.detach() - torch.cat(separate_logits)).abs().max().item(),
            "grad_error": max((packed_grads[n] - separate_grads[n]).abs().max().item() for n in packed_grads),
        }
    return results


@pytest.mark.parametrize("qkv_format", ["thd", "sbhd"])
def test_packed_model_equals_documents_run_separately(packed_results, qkv_format):
    result = packed_results[qkv_format]
    assert packed_results["grad_scale"] > 1e-3
    assert result["logit_error"] <= 1e-5
    assert result["grad_error"] <= 1e-5 * max(1.0, packed_results["grad_scale"])


@pytest.fixture(scope="module")
def packed_results():
    return run_workers(_packed_model_worker, 1)[0]


@pytest.mark.parametrize("qkv_format", ["thd", "sbhd"])
def test_packing_parameters_from_a_host_batch_carry_its_document_bounds(qkv_format):
    """The engine builds PackedSeqParams from the loader's host batch: the attention then finds the document
    boundaries there instead of reading ``cu_seqlens`` back from the GPU in every micro-batch."""
    from acemath_mcore.models.attention import _document_bounds
    from acemath_mcore.training.engine import packed_seq_params

    bounds = [0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()]
    host = {"tokens": torch.zeros(1, bounds[-1], dtype=torch.long), "cu_seqlens": torch.tensor(bounds)}
    params = packed_seq_params(host, qkv_format, device=torch.device("cpu"))
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_q.tolist() == bounds
    # Overwriting the tensor shows the attention reads the host's copy, not the tensor.
    params.cu_seqlens_q = params.cu_seqlens_kv = torch.zeros_like(params.cu_seqlens_q)
    assert _document_bounds(params) == bounds
    assert params.max_seqlen_q == (bounds[-1] if qkv_format == "sbhd" else max(DOC_LENGTHS))
