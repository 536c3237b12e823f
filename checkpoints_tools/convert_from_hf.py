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
from acemath_mcore.data.chat_templates import TEMPLATE_NAMES, PromptFormat, resolve_system_prompt


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
    parser.add_argument("--template", choices=TEMPLATE_NAMES,
                        help="record the chat template the model was trained with (prompt_format.json), so scoring "
                             "and evaluation default to it, e.g. chatml for AceMath-RM")
    parser.add_argument("--system-prompt", default=None,
                        help="with --template: the system turn it was trained with, literal text or a preset "
                             "('acemath_rm', 'math'; default: none)")
    args = parser.parse_args(argv)
    if args.system_prompt is not None and args.template is None:
        parser.error("--system-prompt is recorded with a --template; give both")
    prompt_format = PromptFormat(args.template, resolve_system_prompt(args.system_prompt)) if args.template else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = convert_hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.vpp, args.dtype, args.overwrite,
                                 prompt_format)
    next_steps = ""
    if is_reward_model_config(read_hf_config(Path(args.hf))):
        unrecorded = "" if prompt_format else " (no prompt format recorded: pass --template and --system-prompt there)"
        next_steps = (f": a reward model; score with launch/score.py --checkpoint {out}{unrecorded}, or continue "
                      "training with checkpoint.init_from")
    print(f"wrote {out}{next_steps}")
    return 0


if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
