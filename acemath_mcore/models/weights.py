"""Move full (unsharded) megatron tensors in and out of this rank's model chunks.

A *canonical* name is the Transformer-Engine-style megatron name with the *global* layer index, e.g.
``decoder.layers.17.mlp.linear_fc1.weight``; it is what :mod:`acemath_mcore.models.families` maps to HF.
A model chunk on one rank holds a tensor-parallel shard of some layers, under its *local* names (local layer
index inside the pipeline stage; the native spec calls the fused norms ``input_layernorm``/``pre_mlp_layernorm``).
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Tuple

import torch

# Native (local) spec names -> canonical (TE) names; the same table megatron uses for dist-checkpoint keys.
_LOCAL_TO_CANONICAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER_PARAM = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+)\.(.+)$")


def canonical_parameters(model: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(canonical name, local parameter) for every parameter of a model chunk; TE's extra state is skipped."""
    layers = unwrap_model(model).decoder.layers if hasattr(unwrap_model(model), "decoder") else []
    global_index = {local: layer.layer_number - 1 for local, layer in enumerate(layers)}
    for name, param in model.named_parameters():
        name = re.sub(r"^(module\.)+", "", name)
        match = _LAYER_PARAM.match(name)
        if match:
            local_index, rest = int(match.group(1)), match.group(2)
            rest = _LOCAL_TO_CANONICAL.get(rest, rest)
            name = f"decoder.layers.{global_index[local_index]}.{rest}"
        yield name, param


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT model inside megatron's DDP / Float16Module wrappers (which share its parameters)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def tp_split_dim(name: str) -> int | None:
    """Dimension along which megatron splits a tensor across TP ranks (None: replicated)."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias",
                      "linear_fc1.weight")):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The piece of a full canonical tensor that TP rank ``tp_rank`` holds."""
    dim = tp_split_dim(name)
    if dim is None or tp_size == 1:
        return full
    if name.endswith("linear_fc1.weight"):
        # SwiGLU fc1 is [gate; up]; each rank holds [gate_r; up_r].
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size)[tp_rank], torch.chunk(up, tp_size)[tp_rank]])
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_full_weights(model: torch.nn.Module, full: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int) -> int:
    """Copy this rank's shards of canonical full tensors into a model chunk; every parameter must be covered.

    Returns the number of tensors loaded. Shape mismatches and missing tensors are errors naming the tensor.
    """
    loaded = 0
    for name, param in canonical_parameters(model):
        if name == "output_layer.weight" and name not in full:
            name = "embedding.word_embeddings.weight"  # tied embeddings: the last stage keeps its own copy
        if name not in full:
            raise KeyError(f"no weight for {name} (model parameter of shape {tuple(param.shape)})")
        piece = shard(name, full[name], tp_rank, tp_size)
        if piece.shape != param.shape:
            raise ValueError(f"{name}: weight shard {tuple(piece.shape)} does not fit parameter {tuple(param.shape)}")
        param.copy_(piece.to(param.dtype))
        loaded += 1
    return loaded
