"""Generation backends for the evaluation harness: our Megatron checkpoints (the default, any TP, data parallel
over the remaining ranks), Hugging Face transformers for exported checkpoints, and vLLM when it is installed.

All three take the same token-id prompts (rendered by our chat templates), so a model scores the same prompts
whichever backend runs it, and return :class:`~acemath_mcore.eval.generation.Generation` lists.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import torch

from acemath_mcore.eval.generation import (
    MAX_AUTO_BATCH_ROWS,
    Generation,
    MegatronGenerator,
    SamplingParams,
    batch_seed,
)
from acemath_mcore.models.arch import ModelArch
from acemath_mcore.runtime import device as device_lib

logger = logging.getLogger(__name__)

# Seeds of different data-parallel ranks are this far apart; each batch's seed is then mixed from its call's
# (generation.batch_seed), so no two batches of a run draw from the same generator state.
_SEED_STRIDE = 1_000_003


def _truncate_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int], budget: int) -> Generation:
    """A backend's raw continuation cut at its first stop token (dropped) and at the token budget."""
    for position, token in enumerate(token_ids[:budget]):
        if token in stop_ids:
            return Generation(list(token_ids[:position]), "stop")
    return Generation(list(token_ids[:budget]), "length")


# The share of the memory left after loading the weights that ``--batch-size auto`` lets decoding take; the rest
# absorbs what the estimate leaves out (allocator fragmentation as batch shapes change, kernel workspaces).
AUTO_BATCH_MEMORY_FRACTION = 0.8


class MegatronBackend:
    """A trainer or converter checkpoint loaded at the current TP size; prompts are split over data-parallel
    ranks and the results gathered on the writer (global rank 0; the other ranks get an empty list). Must run
    inside an initialised parallel state.

    ``max_batch_size="auto"``: each batch takes as many rows as fit in ``AUTO_BATCH_MEMORY_FRACTION`` of the
    memory the weights leave on the fullest rank (:class:`~acemath_mcore.eval.generation.DecodeMemory`)."""

    def __init__(self, checkpoint: str, arch: ModelArch, stop_ids: Sequence[int], bf16: bool = False,
                 max_batch_size: int | str = 32, max_sequence_length: Optional[int] = None):
        from megatron.core import parallel_state

        from acemath_mcore.convert.megatron_model import load_for_inference

        self.max_sequence_length = max_sequence_length or arch.max_position_embeddings
        model = load_for_inference(checkpoint, arch, bf16=bf16)
        self.generator = megatron_generator(model, arch, stop_ids, max_batch_size, self.max_sequence_length)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self._dp_group = parallel_state.get_data_parallel_group()
        self.is_writer = torch.distributed.get_rank() == 0
        self._told_chunk_bounds_batches = False

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int,
                 progress: Callable[[int, int], None]) -> List[Generation]:
        mine = list(range(self.dp_rank, len(prompts), self.dp_size))
        if self.generator.memory_budget is not None and prompts:
            # Every rank checks the longest prompt of all, so all stop together (a data-parallel rank stopping
            # alone would leave the others waiting in the gather below).
            room = self.generator.rows_that_fit(max(map(len, prompts)), params.max_new_tokens)
            if not self._told_chunk_bounds_batches and len(mine) < room // 2:
                self._told_chunk_bounds_batches = True
                logger.info("--batch-size auto: a generation call gives each rank %d prompts, one batch, where the "
                            "memory holds %d rows of the longest: a larger --chunk-problems decodes more rows per "
                            "step (docs/eval.md, Batch size)", len(mine), room)
        generations = self.generator.generate(
            [prompts[i] for i in mine], params, seed=seed + _SEED_STRIDE * self.dp_rank,
            progress=lambda done, total: progress(min(len(prompts), done * self.dp_size), len(prompts)))
        if self.dp_size == 1:
            return generations
        # Only the writer (global rank 0) needs the results: its data-parallel group gathers them there, and the
        # other groups (other TP ranks) keep theirs. Gathering to every rank cost each one all the responses as
        # Python objects (~1 GB for 40,000 responses of 700 tokens).
        writer = torch.distributed.get_global_rank(self._dp_group, 0)
        if writer != 0:
            return []
        gathered: list = [None] * self.dp_size if self.is_writer else None
        torch.distributed.gather_object((mine, generations), gathered, dst=writer, group=self._dp_group)
        if not self.is_writer:
            return []
        results: List[Optional[Generation]] = [None] * len(prompts)
        for indices, rank_generations in gathered:
            for index, generation in zip(indices, rank_generations):
                results[index] = generation
        return results  # type: ignore[return-value]


def megatron_generator(model: torch.nn.Module, arch: ModelArch, stop_ids: Sequence[int], batch_size: int | str,
                       max_sequence_length: Optional[int] = None) -> MegatronGenerator:
    """A generator decoding ``batch_size`` rows at a time, or, for ``"auto"``, batches cut to
    ``AUTO_BATCH_MEMORY_FRACTION`` of the memory the weights leave on the fullest rank (a collective)."""
    if batch_size != "auto":
        return MegatronGenerator(model, arch, stop_ids, batch_size, max_sequence_length)
    budget = decoding_memory_budget(next(model.parameters()).device)
    generator = MegatronGenerator(model, arch, stop_ids, MAX_AUTO_BATCH_ROWS, max_sequence_length,
                                  memory_budget=budget)
    _log_auto_batch_size(generator)
    return generator


