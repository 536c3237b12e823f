"""Benchmark decontamination of training prompts.

A prompt is contaminated when it shares a 13-word n-gram with a benchmark test question AND (math mode) the
longest common subsequence of words covers more than 60% of the prompt; in general mode the shared 13-gram
alone suffices. A prompt that contains a whole test question of 8+ words as a contiguous run of words, or equals a
shorter one, is contaminated in both modes: this catches questions shorter than 13 words, which have no 13-gram.

Speed comes from an n-gram index over the test questions (dictionary lookups per prompt window, no pairwise
comparison) and a bit-parallel LCS run only on the few candidate questions an n-gram hit names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from acemath_mcore.data.curation import CurationStep
from acemath_mcore.data.jsonl import Conversation, read_jsonl

NGRAM = 13
LCS_FRACTION = 0.6
# A test question this long found verbatim inside a prompt is a copy; a shorter one ("What is 2+3?") only when it
# is the whole prompt, since short phrasings recur innocently.
MIN_CONTAINED_WORDS = 8
_WORD = re.compile(r"\w+")


def words_of(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and LaTeX markup are ignored so formatting differences do not hide a copy."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence, bit-parallel over ``a`` (Allison-Dix / Hyyrö): O(len(b)) big-int ops."""
    if not a or not b:
        return 0
    match_masks: dict[int, int] = {}
    for position, symbol in enumerate(a):
        match_masks[symbol] = match_masks.get(symbol, 0) | (1 << position)
    full = (1 << len(a)) - 1
    v = full
    for symbol in b:
        u = v & match_masks.get(symbol, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


@dataclass
class BenchmarkQuestion:
    benchmark: str
    where: str  # file:line of the test question
    words: list[str]


@dataclass
class Contamination:
    question: BenchmarkQuestion
    shared_ngram: Optional[str]  # None for a whole-question match
    lcs_fraction: float

    def describe(self) -> str:
        evidence = "holds the whole question" if self.shared_ngram is None else f"shares {NGRAM}-gram {self.shared_ngram!r}"
        return f"{self.question.benchmark} ({self.question.where}): {evidence}, LCS {self.lcs_fraction:.0%} of the prompt"


def load_benchmark_questions(eval_dir: str | Path) -> list[BenchmarkQuestion]:
    """Questions of every ``<eval_dir>/<benchmark>/test.jsonl`` (field ``question``, else ``problem``)."""
    files = sorted(Path(eval_dir).glob("*/test.jsonl"))
    if not files:
        raise FileNotFoundError(f"no <benchmark>/test.jsonl under {eval_dir}")
    questions = []
    for path in files:
        for where, record in read_jsonl(path):
            text = record.get("question") or record.get("problem")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: benchmark row has no 'question' or 'problem' text")
            questions.append(BenchmarkQuestion(path.parent.name, where, words_of(text)))
    return questions


class Decontaminator(CurationStep):
    reason = "contaminated"

    def __init__(self, questions: Sequence[BenchmarkQuestion], math: bool = True):
        self.spec = f"decontaminate={'math' if math else 'general'}"
        self.questions = list(questions)
        self.math = math
        self._vocab: dict[str, int] = {}
        self._question_ids = [[self._vocab.setdefault(w, len(self._vocab)) for w in q.words] for q in self.questions]
        ngram_owners: dict[int, list[int]] = {}
        self._whole: dict[int, int] = {}
        self._by_opening: dict[int, list[int]] = {}  # first MIN_CONTAINED_WORDS words -> questions that long or more
        for index, ids in enumerate(self._question_ids):
            self._whole.setdefault(hash(tuple(ids)), index)
            if len(ids) >= MIN_CONTAINED_WORDS:
                self._by_opening.setdefault(hash(tuple(ids[:MIN_CONTAINED_WORDS])), []).append(index)
            for start in range(len(ids) - NGRAM + 1):
                owners = ngram_owners.setdefault(hash(tuple(ids[start:start + NGRAM])), [])
                if not owners or owners[-1] != index:
                    owners.append(index)
        self._ngram_owners = {key: tuple(owners) for key, owners in ngram_owners.items()}

    @classmethod
    def from_dir(cls, eval_dir: str | Path, math: bool = True) -> "Decontaminator":
        return cls(load_benchmark_questions(eval_dir), math)

    def find(self, prompt: str) -> Optional[Contamination]:
        """The first benchmark question the prompt is a copy of, or None."""
        prompt_words = words_of(prompt)
        # Words unknown to every benchmark get distinct negative ids: they can match nothing.
        ids = [self._vocab.get(w, -1 - i) for i, w in enumerate(prompt_words)]
        whole = self._whole.get(hash(tuple(ids)))
        if whole is not None and self._question_ids[whole] == ids:
            return Contamination(self.questions[whole], None, 1.0)
        examined = set()
        known_from = 0  # windows must not include an unknown word
        for end, word_id in enumerate(ids, start=1):
            if word_id < 0:
                known_from = end
                continue
            opening = end - MIN_CONTAINED_WORDS
            if opening >= known_from:
                for index in self._by_opening.get(hash(tuple(ids[opening:end])), ()):
                    question = self._question_ids[index]
                    if ids[opening:opening + len(question)] == question:  # contained: the LCS is the question
                        return Contamination(self.questions[index], None, len(question) / len(ids))
            start = end - NGRAM
            if start < known_from:
                continue
            window = ids[start:end]
            for index in self._ngram_owners.get(hash(tuple(window)), ()):
                if index in examined:
                    continue
                examined.add(index)
                if not self._contains(self._question_ids[index], window):
                    continue  # a hash collision, not a shared n-gram
                fraction = lcs_length(ids, self._question_ids[index]) / len(ids)
                if not self.math or fraction > LCS_FRACTION:
                    return Contamination(self.questions[index], " ".join(prompt_words[start:start + NGRAM]), fraction)
        return None

    @staticmethod
    def _contains(sequence: list[int], window: list[int]) -> bool:
        return any(sequence[i:i + len(window)] == window for i in range(len(sequence) - len(window) + 1))

    def check(self, conversation: Conversation) -> Optional[str]:
        found = self.find(conversation.prompt)
        return None if found is None else found.describe()
