"""Gradient-accumulation fusion without apex.

With ``gradient_accumulation_fusion`` megatron-core's linear layers add ``grad_output^T @ input`` straight into
the parameter's fp32 ``main_grad`` buffer instead of producing a ``.grad`` that DDP's hook then adds in. For its
own (non-TE) linear layers it does this through apex's ``fused_weight_gradient_mlp_cuda`` extension and refuses
the option when apex is missing; Transformer Engine's layers fuse on their own. Without the fusion every linear
layer costs one extra weight-sized allocation and one ``add_`` kernel per micro-batch (about 1,000 kernels per
step on qwen2.5-1.5b, docs/benchmarks.md) and the TE spec cannot fuse either, because its output layer is
megatron's.

:func:`install` hands megatron a torch implementation of the extension's two functions when apex's is absent:

* operands and buffer of one dtype (fp32 training, bf16 ``main_grad``): ``main_grad.addmm_`` — one GEMM;
* bf16/fp16 operands into an fp32 buffer: ``torch.addmm(..., out_dtype=fp32, out=main_grad)`` — one GEMM that
  accumulates in fp32 — where this torch build supports it on the device, checked once against a float64
  reference; otherwise a GEMM and an ``add_``, the same arithmetic megatron's unfused path does.
"""

from __future__ import annotations

import functools
import logging
import types

import torch

logger = logging.getLogger("acemath_mcore")


def accumulate_weight_gradient(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` for 2-D ``[tokens, in]`` / ``[tokens, out]`` operands."""
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    elif mixed_precision_addmm_works(main_grad.device, total_input.dtype, main_grad.dtype):
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.add_(torch.mm(grad_output.t(), total_input))


@functools.lru_cache(maxsize=None)
def mixed_precision_addmm_works(device: torch.device, operand_dtype: torch.dtype, buffer_dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(out_dtype=buffer_dtype, out=buffer)`` accumulates low-precision operands into a
    wider buffer in place on ``device``: tried once on a small problem and compared with float64."""
    generator = torch.Generator().manual_seed(0)
    grad_output, total_input = (torch.randn(64, n, generator=generator) for n in (48, 32))
    buffer = torch.randn(48, 32, generator=generator)
    expected = buffer.double() + grad_output.to(operand_dtype).double().t() @ total_input.to(operand_dtype).double()
    buffer = buffer.to(device, buffer_dtype)
    try:
        torch.addmm(buffer, grad_output.to(device, operand_dtype).t(), total_input.to(device, operand_dtype),
                    out_dtype=buffer_dtype, out=buffer)
        works = torch.allclose(buffer.double().cpu(), expected, rtol=1e-3, atol=1e-3)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        logger.info("Weight-gradient accumulation: torch.addmm(out_dtype=%s) is unavailable for %s on %s (%s); "
                    "using a GEMM then an add.", buffer_dtype, operand_dtype, device.type, str(error).splitlines()[0])
        return False
    logger.info("Weight-gradient accumulation: %s GEMM into %s main_grad on %s.",
                "one fused" if works else "GEMM + add (the fused addmm gave wrong numbers)", buffer_dtype,
                device.type)
    return works


TORCH_WGRAD_EXTENSION = types.SimpleNamespace(wgrad_gemm_accum_fp32=accumulate_weight_gradient,
                                              wgrad_gemm_accum_fp16=accumulate_weight_gradient)


def install() -> str:
    """Make megatron's linear layers accept ``gradient_accumulation_fusion``; returns which implementation they
    use: ``"apex"`` when its extension is importable, ``"torch"`` after installing ours (idempotent)."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is TORCH_WGRAD_EXTENSION:
        return "torch"
    if layers._grad_accum_fusion_available:
        return "apex"
    layers.fused_weight_gradient_mlp_cuda = TORCH_WGRAD_EXTENSION
    layers._grad_accum_fusion_available = True
    logger.info("apex's fused_weight_gradient_mlp_cuda not found: megatron's linear layers accumulate weight "
                "gradients through acemath_mcore.runtime.wgrad_fusion.")
    return "torch"
