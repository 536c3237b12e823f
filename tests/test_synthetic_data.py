"""The toy data generators: worked solutions are right, bounded chains stay in bounds, bare answers are counted."""

from __future__ import annotations

import random
import re

from acemath_mcore.data.synthetic import arithmetic_problem, sft_records
from acemath_mcore.eval.grader import extract_answer

STEP = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)\.")


def _check_worked_solution(question: str, solution: str, answer: str) -> list[int]:
    """Re-derive the chain from the question; returns the running totals."""
    numbers = re.findall(r"\d+|[+-]", question)
    value, totals = int(numbers[0]), []
    steps = STEP.findall(solution)
    assert len(steps) == (len(numbers) - 1) // 2, solution
    for (left, op, operand, result), (q_op, q_operand) in zip(steps, zip(numbers[1::2], numbers[2::2])):
        assert (int(left), op, operand) == (value, q_op, q_operand), solution
        value = value + int(operand) if op == "+" else value - int(operand)
        assert int(result) == value, solution
        totals.append(value)
    assert solution.endswith(f"The answer is \\boxed{{{value}}}.") and answer == str(value)
    assert extract_answer(solution) == answer  # what the grader reads
    return totals


def test_bounded_chains_are_correct_and_stay_within_bounds():
    rng = random.Random(0)
    problems = [arithmetic_problem(rng, steps=3, max_start=9, max_operand=9, max_total=9) for _ in range(2000)]
    for problem in problems:
        totals = _check_worked_solution(problem["question"], problem["solution"], problem["answer"])
        assert all(0 <= total <= 9 for total in totals), problem
    assert len({p["question"] for p in problems}) > 1200  # the toy pipeline draws 1,700 distinct ones from ~3,000


def test_unbounded_chains_leave_the_range():
    rng = random.Random(0)
    problems = [arithmetic_problem(rng, steps=2, max_start=9, max_operand=9) for _ in range(500)]
    totals = [t for p in problems for t in _check_worked_solution(p["question"], p["solution"], p["answer"])]
    assert min(totals) < 0 and max(totals) > 9


def test_bare_answer_fraction_keeps_only_the_final_sentence():
    records = list(sft_records(4000, seed=1, steps=3, max_start=9, max_operand=9, instruction="Solve.", max_total=9,
                               bare_answer_fraction=0.3))
    bare = [r for r in records if not STEP.search(r["messages"][1]["content"])]
    assert 0.27 < len(bare) / len(records) < 0.33
    for record in bare:
        assert record["messages"][1]["content"] == f"The answer is \\boxed{{{record['answer']}}}."
    for record in records:
        if record not in bare:
            question = record["messages"][0]["content"].split("\n")[0]
            _check_worked_solution(question, record["messages"][1]["content"], record["answer"])
    # Without bare answers the stream of problems is unchanged (no extra draws from the generator).
    plain = list(sft_records(50, seed=1, steps=3, max_start=9, max_operand=9, instruction="Solve.", max_total=9))
    assert [r["answer"] for r in plain] == [r["answer"] for r in
                                           sft_records(50, 1, 3, 9, 9, "Solve.", max_total=9, bare_answer_fraction=0)]
