"""Build megatron-core GPT models (one per pipeline/virtual-pipeline stage) from a :class:`ModelArch`."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Type

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.specs import layer_spec, resolve_spec_name
from acemath_mcore.options import CUDA_GRAPH_SCOPES, RECOMPUTE_GRANULARITIES, ModelOptions, ParallelConfig
from acemath_mcore.runtime import device as device_lib
from acemath_mcore.runtime import wgrad_fusion

CUDA_GRAPH_WARMUP_STEPS = 2


@dataclasses.dataclass
class AcemathTransformerConfig(TransformerConfig):
    """megatron's TransformerConfig plus the choices it has no field for; read by :class:`CausalLM`."""

    lm_cross_entropy: str = "megatron"  # "triton" | "megatron", resolved by transformer_config


class CausalLM(GPTModel):
    """megatron's GPTModel with the language-model loss from :mod:`acemath_mcore.models.cross_entropy` when the
    config selects it (megatron's fused loss keeps an fp32 softmax of every token for the backward pass)."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if getattr(self.config, "lm_cross_entropy", "megatron") != "triton":
            return super().compute_language_model_loss(labels, logits)
        from acemath_mcore.models.cross_entropy import vocab_parallel_cross_entropy

        # logits [s, b, vocab/tp], labels [b, s]; megatron's contract returns the loss as [b, s].
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1),
                                            parallel_state.get_tensor_model_parallel_group())
        return loss.transpose(0, 1).contiguous()


def transformer_config(arch: ModelArch, parallel: ParallelConfig, options: ModelOptions,
                       with_ddp: bool = False) -> TransformerConfig:
    """megatron's TransformerConfig for these shapes, layout and options; ``with_ddp`` when the model will be
    wrapped in megatron's DDP (its main_grad buffers are what gradient-accumulation fusion writes into)."""
    arch.check_tensor_parallel(parallel.tensor_parallel)
    spec = resolve_spec_name(options.spec)
    device_lib.apex_available()  # says once which fallback megatron uses without apex
    if options.fp8 and spec != "te":
        missing = "" if device_lib.transformer_engine_available() else " (Transformer Engine is not available here)"
        raise RuntimeError(f"FP8 needs Transformer Engine's layer spec (model_options.spec=te); this model is built "
                           f"with the {spec} spec{missing}")
    if parallel.context_parallel > 1:
        # megatron's RoPE and TE's ring attention expect each CP rank to hold its own slice of every sequence
        # (get_batch_on_this_cp_rank, padded cu_seqlens for packed rows); our loaders give every rank whole rows,
        # which would train silently on wrong positions and attention.
        raise ValueError(f"context_parallel={parallel.context_parallel}: context parallelism is not supported (the "
                         "data path does not split sequences across CP ranks); use parallel.context_parallel=1 and "
                         "tensor parallelism with sequence parallelism or recompute for long sequences")
    if spec == "native" and parallel.sequence_parallel and parallel.tensor_parallel > 1:
        raise ValueError("sequence parallelism needs the TE spec (megatron's torch norms refuse it); "
                         "set parallel.sequence_parallel=false for the native spec")
    dtype = torch.bfloat16 if options.bf16 else torch.float32
    recompute = {}
    if options.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=options.recompute_num_layers)
    elif options.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif options.recompute is not None:
        raise ValueError(f"recompute must be None or one of {RECOMPUTE_GRANULARITIES}, got {options.recompute!r}")
    fp8 = dict(fp8=options.fp8, fp8_recipe=options.fp8_recipe) if options.fp8 else {}
    graphs = _checked_cuda_graph_fields(options, spec)
    fuse_wgrad = options.gradient_accumulation_fusion and with_ddp
    if fuse_wgrad:
        wgrad_fusion.install()
    return AcemathTransformerConfig(
        lm_cross_entropy=device_lib.lm_cross_entropy(options.cross_entropy),
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=options.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor_parallel > 1,
        # Interleaved schedules exchange activations and gradients with the same peer in one step; megatron's
        # batched P2P then pairs them wrongly when PP=2 (prev == next stage). Megatron-LM also disables it with VPP.
        batch_p2p_comm=parallel.virtual_pipeline_parallel is None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=options.bf16,
        gradient_accumulation_fusion=fuse_wgrad,
        **device_lib.fusion_options(spec == "te"),
        **recompute,
        **fp8,
        **graphs,
    )


def _checked_cuda_graph_fields(options: ModelOptions, spec: str) -> dict:
    if options.cuda_graph is None:
        return {}
    if options.cuda_graph not in CUDA_GRAPH_SCOPES:
        raise ValueError(f"model_options.cuda_graph={options.cuda_graph!r}: choose none or one of {CUDA_GRAPH_SCOPES} "
                         "(attention reads each packed micro-batch's document boundaries, which a CUDA graph cannot "
                         "take)")
    if spec != "te" or not device_lib.cuda_available():
        where = "" if device_lib.cuda_available() else " on a machine without CUDA"
        raise RuntimeError(f"model_options.cuda_graph needs Transformer Engine's layer spec on a GPU "
                           f"(model_options.spec=te); this model is built with the {spec} spec{where}")
    if not options.bf16:
        raise ValueError("model_options.cuda_graph needs model_options.bf16=true (megatron captures bf16 activations)")
    if options.recompute == "full":
        raise ValueError("model_options.cuda_graph does not combine with recompute='full' (megatron refuses it); "
                         "use recompute='selective' or none")
    return cuda_graph_fields(options.cuda_graph)


def cuda_graph_fields(scope: str) -> dict:
    """TransformerConfig fields for TE CUDA graphs of ``scope``: megatron-core 0.16.1 names the scope field
    ``cuda_graph_scope``, 0.19.2 ``cuda_graph_modules`` (the old name is deprecated there)."""
    names = {field.name for field in dataclasses.fields(TransformerConfig)}
    scope_field = "cuda_graph_modules" if "cuda_graph_modules" in names else "cuda_graph_scope"
    return {"cuda_graph_impl": "transformer_engine", scope_field: scope,
            "cuda_graph_warmup_steps": CUDA_GRAPH_WARMUP_STEPS}


def build_model_chunk(
    arch: ModelArch,
    config: TransformerConfig,
    spec: str = "auto",
    vp_stage: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    model_class: Type[GPTModel] = CausalLM,
) -> GPTModel:
    """One GPT model chunk for this rank's pipeline stage (and virtual stage ``vp_stage``); ``model_class``
    swaps in a GPTModel subclass (the reward model) built with the same arguments."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = model_class(
        config=config,
        transformer_layer_spec=layer_spec(spec, config, vp_stage),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        parallel_output=True,
        vp_stage=vp_stage,
    )
    return model.to(device_lib.current_device())


def build_model(arch: ModelArch, parallel: ParallelConfig, options: ModelOptions,
                model_class: Type[GPTModel] = CausalLM) -> List[GPTModel]:
    """All model chunks of this rank: one, or one per virtual pipeline stage. They are not wrapped in megatron's
    DDP (the Engine does that), so a backward pass through them fills ``.grad`` as in plain torch."""
    config = transformer_config(arch, parallel, options)
    stages = parallel.virtual_pipeline_parallel or 1
    return [
        build_model_chunk(arch, config, options.spec, vp_stage=stage if stages > 1 else None, model_class=model_class)
        for stage in range(stages)
    ]
