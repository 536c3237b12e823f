"""Full canonical weights for tests that need the same model at any layout, and the inverse of the library's
tensor-parallel ``shard`` (to compare gathered gradients)."""

from __future__ import annotations

from typing import Dict

import torch

from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.families import FAMILIES
from acemath_mcore.models.weights import tp_split_dim


def random_full_weights(arch: ModelArch, seed: int = 0, std: float = 0.02) -> Dict[str, torch.Tensor]:
    """Random canonical weights (norm weights around 1), built through the family's HF mapping."""
    family = FAMILIES[arch.family]
    generator = torch.Generator().manual_seed(seed)
    hf = {}
    for name, shape in family.hf_shapes(arch).items():
        if name.endswith("norm.weight"):
            hf[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            hf[name] = std * torch.randn(shape, generator=generator)
    return family.hf_to_megatron(arch, hf)


def unshard(name: str, pieces: list) -> torch.Tensor:
    """Inverse of ``weights.shard`` given all TP ranks' pieces in rank order."""
    dim = tp_split_dim(name)
    if dim is None or len(pieces) == 1:
        return pieces[0]
    if name.endswith("linear_fc1.weight"):
        halves = [torch.chunk(piece, 2, dim=0) for piece in pieces]
        return torch.cat([half[0] for half in halves] + [half[1] for half in halves])
    return torch.cat(pieces, dim=dim)
