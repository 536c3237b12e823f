"""Preprocess conversation / reward-model JSONL into megatron IndexedDatasets (see docs/data.md).

  python launch/preprocess.py sft --input a.jsonl b.jsonl --output data/stage1 --tokenizer TOKENIZER_DIR \\
      --max-length 4096 --overflow truncate [--strict] [--curate max-words=2500 --curate boxed ...]
  python launch/preprocess.py rm --input rm.jsonl --output data/rm --tokenizer TOKENIZER_DIR --num-responses 6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acemath_mcore.data.chat_templates import TEMPLATE_NAMES, resolve_system_prompt  # noqa: E402
from acemath_mcore.data.jsonl import DataError  # noqa: E402
from acemath_mcore.data.preprocess import OVERFLOW_POLICIES, PreprocessConfig, preprocess_sft  # noqa: E402
from acemath_mcore.data.rm_data import RMPreprocessConfig, preprocess_rm  # noqa: E402
from acemath_mcore.runtime.local_workers import usable_cpus  # noqa: E402


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files, read in the order given")
    parser.add_argument("--output", required=True, help="output prefix (writes <prefix>.bin/.idx and companions)")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer directory, tokenizer.json, SentencePiece or Llama-3 tiktoken .model")
    parser.add_argument("--template", choices=TEMPLATE_NAMES, default="chatml")
    parser.add_argument("--system-prompt", default=None,
                        help="system turn for conversations without one: literal text, or 'math' (the AceMath CoT "
                             "prompt) or 'acemath_rm' (AceMath-RM's scoring prompt, for reward-model data)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line instead of counting it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    sft = commands.add_parser("sft", help="SFT conversations → tokens + loss mask")
    _common(sft)
    sft.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="truncate",
                     help="what to do with samples longer than --max-length (counted either way)")
    sft.add_argument("--workers", type=int, default=usable_cpus(),
                     help="tokenizing processes (default: the CPUs this job may use)")
    sft.add_argument("--lines-per-chunk", type=int, default=256)
    sft.add_argument("--curate", action="append", default=[], metavar="STEP",
                     help="per-sample curation step, repeatable, applied in order: max-words=N, "
                          "repetition[=NGRAM:COUNT], boxed, decontaminate=math|general")
    sft.add_argument("--benchmark-dir", default=None, help="folder of <benchmark>/test.jsonl for decontaminate=")
    sft.add_argument("--cross-check", nargs="+", default=[], metavar="FILE",
                     help="response JSONL files (other models, same prompts) whose final answers must agree")
    sft.add_argument("--cross-check-benchmark", default="math", help="answer-extraction style for cross-checking")
    sft.add_argument("--dedup-prompts", action="store_true", help="drop repeated prompts (lower-cased), keep the first")
    sft.add_argument("--no-progress", action="store_true")

    rm = commands.add_parser("rm", help="reward-model groups → one sequence per response, one document per group")
    _common(rm)
    rm.add_argument("--num-responses", type=int, default=None, help="score-sorted selection of N candidates per problem")
    rm.add_argument("--positives", choices=("top", "bottom"), default="top", help="score end positives are taken from")
    rm.add_argument("--negatives", choices=("top", "bottom"), default="bottom", help="score end negatives are taken from")

    args = parser.parse_args(argv)
    try:
        if args.command == "sft":
            stats = preprocess_sft(PreprocessConfig(
                inputs=args.input, output_prefix=args.output, tokenizer=args.tokenizer, template=args.template,
                system_prompt=resolve_system_prompt(args.system_prompt), max_length=args.max_length,
                overflow=args.overflow,
                strict=args.strict, workers=args.workers, lines_per_chunk=args.lines_per_chunk, curate=args.curate,
                benchmark_dir=args.benchmark_dir, cross_check=args.cross_check,
                cross_check_benchmark=args.cross_check_benchmark, dedup_prompts=args.dedup_prompts,
                progress=not args.no_progress,
            ))
        else:
            stats = preprocess_rm(RMPreprocessConfig(
                inputs=args.input, output_prefix=args.output, tokenizer=args.tokenizer, template=args.template,
                system_prompt=resolve_system_prompt(args.system_prompt), max_length=args.max_length,
                num_responses=args.num_responses, positives=args.positives, negatives=args.negatives,
                strict=args.strict,
            ))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in stats.items() if k not in ("drop_examples", "config", "tokenizer")}
    print(json.dumps(summary, indent=2))
    if args.command == "rm" and args.num_responses is None and set(stats["group_sizes"]) - {"6"}:
        print(f"note: every problem kept all its candidates (group sizes {stats['group_sizes']}); AceMath-RM trains "
              "on 6 per problem, k right and 6-k wrong: --num-responses 6 selects them by score", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
