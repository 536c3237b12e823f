"""Where a stage's checkpoints are, read without megatron-core (the trainer, ``--dry-run`` and Slurm preflight).

Layout of a save directory::

    save_dir/
      latest                 text: the name of the newest *complete* checkpoint, written last (atomic replace)
      iter_0000500/          one dist checkpoint: model chunks, optimizer, scheduler, RNG, data position
        optimizer_layout.json  the layout and optimizer format it was saved with (for --dry-run and preflight)
      iter_0001000.partial/  a save in progress (or one that crashed): never read

:mod:`acemath_mcore.training.checkpointing` writes and reads the checkpoints themselves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable, Optional

from acemath_mcore.options import OPTIMIZER_CHECKPOINT_FORMATS

logger = logging.getLogger("acemath_mcore")

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
OPTIMIZER_LAYOUT_FILE = "optimizer_layout.json"
# The optimizer formats: the first resumes at any layout, the second only at the model-parallel layout that saved it.
FREE_LAYOUT_FORMAT, LAYOUT_BOUND_FORMAT = OPTIMIZER_CHECKPOINT_FORMATS
MODEL_PARALLEL_KEYS = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline")


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def write_optimizer_layout(checkpoint: Path, layout: Dict[str, int], optimizer_format: str,
                           distributed_optimizer: bool) -> None:
    """What a resume of ``checkpoint`` must match, in a file that needs neither megatron-core nor torch to read."""
    record = {"layout": layout, "optimizer_format": optimizer_format, "distributed_optimizer": distributed_optimizer}
    (Path(checkpoint) / OPTIMIZER_LAYOUT_FILE).write_text(json.dumps(record, indent=1) + "\n")


def read_optimizer_layout(checkpoint: Path) -> Optional[Dict]:
    """The record :func:`write_optimizer_layout` left; None for checkpoints saved before 2026-11-24."""
    path = Path(checkpoint) / OPTIMIZER_LAYOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def bound_model_parallel(checkpoint: Path, distributed_optimizer: bool) -> Optional[Dict[str, int]]:
    """The TP/PP/VPP (MODEL_PARALLEL_KEYS) a resume of ``checkpoint`` must keep: that of its dp_reshardable
    optimizer state, when it has such state and the run (``distributed_optimizer``) will load it; else None."""
    record = read_optimizer_layout(checkpoint)
    if (not distributed_optimizer or record is None or not record["distributed_optimizer"]
            or record["optimizer_format"] != LAYOUT_BOUND_FORMAT):
        return None
    return {key: record["layout"].get(key, 1) for key in MODEL_PARALLEL_KEYS}


def same_layout(saved: Dict[str, int], current: Dict[str, int], keys: Iterable[str] = ()) -> bool:
    """Whether ``saved`` is ``current`` in ``keys`` (default: all of current's); entries that older checkpoints
    lack count as unchanged."""
    return all(saved.get(key, current[key]) == current[key] for key in (keys or current))


def layout_bound_problem(checkpoint: Path, saved: Dict[str, int], current: Dict[str, int]) -> Optional[str]:
    """Why ``checkpoint``'s dp_reshardable optimizer state cannot resume at ``current``, with the ways out; None
    when the model-parallel layout is the saved one."""
    if same_layout(saved, current, MODEL_PARALLEL_KEYS):
        return None
    return (f"{checkpoint} holds its optimizer state in the {LAYOUT_BOUND_FORMAT} format, which resumes only at the "
            "layout that saved it: " + ", ".join(f"{key} {saved.get(key, current[key])}" for key in MODEL_PARALLEL_KEYS)
            + " (this run: " + ", ".join(f"{key} {current[key]}" for key in MODEL_PARALLEL_KEYS) + "); the number "
            "of data-parallel ranks may change. Resume at the saved layout, or " + fresh_start(checkpoint))


# megatron's DDP sizes its gradient buckets max(40M, 1M x DP) elements when it overlaps the gradient reduction
# (one bucket otherwise), and dp_reshardable optimizer state is stored per bucket.
BUCKET_GROWTH_DATA_PARALLEL = 40


def bucket_bound_problem(checkpoint: Path, saved_layout: Dict, data_parallel: Optional[int],
                         overlap_grad_reduce: bool) -> Optional[str]:
    """Why ``checkpoint``'s dp_reshardable optimizer state does not fit this run's gradient buckets: another
    ``optim.overlap_grad_reduce``, or (``data_parallel`` known) a number of data-parallel ranks changed across 40.
    None when the buckets are the saved ones, or the record predates what would tell."""
    saved_overlap, saved_dp = saved_layout.get("overlap_grad_reduce"), saved_layout.get("data_parallel")
    growth = BUCKET_GROWTH_DATA_PARALLEL
    if saved_overlap is not None and saved_overlap != overlap_grad_reduce:
        flag = f"optim.overlap_grad_reduce={str(saved_overlap).lower()}"
        why = f"was saved with {flag} (this run: {str(overlap_grad_reduce).lower()}), which decides the buckets"
        fix = flag
    elif overlap_grad_reduce and None not in (saved_dp, data_parallel) and \
            max(growth, saved_dp) != max(growth, data_parallel):
        why = (f"megatron sizes the buckets from the number of data-parallel ranks above {growth}: saved at "
               f"{saved_dp}, this run has {data_parallel}")
        fix = f"{saved_dp if saved_dp > growth else f'at most {growth}'} data-parallel ranks"
    else:
        return None
    return (f"{checkpoint} holds its optimizer state in the {LAYOUT_BOUND_FORMAT} format, stored per gradient bucket, "
            f"and {why}. Resume with {fix}, or " + fresh_start(checkpoint))


def fresh_start(checkpoint: Path) -> str:
    """The ways out for a checkpoint whose dp_reshardable optimizer state does not fit this run."""
    return (f"resume it once as it was saved with checkpoint.optimizer_format={FREE_LAYOUT_FORMAT}, whose next "
            "checkpoint is free of both, or start a new stage from its weights with "
            f"checkpoint.init_from={checkpoint} (fresh optimizer)")


_REPORTED_PARTIALS: set = set()


def find_latest(save_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names; unfinished saves are reported and ignored.

    A marker that names no complete checkpoint (emptied by a node crash before it reached the disk, or its
    directory removed) is an error rather than a fresh start: a requeued job would otherwise retrain the stage
    from its initial weights without anyone noticing."""
    save_dir = Path(save_dir)
    for partial in sorted(save_dir.glob(f"iter_*{PARTIAL_SUFFIX}")):
        if partial.resolve() not in _REPORTED_PARTIALS:  # once per process (the config checks look first)
            _REPORTED_PARTIALS.add(partial.resolve())
            logger.warning("ignoring incomplete checkpoint %s (a save that did not finish)", partial)
    marker = save_dir / LATEST
    if not marker.is_file():
        if any(save_dir.glob("iter_*")):
            logger.warning("%s has checkpoint directories but no '%s' marker: not resuming from them", save_dir,
                           LATEST)
        return None
    name = marker.read_text().strip()
    target = save_dir / name
    if not name or not (target / "metadata.json").is_file():
        published = sorted(p.name for p in save_dir.glob("iter_*")
                           if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX))
        raise FileNotFoundError(
            f"{marker} names {name!r}, which is not a complete checkpoint; published checkpoints there: "
            f"{', '.join(published) or 'none'}. Write the name of the one to resume from into {marker}, or start "
            "over with checkpoint.resume=false")
    return target


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A dist checkpoint directory itself, or the one a trainer save dir's ``latest`` marker names."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    latest = find_latest(path) if path.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"no megatron checkpoint at {path} (neither a dist checkpoint directory with "
                                "metadata.json nor a save dir with a 'latest' marker)")
    return latest
