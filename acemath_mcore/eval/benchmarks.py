"""Loaders and prompts for the ten math benchmarks of the AceMath / Qwen2.5-Math evaluation suite.

Each benchmark stores its gold answer differently (after ``####``, in the last ``\\boxed{}`` of a worked solution,
``$``-wrapped, a choice index ...); the rules below are the ones the Qwen2.5-Math toolkit applies, so accuracies are
comparable with the paper.  A few golds are unusable (blank, or reduced to nothing by the reference normalisation):
they are loaded anyway and listed in a report, because silently dropping them would change the denominators.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from acemath_mcore.eval.grader import CHOICE_LETTERS, last_boxed_content
from acemath_mcore.eval.mmlu_fewshot import DEFAULT_MMLU_EXEMPLARS, Exemplar

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class BenchmarkFormatError(ValueError):
    """A benchmark file that cannot be read as the expected JSON lines; the message names file:line[:field]."""


@dataclass(frozen=True)
class Problem:
    benchmark: str
    idx: int  # 0-based row in test.jsonl: the index the toolkit and the data README use
    question: str
    gold: str
    choices: tuple[str, ...] = ()
    line: int = 0  # 1-based line in test.jsonl, for pointing a person at the raw row


@dataclass(frozen=True)
class GoldIssue:
    benchmark: str
    idx: int
    line: int
    gold: str
    reason: str


def _field(row: dict, name: str, where: str):
    if name not in row:
        raise BenchmarkFormatError(f"{where}:{name}: missing field")
    return row[name]


def _strip_dollars(value) -> str:
    return str(value).replace("$", "").strip()


def _gsm8k_gold(row: dict, where: str) -> str:
    return str(_field(row, "answer", where)).split("####")[-1].strip()


def _boxed_solution_gold(row: dict, where: str) -> str:
    return (last_boxed_content(str(_field(row, "solution", where))) or "").strip()


def _olympiad_gold(row: dict, where: str) -> str:
    answers = _field(row, "final_answer", where)
    if not isinstance(answers, list) or not answers:
        raise BenchmarkFormatError(f"{where}:final_answer: expected a non-empty list, got {answers!r}")
    return _strip_dollars(answers[0])


def _mmlu_gold(row: dict, where: str) -> str:
    answer = _field(row, "answer", where)
    return CHOICE_LETTERS[answer] if isinstance(answer, int) and 0 <= answer < len(CHOICE_LETTERS) else ""


@dataclass(frozen=True)
class _Spec:
    question_field: str
    gold: Callable[[dict, str], str]
    multiple_choice: bool = False


_SPECS: dict[str, _Spec] = {
    "gsm8k": _Spec("question", _gsm8k_gold),
    "math": _Spec("problem", _boxed_solution_gold),
    "math500": _Spec("problem", lambda row, where: str(_field(row, "answer", where)).strip()),
    "minerva_math": _Spec("problem", _boxed_solution_gold),
    "gaokao2023en": _Spec("question", lambda row, where: _strip_dollars(_field(row, "answer", where))),
    "olympiadbench": _Spec("question", _olympiad_gold),
    "college_math": _Spec("question", lambda row, where: _strip_dollars(_field(row, "answer", where))),
    "mmlu_stem": _Spec("question", _mmlu_gold, multiple_choice=True),
    "aime24": _Spec("problem", lambda row, where: str(_field(row, "answer", where)).strip()),
    "amc23": _Spec("question", lambda row, where: str(_field(row, "answer", where)).strip()),
}
BENCHMARKS: tuple[str, ...] = tuple(_SPECS)


def is_multiple_choice(benchmark: str) -> bool:
    return _SPECS[benchmark].multiple_choice


# Golds the reference normalisation deletes entirely: it drops \mbox{...} (used for units in MATH) and compass
# directions (unit words), so the toolkit marks every prediction for these problems wrong.
_REFERENCE_DELETED_GOLD = re.compile(
    r"\\mbox\{[^{}]*\}|\\text\{(?:east|west|north|south)\}|east|west|north|south", re.IGNORECASE
)


# Golds that cannot be graded as meant although they were read as written (found by reading the problems), keyed
# by benchmark and the question's opening.
_KNOWN_GOLD_ISSUES = {
    ("math", r"Let $\boxed{N}$ mean the number of whole number divisors of $N$."):
        "the solution boxes its steps (\\boxed{N} is notation here) and gives the answer, 6, unboxed: the gold read "
        "is the last step's 12",
    ("college_math", "The cost of a private pilot course is"):
        "two answers (the cost of each part) written as one number with a thousands separator, 325,950: a "
        "prediction '325, 950' matches it, '950, 325' does not",
}


def gold_issue(gold: str) -> str | None:
    """Why a gold answer cannot be graded as intended, or None when it looks usable."""
    if not gold.strip():
        return "empty gold answer"
    if _REFERENCE_DELETED_GOLD.fullmatch(gold.strip()):
        return "gold that the reference normalisation reduces to an empty string (the toolkit scores it 0)"
    if re.search(r"[A-Za-z]+:\s*$", gold):
        return "gold ends in a stray label (e.g. 'solution:')"
    return None


def load_benchmark(name: str, data_dir: str | Path) -> tuple[list[Problem], list[GoldIssue]]:
    """All problems of `name` from ``data_dir/<name>/test.jsonl`` and the report of suspicious golds."""
    if name not in _SPECS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    spec = _SPECS[name]
    path = Path(data_dir) / name / "test.jsonl"
    problems, issues = [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            if not raw_line.strip():
                continue
            try:
                row = json.loads(raw_line)
            except json.JSONDecodeError as error:
                raise BenchmarkFormatError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            choices: tuple[str, ...] = ()
            if spec.multiple_choice:
                choices = tuple(str(choice) for choice in _field(row, "choices", where))
                if len(choices) != len(CHOICE_LETTERS):
                    raise BenchmarkFormatError(f"{where}:choices: expected {len(CHOICE_LETTERS)}, got {len(choices)}")
            problem = Problem(
                benchmark=name,
                idx=len(problems),
                question=str(_field(row, spec.question_field, where)),
                gold=spec.gold(row, where),
                choices=choices,
                line=line_number,
            )
            problems.append(problem)
            reason = gold_issue(problem.gold) or next(
                (why for (benchmark, opening), why in _KNOWN_GOLD_ISSUES.items()
                 if benchmark == name and problem.question.startswith(opening)), None)
            if reason:
                issues.append(GoldIssue(name, problem.idx, line_number, problem.gold, reason))
    return problems, issues


def load_all(data_dir: str | Path) -> tuple[dict[str, list[Problem]], list[GoldIssue]]:
    """Every benchmark found under `data_dir`, keyed by name, and one combined gold report."""
    problems_by_benchmark, all_issues = {}, []
    for name in BENCHMARKS:
        problems_by_benchmark[name], issues = load_benchmark(name, data_dir)
        all_issues.extend(issues)
    return problems_by_benchmark, all_issues


def format_multiple_choice(question: str, choices: Sequence[str]) -> str:
    """The Qwen2.5-Math evaluation toolkit's layout, which AceMath's MMLU-STEM numbers were measured with: the
    question, then one line ``Answer Choices: (A) .. (B) ..``."""
    options = " ".join(f"({letter}) {str(choice).strip()}" for letter, choice in zip(CHOICE_LETTERS, choices))
    return f"{question.strip()}\nAnswer Choices: {options}"


def _exemplar_block(exemplar: Exemplar) -> str:
    return f"{format_multiple_choice(exemplar.question, exemplar.choices)}\n{exemplar.solution}"


def build_user_prompt(
    problem: Problem,
    instruction: str | None = DEFAULT_INSTRUCTION,
    exemplars: Sequence[Exemplar] | None = None,
) -> str:
    """Text of the user turn, independent of any chat template.

    Open problems follow the AceMath template (question, newline, instruction).  Multiple-choice problems get the
    few-shot exemplars first (default: the five in `mmlu_fewshot`; pass ``()`` for zero-shot), each its question
    and solution, a blank line between them, all in the one user turn, as the Qwen2.5-Math toolkit lays them out.
    ``instruction=None`` leaves the instruction out, for templates that put it in the system turn (see
    `build_messages`).
    """
    if problem.choices:
        shots = DEFAULT_MMLU_EXEMPLARS if exemplars is None else exemplars
        target = format_multiple_choice(problem.question, problem.choices)
        body = "\n\n".join([*(_exemplar_block(exemplar) for exemplar in shots), target])
    else:
        body = problem.question
    return body if instruction is None else f"{body}\n{instruction}"


def build_messages(
    problem: Problem,
    instruction: str = DEFAULT_INSTRUCTION,
    instruction_role: str = "user",
    exemplars: Sequence[Exemplar] | None = None,
) -> list[dict[str, str]]:
    """Chat messages for one problem; the instruction goes in the user turn (AceMath) or a system turn (Qwen)."""
    if instruction_role == "user":
        return [{"role": "user", "content": build_user_prompt(problem, instruction, exemplars)}]
    if instruction_role == "system":
        return [
            {"role": "system", "content": instruction},
            {"role": "user", "content": build_user_prompt(problem, None, exemplars)},
        ]
    raise ValueError(f"instruction_role must be 'user' or 'system', got {instruction_role!r}")
