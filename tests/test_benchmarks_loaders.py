"""Benchmark loaders (gold rules, row counts, gold report, format errors) and prompt building."""

import json
from pathlib import Path

import pytest

from shared_data import shared_path

from acemath_mcore.eval.benchmarks import (
    BENCHMARKS,
    DEFAULT_INSTRUCTION,
    BenchmarkFormatError,
    Problem,
    build_messages,
    build_user_prompt,
    load_all,
    load_benchmark,
)
from acemath_mcore.eval.grader import extract_choice
from acemath_mcore.eval.mmlu_fewshot import DEFAULT_MMLU_EXEMPLARS, Exemplar

# Row counts from ../shared/README.md.
README_ROWS = {
    "gsm8k": 1319,
    "math": 5000,
    "math500": 500,
    "minerva_math": 272,
    "gaokao2023en": 385,
    "olympiadbench": 675,
    "college_math": 2818,
    "mmlu_stem": 3018,
    "aime24": 30,
    "amc23": 40,
}


@pytest.fixture(scope="module")
def loaded():
    return load_all(shared_path("data/eval"))


def test_every_benchmark_loads_with_the_readme_row_count(loaded):
    problems, _ = loaded
    assert set(BENCHMARKS) == set(README_ROWS)
    assert {name: len(rows) for name, rows in problems.items()} == README_ROWS
    for name, rows in problems.items():
        assert [p.idx for p in rows] == list(range(len(rows))), name
        assert all(p.line == p.idx + 1 and p.benchmark == name and p.question for p in rows), name


def test_gold_rules_per_benchmark(loaded):
    problems, _ = loaded
    assert problems["gsm8k"][0].gold == "18"  # after ####
    assert problems["math"][0].gold == "2"  # last \boxed in the solution
    assert problems["math500"][0].gold == r"\left( 3, \frac{\pi}{2} \right)"
    assert problems["minerva_math"][0].gold == "1.6"
    assert problems["gaokao2023en"][0].gold == r"\{x|-2\leq x < 1\}"  # $ stripped
    assert problems["college_math"][0].gold == "10-4 n"
    assert problems["olympiadbench"][0].gold == "2"
    assert problems["aime24"][0].gold == "204"
    assert problems["amc23"][0].gold == "27.0"
    mmlu = problems["mmlu_stem"][0]
    assert mmlu.gold == "C" and len(mmlu.choices) == 4
    assert not any("$" in p.gold for name in ("gaokao2023en", "college_math", "olympiadbench") for p in problems[name])
    assert {p.gold for p in problems["mmlu_stem"]} == {"A", "B", "C", "D"}


def test_known_odd_golds_are_reported_not_fatal(loaded):
    problems, issues = loaded
    reported = {(issue.benchmark, issue.idx) for issue in issues}
    assert {("math", 3526), ("math", 3607)} <= reported  # \mbox{Saturday}, \text{east}
    assert ("math", 4060) in reported and problems["math"][4060].gold == "12"  # its answer, 6, is left unboxed
    assert {(b, i) for b, i in reported if b == "gaokao2023en"} == {
        ("gaokao2023en", 107),  # "$145$solution:"
        ("gaokao2023en", 167),  # blank
        ("gaokao2023en", 192),  # blank
    }
    # math500's 97 is math's 3607 again (the figure skater facing \text{east}).
    assert reported == {("math", 3526), ("math", 3607), ("math", 4060), ("math500", 97), ("gaokao2023en", 107),
                        ("gaokao2023en", 167), ("gaokao2023en", 192), ("college_math", 614)}  # fmt: skip
    for issue in issues:
        assert problems[issue.benchmark][issue.idx].gold == issue.gold and issue.reason


