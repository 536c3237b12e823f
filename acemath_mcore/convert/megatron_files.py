"""Megatron ``torch_dist`` checkpoints as the converters see them: where they are, what model they hold, and
their tensors one decoder layer at a time.

dist_checkpointing stores *global* tensors under the canonical names without a layer index: the decoder layers
are stacked along a leading axis (``decoder.layers.mlp.linear_fc1.weight`` has shape ``[num_layers, ...]``),
each layer of each TP rank saved as its own chunk. Asking for the slice ``[i]`` of every stacked tensor therefore
reads exactly layer ``i`` from disk, whatever TP/PP/VPP layout wrote it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from acemath_mcore.data.chat_templates import PromptFormat
from acemath_mcore.models.arch import ModelArch
from acemath_mcore.training.checkpoint_dirs import resolve_checkpoint_dir

ARCH_FILE = "model_arch.json"
HF_CONFIG_FILE = "hf_config.json"
ASSETS_DIR = "hf_assets"
PROMPT_FORMAT_FILE = "prompt_format.json"
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def holds_reward_head(checkpoint: Path) -> bool:
    """Whether a dist checkpoint is a reward model's (its scalar head, where a language model has its LM head)."""
    from acemath_mcore.models.families import REWARD_HEAD_WEIGHT

    return DistCheckpointReader(checkpoint).global_shape(REWARD_HEAD_WEIGHT) is not None


def write_model_description(directory: Path, arch: ModelArch, hf_config: Optional[Dict] = None) -> None:
    """Record the architecture (and the source HF config, when converting) beside the weights, so export and
    evaluation need no other input."""
    (directory / ARCH_FILE).write_text(json.dumps(dataclasses.asdict(arch), indent=2) + "\n")
    if hf_config is not None:
        (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


def find_model_description(checkpoint: Path) -> Tuple[Optional[ModelArch], Optional[Dict], Optional[Path]]:
    """(arch, original HF config, HF assets dir) recorded by the converter, looked up in the checkpoint and in
    its parent (a save dir holding ``iter_*`` directories); None where absent."""
    for directory in (checkpoint, checkpoint.parent):
        if (directory / ARCH_FILE).is_file():
            arch = ModelArch(**json.loads((directory / ARCH_FILE).read_text()))
            hf_config_path = directory / HF_CONFIG_FILE
            hf_config = json.loads(hf_config_path.read_text()) if hf_config_path.is_file() else None
            assets = directory / ASSETS_DIR
            return arch, hf_config, assets if assets.is_dir() else None
    return None, None, None


def write_prompt_format(directory: Path, prompt_format: Optional[PromptFormat], prefixes: List[str]) -> None:
    """Record the format of the data a save dir's model is trained on (None: not one known format, and an
    earlier stage's record is removed), for scoring and evaluation to default to."""
    path = directory / PROMPT_FORMAT_FILE
    if prompt_format is None:
        path.unlink(missing_ok=True)
        return
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**dataclasses.asdict(prompt_format), "data": prefixes}, indent=2) + "\n")


def prompt_format_file(checkpoint: Path, with_save_dir: bool = True) -> Optional[Path]:
    """The ``prompt_format.json`` of a checkpoint (an exported HF dir included), else, with ``with_save_dir``, of
    its save dir (a trainer's ``iter_N``); None when there is none."""
    for directory in (checkpoint, checkpoint.parent) if with_save_dir else (checkpoint,):
        if (directory / PROMPT_FORMAT_FILE).is_file():
            return directory / PROMPT_FORMAT_FILE
    return None


def find_prompt_format(checkpoint: Path, with_save_dir: bool = True) -> Optional[PromptFormat]:
    """The training data's format recorded for a checkpoint (None: not recorded)."""
    path = prompt_format_file(checkpoint, with_save_dir)
    if path is None:
        return None
    record = json.loads(path.read_text())
    return PromptFormat(record["template"], record.get("system_prompt"))


