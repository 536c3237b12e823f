"""Language-model loss kernels on one GPU: megatron-core's fused vocab-parallel cross entropy vs ours
(acemath_mcore/models/cross_entropy.py), forward + backward on the logits of one micro-batch.

    python benchmarks/cross_entropy_speed.py --tokens 8192 --vocab 151936

Each kernel is first checked against a float64 reference (loss and gradient), then timed with CUDA events
(median over repeats, three different random logit tensors in rotation, each repeat on a fresh copy since our
backward overwrites the logits). The floor is our kernels' traffic: the bf16 logits read twice and written once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing


def reference(logits: torch.Tensor, targets: torch.Tensor, grad_loss: torch.Tensor):
    """Loss and gradient in float64, 1024 rows at a time (the full float64 softmax would not fit)."""
    losses, grads = [], []
    for rows in range(0, logits.shape[0], 1024):
        x = logits[rows:rows + 1024].double()
        t = targets[rows:rows + 1024]
        lse = torch.logsumexp(x, dim=-1)
        losses.append(lse - x.gather(-1, t[:, None])[:, 0])
        softmax = torch.exp(x - lse[:, None])
        softmax[torch.arange(len(t)), t] -= 1
        grads.append(softmax * grad_loss[rows:rows + 1024, None].double())
    return torch.cat(losses), torch.cat(grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from acemath_mcore.models.cross_entropy import vocab_parallel_cross_entropy
    from acemath_mcore.runtime import ParallelConfig, init_distributed

    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    init_distributed(ParallelConfig())
    tp_group = parallel_state.get_tensor_model_parallel_group()
    kernels = {"megatron fused": lambda x, t: fused_vocab_parallel_cross_entropy(x, t, tp_group),
               "acemath triton": lambda x, t: vocab_parallel_cross_entropy(x, t, tp_group)}

    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.tokens, 1, args.vocab)  # megatron's [s, b, vocab] layout
    inputs = [(torch.randn(shape, device="cuda", generator=generator) * 3).to(torch.bfloat16) for _ in range(3)]
    targets = torch.randint(0, args.vocab, (args.tokens, 1), device="cuda", generator=generator)
    grad_loss = torch.rand(args.tokens, 1, device="cuda", generator=generator)
    ref_loss, ref_grad = reference(inputs[0][:, 0], targets[:, 0], grad_loss[:, 0])
    floor_s = 3 * inputs[0].numel() * 2 / 3.0e12  # 3 passes of bf16 at ~3.0 TB/s (H100 device-to-device copy)

    print(f"{args.tokens} tokens x {args.vocab} vocabulary, bf16 logits {inputs[0].numel() * 2 / 2**30:.2f} GiB; "
          f"floor {floor_s * 1e3:.2f} ms (3 passes at 3.0 TB/s)")
    print(f"{'kernel':16} {'loss err':>9} {'grad err':>9} {'fwd+bwd ms':>11} {'extra GiB':>10}")
    for name, fn in kernels.items():
        logits = inputs[0].clone().requires_grad_()
        loss = fn(logits, targets)
        loss.backward(grad_loss)
        loss_error = ((loss[:, 0].double() - ref_loss).abs().max() / ref_loss.abs().max()).item()
        grad_error = ((logits.grad[:, 0].double() - ref_grad).norm() / ref_grad.norm()).item()
        del logits, loss
        times, extra = [], 0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for repeat in range(args.repeats + 3):
            logits = inputs[repeat % 3].clone().requires_grad_()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start.record()
            fn(logits, targets).backward(grad_loss)
            end.record()
            torch.cuda.synchronize()
            if repeat >= 3:
                times.append(start.elapsed_time(end))
                extra = max(extra, torch.cuda.max_memory_allocated() - base)
            del logits
        print(f"{name:16} {loss_error:9.1e} {grad_error:9.1e} {statistics.median(times):11.2f} {extra / 2**30:10.2f}",
              flush=True)


if __name__ == "__main__":
    main()
