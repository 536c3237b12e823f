"""acemath-mcore: AceMath post-training (SFT, math SFT, reward model, best-of-n) on megatron-core."""

__version__ = "0.1.0"
