"""Implementations the gate must judge correctly: each BROKEN one departs from nn.BatchNorm in
exactly one way and must fail; each CORRECT one is written differently and must pass.

Every broken variant changes one method of PlainBatchNorm, a deliberately straightforward faithful
implementation, so the deviation under test is the only one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
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
        if training and self.tracking() and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
            return self.momentum
        return 0.0

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
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)


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
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)


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
    """Hand-written backward, itself differentiable (recomputed from saved inputs)."""

    @staticmethod
    def forward(ctx, x, eps, dims):
        ctx.save_for_backward(x)
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
    return from_classes(cls.__name__, _rank_classes(cls), **declarations)


CORRECT = [
    PlainBatchNorm,
    FunctionalBatchNorm,
    AutogradFunctionBatchNorm,
    Float64Accumulation,
    VarMeanBatchNorm,
]
