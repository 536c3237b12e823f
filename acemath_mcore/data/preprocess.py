"""SFT preprocessing: conversation JSONL → megatron IndexedDataset (tokens + loss mask), stats and drop log.

Work split: the main process reads raw lines in chunks and hands them to a multiprocessing pool (``imap``
keeps input order, so the output is deterministic); workers decode, validate, run the per-sample curation
steps, render and tokenize in batches and apply the max-length policy; the main process applies the
whole-data-set steps (cross-check, prompt dedup) and writes. Bad input is a counted drop naming ``file:line``
(or, with ``strict``, an error naming it).

Outputs next to ``<prefix>``: ``<prefix>.bin/.idx``, ``<prefix>_loss_mask.bin/.idx`` (see indexed.py),
``<prefix>_stats.json`` and ``<prefix>_dropped.jsonl`` (one line per dropped sample: where, reason, detail).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
from acemath_mcore.data.curation import (
    CrossCheck,
    CurationStep,
    MaxResponseWords,
    PromptDeduplicator,
    RepeatedText,
    RequireBoxed,
    prompt_key,
)
from acemath_mcore.data.indexed import SFTIndexedWriter
from acemath_mcore.data.jsonl import DataError, LineChunk, drop_line, dropped_path, iter_line_chunks, parse_conversation
from acemath_mcore.data.tokenizers import Tokenizer, load_tokenizer
from acemath_mcore.files import atomic_output
from acemath_mcore.progress import format_duration
from acemath_mcore.runtime.local_workers import usable_cpus

OVERFLOW_POLICIES = ("truncate", "drop")
TOO_LONG = "too_long"
NO_LOSS_AFTER_TRUNCATION = "no_loss_after_truncation"
EXAMPLES_PER_REASON = 5


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    template: str = "chatml"
    system_prompt: Optional[str] = None
    max_length: Optional[int] = None
    overflow: str = "truncate"
    strict: bool = False
    workers: int = field(default_factory=usable_cpus)
    lines_per_chunk: int = 256
    curate: list[str] = field(default_factory=list)  # per-sample step specs, applied in order
    benchmark_dir: Optional[str] = None  # <benchmark>/test.jsonl files for decontaminate=...
    cross_check: list[str] = field(default_factory=list)  # response files whose answers must agree
    cross_check_benchmark: str = "math"
    dedup_prompts: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")


def build_curation_step(spec: str, benchmark_dir: Optional[str]) -> CurationStep:
    """A per-sample step from its command-line spelling:
    ``max-words=N``, ``repetition`` or ``repetition=NGRAM:COUNT``, ``boxed``, ``decontaminate=math|general``."""
    name, _, argument = spec.partition("=")
    if name == "max-words" and argument.isdigit():
        return MaxResponseWords(int(argument))
    if name == "repetition":
        if not argument:
            return RepeatedText()
        ngram, _, count = argument.partition(":")
        if not (ngram.isdigit() and count.isdigit() and int(ngram) >= 1 and int(count) >= 2):
            raise ValueError(f"curation step {spec!r}: use repetition=NGRAM:COUNT with NGRAM >= 1 words and COUNT >= 2 "
                             "occurrences (e.g. repetition=20:3)")
        return RepeatedText(int(ngram), int(count))
    if name == "boxed" and not argument:
        return RequireBoxed()
    if name == "decontaminate" and argument in ("math", "general"):
        if benchmark_dir is None:
            raise ValueError("decontaminate needs --benchmark-dir (the folder of <benchmark>/test.jsonl files)")
        from acemath_mcore.data.decontamination import Decontaminator

        return Decontaminator.from_dir(benchmark_dir, math=argument == "math")
    raise ValueError(
        f"unknown curation step {spec!r}; use max-words=N, repetition[=NGRAM:COUNT], boxed, "
        f"decontaminate=math|general"
    )


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk: kept samples, drops, and counters."""

    num_bytes: int
    lines: int = 0
    tokens: list = field(default_factory=list)  # per kept sample: int32 ids
    loss_masks: list = field(default_factory=list)  # per kept sample: uint8 mask
    wheres: list = field(default_factory=list)
    truncated: list = field(default_factory=list)
    keys: list = field(default_factory=list)  # prompt keys, when dedup or cross-check needs them
    answers: list = field(default_factory=list)  # extracted answers, when cross-checking
    drops: list = field(default_factory=list)  # (where, reason, detail)
    step_seen: list = field(default_factory=list)  # per curation step: samples that reached it
    step_dropped: list = field(default_factory=list)

    def drop(self, where: str, reason: str, detail: str) -> None:
        self.drops.append((where, reason, detail))

    def samples(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, bool, Optional[int], Optional[str]]]:
        keys = self.keys or [None] * len(self.wheres)
        answers = self.answers or [None] * len(self.wheres)
        yield from zip(self.wheres, self.tokens, self.loss_masks, self.truncated, keys, answers)


