"""Profile a few training steps of a real run (``profile.*`` in the recipe), on the ranks asked for.

``profile.tool=torch`` records the steps with the torch profiler and writes, per rank, a Chrome trace (open it in
https://ui.perfetto.dev or ``chrome://tracing``) and a table of the operators with the most self time.
``profile.tool=nsys`` brackets the steps with ``cudaProfilerStart/Stop`` and NVTX ranges for every operator, so
``nsys profile --capture-range=cudaProfilerApi`` records those steps only. Either way the engine's named phases
(``engine.STEP_PHASES``) mark forward/backward, loss reduction, gradient norm and optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

from acemath_mcore.recipes.config import ProfileConfig
from acemath_mcore.runtime import device as device_lib

logger = logging.getLogger("acemath_mcore")


class StepProfiler:
    """Starts before step ``profile.start_step`` and stops after ``profile.num_steps`` steps (or when the run ends
    first, keeping what it has). Steps are numbered as the log numbers them, so a run resumed past the window
    profiles nothing."""

    def __init__(self, options: ProfileConfig, rank: int, world_size: int, run_dir: Path,
                 run_steps: Optional[range] = None):
        self.options = options
        self.first, self.last = options.start_step, options.start_step + options.num_steps - 1
        self.active = options.tool is not None and rank in options.ranks
        self.rank, self.directory = rank, run_dir / "profile"
        self._recording: Optional[contextlib.ExitStack] = None
        self._torch_profiler, self._sort_by = None, None
        if self.active and options.tool == "nsys":
            device_lib.require_cuda_profiler()
        if options.tool is not None and rank == 0:  # the only rank whose log lines show (training/logging.py)
            absent = [r for r in options.ranks if not 0 <= r < world_size]
            if absent:
                logger.warning("profile.ranks=%s: this job's ranks are 0-%d, so %s profile(s) nothing",
                               options.ranks, world_size - 1, absent)
            if run_steps is not None and not (len(run_steps) and self.first <= run_steps[-1]
                                              and self.last >= run_steps[0]):
                steps = f"{run_steps[0]}-{run_steps[-1]}" if len(run_steps) else "(none left)"
                logger.warning("profile: steps %d-%d are outside this run's steps %s, so nothing is profiled (set "
                               "profile.start_step)", self.first, self.last, steps)
            where = f"into {self.directory}" if options.tool == "torch" else "for nsys"
            logger.info("profile: steps %d-%d with %s on ranks %s, %s", self.first, self.last, options.tool,
                        options.ranks, where)

    def before_step(self, step: int) -> None:
        """``step``: the number of the step about to run."""
        if self.active and step == self.first:
            self._start()

    def after_step(self, step: int) -> None:
        """``step``: the number of the step that just ran (its device work finished)."""
        if self._recording is not None and step == self.last:
            self._stop(step)

    def close(self, step: int) -> None:
        """The run ends (``step`` was its last): stop a recording still going."""
        if self._recording is not None:
            self._stop(step)

    def _start(self) -> None:
        self._recording = contextlib.ExitStack()
        if self.options.tool == "nsys":
            self._recording.enter_context(torch.autograd.profiler.emit_nvtx(record_shapes=False))
            self._recording.enter_context(device_lib.cuda_profiler_range())
        else:
            activities, self._sort_by = device_lib.torch_profiler_settings()
            self._torch_profiler = self._recording.enter_context(torch.profiler.profile(activities=activities))

    def _stop(self, step: int) -> None:
        self._recording.close()
        self._recording = None
        if self._torch_profiler is None:
            logger.info("profiled steps %d-%d on rank %d (nsys: cudaProfilerStop sent)", self.first, step, self.rank)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self.directory / f"rank{self.rank}-steps{self.first}-{step}"
        trace = stem.with_suffix(".json.gz")
        self._torch_profiler.export_chrome_trace(str(trace))
        table = stem.with_suffix(".txt")
        table.write_text(self._torch_profiler.key_averages().table(sort_by=self._sort_by, row_limit=40) + "\n")
        self._torch_profiler = None
        logger.info("profiled steps %d-%d on rank %d: trace %s (https://ui.perfetto.dev), top operators %s",
                    self.first, step, self.rank, trace, table)
