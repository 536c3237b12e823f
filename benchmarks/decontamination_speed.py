"""Decontamination speed: building the benchmark index and looking up long prompts in it.

Why: `launch/preprocess.py sft --curate decontaminate=math` checks every training prompt against every benchmark
question; at millions of prompts a lookup must cost microseconds to milliseconds, not a scan of the benchmarks.
The prompts here are the 800 real solutions of ../shared/data/rm/math_cot_100.jsonl (long texts, a few of which
restate their MATH test question), each looked up --repeats times; the median pass is reported.

Usage: python benchmarks/decontamination_speed.py [--shared ../shared] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acemath_mcore.data.decontamination import Decontaminator  # noqa: E402

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    decontaminator = Decontaminator.from_dir(args.shared / "data" / "eval", math=True)
    build_s = time.perf_counter() - started
    records = [json.loads(line) for line in (args.shared / "data/rm/math_cot_100.jsonl").read_text().splitlines()]
    prompts = [text for record in records for text in record["code"]]
    passes, flagged = [], 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        flagged = sum(decontaminator.find(prompt) is not None for prompt in prompts)
        passes.append(time.perf_counter() - started)
    median = statistics.median(passes)
    words = sum(len(prompt.split()) for prompt in prompts)
    print(f"index build {build_s:.2f} s; {len(prompts)} prompts ({words / len(prompts):.0f} words on average): "
          f"median pass {median * 1e3:.1f} ms = {median / len(prompts) * 1e6:.0f} us per prompt "
          f"(min {min(passes) * 1e3:.1f}, max {max(passes) * 1e3:.1f} ms over {args.repeats}); {flagged} flagged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
