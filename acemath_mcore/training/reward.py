"""The reward-model trainer and scorer.

Training plugs :class:`RewardTask` and group-aware batches (``acemath_mcore.data.rm_data``: a problem's responses
never straddle micro-batches or data-parallel ranks) into the shared loop of :mod:`trainer`, with the
:class:`~acemath_mcore.models.reward.RewardGPTModel` chunk builder. ``global_batch_size`` counts samples of the RM
dataset: problem groups with padded rows, bins of whole groups with packed rows. Scoring (:class:`RewardScorer`,
``launch/score.py``) runs the same model and the engine's schedule, without DDP or an optimizer, on any layout.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from megatron.core import parallel_state

from acemath_mcore.data.chat_templates import ConversationEncoder
from acemath_mcore.data.jsonl import DataError, Reason, check_encodable, parse_json_line
from acemath_mcore.data.rm_data import (
    RMGroup,
    RMGroupSample,
    build_rm_dataset,
    collate_rm_packed,
    encode_rm_group,
    problem_prompt,
    rm_dataloader,
)
from acemath_mcore.files import atomic_output
from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.builder import ModelOptions, build_model
from acemath_mcore.models.reward import RewardGPTModel, build_reward_model_chunk, response_scores
from acemath_mcore.models.specs import packed_qkv_format
from acemath_mcore.progress import ProgressLog
from acemath_mcore.recipes.checks import check_config
from acemath_mcore.recipes.config import TrainConfig
from acemath_mcore.runtime.distributed import (
    ParallelConfig,
    data_parallel_share,
    launch_rank,
    raise_on_every_rank,
    read_launch_env,
)
from acemath_mcore.training import checkpointing
from acemath_mcore.training.engine import Batch, run_schedule
from acemath_mcore.training.logging import log_on_rank_0
from acemath_mcore.training.rm_losses import check_rm_loss, rm_loss
from acemath_mcore.training.sft import sequence_lengths
from acemath_mcore.training.trainer import TrainingData, preemption_requests, run

logger = logging.getLogger("acemath_mcore")


class RewardTask:
    """Scores every response of a micro-batch at its last token and applies a group loss (see rm_losses)."""

    loss_name = "rm_loss"
    head_outputs = 1  # the scalar head, for the FLOPs count

    def __init__(self, loss: str = "listwise_bt", seed: int = 1234):
        check_rm_loss(loss)  # here, not at the first micro-batch
        self.loss_kind, self.seed = loss, seed

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # Per-token scores [b, s] on the last pipeline stage, hidden states elsewhere (run_schedule has moved the
        # batch to the device).
        return model(batch["tokens"], batch["position_ids"], None, packed_seq_params=batch.get("packed_seq_params"))

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple:
        scores = response_scores(output, batch["score_index"], packed="cu_seqlens" in batch)
        pairs = sampled_pairs(batch, self.seed) if self.loss_kind == "pairwise_bt" else None
        return rm_loss(self.loss_kind, scores, batch["labels"], batch["group_sizes"], pairs)


def sampled_pairs(batch: Batch, seed: int) -> torch.Tensor:
    """One positive-negative pair per group (``[R, R]`` bool), drawn from a generator seeded by ``seed`` and the
    group's tokens: the same pair in every epoch, at any layout or micro-batch size, and after a resume."""
    tokens = batch["tokens"].cpu().numpy()
    ends = batch["score_index"].cpu().numpy() + 1
    num_responses = len(ends)
    if "cu_seqlens" in batch:  # responses are the row's first documents
        rows, starts = np.zeros(num_responses, dtype=np.int64), batch["cu_seqlens"].cpu().numpy()[:num_responses]
    else:
        rows, starts = np.arange(num_responses), np.zeros(num_responses, dtype=np.int64)
    positive = batch["labels"].cpu().numpy() > 0.5
    pairs = np.zeros((num_responses, num_responses), dtype=bool)
    offset = 0
    for size in batch["group_sizes"].tolist():
        members = np.arange(offset, offset + size)
        offset += size
        digest = zlib.crc32(b"".join(tokens[rows[i], starts[i]:ends[i]].tobytes() for i in members))
        rng = np.random.default_rng([seed, digest])
        winners, losers = members[positive[members]], members[~positive[members]]
        if len(winners) and len(losers):
            pairs[rng.choice(winners), rng.choice(losers)] = True
    return torch.from_numpy(pairs)


