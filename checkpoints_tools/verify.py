#!/usr/bin/env python
"""Run an HF model and a megatron checkpoint on the same prompts and compare their logits; exit code 0 = pass,
1 = outside the thresholds. See docs/checkpoints.md."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.convert.verify import (
    DEFAULT_PROMPTS,
    DEFAULT_THRESHOLDS,
    encode_prompts,
    verify_conversion,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True, help="HF model directory")
    parser.add_argument("--megatron", required=True, help="dist checkpoint directory, or a save dir with 'latest'")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable; needs a tokenizer)")
    parser.add_argument("--token-ids", action="append", default=[], help="comma-separated prompt ids (repeatable)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the --hf directory)")
    parser.add_argument("--default-prompts", action="store_true", help=f"use {len(DEFAULT_PROMPTS)} built-in texts")
    parser.add_argument("--dtype", choices=sorted(DEFAULT_THRESHOLDS), default="fp32", help="both models run in it")
    parser.add_argument("--tp", type=int, default=1, help="CPU processes splitting the megatron model")
    parser.add_argument("--max-abs-diff", type=float, default=None)
    parser.add_argument("--min-cosine", type=float, default=None)
    parser.add_argument("--min-agreement", type=float, default=None, help="fraction of equal greedy tokens")
    args = parser.parse_args(argv)
    texts = list(args.prompt) + (list(DEFAULT_PROMPTS) if args.default_prompts else [])
    try:
        prompts = [[int(t) for t in ids.split(",")] for ids in args.token_ids]
    except ValueError:
        parser.error(f"--token-ids takes comma-separated integers, got {args.token_ids}")
    if texts:
        prompts += encode_prompts(texts, args.tokenizer or args.hf)
    result = verify_conversion(args.hf, args.megatron, prompts or None, dtype=args.dtype, tensor_parallel=args.tp)
    given = (args.max_abs_diff, args.min_cosine, args.min_agreement)
    thresholds = [default if value is None else value
                  for value, default in zip(given, DEFAULT_THRESHOLDS[args.dtype], strict=True)]
    failures = result.failures(*thresholds)
    print(json.dumps({**result.__dict__, "thresholds": thresholds, "passed": not failures, "failures": failures},
                     indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
