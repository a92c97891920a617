"""Implementations the gate must judge correctly: each BROKEN one departs from nn.BatchNorm in
exactly one way and must fail; each CORRECT one is written differently and must pass.

Every broken variant changes one method of PlainBatchNorm, a deliberately straightforward faithful
implementation, so the deviation under test is the only one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from faithful_styles import STYLES
from torch import nn

from bnbench.registry import from_classes

_HALF = (torch.float16, torch.bfloat16)
_RANK_TEXT = {(2, 3): "2D or 3D", (4,): "4D", (5,): "5D"}


class PlainBatchNorm(nn.Module):
    """A faithful BatchNorm written step by step; subclasses break one step each."""

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
        self.bias_term = bias
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.make_parameters(num_features, factory)
        self.make_buffers(num_features, factory)
        self.reset_parameters()

    def make_parameters(self, c, factory):
        if self.affine:
            self.weight = nn.Parameter(torch.empty(c, **factory))
            if self.bias_term:
                self.bias = nn.Parameter(torch.empty(c, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def make_buffers(self, c, factory):
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(c, **factory))
            self.register_buffer("running_var", torch.ones(c, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=factory["device"]),
            )
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    # nn.BatchNorm's state_dict version: those saved before num_batches_tracked existed are
    # version 1 (or carry no version), and loading one keeps the module's counter.
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, metadata, *args):
        key = prefix + "num_batches_tracked"
        if metadata.get("version", 1) < 2 and self.track_running_stats and key not in state_dict:
            count = self.num_batches_tracked
            usable = count is not None and count.device.type != "meta"
            state_dict[key] = count if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, metadata, *args)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # -- steps ------------------------------------------------------------------------------
    def check_input(self, x):
        if x.dim() not in self.expected_dims:
            text = _RANK_TEXT.get(self.expected_dims, "2D to 5D")
            raise ValueError(f"expected {text} input (got {x.dim()}D input)")

    def is_training(self):
        return self.training

    def tracking(self):
        return self.track_running_stats

    def momentum_factor(self, training):
        factor = 0.0 if self.momentum is None else self.momentum
        if training and self.tracking() and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return factor

    def uses_batch_stats(self, training):
        return training or (self.running_mean is None and self.running_var is None)

    def check_batch(self, x):
        n = x.shape[0]
        for s in x.shape[2:]:
            n *= s
        if n == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )
        if self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")

    def compute_dtype(self, x):
        return torch.float32 if x.dtype in _HALF else x.dtype

    def batch_stats(self, x, dims):
        mean = x.mean(dims)
        var = ((x - mean.view(self.view)) ** 2).mean(dims)
        return mean, var

    def update(self, mean, var, n, factor):
        with torch.no_grad():
            self.running_mean.copy_((1 - factor) * self.running_mean + factor * mean)
            self.running_var.copy_((1 - factor) * self.running_var + factor * var * n / (n - 1))

    def normalize(self, x, mean, var):
        return (x - mean.view(self.view)) / torch.sqrt(var.view(self.view) + self.eps)

    def scale_shift(self, y):
        if self.weight is not None:
            y = y * self.weight.view(self.view)
        return y if self.bias is None else y + self.bias.view(self.view)

    def finish(self, y, x):
        return y.to(x.dtype)

    def forward(self, x):
        self.check_input(x)
        training = self.is_training()
        factor = self.momentum_factor(training)
        use_batch = self.uses_batch_stats(training)
        if use_batch:
            self.check_batch(x)
        self.view = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        xf = x.to(self.compute_dtype(x))
        n = xf.numel() // xf.shape[1]
        if use_batch:
            mean, var = self.batch_stats(xf, dims)
            if training and self.tracking() and self.running_mean is not None and n > 0:
                self.update(mean.detach(), var.detach(), n, factor)
        else:
            mean, var = self.running_mean, self.running_var
        return self.finish(self.scale_shift(self.normalize(xf, mean, var)), x)


# ---- broken: one deviation each, grouped by what they break ------------------------------------
# Each states the case that must catch it and a regex its failure message must match.


@dataclass(frozen=True)
class Expect:
    case: str  # the case id that must fail
    message: str  # a regex the failure message must match (re.search)


BROKEN: dict[type, Expect] = {}


def catches(case: str, message: str):
    """Declare what must catch the decorated broken implementation, and what it must say."""

    def register(cls):
        cls.expect = BROKEN[cls] = Expect(case, message)
        return cls

    return register


# -- Running statistics: the update rule, the counter, what the buffers hold


@catches("default-rank4", r"step 0 \(train\): running_var: .* elements outside")
class BiasedRunningVar(PlainBatchNorm):
    def update(self, mean, var, n, factor):
        super().update(mean, var * (n - 1) / n, n, factor)


@catches("momentum_none-rank2", r"step 0 \(train\): running_mean: .* elements outside")
class MomentumNoneIgnored(PlainBatchNorm):
    def momentum_factor(self, training):
        factor = super().momentum_factor(training)
        return 0.1 if self.momentum is None and factor else factor


@catches("momentum_none-rank3", r"step 0 \(train\): running_mean: .* elements outside")
class MomentumNoneOffByOne(PlainBatchNorm):
    def momentum_factor(self, training):
        if training and self.tracking() and self.num_batches_tracked is not None:
            factor = (
                1.0 / (float(self.num_batches_tracked) + 2)
                if self.momentum is None
                else self.momentum
            )
            self.num_batches_tracked.add_(1)
            return factor
        return 0.0


@catches("default-rank2", r"step 0 \(train\): running_mean: .* elements outside")
class MomentumInverted(PlainBatchNorm):
    def update(self, mean, var, n, factor):
        super().update(mean, var, n, 1 - factor)


@catches("momentum_0-rank4", r"step 0 \(train\): running_mean: .* elements outside")
class MomentumZeroAsNone(PlainBatchNorm):
    def momentum_factor(self, training):
        if training and self.tracking() and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            return self.momentum if self.momentum else 1.0 / float(self.num_batches_tracked)
        return 0.0


@catches("default-rank4", r"num_batches_tracked: 0, expected 1")
class NoBatchCounter(PlainBatchNorm):
    def momentum_factor(self, training):
        if training and self.tracking() and self.momentum is not None:
            return self.momentum
        return super().momentum_factor(training)


@catches("default-rank4", r"step 3 \(eval\): num_batches_tracked: 4, expected 3")
class CountsInEval(PlainBatchNorm):
    def momentum_factor(self, training):
        if not training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return super().momentum_factor(training)


@catches("default-rank4", r"running_mean: requires grad / carries autograd history")
class RunningStatsKeepGraph(PlainBatchNorm):
    def update(self, mean, var, n, factor):
        self.running_mean = (1 - factor) * self.running_mean + factor * self._mean_with_graph
        self.running_var = (1 - factor) * self.running_var + factor * var * n / (n - 1)

    def batch_stats(self, x, dims):
        mean, var = super().batch_stats(x, dims)
        self._mean_with_graph = mean
        return mean, var


@catches("zero_batch-rank4", r"running_mean: 5 non-finite mismatch")
class ZeroBatchCorruptsStats(PlainBatchNorm):
    def forward(self, x):
        if x.numel() == 0 and self.training and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.fill_(float("nan"))
        return super().forward(x)


@catches("float16-rank4", r"running_mean: dtype torch.float16, expected torch.float32")
class StatsInInputDtype(PlainBatchNorm):
    def update(self, mean, var, n, factor):
        half = self._input_dtype
        self.running_mean.data = self.running_mean.to(half)
        self.running_var.data = self.running_var.to(half)
        super().update(mean.to(half), var.to(half), n, factor)

    def forward(self, x):
        self._input_dtype = x.dtype
        return super().forward(x)


@catches("default-rank4", r"running_mean: replaced by a new tensor")
class RebindsRunningStats(PlainBatchNorm):
    def update(self, mean, var, n, factor):
        # new tensors each step: references and earlier state_dict()s go stale
        self.running_mean = (1 - factor) * self.running_mean + factor * mean
        self.running_var = (1 - factor) * self.running_var + factor * var * n / (n - 1)


@catches("eval_first-rank4", r"step 0 \(eval\): output: does not require grad")
class EvalOutputDetached(PlainBatchNorm):
    def forward(self, x):
        if self.training:
            return super().forward(x)
        with torch.no_grad():  # "eval needs no graph": but the input and weights require grad
            return super().forward(x)


# -- Normalization: eps, the variance used, what the statistics are taken over


@catches("default-rank4", r"step 0 \(train\): output: .* elements outside")
class EpsOutsideSqrt(PlainBatchNorm):
    def normalize(self, x, mean, var):
        return (x - mean.view(self.view)) / (torch.sqrt(var.view(self.view)) + self.eps)


@catches("eps-rank4", r"step 0 \(train\): output: .* elements outside")
class EpsIgnored(PlainBatchNorm):
    def normalize(self, x, mean, var):
        return (x - mean.view(self.view)) / torch.sqrt(var.view(self.view) + 1e-5)


@catches("default-rank2", r"step 0 \(train\): output: .* elements outside")
class UnbiasedNormalization(PlainBatchNorm):
    def batch_stats(self, x, dims):
        n = x.numel() // x.shape[1]
        mean, var = super().batch_stats(x, dims)
        return mean, var * n / max(n - 1, 1)


@catches("default-rank4", r"forward raised RuntimeError")
class NormalizesPerSample(PlainBatchNorm):
    def batch_stats(self, x, dims):
        return super().batch_stats(x, [0])


@catches("constant_channel-rank4", r"output: \d+ non-finite mismatch")
class ConstantChannelNaN(PlainBatchNorm):
    def normalize(self, x, mean, var):
        return (
            (x - mean.view(self.view))
            * torch.rsqrt(var.view(self.view))
            / torch.sqrt(1 + self.eps / var.view(self.view))
        )


@catches("default-rank4", r"step 0 \(train\): output: .* elements outside")
class WeightBiasSwapped(PlainBatchNorm):
    def scale_shift(self, y):
        if self.weight is None:
            return y
        return (y + self.bias.view(self.view)) * self.weight.view(self.view)


# -- Mode: training, eval, and tracking switched off


@catches("eval_first-rank4", r"step 0 \(eval\): output: .* elements outside")
class EvalUsesBatchStats(PlainBatchNorm):
    def uses_batch_stats(self, training):
        return True


@catches("mode_from_training_flag-rank4", r"step 0 \(train_nograd\): output:")
class ModeFromGradMode(PlainBatchNorm):
    def is_training(self):
        return torch.is_grad_enabled()


@catches("stop_tracking-rank4", r"step 2 \(train\): running_mean:")
class TrackingFixedAtConstruction(PlainBatchNorm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tracking = self.track_running_stats

    def tracking(self):
        return self._tracking


# -- Autograd: gradients through the statistics, to the parameters, and twice


@catches("default-rank4", r"step 0 \(train\): input grad: .* elements outside")
class GradNotThroughMean(PlainBatchNorm):
    def batch_stats(self, x, dims):
        mean, var = super().batch_stats(x, dims)
        return mean.detach(), var


@catches("default-rank4", r"step 0 \(train\): input grad: .* elements outside")
class GradNotThroughVar(PlainBatchNorm):
    def batch_stats(self, x, dims):
        mean, var = super().batch_stats(x, dims)
        return mean, var.detach()


@catches("default-rank4", r"weight grad: is None")
class WeightNotTrained(PlainBatchNorm):
    def scale_shift(self, y):
        if self.weight is None:
            return y
        return y * self.weight.detach().view(self.view) + self.bias.view(self.view)


@catches("gradgradcheck_train-rank4", r"gradgradcheck: GradcheckError")
class NoDoubleBackward(PlainBatchNorm):
    def normalize(self, x, mean, var):
        return _OnceDifferentiableIdentity.apply(super().normalize(x, mean, var))


class _OnceDifferentiableIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad


# -- Parameters, buffers and state_dict


@catches("defaults_not_affine-rank4", r"weight: expected None with affine=False")
class NotAffineStillHasParameters(PlainBatchNorm):
    def make_parameters(self, c, factory):
        self.weight = nn.Parameter(torch.ones(c, **factory), requires_grad=self.affine)
        self.bias = nn.Parameter(torch.zeros(c, **factory), requires_grad=self.affine)

    def reset_parameters(self):
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


@catches("defaults-rank4", r"num_batches_tracked: tensor\(0\.\), expected tensor\(0\) int64")
class CounterIsFloat(PlainBatchNorm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked = torch.tensor(0.0, device=self.running_mean.device)


@catches("reset-rank4", r"after reset_running_stats\(\): num_batches_tracked: tensor\(3\)")
class ResetForgetsCounter(PlainBatchNorm):
    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)


@catches("state_dict-rank4", r"running_var: not carried over from nn.BatchNorm's state_dict")
class RenamedStateDictKeys(PlainBatchNorm):
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "running_var" in destination:
            destination[prefix + "running_variance"] = destination.pop(prefix + "running_var")


# -- Dtypes, memory formats and the input tensor


@catches("channels_last-rank4", r"output: not in the input's memory format torch.channels_last")
class ChannelsLastLost(PlainBatchNorm):
    def finish(self, y, x):
        return super().finish(y, x).contiguous()


@catches("float16-rank4", r"output: dtype torch.float32, expected the input's torch.float16")
class OutputInComputeDtype(PlainBatchNorm):
    def finish(self, y, x):
        return y


@catches("float16-rank4", r"step 0 \(train\): output: .* elements outside rtol=0.004")
class HalfInputUnsupported(PlainBatchNorm):
    def compute_dtype(self, x):
        return x.dtype  # float16 input times float32 weight: float32 output, float16 stats


@catches("non_contiguous-rank4", r"step 0 \(train\): output: .* elements outside")
class AssumesContiguous(PlainBatchNorm):
    def forward(self, x):
        if (
            not x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous(memory_format=torch.channels_last_3d)
        ):
            x = torch.as_strided(x, x.shape, torch.empty(x.shape).stride())
        return super().forward(x)


@catches("default-rank4", r"input: modified in place by the implementation")
class ModifiesInput(PlainBatchNorm):
    def finish(self, y, x):
        with torch.no_grad():
            x.mul_(1.0)  # looks harmless, but writes into the caller's tensor
            x.add_(0.5)
        y = super().finish(y, x)
        with torch.no_grad():
            x.sub_(0.25)
        return y


# -- Errors nn.BatchNorm raises


@catches(
    "one_value_per_channel-rank2",
    r"returned an output, expected ValueError\('Expected more than 1 value",
)
class NoBatchSizeError(PlainBatchNorm):
    def check_batch(self, x):
        if self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")


@catches(
    "one_value_per_channel-rank4",
    r"raised RuntimeError\('Expected more than 1 value per channel.*expected ValueError\(",
)
class WrongErrorMessage(PlainBatchNorm):
    def check_batch(self, x):
        try:
            super().check_batch(x)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None


@catches(
    "eps_zero-rank4", r"returned an output, expected ValueError\('batch_norm eps must be positive"
)
class NoEpsCheck(PlainBatchNorm):
    def check_batch(self, x):
        if self.eps > 0:
            super().check_batch(x)


# -- The constructor's defaults


@catches("default_constructor-rank4", r"step 0 \(train\): running_mean: .* elements outside")
class WrongDefaultMomentum(PlainBatchNorm):
    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.01,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
        *,
        bias=True,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )


@catches("default_constructor-rank2", r"step 0 \(train\): output: .* elements outside")
class WrongDefaultEps(PlainBatchNorm):
    def __init__(
        self,
        num_features,
        eps=1e-3,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
        *,
        bias=True,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )


# ---- broken, round two: sizes, numerics, lifecycle, object and autograd contract, bias=False --
# Bugs real kernels and modules have had, adapted from an independent catalogue of single-bug
# variants; each is caught by the case of the gate written for its area.


def _rows(x):
    """(N, C, *) -> (C, values): each channel's values in a row, in (n, spatial) order."""
    return x.transpose(0, 1).reshape(x.shape[1], x.numel() // max(x.shape[1], 1))


# -- Sizes and tiling: reductions in blocks, vectorized channel groups, micro-batches


@catches("size_1025_c11-rank4", r"step 0 \(train\): output: .* elements outside")
class BlockedStatsDropTail(PlainBatchNorm):
    """Statistics reduced in blocks of 256 values per channel: above one block the partial
    last block is dropped (a loop over n // 256 blocks)."""

    def batch_stats(self, x, dims):
        rows = _rows(x)
        if rows.shape[1] <= 256:
            return super().batch_stats(x, dims)
        var, mean = torch.var_mean(rows[:, : rows.shape[1] // 256 * 256], 1, correction=0)
        return mean, var


@catches("size_17_c9-rank3", r"step 0 \(train\): running_mean: 1/9 elements outside")
class RunningStatsChannelTailSkipped(PlainBatchNorm):
    """The running-statistics update is vectorized over groups of 8 channels: with more than
    8 channels the last C % 8 are never updated."""

    def update(self, mean, var, n, factor):
        c = mean.shape[0]
        end = c // 8 * 8 if c > 8 else c
        with torch.no_grad():
            for buffer, value in ((self.running_mean, mean), (self.running_var, var * n / (n - 1))):
                buffer[:end].copy_((1 - factor) * buffer[:end] + factor * value[:end])


@catches("batch_65_c3-rank4", r"step 0 \(train\): output: .* elements outside")
class LargeBatchChunkAverage(PlainBatchNorm):
    """Batches above 64 are reduced in micro-batches of 64 whose means and variances are then
    averaged: unweighted, and without the spread between the chunks' means."""

    def batch_stats(self, x, dims):
        if x.shape[0] <= 64:
            return super().batch_stats(x, dims)
        parts = [PlainBatchNorm.batch_stats(self, chunk, dims) for chunk in x.split(64)]
        return tuple(torch.stack(values).mean(0) for values in zip(*parts))


@catches("size_1025_c11-rank4", r"step 0 \(train\): bias grad: .* elements outside")
class BiasGradDropsTail(PlainBatchNorm):
    """The hand-written bias gradient sums grad_output in blocks of 512 values per channel and
    drops the partial last block (forward and the other gradients are right)."""

    def scale_shift(self, y):
        if self.weight is not None:
            y = y * self.weight.view(self.view)
        return y if self.bias is None else _BiasAddBlockedGrad.apply(y, self.bias)


class _BiasAddBlockedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bias):
        return y + bias.view((1, -1) + (1,) * (y.dim() - 2))

    @staticmethod
    def backward(ctx, grad):
        rows = _rows(grad)
        return grad, rows[:, : rows.shape[1] // 512 * 512 or rows.shape[1]].sum(1)


@catches("size_7_c1-rank2", r"step 0 \(train\): output: .* elements outside")
class SingleChannelUnbiasedVariance(PlainBatchNorm):
    """A single-channel fast path normalizes with torch.var's default, unbiased, variance."""

    def batch_stats(self, x, dims):
        if x.shape[1] != 1:
            return super().batch_stats(x, dims)
        return x.mean().reshape(1), torch.var(x).reshape(1)


# -- Numerics: variance formulas, eps against tiny variances, half-precision accumulation


@catches("large_offset-rank2", r"step 0 \(train\): output: .* elements outside")
class OnePassVariance(PlainBatchNorm):
    """var = E[x^2] - E[x]^2 in one pass: catastrophic cancellation when |mean| >> std."""

    def batch_stats(self, x, dims):
        mean = x.mean(dims)
        return mean, ((x * x).mean(dims) - mean * mean).clamp_min(0)


@catches("variance_at_eps-rank2", r"step 0 \(train\): output: .* elements outside")
class VarianceFlooredAtEps(PlainBatchNorm):
    """Normalizes by sqrt(max(var, eps)) instead of sqrt(var + eps)."""

    def normalize(self, x, mean, var):
        return (x - mean.view(self.view)) / torch.sqrt(var.clamp_min(self.eps).view(self.view))


@catches("variance_below_eps-rank4", r"step 0 \(train\): output: .* elements outside")
class EpsOutsideSqrtForTinyVariance(PlainBatchNorm):
    """A "safe" branch for variances below 1e-4 divides by sqrt(var) + eps."""

    def normalize(self, x, mean, var):
        std = torch.where(var < 1e-4, var.sqrt() + self.eps, (var + self.eps).sqrt())
        return (x - mean.view(self.view)) / std.view(self.view)


@catches("float16_many-rank4", r"step 0 \(train\): output: .* elements outside rtol=0.004")
class HalfPrecisionAccumulator(PlainBatchNorm):
    """For float16/bfloat16 input the per-channel totals (of 256-value blocks) are accumulated
    in the input's dtype."""

    def batch_stats(self, x, dims):
        if self.input_dtype not in _HALF:
            return super().batch_stats(x, dims)

        def total(rows):
            acc = rows.new_zeros(rows.shape[0])
            for block in rows.split(256, 1):
                acc = (acc + block.sum(1)).to(self.input_dtype).to(rows.dtype)
            return acc

        rows = _rows(x)
        mean = total(rows) / rows.shape[1]
        return mean, total((rows - mean[:, None]) ** 2) / rows.shape[1]

    def forward(self, x):
        self.input_dtype = x.dtype
        return super().forward(x)


# -- Lifecycle: attributes assigned between calls, caches, the running average, shared state


@catches("eps_assigned-rank4", r"step 2 \(train\): output: .* elements outside")
class EpsCachedAtConstruction(PlainBatchNorm):
    """eps is bound when the module is built (a partial kernel): `module.eps = ...` is
    ignored."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.built_eps = self.eps

    def normalize(self, x, mean, var):
        return (x - mean.view(self.view)) / torch.sqrt(var.view(self.view) + self.built_eps)


@catches("momentum_assigned-rank3", r"step 2 \(train\): running_mean: .* elements outside")
class MomentumCachedAtConstruction(PlainBatchNorm):
    """momentum is copied when the module is built: `module.momentum = ...` is ignored."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.built_momentum = self.momentum

    def momentum_factor(self, training):
        if training and self.tracking() and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.built_momentum is None:
                return 1.0 / float(self.num_batches_tracked)
            return self.built_momentum
        return 0.0


@catches(
    "momentum_none_varying_batch-rank2", r"step 1 \(train\): running_mean: .* elements outside"
)
class CumulativeAveragePerSample(PlainBatchNorm):
    """momentum=None averages over samples (a batch weighs its number of values) instead of
    over batches (1 / num_batches_tracked)."""

    def update(self, mean, var, n, factor):
        if self.momentum is None:
            self.values_seen = getattr(self, "values_seen", 0) + n
            factor = n / self.values_seen
        super().update(mean, var, n, factor)


@catches("load_between_calls-rank4", r"step 2 \(eval\): output: .* elements outside")
class StaleEvalStatsCache(PlainBatchNorm):
    """Eval caches the running statistics on first use and drops them only on .train():
    load_state_dict, reset_running_stats or in-place edits made in eval go unseen."""

    cached = None

    def train(self, mode=True):
        if mode:
            self.cached = None
        return super().train(mode)

    def normalize(self, x, mean, var):
        if mean is not None and mean is self.running_mean:  # eval, running statistics
            if self.cached is None:
                self.cached = (mean.clone(), var.clone())
            mean, var = self.cached
        return super().normalize(x, mean, var)


@catches("training_assigned-rank4", r"step 1 \(eval_attr\): output: .* elements outside")
class ModeFromTrainCalls(PlainBatchNorm):
    """The mode is recorded by train()/eval(): `module.training = False` goes unseen."""

    mode = True

    def train(self, mode=True):
        self.mode = mode
        return super().train(mode)

    def is_training(self):
        return self.mode


@catches("buffers_set_to_none-rank4", r"step 3 \(eval\): forward raised")
class NoneBuffersNotBatchStats(PlainBatchNorm):
    """Eval takes batch statistics only when track_running_stats is False, not when the
    buffers are None (test-time adaptation sets them to None)."""

    def uses_batch_stats(self, training):
        return training or not self.track_running_stats


@catches("counter_set_to_none-rank4", r"step 1 \(train\): running_mean")
class NoCounterNoUpdate(PlainBatchNorm):
    """The momentum is applied only while num_batches_tracked exists: a tracking module whose
    counter was set to None stops updating its running statistics (nn.BatchNorm still moves
    them by the momentum)."""

    def momentum_factor(self, training):
        if self.num_batches_tracked is None:
            return 0.0
        return super().momentum_factor(training)


@catches("legacy_state_dict-rank4", r"load_state_dict\(legacy state_dict\): RuntimeError")
class LegacyStateDictRejected(PlainBatchNorm):
    """No state_dict versioning: one saved before num_batches_tracked existed fails to load."""

    def _load_from_state_dict(self, *args):
        nn.Module._load_from_state_dict(self, *args)


@catches("two_instances-rank4", r"running_mean: changed in a second instance")
class SharedBuffers(PlainBatchNorm):
    """Fresh running statistics come from a cache keyed by (size, dtype, device), so modules
    built alike share their buffers."""

    shared: dict = {}

    def make_buffers(self, c, factory):
        super().make_buffers(c, factory)
        if self.track_running_stats:
            key = (c, self.running_mean.dtype, self.running_mean.device)
            names = ("running_mean", "running_var", "num_batches_tracked")
            tensors = self.shared.setdefault(key, tuple(getattr(self, n) for n in names))
            for name, tensor in zip(names, tensors):
                setattr(self, name, tensor)


@catches("inference_cache-rank4", r"step 2 \(eval_nograd\): output: .* elements outside")
class FoldedInferenceCache(PlainBatchNorm):
    """Inference (eval without autograd) folds the statistics, weight and bias into a cached
    scale and shift, dropped only on .train(): in-place weight updates, loads, a new eps or a
    reset made in eval go unseen."""

    folded = None

    def train(self, mode=True):
        if mode:
            self.folded = None
        return super().train(mode)

    def forward(self, x):
        if self.training or torch.is_grad_enabled() or self.running_mean is None:
            return super().forward(x)
        self.check_input(x)
        if self.folded is None:
            scale = torch.rsqrt(self.running_var + self.eps)
            scale = scale if self.weight is None else scale * self.weight
            shift = -self.running_mean * scale
            self.folded = (scale, shift if self.bias is None else shift + self.bias)
        view = (1, -1) + (1,) * (x.dim() - 2)
        scale, shift = self.folded
        return (x.to(self.compute_dtype(x)) * scale.view(view) + shift.view(view)).to(x.dtype)


# -- Object contract: aliasing, buffer identity, dtypes and devices, copies


@catches(
    "mode_from_training_flag-rank4",
    r"step 3 \(eval_nograd\): output: shares memory with the input",
)
class InPlaceEvalWithoutGrad(PlainBatchNorm):
    """Without autograd, eval writes its result into the input to save an allocation."""

    def finish(self, y, x):
        y = super().finish(y, x)
        return x.copy_(y) if not self.training and not torch.is_grad_enabled() else y


@catches("default-rank4", r"state_dict\(\)\['running_mean'\]: an earlier state_dict\(\) no longer")
class BufferDataReassigned(PlainBatchNorm):
    """`buffer.data = new`: the same Python object, but new memory, so an earlier
    state_dict() (and anything else viewing the buffer's memory) goes stale."""

    def update(self, mean, var, n, factor):
        self.running_mean.data = (1 - factor) * self.running_mean + factor * mean
        self.running_var.data = (1 - factor) * self.running_var + factor * var * n / (n - 1)


@catches("module_dtype-rank4", r"dtype=torch.float16: running_mean is torch.float32 on cpu")
class BuffersAlwaysFloat32(PlainBatchNorm):
    """The running statistics are float32 whatever dtype= asks for."""

    def make_buffers(self, c, factory):
        super().make_buffers(c, dict(factory, dtype=torch.float32))


@catches("module_dtype-rank4", r"device='meta': weight is torch.float32 on cpu")
class ParametersIgnoreDevice(PlainBatchNorm):
    """weight and bias are built without device=."""

    def make_parameters(self, c, factory):
        super().make_parameters(c, dict(factory, device=None))


@catches("copy_and_save-rank4", r"pickle: raised")
class HoldsLambda(PlainBatchNorm):
    """Keeps a lambda as an attribute (a cast helper built on first use): deepcopy works,
    pickle and torch.save do not."""

    def finish(self, y, x):
        if not hasattr(self, "cast"):
            self.cast = lambda y, x: y.to(x.dtype)
        return self.cast(y, x)


@catches("copy_and_save-rank4", r"deepcopy: the copy's state_dict differs from the original's")
class DeepcopyRebuilds(PlainBatchNorm):
    """__deepcopy__ rebuilds the module from its hyper-parameters and copies the parameters
    only: the copy's running statistics are fresh."""

    def __deepcopy__(self, memo):
        new = type(self)(
            self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats
        )
        with torch.no_grad():
            for name, param in self.named_parameters():
                getattr(new, name).copy_(param)
        return new.train(self.training)


@catches("eval_fresh_module-rank4", r"step 0 \(eval_nograd\): output: shares memory with the input")
class EvalIdentityShortcut(PlainBatchNorm):
    """Eval returns the input itself when the layer is an identity up to eps (default
    statistics, weight 1, bias 0) and no parameter needs a gradient."""

    def forward(self, x):
        params = [p for p in (self.weight, self.bias) if p is not None]
        if self.training or self.running_mean is None or self.eps >= 1e-4:
            return super().forward(x)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return super().forward(x)
        with torch.no_grad():
            neutral = [(self.running_mean, 0), (self.running_var, 1), (self.weight, 1)]
            identity = all(t is None or bool((t == v).all()) for t, v in neutral)
            identity = identity and (self.bias is None or not bool(self.bias.any()))
        return x if identity else super().forward(x)


# -- Autograd contract: which gradients flow, and grad_output's layout


@catches("grad_params_only-rank4", r"step 0 \(train\): output: does not require grad")
class NoGraphWithoutInputGrad(PlainBatchNorm):
    """An input that does not require grad is taken as inference: no graph, so the weight
    and bias get no gradient."""

    def forward(self, x):
        if x.requires_grad:
            return super().forward(x)
        with torch.no_grad():
            return super().forward(x)


@catches("frozen_affine-rank4", r"step 0 \(train\): output: does not require grad")
class FrozenAffineDetachesOutput(PlainBatchNorm):
    """A layer whose weight is frozen is treated as frozen as a whole: its output is
    detached, so no gradient reaches the input."""

    def scale_shift(self, y):
        y = super().scale_shift(y)
        return y if self.weight is None or self.weight.requires_grad else y.detach()


@catches("grad_output_permuted-rank4", r"step 0 \(train\): backward raised RuntimeError: view")
class GradOutputViewed(PlainBatchNorm):
    """The backward flattens grad_output with .view, assuming it is contiguous."""

    def finish(self, y, x):
        return _ViewsGrad.apply(super().finish(y, x))


class _ViewsGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        flat = grad.view(grad.shape[0], grad.shape[1], math.prod(grad.shape[2:]))
        return flat.view(grad.shape)


@catches("grad_output_channels_last-rank4", r"step 0 \(train\): input grad: .* elements outside")
class ChannelsLastGradReadAsContiguous(PlainBatchNorm):
    """The backward makes grad_output contiguous unless it is already dense, then reads its
    memory in NCHW order: a channels_last grad_output is read scrambled."""

    def finish(self, y, x):
        return _ReadsGradAsNCHW.apply(super().finish(y, x))


class _ReadsGradAsNCHW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        if grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last):
            return grad.as_strided(grad.shape, torch.empty(grad.shape, device="meta").stride())
        return grad.contiguous()


@catches("bias_false-rank4", r"step 0 \(train\): weight grad: is None")
class WeightGradNeedsBias(PlainBatchNorm):
    """The weight joins the graph only inside `if bias is not None` (mis-nested): with
    bias=False the weight gets no gradient."""

    def scale_shift(self, y):
        if self.weight is not None and self.bias is None:
            return y * self.weight.detach().view(self.view)
        return super().scale_shift(y)


@catches("forward_ad-rank4", r"train: forward AD raised NotImplementedError")
class NoForwardAD(PlainBatchNorm):
    """The output goes through a custom autograd.Function (a fused kernel's wrapper) with a
    backward and no jvp: forward-mode AD (torch.func.jvp) raises."""

    def finish(self, y, x):
        return _BackwardOnly.apply(super().finish(y, x))


class _BackwardOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


# -- The constructor's bias=False (torch 2.13: a weight and no bias)


@catches("defaults_bias_false-rank4", r"bias: expected None \(and no bias parameter\)")
class BiasArgumentIgnored(PlainBatchNorm):
    """bias=False is accepted and ignored: a trainable bias is created anyway."""

    def make_parameters(self, c, factory):
        self.bias_term = True
        super().make_parameters(c, factory)


@catches(
    "state_dict_bias_false-rank4",
    r"load_state_dict\(nn.BatchNorm's state_dict\) raised RuntimeError",
)
class BiasFalseRegistersZeroBuffer(PlainBatchNorm):
    """bias=False registers a zero buffer named bias: a 'bias' key in the state_dict."""

    def make_parameters(self, c, factory):
        super().make_parameters(c, factory)
        if self.affine and not self.bias_term:
            del self._parameters["bias"]
            self.register_buffer("bias", torch.zeros(c, **factory))


@catches("defaults_bias_false-rank4", r"weight: expected a registered nn.Parameter, got NoneType")
class BiasFalseDropsWeight(PlainBatchNorm):
    """bias=False is taken as affine=False: no weight either."""

    def make_parameters(self, c, factory):
        if self.bias_term:
            super().make_parameters(c, factory)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)


@catches("bias_false-rank4", r"raised TypeError: .*unexpected keyword argument 'bias'")
class NoBiasArgument(PlainBatchNorm):
    """The constructor predates the keyword-only bias argument."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)


@catches("module_dtype-rank4", r"dtype=torch.float16: bias is torch.float32 on cpu")
class BiasIgnoresDtype(PlainBatchNorm):
    """The bias is built without the dtype= factory argument."""

    def make_parameters(self, c, factory):
        super().make_parameters(c, factory)
        if self.bias is not None:
            self.bias = nn.Parameter(torch.zeros(c, device=factory["device"]))


@catches("positional_constructor-rank4", r"track_running_stats is True, nn.BatchNorm's is False")
class BiasBeforeTrackRunningStats(PlainBatchNorm):
    """bias is a positional parameter placed before track_running_stats: a positional call
    (C, eps, momentum, affine, False) turns the bias off and keeps the running statistics."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        bias=True,
        track_running_stats=True,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )


