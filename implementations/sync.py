"""Synchronized BatchNorm: every rank normalizes its shard with the statistics of the global
batch, as torch.nn.SyncBatchNorm does, on any torch.distributed backend (gloo on CPU, NCCL on
CUDA).

``builtin-sync`` is nn.SyncBatchNorm itself. In training with an initialized process group it
only accepts accelerator tensors (its ATen helpers have no CPU kernels), so on CPU it is "not
supported", with that reason.

``sync`` is bnbench's own, written from nn.SyncBatchNorm's documented behaviour with plain
collectives, so that synchronized BN can be run and checked on CPU:

- forward: each rank computes its shard's count, mean and biased variance (float32 for half
  inputs, as the native kernels compute), all_gathers them as float64 and merges them with
  Chan's parallel formula weighted by each rank's count, so uneven shards and ranks with no
  samples are exact (a rank with 0 samples contributes nothing but still takes part in the
  collective); running_var takes the unbiased variance with the global count;
- backward: the per-channel sums of grad_output and grad_output * (x - mean) are all-reduced
  for the input gradient; the weight and bias gradients stay each rank's own contribution,
  which DistributedDataParallel sums, as nn.SyncBatchNorm leaves them;
- eval, a process group of one rank, or no initialized process group: plain local BatchNorm,
  no communication (in eval without running statistics, the shard's own statistics).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bnbench.registry import from_module_class

_HALF = (torch.float16, torch.bfloat16)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d if not x.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format


def _gather(stats: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``stats`` (one row per rank of ``group``)."""
    world = dist.get_world_size(group)
    rows = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(rows, stats, group=group)
    return torch.stack(rows)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        c = x.shape[1]
        compute = torch.float32 if x.dtype in _HALF else x.dtype
        xc = x.to(compute)
        dims = _reduce_dims(x)
        count = x.numel() // c if c else 0
        if count > 0:
            var, mean = torch.var_mean(xc, dims, correction=0)
        else:
            var = mean = torch.zeros(c, dtype=compute, device=x.device)
        local = torch.cat(
            [
                torch.tensor([float(count)], dtype=torch.float64, device=x.device),
                mean.to(torch.float64),
                (var.to(torch.float64) * count),
            ]
        )
        rows = _gather(local, group)  # (world, 1 + 2C)
        counts, means, m2s = rows[:, :1], rows[:, 1 : 1 + c], rows[:, 1 + c :]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{total:g} over the process group"
            )
        # Chan et al.'s merge: exact for any split, ranks with no samples weigh nothing
        g_mean = (counts * means).sum(0) / total
        g_m2 = (m2s + counts * (means - g_mean) ** 2).sum(0)
        g_var = g_m2 / total
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
                unbiased = g_m2 / (total - 1)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        mean_c = g_mean.to(compute)
        invstd = torch.rsqrt(g_var + eps).to(compute)
        view = (1, c) + (1,) * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight.to(compute)
        shift = -mean_c * scale
        if bias is not None:
            shift = shift + bias.to(compute)
        y = xc * scale.view(view) + shift.view(view)
        ctx.save_for_backward(x, weight, mean_c, invstd)
        ctx.total = total
        ctx.group = group
        ctx.has_bias = bias is not None
        return y.to(x.dtype).contiguous(memory_format=_layout(x))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        compute = mean.dtype
        dims = _reduce_dims(x)
        view = (1, c) + (1,) * (x.dim() - 2)
        dy = grad_out.to(compute)
        xmu = x.to(compute) - mean.view(view)
        if x.numel():
            sum_dy = dy.sum(dims)
            sum_dy_xmu = (dy * xmu).sum(dims)
        else:
            sum_dy = sum_dy_xmu = torch.zeros(c, dtype=compute, device=x.device)
        # weight and bias gradients: this rank's own contribution (DDP sums them)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.has_bias else None
        # every rank takes part, whatever its own needs: the others wait for it
        sums = torch.cat([sum_dy, sum_dy_xmu]).to(torch.float64)
        dist.all_reduce(sums, group=ctx.group)
        grad_x = None
        if ctx.needs_input_grad[0]:
            mean_dy = (sums[:c] / ctx.total).to(compute)
            mean_dy_xmu = (sums[c:] / ctx.total).to(compute)
            scale = invstd if weight is None else invstd * weight.to(compute)
            grad_x = (
                dy - mean_dy.view(view) - xmu * (invstd * invstd * mean_dy_xmu).view(view)
            ) * scale.view(view)
            grad_x = grad_x.to(x.dtype).contiguous(memory_format=_layout(x))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.SyncBatchNorm's constructor, state and behaviour; synchronization written with
    torch.distributed collectives, so that it runs on every backend (gloo on CPU included).

    Not a subclass of nn.SyncBatchNorm: DistributedDataParallel refuses nn.SyncBatchNorm layers
    in a CPU module ("SyncBatchNorm layers only work with GPU modules")."""

    # the autograd Function that synchronizes (a variant replaces only this)
    _function: type[torch.autograd.Function] = _SyncBatchNormFunction

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if self.momentum is None:
            factor = 0.0
        else:
            factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        group = self.process_group
        sync = (
            bn_training
            and self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )
        if not sync:
            return F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                factor,
                self.eps,
            )
        if self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        return self._function.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group
        )


sync = from_module_class(
    "sync",
    SyncBatchNorm,
    description="bnbench's synchronized BatchNorm on torch.distributed collectives "
    "(gloo on CPU, NCCL on CUDA)",
)


def _cpu_reason(config) -> str | None:
    if config.device == "cpu":
        return (
            "nn.SyncBatchNorm needs one GPU per rank: its training with a process group rejects "
            "CPU tensors"
        )
    return None


builtin_sync = from_module_class(
    "builtin-sync",
    nn.SyncBatchNorm,
    description="torch.nn.SyncBatchNorm (CUDA, NCCL: one GPU per rank)",
    extra_unsupported=_cpu_reason,
)
