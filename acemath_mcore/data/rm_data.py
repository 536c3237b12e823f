"""Reward-model data: problem groups of labelled responses, score-sorted selection, tokenization and batching.

Input schemas (one JSONL may mix them):
- AceMath-RM-Training-Data rows: ``{"qid", "message": [system?, user, assistant], "label": 0|1}``; consecutive
  rows with one qid form a group (a qid reappearing later is an error: groups must be contiguous);
- grouped: ``{"prompt": str, "system": str?, "responses": [str], "labels": [0|1], "scores": [float]?}``;
- Qwen2.5-Math evaluation output: ``{"question", "code": [str], "score": [bool], "pred_score": [[float]]?}``.

A bad candidate (a row of the first schema, a response of the others) is a counted drop that leaves the rest of
its group; a group whose candidates are all correct or all wrong carries no preference and is dropped (counted).
Score-sorted selection (AceMath RM data): from candidates scored by a reward model, keep ``n`` per problem,
half from the positives and half from the negatives where possible, positives taken from the top of the
score order and negatives from the bottom (both directions configurable).

Batches pack whole groups, so a group never straddles micro-batches; the RM score is read at
``score_index``, the last token of each rendered conversation (see :func:`encode_rm_group`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
from acemath_mcore.data.datasets import ResumableDistributedSampler, batch_loader
from acemath_mcore.data.indexed import RMIndexedDataset, RMIndexedWriter
from acemath_mcore.data.jsonl import (
    DataError,
    Reason,
    drop_line,
    dropped_path,
    iter_line_chunks,
    parse_json_line,
    validate_messages,
)
from acemath_mcore.data.packing import best_fit_decreasing, collate_packed, collate_padded
from acemath_mcore.data.tokenizers import Tokenizer, load_tokenizer
from acemath_mcore.files import atomic_output

ALL_CORRECT = "all_correct"
ALL_WRONG = "all_wrong"
TOO_LONG = "too_long"


@dataclass
class RMGroup:
    where: str  # file:line of the group's first row
    prompt: list[dict]  # validated messages before the response (system?, user, ...)
    responses: list[str]
    labels: list[int]
    scores: Optional[list[float]] = None


def _label(value, where: str) -> int:
    if value in (0, 1):  # True/False included
        return int(value)
    raise DataError(where, "bad_label", f"label {value!r} is not 0/1")


def _score(value, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise DataError(where, "bad_score", f"reward score {value!r} is not a finite number")


def _conversation_prompt(messages: list, where: str) -> tuple[list[dict], str]:
    validated = validate_messages(messages, where)
    if validated[-1]["role"] != "assistant":
        raise DataError(where, Reason.BAD_MESSAGE, "the last message must be the assistant response")
    return validated[:-1], validated[-1]["content"]


def problem_prompt(question: str, system: Optional[str], where: str) -> list[dict]:
    """The validated messages before a one-line group's responses: the optional system turn, then the question."""
    messages = [{"role": "user", "content": question}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return validate_messages(messages + [{"role": "assistant", "content": "placeholder"}], where)[:-1]


def _grouped(record: dict, where: str, report: Callable[[DataError], None],
             encoder: Optional[ConversationEncoder]) -> Optional[RMGroup]:
    """A one-line group: grouped schema or Qwen2.5-Math evaluation output. A bad candidate (empty or non-text
    response, bad label or score, special-token string) is reported and left out, as a bad row of the per-row
    schema is, instead of costing its whole group; None when no candidate is left."""
    if "responses" in record:
        prompt_text, responses, labels, scores = (record.get(k) for k in ("prompt", "responses", "labels", "scores"))
    else:
        prompt_text, responses, labels = record.get("question"), record.get("code"), record.get("score")
        scores = record.get("pred_score")
        if isinstance(scores, list):  # one score list per response; the RM score is its first entry
            scores = [s[0] if isinstance(s, list) and s else s for s in scores]
    if not isinstance(prompt_text, str) or not isinstance(responses, list) or not isinstance(labels, list):
        raise DataError(where, Reason.UNRECOGNIZED_SCHEMA, "grouped rows need a prompt string, responses and labels")
    if scores is not None and not isinstance(scores, list):
        raise DataError(where, "bad_score", f"the reward scores are a {type(scores).__name__}, not a list")
    if len(labels) != len(responses) or (scores is not None and len(scores) != len(responses)):
        raise DataError(where, "length_mismatch", f"{len(responses)} responses, {len(labels)} labels"
                        + ("" if scores is None else f", {len(scores)} scores"))
    if not responses:
        raise DataError(where, Reason.NO_ASSISTANT_TURN, "the group has no responses")
    prompt = problem_prompt(prompt_text, record.get("system"), where)
    if encoder is not None:
        encoder.check_no_special_tokens(prompt, where)
    group = RMGroup(where, prompt, [], [], None if scores is None else [])
    for index, response in enumerate(responses):
        try:
            message = validate_messages([{"role": "assistant", "content": response}], where)
            if encoder is not None:
                encoder.check_no_special_tokens(message, where)
            label = _label(labels[index], where)
            score = None if scores is None else _score(scores[index], where)
        except DataError as error:
            report(DataError(where, error.reason, f"response {index}: {error.detail}"))
            continue
        group.responses.append(response)
        group.labels.append(label)
        if score is not None:
            group.scores.append(score)
    return group if group.responses else None


def iter_rm_groups(paths: Sequence[str | Path], report: Callable[[DataError], None],
                   encoder: Optional[ConversationEncoder] = None) -> Iterator[RMGroup]:
    """Groups of every input in order; a bad line goes to ``report`` (which may raise) and is skipped. With
    ``encoder``, lines whose text holds one of its special-token strings are bad lines too."""
    closed_qids: dict = {}
    for path in paths:
        current: Optional[RMGroup] = None
        current_qid = None
        for chunk in iter_line_chunks([path], lines_per_chunk=4096):
            for where, raw in chunk.located():
                try:
                    record = parse_json_line(raw, where)
                    if "qid" not in record:
                        group = _grouped(record, where, report, encoder)
                        if group is not None:
                            yield group
                        continue
                    qid = record["qid"]
                    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
                        raise DataError(where, "bad_qid", f"qid {qid!r} is not a string or an integer")
                    if qid != current_qid and qid in closed_qids:
                        raise DataError(where, "qid_not_contiguous", f"qid {qid!r} already ended at {closed_qids[qid]}")
                except DataError as error:
                    report(error)
                    continue
                # A new qid ends the current group even when its own row turns out bad: the same qid after it
                # is then out of order, not part of the group.
                if qid != current_qid:
                    if current_qid is not None:
                        closed_qids[current_qid] = where
                    if current is not None:
                        yield current
                    current, current_qid = None, qid
                try:
                    if not isinstance(record.get("message"), list):
                        raise DataError(where, Reason.UNRECOGNIZED_SCHEMA, "RM rows need a 'message' list")
                    prompt, response = _conversation_prompt(record["message"], where)
                    label = _label(record.get("label"), where)
                    if encoder is not None:
                        encoder.check_no_special_tokens(prompt + [{"role": "assistant", "content": response}], where)
                except DataError as error:
                    report(error)
                    continue
                if current is None:
                    current = RMGroup(where, prompt, [], [])
                elif prompt != current.prompt:
                    report(DataError(where, "prompt_mismatch", f"qid {qid!r} rows disagree on the prompt"))
                    continue
                current.responses.append(response)
                current.labels.append(label)
        if current_qid is not None:
            closed_qids[current_qid] = f"{path}:end"
        if current is not None:
            yield current


def uniform_label_reason(group: RMGroup) -> Optional[str]:
    """ALL_CORRECT / ALL_WRONG when the group has no positive-negative pair to learn from, else None."""
    if all(group.labels):
        return ALL_CORRECT
    if not any(group.labels):
        return ALL_WRONG
    return None


def score_sorted_selection(group: RMGroup, num_responses: int, positives: str = "top",
                           negatives: str = "bottom") -> RMGroup:
    """Keep ``num_responses`` candidates, as balanced between positives and negatives as the pools allow,
    each pool read in score order from the given end (ties keep input order). Selected candidates stay in
    input order so position says nothing about the label."""
    if len(group.responses) <= num_responses:
        return group  # nothing to choose
    if group.scores is None:
        raise ValueError(f"{group.where}: score-sorted selection needs reward scores")
    for name, end in (("positives", positives), ("negatives", negatives)):
        if end not in ("top", "bottom"):
            raise ValueError(f"{name} must be 'top' or 'bottom', got {end!r}")
    scores = np.asarray(group.scores, dtype=np.float64)
    labels = np.asarray(group.labels)

    def ranked(label: int, end: str) -> np.ndarray:
        members = np.flatnonzero(labels == label)
        order = np.argsort(-scores[members] if end == "top" else scores[members], kind="stable")
        return members[order]

    pool_positive, pool_negative = ranked(1, positives), ranked(0, negatives)
    take_positive = min(len(pool_positive), max(num_responses // 2, num_responses - len(pool_negative)))
    take_negative = min(len(pool_negative), num_responses - take_positive)
    chosen = np.sort(np.concatenate([pool_positive[:take_positive], pool_negative[:take_negative]]))
    return RMGroup(group.where, group.prompt, [group.responses[i] for i in chosen],
                   [group.labels[i] for i in chosen], [group.scores[i] for i in chosen])


def encode_rm_group(encoder: ConversationEncoder, group: RMGroup) -> list[np.ndarray]:
    """Token ids of each candidate's whole rendered conversation, prompt + response; its last token is the score
    token. That is the token a Hugging Face ``*ForSequenceClassification`` reads in ``apply_chat_template(...,
    add_generation_prompt=False)`` ids (the AceMath-RM model card's usage): chatml's newline after ``<|im_end|>``,
    Llama-3's ``<|eot_id|>``. Scoring anywhere else would leave an exported reward model reading a position its
    head was never trained on."""
    encoded = encoder.encode_batch([group.prompt + [{"role": "assistant", "content": r}] for r in group.responses])
    return [sample.input_ids for sample in encoded]


@dataclass
class RMPreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    template: str = "chatml"
    system_prompt: Optional[str] = None
    max_length: Optional[int] = None  # a group with a longer response is dropped (its score token would be cut)
    num_responses: Optional[int] = None  # score-sorted selection of this many candidates per problem
    positives: str = "top"
    negatives: str = "bottom"
    strict: bool = False

    def __post_init__(self):
        if self.num_responses is not None and self.num_responses < 2:
            raise ValueError(f"num_responses={self.num_responses}: a group needs at least 2 candidates, one correct "
                             "and one wrong, to give the reward model a pair")


def preprocess_rm(config: RMPreprocessConfig, tokenizer: Optional[Tokenizer] = None) -> dict:
    """JSONL groups → RM IndexedDataset (see indexed.py) + ``<prefix>_stats.json`` + ``<prefix>_dropped.jsonl``;
    returns the stats.
    ``tokenizer``: an already loaded ``config.tokenizer``."""
    started = time.monotonic()
    tokenizer = tokenizer or load_tokenizer(config.tokenizer)
    encoder = ConversationEncoder(tokenizer, build_template(config.template, tokenizer, config.system_prompt))
    dropped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    counts = Counter()
    group_sizes: Counter = Counter()  # candidates per kept problem

    def drop(where: str, reason: str, detail: str) -> None:
        dropped[reason] += 1
        if len(examples.setdefault(reason, [])) < 5:
            examples[reason].append(f"{where}: {detail}")
        drop_log.write(drop_line(where, reason, detail))

    def report(error: DataError) -> None:
        if config.strict:
            raise error
        drop(error.where, error.reason, error.detail)

    Path(config.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    # the drop log is published after the data files close
    with atomic_output(dropped_path(config.output_prefix)) as drop_log, \
            RMIndexedWriter(config.output_prefix, tokenizer.vocab_size) as writer:
        for group in iter_rm_groups(config.inputs, report, encoder):
            counts["groups_read"] += 1
            reason = uniform_label_reason(group)
            if reason is not None:
                drop(group.where, reason, f"{len(group.labels)} candidates, all labelled {group.labels[0]}")
                continue
            if config.num_responses is not None:
                group = score_sorted_selection(group, config.num_responses, config.positives, config.negatives)
            sequences = encode_rm_group(encoder, group)
            longest = max(len(s) for s in sequences)
            if config.max_length is not None and longest > config.max_length:
                drop(group.where, TOO_LONG, f"a response takes {longest} tokens > max length {config.max_length}")
                continue
            writer.add_group(sequences, group.labels)
            counts["groups"] += 1
            group_sizes[len(sequences)] += 1
            counts["responses"] += len(sequences)
            counts["positives"] += sum(group.labels)
            group_tokens = sum(len(s) for s in sequences)
            counts["tokens"] += group_tokens
            # what a padded row (one response) and a packed bin (one group) must hold: checked before training
            counts["max_response_tokens"] = max(counts["max_response_tokens"], longest)
            counts["max_group_tokens"] = max(counts["max_group_tokens"], group_tokens)
    elapsed = time.monotonic() - started
    config_dict = asdict(config)
    stats = {
        "inputs": config_dict.pop("inputs"),
        "output_prefix": config_dict.pop("output_prefix"),
        "tokenizer": tokenizer.describe(),
        "config": config_dict,
        **{key: counts[key] for key in ("groups_read", "groups", "responses", "positives", "tokens",
                                        "max_response_tokens", "max_group_tokens")},
        "group_sizes": {str(size): count for size, count in sorted(group_sizes.items())},
        "dropped_total": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        "drop_examples": dict(sorted(examples.items())),
        "elapsed_s": round(elapsed, 3),
    }
    Path(config.output_prefix + "_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Training side
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RMGroupSample:
    responses: list[np.ndarray]
    labels: np.ndarray  # float32, one per response


class RMGroupDataset(torch.utils.data.Dataset):
    """Samples are single groups (padded batches: ``micro_batch_size`` groups per micro-batch)."""

    def __init__(self, prefix: str):
        self.data = RMIndexedDataset(prefix)

    def __len__(self) -> int:
        return len(self.data)

    def group(self, index: int) -> RMGroupSample:
        responses, labels = self.data.group(index)
        return RMGroupSample(responses, labels)

    def __getitem__(self, index: int) -> list[RMGroupSample]:
        return [self.group(index)]


@dataclass
class PackedRMDataset(torch.utils.data.Dataset):
    """Samples are bins of whole groups holding at most ``max_tokens`` tokens (best-fit decreasing)."""

    groups: RMGroupDataset
    max_tokens: int
    bins: list = field(init=False)

    def __post_init__(self):
        self.bins = best_fit_decreasing(self.groups.data.group_token_counts, self.max_tokens)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> list[RMGroupSample]:
        return [self.groups.group(int(g)) for g in self.bins[index]]


def _flatten(samples: Sequence[Sequence[RMGroupSample]]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    groups = [group for sample in samples for group in sample]
    responses = [r for group in groups for r in group.responses]
    labels = np.concatenate([group.labels for group in groups]).astype(np.float32)
    group_sizes = np.array([len(group.responses) for group in groups], dtype=np.int64)
    return responses, labels, group_sizes


def collate_rm_packed(samples: Sequence[Sequence[RMGroupSample]], pad_id: int, total_length: int) -> dict:
    """``tokens/position_ids [1, T]``, ``cu_seqlens``, ``max_seqlen``, ``num_tokens`` as in SFT packing, plus
    ``score_index`` int64 [R] (row position of every response's last token), ``labels`` float32 [R],
    ``group_sizes`` int64 [G]."""
    responses, labels, group_sizes = _flatten(samples)
    batch = collate_packed([[(r, np.zeros(len(r), dtype=np.uint8)) for r in responses]], pad_id, total_length)
    return {
        "tokens": batch["tokens"],
        "position_ids": batch["position_ids"],
        "cu_seqlens": batch["cu_seqlens"],
        "max_seqlen": batch["max_seqlen"],
        "num_tokens": batch["num_tokens"],
        "score_index": batch["cu_seqlens"][1:len(responses) + 1].to(torch.int64) - 1,
        "labels": torch.from_numpy(labels),
        "group_sizes": torch.from_numpy(group_sizes),
    }


def collate_rm_padded(samples: Sequence[Sequence[RMGroupSample]], pad_id: int, seq_length: int,
                      num_rows: Optional[int] = None) -> dict:
    """``tokens/position_ids [R, S]`` (one response per row, right-padded), ``score_index`` int64 [R] (column of
    each row's last real token), ``labels`` float32 [R], ``group_sizes`` int64 [G], ``num_tokens`` (the responses'
    tokens, no padding).

    ``num_rows`` appends rows of padding after the responses up to a fixed row count, so every micro-batch has
    one shape (pipeline stages need that); they are computed but never scored (``score_index`` covers the real
    rows only, which come first).
    """
    responses, labels, group_sizes = _flatten(samples)
    if num_rows is not None and len(responses) > num_rows:
        raise ValueError(f"{len(responses)} responses do not fit a padded micro-batch of {num_rows} rows")
    fillers = [np.full(1, pad_id, dtype=np.int64)] * (0 if num_rows is None else num_rows - len(responses))
    batch = collate_padded([[(r, np.zeros(len(r), dtype=np.uint8))] for r in responses + fillers], pad_id,
                           seq_length)
    return {
        "tokens": batch["tokens"],
        "position_ids": batch["position_ids"],
        "score_index": torch.tensor([len(r) - 1 for r in responses], dtype=torch.int64),
        "num_tokens": sum(len(r) for r in responses),  # the filler rows are padding
        "labels": torch.from_numpy(labels),
        "group_sizes": torch.from_numpy(group_sizes),
    }


def _check_groups_fit(data: RMIndexedDataset, packed_tokens: Optional[int], seq_length: Optional[int]) -> None:
    """Before training starts, not when a long group is first drawn hours in: a padded row holds one response of at
    most ``seq_length`` tokens, a packed bin whole groups of at most ``packed_tokens``."""
    if packed_tokens is not None:
        sizes, limit, what = data.group_token_counts, packed_tokens, "groups hold"
    else:
        sizes, limit, what = data.tokens.sequence_lengths, seq_length, "responses have"
    too_long = int((sizes > limit).sum())
    if too_long:
        raise ValueError(f"{data.prefix}: {too_long} {what} more than {limit} tokens (longest {int(sizes.max())}); "
                         "raise data.seq_length, or preprocess with a lower --max-length (launch/preprocess.py rm)")


def build_rm_dataset(prefix: str, packed_tokens: Optional[int] = None,
                     seq_length: Optional[int] = None) -> RMGroupDataset | PackedRMDataset:
    """Packed (``packed_tokens``): samples are bins of whole groups. Padded (``seq_length``): samples are single
    groups. Groups or responses that cannot fit are refused here, before any training starts."""
    if (packed_tokens is None) == (seq_length is None):
        raise ValueError("give exactly one of packed_tokens (packed) or seq_length (padded)")
    groups = RMGroupDataset(prefix)
    _check_groups_fit(groups.data, packed_tokens, seq_length)
    return PackedRMDataset(groups, packed_tokens) if packed_tokens is not None else groups


def rm_dataloader(dataset: RMGroupDataset | PackedRMDataset, pad_id: int, global_batch_size: int,
                  micro_batch_size: int, seq_length: Optional[int] = None, dp_rank: int = 0, dp_size: int = 1,
                  seed: int = 1234, consumed_samples: int = 0, num_workers: int = 0,
                  fixed_rows: bool = False) -> torch.utils.data.DataLoader:
    """Endless RM micro-batches of a :func:`build_rm_dataset`. Packed rows are ``micro_batch_size * packed_tokens``
    long; padded rows ``seq_length``, and ``fixed_rows`` gives every padded micro-batch ``micro_batch_size`` x
    (largest group) rows (for pipeline parallelism)."""
    if isinstance(dataset, PackedRMDataset):
        collate = functools.partial(collate_rm_packed, pad_id=pad_id,
                                    total_length=micro_batch_size * dataset.max_tokens)
    else:
        num_rows = micro_batch_size * dataset.data.max_group_size if fixed_rows else None
        collate = functools.partial(collate_rm_padded, pad_id=pad_id, seq_length=seq_length, num_rows=num_rows)
    sampler = ResumableDistributedSampler(len(dataset), global_batch_size, micro_batch_size, dp_rank, dp_size,
                                          seed, consumed_samples)
    return batch_loader(dataset, sampler, collate, num_workers)
