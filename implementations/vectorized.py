"""A vectorized pure-torch BatchNorm, faithful to nn.BatchNorm.

The heavy work is two kernels over a canonical 2-D or 3-D view of the input, so that every
rank and memory format shares them (and ``compiled`` compiles only these two):
  - ``(N, C, L)`` for contiguous inputs (L = the flattened spatial size),
  - ``(M, C)`` for channels-last inputs and plain (N, C) inputs (M rows of C channels).
Reductions are written as ``sum`` over the non-channel dims: on CPU that is several times faster
than var_mean over the same dims (measured on this project's 2-core machine). Training has a
hand-written backward (_TrainNormalize). Half-precision inputs are computed in float32 and cast
back, as the native kernels do.
"""

from __future__ import annotations

import torch
from torch import nn

from bnbench.registry import from_classes

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


def train_kernel(x, weight, bias, eps: float):
    """Normalize a canonical (N, C, L) or (M, C) input with its own statistics.

    Returns the output in the input's dtype, and the batch mean and biased variance.
    """
    xf = x.to(_compute_dtype(x))
    if x.dim() == 3:
        dims, view = (0, 2), (1, -1, 1)
    else:
        dims, view = (0,), (1, -1)
    n = xf.numel() // xf.shape[1]
    mean = xf.sum(dims) / n
    centered = xf - mean.view(view)
    var = (centered * centered).sum(dims) / n
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    if bias is not None:
        y = torch.addcmul(bias.view(view), centered, scale.view(view))
    else:
        y = centered * scale.view(view)
    return y.to(x.dtype), mean, var


def _dims(x):
    return ((0, 2), (1, -1, 1)) if x.dim() == 3 else ((0,), (1, -1))


class _TrainNormalize(torch.autograd.Function):
    """train_kernel with a hand-written backward: per-channel coefficients and two fused
    multiply-adds instead of autograd's chain of full-size temporaries.

    dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) is rewritten as
    dx = a * dy + b * x + c with per-channel a, b, c, so xhat is never materialized. When the
    backward itself is differentiated (create_graph=True), the statistics are recomputed from x
    with differentiable ops, so double backward stays exact.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, var = train_kernel(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, var = ctx.saved_tensors
        dims, view = _dims(x)
        xf = x.to(_compute_dtype(x))
        gy = grad_y.to(xf.dtype)
        n = xf.numel() // xf.shape[1]
        if torch.is_grad_enabled():  # create_graph: keep the dependence of the stats on x
            mean = xf.sum(dims) / n
            centered = xf - mean.view(view)
            var = (centered * centered).sum(dims) / n
        invstd = torch.rsqrt(var + ctx.eps)
        grad_sum = gy.sum(dims)
        # sum(dy * xhat) = (sum(dy * x) - mean * sum(dy)) * invstd
        grad_dot = ((gy * xf).sum(dims) - mean * grad_sum) * invstd
        scale = invstd if weight is None else invstd * weight
        a = scale
        b = -scale * invstd * grad_dot / n
        c = -scale * grad_sum / n - b * mean
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(
                torch.addcmul(c.view(view), xf, b.view(view)), gy, a.view(view)
            ).to(x.dtype)
        grad_weight = grad_dot if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_sum if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def train_kernel_autograd(x, weight, bias, eps: float):
    """train_kernel, with the hand-written backward whenever a gradient will be needed."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        return train_kernel(x, weight, bias, eps)
    return _TrainNormalize.apply(x, weight, bias, eps)


def eval_kernel(x, running_mean, running_var, weight, bias, eps: float):
    """Normalize a canonical input with the running statistics: one fused multiply-add."""
    view = (1, -1, 1) if x.dim() == 3 else (1, -1)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    y = torch.addcmul(shift.view(view), x.to(_compute_dtype(x)), scale.view(view))
    return y.to(x.dtype)


_CHANNELS_LAST = {
    4: (torch.channels_last, (0, 2, 3, 1), (0, 3, 1, 2)),
    5: (torch.channels_last_3d, (0, 2, 3, 4, 1), (0, 4, 1, 2, 3)),
}


def _flat_view(x: torch.Tensor, shape) -> torch.Tensor:
    # Same storage, but not an autograd view of x: torch.compile would otherwise guard on x's
    # base tensor (its rank, its channel count) and recompile for every input rank.
    return torch.ops.aten._unsafe_view(x, shape)