class ChunkProcessor:
    """The worker side: raw lines → validated, curated, tokenized samples."""

    def __init__(self, encoder: ConversationEncoder, steps: list[CurationStep], max_length: Optional[int],
                 overflow: str, strict: bool, want_keys: bool, cross_check: Optional[CrossCheck]):
        self.encoder, self.steps = encoder, steps
        self.max_length, self.overflow, self.strict = max_length, overflow, strict
        self.want_keys, self.cross_check = want_keys, cross_check

    def _validated(self, chunk: LineChunk, result: ChunkResult) -> list:
        conversations = []
        for where, raw in chunk.located():
            result.lines += 1
            try:
                conversation = parse_conversation(raw, where)
                self.encoder.check_no_special_tokens(conversation.messages, where)
            except DataError as error:
                if self.strict:
                    raise
                result.drop(error.where, error.reason, error.detail)
                continue
            conversations.append(conversation)
        return conversations

    def _curated(self, conversations: list, result: ChunkResult) -> list:
        kept = []
        for conversation in conversations:
            for position, step in enumerate(self.steps):
                result.step_seen[position] += 1
                detail = step.check(conversation)
                if detail is not None:
                    result.step_dropped[position] += 1
                    result.drop(conversation.where, step.reason, detail)
                    break
            else:
                kept.append(conversation)
        return kept

    def __call__(self, chunk: LineChunk) -> ChunkResult:
        result = ChunkResult(chunk.num_bytes, step_seen=[0] * len(self.steps), step_dropped=[0] * len(self.steps))
        conversations = self._curated(self._validated(chunk, result), result)
        encoded = self.encoder.encode_batch([conversation.messages for conversation in conversations])
        for conversation, sample in zip(conversations, encoded):
            ids, mask, truncated = sample.input_ids, sample.loss_mask, False
            if self.max_length is not None and len(ids) > self.max_length:
                if self.overflow == "drop":
                    result.drop(conversation.where, TOO_LONG, f"{len(ids)} tokens > max length {self.max_length}")
                    continue
                ids, mask, truncated = ids[: self.max_length], mask[: self.max_length], True
                if not mask.any():
                    result.drop(conversation.where, NO_LOSS_AFTER_TRUNCATION,
                                f"the first {self.max_length} tokens hold no assistant token")
                    continue
            result.tokens.append(ids)
            result.loss_masks.append(mask)
            result.wheres.append(conversation.where)
            result.truncated.append(truncated)
            if self.want_keys:
                result.keys.append(prompt_key(conversation.prompt))
            if self.cross_check is not None:
                result.answers.append(self.cross_check.answer_of(conversation))
        return result


_WORKER_PROCESSOR: Optional[ChunkProcessor] = None


