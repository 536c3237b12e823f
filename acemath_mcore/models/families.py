"""Model families, each declared once: HF config <-> ModelArch, and HF <-> megatron weight names.

The builder uses the config half, the checkpoint converters use both. Megatron names are the *canonical*
(Transformer-Engine style) parameter names that dist-checkpointing also uses, e.g.
``decoder.layers.3.self_attention.linear_qkv.layer_norm_weight``; the local spec's own names
(``input_layernorm.weight``) are translated in :mod:`acemath_mcore.models.weights`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from acemath_mcore.models.arch import ModelArch

# A reward model's scalar head (models/reward.py): the HF name (``*ForSequenceClassification``, num_labels=1)
# and ours (the dist-checkpoint key).
HF_REWARD_HEAD = "score.weight"
REWARD_HEAD_WEIGHT = "reward_head.weight"
# Megatron's llama3 rope scaling constants (megatron.core RotaryEmbedding._apply_scaling defaults).
_LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One megatron tensor: the HF tensors it is built from and how to fuse / split them.

    ``layer`` is the global decoder-layer index (None for embeddings, final norm and heads), so converters can
    stream a checkpoint one layer at a time. ``hf_shapes`` are the HF tensors' shapes, which the converters check.
    """

    megatron_name: str
    hf_names: Tuple[str, ...]
    to_megatron: Callable[[ModelArch, List[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[ModelArch, torch.Tensor], List[torch.Tensor]]
    hf_shapes: Tuple[Tuple[int, ...], ...]
    layer: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF architecture family mapped onto megatron-core's GPT model."""

    name: str
    hf_architectures: Tuple[str, ...]
    hf_model_type: str
    qkv_bias: bool

    def arch_from_hf(self, hf_config: Mapping) -> ModelArch:
        cfg = dict(hf_config)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{self.name}: hidden_act={cfg['hidden_act']!r} is not supported (SwiGLU/silu only)")
        if cfg.get("mlp_bias"):
            raise ValueError(f"{self.name}: mlp_bias=true is not supported")
        if cfg.get("attention_bias") and not self.qkv_bias:
            # HF's attention_bias also biases o_proj, which megatron's layers here (add_bias_linear=False) lack.
            raise ValueError(f"{self.name}: attention_bias=true (biases on q/k/v and o_proj) is not supported")
        if cfg.get("use_sliding_window"):
            # Qwen2's configs carry the switch (false in every Qwen2.5); full attention would change the model.
            raise ValueError(f"{self.name}: use_sliding_window=true (sliding-window attention) is not supported")
        rope = _read_rope(cfg, self.name)
        return ModelArch(
            family=self.name,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=cfg["num_attention_heads"],
            num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            # Stored only when it differs from hidden/heads, so equal shapes compare equal.
            head_dim=_explicit_head_dim(cfg),
            qkv_bias=self.qkv_bias,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=rope["theta"],
            rope_scaling_factor=rope["factor"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        )

    def hf_config_from_arch(self, arch: ModelArch, torch_dtype: str = "bfloat16", reward_model: bool = False) -> Dict:
        """A config.json that transformers (4.x legacy keys and 5.x rope_parameters) reads back to ``arch``;
        a reward model is a ``*ForSequenceClassification`` with one label (its scalar score)."""
        rope_parameters = {"rope_type": "default", "rope_theta": arch.rope_theta}
        legacy_scaling = None
        if arch.rope_scaling_factor is not None:
            legacy_scaling = {"rope_type": "llama3", "factor": arch.rope_scaling_factor, **_LLAMA3_ROPE_CONSTANTS}
            rope_parameters = {**legacy_scaling, "rope_theta": arch.rope_theta}
        config = {
            "architectures": [self.hf_architectures[0]],
            "model_type": self.hf_model_type,
            "hidden_act": "silu",
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.ffn_hidden_size,
            "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_attention_heads,
            "num_key_value_heads": arch.num_query_groups,
            "head_dim": arch.kv_channels,
            "vocab_size": arch.vocab_size,
            "max_position_embeddings": arch.max_position_embeddings,
            "rms_norm_eps": arch.rms_norm_eps,
            "rope_theta": arch.rope_theta,
            "rope_scaling": legacy_scaling,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": arch.tie_embeddings,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
            "attention_dropout": 0.0,
        }
        if self.hf_model_type == "llama":
            config.update(attention_bias=arch.qkv_bias, mlp_bias=False)
        if reward_model:
            config.update(architectures=[self.hf_reward_architecture], id2label={"0": "LABEL_0"},
                          label2id={"LABEL_0": 0})
        return config

    @property
    def hf_reward_architecture(self) -> str:
        return next(a for a in self.hf_architectures if a.endswith("ForSequenceClassification"))

    # ---- weights -------------------------------------------------------------------------------------------
    def tensor_rules(self, arch: ModelArch, reward_head: Optional[str] = None) -> List[TensorRule]:
        """Every megatron tensor of ``arch`` in checkpoint order (embedding, layers, final norm, head).

        With ``reward_head`` (the megatron name of a reward model's scalar head) the head is HF's
        ``score.weight`` of a ``*ForSequenceClassification`` model instead of the LM head.
        """
        h, vocab = arch.hidden_size, (arch.vocab_size, arch.hidden_size)
        rules = [TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _pad_vocab,
                            _unpad_vocab, (vocab,))]
        for i in range(arch.num_layers):
            hf_prefix, mc_prefix = f"model.layers.{i}.", f"decoder.layers.{i}."
            for mc_name, hf_names, fuse, split, shapes in _layer_rules(arch):
                rules.append(TensorRule(mc_prefix + mc_name, tuple(hf_prefix + name for name in hf_names), fuse,
                                        split, shapes, layer=i))
        rules.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), _identity, _identity,
                                ((h,),)))
        if reward_head is not None:
            rules.append(TensorRule(reward_head, (HF_REWARD_HEAD,), _identity, _identity, ((1, h),)))
        elif not arch.tie_embeddings:
            rules.append(TensorRule("output_layer.weight", ("lm_head.weight",), _pad_vocab, _unpad_vocab, (vocab,)))
        return rules

    def hf_shapes(self, arch: ModelArch, reward_model: bool = False) -> Dict[str, Tuple[int, ...]]:
        """Shape of every tensor in the HF checkpoint of ``arch``: a causal LM's, or with ``reward_model`` a
        ``*ForSequenceClassification``'s with one label (the scalar ``score`` head in place of the LM head)."""
        rules = self.tensor_rules(arch, REWARD_HEAD_WEIGHT if reward_model else None)
        return {name: shape for rule in rules for name, shape in zip(rule.hf_names, rule.hf_shapes, strict=True)}

    def hf_to_megatron(self, arch: ModelArch, hf: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Full (unsharded) megatron tensors from HF tensors; the vocabulary is padded with zero rows."""
        return {rule.megatron_name: rule.to_megatron(arch, [hf[name] for name in rule.hf_names])
                for rule in self.tensor_rules(arch)}

    def megatron_to_hf(self, arch: ModelArch, mc: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Inverse of :meth:`hf_to_megatron`: splits fused tensors and drops the vocabulary padding."""
        out = {}
        for rule in self.tensor_rules(arch):
            out.update(zip(rule.hf_names, rule.to_hf(arch, mc[rule.megatron_name]), strict=True))
        if arch.tie_embeddings:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out


def _explicit_head_dim(cfg: Mapping):
    head_dim = cfg.get("head_dim")
    return None if head_dim in (None, cfg["hidden_size"] // cfg["num_attention_heads"]) else head_dim


def _read_rope(cfg: Mapping, family: str) -> Dict:
    """RoPE theta and llama3 scaling from either transformers-4 keys or transformers-5 ``rope_parameters``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {}) or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if float(theta) != int(float(theta)):
        raise ValueError(f"{family}: rope_theta={theta} is not a whole number (megatron-core's rotary_base is an int)")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return {"theta": float(theta), "factor": None}
    if rope_type != "llama3":
        raise ValueError(f"{family}: rope scaling type {rope_type!r} is not supported (default or llama3 only)")
    for key, expected in _LLAMA3_ROPE_CONSTANTS.items():
        if float(scaling.get(key, expected)) != expected:
            raise ValueError(
                f"{family}: llama3 rope scaling {key}={scaling[key]} differs from megatron-core's fixed {expected}"
            )
    return {"theta": float(theta), "factor": float(scaling["factor"])}


def _pad_vocab(arch: ModelArch, tensors: List[torch.Tensor]) -> torch.Tensor:
    weight = tensors[0]
    if weight.shape[0] != arch.vocab_size:
        raise ValueError(f"embedding has {weight.shape[0]} rows but the config says vocab_size={arch.vocab_size}")
    pad = arch.padded_vocab_size - arch.vocab_size
    return torch.cat([weight, weight.new_zeros(pad, weight.shape[1])]) if pad else weight


def _unpad_vocab(arch: ModelArch, weight: torch.Tensor) -> List[torch.Tensor]:
    return [weight[: arch.vocab_size]]


def _fuse_qkv(arch: ModelArch, qkv: List[torch.Tensor]) -> torch.Tensor:
    """Megatron stores QKV grouped per KV head: [q heads of group g, k_g, v_g] for g in groups."""
    q, k, v = qkv
    groups, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _split_qkv(arch: ModelArch, fused: torch.Tensor) -> List[torch.Tensor]:
    groups, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // groups
    tail = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return [t.reshape(-1, *tail).contiguous() for t in (q, k, v)]


def _concat_rows(arch: ModelArch, tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def _split_rows_in_half(arch: ModelArch, tensor: torch.Tensor) -> List[torch.Tensor]:
    return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]


def _identity(arch: ModelArch, tensors):
    return tensors[0] if isinstance(tensors, list) else [tensors]


_Rule = Tuple[str, Tuple[str, ...], Callable, Callable, Tuple[Tuple[int, ...], ...]]


def _layer_rules(arch: ModelArch) -> List[_Rule]:
    """(megatron name, HF names, fuse HF->megatron, split megatron->HF, HF shapes) for every per-layer tensor."""
    attn = "self_attn."
    h, ffn = arch.hidden_size, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * arch.kv_channels, arch.num_query_groups * arch.kv_channels
    rules: List[_Rule] = [
        ("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), _identity, _identity, ((h,),)),
        ("self_attention.linear_qkv.weight", tuple(attn + p + "_proj.weight" for p in "qkv"), _fuse_qkv, _split_qkv,
         ((q, h), (kv, h), (kv, h))),
        ("self_attention.linear_proj.weight", (attn + "o_proj.weight",), _identity, _identity, ((h, q),)),
        ("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), _identity, _identity, ((h,),)),
        ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), _concat_rows, _split_rows_in_half,
         ((ffn, h), (ffn, h))),
        ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), _identity, _identity, ((h, ffn),)),
    ]
    if arch.qkv_bias:
        rules.append(("self_attention.linear_qkv.bias", tuple(attn + p + "_proj.bias" for p in "qkv"), _fuse_qkv,
                      _split_qkv, ((q,), (kv,), (kv,))))
    return rules


QWEN2 = Family(name="qwen2", hf_architectures=("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
               hf_model_type="qwen2", qkv_bias=True)
LLAMA = Family(name="llama", hf_architectures=("LlamaForCausalLM", "LlamaForSequenceClassification"),
               hf_model_type="llama", qkv_bias=False)

FAMILIES: Dict[str, Family] = {family.name: family for family in (QWEN2, LLAMA)}


def family_for_hf_config(hf_config: Mapping) -> Family:
    """Pick the family from config.json's ``architectures`` (or ``model_type``); unknown ones are an error."""
    architectures = hf_config.get("architectures") or []
    for family in FAMILIES.values():
        if any(a in family.hf_architectures for a in architectures) or hf_config.get("model_type") == family.hf_model_type:
            return family
    known = sorted(a for f in FAMILIES.values() for a in f.hf_architectures)
    raise ValueError(
        f"unsupported architecture {architectures or hf_config.get('model_type')!r}; supported: {', '.join(known)}"
    )
