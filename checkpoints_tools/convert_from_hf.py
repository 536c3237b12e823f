#!/usr/bin/env python
"""Hugging Face safetensors -> megatron torch_dist checkpoint for the trainer (``init_from``).
See docs/checkpoints.md."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.convert import convert_hf_to_megatron
from acemath_mcore.convert.from_hf import PARAM_DTYPES
from acemath_mcore.convert.hf_files import is_reward_model_config, read_hf_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (one CPU process per TP x PP rank)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per PP rank")
    parser.add_argument("--dtype", choices=PARAM_DTYPES, default="auto",
                        help="parameter dtype (auto: the HF weights' own)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = convert_hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.vpp, args.dtype, args.overwrite)
    if is_reward_model_config(read_hf_config(Path(args.hf))):
        print(f"wrote {out}: a reward model; score with launch/score.py --checkpoint {out} (its prompt format is not "
              "recorded: pass --template and --system-prompt), or continue training with checkpoint.init_from")
    else:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
