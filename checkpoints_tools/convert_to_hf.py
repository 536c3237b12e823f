#!/usr/bin/env python
"""megatron torch_dist checkpoint (converted or trained, any TP/PP) -> Hugging Face safetensors. See
docs/checkpoints.md."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.convert import export_megatron_to_hf
from acemath_mcore.convert.to_hf import DEFAULT_MAX_SHARD_BYTES, OUTPUT_DTYPES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megatron", required=True, help="dist checkpoint directory, or a save dir with 'latest'")
    parser.add_argument("--out", required=True, help="output HF model directory")
    parser.add_argument("--hf-template", default=None,
                        help="original HF directory: config to start from, tokenizer files to copy")
    parser.add_argument("--preset", default=None, help="architecture preset, for checkpoints without model_arch.json")
    parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default=None, help="output dtype (default: as stored)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                        help="largest output file; peak memory is about this plus two layers")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = export_megatron_to_hf(args.megatron, args.out, hf_template=args.hf_template, preset=args.preset,
                                dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1e9),
                                progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
