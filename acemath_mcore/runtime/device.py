"""Which accelerator we run on, decided once: CUDA (NCCL, Transformer Engine when importable) or CPU (gloo + shim).

Every other module asks this one instead of calling ``torch.cuda.is_available()`` itself, so the
CPU/GPU difference lives in a single place.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from acemath_mcore.options import LM_CROSS_ENTROPY_CHOICES

logger = logging.getLogger("acemath_mcore")


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when a usable CUDA device exists (``ACEMATH_FORCE_CPU=1`` forces the CPU path)."""
    if os.environ.get("ACEMATH_FORCE_CPU", "0") == "1":
        return False
    return torch.cuda.is_available()


def needs_cpu_shim(has_cuda: bool) -> bool:
    """The megatron-core CPU shim is for machines without CUDA only; it must never wrap a GPU run."""
    return not has_cuda


def distributed_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def setup_device(local_rank: int) -> torch.device:
    """Bind this process to its device; on CPU install the shim so megatron-core's CUDA calls land on the CPU."""
    if needs_cpu_shim(cuda_available()):
        from acemath_mcore.runtime import cpu_shim

        cpu_shim.install()
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def accelerator_rng_state() -> Optional[torch.Tensor]:
    """The GPU's default generator state for a checkpoint (None on CPU, whose generator torch's state covers)."""
    return torch.cuda.get_rng_state() if cuda_available() else None


def set_accelerator_rng_state(state: Optional[torch.Tensor]) -> None:
    """Restore :func:`accelerator_rng_state`'s value; a CPU run ignores a GPU run's state and the other way round."""
    if state is not None and cuda_available():
        torch.cuda.set_rng_state(state)


def pin_host_batches() -> bool:
    """Whether loaders return page-locked batches, so the copies to a GPU do not make the host wait."""
    return cuda_available()


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """Transformer Engine is used when it imports on a CUDA machine; say once which path we take."""
    if not cuda_available():
        logger.info("No CUDA device: using the native (TE-free) layer spec on CPU.")
        return False
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # ImportError, or a broken install that fails at import time
        logger.info("Transformer Engine not importable (%s): using the native layer spec.", error)
        return False
    logger.info("Transformer Engine %s found: using the TE layer spec.", transformer_engine.__version__)
    return True


@functools.lru_cache(maxsize=None)
def apex_available() -> bool:
    try:
        import apex  # noqa: F401
    except ImportError:
        logger.info("apex not installed: megatron-core falls back to torch's fused AdamW and local kernels.")
        return False
    return True


def synchronize() -> None:
    if cuda_available():
        torch.cuda.synchronize()


def torch_profiler_settings() -> tuple:
    """(torch-profiler activities, the key-averages column to sort an operator table by) for this machine."""
    from torch.profiler import ProfilerActivity

    if cuda_available():
        return [ProfilerActivity.CPU, ProfilerActivity.CUDA], "self_cuda_time_total"
    return [ProfilerActivity.CPU], "self_cpu_time_total"


def require_cuda_profiler() -> None:
    if not cuda_available():
        raise RuntimeError("profile.tool=nsys brackets the steps with cudaProfilerStart/Stop and needs a CUDA "
                           "device; use profile.tool=torch here")


@contextlib.contextmanager
def cuda_profiler_range():
    """cudaProfilerStart ... cudaProfilerStop: what ``nsys profile --capture-range=cudaProfilerApi`` records (CUDA
    only: its user checks require_cuda_profiler before training)."""
    torch.cuda.profiler.start()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def host_waits(work) -> Optional[collections.Counter]:
    """Run ``work()`` and count, by source line, the calls in it that made the host wait for the GPU (CUDA's
    sync debug mode warns at each one). None on CPU, where there is no device to wait for."""
    if not cuda_available():
        work()
        return None
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return collections.Counter(f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}" for w in caught
                               if "synchroniz" in str(w.message))


def peak_memory_bytes() -> int:
    """Peak device memory on CUDA; peak resident set size of this process on CPU."""
    if cuda_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_memory_bytes() -> int:
    """Memory this process could still allocate: on CUDA the device's free memory plus what torch's caching
    allocator holds unused; on CPU its share of the host memory the OS reports available (torchrun's
    ``LOCAL_WORLD_SIZE`` processes share it)."""
    if cuda_available():
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    import psutil

    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def fusion_options(use_transformer_engine: bool) -> dict:
    """TransformerConfig kernel-fusion flags that are valid on this machine.

    On CPU every fusion is off (they are CUDA kernels). On CUDA the native spec gets the fusions
    megatron-core implements itself (SwiGLU, bias-dropout-add, fused vocab-parallel cross entropy); RoPE and
    persistent-norm fusion come from Transformer Engine, so only the TE spec enables them. Gradient-accumulation
    fusion is not a kernel choice: it works everywhere (see :mod:`acemath_mcore.runtime.wgrad_fusion`).
    """
    if not cuda_available():
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                    persist_layer_norm=False, apply_rope_fusion=False, cross_entropy_loss_fusion=False)
    return dict(bias_activation_fusion=True, bias_dropout_fusion=True, masked_softmax_fusion=False,
                persist_layer_norm=use_transformer_engine, apply_rope_fusion=use_transformer_engine,
                cross_entropy_loss_fusion=True)


def lm_cross_entropy(requested: str = "auto") -> str:
    """Which kernel computes the language-model loss: ``"triton"`` (:mod:`acemath_mcore.models.cross_entropy`, no
    fp32 softmax copy) needs CUDA and Triton; ``"megatron"`` is megatron-core's (fused on CUDA, plain on CPU).
    ``"auto"`` picks the Triton kernel wherever it can run."""
    if requested not in LM_CROSS_ENTROPY_CHOICES:
        raise ValueError(f"model cross_entropy must be one of {LM_CROSS_ENTROPY_CHOICES}, got {requested!r}")
    if requested == "megatron":
        return "megatron"
    usable = cuda_available() and importlib.util.find_spec("triton") is not None
    if requested == "triton" and not usable:
        raise RuntimeError("cross_entropy='triton' needs a CUDA device and the triton package; use 'auto' or "
                           "'megatron' here")
    return "triton" if usable else "megatron"


# Dense bf16 tensor-core peaks (datasheets) by device-name fragment; used for MFU in training logs.
# The PCIe and NVL H100s come before the SXM part's plain "H100": the first fragment in the device name wins.
BF16_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835.5e12, "H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12,
                   "A100": 312e12, "B200": 2250e12}


def bf16_peak_flops() -> float | None:
    """Datasheet bf16 peak of this GPU, or None (CPU, unknown GPU): then no MFU is logged."""
    if not cuda_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), None)
