"""Check a stage's config before it costs GPU time, listing every problem at once.

The trainers run these checks before they touch a GPU; ``launch/train_*.py --dry-run`` and ``slurm/preflight.py``
run them on the submit host. Each problem names the config key to change. What is checked: the choice-valued
options, the optimizer's numbers, the model name, the parallel layout against the model's shapes, the data
prefixes (present, complete, one for a reward model) and blend weights, and the data's tokenizer (from each
prefix's ``_stats.json``) against the model's vocabulary and against the tokenizer the starting checkpoint records.
A value megatron-core or torch would refuse only after the model is built on every GPU belongs here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional

from acemath_mcore.data.chat_templates import PromptFormat
from acemath_mcore.options import (
    CUDA_GRAPH_SCOPES,
    DECAY_STYLES,
    FP8_FORMATS,
    FP8_RECIPES,
    LM_CROSS_ENTROPY_CHOICES,
    NAN_POLICIES,
    OPTIMIZER_CHECKPOINT_FORMATS,
    PROFILERS,
    RECOMPUTE_GRANULARITIES,
    RM_LOSSES,
    SPEC_CHOICES,
    WANDB_MODES,
)
from acemath_mcore.recipes.config import BATCH_UNITS, TrainConfig

if TYPE_CHECKING:  # the models package imports torch, which --help and argument errors do without
    from acemath_mcore.models.arch import ModelArch

logger = logging.getLogger(__name__)

# What identifies a vocabulary across tokenizer implementations (a tokenizer.json and the tiktoken file of the
# same model agree on these). The eos and pad tokens are left out: a base model's and its instruct model's
# tokenizers share the vocabulary but name another eos.
TOKENIZER_IDENTITY = ("vocab_size", "bos_id", "im_start_id", "im_end_id")


class ConfigError(ValueError):
    """One or more problems of a training config, one per line."""


def check_config(config: TrainConfig, kind: str, arch: Optional[ModelArch] = None,
                 world_size: Optional[int] = None) -> None:
    """Raise :class:`ConfigError` listing every problem :func:`config_problems` finds."""
    problems = config_problems(config, kind, arch, world_size=world_size)
    if problems:
        raise ConfigError(f"recipe {config.name!r} ({kind}): {len(problems)} problem(s):\n"
                          + "\n".join(f"  - {problem}" for problem in problems))


def config_problems(config: TrainConfig, kind: str, arch: Optional[ModelArch] = None,
                    read_checkpoint: bool = True, world_size: Optional[int] = None) -> List[str]:
    """Every problem found, each starting with the config key to change. ``kind``: sft or rm. ``arch``: the
    model when the caller already has it (else resolved from ``config.model``). ``read_checkpoint``: compare
    with the starting checkpoint's recorded architecture and tokenizer (off when an earlier job writes it).
    ``world_size``: the job's ranks, when known (the trainer, Slurm's job-start check), for what depends on the
    number of data-parallel ranks."""
    problems = _option_problems(config, kind) + _optim_problems(config) + _batch_problems(config, kind)
    problems += _data_problems(config, kind)
    data = config.data
    complete = []
    for key in ("prefixes", "valid_prefixes"):
        for prefix in getattr(data, key):
            missing = _missing_files(prefix, kind)
            if missing:
                problems.append(f"data.{key}: prefix {prefix} is missing {', '.join(missing)} "
                                f"({_written_by(prefix, kind)})")
            else:
                complete.append(prefix)
    if arch is None:
        from acemath_mcore.models.presets import resolve_arch

        try:
            arch = resolve_arch(config.model)
        except (ValueError, KeyError, OSError) as error:
            return [*problems, f"model: {error}"]
    problems += _layout_problems(config, arch)
    try:
        checkpoint = starting_checkpoint(config) if read_checkpoint else None
    except FileNotFoundError as error:  # a 'latest' marker naming no complete checkpoint
        return [*problems, f"checkpoint.save_dir: {error}"]
    init_from = config.checkpoint.init_from
    if read_checkpoint and checkpoint is None and init_from and not Path(init_from).exists():
        problems.append(f"checkpoint.init_from: {init_from} does not exist (convert the base model with "
                        "checkpoints_tools/convert_from_hf.py, or point it at the previous stage's save dir)")
    assets = None
    if checkpoint is not None:
        from acemath_mcore.convert.megatron_files import find_model_description

        problems += _resume_layout_problems(config, checkpoint, world_size)

        recorded, _, assets = find_model_description(checkpoint)
        try:
            arch.check_matches(recorded, f"the starting checkpoint {checkpoint}")
        except ValueError as error:
            problems.append(f"model: {error}")
    return problems + data_tokenizer_problems(complete, arch, assets) + _length_problems(config, kind, complete)


def _option_problems(config: TrainConfig, kind: str) -> List[str]:
    options = config.model_options
    choices = [
        ("model_options.spec", options.spec, SPEC_CHOICES),
        ("model_options.recompute", options.recompute, (None, *RECOMPUTE_GRANULARITIES)),
        ("model_options.fp8", options.fp8, (None, *FP8_FORMATS)),
        ("model_options.fp8_recipe", options.fp8_recipe, FP8_RECIPES),
        ("model_options.cross_entropy", options.cross_entropy, LM_CROSS_ENTROPY_CHOICES),
        ("model_options.cuda_graph", options.cuda_graph, (None, *CUDA_GRAPH_SCOPES)),
        ("optim.decay_style", config.optim.decay_style, DECAY_STYLES),
        ("nan_policy", config.nan_policy, NAN_POLICIES),
        ("checkpoint.optimizer_format", config.checkpoint.optimizer_format, OPTIMIZER_CHECKPOINT_FORMATS),
        ("profile.tool", config.profile.tool, (None, *PROFILERS)),
        ("logging.wandb_mode", config.logging.wandb_mode, WANDB_MODES),
    ]
    if kind == "rm":
        choices.append(("reward.loss", config.reward.loss, RM_LOSSES))
    problems = [f"{key}={_shown(value)}: choose one of {', '.join(_shown(c) for c in allowed)}"
                for key, value, allowed in choices if value not in allowed]
    if options.spec == "native":  # on any machine; spec=auto resolves where the job runs
        problems += [f"{key}={_shown(value)} needs Transformer Engine's layer spec, not model_options.spec=native"
                     for key, value in (("model_options.fp8", options.fp8), ("model_options.cuda_graph", options.cuda_graph))
                     if value]
    intervals = (("logging.log_interval", config.logging.log_interval, 1, ""),
                 ("eval_interval", config.eval_interval, 0, " (0: only after the last step)"),
                 ("checkpoint.save_interval", config.checkpoint.save_interval, 0, " (0: only at the end)"),
                 ("data.num_workers", config.data.num_workers, 0, " (0: load in the training process)"),
                 ("parallel.timeout_minutes", config.parallel.timeout_minutes, 1, ""))
    problems += [f"{key}={value}: must be at least {least}{meaning}" for key, value, least, meaning in intervals
                 if value < least]
    if config.profile.tool is not None:
        problems += [f"profile.{key}={value}: must be at least 1" for key, value in (
            ("start_step", config.profile.start_step), ("num_steps", config.profile.num_steps)) if value < 1]
    return problems


def _optim_problems(config: TrainConfig) -> List[str]:
    """Numbers megatron's scheduler and torch's AdamW would refuse with a bare assertion once the model is built."""
    optim = config.optim
    problems = []
    if not optim.lr >= 0:
        problems.append(f"optim.lr={optim.lr}: must be at least 0")
    elif not 0 <= optim.min_lr <= optim.lr:
        problems.append(f"optim.min_lr={optim.min_lr}: must be between 0 and optim.lr={optim.lr} (the decay's floor)")
    problems += [f"optim.{key}={value}: must be at least 0{meaning}" for key, value, meaning in (
        ("weight_decay", optim.weight_decay, ""), ("clip_grad", optim.clip_grad, " (0: no clipping)"),
        ("warmup_steps", optim.warmup_steps, "")) if value < 0]
    problems += [f"optim.{key}={value}: must be in [0, 1)" for key, value in (
        ("adam_beta1", optim.adam_beta1), ("adam_beta2", optim.adam_beta2)) if not 0 <= value < 1]
    if not optim.adam_eps >= 0:
        problems.append(f"optim.adam_eps={optim.adam_eps}: must be at least 0")
    overlap = optim.overlap_problem()
    return problems + ([overlap] if overlap else [])


def _batch_problems(config: TrainConfig, kind: str) -> List[str]:
    batch = config.global_batch_size
    other_kind = "rm" if kind == "sft" else "sft"
    (key, noun), (other_key, _) = BATCH_UNITS[kind], BATCH_UNITS[other_kind]
    units, other = getattr(config, key), getattr(config, other_key)
    problems = [f"{name}={value}: must be at least 1" for name, value in (
        ("global_batch_size", batch), (key, units), (other_key, other),
        ("micro_batch_size", config.micro_batch_size), ("data.seq_length", config.data.seq_length))
        if value is not None and value < 1]
    if other is not None:
        problems.append(f"{other_key}={other}: {other_kind.upper()} only; size this {kind.upper()} stage's step with "
                        f"{key} or global_batch_size")
    if (batch is None) == (units is None):
        problems.append(f"global_batch_size={_shown(batch)}, {key}={_shown(units)}: set exactly one, a step of that "
                        f"many rows or of about that many {noun} (add {key}=null to use global_batch_size, or the "
                        "other way round)")
    if config.train_steps < 0 or config.epochs <= 0:
        problems.append(f"train_steps={config.train_steps}, epochs={config.epochs}: train_steps must be at least 0 "
                        "(0: run for the epochs) and epochs above 0")
    if batch is not None and config.micro_batch_size >= 1 and batch % config.micro_batch_size:
        problems.append(f"global_batch_size={config.global_batch_size} is not a multiple of "
                        f"micro_batch_size={config.micro_batch_size}")
    return problems


def _data_problems(config: TrainConfig, kind: str) -> List[str]:
    """How many prefixes the stage takes and their blend weights (the files themselves are checked after)."""
    data, problems = config.data, []
    if not data.prefixes:
        problems.append(f"data.prefixes: none given: pass data.prefixes=[PREFIX,...], outputs of "
                        f"launch/preprocess.py {kind}")
    if kind == "rm":
        # A reward model's loader reads one prefix of problem groups: a blend would mix groups of other sizes.
        if len(data.prefixes) > 1 or data.weights:
            problems.append(f"data.prefixes: a reward model trains on exactly one RM prefix and no blend weights, got "
                            f"{len(data.prefixes)} prefix(es) and weights {data.weights}")
        if len(data.valid_prefixes) > 1:
            problems.append(f"data.valid_prefixes: a reward model validates on one RM prefix, got "
                            f"{len(data.valid_prefixes)}")
        return problems
    if data.weights and len(data.weights) != len(data.prefixes):
        problems.append(f"data.weights: {len(data.weights)} weight(s) for {len(data.prefixes)} prefix(es) in "
                        "data.prefixes; give one per prefix, or none to blend in proportion to size")
    if any(weight <= 0 for weight in data.weights):
        problems.append(f"data.weights={data.weights}: weights must be positive")
    return problems


def _row_multiple(config: TrainConfig) -> int:
    """What a row's token count must be a multiple of: the TP size under sequence parallelism."""
    parallel = config.parallel
    return parallel.tensor_parallel if parallel.sequence_parallel and parallel.tensor_parallel > 1 else 1


