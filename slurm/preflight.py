"""Check training stages before they cost GPU time: resolve each recipe + overrides exactly as launch/train_*.py
does, then make sure the paths it will read exist. Called by slurm/common.sh on the submit host (submit.sh,
pipeline.sh) and again at job start; errors name the environment variable that sets the path.

    python slurm/preflight.py --stage sft:qwen25_math_7b_sft_stage1 data.prefixes=[/d/s1] checkpoint.save_dir=/c/s1 \
                              --stage rm:qwen25_math_7b_rm:upstream data.prefixes=[/d/rm] ...
    python slurm/preflight.py --planner-args --stage rm:qwen25_math_72b_rm ...   # also prints "--model M --task rm ..."
    python slurm/preflight.py --world-size=256 --stage ...   # at job start: checks what depends on the rank count

``KIND:RECIPE[:upstream]``: kind is sft or rm; ``upstream`` means init_from is written by an earlier job of the
same pipeline, so it need not exist yet. Exit status: 0 all good, 2 a check failed (messages on stderr),
3 acemath_mcore does not import with this python (the caller falls back to checking the env paths only).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

# Which environment variable of slurm/common.sh sets each checked key (the message tells the user what to change).
ENV_FOR = {"data.prefixes": "DATA", "checkpoint.save_dir": "CKPT_DIR", "model": "RECIPE"}


def parse(argv):
    planner, world_size, stages = False, None, []
    for arg in argv:
        if arg == "--planner-args":
            planner = True
        elif arg.startswith("--world-size="):
            world_size = int(arg.split("=", 1)[1])
        elif arg == "--stage":
            stages.append(None)
        elif stages and stages[-1] is None:
            kind, recipe, *flags = arg.split(":")
            if kind not in ("sft", "rm") or flags not in ([], ["upstream"]):
                raise SystemExit(f"preflight: bad stage spec {arg!r} (KIND:RECIPE[:upstream], KIND sft|rm)")
            stages[-1] = {"kind": kind, "recipe": recipe, "upstream": bool(flags), "overrides": []}
        elif stages:
            stages[-1]["overrides"].append(arg)
        else:
            raise SystemExit(f"preflight: {arg!r} before the first --stage")
    if not stages or None in stages:
        raise SystemExit("preflight: give at least one --stage KIND:RECIPE [key=value ...]")
    return planner, world_size, stages


def check_stage(stage, planned: bool = False, world_size=None) -> tuple[list[str], str, object, object]:
    """(errors, one-line description, resolved config, the TP/PP/VPP a resume must keep or None). ``planned``: the
    layout is launch/plan.py's to pick at job start, so a resume's bound layout replaces the configured one (the
    planner is told to keep it) instead of being reported as a mismatch."""
    from acemath_mcore.recipes import RECIPES, apply_overrides, get_recipe, recipe_kind
    from acemath_mcore.recipes.checks import config_problems
    from acemath_mcore.recipes.config import OverrideError
    from acemath_mcore.training.checkpoint_dirs import bound_model_parallel, find_latest

    name = f"{stage['recipe']} ({stage['kind']})"
    if stage["recipe"] in RECIPES and recipe_kind(stage["recipe"]) != stage["kind"]:
        # The job would get its allocation, then launch/train_{kind}.py would refuse the recipe.
        return [f"{name}: RECIPE: {stage['recipe']} is a {recipe_kind(stage['recipe'])} recipe; this template trains "
                f"{stage['kind']}"], name, None, None
    try:
        config = apply_overrides(get_recipe(stage["recipe"]), stage["overrides"])
    except KeyError as error:
        return [f"{name}: RECIPE: {error.args[0]}"], name, None, None
    except OverrideError as error:
        return [f"{name}: OVERRIDES: {error}"], name, None, None
    errors = []
    save_dir = config.checkpoint.save_dir
    try:
        latest = find_latest(save_dir) if save_dir and config.checkpoint.resume else None
    except FileNotFoundError as error:  # a 'latest' marker naming no complete checkpoint
        errors.append(f"{name}: CKPT_DIR: {error}")
        latest = None
    if save_dir:
        parent = next((p for p in [Path(save_dir), *Path(save_dir).absolute().parents] if p.exists()), None)
        if parent is None or not parent.is_dir() or not _writable(parent):
            errors.append(f"{name}: CKPT_DIR: cannot create {save_dir} ({parent} is not a writable directory)")
    init = config.checkpoint.init_from
    bound = bound_model_parallel(latest, config.optim.use_distributed_optimizer) if latest is not None else None
    if planned and bound is not None:
        config.parallel.tensor_parallel = bound["tensor_parallel"]
        config.parallel.pipeline_parallel = bound["pipeline_parallel"]
        config.parallel.virtual_pipeline_parallel = bound["virtual_pipeline"] if bound["virtual_pipeline"] > 1 else None
    if latest is not None:
        start = f"resumes from {latest}"
    elif init and stage["upstream"]:
        start = f"starts from {init} (written by the previous job)"
    elif init:
        start = f"starts from {init}"
        try:
            usable = (Path(init) / "metadata.json").is_file() or find_latest(init) is not None
            what = ("is neither a checkpoint nor a save dir with 'latest'" if Path(init).exists()
                    else "does not exist")
        except FileNotFoundError as error:
            usable, what = False, f"is a save dir whose {error}"
        if not usable:
            errors.append(f"{name}: INIT_FROM: checkpoint.init_from={init} {what} (set INIT_FROM to the previous "
                          f"stage's CKPT_DIR or a converted base model; INIT_FROM=none trains from scratch)")
    else:
        start = "starts from random weights"
    # The trainer's own checks (data files and tokenizer, option values, model, layout); the starting checkpoint is
    # read only when it exists now and the checks above found nothing wrong with it.
    for problem in config_problems(config, stage["kind"], read_checkpoint=not stage["upstream"] and not errors,
                                   world_size=world_size):
        key = problem.split(":")[0].split("=")[0]
        errors.append(f"{name}: {ENV_FOR.get(key, 'OVERRIDES')}: {problem}")
    description = (f"{name}: model {config.model}, {len(config.data.prefixes)} data prefix(es), {start}, "
                   f"saves to {save_dir}")
    return errors, description, config, bound


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def main(argv=None) -> int:
    planner, world_size, stages = parse(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron's TE/apex notices are noise here
        try:
            import acemath_mcore.recipes  # noqa: F401
        except ImportError as error:
            print(f"preflight: cannot import acemath_mcore with {sys.executable}: {error}", file=sys.stderr)
            return 3
        import logging

        package_logger = logging.getLogger("acemath_mcore")
        level = package_logger.level
        package_logger.setLevel(logging.ERROR)  # find_latest's notes about partial saves
        try:
            return _check(planner, world_size, stages)
        finally:
            package_logger.setLevel(level)


def planned_global_batch(config) -> int:
    """Rows per step for the planner: ``global_batch_size``, or for a batch sized in conversations (problem
    groups) an estimate from the data's preprocessing stats (mean conversation or group length, rows nearly full)
    rounded to a power of two, as the trainer's exact count is rounded to the chosen layout's micro-batches.
    Without stats, one per row."""
    if config.global_batch_size is not None:
        return config.global_batch_size
    counted = "samples" if config.global_batch_conversations is not None else "groups"
    samples = tokens = 0
    for prefix in config.data.prefixes:
        stats = Path(prefix + "_stats.json")
        if stats.is_file():
            recorded = json.loads(stats.read_text())
            samples, tokens = samples + recorded.get(counted, 0), tokens + recorded.get("tokens", 0)
    per_row = config.data.seq_length * samples / tokens if config.data.packed and tokens else 1.0
    return 1 << max(0, round(math.log2(config.rows_per_step(max(per_row, 1.0)))))


def _check(planner, world_size, stages) -> int:
    all_errors = []
    for stage in stages:
        errors, description, config, bound = check_stage(stage, planned=planner, world_size=world_size)
        all_errors += errors
        if not errors:
            print(f"preflight ok: {description}", file=sys.stderr)
        if planner and config is not None:  # the shape launch/plan.py needs, on stdout for the caller
            keep = "" if bound is None else (
                f" --model-parallel {bound['tensor_parallel']},{bound['pipeline_parallel']},{bound['virtual_pipeline']}")
            # A packed RM bin is one row of seq_length tokens; a padded RM sample is a group of max_group rows.
            rows = " --responses 1" if stage["kind"] == "rm" and config.data.packed else ""
            print(f"--model {config.model} --task {stage['kind']}{rows} --seq-length {config.data.seq_length} "
                  f"--global-batch {planned_global_batch(config)} --micro-batch {config.micro_batch_size}{keep}")
    for error in all_errors:
        print(f"preflight: error: {error}", file=sys.stderr)
    return 2 if all_errors else 0


if __name__ == "__main__":
    sys.exit(main())
