"""Tests run real megatron-core in spawned gloo workers (acemath_mcore.runtime.local_workers)."""

from __future__ import annotations

from acemath_mcore.runtime.local_workers import run_local_workers


def run_workers(target, world_size: int, *args, timeout: float = 600.0, fresh_interpreter: bool = False) -> list:
    """Results of ``target(rank, world_size, *args)`` for every rank, in rank order; a worker's exception fails
    the caller with that worker's traceback. ``fresh_interpreter``: see ``run_local_workers``."""
    return run_local_workers(target, world_size, *args, timeout=timeout, fresh_interpreter=fresh_interpreter)
