"""Curation steps of the preprocessing pipeline (AceMath math-SFT data curation).

Per-sample steps (`CurationStep`) are pure functions of one conversation and run inside the preprocessing
workers in the order given on the command line. Two steps need the whole data set and run in the main process
after them: answer cross-checking (its grader spawns helper processes, which pool workers may not) and exact
prompt dedup (first occurrence kept). Every step reports how many samples reached it and how many it dropped.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from acemath_mcore.data.jsonl import Conversation, parse_conversation


def prompt_key(prompt: str) -> int:
    """Stable 64-bit key of a prompt for exact dedup / lookup: lower-cased, surrounding whitespace ignored."""
    digest = hashlib.blake2b(prompt.strip().lower().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class CurationStep(ABC):
    reason: str  # drop reason counted in the stats
    spec: str  # the step as written on the command line

    @abstractmethod
    def check(self, conversation: Conversation) -> Optional[str]:
        """None to keep the sample, else a short detail of why it is dropped."""


class MaxResponseWords(CurationStep):
    """Drop samples with an assistant response longer than ``limit`` whitespace-separated words."""

    reason = "too_many_words"

    def __init__(self, limit: int):
        self.limit, self.spec = limit, f"max-words={limit}"

    def check(self, conversation: Conversation) -> Optional[str]:
        for response in conversation.responses:
            count = len(response.split())
            if count > self.limit:
                return f"response has {count} words > {self.limit}"
        return None


class RepeatedText(CurationStep):
    """Drop degenerate responses: some ``ngram``-word sequence occurs ``max_count`` times or more (looping output)."""

    reason = "repetition"

    def __init__(self, ngram: int = 20, max_count: int = 3):
        self.ngram, self.max_count = ngram, max_count
        self.spec = f"repetition={ngram}:{max_count}"
        self._powers = np.power(np.uint64(1_000_003), np.arange(ngram, dtype=np.uint64))

    def check(self, conversation: Conversation) -> Optional[str]:
        for response in conversation.responses:
            words = response.split()
            if len(words) < self.ngram + self.max_count - 1:  # too short for max_count (overlapping) windows
                continue
            word_hashes = np.array([hash(w) for w in words], dtype=np.int64).view(np.uint64)
            windows = np.lib.stride_tricks.sliding_window_view(word_hashes, self.ngram)
            with np.errstate(over="ignore"):
                window_hashes = (windows * self._powers).sum(axis=1)
            _, counts = np.unique(window_hashes, return_counts=True)
            if counts.max() >= self.max_count:
                return f"a {self.ngram}-word sequence occurs {counts.max()} times"
        return None


class RequireBoxed(CurationStep):
    """Keep only samples whose final response states a ``\\boxed{}`` answer (needed to grade and cross-check it)."""

    reason = "no_boxed_answer"
    spec = "boxed"

    def __init__(self):
        from acemath_mcore.eval.grader import last_boxed_content

        self._last_boxed_content = last_boxed_content

    def check(self, conversation: Conversation) -> Optional[str]:
        boxed = self._last_boxed_content(conversation.final_response)
        return "final response has no non-empty \\boxed{}" if not (boxed and boxed.strip()) else None


class PromptDeduplicator:
    """Exact prompt dedup across all inputs (lower-cased); the first occurrence wins."""

    reason = "duplicate_prompt"
    spec = "dedup"

    def __init__(self):
        self._seen: set[int] = set()

    def is_duplicate(self, key: int) -> bool:
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


class CrossCheck:
    """Keep a sample only when the final answers of its response and of the other models' responses to the same
    prompt (one JSONL file per model, same schemas as the training data) agree.

    Answers are extracted in the workers (`answer_of`); `disagreement` compares them in the main process because
    ``is_equal`` runs sympy in a helper process and pool workers cannot have children.
    """

    reason = "cross_check_disagree"

    def __init__(self, response_files: Sequence[str | Path], benchmark: str = "math"):
        from acemath_mcore.eval.grader import extract_answer, is_equal

        self._extract_answer, self._is_equal = extract_answer, is_equal
        self.benchmark = benchmark
        self.files = [str(path) for path in response_files]
        self.spec = "cross-check=" + ",".join(self.files)
        self._answers: list[dict[int, str]] = [self._load(path) for path in self.files]

    def _load(self, path: str) -> dict[int, str]:
        answers = {}
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                # The training data's schemas, AceMath-Instruct's 'messages' + 'answer' included.
                conversation = parse_conversation(raw, f"{path}:{line_number}")
                answers.setdefault(prompt_key(conversation.prompt), self.answer_of(conversation))
        return answers

    def answer_of(self, conversation: Conversation) -> str:
        return self._extract_answer(conversation.final_response, self.benchmark)

    def disagreement(self, key: int, answer: str) -> Optional[str]:
        """None when every response file answers this prompt like the sample does, else why not."""
        if not answer:
            return "no answer could be extracted from the sample's response"
        for path, answers in zip(self.files, self._answers):
            other = answers.get(key)
            if other is None:
                return f"prompt missing from {path}"
            if not self._is_equal(other, answer):
                return f"{path} answers {other!r}, the sample {answer!r}"
        return None