# ---- correct, written differently -------------------------------------------------------------


class FunctionalBatchNorm(PlainBatchNorm):
    """Delegates the arithmetic to F.batch_norm."""

    def forward(self, x):
        self.check_input(x)
        factor = self.momentum_factor(self.training)
        use_batch = self.uses_batch_stats(self.training)
        update = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )


class _BatchNormFunction(torch.autograd.Function):
    """Hand-written backward, itself differentiable (recomputed from saved inputs), and a
    hand-written jvp for forward-mode AD."""

    @staticmethod
    def forward(ctx, x, eps, dims):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.eps, ctx.dims = eps, dims
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dims = ctx.dims
        n = x.numel() // x.shape[1]
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        invstd = torch.rsqrt(var + ctx.eps)
        xhat = (x - mean) * invstd
        dx = (
            invstd
            / n
            * (
                n * grad
                - grad.sum(dims, keepdim=True)
                - xhat * (grad * xhat).sum(dims, keepdim=True)
            )
        )
        return dx, None, None

    @staticmethod
    def jvp(ctx, tx, _eps, _dims):
        (x,) = ctx.saved_tensors
        mean = x.mean(ctx.dims, keepdim=True)
        invstd = torch.rsqrt(((x - mean) ** 2).mean(ctx.dims, keepdim=True) + ctx.eps)
        xhat = (x - mean) * invstd
        return invstd * (
            tx - tx.mean(ctx.dims, keepdim=True) - xhat * (xhat * tx).mean(ctx.dims, keepdim=True)
        )


