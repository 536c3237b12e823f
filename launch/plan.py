"""Parallel-layout planner: valid TP/PP/VPP/CP/DP layouts with per-GPU memory and step time, and a recommendation.

    python launch/plan.py --model qwen2.5-72b --gpus 256 --seq-length 4096 --global-batch 256
    python launch/plan.py --model qwen2.5-math-72b --global-batch 256            # smallest GPU count that fits
    python launch/plan.py --model qwen2.5-math-7b --gpus 8 --global-batch 128 --format overrides   # for Slurm
    python launch/plan.py --model qwen2.5-math-7b --gpus 8 --global-batch 256 --task rm --recompute full

--format overrides prints only the recommended layout as recipe overrides on one line; --format nodes only the
node count. Formulas and assumptions: docs/planner.md.
"""

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

# megatron-core (imported with the model presets) warns about missing TE/apex; irrelevant to a planner.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore import plan as planner  # noqa: E402

GIB = planner.GIB


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a preset name, e.g. qwen2.5-72b")
    parser.add_argument("--gpus", type=_at_least_one,
                        help="GPU count; omitted: the smallest of 1, 2, 4, ... nodes that fits")
    parser.add_argument("--gpus-per-node", type=_at_least_one, default=8)
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(planner.GPU_TYPES)} (or h100, h200, a100)")
    parser.add_argument("--seq-length", type=_at_least_one, default=4096)
    parser.add_argument("--global-batch", type=_at_least_one, required=True,
                        help="samples per step: packed rows (sft), problems of --responses padded rows (rm), or "
                             "packed bins of problems (rm with --responses 1)")
    parser.add_argument("--micro-batch", type=_at_least_one, default=1)
    parser.add_argument("--recompute", default="auto", choices=("auto", *planner.RECOMPUTE_MODES),
                        help="activation recompute to consider; auto: none and full")
    parser.add_argument("--context-parallel", default="1",
                        help="comma-separated CP sizes to consider, e.g. 1,2 (estimates only: the trainer refuses "
                             "CP > 1 until its data path splits sequences across CP ranks)")
    parser.add_argument("--task", default="sft", choices=("sft", "rm"))
    parser.add_argument("--cross-entropy", default="triton", choices=planner.LM_CROSS_ENTROPY_KERNELS,
                        help="the loss kernel the run uses (model_options.cross_entropy; auto means triton on CUDA)")
    parser.add_argument("--responses", type=_at_least_one, default=6,
                        help="rm: padded rows per problem; 1 for packed bins (one row of --seq-length tokens each)")
    parser.add_argument("--fp32", action="store_true", help="fp32 parameters and activations instead of bf16")
    parser.add_argument("--no-distributed-optimizer", action="store_true")
    parser.add_argument("--mfu", type=float, default=0.5, help="assumed fraction of the bf16 peak")
    parser.add_argument("--overhead-gib", type=float, default=4.0, help="CUDA context, NCCL, fragmentation")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory a layout leaves free")
    parser.add_argument("--top", type=int, default=15, help="table rows")
    parser.add_argument("--format", default="table", choices=("table", "overrides", "nodes"))
    parser.add_argument("--json", metavar="OUT", help="also write every layout and the recommendation here")
    parser.add_argument("--model-parallel", metavar="TP,PP,VPP", type=_model_parallel,
                        help="consider only this split (VPP 1: none), e.g. 4,4,10: a resume of a dp_reshardable "
                             "checkpoint (slurm/preflight.py passes it)")
    return parser.parse_args(argv)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_parallel(text: str):
    try:
        tp, pp, vpp = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TP,PP,VPP (three integers, VPP 1 for none), got {text!r}") from None
    return tp, pp, vpp if vpp > 1 else None


def build_request(args) -> planner.PlanRequest:
    recompute = ("none", "full") if args.recompute == "auto" else (args.recompute,)
    return planner.request_for(
        args.model, gpus=args.gpus_per_node if args.gpus is None else args.gpus, gpus_per_node=args.gpus_per_node,
        gpu=planner.get_gpu_type(args.gpu), seq_length=args.seq_length, global_batch=args.global_batch,
        micro_batch=args.micro_batch, task=args.task, cross_entropy=args.cross_entropy, responses=args.responses,
        bf16=not args.fp32,
        distributed_optimizer=not args.no_distributed_optimizer, recompute=recompute,
        context_parallel=tuple(int(cp) for cp in args.context_parallel.split(",")),
        overhead_bytes=int(args.overhead_gib * GIB), headroom=args.headroom, mfu=args.mfu,
        model_parallel=args.model_parallel)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def table(estimates, recommended, top: int) -> str:
    header = (f"{'TP':>3} {'PP':>3} {'VPP':>3} {'CP':>3} {'DP':>4} {'m':>4} {'recompute':>9} | {'params':>6} "
              f"{'grads':>6} {'optim':>6} {'activ':>6} {'logits':>6} {'other':>5} | {'total':>6} {'fits':>4} "
              f"{'stage':>5} | {'step s':>7} {'bubble':>6} {'tokens/s':>9}")
    lines = [header, "-" * len(header)]
    for e in estimates[:top]:
        layout, memory = e.layout, e.memory
        mark = "  <- recommended" if e is recommended else ""
        lines.append(
            f"{layout.tensor_parallel:>3} {layout.pipeline_parallel:>3} {layout.virtual_pipeline_parallel or '-':>3} "
            f"{layout.context_parallel:>3} {layout.data_parallel:>4} {e.micro_batches:>4} {layout.recompute:>9} | "
            f"{gib(memory.parameters):>6} {gib(memory.gradients):>6} {gib(memory.optimizer):>6} "
            f"{gib(memory.activations):>6} {gib(memory.logits):>6} {gib(memory.overhead):>5} | "
            f"{gib(memory.total):>6} {'yes' if e.fits else 'no':>4} {memory.stage:>5} | {e.time.step_s:>7.2f} "
            f"{e.time.bubble_fraction:>6.1%} {e.tokens_per_s:>9,.0f}{mark}")
    return "\n".join(lines)


