"""Reward-model entry point (AceMath-RM: listwise Bradley-Terry over 6 responses per problem).

    python launch/train_rm.py --recipe qwen25_math_7b_rm data.prefixes=[/data/rm] [reward.loss=pairwise_bt ...]
    torchrun --nproc-per-node 8 launch/train_rm.py --recipe ... ;  srun ... (see slurm/)
    python launch/train_rm.py --recipe tiny_rm --dry-run      # print the resolved config and exit

Data: launch/preprocess.py rm --num-responses 6 (see docs/data.md); losses and batching: docs/reward_model.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.launch_common import main_for  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_for("rm", __doc__))
