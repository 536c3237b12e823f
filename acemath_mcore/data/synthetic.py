"""Synthetic data with verifiable answers: the toy stand-in for AceMath's data in demos and tests.

Math: multi-step integer arithmetic, chain-of-thought responses in the AceMath style ending with ``\\boxed{}``,
so the real grader checks them and best-of-n has something to pick from. General: short instruction-following
tasks (repeat, reverse, count on, one arithmetic fact), single- and two-turn, for the two general SFT stages.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Iterator, Optional

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def arithmetic_problem(rng: random.Random, steps: int = 2, max_start: int = 60, max_operand: int = 40,
                       max_total: Optional[int] = None) -> Dict[str, str]:
    """``{"question", "solution", "answer"}`` for a random chain of + and - on integers from 2 up. With
    ``max_total``, each step is drawn among those keeping the running total within 0..max_total (every step then
    a single-digit fact when max_total is 9)."""
    value = rng.randint(2, max_start)
    question, lines = str(value), []
    for _ in range(steps):
        choices = [(op, operand) for op in "+-" for operand in range(2, max_operand + 1)
                   if max_total is None or 0 <= (value + operand if op == "+" else value - operand) <= max_total]
        op, operand = rng.choice(choices)
        result = value + operand if op == "+" else value - operand
        question += f" {op} {operand}"
        lines.append(f"{value} {op} {operand} = {result}.")
        value = result
    solution = " ".join(lines) + f" The answer is \\boxed{{{value}}}."
    return {"question": f"What is {question}?", "solution": solution, "answer": str(value)}


def sft_records(count: int, seed: int, steps: int = 2, max_start: int = 60, max_operand: int = 40,
                instruction: str = MATH_INSTRUCTION, max_total: Optional[int] = None,
                bare_answer_fraction: float = 0.0) -> Iterator[Dict]:
    """AceMath-Instruct-style records: ``messages`` (user: question, newline, instruction; assistant: worked
    solution) plus the gold ``answer``. ``bare_answer_fraction`` of the responses state only the final answer, with
    no working, as answers scraped without their solutions do in real SFT mixtures."""
    rng = random.Random(seed)
    for _ in range(count):
        problem = arithmetic_problem(rng, steps, max_start, max_operand, max_total)
        response = problem["solution"]
        if bare_answer_fraction and rng.random() < bare_answer_fraction:
            response = response[response.index("The answer is"):]
        yield {"messages": [{"role": "user", "content": f"{problem['question']}\n{instruction}"},
                            {"role": "assistant", "content": response}],
               "answer": problem["answer"]}


_WORDS = ("cat", "dog", "sun", "tree", "ball", "bird", "fish", "cake", "red", "blue", "big", "small", "happy",
          "park", "boat", "star", "moon", "milk", "frog", "hat")


def _general_exchange(rng: random.Random) -> tuple[str, str]:
    """One (instruction, response) pair of a randomly chosen general task."""
    words = rng.sample(_WORDS, rng.randint(2, 4))
    task = rng.randrange(4)
    if task == 0:
        return f"Repeat these words: {' '.join(words)}", " ".join(words)
    if task == 1:
        return f"Say these words in reverse order: {' '.join(words)}", " ".join(reversed(words))
    if task == 2:
        start = rng.randint(1, 90)
        return f"Count from {start} to {start + 3}.", ", ".join(str(start + i) for i in range(4))
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    return f"What is {a + b} - {b}?", f"{a + b} - {b} = {a}."


def general_records(count: int, seed: int, two_turn_fraction: float = 0.0) -> Iterator[Dict]:
    """General-SFT conversations; ``two_turn_fraction`` of them hold two user/assistant exchanges (the loss
    covers both answers)."""
    rng = random.Random(seed)
    for _ in range(count):
        messages = []
        for _ in range(2 if rng.random() < two_turn_fraction else 1):
            instruction, response = _general_exchange(rng)
            messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        yield {"messages": messages}


def write_jsonl(path: str | Path, records) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path

