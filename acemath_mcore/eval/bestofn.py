"""Best-of-n metrics (rm@k, maj@k, pass@k) with the AceMath-RewardBench protocol.

For each k, k of a problem's n candidates are drawn at random without replacement and kept in their original order;
rm@k is correct when the candidate with the highest reward-model score is (ties: the first maximum in that order),
maj@k when the largest answer group is (ties: the group whose first member comes first; candidates with no extracted
answer do not vote, and a draw without any answer counts as wrong), pass@k when any drawn candidate is.  Draws are
repeated for `seeds` seeds (seed s drives one `random.Random(s)` over the records in file order) and averaged;
k = n uses all candidates once, so it needs no sampling and matches the paper's single numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from acemath_mcore.eval.benchmarks import BENCHMARKS
from acemath_mcore.eval.grader import extract_answer, is_equal

METRICS = ("rm", "maj", "pass")
NO_ANSWER = -1  # answer-group id of a candidate whose answer is empty: it takes no part in the vote


class RecordError(ValueError):
    """An input record that cannot be evaluated; the message names file:line:field."""


@dataclass(frozen=True)
class Record:
    """One problem's candidates: correctness, reward scores (None if absent) and answer-group ids (None if absent)."""

    correct: tuple[bool, ...]
    rm_scores: tuple[float, ...] | None
    answer_groups: tuple[int, ...] | None
    source: str = ""  # "file:line", for errors found after parsing

    @property
    def n(self) -> int:
        return len(self.correct)


def group_answers(answers: Sequence[str], equivalent: Callable[[str, str], bool] | None = None) -> tuple[int, ...]:
    """Group id per answer, numbered in order of first appearance.  Identical strings always share a group; with
    `equivalent` (e.g. the grader's `is_equal`) an answer also joins the first earlier group it is equivalent to.
    An empty answer (nothing extracted: no boxed answer, answer phrase or number) gets ``NO_ANSWER``; otherwise a
    handful of answerless responses could outvote the real answers. A cut-off response usually has one (the
    extraction falls back to its last number) and votes, as in the Qwen2.5-Math toolkit."""
    representatives: list[str] = []
    groups = []
    for answer in answers:
        if not answer.strip():
            groups.append(NO_ANSWER)
            continue
        group = next((index for index, rep in enumerate(representatives) if rep == answer), None)
        if group is None and equivalent is not None:
            group = next((index for index, rep in enumerate(representatives) if equivalent(answer, rep)), None)
        if group is None:
            representatives.append(answer)
            group = len(representatives) - 1
        groups.append(group)
    return tuple(groups)


def _list_field(row: dict, name: str, where: str, length: int | None = None) -> list:
    value = row.get(name)
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}:{name}: expected a non-empty list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise RecordError(f"{where}:{name}: expected {length} entries (one per candidate), got {len(value)}")
    return value


