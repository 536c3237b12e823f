"""What the thin ``launch/train_*.py`` scripts share: recipe lookup, ``key=value`` overrides, dry runs.

Everything up to the training itself (``--help``, argument and override errors, ``--dry-run``) runs without
importing megatron-core, so those answer in about a second on a login node.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable, Optional, Sequence

from acemath_mcore.recipes import RECIPES, apply_overrides, get_recipe, recipe_kind
from acemath_mcore.recipes.checks import ConfigError, config_problems
from acemath_mcore.recipes.config import OverrideError


def main_for(kind: str, doc: str, argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    mine = sorted(name for name in RECIPES if recipe_kind(name) == kind)
    parser.add_argument("--recipe", required=True, help=f"one of: {', '.join(mine)}")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, check it (exit status 2 on a problem) and exit")
    parser.add_argument("overrides", nargs="*",
                        help="key=value config overrides, e.g. optim.lr=3e-6 (every key: docs/config.md)")
    args = parser.parse_intermixed_args(argv)  # overrides on both sides of --dry-run
    if args.recipe not in RECIPES:
        close = difflib.get_close_matches(args.recipe, mine, n=1)
        parser.error(f"unknown recipe {args.recipe!r}{f' (did you mean {close[0]}?)' if close else ''}; "
                     f"{kind} recipes: {', '.join(mine)}")
    if recipe_kind(args.recipe) != kind:
        other = "launch/train_rm.py" if kind == "sft" else "launch/train_sft.py"
        parser.error(f"--recipe {args.recipe} is a {recipe_kind(args.recipe)} recipe: run it with {other}")
    try:
        config = apply_overrides(get_recipe(args.recipe), args.overrides)
    except OverrideError as error:
        parser.error(str(error))
    if args.dry_run:
        print(config.to_json())
        problems = config_problems(config, kind)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2 if problems else 0
    from acemath_mcore.runtime.distributed import destroy_distributed, install_stack_dumps, read_launch_env
    from acemath_mcore.training.logging import setup_console_logging

    install_stack_dumps()
    setup_console_logging(read_launch_env().rank)  # rank 0's lines from the config checks and the data build on
    try:
        summary = trainer_for(kind)(config)
    except ConfigError as error:  # found before any set-up: the message is the whole story, once per job
        if read_launch_env().rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    # A finished or preempted run has no collective in flight: shut the process groups down in order, as torch
    # asks, rather than leaving NCCL to the interpreter's teardown (part of what must end within Slurm's KillWait).
    destroy_distributed()
    return summary["exit_code"]


def trainer_for(kind: str) -> Callable:
    """The training function of a stage kind: ``sft`` or ``rm``."""
    if kind == "sft":
        from acemath_mcore.training.sft import train_sft

        return train_sft
    from acemath_mcore.training.reward import train_reward_model

    return train_reward_model


if __name__ == "__main__":
    sys.exit(main_for(sys.argv[1], ""))
