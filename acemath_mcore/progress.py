"""Progress lines for the long loops (generation, scoring, preprocessing): a Slurm log has no progress bar, so they
say how far a loop is, how fast it goes and when it will end."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("acemath_mcore.progress")


def format_duration(seconds: float) -> str:
    """``42 s``, ``7 min 5 s``, ``3 h 12 min``: a duration as a progress line's reader wants it."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class ProgressLog:
    """A long loop's progress as log lines (a Slurm log has no progress bar), at most every ``interval`` seconds
    and when it completes: done/total, the rate since :meth:`start` and the time left at that rate. Work a resumed
    run read back (``start(restored)``) counts as done but not toward the rate."""

    def __init__(self, label: str, verb: str, unit: str, enabled: bool = True, interval: float = 30.0):
        self.label, self.verb, self.unit, self.enabled, self.interval = label, verb, unit, enabled, interval
        self.start(0)

    def start(self, restored: int) -> None:
        self.restored, self.started, self.next_report = restored, time.perf_counter(), self.interval

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.started
        if not self.enabled or (done < total and elapsed < self.next_report):
            return
        self.next_report = elapsed + self.interval
        rate = (done - self.restored) / max(elapsed, 1e-9)
        left = f", {format_duration((total - done) / rate)} left" if done < total and rate > 0 else ""
        logger.info("%s: %s %d/%d %s (%s, %.2f %s/s%s)", self.label, self.verb, done, total, self.unit,
                    format_duration(elapsed), rate, self.unit, left)
