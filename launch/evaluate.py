"""Generate answers on the AceMath benchmarks, grade them, and print the paper's Table 3 (docs/eval.md).

    # greedy pass@1 with our own checkpoint (trainer save dir or converted), 8 GPUs = TP 2 x DP 4
    torchrun --nproc-per-node 8 launch/evaluate.py --checkpoint checkpoints/qwen2.5-math-7b-math_sft \\
        --model qwen2.5-math-7b --tokenizer ../shared/tokenizers/qwen2 --tensor-parallel 2 --bf16 \\
        --benchmarks table3 --output-dir eval/math_sft
    # 8 sampled candidates per problem (input for launch/score.py and launch/bestofn.py)
    python launch/evaluate.py ... --num-samples 8 --temperature 0.7 --top-p 0.95 --benchmarks math
    # an exported HF checkpoint with transformers (or vLLM when installed)
    python launch/evaluate.py --backend hf --checkpoint exports/acemath-7b --benchmarks gsm8k --limit 50 ...
    # one benchmark split over 4 jobs (each a node): job i runs part i; the last to finish merges them
    torchrun ... launch/evaluate.py ... --benchmarks math --num-samples 8 --temperature 0.7 --shard 2/4
    # merge the per-benchmark outputs of a Slurm array (finished shards included) into one table
    python launch/evaluate.py --summarize-only --output-dir eval/math_sft

Outputs in --output-dir: <benchmark>.jsonl (responses, extracted answers, correctness), <benchmark>.meta.json,
summary.json, summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.data.chat_templates import TEMPLATE_NAMES  # noqa: E402
from acemath_mcore.eval.benchmarks import BENCHMARKS  # noqa: E402
from acemath_mcore.eval.harness import TABLE3_BENCHMARKS, Shard  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
BENCHMARK_GROUPS = {"table3": TABLE3_BENCHMARKS, "all": TABLE3_BENCHMARKS + ("aime24", "amc23")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("megatron", "hf", "vllm"), default="megatron")
    parser.add_argument("--checkpoint", help="megatron: dist checkpoint or save dir with 'latest'; hf/vllm: HF dir")
    parser.add_argument("--model", help="megatron: a preset name or config.json (default: model_arch.json, written "
                                        "by the converter and the trainer)")
    parser.add_argument("--tokenizer", help="tokenizer path (default: the HF dir, or the converter's assets)")
    parser.add_argument("--template", choices=TEMPLATE_NAMES,
                        help="chat template (default: the one of the checkpoint's training data, recorded in its "
                             "save dir or HF export as prompt_format.json; else chatml)")
    parser.add_argument("--instruction-role", choices=("user", "system"), default="user",
                        help="where the CoT instruction goes: user turn (AceMath) or system turn (Qwen2.5-Math)")
    parser.add_argument("--benchmarks",
                        help=f"comma list of {', '.join(BENCHMARKS)}; or 'table3' / 'all' (default: table3; with "
                             "--summarize-only, every result in --output-dir)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-samples", type=int, default=1, help="responses per problem (needs a temperature)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--max-sequence-length", type=int,
                        help="context limit for prompt + response (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="first N problems of each benchmark (smoke tests)")
    parser.add_argument("--batch-size", type=_batch_size, default=32,
                        help="rows decoded together per process; megatron backend: 'auto' sizes each batch to "
                             "the memory the weights leave (key/value cache and activations estimated per row)")
    parser.add_argument("--chunk-problems", type=int, default=256,
                        help="problems per generation call; each finished call is saved, so a killed run resumes "
                             "after it (<benchmark>.jsonl.progress); 0: one call")
    parser.add_argument("--shard", metavar="I/N",
                        help="generate part I (0-based) of N of each benchmark (a run of its --chunk-problems "
                             "chunks) into <output-dir>/shards/; the part that finds all N finished merges them "
                             "into <benchmark>.jsonl, equal to an unsharded run's")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--timeout-minutes", type=int, default=30,
                        help="megatron: how long a rank waits in a collective for the others (rank 0 grades each "
                             "benchmark while the rest wait; raise it for very many samples)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 weights and activations, any backend (default fp32, so backends agree)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate benchmarks that already have results")
    parser.add_argument("--summarize-only", action="store_true",
                        help="only (re)build the table from the .jsonl files in --output-dir (merging finished "
                             "shards first)")
    parser.add_argument("--if-complete", action="store_true",
                        help="with --summarize-only: if a named benchmark has no results yet, say which and exit 0 "
                             "without a table (the Slurm array's tasks each try; the last one writes it)")
    return parser


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of rows or 'auto', got {value!r}")
    return int(value)


def _benchmarks(spec: str) -> list[str]:
    names = []
    for item in spec.split(","):
        item = item.strip()
        names.extend(BENCHMARK_GROUPS.get(item, (item,)))
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}, table3, all")
    return list(dict.fromkeys(names))


def _setup(args, template: str, tokenizer_path: str, max_sequence_length: int) -> dict:
    """The generation choices outside the harness's own settings, for the results' fingerprint."""
    return {"backend": args.backend, "template": template, "tokenizer": str(Path(tokenizer_path).resolve()),
            "precision": "bf16" if args.bf16 else "fp32", "max_sequence_length": max_sequence_length}


def _write_and_print_summary(output_dir: str, benchmarks, if_complete: bool = False) -> None:
    """Merge the named benchmarks' finished shards, then write and print the table (with ``if_complete``, only
    once every named benchmark has results)."""
    from acemath_mcore.eval.harness import format_summary, merge_shards, results_path, summarize, write_summary

    # Without a list: every benchmark with parts in shards/ too.
    parted = benchmarks or sorted({path.name.partition(".shard")[0]
                                   for path in (Path(output_dir) / "shards").glob("*.shard*-of-*.jsonl")})
    for name in parted:
        if not results_path(output_dir, name).is_file():
            merge_shards(output_dir, name)
    missing = [name for name in benchmarks or () if not results_path(output_dir, name).is_file()]
    if missing and if_complete:
        print(f"no table yet: no results for {', '.join(missing)} in {output_dir}", file=sys.stderr)
        return
    summary = summarize(output_dir, benchmarks)
    write_summary(summary, output_dir)
    print(format_summary(summary))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from acemath_mcore.eval.harness import EvalSettings, finished_with, format_summary, run_evaluation
    from acemath_mcore.training.logging import setup_console_logging

    benchmarks = _benchmarks(args.benchmarks or "table3")
    if args.summarize_only:
        _write_and_print_summary(args.output_dir, benchmarks if args.benchmarks else None, args.if_complete)
        return 0
    if args.if_complete:
        raise SystemExit("--if-complete goes with --summarize-only")
    try:
        shard = Shard.parse(args.shard) if args.shard else None
    except ValueError as error:
        raise SystemExit(f"--shard: {error}") from None
    if shard is not None and args.chunk_problems <= 0:
        raise SystemExit("--shard splits a benchmark into runs of --chunk-problems problems: it needs "
                         "--chunk-problems > 0")
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required")
    if args.batch_size == "auto" and args.backend == "hf":
        raise SystemExit("--batch-size auto sizes the megatron backend's batches; give --backend hf a number of rows")
    missing = [name for name in benchmarks if not (Path(args.data_dir) / name / "test.jsonl").is_file()]
    if missing:
        raise SystemExit(f"no test.jsonl under {args.data_dir} for: {', '.join(missing)}")
    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
    from acemath_mcore.data.tokenizers import check_vocab_fits, load_tokenizer
    from acemath_mcore.eval.generation import SamplingParams

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k)
    settings = EvalSettings(benchmarks=benchmarks, data_dir=args.data_dir, output_dir=args.output_dir,
                            sampling=sampling, num_samples=args.num_samples, seed=args.seed, limit=args.limit,
                            instruction_role=args.instruction_role, overwrite=args.overwrite,
                            chunk_problems=args.chunk_problems or None, shard=shard)
    if args.backend == "megatron":
        from acemath_mcore.eval.backends import MegatronBackend
        from acemath_mcore.runtime import ParallelConfig, destroy_distributed, init_distributed, install_stack_dumps
        from acemath_mcore.runtime.distributed import launch_rank

        from acemath_mcore.convert.megatron_files import checkpoint_model_and_tokenizer, find_prompt_format
        from acemath_mcore.data.chat_templates import choose_prompt_format
        from acemath_mcore.training.logging import log_on_rank_0

        # One resolution of a save dir's 'latest' for the weights and the results' label (a trainer may publish
        # a newer iteration meanwhile).
        checkpoint, arch, tokenizer_path = checkpoint_model_and_tokenizer(args.checkpoint, args.model, args.tokenizer)
        checkpoint = checkpoint.resolve()
        context = args.max_sequence_length or arch.max_position_embeddings
        log_on_rank_0(launch_rank())
        template = choose_prompt_format(find_prompt_format(checkpoint), args.template, None, f"the model {checkpoint}",
                                        with_system_prompt=False).template
        settings.setup = _setup(args, template, tokenizer_path, context)
        if all(finished_with(settings, name, str(checkpoint)) for name in benchmarks):
            # A resubmitted array task whose benchmark is done: no process group, no weights (minutes at 72B).
            if launch_rank() == 0:
                print(f"{', '.join(benchmarks)}: results with these settings already in {args.output_dir}; "
                      "skipped (--overwrite redoes them)", file=sys.stderr)
                _write_and_print_summary(args.output_dir, benchmarks, if_complete=shard is not None)
            return 0
        install_stack_dumps()
        launch = init_distributed(ParallelConfig(tensor_parallel=args.tensor_parallel,
                                                 timeout_minutes=args.timeout_minutes), seed=args.seed)
        setup_console_logging(launch.rank)
        try:
            tokenizer = load_tokenizer(tokenizer_path)
            check_vocab_fits(tokenizer, arch.padded_vocab_size)
            encoder = ConversationEncoder(tokenizer, build_template(template, tokenizer))
            backend = MegatronBackend(str(checkpoint), arch, encoder.stop_ids, bf16=args.bf16,
                                      max_batch_size=args.batch_size, max_sequence_length=context)
            summary = run_evaluation(backend, encoder, settings, model_name=str(checkpoint))
        finally:
            destroy_distributed()
    else:
        setup_console_logging(0)
        from acemath_mcore.convert.hf_files import is_reward_model_config, read_hf_config

        if is_reward_model_config(read_hf_config(Path(args.checkpoint))):
            raise SystemExit(f"{args.checkpoint} is a reward model (*ForSequenceClassification): it scores responses "
                             "(launch/score.py, after checkpoints_tools/convert_from_hf.py) and does not generate")
        tokenizer_path = args.tokenizer or args.checkpoint
        from acemath_mcore.convert.megatron_files import find_prompt_format
        from acemath_mcore.data.chat_templates import choose_prompt_format

        tokenizer = load_tokenizer(tokenizer_path)
        # An exported model carries its training data's format (convert_to_hf copies prompt_format.json).
        template = choose_prompt_format(find_prompt_format(Path(args.checkpoint), with_save_dir=False), args.template,
                                        None, f"the model {args.checkpoint}", with_system_prompt=False).template
        encoder = ConversationEncoder(tokenizer, build_template(template, tokenizer))
        dtype = "bfloat16" if args.bf16 else "float32"
        if args.backend == "hf":
            from acemath_mcore.eval.backends import HFBackend

            backend = HFBackend(args.checkpoint, encoder.stop_ids, tokenizer.pad_or_eos_id, dtype=dtype,
                                max_batch_size=args.batch_size, max_sequence_length=args.max_sequence_length)
        else:
            from acemath_mcore.eval.backends import VLLMBackend

            backend = VLLMBackend(args.checkpoint, encoder.stop_ids, dtype=dtype,
                                  tensor_parallel=args.tensor_parallel,
                                  max_sequence_length=args.max_sequence_length, seed=args.seed)
        settings.setup = _setup(args, template, tokenizer_path, backend.max_sequence_length)
        summary = run_evaluation(backend, encoder, settings, model_name=str(Path(args.checkpoint).resolve()))
    if summary is not None:
        print(format_summary(summary))
        print(json.dumps({"output_dir": args.output_dir, "average": round(summary["average"], 2)}))
    return 0


if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
