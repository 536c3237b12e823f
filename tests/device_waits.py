"""Catch, on CPU, the operations that make the host wait for a CUDA device.

On CUDA the host stops until the device catches up when it reads a value (``item``, ``float``, ``bool`` of a
tensor) or runs an operation whose output size depends on values (boolean-mask indexing, ``nonzero``,
``masked_select``, ``repeat_interleave`` without its ``output_size``). Each such wait empties the device's queue:
the GPU then idles while the host launches the next kernels. These operations show in the dispatch of CPU tensors
too, so CPU tests can keep hot paths free of them. Copies to the host (``.cpu()``, ``.tolist()``) do not dispatch
on CPU tensors and are not seen.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_VALUE_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}
_MASK_INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                  "aten._index_put_impl_.default"}


class DeviceWaits(TorchDispatchMode):
    """Records (in ``seen``) each operation run under it that would make the host wait for a CUDA device."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in _VALUE_READS:
            self.seen.append(name)
        elif name in _MASK_INDEXING and any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
                                            for index in (args[1] if len(args) > 1 else ())):
            self.seen.append(f"{name} with a boolean mask")
        elif name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            self.seen.append(f"{name} without output_size")
        return func(*args, **kwargs)
