"""The evaluation run behind ``launch/evaluate.py``: prompts -> generation backend -> grading -> files -> table.

One JSON-lines file per benchmark, in the Qwen2.5-Math toolkit's shape so ``launch/score.py`` (RM scores) and
``launch/bestofn.py`` read it directly: ``idx``, ``question``, ``gt``, ``code`` (the n responses), ``pred``
(their extracted answers), ``score`` (their correctness), plus ``finish_reason`` and ``num_tokens`` per response.
A ``<benchmark>.meta.json`` beside it records the settings, so a rerun (e.g. a requeued Slurm array task) skips
benchmarks already done with the same settings. ``summary.json`` / ``summary.md`` hold the table: greedy pass@1
per benchmark and the average (the paper's Table 3), and with n samples also the mean accuracy over samples,
maj@n and pass@n.

Prompts that leave no room to generate within the context are not sent to the model: they are kept with empty
responses scored wrong (the denominator stays the benchmark's size) and counted in the log and summary.

A long benchmark can be split over jobs (``Shard``): each shard generates a contiguous run of the benchmark's
generation chunks into ``shards/``, and the shard that finds every part finished merges them into the ordinary
``<benchmark>.jsonl`` (the same chunks with the same seeds, so the merge equals an unsharded run's results).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

from acemath_mcore.data.chat_templates import ConversationEncoder
from acemath_mcore.eval.benchmarks import (
    DEFAULT_INSTRUCTION,
    Problem,
    build_messages,
    format_multiple_choice,
    is_multiple_choice,
    load_benchmark,
)
from acemath_mcore.eval.generation import Generation, SamplingParams
from acemath_mcore.files import write_atomically
from acemath_mcore.progress import ProgressLog

log = logging.getLogger(__name__)

# The paper's Table 3 columns, in its order; AIME24/AMC23 are reported separately there (Table 4).
TABLE3_BENCHMARKS = ("gsm8k", "math", "minerva_math", "gaokao2023en", "olympiadbench", "college_math", "mmlu_stem")
PROMPT_TOO_LONG = "prompt_too_long"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Part ``index`` (0-based) of ``count`` of each benchmark: the chunks ``index*C//count`` up to
    ``(index+1)*C//count`` of its ``C`` generation chunks (a shard may get none when ``count > C``)."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"``, as ``--shard`` takes it."""
        index, slash, count = text.partition("/")
        if not (slash and index.strip().isdigit() and count.strip().isdigit()):
            raise ValueError(f"shard {text!r}: expected INDEX/COUNT, e.g. 0/4")
        return cls(int(index), int(count))

    def chunks(self, total: int) -> range:
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)


class GenerationBackend(Protocol):
    """Something that continues token-id prompts; every process of a distributed backend calls ``generate`` with
    the same arguments, and the writer gets the full result list back (the other processes may get less)."""

    max_sequence_length: int
    is_writer: bool  # the one process that grades and writes files

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int,
                 progress: Callable[[int, int], None]) -> List[Generation]: ...


@dataclasses.dataclass
class EvalSettings:
    benchmarks: List[str]
    data_dir: str
    output_dir: str
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    num_samples: int = 1
    seed: int = 0
    limit: Optional[int] = None  # first N problems per benchmark (smoke tests)
    instruction: Optional[str] = DEFAULT_INSTRUCTION  # None: the problems' text is the whole user prompt
    instruction_role: str = "user"  # user: AceMath's template; system: Qwen2.5-Math-Instruct's
    overwrite: bool = False
    # Problems per generate call; each call's generations are appended to ``<benchmark>.jsonl.progress`` so a run
    # killed part-way (a time limit, a node failure) resumes after the last finished chunk. None: one call.
    chunk_problems: Optional[int] = None
    shard: Optional[Shard] = None  # this job's part of each benchmark (None: all of it); needs chunk_problems
    # Choices made outside the harness that change the outputs too (backend, chat template, tokenizer, weight
    # precision, context limit): recorded in the fingerprint.
    setup: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def fingerprint(self, benchmark: str, model: str) -> dict:
        """What decides a benchmark's outputs; a stored file with another fingerprint is regenerated. ``model``
        names the weights themselves (a save dir's current ``iter_*`` checkpoint, not the save dir)."""
        return {"benchmark": benchmark, "model": model, "sampling": dataclasses.asdict(self.sampling),
                "num_samples": self.num_samples, "seed": self.seed, "limit": self.limit,
                "instruction": self.instruction, "instruction_role": self.instruction_role,
                "data_dir": str(Path(self.data_dir).resolve()), "chunk_problems": self.chunk_problems,
                "setup": self.setup, **_prompt_layout(benchmark, self.instruction, self.instruction_role)}


