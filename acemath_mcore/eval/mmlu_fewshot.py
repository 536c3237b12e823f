"""Default MMLU-STEM 5-shot exemplars, written for this project (not taken from any dataset).

They show the answer format the grader reads (a worked step, then the letter in ``\\boxed{}``) and cover the MMLU-STEM
mix of physics, chemistry, computer science, biology and mathematics, with the correct letters spread over A-D.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exemplar:
    question: str
    choices: tuple[str, str, str, str]
    solution: str
    answer: str


DEFAULT_MMLU_EXEMPLARS: tuple[Exemplar, ...] = (
    Exemplar(
        question="A cart starts from rest and speeds up uniformly to 20 m/s in 5 s. What is its acceleration?",
        choices=("2 m/s^2", "4 m/s^2", "5 m/s^2", "100 m/s^2"),
        solution="Acceleration is the change in speed over the time taken: 20 / 5 = 4 m/s^2. "
        "The answer is \\boxed{B}.",
        answer="B",
    ),
    Exemplar(
        question="How many moles of water molecules are in 36 g of water? (Molar mass of water: 18 g/mol.)",
        choices=("0.5", "1", "2", "18"),
        solution="Moles are mass divided by molar mass: 36 / 18 = 2. The answer is \\boxed{C}.",
        answer="C",
    ),
    Exemplar(
        question="What is the unsigned binary number 1011 in decimal?",
        choices=("13", "9", "10", "11"),
        solution="1011 in binary is 1*8 + 0*4 + 1*2 + 1*1 = 11, which is choice (D). The answer is \\boxed{D}.",
        answer="D",
    ),
    Exemplar(
        question="A diploid cell with 2n = 12 chromosomes completes meiosis. How many chromosomes does each "
        "resulting gamete carry?",
        choices=("3", "6", "12", "24"),
        solution="Meiosis halves the chromosome number, so each gamete has n = 12 / 2 = 6. "
        "The answer is \\boxed{B}.",
        answer="B",
    ),
    Exemplar(
        question="If log_2(x) = 5, what is x?",
        choices=("32", "10", "25", "7"),
        solution="log_2(x) = 5 means x = 2^5 = 32. The answer is \\boxed{A}.",
        answer="A",
    ),
)
