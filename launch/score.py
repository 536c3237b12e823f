"""Score candidate responses with a trained reward model (input for launch/bestofn.py).

    python launch/score.py --checkpoint checkpoints/qwen2.5-math-7b-rm \\
        --input candidates.jsonl --output scored.jsonl [--bf16] [--tokens-per-row 16384]
    torchrun --nproc-per-node 8 launch/score.py ... --tensor-parallel 2   # data parallel over the other ranks

Input: JSONL with ``question`` + ``code`` (Qwen2.5-Math evaluation output) or ``prompt`` + ``responses``, and an
optional ``system``. Output: the same records with ``--field`` (default ``pred_score``) set to one float per
response. Responses are rendered with the template and system prompt of the RM's training data (``launch/preprocess.py
rm``), which the trainer records in the save dir (``prompt_format.json``); --template / --system-prompt override
them, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.data.chat_templates import TEMPLATE_NAMES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="RM dist checkpoint, or a save dir with 'latest'")
    parser.add_argument("--model", help="the RM's shapes: a preset name (e.g. qwen2.5-math-7b) or a Hugging Face "
                                        "config.json (default: the checkpoint's model_arch.json)")
    parser.add_argument("--tokenizer", help="default: the tokenizer the checkpoint carries (hf_assets)")
    parser.add_argument("--template", choices=TEMPLATE_NAMES,
                        help="default: the RM's training data's (prompt_format.json in its save dir), else chatml")
    parser.add_argument("--system-prompt", default=None,
                        help="system turn for records without one: literal text, 'acemath_rm' (AceMath-RM's scoring "
                             "prompt), 'math' (the AceMath CoT prompt) or 'none' (default: the RM's training data's, "
                             "else none)")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--field", default="pred_score", help="output field holding one score per response")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--spec", choices=("auto", "te", "native"), default="auto")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--tokens-per-row", type=int, default=8192, help="packed row length (longest response fits)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--timeout-minutes", type=int, default=30,
                        help="how long a rank waits in a collective for the others before the job fails")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template, choose_prompt_format
    from acemath_mcore.data.tokenizers import check_vocab_fits, load_tokenizer
    from acemath_mcore.models import ModelOptions
    from acemath_mcore.runtime import ParallelConfig, destroy_distributed, init_distributed, install_stack_dumps
    from acemath_mcore.training.logging import setup_console_logging
    from acemath_mcore.training.reward import RewardScorer, score_jsonl

    from acemath_mcore.convert.megatron_files import checkpoint_model_and_tokenizer, find_prompt_format

    # Before any process group or model exists: a wrong path or preset fails in a second, not after the build.
    checkpoint, arch, tokenizer_path = checkpoint_model_and_tokenizer(args.checkpoint, args.model, args.tokenizer)
    parallel = ParallelConfig(tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
                              sequence_parallel=args.sequence_parallel, timeout_minutes=args.timeout_minutes)
    arch.check_layout(parallel)
    if arch.num_layers % parallel.pipeline_parallel:  # megatron's training-style build splits layers evenly
        raise ValueError(f"--pipeline-parallel {parallel.pipeline_parallel} does not divide the model's "
                         f"num_layers={arch.num_layers}")
    install_stack_dumps()
    launch = init_distributed(parallel)
    setup_console_logging(launch.rank)
    try:
        tokenizer = load_tokenizer(tokenizer_path)
        check_vocab_fits(tokenizer, arch.padded_vocab_size)
        prompt_format = choose_prompt_format(find_prompt_format(checkpoint), args.template, args.system_prompt,
                                             f"the reward model {checkpoint}")
        encoder = ConversationEncoder(tokenizer, build_template(prompt_format.template, tokenizer,
                                                               prompt_format.system_prompt))
        scorer = RewardScorer(arch, checkpoint, parallel, ModelOptions(spec=args.spec, bf16=args.bf16),
                              tokens_per_row=args.tokens_per_row)
        score_jsonl(args.input, args.output, scorer, encoder, field=args.field, show_progress=not args.no_progress)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