def decoding_memory_budget(device: torch.device) -> int:
    """Bytes every rank may use for decoding: the same number on all ranks (the smallest), so the ranks of a
    tensor-parallel group cut identical batches."""
    from acemath_mcore.runtime.device import free_memory_bytes

    budget = torch.tensor([int(free_memory_bytes() * AUTO_BATCH_MEMORY_FRACTION)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(budget, op=torch.distributed.ReduceOp.MIN)
    return int(budget.item())


def _log_auto_batch_size(generator: MegatronGenerator) -> None:
    memory, context = generator.memory, generator.max_sequence_length
    full_rows = min(generator.max_batch_size, generator.memory_budget // memory.row_bytes(context, context))
    logger.info("--batch-size auto: %.1f GiB per rank for decoding (%.0f%% of the memory left after loading), "
                "key/value cache %.1f KiB per position: at least %d rows per batch (rows filling the %d-token "
                "context), at most %d", generator.memory_budget / 2**30, 100 * AUTO_BATCH_MEMORY_FRACTION,
                memory.cache_bytes_per_position / 1024, full_rows, context, generator.max_batch_size)


class HFBackend:
    """transformers ``generate`` on an exported checkpoint (``checkpoints_tools/convert_to_hf.py``), batched with
    left padding. Weights load through safetensors; remote code is never trusted."""

    is_writer = True

    def __init__(self, hf_dir: str, stop_ids: Sequence[int], pad_id: int, dtype: str = "float32",
                 device: Optional[str] = None, max_batch_size: int = 32, max_sequence_length: Optional[int] = None):
        import transformers

        self.device = device or device_lib.current_device()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=getattr(torch, dtype), trust_remote_code=False, use_safetensors=True,
            local_files_only=True).to(self.device).eval()
        # Decode with exactly the requested settings, like the other backends: transformers fills every setting
        # left unset from the checkpoint's generation_config.json (Qwen2.5-Instruct's has repetition_penalty 1.05
        # and top_k 20), then from its global defaults (top_k 50).
        self.model.generation_config = transformers.GenerationConfig()
        self.stop_ids, self.pad_id, self.max_batch_size = list(stop_ids), pad_id, max_batch_size
        self.max_sequence_length = max_sequence_length or self.model.config.max_position_embeddings

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int,
                 progress: Callable[[int, int], None]) -> List[Generation]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: List[Optional[Generation]] = [None] * len(prompts)
        for batch_number, start in enumerate(range(0, len(order), self.max_batch_size)):
            rows = order[start:start + self.max_batch_size]
            width = max(len(prompts[i]) for i in rows)
            # Each row may fill the context on its own (left padding: positions follow the attention mask), so the
            # batch runs for the shortest prompt's budget and every row is cut to its own below.
            budget = min(params.max_new_tokens, self.max_sequence_length - min(len(prompts[i]) for i in rows))
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for slot, row in enumerate(rows):
                input_ids[slot, width - len(prompts[row]):] = torch.tensor(prompts[row])
                attention_mask[slot, width - len(prompts[row]):] = 1
            torch.manual_seed(batch_seed(seed, batch_number))
            sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p,
                                                 "top_k": params.top_k}  # 0: no top-k cut, as in SamplingParams
            output = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                do_sample=not params.greedy, max_new_tokens=budget, eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id, **sampling)
            for slot, row in enumerate(rows):
                row_budget = min(params.max_new_tokens, self.max_sequence_length - len(prompts[row]))
                results[row] = _truncate_at_stop(output[slot, width:].tolist(), self.stop_ids, row_budget)
            progress(min(start + self.max_batch_size, len(order)), len(order))
        return results  # type: ignore[return-value]


class VLLMBackend:
    """vLLM on an exported checkpoint, when ``vllm`` is importable (it is not a dependency of this package)."""

    is_writer = True

    def __init__(self, hf_dir: str, stop_ids: Sequence[int], dtype: str = "float32", tensor_parallel: int = 1,
                 max_sequence_length: Optional[int] = None, seed: int = 0):
        try:
            import vllm
        except ImportError:
            raise SystemExit("--backend vllm needs the vllm package; use --backend hf or megatron") from None
        self._vllm = vllm
        self.llm = vllm.LLM(model=hf_dir, dtype=dtype, tensor_parallel_size=tensor_parallel,
                            max_model_len=max_sequence_length, trust_remote_code=False, seed=seed)
        self.stop_ids = list(stop_ids)
        self.max_sequence_length = max_sequence_length or self.llm.llm_engine.model_config.max_model_len

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int,
                 progress: Callable[[int, int], None]) -> List[Generation]:
        # No per-request seed: the n copies of a prompt must draw different samples (the engine is seeded).
        sampling = self._vllm.SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
            max_tokens=params.max_new_tokens, stop_token_ids=self.stop_ids)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling)
        progress(len(prompts), len(prompts))
        return [_truncate_at_stop(list(o.outputs[0].token_ids), self.stop_ids, params.max_new_tokens)
                for o in outputs]