def to_canonical(x: torch.Tensor):
    """A (N, C, L) or (M, C) alias of ``x`` (a copy only for oddly strided inputs), and the
    function that turns a canonical output back into ``x``'s shape and memory format."""
    if x.dim() == 2:
        return x, lambda y: y
    if x.dim() in _CHANNELS_LAST and not x.is_contiguous():
        fmt, perm, inverse = _CHANNELS_LAST[x.dim()]
        if x.is_contiguous(memory_format=fmt):
            permuted_shape = x.permute(perm).shape
            return (
                _flat_view(x.permute(perm), (-1, x.shape[1])),
                lambda y: y.view(permuted_shape).permute(inverse),
            )
    shape = x.shape
    return _flat_view(x.contiguous(), (shape[0], shape[1], -1)), lambda y: y.view(shape)


def check_batch_size(x: torch.Tensor) -> None:
    size = x.shape[0]
    for s in x.shape[2:]:
        size *= s
    if size == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


class VectorizedBatchNorm(nn.Module):
    """nn.BatchNorm's interface and semantics for inputs of rank 2 to 5, in pure torch ops."""

    _version = 2  # state_dicts carry num_batches_tracked (as nn.BatchNorm's version 2)

    _expected_dims: tuple[int, ...] = (2, 3, 4, 5)
    _expected_text = "2D to 5D"
    train_kernel = staticmethod(train_kernel_autograd)
    eval_kernel = staticmethod(eval_kernel)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:  # torch 2.13's bias=False: a weight and no bias
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args):
        # As nn.BatchNorm: a state_dict saved before num_batches_tracked existed (version < 2)
        # keeps the counter this module has.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (
            (version is None or version < 2)
            and self.track_running_stats
            and key not in (state_dict)
        ):
            state_dict[key] = (
                self.num_batches_tracked
                if self.num_batches_tracked is not None
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self._expected_dims:
            raise ValueError(f"expected {self._expected_text} input (got {x.dim()}D input)")
        # As nn.BatchNorm: a tracking module in training updates its running statistics by the
        # momentum, or by 1 / num_batches_tracked under momentum=None; a counter set to None
        # counts nothing, and then momentum=None moves nothing (factor 0.0).
        factor = 0.0 if self.momentum is None else self.momentum
        updating = self.training and self.track_running_stats
        if updating and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if use_batch_stats:
            check_batch_size(x)
            if self.eps <= 0.0:
                raise ValueError(
                    f"batch_norm eps must be positive during training, but got {self.eps}"
                )
        elif self.eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")

        if x.numel() == 0:  # nothing to normalize; keep the graph so grads are zeros
            view = (1, -1) + (1,) * (x.dim() - 2)
            y = x if self.weight is None else x * self.weight.view(view)
            y = y if self.bias is None else y + self.bias.view(view)
            return y.to(x.dtype)
        canonical, restore = to_canonical(x)
        if not use_batch_stats:
            return restore(
                self.eval_kernel(
                    canonical, self.running_mean, self.running_var, self.weight, self.bias, self.eps
                )
            )
        y, mean, var = self.train_kernel(canonical, self.weight, self.bias, self.eps)
        if updating and self.running_mean is not None:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                rm, rv = self.running_mean, self.running_var
                rm.mul_(1 - factor).add_(mean.to(rm.dtype), alpha=factor)
                rv.mul_(1 - factor).add_(var.to(rv.dtype), alpha=factor * n / (n - 1))
        return restore(y)


def _rank_specific(base: type[VectorizedBatchNorm], dims: tuple[int, ...], text: str, name: str):
    return type(
        name,
        (base,),
        {"_expected_dims": dims, "_expected_text": text, "__module__": base.__module__},
    )


def rank_classes(base: type[VectorizedBatchNorm], prefix: str) -> dict[int, type[nn.Module]]:
    """BatchNorm1d/2d/3d-like subclasses of ``base``, keyed by input rank."""
    bn1d = _rank_specific(base, (2, 3), "2D or 3D", f"{prefix}BatchNorm1d")
    bn2d = _rank_specific(base, (4,), "4D", f"{prefix}BatchNorm2d")
    bn3d = _rank_specific(base, (5,), "5D", f"{prefix}BatchNorm3d")
    return {2: bn1d, 3: bn1d, 4: bn2d, 5: bn3d}


_classes = rank_classes(VectorizedBatchNorm, "Vectorized")
VectorizedBatchNorm1d, VectorizedBatchNorm2d, VectorizedBatchNorm3d = (
    _classes[2],
    _classes[4],
    _classes[5],
)

vectorized = from_classes(
    "vectorized",
    _classes,
    description="pure torch ops over a canonical (N, C, L) / (M, C) view, sum reductions",
    deviations={
        "forward_ad-*": "the hand-written autograd.Function defines backward only, no jvp: "
        "forward-mode AD (torch.func.jvp) raises",
    },
)
