"""Training configuration: one dataclass tree per run, built by a named recipe and overridable from the CLI.

``apply_overrides(config, ["optim.lr=3e-6", "parallel.tensor_parallel=8", "data.prefixes=[a,b]"])`` walks the
dotted path and converts the value to the field's declared type, so a typo or a wrong type is an error that
names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, List, Optional, Sequence, Tuple

from acemath_mcore.options import ModelOptions, OptimConfig, ParallelConfig


# The paper's unit of a step for each kind of stage, and the key that sizes a step in it.
BATCH_UNITS = {"sft": ("global_batch_conversations", "conversations"), "rm": ("global_batch_problems", "problems")}


@dataclasses.dataclass
class DataConfig:
    """Pre-tokenized megatron .bin/.idx prefixes (from launch/preprocess.py) and how to batch them."""

    prefixes: List[str] = dataclasses.field(default_factory=list)
    weights: List[float] = dataclasses.field(default_factory=list)  # blend weights; empty = proportional to size
    seq_length: int = 4096
    packed: bool = True
    num_workers: int = 2
    # Held-out prefixes (same format, same packing); their loss is measured every ``eval_interval`` steps and at
    # the end. Keep them small: each pass runs all of them.
    valid_prefixes: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    save_interval: int = 0  # steps; 0 = only at the end
    keep_last: int = 2
    # Weights-only start (the previous stage's checkpoint, or a converted HF model); ignored when resuming.
    init_from: Optional[str] = None
    resume: bool = True  # continue from save_dir/latest when it exists
    # The distributed optimizer's state (docs/slurm.md): "dp_reshardable" writes each rank's own slice, and
    # resumes at the same TP/PP/VPP (any DP); "fully_reshardable" resumes at any layout, but every data-parallel
    # rank gathers its model-parallel shard's whole state in host memory (~30 bytes per parameter) to save it.
    optimizer_format: str = "dp_reshardable"
    # Megatron's fully parallel strategies: the data-parallel ranks share the writing (and, when loading, the
    # reading) of what they hold in common, instead of rank 0 writing all of it (and every rank reading all of it).
    fully_parallel_save: bool = True
    fully_parallel_load: bool = False  # measured slower on a local disk (docs/benchmarks.md)
    # Periodic saves written by a background process per rank while training goes on; training pauses only to
    # copy the state to host memory (docs/slurm.md). The end-of-run and preemption saves always wait.
    async_save: bool = False


@dataclasses.dataclass
class LoggingConfig:
    log_interval: int = 1  # a line (metrics.jsonl row, wandb point) per N steps, summing up those steps
    wandb_project: Optional[str] = None
    wandb_run: Optional[str] = None
    wandb_mode: str = "offline"  # one of WANDB_MODES; offline never needs the network
    output_dir: str = "runs"


@dataclasses.dataclass
class ProfileConfig:
    """A few steps of the run under a profiler (training/profiling.py); off unless ``tool`` is set."""

    tool: Optional[str] = None  # None | torch (a trace and an operator table per rank) | nsys (CUDA only)
    start_step: int = 5  # the first profiled step, as the log numbers steps (after the warm-up ones)
    num_steps: int = 2
    ranks: List[int] = dataclasses.field(default_factory=lambda: [0])


@dataclasses.dataclass
class RewardConfig:
    """Reward-model training only (launch/train_rm.py); ignored by SFT."""

    loss: str = "listwise_bt"  # listwise_bt | pairwise_bt | bce | mse (the paper's Table 8 ablations)


@dataclasses.dataclass
class TrainConfig:
    """Everything one training stage needs."""

    name: str
    # a preset name (models/presets.py), an HF config.json or its directory, or a converted megatron checkpoint
    model: str
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    model_options: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    # Samples per step: packed or padded rows (SFT); packed bins of problem groups, or problems when padded (RM).
    # None: sized in the paper's unit below.
    global_batch_size: Optional[int] = 128
    # A step of about this many conversations (SFT) or problem groups (RM), the paper's units. global_batch_size
    # becomes the rows (bins) that hold that many on average, rounded to whole micro-batches on every data-parallel
    # rank (the start-up log shows both). Set global_batch_size or the one of these that fits the stage.
    global_batch_conversations: Optional[int] = None
    global_batch_problems: Optional[int] = None
    micro_batch_size: int = 1
    epochs: float = 1.0
    train_steps: int = 0  # > 0 overrides epochs
    eval_interval: int = 0  # steps between validation passes over data.valid_prefixes (0: only after the last step)
    seed: int = 1234
    nan_policy: str = "stop"  # stop | skip: what a NaN/Inf loss or gradient norm does

    def batch_in_units(self) -> Optional[Tuple[str, int, str]]:
        """(key, count, unit) of a step sized in conversations or problems; None when ``global_batch_size`` sizes
        it."""
        for key, unit in BATCH_UNITS.values():
            if getattr(self, key) is not None:
                return key, getattr(self, key), unit
        return None

    def rows_per_step(self, units_per_row: float, unit: int = 1) -> int:
        """The rows that hold about the step's conversations or problems (:meth:`batch_in_units`) at
        ``units_per_row``: the nearest multiple of ``unit`` (micro-batch x data-parallel size, x PP under the
        interleaved schedule), at least one."""
        return max(unit, round(self.batch_in_units()[1] / units_per_row / unit) * unit)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


class OverrideError(ValueError):
    pass


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Set ``a.b.c=value`` items on a dataclass tree in place; returns the config."""
    for item in overrides:
        if "=" not in item:
            raise OverrideError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        target, path = config, key.split(".")
        for part in path[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise OverrideError(f"unknown config key {key!r} (no section {part!r})")
            target = getattr(target, part)
        field = {f.name: f for f in dataclasses.fields(target)}.get(path[-1])
        if field is None:
            known = ", ".join(f.name for f in dataclasses.fields(target))
            raise OverrideError(f"unknown config key {key!r}; {type(target).__name__} has: {known}")
        hints = typing.get_type_hints(type(target))
        try:
            value = _convert(raw, hints[field.name])
        except (TypeError, ValueError) as error:
            raise OverrideError(f"{key}={raw!r}: {error}") from None
        setattr(target, field.name, value)
    return config


def _unquoted(item: str) -> str:
    """A list item without the quotes of JSON-style lists (``data.prefixes=["/d/a","/d/b"]``)."""
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
        return item[1:-1]
    return item


def _convert(raw: str, annotation) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(raw, non_none[0])
    if origin in (list, List):
        items = raw.strip()
        if items.startswith("["):
            items = items[1:-1] if items.endswith("]") else items[1:]
        return [_convert(_unquoted(x.strip()), args[0]) for x in items.split(",") if x.strip()]
    if annotation is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected a boolean (true/false)")
    if annotation is int:
        try:
            value = float(raw)  # accepts "128" and "1e3"
        except ValueError:
            raise ValueError("expected an integer") from None
        if not value.is_integer():
            raise ValueError("expected an integer")
        return int(value)
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    if annotation is str:
        return raw
    raise TypeError(f"cannot set a field of type {annotation}")
