"""Synthetic math problems with verifiable answers: the toy stand-in for AceMath's data in demos and tests.

Multi-step integer arithmetic. Responses are chain-of-thought in the AceMath style and end with ``\\boxed{}``,
so the real grader checks them and best-of-n has something to pick from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Iterator

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def arithmetic_problem(rng: random.Random, steps: int = 2) -> Dict[str, str]:
    """``{"question", "solution", "answer"}`` for a random chain of + and - on small integers."""
    value = rng.randint(2, 60)
    question, lines = str(value), []
    for _ in range(steps):
        operand = rng.randint(2, 40)
        op = rng.choice("+-")
        result = value + operand if op == "+" else value - operand
        question += f" {op} {operand}"
        lines.append(f"{value} {op} {operand} = {result}.")
        value = result
    solution = " ".join(lines) + f" The answer is \\boxed{{{value}}}."
    return {"question": f"What is {question}?", "solution": solution, "answer": str(value)}


def sft_records(count: int, seed: int, steps: int = 2) -> Iterator[Dict]:
    """AceMath-Instruct-style records: ``messages`` (user + assistant) plus the gold ``answer``."""
    rng = random.Random(seed)
    for _ in range(count):
        problem = arithmetic_problem(rng, steps)
        yield {"messages": [{"role": "user", "content": f"{problem['question']}\n{MATH_INSTRUCTION}"},
                            {"role": "assistant", "content": problem["solution"]}],
               "answer": problem["answer"]}


def write_jsonl(path: str | Path, records) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path

