"""The native spec's packed attention kernel alone: torch's flash varlen attention, forward + backward, on
qwen2.5-1.5b's heads (12 query heads, 2 key/value heads, dim 128) over one micro-batch of packed documents.

    python benchmarks/varlen_attention_speed.py --tokens 16384

It times keys and values repeated to every query head (what models/attention.py did before 2026-11-23 on torch
without an ``enable_gqa`` parameter) against handing the kernel the 2 key/value heads directly (what it does now:
flash kernels share them natively) and, where torch has it, ``enable_gqa=True``; each variant's output and
gradients are compared with the repeated one first. Measured on torch 2.11 only. Multiply by layers x
micro-batches for a step's attention time (TE's cuDNN kernel is the reference in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import document_lengths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--row-length", type=int, default=4096, help="packed rows the documents fill")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from torch.nn.attention.varlen import varlen_attn

    accepted = set(inspect.signature(varlen_attn).parameters)
    print(f"torch {torch.__version__}, varlen_attn parameters: {sorted(accepted)}")
    generator = torch.Generator().manual_seed(0)
    lengths = [n for _ in range(args.tokens // args.row_length) for n in document_lengths(args.row_length, 700, generator)]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    longest, tokens, group = max(lengths), sum(lengths), args.heads // args.kv_heads

    def make(heads):
        return torch.randn(tokens, heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    query, key, value = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    grad_out = torch.randn(tokens, args.heads, 128, device="cuda", dtype=torch.bfloat16)
    causal = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    variants = {
        "repeated key/value heads": lambda: varlen_attn(query, key.repeat_interleave(group, dim=1),
                                                        value.repeat_interleave(group, dim=1), cu, cu, longest,
                                                        longest, **causal),
        "key/value heads as they are": lambda: varlen_attn(query, key, value, cu, cu, longest, longest, **causal),
    }
    if "enable_gqa" in accepted:
        variants["enable_gqa=True"] = lambda: varlen_attn(query, key, value, cu, cu, longest, longest,
                                                          enable_gqa=True, **causal)
    reference = None
    for name, attention in variants.items():
        try:
            out = attention()
            out.backward(grad_out)
        except (RuntimeError, ValueError) as error:
            print(f"{name}: refused ({type(error).__name__}: {str(error).splitlines()[0][:160]})")
            continue
        results = [out.detach()] + [t.grad for t in (query, key, value)]
        for t in (query, key, value):
            t.grad = None
        if reference is None:
            reference = results
        errors = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                  for a, b in zip(results, reference)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for index in range(args.repeats + 3):
            start.record()
            attention().backward(grad_out)
            end.record()
            torch.cuda.synchronize()
            if index >= 3:
                times.append(start.elapsed_time(end))
        for t in (query, key, value):
            t.grad = None
        print(f"{name}: {statistics.median(times):.3f} ms forward + backward ({tokens} tokens, {len(lengths)} "
              f"documents); max relative difference to the first (out, dq, dk, dv): "
              + ", ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    main()
