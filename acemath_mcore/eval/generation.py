"""Batched, KV-cached text generation with the Megatron model itself (greedy or sampled), tensor-parallel aware.

The key/value cache is megatron-core's ``StaticInferenceContext``: every attention layer appends its keys and
values to a preallocated buffer and attends over all of it, so a step costs one token per row instead of a
re-run of the sequence. Rows of a batch share positions (the classic Megatron loop): the batch is prefilled up
to its shortest prompt, then advances one position at a time; a row still inside its prompt keeps its prompt
token, a row past it takes the sampled one. Prompts are sorted by length so a batch wastes few of those steps,
and finished rows are compacted out of the batch (and out of the cache) so long generations do not carry them.

Every tensor-parallel rank computes the same full-vocabulary logits; the sampled tokens are broadcast from the
first TP rank so all ranks keep feeding identical inputs. Pipeline parallelism is not supported here (use TP).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, List, Optional, Sequence

import torch

from acemath_mcore.models.arch import ModelArch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy decoding (pass@1 in the paper); otherwise softmax sampling after the optional
    top-k and nucleus (top-p) cuts."""

    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Generation:
    """The new tokens of one row, without the stop token that ended it (``finish_reason`` says which ended it:
    ``stop`` for a stop token, ``length`` for the token budget or the context limit)."""

    token_ids: List[int]
    finish_reason: str


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token per row from fp32 logits ``[rows, vocab]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth_largest = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# Rows of one memory-sized batch at most: the sampling's per-row work grows with the rows while the weights are
# read once per step either way, so past a few hundred rows a decoding step gains little.
MAX_AUTO_BATCH_ROWS = 512