def _prompt_layout(benchmark: str, instruction: Optional[str], instruction_role: str) -> dict:
    """A multiple-choice benchmark's prompt around a placeholder problem (its exemplars and layout, which code
    changes may change: stored results made with another one are regenerated); {} for open problems, whose prompt
    is the question and the instruction, both in the fingerprint already."""
    if not is_multiple_choice(benchmark):
        return {}
    placeholder = Problem(benchmark, 0, "<question>", "", ("<A>", "<B>", "<C>", "<D>"))
    return {"prompt_layout": build_messages(placeholder, instruction, instruction_role)}


def results_path(output_dir: str | Path, benchmark: str, shard: Optional[Shard] = None) -> Path:
    """Where a benchmark's results go: ``<benchmark>.jsonl``, or a shard's part under ``shards/``."""
    if shard is None:
        return Path(output_dir) / f"{benchmark}.jsonl"
    return Path(output_dir) / "shards" / f"{benchmark}.shard{shard.index}-of-{shard.count}.jsonl"


def _shard_fingerprint(fingerprint: dict, shard: Shard) -> dict:
    return {**fingerprint, "shard": [shard.index, shard.count]}


def run_evaluation(backend: GenerationBackend, encoder: ConversationEncoder, settings: EvalSettings,
                   model_name: str) -> Optional[dict]:
    """Evaluate every benchmark in ``settings``; the writer process returns the summary, the others None."""
    if settings.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {settings.num_samples}")
    if settings.num_samples > 1 and settings.sampling.greedy:
        raise ValueError("num_samples > 1 with temperature 0 would repeat one greedy answer; set a temperature")
    if settings.shard is not None and not settings.chunk_problems:
        raise ValueError("a shard is a run of generation chunks: set chunk_problems (--chunk-problems > 0)")
    for name, value in (("chunk_problems", settings.chunk_problems), ("limit", settings.limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or unset), got {value}")
    output_dir = Path(settings.output_dir)
    if backend.is_writer:
        output_dir.mkdir(parents=True, exist_ok=True)
    for benchmark in settings.benchmarks:
        _evaluate_benchmark(backend, encoder, settings, benchmark, model_name, output_dir)
    if not backend.is_writer:
        return None
    unmerged = [name for name in settings.benchmarks if not results_path(output_dir, name).is_file()]
    if unmerged:  # a shard finished before its siblings: the last of them writes the table
        log.info("%s: waiting for the other shards; the shard that finishes last merges them and writes the table",
                 ", ".join(unmerged))
        return None
    summary = summarize(output_dir, settings.benchmarks)
    write_summary(summary, output_dir)
    return summary


def _stored_meta(path: Path, overwrite: bool = False) -> Optional[dict]:
    """The ``.meta.json`` of the complete results at ``path`` (None: none, or ``overwrite``)."""
    meta_path = path.with_suffix(".meta.json")
    if overwrite or not (path.is_file() and meta_path.is_file()):
        return None
    return json.loads(meta_path.read_text())


def _stored_settings(path: Path, overwrite: bool = False) -> Optional[dict]:
    """The fingerprint of the complete results at ``path`` (None: none, or ``overwrite``)."""
    meta = _stored_meta(path, overwrite)
    return None if meta is None else meta.get("settings") or {}


def _finished_results(settings: EvalSettings, benchmark: str, model_name: str) -> Optional[Path]:
    """The file holding ``benchmark``'s complete results made with these settings, or, for a shard, its part's;
    None when there is none."""
    fingerprint, shard = settings.fingerprint(benchmark, model_name), settings.shard
    merged = results_path(settings.output_dir, benchmark)
    if _stored_settings(merged, settings.overwrite) == fingerprint:
        return merged
    part = None if shard is None else results_path(settings.output_dir, benchmark, shard)
    if part is not None and _stored_settings(part, settings.overwrite) == _shard_fingerprint(fingerprint, shard):
        return part
    return None


def finished_with(settings: EvalSettings, benchmark: str, model_name: str) -> bool:
    """Whether ``benchmark`` (a shard: its part) is finished with these settings (a run skips it; the CLI checks
    this before it loads a model, so a resubmitted finished job costs no weight loading)."""
    return _finished_results(settings, benchmark, model_name) is not None


def _evaluate_benchmark(backend: GenerationBackend, encoder: ConversationEncoder, settings: EvalSettings,
                        benchmark: str, model_name: str, output_dir: Path) -> None:
    fingerprint = settings.fingerprint(benchmark, model_name)
    merged_path, shard = results_path(output_dir, benchmark), settings.shard
    path = results_path(output_dir, benchmark, shard)
    done = _finished_results(settings, benchmark, model_name)
    if done is not None:
        if backend.is_writer:
            log.info("%s: %s already holds results with these settings; skipped (--overwrite redoes it)",
                     benchmark, done)
            if done != merged_path:  # this part is done: perhaps the last one, whose merge was lost
                merge_shards(output_dir, benchmark, fingerprint)
        return
    stored = _stored_settings(merged_path, settings.overwrite)
    if stored is not None and backend.is_writer:
        changed = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
        log.info("%s: %s was made with other settings (%s differ): regenerating", benchmark, merged_path,
                 ", ".join(changed))
    problems, gold_issues = load_benchmark(benchmark, settings.data_dir)
    if settings.limit is not None:
        problems = problems[: settings.limit]
        gold_issues = [issue for issue in gold_issues if issue.idx < settings.limit]
    first_chunk, identity = 0, fingerprint
    if shard is not None:
        size, total = settings.chunk_problems, -(-len(problems) // settings.chunk_problems)
        mine = shard.chunks(total)
        first_chunk, identity = mine.start, _shard_fingerprint(fingerprint, shard)
        problems = problems[mine.start * size: mine.stop * size]
        ours = {problem.idx for problem in problems}
        gold_issues = [issue for issue in gold_issues if issue.idx in ours]
        if backend.is_writer:
            log.info("%s: shard %d/%d takes chunks [%d, %d) of %d: %d problems", benchmark, shard.index,
                     shard.count, mine.start, mine.stop, total, len(problems))
    if backend.is_writer and gold_issues:
        log.info("%s: %d gold answers flagged (kept, see load_benchmark): %s", benchmark, len(gold_issues),
                 "; ".join(f"idx {issue.idx}: {issue.reason}" for issue in gold_issues[:3]))
    evaluate_problems(backend, encoder, settings, benchmark, problems, path, extra_meta={"settings": identity},
                      first_chunk=first_chunk)
    if shard is not None and backend.is_writer:
        merge_shards(output_dir, benchmark, fingerprint)


def evaluate_problems(backend: GenerationBackend, encoder: ConversationEncoder, settings: EvalSettings,
                      benchmark: str, problems: Sequence[Problem], results_path: Path,
                      extra_meta: Optional[dict] = None, first_chunk: int = 0) -> Optional[List[dict]]:
    """Generate ``settings.num_samples`` responses per problem, grade them with ``benchmark``'s extraction rules
    and write ``results_path`` (+ ``.meta.json``); the writer process returns the records. ``first_chunk``: the
    benchmark's chunk that ``problems`` starts at (a shard's), which picks the chunks' seeds."""
    prompts = [encoded.input_ids.tolist() for encoded in encoder.encode_batch(
        [build_messages(problem, settings.instruction, settings.instruction_role) for problem in problems],
        add_generation_prompt=True)]
    fits = [len(prompt) < backend.max_sequence_length for prompt in prompts]
    too_long = fits.count(False)
    n = settings.num_samples
    size = settings.chunk_problems or max(1, len(problems))
    # A chunk is a run of problems (those over the context send no rows), so shards cut the same chunks.
    chunks = [[prompt for prompt, ok in zip(prompts[start:start + size], fits[start:start + size]) if ok
               for _ in range(n)] for start in range(0, len(problems), size)]
    if backend.is_writer:
        log.info("%s: %d problems x %d samples (%d prompts over the %d-token context are scored wrong)",
                 benchmark, len(problems), n, too_long, backend.max_sequence_length)
    started = time.perf_counter()
    report = ProgressLog(benchmark, "generated", "responses", enabled=backend.is_writer)
    generations, restored = _generate_in_chunks(backend, settings, chunks, first_chunk, results_path,
                                                extra_meta or {}, benchmark, report)
    if not backend.is_writer:
        return None
    generated_tokens = sum(len(g.token_ids) for g in generations)
    timed_tokens = sum(len(g.token_ids) for g in generations[restored:])  # a killed run's seconds are not known
    seconds = time.perf_counter() - started
    records = _grade(problems, fits, generations, encoder, n, benchmark)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    # The .meta.json marks the results complete (a rerun skips them): the old one goes first and the new one is
    # written last, each file through a rename, so a job killed mid-write never leaves a truncated file marked done.
    meta_path = results_path.with_suffix(".meta.json")
    meta_path.unlink(missing_ok=True)
    write_atomically(results_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    write_atomically(meta_path, json.dumps({
        **(extra_meta or {}), "prompts_too_long": too_long, "generated_tokens": generated_tokens,
        "timed_tokens": timed_tokens, "generation_seconds": round(seconds, 2),
        "tokens_per_second": round(timed_tokens / max(seconds, 1e-9), 1),
    }, indent=2) + "\n")
    _progress_path(results_path).unlink(missing_ok=True)
    accuracy = 100.0 * sum(sum(r["score"]) for r in records) / max(1, n * len(records))
    log.info("%s: accuracy %.2f%% over %d responses, %d tokens in %.1f s -> %s", benchmark, accuracy,
             n * len(records), generated_tokens, seconds, results_path)
    return records


# Chunk c samples with seed + c * CHUNK_SEED_STRIDE: a resumed run draws what an uninterrupted one would.
CHUNK_SEED_STRIDE = 100_003


def _progress_path(results_path: Path) -> Path:
    return results_path.with_name(results_path.name + ".progress")


def _generate_in_chunks(backend: GenerationBackend, settings: EvalSettings, chunks: List[List[List[int]]],
                        first_chunk: int, results_path: Path, identity: dict, benchmark: str,
                        report: ProgressLog) -> tuple[List[Generation], int]:
    """Generations of every chunk's rows, and how many of them were read back rather than generated (the first
    ones); one generate call per chunk, chunk ``c`` sampled with
    ``seed + CHUNK_SEED_STRIDE * (first_chunk + c)``. The writer appends each finished chunk to the progress file
    (first line: ``identity``, the results' fingerprint); a rerun with the same identity reads the finished chunks
    back, a torn last line included, and generates the rest. Every process reads the file before the first generate
    call, which the writer cannot finish alone, so all agree on where to resume."""
    rows = sum(map(len, chunks))
    path = _progress_path(results_path)
    finished = [] if settings.overwrite else _finished_chunks(path, identity, [len(chunk) for chunk in chunks])
    if backend.is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(identity) + "\n" + "".join(
            _chunk_line(index, chunk) for index, chunk in enumerate(finished)))
        if finished:
            log.info("%s: resuming after %d of %d chunks (%d of %d responses) from %s", benchmark, len(finished),
                     len(chunks), sum(map(len, finished)), rows, path)
    generations = [generation for chunk in finished for generation in chunk]
    restored = len(generations)
    report.start(restored)
    for index in range(len(finished), len(chunks)):
        done = len(generations)
        # A chunk whose prompts are all over the context has nothing to send (every process skips it alike).
        part = backend.generate(chunks[index], settings.sampling,
                                settings.seed + CHUNK_SEED_STRIDE * (first_chunk + index),
                                lambda count, total: report(done + count, rows)) if chunks[index] else []
        if backend.is_writer:
            with open(path, "a", encoding="utf-8") as stream:
                stream.write(_chunk_line(index, part))
                stream.flush()
                os.fsync(stream.fileno())
        generations += part
    return generations, restored


def merge_shards(output_dir: str | Path, benchmark: str, fingerprint: Optional[dict] = None) -> bool:
    """Join ``benchmark``'s shards into ``<benchmark>.jsonl`` once every part of one split is finished with the
    same settings (``fingerprint``'s, when given), then delete the parts. Returns whether it merged. Two shards
    finishing at once may both merge: each write is a rename of identical contents."""
    shard_dir = Path(output_dir) / "shards"
    counts = sorted({int(path.stem.rpartition("-of-")[2]) for path in shard_dir.glob(f"{benchmark}.shard*-of-*.jsonl")})
    for count in counts:
        paths = [results_path(output_dir, benchmark, Shard(index, count)) for index in range(count)]
        metas = [_stored_meta(path) for path in paths]
        if any(meta is None for meta in metas):
            continue
        settings = [meta.get("settings") or {} for meta in metas]
        merged = {key: value for key, value in settings[0].items() if key != "shard"}
        if fingerprint is not None and merged != fingerprint:
            continue
        if any(stored != _shard_fingerprint(merged, Shard(index, count)) for index, stored in enumerate(settings)):
            log.warning("%s: its %d shards in %s were made with different settings; not merged", benchmark, count,
                        shard_dir)
            continue
        target = results_path(output_dir, benchmark)
        target.with_suffix(".meta.json").unlink(missing_ok=True)
        write_atomically(target, "".join(path.read_text(encoding="utf-8") for path in paths))
        totals = {key: sum(meta.get(key, 0) for meta in metas)
                  for key in ("prompts_too_long", "generated_tokens", "generation_seconds")}
        totals["timed_tokens"] = sum(meta.get("timed_tokens", meta.get("generated_tokens", 0)) for meta in metas)
        write_atomically(target.with_suffix(".meta.json"), json.dumps({
            "settings": merged, "shards": count, **totals,
            "tokens_per_second": round(totals["timed_tokens"] / max(totals["generation_seconds"], 1e-9), 1),
        }, indent=2) + "\n")
        for path in paths:
            path.with_suffix(".meta.json").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        log.info("%s: merged its %d shards into %s", benchmark, count, target)
        return True
    return False


def _chunk_line(index: int, generations: Sequence[Generation]) -> str:
    return json.dumps({"chunk": index, "generations": [[g.token_ids, g.finish_reason] for g in generations]}) + "\n"


def _finished_chunks(path: Path, identity: dict, sizes: List[int]) -> List[List[Generation]]:
    """The chunks a progress file holds in order, up to the first one missing, torn or of the wrong size; none
    when it belongs to other settings."""
    if not path.is_file():
        return []
    finished = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if number == 0:
                if record != identity:
                    return []
                continue
            index = len(finished)
            if index >= len(sizes) or record.get("chunk") != index or len(record["generations"]) != sizes[index]:
                break
            finished.append([Generation(list(ids), reason) for ids, reason in record["generations"]])
    return finished


def _grade(problems, fits: Sequence[bool], generations: Sequence[Generation], encoder: ConversationEncoder,
           n: int, benchmark: str) -> List[dict]:
    from acemath_mcore.eval.grader import extract_answer, is_equal

    stop_ids = set(encoder.stop_ids)
    records, cursor = [], 0
    for problem, fit in zip(problems, fits):
        if fit:
            mine, cursor = generations[cursor:cursor + n], cursor + n
            texts = [encoder.tokenizer.decode([t for t in g.token_ids if t not in stop_ids]) for g in mine]
            reasons = [g.finish_reason for g in mine]
            lengths = [len(g.token_ids) for g in mine]
        else:
            texts, reasons, lengths = [""] * n, [PROMPT_TOO_LONG] * n, [0] * n
        answers = [extract_answer(text, benchmark) if fit else "" for text in texts]
        # The question as a reward model must read it: a multiple-choice one with its choices.
        question = format_multiple_choice(problem.question, problem.choices) if problem.choices else problem.question
        records.append({
            "idx": problem.idx, "question": question, "gt": problem.gold, "code": texts, "pred": answers,
            "score": [bool(fit) and is_equal(answer, problem.gold) for answer in answers],
            "finish_reason": reasons, "num_tokens": lengths,
        })
    return records


def summarize(output_dir: str | Path, benchmarks: Optional[Sequence[str]] = None) -> dict:
    """Metrics of every ``<benchmark>.jsonl`` in ``output_dir`` (or the named ones): ``pass@1`` is the mean
    accuracy over all responses (greedy pass@1 when there is one per problem); with n > 1 also ``maj@n`` and
    ``pass@n``. ``average`` is the plain mean of pass@1 over the benchmarks present."""
    from acemath_mcore.eval.bestofn import mean_accuracy_percent, metrics_at_k, read_records

    output_dir = Path(output_dir)
    # Without a list: every benchmark this harness wrote (its .meta.json beside it), not other JSONL files such as
    # RM-scored copies (math.scored.jsonl) that best-of-n work leaves in the same directory.
    names = list(benchmarks) if benchmarks else sorted(p.stem for p in output_dir.glob("*.jsonl")
                                                       if (output_dir / f"{p.stem}.meta.json").is_file())
    if not names:
        raise FileNotFoundError(f"no benchmark results (<benchmark>.jsonl with its .meta.json) in {output_dir}")
    rows, settings = {}, {}
    for name in names:
        path = output_dir / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no results for benchmark {name!r}: {path} is missing")
        records = read_records(path)
        n = records[0].n
        row = {"problems": len(records), "samples": n,
               "pass@1": mean_accuracy_percent(records), "responses_cut_off": _responses_cut_off(path)}
        if n > 1:
            row.update(metrics_at_k(records, n))
        meta = output_dir / f"{name}.meta.json"
        if meta.is_file():
            stored = json.loads(meta.read_text())
            row["prompts_too_long"] = stored.get("prompts_too_long", 0)
            settings[name] = {key: value for key, value in (stored.get("settings") or {}).items()
                              if key not in ("benchmark", "prompt_layout")}  # each benchmark's own
        rows[name] = row
    average = sum(row["pass@1"] for row in rows.values()) / max(1, len(rows))
    summary = {"benchmarks": rows, "average": average}
    if set(TABLE3_BENCHMARKS) < set(rows):  # also the paper's average, when more than its 7 columns ran
        summary["table3_average"] = sum(rows[name]["pass@1"] for name in TABLE3_BENCHMARKS) / len(TABLE3_BENCHMARKS)
    mixed = _settings_outliers(settings)
    if mixed:
        summary["mixed_settings"] = mixed
    return summary


def _responses_cut_off(path: Path) -> int:
    """Responses that hit the token limit (``finish_reason`` "length"): graded on the toolkit's fallback answer,
    their last number, which moves pass@1 and maj@k."""
    with open(path, encoding="utf-8") as stream:
        return sum(reason == "length" for line in stream if line.strip()
                   for reason in json.loads(line).get("finish_reason", []))


def _settings_outliers(settings: Dict[str, dict]) -> Dict[str, List[str]]:
    """Benchmarks generated with other settings (model, sampling, seed, ...) than the most common ones, with the
    keys that differ: a directory can mix runs (an array rerun with new settings, half done), and a table that
    averages them would compare different models or decoding without saying so."""
    if len(settings) < 2:
        return {}
    encoded = {name: json.dumps(value, sort_keys=True) for name, value in settings.items()}
    counts: Dict[str, int] = {}
    for value in encoded.values():
        counts[value] = counts.get(value, 0) + 1
    common = settings[next(name for name, value in encoded.items() if counts[value] == max(counts.values()))]
    return {name: sorted(key for key in set(value) | set(common) if value.get(key) != common.get(key))
            for name, value in settings.items() if value != common}


def format_summary(summary: dict) -> str:
    """Markdown table: one row per benchmark (Table 3 order first) and the average."""
    rows = summary["benchmarks"]
    order = [name for name in TABLE3_BENCHMARKS if name in rows] + [n for n in rows if n not in TABLE3_BENCHMARKS]
    extra = sorted({key for row in rows.values() for key in row if "@" in key and key != "pass@1"})
    header = ["benchmark", "problems", "samples", "pass@1", *extra]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|" + "---:|" * len(extra)]
    for name in order:
        row = rows[name]
        cells = [f"{row[key]:.2f}" if key in row else "" for key in extra]
        lines.append(f"| {name} | {row['problems']} | {row['samples']} | {row['pass@1']:.2f} |"
                     + "".join(f" {cell} |" for cell in cells))
    lines.append(f"| **average** | | | **{summary['average']:.2f}** |" + " |" * len(extra))
    if "table3_average" in summary:
        lines.append(f"| **Table 3 average** ({len(TABLE3_BENCHMARKS)} benchmarks) | | | "
                     f"**{summary['table3_average']:.2f}** |" + " |" * len(extra))
    too_long = {name: row["prompts_too_long"] for name, row in rows.items() if row.get("prompts_too_long")}
    if too_long:
        lines.append("\nPrompts over the context, scored wrong: "
                     + ", ".join(f"{name} {count}" for name, count in too_long.items()))
    cut_off = {name: (row["responses_cut_off"], row["problems"] * row["samples"]) for name, row in rows.items()
               if row.get("responses_cut_off")}
    if cut_off:
        lines.append("\nResponses cut off at the token limit (graded on their last number): "
                     + ", ".join(f"{name} {count} of {total}" for name, (count, total) in cut_off.items()))
    if summary.get("mixed_settings"):
        lines.append("\n**Not comparable:** made with other settings than the rest: " + ", ".join(
            f"{name} ({', '.join(keys)})" for name, keys in summary["mixed_settings"].items()))
    return "\n".join(lines)


def write_summary(summary: dict, output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "summary.md").write_text(format_summary(summary) + "\n")
