"""Where a stage's checkpoints are, read without megatron-core (the trainer, ``--dry-run`` and Slurm preflight).

Layout of a save directory::

    save_dir/
      latest                 text: the name of the newest *complete* checkpoint, written last (atomic replace)
      iter_0000500/          one dist checkpoint: model chunks, optimizer, scheduler, RNG, data position
      iter_0001000.partial/  a save in progress (or one that crashed): never read

:mod:`acemath_mcore.training.checkpointing` writes and reads the checkpoints themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger("acemath_mcore")

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def find_latest(save_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names; unfinished saves are reported and ignored.

    A marker that names no complete checkpoint (emptied by a node crash before it reached the disk, or its
    directory removed) is an error rather than a fresh start: a requeued job would otherwise retrain the stage
    from its initial weights without anyone noticing."""
    save_dir = Path(save_dir)
    for partial in sorted(save_dir.glob(f"iter_*{PARTIAL_SUFFIX}")):
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
