"""Training throughput of this stack vs Hugging Face transformers on identical shapes (one GPU).

Each implementation runs in its own subprocess (clean GPU memory), on fresh random tokens every step,
with AdamW and bf16; warm-up steps are excluded and the median step time is reported. MFU follows
acemath_mcore.training.flops (causal attention counted per document) against both the datasheet peak and
a bf16 matmul peak measured in the same run.

    python benchmarks/train_throughput.py --model qwen2.5-1.5b --impls te,native,hf --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.models.builder import CUDA_GRAPH_WARMUP_STEPS  # noqa: E402
from acemath_mcore.training.engine import STEP_PHASES  # noqa: E402
from acemath_mcore.options import LM_CROSS_ENTROPY_CHOICES  # noqa: E402
from acemath_mcore.runtime.device import BF16_PEAK_FLOPS, host_waits  # noqa: E402

IMPLS = ("te", "te-fp8", "native", "hf")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--impls", default="te,native,hf", help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="keep the preset's shapes but build this many layers (a large model's layers on one GPU)")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1, help="rows per micro-batch (packed rows when --packed)")
    parser.add_argument("--micro-batches", type=int, default=4, help="gradient-accumulation micro-batches per step")
    parser.add_argument("--packed", action="store_true", help="pack variable-length documents (THD) into each row")
    parser.add_argument("--mean-doc-length", type=int, default=700)
    parser.add_argument("--recompute", default=None, choices=[None, "selective", "full"])
    parser.add_argument("--no-wgrad-fusion", action="store_true",
                        help="turn gradient-accumulation fusion off (a .grad plus an add per linear layer)")
    parser.add_argument("--cross-entropy", default="auto", choices=LM_CROSS_ENTROPY_CHOICES,
                        help="language-model loss kernel (ModelOptions.cross_entropy)")
    parser.add_argument("--fp8-recipe", default="delayed", help="te-fp8: delayed | tensorwise | blockwise | mxfp8")
    parser.add_argument("--cuda-graph", default=None, choices=[None, "mlp"],
                        help="te, te-fp8: CUDA graphs of every layer's MLP (ModelOptions.cuda_graph), captured during "
                             "the warm-up steps")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--task", default="sft", choices=["sft", "rm"],
                        help="rm: reward model, --groups problem groups of --responses responses per micro-batch")
    parser.add_argument("--responses", type=int, default=6)
    parser.add_argument("--groups", type=int, default=1, help="rm: problem groups per micro-batch")
    parser.add_argument("--profile", action="store_true", help="print a torch-profiler kernel table of one step")
    parser.add_argument("--json", default=None, help="append one JSON line per implementation here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def benchmark_arch(args):
    import dataclasses

    from acemath_mcore.models import get_preset

    arch = get_preset(args.model)
    return dataclasses.replace(arch, num_layers=args.num_layers) if args.num_layers else arch


def document_lengths(seq_length: int, mean: int, generator: torch.Generator) -> list:
    """Lognormal document lengths (a realistic SFT mix) filling one row exactly."""
    lengths, used = [], 0
    while used < seq_length:
        n = int(torch.empty(1).log_normal_(mean=float(torch.tensor(mean).log()) - 0.5, std=1.0, generator=generator))
        n = min(max(16, n), seq_length - used)
        lengths.append(n)
        used += n
    return lengths


def make_rm_micro_batch(args, vocab: int, generator: torch.Generator, device) -> dict:
    """--groups problem groups, each of --responses responses of 70-100% of --seq-length tokens with k in 1..n-1
    correct; padded rows ``[groups * n, seq]`` or one packed row of all responses back to back."""
    n, seq = args.responses, args.seq_length
    lengths = torch.randint(int(0.7 * seq), seq + 1, (args.groups * n,), generator=generator).tolist()
    labels = torch.zeros(args.groups, n)
    for group in labels:
        group[torch.randperm(n, generator=generator)[:int(torch.randint(1, n, (1,), generator=generator))]] = 1.0
    batch = {"labels": labels.flatten(), "group_sizes": torch.full((args.groups,), n), "doc_lengths": lengths}
    if args.packed:
        total = sum(lengths)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        batch.update(tokens=torch.randint(0, vocab, (1, total), generator=generator), cu_seqlens=cu,
                     max_seqlen=max(lengths), score_index=(cu[1:] - 1).long(),
                     position_ids=torch.cat([torch.arange(k) for k in lengths]).unsqueeze(0))
    else:
        batch.update(tokens=torch.randint(0, vocab, (len(lengths), seq), generator=generator),
                     score_index=torch.tensor(lengths) - 1, position_ids=torch.arange(seq).expand(len(lengths), -1))
        batch["doc_lengths"] = [seq] * len(lengths)  # padded rows are computed in full
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_micro_batch(args, vocab: int, generator: torch.Generator, device) -> dict:
    if args.task == "rm":
        return make_rm_micro_batch(args, vocab, generator, device)
    rows = args.micro_batch
    tokens = torch.randint(0, vocab, (rows, args.seq_length + 1), generator=generator)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(rows, args.seq_length)}
    if args.packed:
        lengths = [n for _ in range(rows) for n in document_lengths(args.seq_length, args.mean_doc_length, generator)]
        batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        batch["cu_seqlens"] = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        batch["max_seqlen"] = max(lengths)
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        batch["doc_lengths"] = lengths
    else:
        batch["position_ids"] = torch.arange(args.seq_length).expand(rows, -1)
        batch["doc_lengths"] = [args.seq_length] * rows
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def measured_matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times)


def run_mcore(args, impl: str) -> dict:
    from acemath_mcore.models import ModelOptions
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    init_distributed(ParallelConfig())
    arch = benchmark_arch(args)
    options = ModelOptions(spec="native" if impl == "native" else "te", bf16=True, recompute=args.recompute,
                           fp8="hybrid" if impl == "te-fp8" else None, fp8_recipe=args.fp8_recipe,
                           gradient_accumulation_fusion=not args.no_wgrad_fusion, cross_entropy=args.cross_entropy,
                           cuda_graph=args.cuda_graph if impl != "native" else None)
    if args.task == "rm":
        from acemath_mcore.training.reward import RewardTask, build_reward_model_chunk

        engine = Engine(arch, ParallelConfig(), options, OptimConfig(lr=1e-5), train_steps=args.steps + args.warmup,
                        model_chunk_builder=build_reward_model_chunk)
        task = RewardTask()
    else:
        engine = Engine(arch, ParallelConfig(), options, OptimConfig(lr=1e-5), train_steps=args.steps + args.warmup)
        task = SFTTask()

    def step(micro_batches):
        engine.train_step(task, [{k: v for k, v in mb.items() if k != "doc_lengths"} for mb in micro_batches])

    return time_steps(args, step, arch)


def run_hf(args) -> dict:
    import transformers

    from acemath_mcore.models import FAMILIES

    arch = benchmark_arch(args)
    if args.task == "rm":
        raise SystemExit("the HF baseline covers SFT only")
    if args.packed:
        raise SystemExit("the HF baseline runs unpacked rows (its SDPA path cannot separate packed documents)")
    config_dict = FAMILIES[arch.family].hf_config_from_arch(arch, torch_dtype="float32")
    config_cls = transformers.Qwen2Config if arch.family == "qwen2" else transformers.LlamaConfig
    config = config_cls(**{k: v for k, v in config_dict.items() if k != "architectures"})
    config._attn_implementation = "sdpa"
    model_cls = transformers.Qwen2ForCausalLM if arch.family == "qwen2" else transformers.LlamaForCausalLM
    model = model_cls(config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(micro_batches):
        optimizer.zero_grad(set_to_none=True)
        total = sum(mb["loss_mask"].sum() for mb in micro_batches)
        for mb in micro_batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(),
                                                     reduction="none")
            ((loss * mb["loss_mask"].flatten()).sum() / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return time_steps(args, step, arch)


def time_steps(args, step, arch) -> dict:
    from acemath_mcore.training.flops import training_flops

    generator = torch.Generator().manual_seed(0)
    times, flops, tokens, data_wait = [], [], [], []
    for index in range(args.warmup + args.steps):
        data_start = time.perf_counter()
        micro_batches = [make_micro_batch(args, arch.vocab_size, generator, "cuda") for _ in range(args.micro_batches)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(micro_batches)
        torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
            data_wait.append(start - data_start)
            lengths = [n for mb in micro_batches for n in mb["doc_lengths"]]
            flops.append(training_flops(arch, lengths, head_outputs=1 if args.task == "rm" else None))
            tokens.append(sum(lengths))
    if args.profile:
        profile_step(args, step, arch.vocab_size, generator)
    median = statistics.median(times)
    return {"step_s": median, "step_s_min": min(times), "step_s_max": max(times),
            "tokens_per_s": statistics.median(tokens) / median, "flops_per_step": statistics.median(flops),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "host_batch_build_s": statistics.median(data_wait)}


KERNEL_CLASSES = (  # first match wins; names as CUDA kernels appear in the torch profiler on Hopper
    ("attention", ("flash", "fmha", "cudnn_generated", "attn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "sm90_")),
    ("optimizer", ("multi_tensor", "adam", "l2norm")),
    # ours (models/cross_entropy.py), and the torch-compiled kernels of megatron's fused loss (exp_sub_sum ...)
    ("cross entropy", ("row_statistics_kernel", "gradient_kernel", "exp_sub", "cross_entropy", "logsumexp")),
    ("copy/memset", ("memcpy", "memset", "copy_")),
)


def kernel_time_breakdown(kernel_times) -> dict:
    """Device time per kernel class, from ``(kernel name, microseconds)`` pairs; unmatched ones are 'other'
    (norms, activations, RoPE, casts, adds)."""
    totals = dict.fromkeys([name for name, _ in KERNEL_CLASSES] + ["other"], 0.0)
    for name, micros in kernel_times:
        lowered = name.lower()
        label = next((label for label, keys in KERNEL_CLASSES if any(key in lowered for key in keys)), "other")
        totals[label] += micros
    return totals


def gpu_idle_by_phase(kernels, phases, window) -> dict:
    """GPU idle time within ``window`` (start, end), attributed to the innermost host phase open meanwhile.

    ``kernels``: (start, end) of device work; ``phases``: (name, start, end) of properly nested host ranges (the
    engine's ``record_function`` annotations). An idle GPU while the host is inside a phase means that phase's
    host work (launches, Python, a synchronisation) is what the GPU waited for."""
    lo, hi = window
    idle, cursor = [], lo
    for start, end in sorted((max(lo, s), min(hi, e)) for s, e in kernels if e > lo and s < hi):
        if start > cursor:
            idle.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < hi:
        idle.append((cursor, hi))
    inside = [(name, max(lo, s), min(hi, e)) for name, s, e in phases if e > lo and s < hi]
    totals: dict = {}
    for start, end in idle:
        cuts = sorted({start, end, *(t for _, s, e in inside for t in (s, e) if start < t < end)})
        for a, b in zip(cuts, cuts[1:]):
            middle = (a + b) / 2
            open_phases = [(e - s, name) for name, s, e in inside if s <= middle < e]
            name = min(open_phases)[1] if open_phases else "outside the phases"
            totals[name] = totals.get(name, 0.0) + (b - a)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def profile_step(args, step, vocab: int, generator: torch.Generator) -> None:
    """One more step under the torch profiler: the top CUDA kernels and CPU ops, then how much of the step's
    wall time the GPU was busy and on what (a busy share well under 100% means the host is the bottleneck), and
    in which of the engine's phases the GPU sat idle. Then one more step, unprofiled, counting where the host
    waited for the GPU."""
    from torch.profiler import ProfilerActivity, profile, record_function

    micro_batches = [make_micro_batch(args, vocab, generator, "cuda") for _ in range(args.micro_batches)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("step"):
            step(micro_batches)
            torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70), flush=True)
    events = prof.events()
    # Annotated ranges also appear on the device's timeline (gpu_user_annotation); they are not kernels.
    device_work = [event for event in events
                   if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation]
    breakdown = kernel_time_breakdown([(event.name, event.time_range.elapsed_us()) for event in device_work])
    busy = sum(breakdown.values())
    whole = next(event for event in events if event.name == "step" and event.device_type == torch.autograd.DeviceType.CPU)
    wall_us = whole.time_range.elapsed_us()
    print(f"PROFILE step {wall_us / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms ({busy / wall_us:.0%}): "
          + ", ".join(f"{label} {micros / 1e3:.1f} ms" for label, micros in breakdown.items()), flush=True)
    # The engine's phases only: torch's own annotations (Optimizer.step#FusedAdam.step ...) stay in theirs.
    phases = [(event.name, event.time_range.start, event.time_range.end) for event in events
              if event.is_user_annotation and event.device_type == torch.autograd.DeviceType.CPU
              and event.thread == whole.thread and event.name in STEP_PHASES]
    idle = gpu_idle_by_phase([(e.time_range.start, e.time_range.end) for e in device_work], phases,
                             (whole.time_range.start, whole.time_range.end))
    idle["between phases"] = idle.pop("outside the phases", 0.0)
    print(f"IDLE GPU idle {sum(idle.values()) / 1e3:.1f} ms, by host phase ('forward_backward' outside 'forward' is "
          "mostly the backward pass): "
          + ", ".join(f"{name} {micros / 1e3:.1f} ms" for name, micros in idle.items()), flush=True)
    micro_batches = [make_micro_batch(args, vocab, generator, "cuda") for _ in range(args.micro_batches)]
    waits = host_waits(lambda: step(micro_batches))
    if waits is None:
        print("WAITS not counted: no CUDA device", flush=True)
    else:
        print(f"WAITS the host waited for the GPU {sum(waits.values())} times in one more step: "
              + ", ".join(f"{site} x{count}" for site, count in waits.most_common()), flush=True)


def worker(args) -> None:
    impl = args.worker
    try:
        result = run_hf(args) if impl == "hf" else run_mcore(args, impl)
        result["status"] = "ok"
    except torch.OutOfMemoryError as error:
        result = {"status": "oom", "error": str(error).splitlines()[0]}
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cuda_graph and any(impl.startswith("te") for impl in args.impls.split(",")):
        if args.warmup <= CUDA_GRAPH_WARMUP_STEPS:
            raise SystemExit(f"--cuda-graph captures after {CUDA_GRAPH_WARMUP_STEPS} eager steps: use --warmup "
                             f"{CUDA_GRAPH_WARMUP_STEPS + 1} or more so the timed steps replay the graphs")
        if args.task == "rm" and args.packed:
            raise SystemExit("--cuda-graph needs one micro-batch shape: this benchmark's packed reward-model rows "
                             "vary in length (use padded rows)")
    if args.worker:
        return worker(args)
    peak = measured_matmul_peak()
    rows = []
    micro_batch = args.micro_batch if args.task == "sft" else args.groups  # RM: problem groups per micro-batch
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            raise SystemExit(f"unknown implementation {impl!r}; choose from {IMPLS}")
        command = [sys.executable, __file__, "--worker", impl] + [a for a in (argv or sys.argv[1:])]
        completed = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if args.profile:
            print(f"== profile of {impl}\n" + "\n".join(
                line for line in completed.stdout.splitlines() if not line.startswith("RESULT ")))
        if completed.returncode or not lines:
            sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-6000:])
            result = {"status": f"failed (exit {completed.returncode})"}
        else:
            result = json.loads(lines[-1][len("RESULT "):])
        if result["status"] == "ok":
            achieved = result["flops_per_step"] / result["step_s"]
            result.update(mfu_datasheet=achieved / BF16_PEAK_FLOPS["H100"], mfu_measured_peak=achieved / peak)
        result.update(impl=impl, task=args.task, model=args.model, num_layers=args.num_layers,
                      seq_length=args.seq_length, packed=args.packed,
                      micro_batch=micro_batch, micro_batches=args.micro_batches, recompute=args.recompute,
                      wgrad_fusion=not args.no_wgrad_fusion and impl != "hf",
                      cross_entropy=args.cross_entropy if impl != "hf" and args.task == "sft" else None,
                      fp8_recipe=args.fp8_recipe if impl == "te-fp8" else None,
                      cuda_graph=args.cuda_graph if impl in ("te", "te-fp8") else None,
                      measured_peak_tflops=peak / 1e12, device=torch.cuda.get_device_name(),
                      date=time.strftime("%Y-%m-%d"))
        rows.append(result)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(result) + "\n")
    print(f"\n{args.task} {args.model} seq {args.seq_length} {'packed' if args.packed else 'unpacked'} "
          f"mbs {micro_batch}{'' if args.task == 'sft' else ' group(s)'} x {args.micro_batches} "
          f"wgrad fusion {'off' if args.no_wgrad_fusion else 'on'} "
          f"cross entropy {args.cross_entropy}{' cuda graphs ' + args.cuda_graph if args.cuda_graph else ''}  "
          f"(measured bf16 peak {peak / 1e12:.0f} TFLOP/s)")
    print(f"{'impl':8} {'status':8} {'tokens/s':>10} {'MFU(meas)':>9} {'MFU(989)':>9} {'step s':>7} {'mem GiB':>8}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['impl']:8} ok       {r['tokens_per_s']:10.0f} {r['mfu_measured_peak']:9.1%} "
                  f"{r['mfu_datasheet']:9.1%} {r['step_s']:7.3f} {r['peak_mem_gib']:8.1f}")
        else:
            print(f"{r['impl']:8} {r['status']}")


if __name__ == "__main__":
    main()