def describe_request(request: planner.PlanRequest) -> str:
    numerics = "bf16" if request.bf16 else "fp32"
    optimizer = "distributed optimizer" if request.distributed_optimizer else "replicated optimizer"
    rows = f", {request.responses} rows per problem" if request.task == "rm" else ""
    nodes = _count(planner.nodes(request), "node")
    return (f"{request.model_name} ({request.task}{rows}) on {request.gpus} x {request.gpu.name} "
            f"({nodes} of {request.gpus_per_node} GPUs), seq {request.seq_length}, global batch "
            f"{request.global_batch}, micro-batch {request.micro_batch}, {numerics}, {optimizer}\n"
            f"fits = at most {gib(request.usable_bytes)} of {gib(request.gpu.memory_bytes)} GiB "
            f"({request.headroom:.0%} headroom), 'other' = {gib(request.overhead_bytes)} GiB fixed overhead; "
            f"step time at an assumed {request.mfu:.0%} MFU")


def recommendation_text(request, recommended) -> str:
    layout, memory = recommended.layout, recommended.memory
    by_mode = []
    for mode in planner.RECOMPUTE_MODES:
        other = planner.estimate(request, dataclasses.replace(layout, recompute=mode))
        by_mode.append(f"{mode} {gib(other.memory.activations)} GiB ({gib(other.memory.total)} total, "
                       f"{other.time.step_s:.2f} s)")
    return "\n".join([
        f"recommended: {layout.describe()}",
        f"  memory ({memory.stage} stage): {gib(memory.total)} GiB = params {gib(memory.parameters)} + grads "
        f"{gib(memory.gradients)} + optimizer {gib(memory.optimizer)} + activations {gib(memory.activations)} + "
        f"logits {gib(memory.logits)} + overhead {gib(memory.overhead)}",
        f"  activations by recompute mode: {'; '.join(by_mode)}",
        f"  est. {recommended.time.step_s:.2f} s/step, {recommended.tokens_per_s:,.0f} tokens/s, pipeline bubble "
        f"{recommended.time.bubble_fraction:.1%}",
        f"  overrides: {' '.join(planner.recipe_overrides(recommended, request))}",
    ])


def write_json(path, request, estimates, recommended) -> None:
    report = {
        "request": dataclasses.asdict(request),
        "nodes": planner.nodes(request),
        "layouts": [dataclasses.asdict(e) for e in estimates],
        "recommended": dataclasses.asdict(recommended) if recommended else None,
        "overrides": planner.recipe_overrides(recommended, request) if recommended else None,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        request = build_request(args)
    except (KeyError, ValueError) as error:
        print(f"plan.py: error: {error.args[0]}", file=sys.stderr)
        return 2
    searched = args.gpus is None
    estimates, recommended, failure = [], None, None
    try:
        if searched:
            request, estimates, recommended = planner.smallest_cluster(request)
        else:
            estimates = planner.plan(request)
            recommended = planner.recommend(estimates, request)
    except planner.PlanError as error:
        failure = error  # the table still shows what was tried (not when searching)
    if args.json:
        write_json(args.json, request, estimates, recommended)
    if args.format == "table" and estimates:
        if searched:
            print(f"smallest GPU count that fits: {request.gpus} ({_count(planner.nodes(request), 'node')})")
        print(describe_request(request))
        fitting = sum(e.fits for e in estimates)
        print(f"{len(estimates)} valid layouts, {fitting} fit (those fastest first, then the rest leanest first); "
              f"the first {min(args.top, len(estimates))}:")
        print(table(estimates, recommended, args.top))
        if recommended:
            print(recommendation_text(request, recommended))
    if failure:
        print(f"plan.py: error: {failure}", file=sys.stderr)
        return 1
    if args.format == "overrides":
        print(" ".join(planner.recipe_overrides(recommended, request)))
    elif args.format == "nodes":
        print(planner.nodes(request))
    return 0


if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