def _write_benchmark(tmp_path: Path, name: str, lines: list[str]) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    path = directory / "test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write_benchmark(tmp_path, "gsm8k", ['{"question": "q", "answer": "#### 1"}', '{"question": "q", "answer"'])
    with pytest.raises(BenchmarkFormatError, match=rf"{path}:2: malformed JSON"):
        load_benchmark("gsm8k", tmp_path)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = _write_benchmark(tmp_path, "math", [json.dumps({"problem": "p"})])
    with pytest.raises(BenchmarkFormatError, match=rf"{path}:1:solution: missing field"):
        load_benchmark("math", tmp_path)


@pytest.mark.parametrize("final_answer", [[], "42"])
def test_olympiad_answers_must_be_a_non_empty_list(tmp_path, final_answer):
    """A string once gave its first character as the gold, an empty list an IndexError."""
    path = _write_benchmark(tmp_path, "olympiadbench", [json.dumps({"question": "q", "final_answer": final_answer})])
    with pytest.raises(BenchmarkFormatError, match=rf"{path}:1:final_answer: expected a non-empty list"):
        load_benchmark("olympiadbench", tmp_path)


def test_solution_without_box_is_reported_as_empty_gold(tmp_path):
    _write_benchmark(tmp_path, "math", [json.dumps({"problem": "p", "solution": "no box here"})])
    problems, issues = load_benchmark("math", tmp_path)
    assert problems[0].gold == ""
    assert [(issue.idx, issue.line, issue.reason) for issue in issues] == [(0, 1, "empty gold answer")]


def test_unknown_benchmark_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope", tmp_path)


def test_math_prompt_is_question_then_instruction():
    problem = Problem("math", 0, "What is 1+1?", "2")
    assert build_user_prompt(problem) == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert build_user_prompt(problem, instruction="Answer briefly.") == "What is 1+1?\nAnswer briefly."
    assert build_messages(problem) == [{"role": "user", "content": build_user_prompt(problem)}]
    assert build_messages(problem, instruction_role="system") == [
        {"role": "system", "content": DEFAULT_INSTRUCTION},
        {"role": "user", "content": "What is 1+1?"},
    ]
    with pytest.raises(ValueError, match="instruction_role"):
        build_messages(problem, instruction_role="assistant")


def test_mmlu_prompt_is_five_shot_with_configurable_exemplars():
    """The Qwen2.5-Math toolkit's layout (AceMath's MMLU-STEM numbers): question, then "Answer Choices:" with the
    options on one line; each exemplar's solution on the next line; blocks apart by a blank line."""
    problem = Problem("mmlu_stem", 0, "Which is largest? ", "D", ("1", "2 ", "3", "4"))
    prompt = build_user_prompt(problem)
    assert prompt.count("Answer Choices: ") == 6
    assert prompt.endswith("\n\nWhich is largest?\nAnswer Choices: (A) 1 (B) 2 (C) 3 (D) 4\n" + DEFAULT_INSTRUCTION)
    for exemplar in DEFAULT_MMLU_EXEMPLARS:
        assert exemplar.question in prompt

    assert build_user_prompt(problem, exemplars=()) == ("Which is largest?\nAnswer Choices: (A) 1 (B) 2 (C) 3 (D) 4\n"
                                                        + DEFAULT_INSTRUCTION)
    custom = Exemplar("2+2?", ("1", "2", "3", "4"), "2+2=4. The answer is \\boxed{D}.", "D")
    assert build_user_prompt(problem, exemplars=[custom]) == (
        "2+2?\nAnswer Choices: (A) 1 (B) 2 (C) 3 (D) 4\n2+2=4. The answer is \\boxed{D}.\n\n"
        "Which is largest?\nAnswer Choices: (A) 1 (B) 2 (C) 3 (D) 4\n" + DEFAULT_INSTRUCTION)


def test_default_exemplars_are_five_self_consistent_and_varied():
    assert len(DEFAULT_MMLU_EXEMPLARS) == 5
    for exemplar in DEFAULT_MMLU_EXEMPLARS:
        assert len(exemplar.choices) == 4
        assert extract_choice(exemplar.solution) == exemplar.answer  # the grader reads what the exemplar teaches
    assert len({exemplar.answer for exemplar in DEFAULT_MMLU_EXEMPLARS}) == 4
