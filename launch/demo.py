"""The tiny embedded AceMath run on CPU: synthetic math data -> preprocess -> SFT with megatron-core.

No downloads: the data is generated (multi-step arithmetic with verifiable answers) and tokenized with the real
512-piece SentencePiece tokenizer of stories260K in ../shared. Everything lands under --workdir.

    python launch/demo.py                 # about a minute on 2 CPU cores
    python launch/demo.py --steps 60      # longer training
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "models" / "stories260K_hf" / "tokenizer.model"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="outputs/demo")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--train-problems", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from acemath_mcore.data.preprocess import PreprocessConfig, preprocess_sft
    from acemath_mcore.data.synthetic import sft_records, write_jsonl
    from acemath_mcore.recipes import apply_overrides, get_recipe
    from acemath_mcore.training.sft import train_sft

    if not Path(args.tokenizer).is_file():
        raise SystemExit(f"tokenizer not found: {args.tokenizer} (expected the read-only ../shared beside the repo)")
    work = Path(args.workdir)
    print(f"[1/2] synthetic math SFT data: {args.train_problems} problems -> {work / 'data'}", flush=True)
    jsonl = write_jsonl(work / "data" / "sft.jsonl", sft_records(args.train_problems, seed=args.seed))
    prefix = str(work / "data" / "sft")
    stats = preprocess_sft(PreprocessConfig(inputs=[str(jsonl)], output_prefix=prefix, tokenizer=args.tokenizer,
                                            template="plain", max_length=512, workers=2, progress=False))
    print(f"      {stats['samples']} samples, {stats['tokens']} tokens, {stats['loss_tokens']} loss tokens, "
          f"{stats['dropped_total']} dropped", flush=True)

    print(f"[2/2] SFT of the tiny preset with megatron-core on CPU for {args.steps} steps", flush=True)
    config = apply_overrides(get_recipe("tiny_sft"), [
        f"data.prefixes=[{prefix}]", f"train_steps={args.steps}", f"checkpoint.save_dir={work / 'checkpoints' / 'sft'}",
        f"logging.output_dir={work / 'runs'}", f"seed={args.seed}", "checkpoint.resume=false",
    ])
    summary = train_sft(config)
    print(json.dumps({k: summary[k] for k in ("first_loss", "final_loss", "steps", "checkpoint", "wall_s")}, indent=2))
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
