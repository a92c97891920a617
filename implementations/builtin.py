"""torch.nn.BatchNorm1d/2d/3d: native kernels on CPU, cuDNN on CUDA; and, on CUDA only, the same
modules with cuDNN disabled so the native CUDA kernels are verified and timed too."""

from __future__ import annotations

import torch
from torch import nn

from bnbench.registry import from_classes

builtin = from_classes(
    "builtin",
    {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d},
    description="torch.nn.BatchNorm1d/2d/3d (native kernels on CPU, cuDNN on CUDA)",
)


def _without_cudnn(cls: type[nn.Module]) -> type[nn.Module]:
    class NativeCUDA(cls):
        def forward(self, input):
            with torch.backends.cudnn.flags(enabled=False):
                return super().forward(input)

    NativeCUDA.__name__ = NativeCUDA.__qualname__ = f"Native{cls.__name__}"
    globals()[NativeCUDA.__name__] = NativeCUDA  # importable by name: modules pickle
    return NativeCUDA


_native = {
    1: _without_cudnn(nn.BatchNorm1d),
    2: _without_cudnn(nn.BatchNorm2d),
    3: _without_cudnn(nn.BatchNorm3d),
}

builtin_native = from_classes(
    "builtin-native",
    {2: _native[1], 3: _native[1], 4: _native[2], 5: _native[3]},
    description="torch.nn.BatchNorm*d with cuDNN disabled (native CUDA kernels)",
    supports_devices=frozenset({"cuda"}),
)