def rm_training_data(config: TrainConfig, held_out: bool = False) -> TrainingData:
    """Packed (``data.packed``: samples are bins of whole groups under ``data.seq_length`` tokens) or padded
    (samples are single groups, one response per row of ``data.seq_length``) RM batches of one prefix (that there
    is exactly one is a config check)."""
    prefix = config.data.valid_prefixes[0] if held_out else config.data.prefixes[0]
    length = config.data.seq_length
    dataset = build_rm_dataset(prefix, packed_tokens=length if config.data.packed else None,
                               seq_length=None if config.data.packed else length)

    def make_loader(consumed_samples: int, dp_rank: int, dp_size: int):
        # Pipeline stages exchange activations of one shape, and CUDA graphs replay one: padded micro-batches then
        # all get the rows of the largest group (fewer-response groups are topped up with unscored padding rows).
        return iter(rm_dataloader(dataset, pad_id=0, global_batch_size=config.global_batch_size,
                                  micro_batch_size=config.micro_batch_size, seq_length=length, dp_rank=dp_rank,
                                  dp_size=dp_size, seed=config.seed, consumed_samples=consumed_samples,
                                  num_workers=config.data.num_workers,
                                  fixed_rows=(config.parallel.pipeline_parallel > 1
                                              or config.model_options.cuda_graph is not None)))

    groups = dataset.groups if config.data.packed else dataset
    description = f"{len(groups)} problem groups ({len(groups.data.labels)} responses)"
    if config.data.packed:
        description += f" in {len(dataset)} bins of up to {length} tokens"
    else:
        description += f", one response per row of {length} tokens"
    return TrainingData(num_samples=len(dataset), make_loader=make_loader, sequence_lengths=sequence_lengths,
                        description=description, documents=len(groups))


def train_reward_model(config: TrainConfig, arch: Optional[ModelArch] = None) -> Dict:
    """Train a reward model (``launch/train_rm.py``); returns the trainer's summary (with ``exit_code``)."""
    log_on_rank_0(launch_rank())  # the checks' warnings, once per job
    with preemption_requests() as preemption:
        check_config(config, "rm", arch, world_size=read_launch_env().world_size)
        config = dataclasses.replace(config)  # run() may set the batch size; the caller's config stays as given
        task = RewardTask(config.reward.loss, seed=config.seed)
        validation = rm_training_data(config, held_out=True) if config.data.valid_prefixes else None
        return run(config, task, rm_training_data(config), arch=arch, model_chunk_builder=build_reward_model_chunk,
                   validation=validation, preemption=preemption)


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


class ScoringTask(RewardTask):
    """Forward only: the 'report' of each micro-batch carries its response scores (on the device: the scorer
    reads them all back at the end)."""

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple:
        scores = response_scores(output, batch["score_index"], packed="cu_seqlens" in batch)
        return output.sum() * 0.0, torch.ones((), dtype=torch.int), {"scores": scores.detach().float()}


