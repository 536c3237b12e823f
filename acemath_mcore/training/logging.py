"""Training logs: one console line per logged step (summing up the steps since the previous one), ``metrics.jsonl``
(appended, so it keeps a stage's whole history across resumes; the lines past the step a run starts from, which it
redoes, move to ``metrics.superseded.jsonl`` when it starts), wandb (offline unless told otherwise), and a final
JSON summary of this launch."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

from acemath_mcore.files import write_atomically
from acemath_mcore.progress import format_duration

logger = logging.getLogger("acemath_mcore")


def log_on_rank_0(rank: int) -> None:
    """Our messages on rank 0 only, from INFO up: what the other ranks would warn about (the config, the data, the
    checkpoints, a stop signal) is the same on every rank, and a 256-GPU job printed each warning 256 times. They
    print errors. Touches the other ranks' level alone, so that the trainers call it before their config checks
    (rank 0 keeps its level until setup_console_logging)."""
    if rank != 0:
        logger.setLevel(logging.ERROR)


def setup_console_logging(rank: int) -> None:
    """Our console lines (rank 0's, see log_on_rank_0) on stdout; megatron-core's own INFO chatter (parameter
    lists, optimizer config dumps) is kept to warnings."""
    if not any(getattr(h, "_acemath", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        handler._acemath = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)
    log_on_rank_0(rank)
    logging.getLogger("megatron").setLevel(logging.WARNING)


class IntervalMetrics:
    """The steps since the last logged one, reduced to one record the way a reader of the log expects: tokens/s and
    MFU over the interval's wall time, memory at its peak, skipped updates counted, learning rate and consumed
    samples as of the last step, and everything else (losses, accuracies, gradient norm, step and data time) the
    mean over the steps that report a finite value: a step skipped for a NaN loss or gradient is counted in
    ``skipped`` instead of turning the whole line into NaN (NaN only when no step of the interval was finite).
    ``interval_steps`` says how many steps the record covers."""

    TIME_WEIGHTED = ("tokens_per_s", "mfu")
    LAST = ("lr", "consumed_samples")
    PEAK = ("memory_gib",)
    TOTAL = ("skipped",)

    def __init__(self):
        self.steps = []

    def add(self, metrics: Dict[str, float]) -> None:
        self.steps.append(dict(metrics))

    def reduce(self) -> Dict[str, float]:
        steps, self.steps = self.steps, []
        record = {}
        for key in dict.fromkeys(key for step in steps for key in step):
            reporting = [step for step in steps if key in step]
            values = [step[key] for step in reporting]
            if key in self.TIME_WEIGHTED:
                record[key] = (math.fsum(value * step["step_s"] for value, step in zip(values, reporting))
                               / math.fsum(step["step_s"] for step in reporting))
            elif key in self.LAST:
                record[key] = values[-1]
            elif key in self.PEAK:
                record[key] = max(values)
            elif key in self.TOTAL:
                record[key] = math.fsum(values)
            else:
                finite = [value for value in values if math.isfinite(value)]
                record[key] = math.fsum(finite) / len(finite) if finite else values[-1]
        record["interval_steps"] = len(steps)
        return record


class MetricsLogger:
    """Formats step metrics for the console and forwards them to wandb when a project is configured."""

    def __init__(self, run_name: str, output_dir: str, config: dict, total_steps: int, rank: int,
                 wandb_project: Optional[str] = None, wandb_mode: str = "offline", wandb_run: Optional[str] = None,
                 start_step: int = 0):
        self.rank, self.total_steps, self.start_step = rank, total_steps, start_step
        self.run_dir = Path(output_dir) / run_name
        self.history = []
        self.wandb = None
        self.progress = None
        if rank != 0:
            return
        if sys.stdout.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.progress = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step",
                                     dynamic_ncols=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._set_aside_lines_after(start_step)
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if wandb_project:
            if os.environ.get("WANDB_MODE", wandb_mode) != wandb_mode:
                logger.warning("WANDB_MODE=%s from the environment overrides logging.wandb_mode=%s",
                               os.environ["WANDB_MODE"], wandb_mode)
            os.environ.setdefault("WANDB_MODE", wandb_mode)
            try:
                import wandb
            except ImportError:
                logger.warning("wandb is not installed: logging to the console and %s only", self.run_dir)
            else:
                self.wandb = wandb.init(project=wandb_project, name=wandb_run or run_name, config=config,
                                        dir=str(self.run_dir))

    def _set_aside_lines_after(self, step: int) -> None:
        """Lines of an earlier launch past ``step``, the step this run starts from: a failed run's last line, or
        a whole run started over (resume=false), would otherwise count steps twice beside this run's lines. A torn
        last line goes too. They are kept in ``metrics.superseded.jsonl``."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept, superseded = [], []
        for line in path.read_text().splitlines(keepends=True):
            try:
                keep = json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            (kept if keep else superseded).append(line if line.endswith("\n") else line + "\n")
        if not superseded:
            return
        with open(self.run_dir / "metrics.superseded.jsonl", "a") as stream:
            stream.writelines(superseded)
        write_atomically(path, "".join(kept))
        logger.info("%s: %d line(s) past step %d, which this run redoes, moved to metrics.superseded.jsonl", path,
                    len(superseded), step)

    def log_step(self, step: int, metrics: Dict[str, float]) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **metrics}
        self.history.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as stream:
            stream.write(json.dumps(record) + "\n")
        parts = [f"step {step:>6}/{self.total_steps}"]
        for key, fmt in (("lm_loss", "loss {:.4f}"), ("rm_loss", "loss {:.4f}"), ("pairwise_accuracy", "acc {:.3f}"),
                         ("valid_lm_loss", "valid loss {:.4f}"), ("valid_rm_loss", "valid loss {:.4f}"),
                         ("valid_pairwise_accuracy", "valid acc {:.3f}"),
                         ("lr", "lr {:.3g}"), ("grad_norm", "grad-norm {:.3f}"), ("tokens_per_s", "tok/s {:,.0f}"),
                         ("mfu", "MFU {:.1%}"), ("step_s", "{:.2f} s/step"), ("memory_gib", "mem {:.1f} GiB")):
            value = metrics.get(key)
            if value is None:
                continue
            parts.append(fmt.format(value) if math.isfinite(value) else f"{key} {value}")
        data_wait, step_time = metrics.get("data_s_max"), metrics.get("step_s")
        if data_wait and step_time and data_wait > 0.05 * step_time:  # the loader no longer keeps up
            parts.append(f"waited {data_wait:.2f} s/step for data (slowest rank)")
        if step_time and step < self.total_steps:  # Slurm logs have no progress bar: say when the run ends
            parts.append(f"{format_duration(step_time * (self.total_steps - step))} left")
        steps = metrics.get("interval_steps", 1)
        if metrics.get("skipped"):
            parts.append("(optimizer step skipped)" if steps == 1
                         else f"({metrics['skipped']:.0f} optimizer steps skipped)")
        if steps > 1:
            parts.append(f"over {steps} steps")
        logger.info(" | ".join(parts))
        if self.progress is not None:
            self.progress.update(step - self.progress.n)
        self._to_wandb(lambda run: run.log({key: value for key, value in metrics.items() if key != "interval_steps"},
                                           step=step))

    def finish(self, summary: Dict) -> Optional[Path]:
        if self.rank != 0:
            return None
        if self.progress is not None:
            self.progress.close()
        path = self.run_dir / "summary.json"
        path.write_text(json.dumps({**summary, "start_step": self.start_step, "history": self.history}, indent=2,
                                   default=str))
        self._to_wandb(lambda run: run.summary.update({k: v for k, v in summary.items()
                                                       if isinstance(v, (int, float, str))}))
        self._to_wandb(lambda run: run.finish())
        logger.info("summary written to %s", path)
        return path

    def _to_wandb(self, action: Callable) -> None:
        """wandb is a copy of what metrics.jsonl holds: when it fails, it is dropped with a warning rather than
        failing the run. A scheduler's preemption SIGTERMs every process of the job step, wandb's service process
        too, whose next call then raises ConnectionResetError, before the preemption checkpoint is written."""
        if self.wandb is None:
            return
        try:
            action(self.wandb)
        except Exception as error:  # any failure of the copy: the run goes on without it
            logger.warning("wandb failed (%s: %s): logging to the console and %s only from here on",
                           type(error).__name__, error, self.run_dir)
            self.wandb = None
            _unhook_wandb()


def _unhook_wandb() -> None:
    """A wandb run hooks the imports of ~100 modules (transformers, huggingface_hub, ...) to report them to its
    service: with the service gone, the first such import anywhere in the process raised ConnectionResetError.
    ``wandb.teardown`` removes the hooks first, then fails to reach the service (ignored)."""
    import wandb

    with contextlib.suppress(Exception):
        wandb.teardown()