# Bytes per vocabulary entry of one row's last-position logits beyond the model's own output: the fp32 copy, the
# temperature-scaled copy, the top-p sort's values and int64 indices, its softmax, cumulative sum and masks.
_SAMPLING_BYTES_PER_LOGIT = 40


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
    """Device bytes one row of a batch needs on one tensor-parallel rank while it is decoded, so a batch can be
    sized to the memory the weights leave (``--batch-size auto``).

    ``cache_bytes_per_position``: the keys and values megatron's ``StaticInferenceContext`` preallocates for
    every layer and position (exact). ``prefill_bytes_per_token``: the activations one layer keeps alive while the
    prompt runs through it (estimated: residual stream, norm, projections, rotary copies, SwiGLU's input, SiLU and
    product).
    ``logits_bytes``: the last position's logits, gathered over TP, and the sampling's copies of them."""

    cache_bytes_per_position: int
    prefill_bytes_per_token: int
    logits_bytes: int

    @classmethod
    def of(cls, arch: ModelArch, tensor_parallel: int, dtype: torch.dtype) -> "DecodeMemory":
        element = torch.finfo(dtype).bits // 8
        heads = arch.num_attention_heads // tensor_parallel
        groups = arch.num_query_groups // tensor_parallel
        qkv = (heads + 2 * groups) * arch.kv_channels
        # fc1's output holds SwiGLU's two halves; SiLU of one and its product with the other are two more.
        activations = 4 * arch.hidden_size + 2 * qkv + 4 * arch.ffn_hidden_size // tensor_parallel
        vocab = arch.padded_vocab_size
        return cls(cache_bytes_per_position=2 * arch.num_layers * groups * arch.kv_channels * element,
                   prefill_bytes_per_token=activations * element,
                   logits_bytes=vocab // tensor_parallel * element + vocab * (element + _SAMPLING_BYTES_PER_LOGIT))

    def row_bytes(self, prompt_length: int, total_length: int) -> int:
        """One row whose prompt has ``prompt_length`` tokens, decoded up to ``total_length`` positions."""
        return (total_length * self.cache_bytes_per_position + prompt_length * self.prefill_bytes_per_token
                + self.logits_bytes)


def check_row_fits(prompt_length: int, max_new_tokens: int, max_sequence_length: int, memory: DecodeMemory,
                   budget: int) -> int:
    """The bytes of one row of ``prompt_length`` prompt tokens; a ValueError naming the numbers and what to change
    when that alone exceeds ``budget``."""
    row_bytes = memory.row_bytes(prompt_length, min(prompt_length + max_new_tokens, max_sequence_length))
    if row_bytes > budget:
        raise ValueError(
            f"one row of a {prompt_length}-token prompt and up to {max_new_tokens} new tokens needs "
            f"{row_bytes / 2**30:.2f} GiB on each rank for its key/value cache and activations, and "
            f"{budget / 2**30:.2f} GiB are left for decoding: lower --max-new-tokens, raise --tensor-parallel, "
            "or give --batch-size a number")
    return row_bytes


def memory_sized_batches(sorted_lengths: Sequence[int], max_new_tokens: int, max_sequence_length: int,
                         memory: DecodeMemory, budget: int, max_rows: int) -> List[range]:
    """Cut length-sorted prompts (ascending) into consecutive batches of at most ``max_rows``, each as long as
    its rows fit ``budget`` bytes, every row counted at the cost of the batch's longest (the cache is allocated
    for the longest row's positions in every row)."""
    batches: List[range] = []
    start = 0
    for end, length in enumerate(sorted_lengths, start=1):
        row_bytes = check_row_fits(length, max_new_tokens, max_sequence_length, memory, budget)
        if end - start > max_rows or (end - start) * row_bytes > budget:
            batches.append(range(start, end - 1))
            start = end - 1
    if start < len(sorted_lengths):
        batches.append(range(start, len(sorted_lengths)))
    return batches


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of batch ``batch`` of a call seeded ``seed``, unrelated to every other pair. Callers space
    their calls' seeds by strides (chunks, data-parallel ranks); ``seed + batch`` let a long call's batch reach
    another call's seed, and the two batches then drew the same random numbers."""
    digest = hashlib.blake2b(f"{seed}:{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class MegatronGenerator:
    """Generates with one evaluation-mode GPT model chunk (PP=1, any TP) inside an initialised parallel state.

    Batches hold ``max_batch_size`` rows, or, with a ``memory_budget`` (bytes per rank), as many rows (up to
    ``max_batch_size``) as :class:`DecodeMemory` says fit in it: short prompts and budgets then decode in larger
    batches than long ones."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch, stop_ids: Sequence[int], max_batch_size: int = 32,
                 max_sequence_length: Optional[int] = None, memory_budget: Optional[int] = None):
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("generation runs without pipeline parallelism (PP=1); split the model with TP instead")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.arch = model.eval(), arch
        self.stop_ids = sorted(set(stop_ids))
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length or arch.max_position_embeddings
        self.memory_budget = memory_budget
        self._tp_group = parallel_state.get_tensor_model_parallel_group()
        self._tp_source = parallel_state.get_tensor_model_parallel_src_rank()
        self._tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.memory = DecodeMemory.of(arch, self._tp_size, next(model.parameters()).dtype)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None) -> List[Generation]:
        """One generation per prompt, in prompt order. Batches are formed from length-sorted prompts, and batch
        ``i`` samples from a generator seeded with ``batch_seed(seed, i)``, so a run is reproducible for the same inputs (and
        the same ``memory_budget``). ``progress(done, total)`` is called after each batch."""
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            if len(prompt) >= self.max_sequence_length:
                raise ValueError(f"prompt {index} has {len(prompt)} tokens; the context holds "
                                 f"{self.max_sequence_length}, leaving no room to generate")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: List[Optional[Generation]] = [None] * len(prompts)
        done = 0
        for batch_number, rows in enumerate(self.batches([len(prompts[i]) for i in order], params.max_new_tokens)):
            rows = [order[position] for position in rows]
            for row, generation in zip(rows, self._generate_batch([prompts[i] for i in rows], params,
                                                                  batch_seed(seed, batch_number))):
                results[row] = generation
            done += len(rows)
            if progress is not None:
                progress(done, len(order))
        return results  # type: ignore[return-value]

    def rows_that_fit(self, prompt_length: int, max_new_tokens: int) -> int:
        """Rows of ``prompt_length`` prompt tokens one batch may hold under the ``memory_budget`` (a ValueError
        when not even one fits)."""
        row_bytes = check_row_fits(prompt_length, max_new_tokens, self.max_sequence_length, self.memory,
                                   self.memory_budget)
        return min(self.max_batch_size, self.memory_budget // row_bytes)

    def batches(self, sorted_lengths: Sequence[int], max_new_tokens: int) -> List[range]:
        """Positions in ``sorted_lengths`` (prompt lengths, ascending) of each batch."""
        if self.memory_budget is None:
            return [range(start, min(start + self.max_batch_size, len(sorted_lengths)))
                    for start in range(0, len(sorted_lengths), self.max_batch_size)]
        return memory_sized_batches(sorted_lengths, max_new_tokens, self.max_sequence_length, self.memory,
                                    self.memory_budget, self.max_batch_size)

    @torch.no_grad()
    def _generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        seed: int) -> List[Generation]:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = next(self.model.parameters()).device
        prompt_lengths = torch.tensor([len(p) for p in prompts])
        limits = torch.clamp(prompt_lengths + params.max_new_tokens, max=self.max_sequence_length)
        total_length = int(limits.max())
        tokens = torch.zeros(len(prompts), total_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt)
        tokens, prompt_lengths, limits = tokens.to(device), prompt_lengths.to(device), limits.to(device)
        slots = torch.arange(len(prompts), device=device)  # the prompt each batch slot holds
        stop_ids = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        generator = None if params.greedy else torch.Generator(device=device).manual_seed(seed)
        results: List[Optional[Generation]] = [None] * len(prompts)

        context = StaticInferenceContext(len(prompts), total_length)
        previous = 0
        shortest, longest = min(map(len, prompts)), max(map(len, prompts))
        for current in range(shortest, total_length):
            if previous >= longest:  # every prompt is in the cache: one new token per row from here on
                context.enable_decode_mode()
            next_tokens = self._next_tokens(tokens[:, previous:current], context, params, generator)
            context.sequence_len_offset += current - previous
            previous = current
            generating = current >= prompt_lengths
            tokens[:, current] = torch.where(generating, next_tokens, tokens[:, current])
            hit_stop = generating & torch.isin(next_tokens, stop_ids)
            finished = hit_stop | (generating & (current + 1 >= limits))
            if not bool(finished.any()):
                continue
            for slot in finished.nonzero().squeeze(-1).tolist():
                stop = bool(hit_stop[slot])
                new_tokens = tokens[slot, int(prompt_lengths[slot]):current + (0 if stop else 1)]
                results[int(slots[slot])] = Generation(new_tokens.tolist(), "stop" if stop else "length")
            if bool(finished.all()):
                break
            keep = (~finished).nonzero().squeeze(-1)
            _keep_cache_rows(context, keep)
            tokens, prompt_lengths, limits, slots = tokens[keep], prompt_lengths[keep], limits[keep], slots[keep]
        return results  # type: ignore[return-value]

    def _next_tokens(self, tokens: torch.Tensor, context, params: SamplingParams,
                     generator: Optional[torch.Generator]) -> torch.Tensor:
        """Feed ``tokens`` (the positions after the cached ones) and pick each row's next token, identically on
        every TP rank."""
        start = context.sequence_len_offset
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        # Static inference materialises only the last position's logits, gathered over TP: [rows, 1, vocab].
        logits = self.model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
        logits = logits[:, -1, : self.arch.vocab_size].float()
        next_tokens = sample_next(logits, params, generator)
        if self._tp_size > 1:
            torch.distributed.broadcast(next_tokens, self._tp_source, group=self._tp_group)
        return next_tokens


def _keep_cache_rows(context, keep: torch.Tensor) -> None:
    """Move the cached keys/values of the batch slots ``keep`` to the front (attention reads the first
    ``batch`` slots of the buffers), dropping finished rows from later steps."""
    for key_memory, value_memory in context.key_value_memory_dict.values():
        key_memory[:, : len(keep)] = key_memory[:, keep]
        value_memory[:, : len(keep)] = value_memory[:, keep]

