"""torch.compile of the vectorized BatchNorm.

Only the two heavy kernels are compiled; argument checks, the running-statistics update (O(C))
and the layout bookkeeping stay in eager Python, so error messages and state handling are the
vectorized implementation's own. Kernels are compiled once per process, with dynamic shapes: a
new batch size or spatial size reuses the compiled code instead of recompiling, and every rank
and memory format maps onto the same canonical (N, C, L) / (M, C) views.

Double backward is not supported: AOTAutograd's compiled backward is not itself differentiable.
"""

from __future__ import annotations

import functools

import torch

from bnbench.implementations.vectorized import (
    VectorizedBatchNorm,
    eval_kernel,
    rank_classes,
    train_kernel,
)
from bnbench.registry import from_classes


@functools.cache
def compiled_kernels():
    """The compiled (train, eval) kernels, shared by every module of this process."""
    # Each dtype / affine / grad-mode variant is its own graph: allow enough of them that a sweep
    # never silently falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 1024
    )
    return (torch.compile(train_kernel, dynamic=True), torch.compile(eval_kernel, dynamic=True))


class CompiledBatchNorm(VectorizedBatchNorm):
    """VectorizedBatchNorm whose kernels run through torch.compile (inductor)."""

    @staticmethod
    def train_kernel(x, weight, bias, eps):
        return compiled_kernels()[0](x, weight, bias, eps)

    @staticmethod
    def eval_kernel(x, running_mean, running_var, weight, bias, eps):
        return compiled_kernels()[1](x, running_mean, running_var, weight, bias, eps)


_classes = rank_classes(CompiledBatchNorm, "Compiled")
# Importable by name, so modules pickle.
CompiledBatchNorm1d, CompiledBatchNorm2d, CompiledBatchNorm3d = (
    _classes[2],
    _classes[4],
    _classes[5],
)

compiled = from_classes(
    "compiled",
    _classes,
    description="torch.compile(dynamic=True) of the vectorized kernels",
    supports_double_backward=False,
    deviations={
        "forward_ad-*": "the vectorized autograd.Function it compiles defines no jvp: "
        "forward-mode AD (torch.func.jvp) raises",
    },
)
