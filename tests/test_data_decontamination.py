"""Decontamination against the real benchmark test sets in ../shared/data/eval."""

import json
import random

import pytest

from shared_data import shared_path

from acemath_mcore.data.decontamination import Decontaminator, lcs_length, load_benchmark_questions, words_of
from acemath_mcore.data.jsonl import Conversation


@pytest.fixture(scope="module")
def math_decontaminator():
    return Decontaminator.from_dir(shared_path("data/eval"), math=True)


@pytest.fixture(scope="module")
def math_problems():
    return [json.loads(line)["problem"] for line in shared_path("data/eval/math/test.jsonl").read_text().splitlines()]


def reference_lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_bit_parallel_lcs_equals_dynamic_programming():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        b = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        assert lcs_length(a, b) == reference_lcs(a, b)
    long_a = [rng.randrange(50) for _ in range(300)]  # longer than a machine word
    long_b = [rng.randrange(50) for _ in range(250)]
    assert lcs_length(long_a, long_b) == reference_lcs(long_a, long_b)


def test_all_benchmarks_are_indexed():
    questions = load_benchmark_questions(shared_path("data/eval"))
    counts = {}
    for question in questions:
        counts[question.benchmark] = counts.get(question.benchmark, 0) + 1
    assert counts == {"aime24": 30, "amc23": 40, "college_math": 2818, "gaokao2023en": 385, "gsm8k": 1319,
                      "math": 5000, "math500": 500, "minerva_math": 272, "mmlu_stem": 3018, "olympiadbench": 675}


def test_planted_math_test_prompt_is_found(math_decontaminator, math_problems):
    problem = math_problems[17]
    found = math_decontaminator.find(problem)
    assert found is not None and found.question.benchmark in ("math", "math500")
    # Wrapped in an instruction and re-spaced, it is still the test question (found whole).
    wrapped = "Solve the following problem step by step.\n\n" + problem.replace(" ", "  ")
    found = math_decontaminator.find(wrapped)
    assert found is not None and found.shared_ngram is None
    # With one word changed it is no longer whole, but shares a 13-gram and most of its words.
    words = words_of(wrapped)
    words[-3] = "changed"
    found = math_decontaminator.find(" ".join(words))
    assert found is not None and found.shared_ngram is not None and found.lcs_fraction > 0.6
    detail = math_decontaminator.check(Conversation("train.jsonl:1", [{"role": "user", "content": " ".join(words)},
                                                                      {"role": "assistant", "content": "x"}]))
    assert "test.jsonl:" in detail and "13-gram" in detail


def test_shared_ngram_alone_only_counts_outside_math_mode(math_decontaminator, math_problems):
    problem = next(p for p in math_problems if len(words_of(p)) >= 30)
    # Most of the question (all but its last word) in a long unrelated prompt: shares 13-grams, LCS far below 60%
    # of the prompt.
    filler = " ".join(f"unrelated{i} context words about something else" for i in range(60))
    prompt = filler + " " + " ".join(words_of(problem)[:-1])
    assert math_decontaminator.find(prompt) is None
    general = Decontaminator(math_decontaminator.questions, math=False)
    found = general.find(prompt)
    assert found is not None and found.lcs_fraction < 0.6
    # The whole question buried there is a copy in both modes.
    found = math_decontaminator.find(filler + " " + problem)
    assert found is not None and found.shared_ngram is None


def test_questions_with_the_cot_instruction_appended_are_found(math_decontaminator):
    """Training prompts often carry the CoT instruction after the question: short questions (no 13-gram) and
    13-18-word ones (the instruction's 12 words pull the LCS under 60% of the prompt) were missed."""
    from acemath_mcore.data.synthetic import MATH_INSTRUCTION

    missed = [q for q in math_decontaminator.questions if len(q.words) >= 8
              and math_decontaminator.find(" ".join(q.words) + "\n" + MATH_INSTRUCTION) is None]
    assert missed == []
    # The report's LCS share is of the whole prompt, the instruction's words included.
    question = next(q for q in math_decontaminator.questions if 8 <= len(q.words) < 13)
    found = math_decontaminator.find(" ".join(question.words) + "\n" + MATH_INSTRUCTION)
    assert found.shared_ngram is None
    assert found.lcs_fraction == pytest.approx(len(question.words) / (len(question.words)
                                                                      + len(MATH_INSTRUCTION.split())))
    tiny = next(q for q in math_decontaminator.questions if len(q.words) < 8)
    assert math_decontaminator.find(" ".join(tiny.words) + "\n" + MATH_INSTRUCTION) is None  # too short to tell


def test_clean_prompts_pass_and_short_questions_match_whole(math_decontaminator):
    assert math_decontaminator.find("Compute the number of lattice points inside a circle of radius 7 "
                                    "centered at the origin, counting boundary points twice.") is None
    short = next(q for q in math_decontaminator.questions if 3 <= len(q.words) < 13)
    found = math_decontaminator.find(" ".join(short.words).upper())
    assert found is not None and found.shared_ngram is None


def test_index_lookups_flag_only_restated_questions(math_decontaminator):
    """800 real solutions to MATH test problems: the few that restate their own question word for word are
    flagged, naming exactly that question; no solution is flagged for another one (lookup speed:
    benchmarks/decontamination_speed.py)."""
    records = [json.loads(line) for line in shared_path("data/rm/math_cot_100.jsonl").read_text().splitlines()]
    found = [(record, math_decontaminator.find(text)) for record in records for text in record["code"]]
    flagged = [(record, hit) for record, hit in found if hit is not None]
    assert 0 < len(flagged) < len(found) // 10
    for record, hit in flagged:
        assert hit.shared_ngram is None and hit.question.words == words_of(record["question"])
        assert " ".join(hit.question.words) in " ".join(words_of(" ".join(record["code"])))
