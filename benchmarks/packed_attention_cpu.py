"""The native spec's packed attention where flash varlen is unavailable (CPU, fp32): forward + backward of
``NativeCoreAttention`` on one packed row, against the one-SDPA-call-per-document loop it replaced on 2026-11-23.

    python benchmarks/packed_attention_cpu.py                      # the toy RM's and a 1.5B-shaped row

Both compute the same function (the loop's output and gradients are compared first); the difference is the number
of kernel calls: the module pads the row's short documents into a few length buckets and runs one batched call
each, and runs long documents alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

# (name, heads, key/value heads, head dim, document lengths): the toy RM's 2048-token rows of ~40-token candidates
# (stories260K), and a 4096-token SFT row of mixed lengths with qwen2.5-1.5b's heads.
SHAPES = {
    "stories260k-rm": (8, 8, 8, [41, 38, 45, 36, 52, 40, 33, 47] * 6 + [24]),
    "qwen2.5-1.5b-sft": (12, 2, 128, [900, 35, 410, 1200, 64, 300, 7, 880, 300]),
}


def per_document_loop(query, key, value, lengths, scale):
    """The replaced implementation: one causal SDPA call per document."""
    outputs, start = [], 0
    for length in lengths:
        q, k, v = (t[start:start + length].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        outputs.append(F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=scale,
                                                      enable_gqa=True)[0].transpose(0, 1))
        start += length
    return torch.cat(outputs).reshape(query.shape[0], -1)


def _seconds(run, repeats: int) -> float:
    times = []
    for index in range(repeats + 1):  # the first call warms up (and builds the module's bucket indices)
        started = time.perf_counter()
        run()
        if index:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _worker(rank, world_size, repeats):
    from megatron.core.transformer.enums import AttnMaskType

    from acemath_mcore.models import ModelOptions, get_preset, transformer_config
    from acemath_mcore.models.attention import NativeCoreAttention
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training.engine import packed_seq_params

    init_distributed(ParallelConfig())
    rows = []
    for name, (heads, groups, dim, lengths) in SHAPES.items():
        arch = dataclasses.replace(get_preset("tiny"), num_attention_heads=heads, num_query_groups=groups,
                                   head_dim=dim, hidden_size=heads * dim)
        attention = NativeCoreAttention(transformer_config(arch, ParallelConfig(), ModelOptions(spec="native")), 1,
                                        AttnMaskType.causal, "self")
        total = sum(lengths)
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(total, heads, dim, generator=generator, requires_grad=True)
        k, v = (torch.randn(total, groups, dim, generator=generator, requires_grad=True) for _ in range(2))
        upstream = torch.randn(total, heads * dim, generator=generator)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        params = packed_seq_params({"tokens": torch.zeros(1, total), "cu_seqlens": cu})

        def bucketed():
            return attention(q, k, v, None, packed_seq_params=params)

        def looped():
            return per_document_loop(q, k, v, lengths, attention.softmax_scale)

        outputs = {}
        for label, forward in (("bucketed", bucketed), ("per-document", looped)):
            out = forward()
            outputs[label] = (out, torch.autograd.grad((out * upstream).sum(), (q, k, v)))
        (a, grads_a), (b, grads_b) = outputs.values()
        difference = max((x - y).abs().max().item() for x, y in zip((a, *grads_a), (b, *grads_b)))

        def step(forward):
            return lambda: torch.autograd.grad((forward() * upstream).sum(), (q, k, v))

        rows.append({"shape": name, "tokens": total, "documents": len(lengths), "max_abs_difference": difference,
                     "bucketed_ms": 1e3 * _seconds(step(bucketed), repeats),
                     "per_document_ms": 1e3 * _seconds(step(looped), repeats),
                     "threads": torch.get_num_threads()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    from acemath_mcore.runtime.local_workers import run_local_workers

    for row in run_local_workers(_worker, 1, args.repeats)[0]:
        print(f"{row['shape']:18s} {row['tokens']:5d} tokens in {row['documents']:2d} documents, "
              f"{row['threads']} threads: bucketed {row['bucketed_ms']:7.1f} ms, per-document loop "
              f"{row['per_document_ms']:7.1f} ms ({row['per_document_ms'] / row['bucketed_ms']:.2f}x), "
              f"max |difference| {row['max_abs_difference']:.1e}")


if __name__ == "__main__":
    main()
