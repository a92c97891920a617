"""torch.compile of the vectorized BatchNorm.

Training runs as one compiled call each way, because at the sizes BatchNorm usually has, a
compiled BatchNorm's time is host time: every call through torch.compile pays for dynamo's frame
wrapper and guards (about 15 us of Python on this project's 2-core machine) and, when autograd
records, for AOTAutograd's runtime wrapper and its autograd.Function (about 15-20 us more),
while the kernels of a (32, 64, 28, 28) input take a few us on an H100. So:

  - forward: ``train_step``, the vectorized train kernel *and* the running-statistics update
    (``num_batches_tracked += 1``, momentum or the cumulative ``1 / num_batches_tracked``, the
    Bessel-corrected variance) in one graph: the buffers are updated in place by the compiled
    code (on CUDA, in the kernels that compute the statistics) instead of by five eager ops;
  - backward: ``train_backward``, vectorized's hand-written backward (per-channel coefficients,
    one elementwise pass) compiled as one graph;
  - both are compiled as inference graphs and called from a hand-written autograd.Function
    (``_CompiledTrain``), so no AOTAutograd autograd wrapper runs, and the layout bookkeeping
    (canonical (N, C, L) / (M, C) views) happens inside it, so it adds no autograd nodes;
  - eps and momentum reach the graphs as cached 0-dim float64 tensors on the input's device
    (see _scalar), not as Python floats, which dynamo would turn into a fresh tensor on every
    call; weight and bias reach them detached, so that the channel count is a
    dynamic size like the others (dynamo keeps a Parameter's shape static) and one graph serves
    every channel count.

Shapes are dynamic (``dynamic=True``): a new batch size, spatial size or channel count reuses the
compiled code; every rank and memory format maps onto the two canonical views. Inductor may still
specialize on a size range (on CPU a reduction over at most 4096 values per channel compiles
apart), and a size of 1 compiles apart (dynamo's 0/1 specialization).

Everything else is the vectorized implementation's own code, unchanged: argument checks and their
error messages (an input that would raise, or that needs nothing computed, takes the vectorized
forward with its kernels compiled, as does a call traced by torch.compile of a whole model),
eval (``eval_kernel`` compiled), state dicts, momentum=None, track_running_stats=False.
Half-precision inputs are computed in float32 and cast back.

Double backward is not supported: eval's compiled kernel runs through AOTAutograd, whose
compiled backward is not itself differentiable. (Training's backward, asked for a graph, runs
vectorized's eager formulas, which are.)

CUDA graphs (``mode="reduce-overhead"``) are not used: their outputs live in a pool that the next
replay overwrites, so a caller holding an earlier output (activations kept for backward, a
benchmark's pending outputs) would read another call's values or fail, which nn.BatchNorm never
does; and the buffer updates, mutations of graph inputs, make cudagraph trees skip the graph
unless the buffers are static module attributes.
"""

from __future__ import annotations

import functools

import torch

from bnbench.implementations.vectorized import (
    _CHANNELS_LAST,
    VectorizedBatchNorm,
    _compute_dtype,
    _dims,
    _TrainNormalize,
    eval_kernel,
    rank_classes,
    to_canonical,
    train_kernel,
)
from bnbench.registry import from_classes


def train_step(x, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum):
    """train_kernel and the running-statistics update of VectorizedBatchNorm.forward, as one
    graph. ``eps`` and ``momentum`` are 0-dim float64 tensors; ``momentum`` None is the
    cumulative average. ``num_batches_tracked`` None: nothing is tracked; ``running_mean`` None:
    only the counter is."""
    y, mean, var = train_kernel(x, weight, bias, eps)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if running_mean is not None:
            if momentum is None:
                factor = 1.0 / num_batches_tracked.to(torch.float64)
            else:
                factor = momentum
            n = x.numel() // x.shape[1]
            running_mean.copy_(running_mean * (1 - factor) + mean.to(running_mean.dtype) * factor)
            running_var.copy_(
                running_var * (1 - factor) + var.to(running_var.dtype) * (factor * n / (n - 1))
            )
    return y, mean, var


