"""Preprocessing throughput (tokens/s) and packing fill ratio on AceMath-like conversations.

  python benchmarks/preprocess_speed.py [--samples 40000] [--workers 2] [--tokenizer ../shared/tokenizers/qwen2]

Two corpora, nothing downloaded:
- synthetic: generated math questions and chain-of-thought answers (prose, LaTeX, numbers), lognormal lengths
  (median ~60 words per question, ~250 per answer), 10% two-turn;
- real: real benchmark questions (shared/data/eval) paired with real model solutions (shared/data/rm), cycled.
Results go to stdout as JSON; docs/data.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acemath_mcore.data.chat_templates import MATH_SYSTEM_PROMPT  # noqa: E402
from acemath_mcore.data.datasets import BlendedDocuments, PackedSFTDataset  # noqa: E402
from acemath_mcore.data.indexed import SFTIndexedDataset  # noqa: E402
from acemath_mcore.data.packing import best_fit_decreasing, fill_ratio  # noqa: E402
from acemath_mcore.data.preprocess import PreprocessConfig, preprocess_sft  # noqa: E402
from acemath_mcore.data.tokenizers import HFTokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"

_PROSE = (
    "the of and to a in is that we for it as with so this are by be find let then since therefore thus "
    "value number equation solve each total sum both first second next step gives from which when where "
    "integer positive real function side angle triangle area probability answer term sequence root factor "
    "Note that We have Substituting into Hence Simplifying Now consider Multiplying both sides by"
).split()
_MATH = [
    r"$x$", r"$y = 2x + 3$", r"$\frac{a}{b}$", r"$\sqrt{2}$", r"$x^2 - 5x + 6 = 0$", r"$(x-2)(x-3)$",
    r"$\pi r^2$", r"$\binom{n}{k}$", r"$a_n = a_1 + (n-1)d$", r"$\sin^2\theta + \cos^2\theta = 1$",
    r"\[ \sum_{i=1}^{n} i = \frac{n(n+1)}{2} \]", r"$f(x) = 3x^3 - 2x$", r"$\log_2 8 = 3$", r"$\angle ABC$",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_PROSE) for _ in range(rng.randint(6, 18))]
    for _ in range(rng.randint(0, 3)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(_MATH) if rng.random() < 0.7 else str(rng.randint(0, 9999)))
    return " ".join(words) + rng.choice([".", ".", ",", ":"])


def _text(rng: random.Random, median_words: float) -> str:
    target = max(8, int(rng.lognormvariate(np.log(median_words), 0.6)))
    sentences, count = [], 0
    while count < target:
        sentences.append(_sentence(rng))
        count += sentences[-1].count(" ") + 1
        if rng.random() < 0.25:
            sentences.append("\n\n")
    return " ".join(sentences).strip()


def synthetic_conversation(rng: random.Random) -> dict:
    turns = 2 if rng.random() < 0.1 else 1
    messages = []
    for _ in range(turns):
        messages.append({"role": "user", "content": _text(rng, 60)})
        answer = _text(rng, 250) + f"\n\nThe final answer is $\\boxed{{{rng.randint(0, 999)}}}$."
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "answer": "42"}


def write_synthetic(path: Path, samples: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(samples):
            handle.write(json.dumps(synthetic_conversation(rng)) + "\n")


def write_real(path: Path, samples: int, shared: Path) -> None:
    """Real questions of every benchmark with real chain-of-thought solutions, paired round-robin."""
    questions = []
    for test_file in sorted((shared / "data" / "eval").glob("*/test.jsonl")):
        for line in test_file.read_text().splitlines():
            record = json.loads(line)
            questions.append(record.get("question") or record.get("problem"))
    rm_lines = (shared / "data" / "rm" / "math_cot_100.jsonl").read_text().splitlines()
    solutions = [code for line in rm_lines for code in json.loads(line)["code"]]
    with open(path, "w") as handle:
        for i in range(samples):
            messages = [{"role": "user", "content": questions[i % len(questions)]},
                        {"role": "assistant", "content": solutions[i % len(solutions)]}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def measure(data: Path, prefix: str, args: argparse.Namespace, tokenizer: Optional[HFTokenizer] = None) -> dict:
    started = time.monotonic()
    stats = preprocess_sft(PreprocessConfig(
        inputs=[str(data)], output_prefix=prefix, tokenizer=args.tokenizer, system_prompt=MATH_SYSTEM_PROMPT,
        max_length=args.seq_length, workers=args.workers, progress=False,
    ), tokenizer)
    wall = time.monotonic() - started
    packing_started = time.monotonic()
    packed = PackedSFTDataset(BlendedDocuments([SFTIndexedDataset(prefix)], seed=args.seed), args.seq_length)
    return {
        "samples": stats["samples"],
        "tokens": stats["tokens"],
        "input_mb": round(stats["input_bytes"] / 2**20, 1),
        "setup_s": stats["setup_s"],
        "process_s": stats["process_s"],
        "tokens_per_s_processing": stats["tokens_per_s"],
        "tokens_per_s_end_to_end": round(stats["tokens"] / wall),
        "packing_fill_ratio": round(packed.fill_ratio, 4),
        "packing_s": round(time.monotonic() - packing_started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "qwen2"))
    parser.add_argument("--shared", default=str(SHARED), help="the shared assets folder (real corpus)")
    parser.add_argument("--samples", type=int, default=40000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for corpus in ("synthetic", "real"):
            data = Path(scratch) / f"{corpus}.jsonl"
            if corpus == "synthetic":
                write_synthetic(data, args.samples, args.seed)
            else:
                write_real(data, args.samples, Path(args.shared))
            results[corpus] = measure(data, str(Path(scratch) / corpus), args)
        # The same real corpus through the Hugging Face `tokenizers` backend instead of the tiktoken twin.
        backend = HFTokenizer.from_path(Path(args.tokenizer), use_tiktoken=False)
        results["real_tokenizers_backend"] = measure(data, str(Path(scratch) / "real_hf"), args, backend)

    lognormal = np.clip(np.random.default_rng(args.seed).lognormal(np.log(600), 0.9, 200_000).astype(int), 1,
                        args.seq_length)
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()}-core CPU, {platform.processor() or platform.machine()}",
        "command": " ".join(["python", "benchmarks/preprocess_speed.py"] + sys.argv[1:]),
        "workers": args.workers,
        **results,
        "packing_fill_ratio_lognormal_200k": round(
            fill_ratio(lognormal, best_fit_decreasing(lognormal, args.seq_length), args.seq_length), 4),
    }, indent=2))


if __name__ == "__main__":
    main()
