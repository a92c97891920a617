"""Faithful BatchNorms in styles unlike PlainBatchNorm's: the gate must pass every one of them.

Each is one class for inputs of rank 2 to 5 (catalogue.implementation derives the rank-specific
classes). They share nn.BatchNorm's interface and control flow (StyleBase: constructor with the
keyword-only ``bias``, buffers, resets, legacy state_dicts, argument checks) and differ in the
arithmetic: a Python loop over channels, einsum, blocked statistics merged with Chan's parallel
formula, an autograd.Function with a hand-written backward (twice: differentiable, and
once_differentiable with the limitation declared), and a pure functional core.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

_HALF = (torch.float16, torch.bfloat16)
_RANK_TEXT = {(2, 3): "2D or 3D", (4,): "4D", (5,): "5D"}


def compute_dtype(x):
    return torch.float32 if x.dtype in _HALF else x.dtype


def channel_view(x):
    return (1, -1) + (1,) * (x.dim() - 2)


def reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def values_per_channel(x):
    return x.shape[0] * math.prod(x.shape[2:])


def check_arguments(x, batch_stats, eps, tensors):
    """nn.BatchNorm's checks, in its order, with its exception types and messages."""
    if batch_stats and values_per_channel(x) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )
    if batch_stats and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.numel() != x.shape[1]:
            raise RuntimeError(f"{name} should contain {x.shape[1]} elements not {tensor.numel()}")


def finish(y, x):
    """The input's dtype, and its memory format where it has one (channels_last)."""
    y = y.to(x.dtype)
    for fmt, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == rank and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return y.contiguous(memory_format=fmt)
    return y.contiguous() if x.is_contiguous() else y


@torch.no_grad()
def update_running_stats_(running_mean, running_var, mean, var, n, factor):
    """Exponential average with the unbiased batch variance, in place (the buffers' identity
    is part of the contract)."""
    running_mean.copy_((1 - factor) * running_mean + factor * mean.detach())
    running_var.copy_((1 - factor) * running_var + factor * var.detach() * (n / (n - 1)))


