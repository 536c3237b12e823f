"""Hugging Face safetensors -> megatron ``torch_dist`` checkpoint that the trainer's ``load_weights`` reads.

One CPU process per TP x PP rank builds its model chunk(s) with the project's builder, fills them with its
shards of the HF tensors (read one at a time, fused and padded by the family's weight rules) and all ranks
save through ``dist_checkpointing``. The result stores global tensors, so it loads at any TP/PP/VPP layout.
A one-label ``*ForSequenceClassification`` input (a published reward model) becomes our reward model, its
``score`` head the scalar head.

Output directory::

    OUT/  metadata.json .metadata common.pt __*.distcp   the dist checkpoint (pass OUT as init_from)
          model_arch.json  hf_config.json                  what convert_to_hf needs to rebuild the HF model
          hf_assets/                                       tokenizer / generation config copied from the input
          prompt_format.json                               when given: the chat template and system prompt
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import torch

from acemath_mcore.convert.hf_files import HFCheckpoint, copy_assets
from acemath_mcore.convert.megatron_files import ASSETS_DIR, write_model_description, write_prompt_format
from acemath_mcore.convert.output_dir import staged_output_dir
from acemath_mcore.data.chat_templates import PromptFormat
from acemath_mcore.options import ParallelConfig
from acemath_mcore.runtime.local_workers import run_local_workers

logger = logging.getLogger("acemath_mcore")

PARAM_DTYPES = ("auto", "fp32", "bf16")


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tensor_parallel: int = 1,
                           pipeline_parallel: int = 1, virtual_pipeline_parallel: Optional[int] = None,
                           dtype: str = "auto", overwrite: bool = False,
                           prompt_format: Optional[PromptFormat] = None) -> Path:
    """Convert and return the checkpoint directory. ``dtype`` is fp32, bf16 or auto (the HF weights' own).
    ``prompt_format``: how the model was trained to read prompts (e.g. AceMath-RM: chatml with its system
    prompt), recorded as a trainer records its data's, so scoring and evaluation default to it."""
    source = HFCheckpoint(hf_dir)  # every input error surfaces here, before any process starts
    parallel = ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                              virtual_pipeline_parallel=virtual_pipeline_parallel)
    source.arch.check_layout(parallel)
    bf16 = _wants_bf16(dtype, source)
    world_size = tensor_parallel * pipeline_parallel
    logger.info("converting %s (%s%s, %d layers) with %d CPU process(es): TP=%d PP=%d VPP=%s, %s parameters",
                source.path, source.arch.family, " reward model" if source.reward_model else "",
                source.arch.num_layers, world_size, tensor_parallel, pipeline_parallel, virtual_pipeline_parallel,
                "bf16" if bf16 else "fp32")
    with staged_output_dir(out_dir, overwrite) as staging:
        run_local_workers(_convert_worker, world_size, str(source.path), str(staging), parallel, bf16)
        write_model_description(staging, source.arch, source.config)
        copy_assets(source.path, staging / ASSETS_DIR)
        if prompt_format is not None:
            write_prompt_format(staging, prompt_format, [])
    return Path(out_dir)


def _wants_bf16(dtype: str, source: HFCheckpoint) -> bool:
    if dtype == "auto":
        stored = source.stored_dtype()
        if stored == torch.float16:
            raise ValueError(f"{source.path} stores fp16 weights; choose the parameter dtype: --dtype bf16 or fp32")
        return stored == torch.bfloat16
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    return dtype == "bf16"


def _convert_worker(rank: int, world_size: int, hf_dir: str, out_dir: str, parallel: ParallelConfig,
                    bf16: bool) -> None:
    from acemath_mcore.runtime import destroy_distributed, init_distributed

    init_distributed(parallel)
    try:
        save_rank_shards(HFCheckpoint(hf_dir), out_dir, parallel, bf16)
    finally:
        destroy_distributed()


def save_rank_shards(source: HFCheckpoint, out_dir: str | Path, parallel: ParallelConfig,
                     bf16: bool) -> List[torch.nn.Module]:
    """This rank's share of a conversion, inside an initialised megatron parallel state; every rank of the
    world must call it (collective save). Returns the filled model chunks."""
    from megatron.core import dist_checkpointing, parallel_state

    from acemath_mcore.convert.megatron_model import build_weightless_model
    from acemath_mcore.models.weights import load_full_weights
    from acemath_mcore.training.checkpointing import model_sharded_state_dict

    chunks = build_weightless_model(source.arch, parallel, bf16=bf16, reward=source.reward_model)
    weights = source.megatron_weights()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        load_full_weights(chunk, weights, tp_rank, parallel.tensor_parallel)
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(out_dir))
    return chunks
