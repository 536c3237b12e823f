"""Grader throughput and sanity on the 5000 MATH gold answers.

Why: grading must stay well under a minute for a full MATH run on a 2-core box, and a grader that is fast because it
says "equal" (or "different") too easily is useless, so each timing comes with the agreement it achieved:

* self       - every gold against itself (expect equal),
* rewritten  - against a value-preserving rewrite: ``$`` delimiters, ``\\dfrac`` for ``\\frac``, spaces, and a
               6-significant-digit decimal for plain fractions (expect equal),
* symbolic   - single-expression golds against ``\\frac{2(gold)}{2}``, which only sympy can see through (expect
               equal; this is the slow path),
* perturbed  - against a copy with its last integer increased by one, which also alters fractions (expect different).

Usage: python benchmarks/grader_speed.py [--data-dir ../shared/data/eval] [--limit N]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acemath_mcore.eval.benchmarks import load_benchmark  # noqa: E402
from acemath_mcore.eval.grader import is_equal  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def rewritten(gold: str) -> str:
    fraction = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        return f"{sign}{int(numerator) / int(denominator):.6g}"
    return "$ " + gold.replace("\\frac", "\\dfrac").replace(",\\!", ", ").replace("{,}", ", ") + " $"


def is_single_expression(gold: str) -> bool:
    """Golds that are one algebraic expression: no lists, relations, text, matrices, subscripts or lone words."""
    markers = (",", "=", "<", ">", "\\le", "\\ge", "\\in", "\\pm", "\\text", "\\mbox", "\\begin", "\\cup", "_", "\\$")
    return not any(marker in gold for marker in markers) and not re.fullmatch(r"[A-Za-z ]+", gold)


def perturbed(gold: str) -> str | None:
    """The gold with its last integer increased by one, or None when it has no digits."""
    matches = list(re.finditer(r"\d+", gold))
    if not matches:
        return None
    last = matches[-1]
    return gold[: last.start()] + str(int(last.group(0)) + 1) + gold[last.end() :]


def run_case(name: str, pairs: list[tuple[str, str]], expected: bool) -> tuple[float, list[tuple[str, str]]]:
    start = time.perf_counter()
    misses = [(pred, gold) for pred, gold in pairs if is_equal(pred, gold) != expected]
    elapsed = time.perf_counter() - start
    agreement = 100.0 * (len(pairs) - len(misses)) / len(pairs)
    print(f"{name:<10} {len(pairs):>5} pairs  {elapsed:7.2f} s  agreement {agreement:6.2f}%  ({len(misses)} misses)")
    return elapsed, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--limit", type=int, default=None, help="only the first N golds")
    parser.add_argument("--show-misses", type=int, default=10, help="print up to N misses per case")
    args = parser.parse_args()

    problems, _ = load_benchmark("math", args.data_dir)
    golds = [problem.gold for problem in problems[: args.limit] if problem.gold]
    cases = [
        ("self", [(gold, gold) for gold in golds], True),
        ("rewritten", [(rewritten(gold), gold) for gold in golds], True),
        ("symbolic", [(f"\\frac{{2({gold})}}{{2}}", gold) for gold in golds if is_single_expression(gold)], True),
        ("perturbed", [(changed, gold) for gold in golds if (changed := perturbed(gold)) is not None], False),
    ]
    total = 0.0
    for name, pairs, expected in cases:
        elapsed, misses = run_case(name, pairs, expected)
        total += elapsed
        for pred, gold in misses[: args.show_misses]:
            print(f"    miss: pred={pred!r} gold={gold!r}")
    print(f"total      {sum(len(pairs) for _, pairs, _ in cases):>5} pairs  {total:7.2f} s")


if __name__ == "__main__":
    main()