class StyleBase(nn.Module):
    """nn.BatchNorm's interface and control flow; subclasses implement ``_batch_norm``."""

    _version = 2
    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
        *,
        bias=True,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.register_parameter(
            "weight", nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        )
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(num_features, **factory)) if affine and bias else None
        )
        tracking = track_running_stats
        self.register_buffer(
            "running_mean", torch.zeros(num_features, **factory) if tracking else None
        )
        self.register_buffer(
            "running_var", torch.ones(num_features, **factory) if tracking else None
        )
        self.register_buffer(
            "num_batches_tracked",
            torch.tensor(0, dtype=torch.long, device=device) if tracking else None,
        )
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1)
            if self.bias is not None:
                self.bias.zero_()

    def _load_from_state_dict(self, state_dict, prefix, metadata, *args):
        # state_dicts saved before num_batches_tracked existed (version 1) keep the counter
        key = prefix + "num_batches_tracked"
        if metadata.get("version", 1) < 2 and self.track_running_stats and key not in state_dict:
            count = self.num_batches_tracked
            usable = count is not None and count.device.type != "meta"
            state_dict[key] = count if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, metadata, *args)

    def check_rank(self, x):
        if x.dim() not in self.expected_dims:
            text = _RANK_TEXT.get(self.expected_dims, "2D to 5D")
            raise ValueError(f"expected {text} input (got {x.dim()}D input)")

    def forward(self, x):
        self.check_rank(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        given = not self.training or self.track_running_stats
        rm = self.running_mean if given else None
        rv = self.running_var if given else None
        tensors = {"running_mean": rm, "running_var": rv, "weight": self.weight, "bias": self.bias}
        check_arguments(x, batch_stats, self.eps, tensors)
        return self._batch_norm(x, rm, rv, batch_stats, factor)

    def _batch_norm(self, x, running_mean, running_var, batch_stats, factor):
        raise NotImplementedError


class LoopBatchNorm(StyleBase):
    """One channel at a time in a Python loop; the outputs are stacked back along dim 1."""

    def _batch_norm(self, x, running_mean, running_var, batch_stats, factor):
        xc = x.to(compute_dtype(x))
        outputs, means, variances = [], [], []
        for c in range(xc.shape[1]):
            values = xc.select(1, c)
            if batch_stats:
                mean = values.mean()
                var = ((values - mean) ** 2).mean()
                means.append(mean)
                variances.append(var)
            else:
                mean, var = running_mean[c], running_var[c]
            out = (values - mean) / torch.sqrt(var + self.eps)
            if self.weight is not None:
                out = out * self.weight[c]
            if self.bias is not None:
                out = out + self.bias[c]
            outputs.append(out)
        n = values_per_channel(x)
        if batch_stats and running_mean is not None and n > 0:
            update_running_stats_(
                running_mean, running_var, torch.stack(means), torch.stack(variances), n, factor
            )
        return finish(torch.stack(outputs, 1) if outputs else xc.clone(), x)


class EinsumBatchNorm(StyleBase):
    """Channel sums and the affine transform as einsum contractions on an (N, C, S) view."""

    def _batch_norm(self, x, running_mean, running_var, batch_stats, factor):
        xc = x.to(compute_dtype(x))
        n = values_per_channel(x)
        x3 = xc.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
        if batch_stats and n == 0:  # finite statistics: the weight's gradient is 0, not NaN
            mean, var = x3.new_zeros(x.shape[1]), x3.new_ones(x.shape[1])
        elif batch_stats:
            mean = torch.einsum("ncs->c", x3) / n
            centered = x3 - mean[None, :, None]
            var = torch.einsum("ncs,ncs->c", centered, centered) / n
            if running_mean is not None:
                update_running_stats_(running_mean, running_var, mean, var, n, factor)
        else:
            mean, var = running_mean, running_var
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = torch.einsum("c,c->c", scale, self.weight)
        y = torch.einsum("ncs,c->ncs", x3 - mean[None, :, None], scale)
        if self.bias is not None:
            y = y + self.bias[None, :, None]
        return finish(y.reshape(x.shape), x)


def chan_statistics(rows, block=256):
    """(mean, biased variance) of each row of ``rows`` (C, M), M >= 1: blocks of ``block``
    values (the last one shorter), two-pass within a block, merged pairwise in a tree with
    Chan et al.'s parallel formula (an odd block out moves up a level)."""
    c, m = rows.shape
    full = m // block * block
    counts, means, m2s = [], [], []
    if full:
        blocks = rows[:, :full].reshape(c, full // block, block)
        mean = blocks.mean(2)
        means.append(mean)
        m2s.append(((blocks - mean[:, :, None]) ** 2).sum(2))
        counts.append(torch.full((full // block,), float(block), dtype=rows.dtype))
    if m > full:
        tail = rows[:, full:]
        mean = tail.mean(1, keepdim=True)
        means.append(mean)
        m2s.append(((tail - mean) ** 2).sum(1, keepdim=True))
        counts.append(torch.full((1,), float(m - full), dtype=rows.dtype))
    count = torch.cat(counts).to(rows.device)
    mean, m2 = torch.cat(means, 1), torch.cat(m2s, 1)
    while mean.shape[1] > 1:
        pairs = mean.shape[1] // 2 * 2
        na, nb = count[0:pairs:2], count[1:pairs:2]
        delta = mean[:, 1:pairs:2] - mean[:, 0:pairs:2]
        total = na + nb
        merged_mean = mean[:, 0:pairs:2] + delta * (nb / total)
        merged_m2 = m2[:, 0:pairs:2] + m2[:, 1:pairs:2] + delta**2 * (na * nb / total)
        mean = torch.cat([merged_mean, mean[:, pairs:]], 1)
        m2 = torch.cat([merged_m2, m2[:, pairs:]], 1)
        count = torch.cat([total, count[pairs:]])
    return mean[:, 0], m2[:, 0] / count[0]


class ChanBatchNorm(StyleBase):
    """Blocked statistics (blocks of 256 values and a shorter tail) merged with Chan's
    parallel formula, as a tiled reduction kernel does."""

    def _batch_norm(self, x, running_mean, running_var, batch_stats, factor):
        xc = x.to(compute_dtype(x))
        view, n = channel_view(x), values_per_channel(x)
        if batch_stats:
            if n == 0:
                mean = var = xc.new_zeros(x.shape[1])
            else:
                rows = xc.transpose(0, 1).reshape(x.shape[1], n)
                mean, var = chan_statistics(rows)
                if running_mean is not None:
                    update_running_stats_(running_mean, running_var, mean, var, n, factor)
        else:
            mean, var = running_mean, running_var
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        y = (xc - mean.view(view)) * scale.view(view)
        if self.bias is not None:
            y = y + self.bias.view(view)
        return finish(y, x)


class _BatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with a hand-written backward for x, weight and
    bias. With batch statistics the backward recomputes them from the saved input with
    differentiable ops, so the backward is itself differentiable (double backward). A
    hand-written jvp serves forward-mode AD."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, eps, batch_stats):
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)
        ctx.eps, ctx.batch_stats = eps, batch_stats
        view = channel_view(x)
        y = (x - mean.view(view)) * invstd.view(view)
        if weight is not None:
            y = y * weight.view(view)
        return y if bias is None else y + bias.view(view)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        view, dims, n = channel_view(x), reduce_dims(x), values_per_channel(x)
        if ctx.batch_stats:
            mean = x.mean(dims)
            invstd = torch.rsqrt(((x - mean.view(view)) ** 2).mean(dims) + ctx.eps)
        xhat = (x - mean.view(view)) * invstd.view(view)
        sum_grad, sum_grad_xhat = grad.sum(dims), (grad * xhat).sum(dims)
        scale = invstd if weight is None else invstd * weight
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.batch_stats:
                dx = scale.view(view) * (
                    grad - sum_grad.view(view) / n - xhat * (sum_grad_xhat.view(view) / n)
                )
            else:
                dx = grad * scale.view(view)
        if ctx.needs_input_grad[1]:
            dw = sum_grad_xhat
        if ctx.needs_input_grad[2]:
            db = sum_grad
        return dx, dw, db, None, None, None, None

    @staticmethod
    def jvp(ctx, tx, tweight, tbias, *_constants):
        x, weight, mean, invstd = ctx.saved_tensors
        view, dims = channel_view(x), reduce_dims(x)
        xhat = (x - mean.view(view)) * invstd.view(view)
        tangent = torch.zeros_like(x)
        if tx is not None:
            if ctx.batch_stats:  # the statistics move with x
                centered = tx - tx.mean(dims, keepdim=True)
                tx = centered - xhat * (xhat * tx).mean(dims, keepdim=True)
            scale = invstd if weight is None else invstd * weight
            tangent = tangent + tx * scale.view(view)
        if tweight is not None:
            tangent = tangent + xhat * tweight.view(view)
        if tbias is not None:
            tangent = tangent + tbias.view(view)
        return tangent


class _OnceDifferentiableBatchNormFunction(_BatchNormFunction):
    """The same backward, not differentiable itself (as a fused kernel's usually is)."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _BatchNormFunction.backward(ctx, grad)


class HandwrittenBackwardBatchNorm(StyleBase):
    """Statistics outside autograd; the normalization and affine transform through an
    autograd.Function with a hand-written backward."""

    function = _BatchNormFunction

    def _batch_norm(self, x, running_mean, running_var, batch_stats, factor):
        xc = x.to(compute_dtype(x))
        n = values_per_channel(x)
        with torch.no_grad():
            if batch_stats:
                # the function differentiates the statistics itself: no graph, no tangents
                values = xc.detach()
                var, mean = (
                    torch.var_mean(values, reduce_dims(x), correction=0)
                    if n
                    else (
                        values.new_ones(x.shape[1]),
                        values.new_zeros(x.shape[1]),
                    )
                )
                if running_mean is not None and n > 0:
                    update_running_stats_(running_mean, running_var, mean, var, n, factor)
            else:
                mean, var = running_mean, running_var
            invstd = torch.rsqrt(var + self.eps)
        y = self.function.apply(xc, self.weight, self.bias, mean, invstd, self.eps, batch_stats)
        return finish(y, x)


class OnceDifferentiableBatchNorm(HandwrittenBackwardBatchNorm):
    """A once-differentiable backward, declared: gradgradcheck is not supported."""

    function = _OnceDifferentiableBatchNormFunction
    declarations = {"supports_double_backward": False}


def batch_norm_core(
    x, weight, bias, running_mean, running_var, count, *, training, tracking, momentum, eps
):
    """nn.BatchNorm as a pure function: returns (y, running_mean, running_var, count), the new
    running state (None where it does not change); nothing given is modified."""
    if training and tracking and count is not None:
        count = count + 1
    factor = 0.0 if momentum is None else momentum
    if momentum is None and training and tracking and count is not None:
        factor = 1.0 / float(count)
    batch_stats = training or (running_mean is None and running_var is None)
    if training and not tracking:
        running_mean = running_var = None
    tensors = {"running_mean": running_mean, "running_var": running_var, "weight": weight}
    check_arguments(x, batch_stats, eps, tensors | {"bias": bias})
    xc = x.to(compute_dtype(x))
    view, dims, n = channel_view(x), reduce_dims(x), values_per_channel(x)
    new_mean = new_var = None
    if batch_stats:
        mean = xc.sum(dims) / n
        var = ((xc - mean.view(view)) ** 2).sum(dims) / n
        if running_mean is not None and n > 0:
            unbiased = var.detach() * (n / (n - 1))
            new_mean = (1 - factor) * running_mean + factor * mean.detach()
            new_var = (1 - factor) * running_var + factor * unbiased
    else:
        mean, var = running_mean, running_var
    y = (xc - mean.view(view)) * torch.rsqrt(var.view(view) + eps)
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return finish(y, x), new_mean, new_var, count


class FunctionalCoreBatchNorm(StyleBase):
    """A thin module around batch_norm_core: it copies the new running state into its buffers
    in place."""

    def forward(self, x):
        self.check_rank(x)
        y, mean, var, count = batch_norm_core(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            training=self.training,
            tracking=self.track_running_stats,
            momentum=self.momentum,
            eps=self.eps,
        )
        with torch.no_grad():
            for buffer, value in (
                (self.running_mean, mean),
                (self.running_var, var),
                (self.num_batches_tracked, count),
            ):
                if buffer is not None and value is not None and value is not buffer:
                    buffer.copy_(value)
        return y


STYLES = [
    LoopBatchNorm,
    EinsumBatchNorm,
    ChanBatchNorm,
    HandwrittenBackwardBatchNorm,
    OnceDifferentiableBatchNorm,
    FunctionalCoreBatchNorm,
]
