"""SFT entry point (general SFT stage 1/2 and math SFT).

    python launch/train_sft.py --recipe qwen25_math_7b_sft_stage1 data.prefixes=[/data/stage1] [key=value ...]
    torchrun --nproc-per-node 8 launch/train_sft.py --recipe ... ;  srun ... (see slurm/)
    python launch/train_sft.py --recipe tiny_sft --dry-run      # print the resolved config and exit
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from acemath_mcore.launch_common import main_for

if __name__ == "__main__":
    sys.exit(main_for("sft", __doc__))
