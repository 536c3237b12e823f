"""Best-of-n evaluation CLI: rm@k, maj@k and pass@k from scored samples (see acemath_mcore.eval.bestofn).

Example: python launch/bestofn.py --input ../shared/data/rm/math_cot_100.jsonl --k 8 --table --json out.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.eval.bestofn import main  # noqa: E402

if __name__ == "__main__":
    from acemath_mcore.cli import exit_on_input_errors

    sys.exit(exit_on_input_errors(main))