class RewardScorer:
    """A trained reward model on this rank's part of any TP/PP/DP layout, scoring token sequences in packed rows
    of ``tokens_per_row`` tokens; ``rows_per_call`` rows go through megatron's schedule at a time (the pipeline's
    micro-batches). Needs ``init_distributed(parallel)`` first; builds no DDP wrapper and no optimizer."""

    def __init__(self, arch: ModelArch, checkpoint: str | Path, parallel: ParallelConfig, options: ModelOptions,
                 tokens_per_row: int = 8192, rows_per_call: Optional[int] = None):
        tp = parallel.tensor_parallel
        if parallel.sequence_parallel and tp > 1 and tokens_per_row % tp:
            raise ValueError(f"tokens_per_row {tokens_per_row} must be a multiple of tensor_parallel {tp} "
                             "with sequence parallelism")
        self.chunks = build_model(arch, parallel, options, model_class=RewardGPTModel)
        checkpointing.load_weights(checkpoint, self.chunks)
        for chunk in self.chunks:
            chunk.eval()
        self.qkv_format = packed_qkv_format(options.spec)
        self.tokens_per_row = tokens_per_row
        self.rows_per_call = rows_per_call or 2 * parallel.pipeline_parallel * (parallel.virtual_pipeline_parallel or 1)

    def _rows(self, sequences: Sequence[np.ndarray]) -> List[List[int]]:
        """Next-fit packing in input order (every sequence fits a row: :meth:`score_share` checked)."""
        rows, current, used = [], [], 0
        for index, sequence in enumerate(sequences):
            length = len(sequence)
            if used + length > self.tokens_per_row:
                rows.append(current)
                current, used = [], 0
            current.append(index)
            used += length
        return rows + [current] if current else rows

    def _row_batch(self, sequences: Sequence[np.ndarray], row: List[int]) -> Batch:
        """One packed row; a filler row (no sequences) holds a one-token dummy whose score is dropped."""
        documents = [sequences[i] for i in row] or [np.zeros(1, dtype=np.int64)]
        groups = [RMGroupSample([document], np.zeros(1, dtype=np.float32)) for document in documents]
        return collate_rm_packed([groups], pad_id=0, total_length=self.tokens_per_row)

    @torch.no_grad()
    def score(self, sequences: Sequence[np.ndarray], show_progress: bool = True) -> List[float]:
        """One score per sequence, returned on every rank; data-parallel ranks split the sequences."""
        share = data_parallel_share(len(sequences))
        scores = self.score_share([sequences[i] for i in share], [f"sequence {i}" for i in share], show_progress)
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, None if scores is None else (share.start, scores))
        return [score for _, part in sorted(part for part in parts if part is not None) for score in part]

    @property
    def holds_scores(self) -> bool:
        """Whether this rank returns its data-parallel share's scores (one rank per model replica does)."""
        return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0)

    @torch.no_grad()
    def score_share(self, sequences: Sequence[np.ndarray], names: Optional[Sequence[str]] = None,
                    show_progress: bool = True) -> Optional[List[float]]:
        """Scores of this data-parallel rank's ``sequences`` (every rank of its model replica passes the same ones),
        on the rank that :attr:`holds_scores`, None on the others. ``names`` name the sequences in errors."""
        too_long = next((index for index, sequence in enumerate(sequences) if len(sequence) > self.tokens_per_row),
                        None)
        raise_on_every_rank(None if too_long is None else ValueError(
            f"{names[too_long] if names else f'sequence {too_long}'} has {len(sequences[too_long])} tokens, more "
            f"than tokens_per_row {self.tokens_per_row}; raise it"))
        rows = self._rows(sequences)
        rows += [[] for _ in range(-len(rows) % self.rows_per_call)]  # whole calls (interleaved schedules need them)
        task = ScoringTask()
        progress = ProgressLog("reward model (rank 0's share)", "scored", "responses",
                               enabled=show_progress and torch.distributed.get_rank() == 0)
        scored_rows, row_scores = [], []
        done = 0
        for start in range(0, len(rows), self.rows_per_call):
            call = rows[start:start + self.rows_per_call]
            reports = run_schedule(self.chunks, task, [self._row_batch(sequences, row) for row in call],
                                   self.qkv_format, forward_only=True)
            for row, report in zip(call, reports):  # reports exist on the last pipeline stage only
                scored_rows.append(row)
                row_scores.append(report["scores"][:len(row)])
            done += sum(len(row) for row in call)
            progress(done, len(sequences))
        if not self.holds_scores:
            return None
        # Read back once, at the end: a read per call would make the host wait for the GPU before building the
        # next rows, leaving the GPU idle meanwhile.
        flat = torch.cat(row_scores).tolist() if row_scores else []
        by_index = dict(zip((index for row in scored_rows for index in row), flat))
        return [by_index[index] for index in range(len(sequences))]


