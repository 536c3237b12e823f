"""The tiny embedded AceMath run on CPU: the whole pipeline at toy scale, no downloads (docs/demo.md).

    synthetic data -> preprocess -> stories260K (HF -> Megatron) -> SFT stage 1 -> stage 2 -> math SFT
    -> sample candidates, grade them -> reward model (listwise Bradley-Terry)
    -> held-out greedy pass@1, rm@k / maj@k / pass@k + plot -> HF export

    python launch/demo.py                       # about 8-9 minutes on 2 idle CPU cores
    python launch/demo.py --workdir /tmp/demo stage_steps=[60,60,400] rm_steps=200   # any field, key=value

Everything lands under --workdir: data/, checkpoints/, runs/ (per-stage logs), eval/ (JSONL, best-of-n table and
plot), hf/ (exported models), results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.toy_pipeline import ToyPipelineConfig  # noqa: E402


def parse_args(argv=None) -> ToyPipelineConfig:
    fields = ", ".join(field.name for field in dataclasses.fields(ToyPipelineConfig))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=ToyPipelineConfig.workdir)
    parser.add_argument("overrides", nargs="*", help=f"key=value settings; keys: {fields}")
    args = parser.parse_args(argv)
    from acemath_mcore.recipes.config import OverrideError, apply_overrides

    config = ToyPipelineConfig(workdir=args.workdir)
    try:
        return apply_overrides(config, args.overrides)
    except OverrideError as error:
        parser.error(str(error))


def main(argv=None) -> int:
    config = parse_args(argv)
    from acemath_mcore.runtime import destroy_distributed
    from acemath_mcore.toy_pipeline import format_report, run_toy_pipeline
    from acemath_mcore.training.logging import setup_console_logging

    setup_console_logging(0)
    try:
        results = run_toy_pipeline(config)
    finally:
        destroy_distributed()
    print(format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
