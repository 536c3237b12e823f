"""Make the real megatron-core code run on a machine without CUDA.

megatron-core has no CPU code path: it allocates with ``device=torch.cuda.current_device()``, calls
``tensor.cuda()``, synchronises streams, asserts ``param.type() == 'torch.cuda.FloatTensor'`` in its
optimizer and seeds a CUDA RNG tracker. Rather than forking or editing site-packages, we redirect those
calls at run time:

* a ``TorchFunctionMode`` rewrites every CUDA device argument to the CPU, turns ``Tensor.cuda()`` into a
  no-op and makes ``Tensor.type()`` report the CUDA type name the optimizer expects;
* ``torch.cuda.current_device`` / ``synchronize`` / ``current_stream`` / memory queries get CPU stand-ins;
* the CUDA RNG functions and megatron's RNG-state tracker are backed by the CPU generator;
* custom autograd Functions' ``backward`` runs under the same mode: torch does not carry function modes into
  backward, and megatron allocates there too (e.g. the dummy weight gradient of gradient-accumulation fusion).

The shim is only ever installed when CUDA is absent (see :func:`acemath_mcore.runtime.device.needs_cpu_shim`),
and installing it twice is a no-op.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_INSTALL_LOCK = threading.Lock()
_installed_mode: "CudaToCpuMode | None" = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int is how megatron spells "this rank's GPU" (torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


def _to_cpu_device(value):
    return _CPU if _is_cuda_device(value) else value


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placements to the CPU for every torch call made while the mode is active.

    Every torch op of a CPU run passes through here, so the common case (no ``device`` keyword, not one of the
    three methods rewritten) returns after one set lookup and one truth test.
    """

    _REWRITTEN = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._REWRITTEN:
            return self._rewritten_method(func, args, kwargs or {})
        if kwargs:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = dict(kwargs, device=_CPU)
            return func(*args, **kwargs)
        return func(*args)

    @staticmethod
    def _rewritten_method(func, args, kwargs):
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu_device(kwargs["device"]))
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """megatron's model-parallel RNG tracker, backed by the CPU generator.

    Same contract as ``tensor_parallel.random.CudaRNGStatesTracker``: named states that ``fork()`` swaps in
    (e.g. so tensor-parallel shards initialise from different streams) and swaps back out afterwards.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


class _CpuStream:
    """Enough of torch.cuda.Stream for code that synchronises or waits on streams."""

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.set_device = lambda device: None
    cuda.device_count = lambda: 0
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.empty_cache = lambda: None
    # Streams: CPU work is synchronous, so the default stream is a no-op stand-in (megatron >= 0.19 waits on it).
    cuda.current_stream = lambda device=None: _CpuStream()
    cuda.default_stream = cuda.current_stream
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly, no cascade.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = cuda.manual_seed


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    original_initialize = mcore_random.initialize_rng_tracker

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        """megatron re-creates its tracker on force_reset; keep ours (CPU-backed) instead."""
        if force_reset:
            mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_rng_tracker.__wrapped__ = original_initialize
    mcore_random.initialize_rng_tracker = initialize_rng_tracker


def _run_custom_backward_under(mode: CudaToCpuMode) -> None:
    """Wrap the user ``backward`` that torch's autograd node for custom Functions looks up on every call."""
    from torch.autograd.function import BackwardCFunction

    if not hasattr(BackwardCFunction, "_get_user_fn"):
        raise RuntimeError(f"torch {torch.__version__}: BackwardCFunction._get_user_fn is gone; the CPU shim "
                           "needs a new way to run custom backward functions under its TorchFunctionMode")
    find_user_fn = BackwardCFunction._get_user_fn

    def user_fn_under_mode(node):
        user_fn = find_user_fn(node)

        def backward(*args):
            with mode:
                return user_fn(*args)

        return backward

    BackwardCFunction._get_user_fn = user_fn_under_mode


def install() -> CudaToCpuMode:
    """Install the shim (idempotent) and return its mode. The torch.cuda and megatron patches are process-wide;
    the device-redirecting mode is entered on the calling thread only (torch keeps mode stacks per thread), plus
    around custom autograd backward functions: a thread of its own that allocates on "cuda" is not redirected."""
    global _installed_mode
    with _INSTALL_LOCK:
        if _installed_mode is None:
            _patch_torch_cuda()
            _patch_megatron_rng()
            mode = CudaToCpuMode()
            mode.__enter__()
            _run_custom_backward_under(mode)
            _installed_mode = mode
        return _installed_mode


def is_installed() -> bool:
    return _installed_mode is not None
