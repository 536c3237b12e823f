"""megatron ``torch_dist`` checkpoint (converted, or a trainer's save dir) -> Hugging Face safetensors.

Streams: one decoder layer is read from the checkpoint at a time, split into HF tensors (QKV un-grouped, fc1
into gate/up, vocabulary padding dropped) and appended to the current output shard, which is written once it
reaches ``max_shard_bytes``. Peak memory is about one shard plus two layers, whatever the model size and
whatever TP/PP layout wrote the checkpoint. Optimizer, scheduler and RNG entries of trainer checkpoints are
never read. A checkpoint holding a reward head exports as ``*ForSequenceClassification`` (num_labels=1).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from acemath_mcore.convert.hf_files import CONFIG_FILE, ShardedSafetensorsWriter, copy_assets, read_hf_config
from acemath_mcore.convert.megatron_files import (
    PROMPT_FORMAT_FILE,
    DistCheckpointReader,
    find_model_description,
    find_prompt_format,
    prompt_format_file,
    reading_process_group,
)
from acemath_mcore.convert.output_dir import staged_output_dir
from acemath_mcore.data.chat_templates import PromptFormat, build_template
from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.families import FAMILIES, REWARD_HEAD_WEIGHT, TensorRule, family_for_hf_config
from acemath_mcore.training.checkpoint_dirs import resolve_checkpoint_dir

logger = logging.getLogger("acemath_mcore")

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers reads it beside the tokenizer files
OUTPUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, hf_template: Optional[str | Path] = None,
                          preset: Optional[str] = None, dtype: Optional[str] = None,
                          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                          overwrite: bool = False) -> Path:
    """Write an HF model directory from a megatron checkpoint; returns it.

    The architecture comes from ``preset``, else from the converter's ``model_arch.json`` beside the checkpoint,
    else from ``hf_template``'s config.json. ``dtype`` (fp32 / bf16) defaults to the stored precision.
    Tokenizer and generation files come from ``hf_template``, else from those the converter kept; the training
    data's ``prompt_format.json``, when the checkpoint records one, is copied too and becomes the tokenizer's chat
    template.
    """
    checkpoint = resolve_checkpoint_dir(megatron_dir)
    arch, base_config, assets = _describe(checkpoint, hf_template, preset)
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    family = FAMILIES[arch.family]
    with staged_output_dir(out_dir, overwrite) as staging, reading_process_group():
        reader = DistCheckpointReader(checkpoint)
        reward_head = REWARD_HEAD_WEIGHT if reader.global_shape(REWARD_HEAD_WEIGHT) is not None else None
        rules = family.tensor_rules(arch, reward_head=reward_head)
        _check_shapes(reader, rules, arch, checkpoint)
        out_dtype = OUTPUT_DTYPES[dtype] if dtype else reader.stored_dtype(rules[0].megatron_name)
        writer = ShardedSafetensorsWriter(staging, max_shard_bytes)
        _stream(reader, rules, arch, writer, out_dtype, progress)
        writer.finish()
        config = {**(base_config or {}),
                  **family.hf_config_from_arch(arch, torch_dtype=str(out_dtype).replace("torch.", ""),
                                               reward_model=reward_head is not None)}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if assets is not None:
            copy_assets(assets, staging)
        recorded_format = prompt_format_file(checkpoint)
        if recorded_format is not None:  # the HF and vLLM evaluation backends read it there too
            shutil.copy2(recorded_format, staging / PROMPT_FORMAT_FILE)
            prompt_format = find_prompt_format(checkpoint)
            if prompt_format.template == "plain" and assets is None:  # its bos / eos come from the tokenizer
                logger.warning("no tokenizer files to export (pass --hf-template): the plain prompt format is left "
                               "in %s only, not made a chat template", PROMPT_FORMAT_FILE)
            else:
                _write_chat_template(staging, prompt_format)
    logger.info("wrote %s: %.2f GB of %s tensors%s", out_dir, writer.total_bytes / 1e9, out_dtype,
                " (reward model)" if reward_head else "")
    return Path(out_dir)


def _write_chat_template(directory: Path, prompt_format: PromptFormat) -> None:
    """The training data's prompt format as the tokenizer's chat template (``chat_template.jinja``, and
    ``tokenizer_config.json``'s entry when there is one), replacing the base model's: ``apply_chat_template`` and
    vLLM's server then prompt the exported model as it was trained."""
    from acemath_mcore.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(directory) if prompt_format.template == "plain" else None  # its bos / eos
    jinja = build_template(prompt_format.template, tokenizer, prompt_format.system_prompt).jinja()
    (directory / CHAT_TEMPLATE_FILE).write_text(jinja)
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        settings = json.loads(tokenizer_config.read_text())
        settings["chat_template"] = jinja
        tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def _describe(checkpoint: Path, hf_template, preset) -> Tuple[ModelArch, Optional[Dict], Optional[Path]]:
    """(arch, HF config to start from, directory of tokenizer files) from whichever sources were given."""
    from acemath_mcore.models.presets import get_preset

    recorded_arch, recorded_config, recorded_assets = find_model_description(checkpoint)
    template_config = read_hf_config(Path(hf_template)) if hf_template else None
    template_arch = None
    if template_config is not None:
        template_arch = family_for_hf_config(template_config).arch_from_hf(template_config)
    arch = get_preset(preset) if preset else recorded_arch or template_arch
    if preset:
        arch.check_matches(recorded_arch, f"{checkpoint} (model_arch.json)")
    if arch is None:
        raise ValueError(f"cannot tell which model {checkpoint} holds: it has no model_arch.json (written by "
                         "convert_from_hf); pass --hf-template with the original HF directory or --preset")
    if template_arch is not None and template_arch != arch:
        raise ValueError(f"--hf-template describes {template_arch}, but the checkpoint holds {arch}")
    assets = Path(hf_template) if hf_template else recorded_assets
    return arch, template_config or recorded_config, assets


def _expected_shape(rule: TensorRule, arch: ModelArch) -> tuple:
    """Shape the rule builds from its HF shapes, computed on meta tensors (no memory, no re-declared shapes)."""
    hf = [torch.empty(shape, device="meta") for shape in rule.hf_shapes]
    return tuple(rule.to_megatron(arch, hf).shape)


def _check_shapes(reader: DistCheckpointReader, rules: List[TensorRule], arch: ModelArch, checkpoint: Path) -> None:
    stacked = reader.num_stacked_layers()
    if stacked != arch.num_layers:
        raise ValueError(f"{checkpoint} holds {stacked} decoder layers, the architecture has {arch.num_layers}")
    for rule in rules:
        stored = reader.global_shape(rule.megatron_name)
        if stored is None:
            raise ValueError(f"{checkpoint} has no tensor {rule.megatron_name}, which {arch.family} with "
                           f"tie_embeddings={arch.tie_embeddings} needs")
        expected = _expected_shape(rule, arch)
        if stored != expected:
            raise ValueError(f"{rule.megatron_name}: checkpoint shape {stored} differs from {expected} implied by "
                             "the architecture (wrong --hf-template or --preset?)")


def _stream(reader: DistCheckpointReader, rules: List[TensorRule], arch: ModelArch,
            writer: ShardedSafetensorsWriter, out_dtype: torch.dtype, progress: bool) -> None:
    from tqdm import tqdm

    groups = [list(group) for _, group in itertools.groupby(rules, key=lambda rule: rule.layer)]
    with tqdm(total=len(groups), desc="export", unit="part", disable=not progress) as bar:
        for group in groups:
            loaded = reader.load([rule.megatron_name for rule in group])
            for rule in group:
                for name, tensor in zip(rule.hf_names, rule.to_hf(arch, loaded[rule.megatron_name]), strict=True):
                    writer.add(name, tensor, out_dtype)
            del loaded
            bar.set_postfix_str(f"{writer.total_bytes / 1e9:.2f} GB")
            bar.update()