def train_backward(grad_y, x, weight, mean, var, eps, grad_input: bool, grad_affine: bool):
    """_TrainNormalize.backward (vectorized's hand-written backward) for a canonical ``x`` and
    a ``grad_y`` of its layout: dx = a * dy + b * (x - mean) + c with per-channel a, b, c."""
    dims, view = _dims(x)
    xf = x.to(_compute_dtype(x))
    gy = grad_y.to(xf.dtype)
    n = xf.numel() // xf.shape[1]
    invstd = torch.rsqrt(var + eps)
    centered = xf - mean.view(view)
    grad_sum = gy.sum(dims)
    grad_dot = (gy * centered).sum(dims) * invstd  # sum(dy * xhat)
    grad_x = None
    if grad_input:
        scale = invstd if weight is None else invstd * weight
        b = -scale * invstd * grad_dot / n
        c = -scale * grad_sum / n
        grad_x = (gy * scale.view(view) + centered * b.view(view) + c.view(view)).to(x.dtype)
    if not grad_affine:
        return grad_x, None, None
    return grad_x, grad_dot, grad_sum


def _raise_recompile_limits() -> None:
    # Each dtype / affine / layout / grad-mode variant is its own graph: allow enough of them that
    # a sweep never silently falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 1024
    )


@functools.cache
def compiled_kernels():
    """The compiled (train, eval) kernels, shared by every module of this process."""
    _raise_recompile_limits()
    return (torch.compile(train_kernel, dynamic=True), torch.compile(eval_kernel, dynamic=True))


@functools.cache
def compiled_train():
    """The compiled (train_step, train_backward), shared by every module of this process."""
    _raise_recompile_limits()
    return (torch.compile(train_step, dynamic=True), torch.compile(train_backward, dynamic=True))


@functools.cache
def compiled_eval():
    """eval_kernel compiled for calls without autograd (eps a tensor, weight and bias
    detached: see _scalar and the module docstring), shared by every module of this process."""
    _raise_recompile_limits()
    return torch.compile(_eval_kernel, dynamic=True)


def _eval_kernel(x, running_mean, running_var, weight, bias, eps):
    # A code object of its own: dynamo keeps one cache of graphs per code object, and these
    # graphs (tensor eps, plain-tensor weight) never serve eval_kernel's autograd calls.
    return eval_kernel(x, running_mean, running_var, weight, bias, eps)