def _rm_score(value, where: str) -> float:
    """Reward scores come as a bare number or as a one-element list (the toolkit's format)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        # A NaN would win or lose every rm@k comparison by its position, not its score.
        raise RecordError(f"{where}:pred_score: expected a finite number or [number], got {value!r}")
    return float(value)


def parse_record(
    row: dict,
    where: str,
    regrade: bool = False,
    group_by_equivalence: bool = False,
    benchmark: str = "math",
) -> Record:
    """One JSON record as a `Record`; `where` ("file:line") prefixes every error.

    With `regrade`, answers and correctness come from our grader applied to ``code`` and ``gt`` instead of the
    record's own ``pred`` and ``score``.
    """
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    equivalent = is_equal if group_by_equivalence else None
    if regrade:
        responses = _list_field(row, "code", where)
        if "gt" not in row:
            raise RecordError(f"{where}:gt: missing (needed to regrade)")
        answers = [extract_answer(str(response), benchmark) for response in responses]
        correct = [is_equal(answer, str(row["gt"])) for answer in answers]
    else:
        correct = _list_field(row, "score", where)
        if not all(isinstance(flag, bool) or flag in (0, 1) for flag in correct):
            raise RecordError(f"{where}:score: expected booleans, got {correct!r}")
        answers = [str(answer) for answer in _list_field(row, "pred", where, len(correct))] if "pred" in row else None
    n = len(correct)
    rm_scores = None
    if "pred_score" in row:
        rm_scores = tuple(_rm_score(value, where) for value in _list_field(row, "pred_score", where, n))
    return Record(
        correct=tuple(bool(flag) for flag in correct),
        rm_scores=rm_scores,
        answer_groups=None if answers is None else group_answers(answers, equivalent),
        source=where,
    )


def read_records(
    path: str | Path,
    regrade: bool = False,
    group_by_equivalence: bool = False,
    benchmark: str = "math",
    progress: Callable[[str], None] | None = None,
) -> list[Record]:
    """All records of a JSON-lines file (blank lines skipped); errors name file:line:field."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        lines = handle.readlines()
    report_every = max(1, len(lines) // 10)
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecordError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
        records.append(parse_record(row, where, regrade, group_by_equivalence, benchmark))
        if progress and (line_number % report_every == 0 or line_number == len(lines)):
            progress(f"read {line_number}/{len(lines)} lines")
    if not records:
        raise RecordError(f"{path}: no records")
    return records


def _subset_outcomes(record: Record, subset: Sequence[int]) -> dict[str, bool]:
    """Correctness of each selection rule on one drawn subset (indices in original order)."""
    outcomes = {"pass": any(record.correct[index] for index in subset)}
    if record.rm_scores is not None:
        best = max(subset, key=lambda index: record.rm_scores[index])  # max() keeps the first maximum
        outcomes["rm"] = record.correct[best]
    if record.answer_groups is not None:
        votes: dict[int, list[int]] = {}
        for index in subset:
            if record.answer_groups[index] != NO_ANSWER:
                votes.setdefault(record.answer_groups[index], []).append(index)
        # dicts keep first-appearance order, so ties go to the earliest group
        outcomes["maj"] = bool(votes) and record.correct[max(votes.values(), key=len)[0]]
    return outcomes


def metrics_at_k(records: Sequence[Record], k: int, seeds: int = 100) -> dict[str, float]:
    """rm@k, maj@k and pass@k in percent (keys like "rm@8"); a metric whose inputs are missing is left out."""
    if k < 1 or seeds < 1:
        raise ValueError(f"k and seeds must be >= 1, got k={k}, seeds={seeds}")
    too_small = next((record for record in records if record.n < k), None)
    if too_small is not None:
        raise RecordError(f"{too_small.source}:score: k={k} but the record has only {too_small.n} candidates")
    hits = dict.fromkeys(METRICS, 0)
    draws = 0
    for seed in range(seeds if any(record.n > k for record in records) else 1):
        rng = random.Random(seed)
        for record in records:
            subset = range(record.n) if record.n == k else sorted(rng.sample(range(record.n), k))
            for metric, correct in _subset_outcomes(record, subset).items():
                hits[metric] += correct
        draws += 1
    available = {"pass"}
    if all(record.rm_scores is not None for record in records):
        available.add("rm")
    if all(record.answer_groups is not None for record in records):
        available.add("maj")
    total = draws * len(records)
    return {f"{metric}@{k}": 100.0 * hits[metric] / total for metric in METRICS if metric in available}


def mean_accuracy_percent(records: Sequence[Record]) -> float:
    """Accuracy over every candidate of every record: the expected pass@1 of one random sample."""
    return 100.0 * sum(sum(record.correct) for record in records) / sum(record.n for record in records)


def k_ladder(k_max: int) -> list[int]:
    """1, 2, 4, ... up to `k_max`, and `k_max` itself: the rows of the paper's best-of-n table."""
    ladder = [1]
    while ladder[-1] * 2 <= k_max:
        ladder.append(ladder[-1] * 2)
    return ladder if ladder[-1] == k_max else [*ladder, k_max]


def evaluate(
    records: Sequence[Record],
    k_max: int,
    seeds: int = 100,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for k in k_ladder(k_max):
        metrics.update(metrics_at_k(records, k, seeds))
        if progress:
            at_k = [f"{name}={value:.2f}" for name, value in metrics.items() if name.endswith(f"@{k}")]
            progress(f"k={k}: " + ", ".join(at_k))
    return metrics


def format_table(metrics: dict[str, float], ks: Sequence[int]) -> str:
    """Markdown table with one row per k and one column per metric."""
    present = [metric for metric in METRICS if f"{metric}@{ks[0]}" in metrics]
    lines = [
        "| k | " + " | ".join(f"{metric}@k" for metric in present) + " |",
        "|---:|" + "---:|" * len(present),
    ]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{metrics[f'{metric}@{k}']:.2f}" for metric in present) + " |")
    return "\n".join(lines)


def benchmark_summary(directory: str | Path, benchmarks: Sequence[str]) -> dict:
    """Several benchmarks' results side by side (each ``<benchmark>.bestofn.json`` in ``directory``, as ``--json``
    writes it): per benchmark pass@1 and, at k = n (all its candidates), maj@n, rm@n and pass@n; then their plain
    means, and the means over the paper's Table 3 benchmarks when more than those ran."""
    from acemath_mcore.eval.harness import TABLE3_BENCHMARKS

    rows = {}
    for name in benchmarks:
        path = Path(directory) / f"{name}.bestofn.json"
        if not path.is_file():
            raise FileNotFoundError(f"no best-of-n results for {name!r}: {path} is missing")
        stored = json.loads(path.read_text(encoding="utf-8"))
        ks = [int(key.partition("@")[2]) for key in stored if key.startswith("pass@")]
        if not ks or "records" not in stored or "pass@1" not in stored:
            raise ValueError(f"{path}: no 'records' or 'pass@k' fields (not written by launch/bestofn.py --json)")
        n = max(ks)
        rows[name] = {"problems": stored["records"], "n": n, "pass@1": stored["pass@1"],
                      **{f"{metric}@n": stored[f"{metric}@{n}"] for metric in ("maj", "rm", "pass")
                         if f"{metric}@{n}" in stored}}
    columns = [key for key in ("pass@1", "maj@n", "rm@n", "pass@n") if all(key in row for row in rows.values())]
    summary = {"benchmarks": rows, "average": {key: sum(row[key] for row in rows.values()) / len(rows)
                                               for key in columns}}
    if set(TABLE3_BENCHMARKS) < set(rows):
        summary["table3_average"] = {key: sum(rows[name][key] for name in TABLE3_BENCHMARKS) / len(TABLE3_BENCHMARKS)
                                     for key in columns}
    return summary


def format_benchmark_summary(summary: dict) -> str:
    """Markdown: one row per benchmark, then the average row(s)."""
    columns = list(summary["average"])
    lines = ["| benchmark | problems | n | " + " | ".join(columns) + " |", "|---|---:|---:|" + "---:|" * len(columns)]
    for name, row in summary["benchmarks"].items():
        lines.append(f"| {name} | {row['problems']} | {row['n']} | "
                     + " | ".join(f"{row[key]:.2f}" for key in columns) + " |")
    averages = [("**average**", summary["average"])]
    if "table3_average" in summary:
        averages.append(("**Table 3 average** (7 benchmarks)", summary["table3_average"]))
    for label, values in averages:
        lines.append(f"| {label} | | | " + " | ".join(f"**{values[key]:.2f}**" for key in columns) + " |")
    return "\n".join(lines)


def save_plot(metrics: dict[str, float], ks: Sequence[int], path: str | Path, title: str = "") -> None:
    """rm@k, maj@k and pass@k against k (log2 axis) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for metric, marker in zip(METRICS, "os^"):
        if f"{metric}@{ks[0]}" in metrics:
            axis.plot(ks, [metrics[f"{metric}@{k}"] for k in ks], marker=marker, label=f"{metric}@k")
    axis.set_xscale("log", base=2)
    axis.set_xticks(list(ks), [str(k) for k in ks])
    axis.set_xlabel("k (candidates per problem)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="rm@k / maj@k / pass@k from scored best-of-n samples.")
    parser.add_argument("--input", type=Path, help="JSON lines with score, pred_score, pred (or code + gt)")
    parser.add_argument("--k", type=int,
                        help="largest k; results for 1, 2, 4, ..., k (default: the fewest candidates of any record)")
    parser.add_argument("--summarize", type=Path, metavar="DIR",
                        help="instead: tabulate the <benchmark>.bestofn.json files (--json) of --benchmarks in DIR "
                             "into DIR/bestofn.md and bestofn.json")
    parser.add_argument("--benchmarks", help="with --summarize: comma list of benchmarks, in table order")
    parser.add_argument("--if-complete", action="store_true",
                        help="with --summarize: when a benchmark has no results yet, say which and exit 0")
    parser.add_argument("--seeds", type=int, default=100, help="random draws averaged for k < n (default 100)")
    parser.add_argument("--json", type=Path, help="write metrics as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the metrics against k here")
    parser.add_argument("--table", action="store_true", help="print a markdown table (one row per k)")
    parser.add_argument("--regrade", action="store_true", help="recompute answers and correctness from code + gt")
    parser.add_argument(
        "--group-by-equivalence", action="store_true", help="maj@k groups answers the grader calls equal"
    )
    parser.add_argument("--benchmark", default="math", choices=BENCHMARKS,
                        help="answer extraction rules for --regrade (default math)")
    return parser


def _summarize(args: argparse.Namespace) -> int:
    if not args.benchmarks:
        print("error: --summarize needs --benchmarks", file=sys.stderr)
        return 2
    names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    missing = [name for name in names if not (args.summarize / f"{name}.bestofn.json").is_file()]
    if missing and args.if_complete:
        print(f"no table yet: no best-of-n results for {', '.join(missing)} in {args.summarize}", file=sys.stderr)
        return 0
    try:
        summary = benchmark_summary(args.summarize, names)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = format_benchmark_summary(summary)
    (args.summarize / "bestofn.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (args.summarize / "bestofn.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


# The options of each mode, so that one given to the other mode is refused instead of ignored.
_SCORING_ONLY = ("input", "k", "json", "plot", "table", "regrade", "group_by_equivalence", "benchmark")
_SUMMARIZE_ONLY = ("benchmarks", "if_complete")


def _misplaced_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The options given (not at their defaults) that belong to the mode not chosen."""
    other = _SCORING_ONLY if args.summarize else _SUMMARIZE_ONLY
    return ["--" + name.replace("_", "-") for name in other if getattr(args, name) != parser.get_default(name)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    misplaced = _misplaced_options(args, parser)
    if misplaced and args.summarize:
        print(f"error: {', '.join(misplaced)} score an --input file; --summarize only tabulates the finished "
              "<benchmark>.bestofn.json files", file=sys.stderr)
        return 2
    if misplaced:
        print(f"error: {', '.join(misplaced)} {'go' if len(misplaced) > 1 else 'goes'} with --summarize DIR (the "
              "regrading rules of --input's benchmark are --benchmark NAME)", file=sys.stderr)
        return 2
    if args.summarize:
        return _summarize(args)
    if args.input is None:
        print("error: --input is required (or --summarize DIR --benchmarks ...)", file=sys.stderr)
        return 2

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        progress(f"reading {args.input}")
        records = read_records(args.input, args.regrade, args.group_by_equivalence, args.benchmark, progress)
        fewest = min(r.n for r in records)
        progress(f"{len(records)} records, n = {fewest}..{max(r.n for r in records)} candidates")
        k = fewest if args.k is None else args.k
        if args.k is None:
            progress(f"k up to {fewest}, the fewest candidates of a record (--k sets it)")
        metrics = evaluate(records, k, args.seeds, progress)
    except (OSError, RecordError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ks = k_ladder(k)
    if args.table:
        print(format_table(metrics, ks))
    else:
        print("\n".join(f"{name} = {value:.2f}" for name, value in metrics.items()))
    if args.json:
        summary = {
            "input": str(args.input),
            "records": len(records),
            "seeds": args.seeds,
            "regrade": args.regrade,
            "grouping": "equivalence" if args.group_by_equivalence else "exact",
            **metrics,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        progress(f"wrote {args.json}")
    if args.plot:
        save_plot(metrics, ks, args.plot, title=args.input.name)
        progress(f"wrote {args.plot}")
    return 0