class AutogradFunctionBatchNorm(PlainBatchNorm):
    def normalize(self, x, mean, var):
        if self.uses_batch_stats(self.training) and x.numel() > 0:
            dims = tuple([0] + list(range(2, x.dim())))
            return _BatchNormFunction.apply(x, self.eps, dims)
        return super().normalize(x, mean, var)


class Float64Accumulation(PlainBatchNorm):
    def compute_dtype(self, x):
        return torch.float64

    def update(self, mean, var, n, factor):
        super().update(mean.to(self.running_mean.dtype), var.to(self.running_var.dtype), n, factor)

    def scale_shift(self, y):
        if self.weight is not None:
            y = y * self.weight.double().view(self.view)
        return y if self.bias is None else y + self.bias.double().view(self.view)


class VarMeanBatchNorm(PlainBatchNorm):
    def batch_stats(self, x, dims):
        var, mean = torch.var_mean(x, dims, correction=0)
        return mean, var


def _rank_classes(cls):
    classes = {}
    for dims, ranks in (((2, 3), (2, 3)), ((4,), (4,)), ((5,), (5,))):
        name = cls.__name__ + "_" + "".join(map(str, dims))
        sub = globals().get(name) or type(
            name, (cls,), {"expected_dims": dims, "__module__": __name__}
        )
        globals()[name] = sub  # importable by name, so modules pickle like real classes
        for r in ranks:
            classes[r] = sub
    return classes