def checkpoint_model_and_tokenizer(checkpoint: str | Path, model: Optional[str] = None,
                                   tokenizer: Optional[str] = None) -> Tuple[Path, ModelArch, str]:
    """(dist checkpoint dir, architecture, tokenizer path) for a tool that reads a checkpoint (evaluate, score):
    the recorded architecture unless ``--model`` names one (then both must agree), and the tokenizer of the
    checkpoint's HF assets unless ``--tokenizer`` names one."""
    from acemath_mcore.models import resolve_arch

    directory = resolve_checkpoint_dir(checkpoint)
    recorded, _, assets = find_model_description(directory)
    try:
        arch = resolve_arch(model) if model else recorded
        if model:
            arch.check_matches(recorded, f"{checkpoint} (model_arch.json)")
    except ValueError as error:
        raise ValueError(f"--model: {error}; leave --model out to use the recorded one") from None
    if arch is None:
        raise ValueError(f"{checkpoint} records no model shapes (model_arch.json); pass --model")
    tokenizer = tokenizer or (str(assets) if assets else None)
    if tokenizer is None:
        raise ValueError(f"--tokenizer is required: {checkpoint} carries no tokenizer (no {ASSETS_DIR} beside it)")
    return directory, arch, tokenizer


@contextlib.contextmanager
def reading_process_group():
    """megatron's ``dist_checkpointing.load`` needs a process group even in one process: provide a private
    one-rank gloo group when the caller has none (and remove it afterwards)."""
    if torch.distributed.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = torch.distributed.FileStore(os.path.join(tmp, "store"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()


def split_layer_name(name: str) -> Tuple[str, Optional[int]]:
    """Canonical name -> (dist-checkpoint key, layer index or None), e.g. ``decoder.layers.3.x`` ->
    (``decoder.layers.x``, 3)."""
    match = _LAYER_NAME.match(name)
    return (f"decoder.layers.{match.group(2)}", int(match.group(1))) if match else (name, None)


class DistCheckpointReader:
    """Loads canonical tensors (global layer index in the name) from a torch_dist checkpoint in its stored dtype.

    Use inside :func:`reading_process_group` (or any initialised process group).
    """

    def __init__(self, checkpoint: Path):
        from megatron.core import dist_checkpointing

        self.path = Path(checkpoint)
        self._metadata = dist_checkpointing.load_tensors_metadata(str(self.path))

    def keys(self) -> List[str]:
        return list(self._metadata)

    def global_shape(self, name: str) -> Optional[tuple]:
        """Shape of a canonical tensor as stored (a layer's own shape for layer tensors); None if absent."""
        key, layer = split_layer_name(name)
        if key not in self._metadata:
            return None
        shape = tuple(self._metadata[key].global_shape)
        return shape if layer is None else shape[1:]

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._metadata[split_layer_name(name)[0]].dtype

    def num_stacked_layers(self) -> Optional[int]:
        shapes = {tuple(t.global_shape)[0] for k, t in self._metadata.items() if k.startswith("decoder.layers.")}
        return shapes.pop() if len(shapes) == 1 else None

    def load(self, names: List[str]) -> Dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.validation import StrictHandling

        request = {}
        for name in names:
            key, layer = split_layer_name(name)
            stored = self._metadata[key]
            shape = tuple(stored.global_shape)
            if layer is None:
                request[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=stored.dtype),
                                                                replica_id=0)
            else:  # a [1, ...] slab at offset `layer` of the stacked axis (no prepended axis: any world size)
                request[name] = ShardedTensor.from_rank_offsets(
                    key, torch.empty((1, *shape[1:]), dtype=stored.dtype), (0, layer, shape[0]), replica_id=0)
        # One layer is deliberately a partial read of each stacked tensor: skip the whole-tensor coverage check.
        loaded = dist_checkpointing.load(request, str(self.path), validate_access_integrity=False,
                                         strict=StrictHandling.ASSUME_OK_UNEXPECTED)
        return {name: tensor if split_layer_name(name)[1] is None else tensor[0] for name, tensor in loaded.items()}
