"""Planted slowdowns for the A/B gate's tests and error-rate measurement: nn.BatchNorm that also
repeats its own computation on a fraction of the batch (the first samples: contiguous in every
layout), forward and backward, so that the extra cost scales with the work (2x: the whole batch
again; 1.3x: 30% of it; a batch of one is repeated whole). Outputs,
gradients and running statistics are nn.BatchNorm's own (the repeat runs on detached copies
and never updates the running statistics): every gate case passes.

The factor is that of the BatchNorm work; per-call overhead (Python, dispatch) is repeated
whole, so a case dominated by overhead slows by more than the fraction. suites/ab_error_rates.py
measures the factor each one really has on its cases and reports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnbench.registry import from_classes


class _Attach(torch.autograd.Function):
    """y itself forward; backward hands y's gradient on to y and, for the samples the repeat
    covers, to the repeat (whose own backward then runs on its detached inputs)."""

    @staticmethod
    def forward(ctx, y, repeat):
        ctx.samples = repeat.shape[0]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.narrow(0, 0, ctx.samples)

    @staticmethod
    def jvp(ctx, y_tangent, repeat_tangent):
        return y_tangent.view_as(y_tangent)


class _Repeated:
    fraction = 1.0

    def forward(self, x):
        y = super().forward(x)  # type: ignore[misc]
        samples = max(1, round(self.fraction * x.shape[0])) if x.shape[0] else 0
        part = x.detach().narrow(0, 0, samples)
        weight = None if self.weight is None else self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        per_channel = part.numel() // max(1, part.shape[1])
        if per_channel < 2 and (self.training or self.running_mean is None):
            return y  # batch statistics of one value (or none): nothing to repeat
        if self.training or self.running_mean is None:
            if torch.is_grad_enabled():
                part = part.requires_grad_()
                weight = None if weight is None else weight.requires_grad_()
                bias = None if bias is None else bias.requires_grad_()
            repeat = F.batch_norm(part, None, None, weight, bias, True, 0.0, self.eps)
        else:
            repeat = F.batch_norm(
                part, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps
            )
        if torch.is_grad_enabled() and y.requires_grad and repeat.requires_grad:
            return _Attach.apply(y, repeat)
        return y


class Repeated1d(_Repeated, nn.BatchNorm1d):
    pass


class Repeated2d(_Repeated, nn.BatchNorm2d):
    pass


class Repeated3d(_Repeated, nn.BatchNorm3d):
    pass


class Partly1d(Repeated1d):
    fraction = 0.3


class Partly2d(Repeated2d):
    fraction = 0.3


class Partly3d(Repeated3d):
    fraction = 0.3


# 2x: the whole computation twice; 1.3x: again on 30% of the channels
slow2x = from_classes(
    "slow2x",
    {2: Repeated1d, 3: Repeated1d, 4: Repeated2d, 5: Repeated3d},
    description="nn.BatchNorm, all of it twice",
)
slow13 = from_classes(
    "slow13",
    {2: Partly1d, 3: Partly1d, 4: Partly2d, 5: Partly3d},
    description="nn.BatchNorm, 30% of it again",
)