def candidate_group(record: dict, where: str) -> RMGroup:
    """A problem and its candidate responses: ``{"question", "code": [...]}`` (Qwen2.5-Math evaluation output) or
    ``{"prompt", "responses": [...]}``, each with an optional ``system``, rendered as RM preprocessing does."""
    prompt = record.get("question", record.get("prompt"))
    responses = record.get("code", record.get("responses"))
    if not isinstance(prompt, str) or not isinstance(responses, list) or not responses:
        raise DataError(where, Reason.UNRECOGNIZED_SCHEMA,
                        "expected a 'question' (or 'prompt') string and a non-empty 'code' (or 'responses') list")
    messages = problem_prompt(prompt, record.get("system"), where)
    not_text = next((index for index, response in enumerate(responses) if not isinstance(response, str)), None)
    if not_text is not None:
        raise DataError(where, Reason.BAD_MESSAGE, f"response {not_text} is not a string")
    for index, response in enumerate(responses):
        check_encodable(response, where, f"response {index}")
    # An empty response (a model that ended its turn at once) is still a candidate: it is scored at its last
    # token like any other, so best-of-n can rank it.
    return RMGroup(where, messages, list(responses), [0] * len(responses))


def _nonblank_lines(path: Path, first: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[str, bytes]]:
    """``(file:line, raw)`` of the nonblank lines ``first`` to ``stop`` (counting nonblank lines only)."""
    with path.open("rb") as handle:
        nonblank = ((f"{path}:{number}", raw) for number, raw in enumerate(handle, start=1) if raw.strip())
        yield from itertools.islice(nonblank, first, stop)


def score_jsonl(input_path: str | Path, output_path: str | Path, scorer: RewardScorer, encoder: ConversationEncoder,
                field: str = "pred_score", show_progress: bool = True) -> None:
    """Write every input record with ``field`` set to its responses' reward scores (one float each, in response
    order; an existing field of that name is replaced). Each data-parallel rank reads, renders and tokenizes only
    its share of the records (tokens of a million candidates would not fit every rank's host memory); rank 0
    writes the file."""
    input_path = Path(input_path)
    with input_path.open("rb") as handle:
        records = sum(1 for raw in handle if raw.strip())
    share = data_parallel_share(records)
    groups, sequences, error = [], [], None
    try:
        groups = [candidate_group(parse_json_line(raw, where), where)
                  for where, raw in _nonblank_lines(input_path, share.start, share.stop)]
        sequences = [sequence for group in groups for sequence in encode_rm_group(encoder, group)]
    except ValueError as bad_record:  # DataError, or a tokenizer's refusal: every rank stops, not this one alone
        error = bad_record if isinstance(bad_record, DataError) else ValueError(str(bad_record))  # picklable
    raise_on_every_rank(error)
    names = [f"{group.where} response {index}" for group in groups for index in range(len(group.responses))]
    logger.info("scoring %d records over %d data-parallel ranks (%d responses on rank 0)", records,
                parallel_state.get_data_parallel_world_size(), len(sequences))
    flat = scorer.score_share(sequences, names, show_progress=show_progress)
    bounds = np.cumsum([0] + [len(group.responses) for group in groups])
    mine = None if flat is None else (share.start, [flat[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])])
    parts = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(mine, parts, dst=0)
    if torch.distributed.get_rank() != 0:
        return
    scores = [record_scores for _, part in sorted(part for part in parts if part is not None) for record_scores in part]
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(output_path) as handle:
        for (where, raw), record_scores in zip(_nonblank_lines(input_path), scores, strict=True):
            handle.write(json.dumps({**parse_json_line(raw, where), field: record_scores}, ensure_ascii=False) + "\n")
    logger.info("wrote %d records (%d responses) with '%s' to %s", records, sum(map(len, scores)), field,
                output_path)