def implementation(cls, **declarations):
    """The rank-specific implementation of ``cls``, with what the class declares about itself
    (its ``declarations``: a limitation, say) and ``declarations`` on top."""
    declared = {**getattr(cls, "declarations", {}), **declarations}
    return from_classes(cls.__name__, _rank_classes(cls), **declared)


CORRECT = [
    PlainBatchNorm,
    FunctionalBatchNorm,
    AutogradFunctionBatchNorm,
    Float64Accumulation,
    VarMeanBatchNorm,
    *STYLES,  # faithful_styles: loop, einsum, Chan, hand-written backward, functional core
]


# ---- broken, round three: slips the diagnoses name (bnbench.diagnose) -------------------------
# Statistics over the wrong dimensions, a momentum argument ignored, and a constructor without
# nn.BatchNorm's device and dtype (checked where their defaults do, failed where they are needed).


def _channel_average(t: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-channel value from statistics kept in another shape (for the running update)."""
    flat = t.transpose(0, 1).reshape(t.shape[1], -1).mean(1)
    return flat.expand(channels) if flat.numel() == 1 else flat


class _StatisticsOver(PlainBatchNorm):
    """Normalizes with statistics taken over ``over(x)`` (kept broadcastable); the running
    statistics get their per-channel average, so only the reduction differs."""

    def over(self, x) -> list[int]:
        raise NotImplementedError

    def batch_stats(self, x, dims):
        over = self.over(x)
        mean = x.mean(over, keepdim=True)
        return mean, ((x - mean) ** 2).mean(over, keepdim=True)

    def normalize(self, x, mean, var):
        if mean.dim() != x.dim():  # the running statistics
            return super().normalize(x, mean, var)
        return (x - mean) / torch.sqrt(var + self.eps)

    def update(self, mean, var, n, factor):
        c = self.running_mean.shape[0]
        super().update(_channel_average(mean, c), _channel_average(var, c), n, factor)


@catches("default-rank4", r"step 0 \(train\): output: .* elements outside")
class StatisticsPerSampleAndChannel(_StatisticsOver):
    """Each sample's own statistics per channel (over the spatial dims only, as InstanceNorm):
    the batch dimension is left out of the reduction."""

    def over(self, x):
        return list(range(2, x.dim())) or [1]


@catches("default-rank4", r"step 0 \(train\): output: .* elements outside")
class StatisticsOverBatchOnly(_StatisticsOver):
    """Statistics per channel and position, over the batch dimension alone: the spatial
    dimensions are left out of the reduction."""

    def over(self, x):
        return [0]


@catches("default-rank2", r"step 0 \(train\): output: .* elements outside")
class StatisticsPerSample(_StatisticsOver):
    """Each sample's statistics over all its channels (as LayerNorm), not each channel's over
    the batch."""

    def over(self, x):
        return list(range(1, x.dim()))


@catches("momentum_float-rank4", r"step 0 \(train\): running_mean: .* elements outside")
class MomentumArgumentIgnored(PlainBatchNorm):
    """The running update uses nn.BatchNorm's default 0.1 whatever momentum it was given."""

    def momentum_factor(self, training):
        factor = super().momentum_factor(training)
        return 0.1 if factor and self.momentum is not None else factor


@catches("float64-rank4", r"raised TypeError: .*unexpected keyword argument 'device'")
class NoDeviceDtypeArguments(PlainBatchNorm):
    """A hand-written constructor without nn.BatchNorm's device and dtype arguments: it is
    checked on the CPU at float32 (built without them) and fails the cases that need them."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        *,
        bias=True,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias)