def _init_worker(processor: ChunkProcessor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor
    # One process per core already; Rust-side threads would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _process_in_worker(chunk: LineChunk) -> ChunkResult:
    return _WORKER_PROCESSOR(chunk)


class _Progress:
    """tqdm over input bytes on a terminal; elsewhere (a Slurm log, where tqdm's redrawn bar piles up) a line every
    ``interval`` seconds with the time left at the rate so far."""

    def __init__(self, total_bytes: int, enabled: bool, interval: float = 10.0):
        self.total, self.done, self.enabled, self.interval = total_bytes, 0, enabled, interval
        self.started = self.last_line = time.monotonic()
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)
            except ImportError:
                pass

    def update(self, num_bytes: int, tokens: int) -> None:
        self.done += num_bytes
        if self._bar is not None:
            self._bar.update(num_bytes)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            elapsed = max(self.last_line - self.started, 1e-9)
            left = (self.total - self.done) * elapsed / max(self.done, 1)
            print(f"preprocess: {self.done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB read, {tokens:,} tokens, "
                  f"{tokens / elapsed:,.0f} tokens/s, {format_duration(left)} left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Stats:
    def __init__(self, config: PreprocessConfig, tokenizer: Tokenizer, steps: list[CurationStep],
                 main_steps: list[str]):
        self.config, self.tokenizer = config, tokenizer
        self.lines = self.samples = self.tokens = self.loss_tokens = self.truncated = self.max_sample_tokens = 0
        self.dropped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.step_specs = [step.spec for step in steps]
        self.step_seen = np.zeros(len(steps), dtype=np.int64)
        self.step_dropped = np.zeros(len(steps), dtype=np.int64)
        self.main_steps = {spec: Counter(seen=0, dropped=0) for spec in main_steps}  # cross-check, dedup

    def record_drop(self, where: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{where}: {detail}")

    def record_main_step(self, spec: str, dropped: bool) -> None:
        self.main_steps[spec]["seen"] += 1
        self.main_steps[spec]["dropped"] += int(dropped)

    def record_sample(self, tokens: np.ndarray, mask: np.ndarray, truncated: bool) -> None:
        self.samples += 1
        self.tokens += len(tokens)
        self.loss_tokens += int(mask.sum())
        self.truncated += int(truncated)
        self.max_sample_tokens = max(self.max_sample_tokens, len(tokens))

    def as_dict(self, setup_s: float, process_s: float, input_bytes: int) -> dict:
        curation = [
            {"step": spec, "seen": int(seen), "dropped": int(dropped)}
            for spec, seen, dropped in zip(self.step_specs, self.step_seen, self.step_dropped)
        ]
        curation += [{"step": spec, **counter} for spec, counter in self.main_steps.items()]
        config = asdict(self.config)
        return {
            "inputs": config.pop("inputs"),
            "output_prefix": config.pop("output_prefix"),
            "tokenizer": self.tokenizer.describe(),
            "config": config,
            "lines": self.lines,
            "samples": self.samples,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "truncated": self.truncated,
            "max_sample_tokens": self.max_sample_tokens,
            "dropped_total": sum(self.dropped.values()),
            "dropped": dict(sorted(self.dropped.items())),
            "drop_examples": dict(sorted(self.examples.items())),
            "curation": curation,
            "input_bytes": input_bytes,
            "setup_s": round(setup_s, 3),  # tokenizer, curation indexes, cross-check files
            "process_s": round(process_s, 3),  # reading, workers, writing
            "tokens_per_s": round(self.tokens / max(process_s, 1e-9)),
        }


def _chunk_results(processor: ChunkProcessor, chunks: Iterable[LineChunk], workers: int) -> Iterator[ChunkResult]:
    if workers <= 1:
        yield from map(processor, chunks)
        return
    # Pool.imap pulls its input as fast as it can; without this bound a large file would sit in memory.
    in_flight = threading.Semaphore(4 * workers)
    stopped = threading.Event()

    def throttled() -> Iterator[LineChunk]:
        for chunk in chunks:
            while not in_flight.acquire(timeout=0.1):
                if stopped.is_set():  # the consumer is gone (error): let the pool's feeder thread finish
                    return
            yield chunk

    # fork: workers inherit the loaded tokenizer and indexes instead of re-loading them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(processor,)) as pool:
        try:
            for result in pool.imap(_process_in_worker, throttled(), chunksize=1):
                in_flight.release()
                yield result
        finally:
            stopped.set()  # before the pool terminates: it joins the feeder thread


def stats_path(prefix: str) -> Path:
    return Path(prefix + "_stats.json")


def preprocess_sft(config: PreprocessConfig, tokenizer: Optional[Tokenizer] = None) -> dict:
    """Run the whole pipeline; returns the stats (also written to ``<prefix>_stats.json``).

    ``tokenizer``: an already loaded ``config.tokenizer``, to skip loading it again for several runs.
    """
    started = time.monotonic()
    tokenizer = tokenizer or load_tokenizer(config.tokenizer)
    encoder = ConversationEncoder(tokenizer, build_template(config.template, tokenizer, config.system_prompt))
    steps = [build_curation_step(spec, config.benchmark_dir) for spec in config.curate]
    cross_check = CrossCheck(config.cross_check, config.cross_check_benchmark) if config.cross_check else None
    dedup = PromptDeduplicator() if config.dedup_prompts else None
    processor = ChunkProcessor(encoder, steps, config.max_length, config.overflow, config.strict,
                               want_keys=dedup is not None or cross_check is not None, cross_check=cross_check)
    stats = _Stats(config, tokenizer, steps, [step.spec for step in (cross_check, dedup) if step is not None])
    input_bytes = sum(os.path.getsize(path) for path in config.inputs)
    progress = _Progress(input_bytes, config.progress)
    setup_s = time.monotonic() - started
    chunks = iter_line_chunks(config.inputs, config.lines_per_chunk)
    Path(config.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        # the drop log is published after the data files close
        with atomic_output(dropped_path(config.output_prefix)) as drop_log, \
                SFTIndexedWriter(config.output_prefix, tokenizer.vocab_size) as writer:

            def drop(where: str, reason: str, detail: str) -> None:
                stats.record_drop(where, reason, detail)
                drop_log.write(drop_line(where, reason, detail))

            for result in _chunk_results(processor, chunks, config.workers):
                stats.lines += result.lines
                stats.step_seen += np.asarray(result.step_seen, dtype=np.int64)
                stats.step_dropped += np.asarray(result.step_dropped, dtype=np.int64)
                for where, reason, detail in result.drops:
                    drop(where, reason, detail)
                for where, tokens, mask, truncated, key, answer in result.samples():
                    if cross_check is not None:
                        detail = cross_check.disagreement(key, answer)
                        stats.record_main_step(cross_check.spec, detail is not None)
                        if detail is not None:
                            drop(where, cross_check.reason, detail)
                            continue
                    if dedup is not None:
                        duplicate = dedup.is_duplicate(key)
                        stats.record_main_step(dedup.spec, duplicate)
                        if duplicate:
                            drop(where, dedup.reason, "an earlier sample has the same prompt")
                            continue
                    writer.add(tokens, mask)
                    stats.record_sample(tokens, mask, truncated)
                progress.update(result.num_bytes, stats.tokens)
    finally:
        progress.close()
    summary = stats.as_dict(setup_s, time.monotonic() - started - setup_s, input_bytes)
    stats_path(config.output_prefix).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