_SCALARS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-dim float64 tensor on ``device``, made once per (value, device): a graph
    input that never changes, so calls do not build one. On the input's device, so that a CUDA
    graph never mixes in a CPU scalar (inductor's lowering of CPU scalars into CUDA kernels has
    had bugs of its own), and made before any CUDA graph capture that replays the call (a
    benchmark's warm-up calls come first), since making it copies to the device."""
    key = (value, device)
    scalar = _SCALARS.get(key)
    if scalar is None:
        scalar = torch.tensor(value, dtype=torch.float64, device=device)
        if value == value:  # NaN: never found again, so never kept
            if len(_SCALARS) >= 64:
                _SCALARS.clear()
            _SCALARS[key] = scalar
    return scalar


def _alias(x: torch.Tensor, *shape) -> torch.Tensor:
    # A view of x that is not an autograd view (no ._base): torch.compile would otherwise guard
    # on the base tensor and recompile for every rank, and a custom Function may not return a
    # view (nn.BatchNorm's output takes in-place ops, ReLU(inplace=True)).
    return x.view(shape).detach()


def _canonical(x: torch.Tensor):
    """vectorized.to_canonical's (N, C, L) or (M, C) alias of ``x`` (a copy only for oddly
    strided inputs), and the layout that _restore turns a canonical tensor back into."""
    if x.dim() == 2:
        return x.detach(), None
    channels_last = _CHANNELS_LAST.get(x.dim())
    if channels_last is not None and not x.is_contiguous():
        _, perm, inverse = channels_last
        permuted = x.permute(perm)
        if permuted.is_contiguous():  # x is channels_last / channels_last_3d
            return _alias(permuted, -1, x.shape[1]), (permuted.shape, inverse)
    return _alias(x.contiguous(), x.shape[0], x.shape[1], -1), (x.shape, None)


def _restore(y: torch.Tensor, layout) -> torch.Tensor:
    if layout is None:
        return y
    shape, inverse = layout
    return _alias(y, *shape) if inverse is None else y.view(shape).permute(inverse).detach()


def _grad_canonical(grad: torch.Tensor, layout, canonical_shape, alias=True) -> torch.Tensor:
    """``grad`` (shaped as the input, any layout) as a contiguous canonical tensor."""
    if layout is not None and layout[1] is not None:  # channels last: (N, *spatial, C) rows
        grad = grad.permute(_CHANNELS_LAST[grad.dim()][1])
    grad = grad.contiguous()
    return _alias(grad, *canonical_shape) if alias else grad.view(canonical_shape)


def _train_forward(x, weight, bias, state):
    """train_step on the canonical alias of ``x``: (output in x's layout, that alias, mean,
    var, layout). ``state``: (running_mean, running_var, num_batches_tracked, eps tensor,
    momentum tensor or None, eps)."""
    running_mean, running_var, num_batches_tracked, eps, momentum, _ = state
    canonical, layout = _canonical(x)
    y, mean, var = compiled_train()[0](
        canonical,
        None if weight is None else weight.detach(),
        None if bias is None else bias.detach(),
        running_mean,
        running_var,
        num_batches_tracked,
        eps,
        momentum,
    )
    return _restore(y, layout), canonical, mean, var, layout


class _EagerContext:
    """What _TrainNormalize.backward reads from its ctx (the create_graph fallback)."""

    def __init__(self, saved, eps, has_bias, needs_input_grad):
        self.saved_tensors, self.eps, self.has_bias = saved, eps, has_bias
        self.needs_input_grad = needs_input_grad


class _CompiledTrain(torch.autograd.Function):
    """Training forward and backward, each one compiled call (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        y, canonical, mean, var, layout = _train_forward(x, weight, bias, state)
        # x itself for the create_graph fallback; its canonical alias (same version counter:
        # an in-place change of x after this call still fails backward) for the compiled one.
        ctx.save_for_backward(x, canonical, weight, mean, var)
        ctx.layout, ctx.eps, ctx.eps_value = layout, state[3], state[5]
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, canonical, weight, mean, var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        layout = ctx.layout
        if torch.is_grad_enabled():  # create_graph: vectorized's differentiable formulas
            canonical, _ = to_canonical(x)
            grad = _grad_canonical(grad_y, layout, canonical.shape, alias=False)
            eager = _EagerContext(
                (canonical, weight, mean, var),
                ctx.eps_value,
                ctx.has_bias,
                (need_x, need_w, need_b),
            )
            grad_x, grad_w, grad_b, _ = _TrainNormalize.backward(eager, grad, None, None)
            if grad_x is not None and layout is not None:
                shape, inverse = layout
                grad_x = grad_x.view(shape)
                grad_x = grad_x if inverse is None else grad_x.permute(inverse)
        else:
            grad_x, grad_w, grad_b = compiled_train()[1](
                _grad_canonical(grad_y, layout, canonical.shape),
                canonical,
                None if weight is None else weight.detach(),
                mean,
                var,
                ctx.eps,
                need_x,
                need_w or need_b,
            )
            if grad_x is not None:
                grad_x = _restore(grad_x, layout)
        return grad_x, grad_w if need_w else None, grad_b if need_b else None, None


def _eval_forward(x, running_mean, running_var, weight, bias, eps):
    canonical, layout = _canonical(x)
    y = compiled_eval()(
        canonical,
        running_mean,
        running_var,
        None if weight is None else weight.detach(),
        None if bias is None else bias.detach(),
        eps,
    )
    return _restore(y, layout)


_MISSING = object()


def _member(module, table: str, name: str):
    # module._parameters / _buffers directly: nn.Module.__getattr__ costs ~0.5 us a name. A name
    # not registered there (a parametrization's property) is read the ordinary way.
    value = module.__dict__[table].get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def _fits(tensor, channels: int, device: torch.device) -> bool:
    """A per-channel parameter or buffer the compiled graphs take as it is (None fits)."""
    return tensor is None or (tensor.shape == (channels,) and tensor.device == device)


class CompiledBatchNorm(VectorizedBatchNorm):
    """VectorizedBatchNorm whose kernels run through torch.compile (inductor)."""

    @staticmethod
    def train_kernel(x, weight, bias, eps):
        if torch.compiler.is_compiling():  # traced into an enclosing graph as it is
            return train_kernel(x, weight, bias, eps)
        return compiled_kernels()[0](x, weight, bias, eps)

    @staticmethod
    def eval_kernel(x, running_mean, running_var, weight, bias, eps):
        if torch.compiler.is_compiling():
            return eval_kernel(x, running_mean, running_var, weight, bias, eps)
        return compiled_kernels()[1](x, running_mean, running_var, weight, bias, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The common cases take one compiled call; anything else (an input or a state that
        # raises, an empty input, eval without running statistics, eval under autograd) takes
        # the vectorized forward with its kernels compiled, which raises or computes as before.
        eps = self.eps
        if torch.compiler.is_compiling():
            # Inside a model that torch.compile traces: the vectorized forward, which dynamo
            # traces into the model's graph (it cannot trace _CompiledTrain's saved aliases).
            return super().forward(x)
        if x.dim() not in self._expected_dims or type(eps) not in (float, int):
            return super().forward(x)
        channels = x.shape[1]
        if x.numel() == 0 or (self.training and x.numel() // channels == 1):
            return super().forward(x)
        weight = _member(self, "_parameters", "weight")
        bias = _member(self, "_parameters", "bias")
        device = x.device
        if not (_fits(weight, channels, device) and _fits(bias, channels, device)):
            return super().forward(x)
        running_mean = _member(self, "_buffers", "running_mean")
        running_var = _member(self, "_buffers", "running_var")
        # both running statistics present, of this channel count, on this device
        running_fit = (
            running_mean is not None
            and running_var is not None
            and _fits(running_mean, channels, device)
            and _fits(running_var, channels, device)
        )
        grad = torch.is_grad_enabled() and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
        if not self.training:
            if (
                grad
                or not eps >= 0.0  # raises (or NaN)
                or not running_fit
            ):
                return super().forward(x)
            return _eval_forward(x, running_mean, running_var, weight, bias, _scalar(eps, device))
        if not eps > 0.0:  # raises (or NaN)
            return super().forward(x)
        tracked = None
        if self.track_running_stats:
            tracked = _member(self, "_buffers", "num_batches_tracked")
            if tracked is None and (running_mean is not None or running_var is not None):
                return super().forward(x)  # no counter, yet statistics to update
        momentum = None
        if tracked is None:
            running_mean = running_var = None
        elif running_mean is not None or running_var is not None:
            momentum = self.momentum
            if not running_fit or type(momentum) not in (float, int, type(None)):
                return super().forward(x)
            momentum = None if momentum is None else _scalar(momentum, device)
        state = (running_mean, running_var, tracked, _scalar(eps, device), momentum, eps)
        if grad:
            return _CompiledTrain.apply(x, weight, bias, state)
        if torch.is_grad_enabled():  # one graph whatever the grad mode
            with torch.no_grad():
                return _train_forward(x, weight, bias, state)[0]
        return _train_forward(x, weight, bias, state)[0]


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