def _length_problems(config: TrainConfig, kind: str, prefixes: Iterable[str]) -> List[str]:
    """Samples longer than a row, from each prefix's stats (the loader would refuse them after set-up): an SFT
    conversation, an RM response (padded rows) or a whole RM group (packed bins)."""
    length = config.data.seq_length
    shorter = f", or preprocess with --max-length {length}"  # a per-sequence limit: not one for a group
    if kind == "sft":
        key, what = "max_sample_tokens", "conversations"
    elif config.data.packed:
        key, what, shorter = "max_group_tokens", "problem groups (a packed bin holds whole groups)", ""
    else:
        key, what = "max_response_tokens", "responses (a padded row holds one)"
    problems = []
    for prefix in prefixes:
        longest = _prefix_stats(prefix, key, required=False)
        if longest is not None and longest > length:
            least = -(-longest // _row_multiple(config)) * _row_multiple(config)
            problems.append(f"data.seq_length={length}: {prefix} has {what} of up to {longest} tokens (its "
                            f"_stats.json); raise data.seq_length to at least {least}{shorter}")
        elif longest is not None and not config.data.packed and length > 2 * longest:
            logger.warning("data.seq_length=%d pads every row to %d tokens, while %s's longest sample has %d: most of "
                           "the computed tokens would be padding (lower data.seq_length)", length, length, prefix,
                           longest)
    return problems


def _data_files(prefix: str, kind: str) -> List[str]:
    """The files launch/preprocess.py writes for a prefix of this kind of stage."""
    from acemath_mcore.data.indexed import LOSS_MASK_SUFFIX, RM_LABELS_SUFFIX

    extra = [f"{LOSS_MASK_SUFFIX}.bin", f"{LOSS_MASK_SUFFIX}.idx"] if kind == "sft" else [RM_LABELS_SUFFIX]
    return [prefix + suffix for suffix in (".bin", ".idx", *extra)]


def _missing_files(prefix: str, kind: str) -> List[str]:
    return [path for path in _data_files(prefix, kind) if not Path(path).is_file()]


def _written_by(prefix: str, kind: str) -> str:
    """How to write the prefix, or that it is the other kind's data."""
    other = "rm" if kind == "sft" else "sft"
    if not _missing_files(prefix, other):
        return f"it is {other.upper()} data: write {kind.upper()} data with launch/preprocess.py {kind}"
    return f"write it with launch/preprocess.py {kind} --output {prefix}"


def _shown(value) -> str:
    return "none" if value is None else str(value)


def _layout_problems(config: TrainConfig, arch: ModelArch) -> List[str]:
    parallel = config.parallel
    problems = [f"parallel.{problem}" for problem in parallel.size_problems()]
    if problems:
        return problems  # the checks below divide by them
    try:
        arch.check_tensor_parallel(parallel.tensor_parallel)
    except ValueError as error:
        problems.append(f"parallel.{error}")
    pp, vpp = parallel.pipeline_parallel, parallel.virtual_pipeline_parallel or 1
    if arch.num_layers % (pp * vpp):
        problems.append(f"parallel.pipeline_parallel={pp}" + (f" x virtual_pipeline_parallel={vpp}" if vpp > 1 else "")
                        + f" does not divide the model's num_layers={arch.num_layers}")
    if parallel.virtual_pipeline_parallel is not None and pp < 2:
        problems.append("parallel.virtual_pipeline_parallel needs pipeline_parallel >= 2")
    if parallel.virtual_pipeline_parallel == 1:
        problems.append("parallel.virtual_pipeline_parallel=1: use null (no interleaving) or at least 2 model "
                        "chunks per pipeline stage")
    data = config.data
    row = data.seq_length * (config.micro_batch_size if data.packed else 1)  # a packed micro-batch is one row
    if row % _row_multiple(config):
        problems.append(f"data.seq_length={data.seq_length}: with parallel.sequence_parallel megatron splits each row's "
                        f"{row} tokens over the tensor_parallel={parallel.tensor_parallel} ranks; use a multiple of "
                        f"{parallel.tensor_parallel}")
    if parallel.context_parallel != 1:
        problems.append(f"parallel.context_parallel={parallel.context_parallel}: context parallelism is not supported "
                        "(the data path does not split sequences across CP ranks); use 1, and tensor parallelism "
                        "with sequence parallelism or recompute for long sequences")
    return problems


def _resume_layout_problems(config: TrainConfig, checkpoint: Path, world_size: Optional[int]) -> List[str]:
    """A resume whose optimizer state was saved for another model-parallel layout, or (``world_size`` known) for
    other gradient buckets (the trainer would refuse it after building the model on every GPU)."""
    from acemath_mcore.training.checkpoint_dirs import (
        bound_model_parallel,
        bucket_bound_problem,
        layout_bound_problem,
        read_optimizer_layout,
    )

    if checkpoint.parent != Path(config.checkpoint.save_dir or ""):
        return []  # a weights-only start
    bound = bound_model_parallel(checkpoint, config.optim.use_distributed_optimizer)
    if bound is None:
        return []
    parallel = config.parallel
    problem = layout_bound_problem(checkpoint, bound, {
        "tensor_parallel": parallel.tensor_parallel, "pipeline_parallel": parallel.pipeline_parallel,
        "virtual_pipeline": parallel.virtual_pipeline_parallel or 1})
    if problem is None:
        known = world_size is not None and not world_size % parallel.model_parallel_size()
        problem = bucket_bound_problem(checkpoint, read_optimizer_layout(checkpoint)["layout"],
                                       parallel.data_parallel_size(world_size) if known else None,
                                       config.optim.overlap_grad_reduce)
    return [f"parallel: {problem}"] if problem else []


def starting_checkpoint(config: TrainConfig) -> Optional[Path]:
    """The checkpoint the stage's weights come from: the save dir's ``latest`` when it resumes, else
    ``checkpoint.init_from`` (a dist checkpoint, or a save dir whose ``latest`` names one); None for random
    weights or a path that does not exist yet (the trainer reports that when it loads)."""
    from acemath_mcore.training.checkpoint_dirs import find_latest

    ckpt = config.checkpoint
    latest = find_latest(ckpt.save_dir) if ckpt.save_dir and ckpt.resume and Path(ckpt.save_dir).is_dir() else None
    if latest is not None:
        return latest
    if not ckpt.init_from:
        return None
    path = Path(ckpt.init_from)
    if (path / "metadata.json").is_file():
        return path
    return find_latest(path) if path.is_dir() else None


def _prefix_stats(prefix: str, key: str, required: bool = True):
    """``key`` of what launch/preprocess.py recorded in ``<prefix>_stats.json``; None when the prefix has no stats
    file (data written by another tool), or has no such entry and it is not ``required`` (an older stats file)."""
    path = Path(prefix + "_stats.json")
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
        return recorded[key] if required else recorded.get(key)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a stats file of launch/preprocess.py (no {key!r} entry: {error!r})") from None


def prefix_tokenizer(prefix: str) -> Optional[dict]:
    """The tokenizer description recorded for ``prefix`` (None: no stats file)."""
    return _prefix_stats(prefix, "tokenizer")


def data_prompt_format(prefixes: Iterable[str]) -> Optional[PromptFormat]:
    """The chat template and system prompt every prefix was rendered with, as their stats files record; None (and
    a warning) when some prefix has no record or they differ: then no format is recorded for the model."""
    formats = {}
    for prefix in prefixes:
        config = _prefix_stats(prefix, "config")
        if config is None:
            logger.warning("%s has no _stats.json: the save dir records no prompt format (scoring and evaluation "
                           "then need --template / --system-prompt)", prefix)
            return None
        formats[prefix] = PromptFormat(config["template"], config.get("system_prompt"))
    if len(set(formats.values())) > 1:
        logger.warning("the data prefixes were rendered with different prompt formats (%s): the save dir records "
                       "none, so scoring and evaluation need --template / --system-prompt",
                       "; ".join(f"{prefix}: {fmt.template}, system prompt {fmt.system_prompt!r}"
                                 for prefix, fmt in formats.items()))
        return None
    return next(iter(formats.values()), None)


def data_tokenizer_problems(prefixes: Iterable[str], arch: ModelArch, assets: Optional[Path]) -> List[str]:
    """The data must come from one tokenizer, fit the model's embedding rows, and match the tokenizer in the
    starting checkpoint's ``assets`` (its ``hf_assets`` directory), when those are known."""
    problems, described = [], {}
    for prefix in prefixes:
        try:
            description = prefix_tokenizer(prefix)
        except ValueError as error:
            problems.append(f"data.prefixes: {error}")
            continue
        if description is None:
            logger.warning("%s has no _stats.json: its tokenizer is not checked against the model before training "
                           "(token ids beyond the vocabulary still stop the run at the first batch holding one)",
                           prefix)
            continue
        described[prefix] = description
        if description["vocab_size"] > arch.padded_vocab_size:
            problems.append(f"data.prefixes: {prefix} was tokenized with {_named(description)}, more ids than the "
                            f"model's {arch.padded_vocab_size} embedding rows: re-run launch/preprocess.py with the "
                            "model's tokenizer")
    if len({_identity(d) for d in described.values()}) > 1:
        problems.append("data.prefixes: the prefixes come from different tokenizers: "
                        + "; ".join(f"{prefix}: {_named(d)}" for prefix, d in described.items()))
    model_tokenizer = _assets_tokenizer(assets) if described and assets is not None else None
    if model_tokenizer is not None:
        for prefix, description in described.items():
            if _identity(description) != _identity(model_tokenizer):
                problems.append(f"data.prefixes: {prefix} was tokenized with {_named(description)}, but the starting "
                                f"checkpoint's tokenizer is {_named(model_tokenizer)}: re-run launch/preprocess.py "
                                f"with --tokenizer {model_tokenizer['name']}")
    return problems


def _identity(description: dict) -> tuple:
    return tuple(description.get(key) for key in TOKENIZER_IDENTITY)


def _named(description: dict) -> str:
    specials = ", ".join(f"{key} {description.get(key)}" for key in TOKENIZER_IDENTITY[1:]
                         if description.get(key) is not None)
    return f"{description['name']} ({description['vocab_size']} ids{', ' + specials if specials else ''})"


def _assets_tokenizer(assets: Path) -> Optional[dict]:
    """The description of the tokenizer in a checkpoint's ``hf_assets`` (copied from the HF model it was
    converted from); None when they hold none."""
    from acemath_mcore.data.tokenizers import load_tokenizer

    if not any((assets / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    try:
        return load_tokenizer(assets).describe()
    except ImportError as error:  # a Hugging Face tokenizer needs transformers (the hf extra)
        logger.warning("cannot load the starting checkpoint's tokenizer %s (%s): the data is not compared with it",
                       assets, error)
        return None
