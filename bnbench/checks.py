"""Runs one case on one implementation and says what differs from the oracle.

``run_case`` never raises for a misbehaving implementation: an exception, a NaN or a wrong value
becomes a failure message naming the step, the tensor and the difference.
"""

from __future__ import annotations

import copy
import dataclasses
import traceback
from dataclasses import dataclass

import torch
from torch import nn

from bnbench.cases import Case
from bnbench.diagnose import (
    CONSTRUCTOR_DEFAULTS,
    HINT_PREFIX,
    StepState,
    constructor_gaps,
    is_default_argument,
    missing_arguments_message,
    output_hint,
    statistic_hint,
    step_state,
    with_hint,
)
from bnbench.reference import ReferenceBatchNorm
from bnbench.registry import RANK_TO_BUILTIN, Implementation, _default_state
from bnbench.results import Verdict
from bnbench.tolerances import compare_tensors, working_dtype

# A raw outcome, before the implementation's declared deviations are applied.
PASS, FAIL, UNSUPPORTED = Verdict.PASS, Verdict.FAIL, Verdict.NOT_SUPPORTED


@dataclass(frozen=True)
class Outcome:
    status: str  # PASS | FAIL | UNSUPPORTED
    message: str = ""


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Inputs: deterministic per case and step, with per-channel offsets and scales, one channel of
# small variance (so eps matters) and non-trivial weight, bias and running statistics.


def _generator(case: Case, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(case.seed * 1000 + salt)


def make_input(case: Case, step: int, device: str) -> torch.Tensor:
    shape = tuple(case.shape)
    if case.batch_sizes:
        shape = (case.batch_sizes[step % len(case.batch_sizes)],) + shape[1:]
    g = _generator(case, step)
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    mean = (torch.rand(channels, generator=g, dtype=torch.float64) * 2 - 1) + 0.25 * step
    std = torch.rand(channels, generator=g, dtype=torch.float64) * 1.5 + 0.2
    std[-1] = case.small_std
    mean, std = mean * case.spread, std * case.spread
    if case.offset:  # |mean| / std = offset on every channel, alternating signs
        signs = torch.tensor([(-1.0) ** c for c in range(channels)], dtype=torch.float64)
        mean = mean + signs * case.offset * std
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std.view(view) + mean.view(view)
    if case.constant_channel:
        x[:, 0] = 0.75
    x = x.to(case.dtype)
    if case.memory_format == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif case.memory_format == "non_contiguous":
        # Same values, storage transposed: strides no longer follow the shape.
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    return x.to(device)


def make_grad_output(case: Case, step: int, like: torch.Tensor) -> torch.Tensor:
    g = _generator(case, 500 + step)
    # In the input's dtype, so the oracle sees exactly the values the implementation gets.
    grad = torch.randn(tuple(like.shape), generator=g, dtype=torch.float64)
    return grad.to(like.dtype).to(like.device)


def make_params(case: Case) -> dict[str, torch.Tensor]:
    g = _generator(case, 900)
    c = case.num_features
    return {
        "weight": torch.randn(c, generator=g, dtype=torch.float64) * 0.5 + 1.2,
        "bias": torch.randn(c, generator=g, dtype=torch.float64),
        "running_mean": torch.randn(c, generator=g, dtype=torch.float64) * 0.5,
        "running_var": torch.rand(c, generator=g, dtype=torch.float64) * 1.5 + 0.5,
    }


def make_module(impl: Implementation, case: Case, device: str) -> nn.Module:
    kwargs = case.module_kwargs() if case.explicit_kwargs else None
    return impl.make(case.config(device), case.num_features, explicit_kwargs=kwargs)


def _set(tensor: torch.Tensor | None, value: torch.Tensor, what: str) -> None:
    if tensor is None:
        raise CheckFailed(f"cannot set {what}: the module has none")
    with torch.no_grad():
        tensor.copy_(value.reshape(tensor.shape).to(tensor.dtype))


def _reference(case: Case) -> ReferenceBatchNorm:
    return ReferenceBatchNorm(
        case.num_features,
        case.eps,
        case.momentum,
        case.affine,
        case.track_running_stats,
        bias_term=case.bias,
    )


def _init_module_and_reference(impl: Implementation, case: Case, module: nn.Module):
    """Give ``module`` and a fresh oracle the same non-trivial weight, bias (and stats)."""
    ref = _reference(case)
    if case.neutral:  # the fresh module's own weight 1, bias 0 and statistics
        return ref
    values = make_params(case)
    state = impl.state(module)
    if case.affine:
        _set(state["weight"], values["weight"], "weight")
        ref.weight = values["weight"].clone()
        if case.bias:
            _set(state["bias"], values["bias"], "bias")
            ref.bias = values["bias"].clone()
    if case.initial_running_stats and case.track_running_stats:
        _set(state["running_mean"], values["running_mean"], "running_mean")
        _set(state["running_var"], values["running_var"], "running_var")
        ref.running_mean = values["running_mean"].clone()
        ref.running_var = values["running_var"].clone()
    return ref


# ---------------------------------------------------------------------------------------------
# Runners, one per case kind. Each returns a list of problems (empty: pass).


def _memory_format(case: Case, ndim: int):
    if case.memory_format != "channels_last":
        return None
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def _check_state(impl, case, module, ref, problems, before: StepState | None = None):
    """The running statistics and the batch counter after a call, against the oracle's.
    ``before``: the oracle's state before the call, to name a known slip where a statistic
    differs (bnbench.diagnose)."""
    state = impl.state(module)
    raw = impl.state is _default_state
    for name in ("running_mean", "running_var"):
        actual, expected = state[name], getattr(ref, name)
        if expected is None:
            if actual is not None:
                problems.append(f"{name}: expected None (track_running_stats=False), got a tensor")
            continue
        if isinstance(actual, torch.Tensor):
            if actual.requires_grad or actual.grad_fn is not None:
                problems.append(f"{name}: requires grad / carries autograd history")
            if actual.dtype != case.module_dtype:
                problems.append(f"{name}: dtype {actual.dtype}, expected {case.module_dtype}")
            if not raw and actual.numel() == expected.numel():
                actual = actual.reshape(expected.shape)
        dtype = working_dtype(case.dtype, case.module_dtype)
        problem = compare_tensors(name, actual, expected, dtype, statistics=True)
        if problem:
            hint = None if before is None else statistic_hint(before, name, actual, expected, dtype)
            if hint and any(p.endswith(f"\n{HINT_PREFIX}{hint}") for p in problems):
                hint = None  # running_mean said it already
            problems.append(with_hint(problem, hint))
    actual_nbt, expected_nbt = state["num_batches_tracked"], ref.num_batches_tracked
    if expected_nbt is None:
        if actual_nbt is not None:
            problems.append("num_batches_tracked: expected None (track_running_stats=False)")
    elif not isinstance(actual_nbt, torch.Tensor):
        problems.append(
            f"num_batches_tracked: is {actual_nbt!r}, expected a 0-dim int64 tensor "
            f"equal to {expected_nbt}"
        )
    elif actual_nbt.dtype != torch.int64 or actual_nbt.dim() != 0:
        problems.append(
            f"num_batches_tracked: dtype {actual_nbt.dtype} shape "
            f"{tuple(actual_nbt.shape)}, expected a 0-dim int64 tensor"
        )
    elif int(actual_nbt) != expected_nbt:
        problems.append(f"num_batches_tracked: {int(actual_nbt)}, expected {expected_nbt}")


def _apply_action(impl, case, module, ref, action: str, step: int) -> None:
    """Do to the module what a user does between calls, and to the oracle what it means."""
    name, _, value = action.partition("=")
    state = impl.state(module)
    if name in ("momentum", "eps"):
        number = None if value == "None" else float(value)
        setattr(module, name, number)
        setattr(ref, name, number)
    elif name == "tracking_off":
        setattr(module, "track_running_stats", False)  # noqa: B010 (nn.Module attribute)
        ref.stop_tracking()
    elif name == "tracking_on":
        setattr(module, "track_running_stats", True)  # noqa: B010 (nn.Module attribute)
        ref.track_running_stats = True
    elif name == "load_state_dict":
        g = _generator(case, 700 + step)
        loaded = {
            "running_mean": torch.randn(case.num_features, generator=g, dtype=torch.float64),
            "running_var": torch.rand(case.num_features, generator=g, dtype=torch.float64) + 0.3,
        }
        sd = module.state_dict()
        for key, value64 in loaded.items():
            if key not in sd:
                raise CheckFailed(f"before step {step}: state_dict has no {key}")
            sd[key] = value64.to(sd[key].dtype).reshape(sd[key].shape).to(sd[key].device)
            setattr(ref, key, value64.clone())
        try:
            module.load_state_dict(sd)
        except Exception as exc:
            raise CheckFailed(
                f"before step {step}: load_state_dict raised {_describe(exc)}"
            ) from exc
    elif name == "reset_running_stats":
        getattr(module, "reset_running_stats")()  # noqa: B009 (an nn.BatchNorm method)
        ref.running_mean = torch.zeros(case.num_features, dtype=torch.float64)
        ref.running_var = torch.ones(case.num_features, dtype=torch.float64)
        ref.num_batches_tracked = 0
    elif name == "scale_parameters":
        with torch.no_grad():
            for key in ("weight", "bias"):
                if state[key] is not None:
                    state[key].mul_(1.5).add_(0.25)
                    setattr(ref, key, getattr(ref, key) * 1.5 + 0.25)
    elif name == "counter_none":
        setattr(module, "num_batches_tracked", None)  # noqa: B010 (nn.Module attribute)
        ref.num_batches_tracked = None
    elif name == "buffers_none":
        setattr(module, "running_mean", None)  # noqa: B010 (nn.Module attribute)
        setattr(module, "running_var", None)  # noqa: B010 (nn.Module attribute)
        ref.running_mean = ref.running_var = None
    else:  # pragma: no cover - the case table is data written here
        raise ValueError(f"unknown action {action!r}")


def held_buffers(impl, module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, the buffer now, the state_dict's view of it): later in-place updates must reach
    both (nn.BatchNorm updates its buffers in place)."""
    if impl.state is not _default_state:
        return []
    sd = module.state_dict()
    held = []
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor) and name in sd:
            held.append((name, tensor, sd[name]))
    return held


def _grad_output(case: Case, step: int, x: torch.Tensor) -> torch.Tensor:
    grad = make_grad_output(case, step, x)
    if case.grad_layout == "permuted":  # same values, transposed storage
        return grad.transpose(0, -1).contiguous().transpose(0, -1)
    if case.grad_layout == "channels_last":
        fmt = torch.channels_last if grad.dim() == 4 else torch.channels_last_3d
        return grad.contiguous(memory_format=fmt)
    if case.grad_layout == "contiguous":
        return grad.contiguous()
    return grad


def _conditioning(x64: torch.Tensor, ref, training: bool, running_var) -> torch.Tensor:
    """|x| * |weight| / sqrt(var + eps) per element: the rounding any faithful kernel makes when
    it folds the normalization into x * scale + shift is about eps(dtype) times this. With
    large offsets (|mean| / std = 1000) it dominates the output's error."""
    c = x64.shape[1]
    view = (1, c) + (1,) * (x64.dim() - 2)
    dims = [0] + list(range(2, x64.dim()))
    if x64.numel() == 0:
        return x64.abs()
    if training or running_var is None:
        var = x64.detach().var(dim=dims, unbiased=False)
    else:
        var = running_var
    scale = 1 / torch.sqrt(var + ref.eps)
    if ref.weight is not None:
        scale = scale * ref.weight.detach().abs()
    return x64.detach().abs() * scale.view(view)


def _input_grad_conditioning(x64, grad_out, ref, batch_stats: bool, running_var) -> torch.Tensor:
    """The size of the terms a faithful kernel adds up for each input grad element, in units
    of the element's own scale. With batch statistics the input grad is
    w / sqrt(var + eps) * (g - mean(g) - x_hat * mean(g * x_hat)): when the batch's variance
    is small (two close values, a channel of tiny spread) the terms are large and cancel, and
    their rounding is what any float32 kernel leaves. x_hat itself carries the forward's
    rounding (|x| / std of it with large offsets), which the last term brings in."""
    c = x64.shape[1]
    view = (1, c) + (1,) * (x64.dim() - 2)
    dims = [0] + list(range(2, x64.dim()))
    g = grad_out.detach().to("cpu", torch.float64).abs()
    x = x64.detach()
    if x.numel() == 0:
        return g
    weight = 1.0 if ref.weight is None else ref.weight.detach().abs().view(view)
    if not batch_stats:
        return g * weight / torch.sqrt(running_var.view(view) + ref.eps)
    mean = x.mean(dims, keepdim=True)
    invstd = 1 / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + ref.eps)
    x_hat = ((x - mean) * invstd).abs()
    x_cond = x.abs() * invstd  # the forward's rounding of x_hat, in its units
    terms = (
        g
        + g.mean(dims, keepdim=True)
        + x_hat * (g * x_hat).mean(dims, keepdim=True)
        + x_cond * (g * x_hat).mean(dims, keepdim=True)
        + x_hat * (g * x_cond).mean(dims, keepdim=True)
    )
    return terms * invstd * weight


def run_steps(impl: Implementation, case: Case, device: str) -> list[str]:
    module = make_module(impl, case, device)
    ref = _init_module_and_reference(impl, case, module)
    actions: dict[int, list[str]] = {}
    for at, action in case.actions:
        actions.setdefault(at, []).append(action)
    if case.frozen_affine:
        for param in module.parameters():
            param.requires_grad_(False)
    held = held_buffers(impl, module)
    for i, step in enumerate(case.steps):
        if case.stop_tracking_after == i:
            setattr(module, "track_running_stats", False)  # noqa: B010 (nn.Module attribute)
            ref.stop_tracking()
        for action in actions.get(i, []):
            _apply_action(impl, case, module, ref, action, i)
            if action == "buffers_none":
                held = []
        problems = check_step(impl, case, module, ref, held, i, step, make_input(case, i, device))
        if problems:
            return [f"step {i} ({step}): {p}" for p in problems]
    return []


def _built_with(case: Case) -> dict:
    """The eps and momentum ``case``'s module was constructed with (nn.BatchNorm's defaults
    when it was built from num_features alone)."""
    if case.explicit_kwargs:
        return {"eps": case.eps, "momentum": case.momentum}
    return {"eps": CONSTRUCTOR_DEFAULTS["eps"], "momentum": CONSTRUCTOR_DEFAULTS["momentum"]}


def check_step(
    impl, case, module, ref, held, i: int, step: str, x: torch.Tensor, grad_out=None
) -> list[str]:
    """One call of ``module`` on ``x`` in mode ``step`` (train | eval [_nograd | _attr]), its
    backward (with ``grad_out``, or the case's) and the state after it, against the oracle
    ``ref`` (which advances too). ``held``: buffers that must be updated in place. Returns the
    problems; raises CheckFailed when the module raises."""
    problems: list[str] = []
    raw = impl.state is _default_state
    mode = step.split("_")[0]
    training = mode == "train"
    grad_enabled = not step.endswith("nograd")
    if step.endswith("_attr"):  # assigned as an attribute, the way some code does it
        setattr(module, "training", training)  # noqa: B010 (nn.Module attribute)
    else:
        module.train(training)
    module.zero_grad(set_to_none=True)
    params_require_grad = case.affine and not case.frozen_affine
    backward = grad_enabled and case.backward and (case.input_grad or params_require_grad)
    x_before = x.clone()
    x_in = x.detach().requires_grad_(backward and case.input_grad)
    running_var_before = None if ref.running_var is None else ref.running_var.clone()
    try:
        with torch.set_grad_enabled(grad_enabled):
            y = module(x_in)
    except Exception as exc:
        raise CheckFailed(f"step {i} ({step}): forward raised {_describe(exc)}") from exc

    x64 = x.detach().to("cpu", torch.float64).requires_grad_(backward and case.input_grad)
    ref_inputs = [x64] if case.input_grad else []
    ref_params = [p for p in (ref.weight, ref.bias) if p is not None]
    for p in ref_params:
        p.requires_grad_(backward and params_require_grad)
    if params_require_grad:
        ref_inputs += ref_params
    # what the oracle knew before the call: candidate explanations of a failure start there
    before = step_state(ref, x64, training, built=_built_with(case), module=module)
    with torch.set_grad_enabled(backward):
        y_ref, used = ref.forward(x64, training)

    if not isinstance(y, torch.Tensor):
        raise CheckFailed(f"step {i} ({step}): forward returned {type(y).__name__}")
    if y.dtype != x.dtype:
        problems.append(f"output: dtype {y.dtype}, expected the input's {x.dtype}")
    if y.device != x.device:
        problems.append(f"output: on {y.device}, expected {x.device}")
    if tuple(y.shape) != tuple(x.shape):
        problems.append(f"output: shape {tuple(y.shape)}, expected the input's {tuple(x.shape)}")
    fmt = _memory_format(case, x.dim())
    if fmt is not None and not y.is_contiguous(memory_format=fmt):
        problems.append(f"output: not in the input's memory format {fmt}")
    elif x.is_contiguous() and not y.is_contiguous():
        problems.append("output: not contiguous for a contiguous input")
    if y.numel() and y.untyped_storage().data_ptr() == x_in.untyped_storage().data_ptr():
        problems.append("output: shares memory with the input (nn.BatchNorm never aliases)")
    if grad_enabled and (x_in.requires_grad or params_require_grad) and not y.requires_grad:
        problems.append("output: does not require grad, though the input or the parameters do")
    condition = _conditioning(x64, ref, training, running_var_before)
    problem = compare_tensors("output", y, y_ref, case.dtype, condition=condition)
    if problem:
        hint = output_hint(before, y, y_ref, case.dtype, condition)
        problems.append(with_hint(problem, hint))

    if backward and y.requires_grad:
        if grad_out is None:
            grad_out = _grad_output(case, i, x)
        try:
            y.backward(grad_out)
        except Exception as exc:
            raise CheckFailed(f"step {i} ({step}): backward raised {_describe(exc)}") from exc
        expected = list(
            torch.autograd.grad(
                y_ref, ref_inputs, grad_out.to("cpu", torch.float64), allow_unused=True
            )
        )
        if case.input_grad:
            grad_condition = _input_grad_conditioning(
                x64, grad_out, ref, used["batch_stats"], running_var_before
            )
            problem = compare_tensors(
                "input grad", x_in.grad, expected.pop(0), case.dtype, condition=grad_condition
            )
            if problem:
                problems.append(problem)
            if (
                fmt is not None
                and x_in.grad is not None
                and not x_in.grad.is_contiguous(memory_format=fmt)
            ):
                problems.append(f"input grad: not in the input's memory format {fmt}")
        state = impl.state(module)
        names = [n for n in ("weight", "bias") if getattr(ref, n) is not None]
        if params_require_grad:
            for name, exp in zip(names, expected):
                held_param = state[name]
                actual = None if held_param is None else held_param.grad
                if actual is not None:
                    if actual.dtype != case.module_dtype:
                        problems.append(
                            f"{name} grad: dtype {actual.dtype}, expected {case.module_dtype}"
                        )
                    if not raw:
                        actual = actual.reshape(exp.shape)
                # the weight grad sums grad_output * x_hat: each x_hat carries the
                # forward's rounding, and n of them add up like a random walk
                summed = None
                if name == "weight" and grad_out.numel():
                    dims = [0] + list(range(2, grad_out.dim()))
                    g64 = grad_out.detach().to("cpu", torch.float64)
                    summed = ((g64 * condition) ** 2).sum(dims).sqrt()
                problem = compare_tensors(
                    f"{name} grad",
                    actual,
                    exp,
                    working_dtype(case.dtype, case.module_dtype),
                    condition=summed,
                )
                if problem:
                    problems.append(problem)
        elif case.frozen_affine:
            for name in names:
                frozen = state[name]
                if frozen is not None and frozen.grad is not None:
                    problems.append(f"{name} grad: set, though {name} is frozen")
    for p in ref_params:
        p.requires_grad_(False)
    ref.weight = None if ref.weight is None else ref.weight.detach()
    ref.bias = None if ref.bias is None else ref.bias.detach()

    if not torch.equal(x, x_before):
        problems.append("input: modified in place by the implementation")
    _check_state(impl, case, module, ref, problems, before)
    for name, tensor, saved in held:
        current = getattr(module, name, None)
        if not isinstance(current, torch.Tensor):
            continue
        if current is not tensor:
            problems.append(
                f"{name}: replaced by a new tensor; nn.BatchNorm updates its "
                "buffers in place, so references to them see every update"
            )
        if not torch.equal(saved, current):
            problems.append(
                f"state_dict()[{name!r}]: an earlier state_dict() no longer matches the "
                "module; nn.BatchNorm updates its buffers in place"
            )
    return problems


def run_gradcheck(impl: Implementation, case: Case, device: str) -> list[str]:
    module = make_module(impl, case, device)
    _init_module_and_reference(impl, case, module)
    module.train(case.steps[0] == "train")
    names, params = zip(*module.named_parameters()) if case.affine else ((), ())
    params = tuple(p.detach().clone().requires_grad_() for p in params)

    def forward(x, *p):
        return torch.func.functional_call(module, dict(zip(names, p)), (x,))

    x = make_input(case, 0, device).detach().requires_grad_()
    check = torch.autograd.gradgradcheck if case.double_backward else torch.autograd.gradcheck
    try:
        check(forward, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)
    except Exception as exc:
        return [f"{check.__name__}: {_describe(exc)}"]
    return []


def _expect_equal(problems, what, actual, expected_value, case, shape):
    if not isinstance(actual, torch.Tensor):
        problems.append(f"{what}: is {type(actual).__name__}, expected a tensor")
        return
    if tuple(actual.shape) != shape:
        problems.append(f"{what}: shape {tuple(actual.shape)}, expected {shape}")
        return
    if actual.dtype != case.module_dtype:
        problems.append(f"{what}: dtype {actual.dtype}, expected {case.module_dtype}")
    if not bool((actual.detach().float() == expected_value).all()):
        problems.append(f"{what}: {actual.detach().cpu().tolist()}, expected all {expected_value}")


def _expect_defaults(module, case, problems, keep_params=False):
    c = case.num_features
    params = dict(module.named_parameters())
    if case.affine and not keep_params:
        for name, value in (("weight", 1.0), ("bias", 0.0))[: 2 if case.bias else 1]:
            tensor = getattr(module, name, None)
            if not isinstance(tensor, nn.Parameter) or params.get(name) is not tensor:
                problems.append(
                    f"{name}: expected a registered nn.Parameter, got {type(tensor).__name__}"
                )
            _expect_equal(problems, name, tensor, value, case, (c,))
    if case.track_running_stats:
        buffers = dict(module.named_buffers())
        for name, value in (("running_mean", 0.0), ("running_var", 1.0)):
            tensor = getattr(module, name, None)
            if name not in buffers:
                problems.append(f"{name}: not a registered buffer")
            _expect_equal(problems, name, tensor, value, case, (c,))
        nbt = getattr(module, "num_batches_tracked", None)
        if not isinstance(nbt, torch.Tensor) or "num_batches_tracked" not in buffers:
            problems.append("num_batches_tracked: expected a registered 0-dim int64 buffer")
        elif nbt.dtype != torch.int64 or nbt.dim() != 0 or int(nbt) != 0:
            problems.append(f"num_batches_tracked: {nbt!r}, expected tensor(0) int64 0-dim")


def run_defaults(impl: Implementation, case: Case, device: str) -> list[str]:
    module = make_module(impl, case, device)
    problems: list[str] = []
    _expect_defaults(module, case, problems)
    params = dict(module.named_parameters())
    if not case.affine:
        for name in ("weight", "bias"):
            if getattr(module, name, "missing") is not None:
                problems.append(f"{name}: expected None with affine=False")
        if params:
            problems.append(f"parameters: expected none with affine=False, got {sorted(params)}")
    if not case.track_running_stats:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(module, name, "missing") is not None:
                problems.append(f"{name}: expected None with track_running_stats=False")
    if case.affine and not case.bias:
        if getattr(module, "bias", "missing") is not None or "bias" in params:
            problems.append("bias: expected None (and no bias parameter) with bias=False")
    expected_keys = set()
    if case.affine:
        expected_keys |= {"weight", "bias"} if case.bias else {"weight"}
    if case.track_running_stats:
        expected_keys |= {"running_mean", "running_var", "num_batches_tracked"}
    keys = set(module.state_dict())
    if keys != expected_keys:
        problems.append(f"state_dict keys: {sorted(keys)}, expected {sorted(expected_keys)}")
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != torch.device(device).type:
            problems.append(f"a parameter or buffer is on {tensor.device}, expected {device}")
            break
    if case.track_running_stats:
        halved = copy.deepcopy(module).half()
        nbt = getattr(halved, "num_batches_tracked", None)
        if isinstance(nbt, torch.Tensor) and nbt.dtype != torch.int64:
            problems.append(f"num_batches_tracked: {nbt.dtype} after .half(), expected int64")
    return problems


def _train_steps(module, case, device, steps=3):
    module.train()
    for i in range(steps):
        x = make_input(case, i, device).requires_grad_()
        module(x).sum().backward()


def run_reset(impl: Implementation, case: Case, device: str) -> list[str]:
    module = make_module(impl, case, device)
    _init_module_and_reference(impl, case, module)
    _train_steps(module, case, device)
    weight_before = torch.as_tensor(module.weight).detach().clone()
    problems: list[str] = []
    if not hasattr(module, "reset_running_stats") or not hasattr(module, "reset_parameters"):
        return ["reset_running_stats() / reset_parameters(): missing"]
    getattr(module, "reset_running_stats")()  # noqa: B009 (checked above)
    _expect_defaults(module, case, problems, keep_params=True)
    if not torch.equal(torch.as_tensor(module.weight).detach(), weight_before):
        problems.append("reset_running_stats(): changed the weight")
    problems = [f"after reset_running_stats(): {p}" for p in problems]
    _train_steps(module, case, device)
    getattr(module, "reset_parameters")()  # noqa: B009 (checked above)
    after: list[str] = []
    _expect_defaults(module, case, after)
    return problems + [f"after reset_parameters(): {p}" for p in after]


def _builtin_twin(case: Case, device: str, **overrides) -> nn.Module:
    """The installed torch's nn.BatchNorm built like ``case``'s module: the source of interface
    facts (exceptions, dtypes, what loads), never of numbers."""
    kwargs = dict(case.module_kwargs(), device=device, dtype=case.module_dtype)
    if not case.bias:
        kwargs["bias"] = False
    kwargs.update(overrides)
    return RANK_TO_BUILTIN[case.rank](case.num_features, **kwargs)


def _outcome(call):
    """("ok", result) or ("raised", exception) of ``call()``."""
    try:
        return "ok", call()
    except Exception as exc:  # either side may raise anything
        return "raised", exc


def run_state_dict(impl: Implementation, case: Case, device: str) -> list[str]:
    problems: list[str] = []
    # nn.BatchNorm -> implementation
    source = _builtin_twin(case, device)
    _init_module_and_reference(_BUILTIN_TWIN, case, source)
    _train_steps(source, case, device)
    source_sd = source.state_dict()
    module = make_module(impl, case, device)
    try:
        module.load_state_dict(source_sd, strict=True)
    except Exception as exc:
        problems.append(f"load_state_dict(nn.BatchNorm's state_dict) raised {_describe(exc)}")
    else:
        loaded = module.state_dict()
        for key, value in source_sd.items():
            if key not in loaded or not torch.equal(loaded[key].cpu(), value.cpu()):
                problems.append(f"{key}: not carried over from nn.BatchNorm's state_dict")
        # The loaded state must drive eval exactly as the oracle says it should.
        ref = _reference(case)
        for key, value in source_sd.items():
            if key != "num_batches_tracked":
                setattr(ref, key, value.detach().to("cpu", torch.float64))
        module.eval()
        x = make_input(case, 7, device)
        expected, _ = ref.forward(x.to("cpu", torch.float64), training=False)
        try:
            with torch.no_grad():
                actual = module(x)
        except Exception as exc:
            problems.append(f"eval after loading raised {_describe(exc)}")
        else:
            problem = compare_tensors("eval output after loading", actual, expected, case.dtype)
            if problem:
                problems.append(problem)
    # implementation -> nn.BatchNorm
    module = make_module(impl, case, device)
    _init_module_and_reference(impl, case, module)
    _train_steps(module, case, device)
    module_sd = module.state_dict()
    target = _builtin_twin(case, device)
    try:
        target.load_state_dict(module_sd, strict=True)
    except Exception as exc:
        problems.append(
            f"nn.BatchNorm.load_state_dict(implementation's state_dict) raised {_describe(exc)}"
        )
    else:
        for key, value in target.state_dict().items():
            if not torch.equal(value.cpu(), module_sd[key].cpu()):
                problems.append(f"{key}: differs after loading into nn.BatchNorm")
    return problems


# nn.BatchNorm as a state_dict counterpart only: never an oracle.
_BUILTIN_TWIN = Implementation(
    name="nn.BatchNorm", factory=lambda rank, c, **kw: RANK_TO_BUILTIN[rank](c, **kw)
)


def run_error(impl: Implementation, case: Case, device: str) -> list[str]:
    """The installed nn.BatchNorm, run side by side on the same input, says what must happen:
    the same exception type and message (so the contract follows the torch version)."""
    x = make_input(case, 0, device)
    training = case.steps[0] == "train"
    twin = _builtin_twin(case, device).train(training)
    expected = _outcome(lambda: twin(x))
    module = make_module(impl, case, device)
    module.train(training)
    actual = _outcome(lambda: module(x))
    if expected[0] == "ok":
        if actual[0] == "raised":
            return [f"raised {_describe(actual[1])}; nn.BatchNorm returns an output here"]
        return []
    want = f"{type(expected[1]).__name__}({str(expected[1])!r})"
    if actual[0] == "ok":
        return [f"returned an output, expected {want} as nn.BatchNorm raises"]
    if type(actual[1]) is not type(expected[1]) or str(actual[1]) != str(expected[1]):
        return [f"raised {type(actual[1]).__name__}({str(actual[1])!r}), expected {want}"]
    return []


def run_wrong_channels(impl: Implementation, case: Case, device: str) -> list[str]:
    """One channel too many, one too few: nn.BatchNorm raises; the same exception type is
    required (the message is the kernel's own and differs between faithful styles)."""
    problems = []
    for channels in (case.num_features + 1, case.num_features - 1):
        wrong = dataclasses.replace(case, shape=(case.shape[0], channels) + tuple(case.shape[2:]))
        x = make_input(wrong, 0, device)
        for training in (True, False):
            twin = _builtin_twin(case, device).train(training)
            expected = _outcome(lambda twin=twin, x=x: twin(x))
            module = make_module(impl, case, device)
            module.train(training)
            actual = _outcome(lambda module=module, x=x: module(x))
            mode = "train" if training else "eval"
            if expected[0] == "raised" and actual[0] == "ok":
                problems.append(
                    f"{mode}: returned an output for {channels} channels into a "
                    f"{case.num_features}-channel module; nn.BatchNorm raises "
                    f"{type(expected[1]).__name__}"
                )
            elif expected[0] == "raised" and not isinstance(actual[1], type(expected[1])):
                problems.append(
                    f"{mode}: raised {_describe(actual[1])} for {channels} channels, expected "
                    f"{type(expected[1]).__name__} as nn.BatchNorm raises"
                )
    return problems


def run_forward_ad(impl: Implementation, case: Case, device: str) -> list[str]:
    """Forward-mode AD: the output's tangent for an input tangent, against the oracle's (which
    is plain arithmetic, so forward AD runs through it in float64). nn.BatchNorm supports it,
    and torch.func.jvp / functorch code relies on it."""
    import torch.autograd.forward_ad as fwad

    problems = []
    module = make_module(impl, case, device)
    ref = _init_module_and_reference(impl, case, module)
    for i, training in enumerate((True, False)):
        module.train(training)
        x = make_input(case, i, device)
        tangent = make_grad_output(case, i, x)
        try:
            with fwad.dual_level():
                out = module(fwad.make_dual(x, tangent))
                got = fwad.unpack_dual(out).tangent
        except Exception as exc:
            problems.append(
                f"{'train' if training else 'eval'}: forward AD raised {_describe(exc)}"
            )
            continue
        with fwad.dual_level():
            dual = fwad.make_dual(x.to("cpu", torch.float64), tangent.to("cpu", torch.float64))
            want = fwad.unpack_dual(ref.forward(dual, training)[0]).tangent
        problem = compare_tensors(
            f"{'train' if training else 'eval'}: output tangent", got, want, case.dtype
        )
        if problem:
            problems.append(problem)
    return problems


def run_positional(impl: Implementation, case: Case, device: str) -> list[str]:
    """nn.BatchNorm's constructor taken positionally: (num_features, eps, momentum, affine,
    track_running_stats). Each argument must land where nn.BatchNorm puts it."""
    problems = []
    for args in ((1e-3, 0.3, True, False), (1e-3, 0.3, False, True)):
        twin = RANK_TO_BUILTIN[case.rank](case.num_features, *args)
        built = _outcome(lambda args=args: impl.factory(case.rank, case.num_features, *args))
        call = f"({case.num_features}, {', '.join(map(repr, args))})"
        if built[0] == "raised":
            problems.append(f"{call}: raised {_describe(built[1])}; nn.BatchNorm takes it")
            continue
        module = built[1]
        for name in ("eps", "momentum", "affine", "track_running_stats"):
            want, got = getattr(twin, name), getattr(module, name, "missing")
            if got != want:
                problems.append(f"{call}: {name} is {got!r}, nn.BatchNorm's is {want!r}")
        want_keys, got_keys = sorted(twin.state_dict()), sorted(module.state_dict())
        if got_keys != want_keys:
            problems.append(f"{call}: state_dict keys {got_keys}, nn.BatchNorm's {want_keys}")
    return problems


def run_legacy_state_dict(impl: Implementation, case: Case, device: str) -> list[str]:
    """A state_dict saved before num_batches_tracked existed (no key, no version metadata)
    loads as into nn.BatchNorm: the counter keeps its value."""
    problems: list[str] = []
    results = []
    for build in (lambda: _builtin_twin(case, device), lambda: make_module(impl, case, device)):
        module = build()
        _train_steps(module, case, device, steps=2)
        source = _builtin_twin(case, device)
        _train_steps(source, case, device, steps=1)
        legacy = {k: v for k, v in source.state_dict().items() if k != "num_batches_tracked"}
        outcome = _outcome(lambda module=module, legacy=legacy: module.load_state_dict(legacy))
        nbt = getattr(module, "num_batches_tracked", None)
        results.append(
            (outcome[0], outcome[1], None if nbt is None else int(nbt), module.state_dict())
        )
    (want, want_value, want_nbt, want_sd), (got, got_value, got_nbt, got_sd) = results
    if want != got:
        detail = _describe(got_value) if got == "raised" else "loaded"
        problems.append(
            f"load_state_dict(legacy state_dict): {detail}; nn.BatchNorm: "
            f"{_describe(want_value) if want == 'raised' else 'loads it'}"
        )
    elif got == "ok":
        if got_nbt != want_nbt:
            problems.append(
                f"num_batches_tracked after loading: {got_nbt}, nn.BatchNorm keeps {want_nbt}"
            )
        for key, value in want_sd.items():
            if key != "num_batches_tracked" and (
                key not in got_sd or not torch.equal(got_sd[key].cpu(), value.cpu())
            ):
                problems.append(f"{key}: not carried over from the legacy state_dict")
    return problems


def run_two_instances(impl: Implementation, case: Case, device: str) -> list[str]:
    first = make_module(impl, case, device)
    second = make_module(impl, case, device)
    before = {k: v.clone() for k, v in second.state_dict().items()}
    _train_steps(first, case, device)
    with torch.no_grad():
        for param in first.parameters():
            param.add_(1.0)
    problems = [
        f"{key}: changed in a second instance when the first one trained"
        for key, value in second.state_dict().items()
        if key in before and not torch.equal(value, before[key])
    ]
    x = make_input(case, 3, device)
    second.eval()
    fresh = make_module(impl, case, device).eval()
    with torch.no_grad():
        if not torch.equal(second(x), fresh(x)):
            problems.append("a second instance's eval output changed when the first trained")
    return problems


def run_module_dtype(impl: Implementation, case: Case, device: str) -> list[str]:
    """Parameters and buffers under dtype= and device='meta', as nn.BatchNorm makes them."""
    problems: list[str] = []
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        if dtype not in impl.supports_dtypes:
            continue
        twin = _builtin_twin(case, device, dtype=dtype)
        module = impl.make(
            dataclasses.replace(case.config(device), module_dtype=dtype),
            case.num_features,
            explicit_kwargs=case.module_kwargs(),
        )
        problems += _same_tensors(twin, module, f"dtype={dtype}")
    twin = _builtin_twin(case, "meta")
    outcome = _outcome(
        lambda: impl.factory(case.rank, case.num_features, device="meta", **case.module_kwargs())
    )
    if outcome[0] == "raised" and isinstance(outcome[1], CheckFailed):
        problems.append(f"device='meta': {outcome[1]}")
    elif outcome[0] == "raised":
        problems.append(f"device='meta': construction raised {_describe(outcome[1])}")
    else:
        problems += _same_tensors(twin, outcome[1], "device='meta'")
    return problems


def _same_tensors(twin: nn.Module, module: nn.Module, what: str) -> list[str]:
    problems = []
    expected = dict(twin.named_parameters()) | dict(twin.named_buffers())
    actual = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, tensor in expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"{what}: {name} missing")
        elif got.dtype != tensor.dtype or got.device.type != tensor.device.type:
            problems.append(
                f"{what}: {name} is {got.dtype} on {got.device.type}, nn.BatchNorm "
                f"makes {tensor.dtype} on {tensor.device.type}"
            )
    return problems


def run_copy_and_save(impl: Implementation, case: Case, device: str) -> list[str]:
    """deepcopy, pickle and torch.save/load of a trained module: same state, same outputs, and
    the copy's buffers are its own."""
    import io
    import pickle

    module = make_module(impl, case, device)
    _init_module_and_reference(impl, case, module)
    _train_steps(module, case, device)
    x = make_input(case, 5, device)
    module.eval()
    with torch.no_grad():
        expected = module(x)
    state = {k: v.clone() for k, v in module.state_dict().items()}

    def saved(m):
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)  # our own module, made in this process

    problems: list[str] = []
    for what, copier in (
        ("deepcopy", copy.deepcopy),
        ("pickle", lambda m: pickle.loads(pickle.dumps(m))),
        ("torch.save/load", saved),
    ):
        outcome = _outcome(lambda copier=copier: copier(module))
        if outcome[0] == "raised":
            problems.append(f"{what}: raised {_describe(outcome[1])}")
            continue
        twin = outcome[1]
        twin_state = twin.state_dict()
        if set(twin_state) != set(state) or not all(
            torch.equal(twin_state[k].cpu(), v.cpu()) for k, v in state.items()
        ):
            problems.append(f"{what}: the copy's state_dict differs from the original's")
            continue
        with torch.no_grad():
            got = _outcome(lambda twin=twin: twin(x))
        if got[0] == "raised" or not torch.equal(got[1], expected):
            problems.append(f"{what}: the copy's eval output differs from the original's")
        twin.train()
        _train_steps(twin, case, device, steps=1)
        if not all(torch.equal(module.state_dict()[k].cpu(), v.cpu()) for k, v in state.items()):
            problems.append(f"{what}: training the copy changed the original")
    return problems


def run_explore(impl: Implementation, case: Case, device: str) -> list[str]:
    """The model-based exploration (bnbench.explore) at this case's rank."""
    from bnbench.explore import SHRINK_SECONDS, explore, explore_seconds, fast_profile

    profile = {"shrink_seconds": SHRINK_SECONDS, **fast_profile()}
    if impl.deviation_for(case.id):
        # a declared deviation is expected to fail: finding it is enough, shrinking is not needed
        profile["shrink_seconds"] = 0.0
    found = explore(impl, device, case.rank, seconds=explore_seconds(), **profile)
    if found.ok:
        return []
    return [
        f"exploration ({found.examples} sequences): {found.message}",
        "reproducer (runs the implementation and nn.BatchNorm side by side):",
        *found.reproducer.splitlines(),
    ]


RUNNERS = {
    "steps": run_steps,
    "gradcheck": run_gradcheck,
    "defaults": run_defaults,
    "reset": run_reset,
    "state_dict": run_state_dict,
    "error": run_error,
    "wrong_channels": run_wrong_channels,
    "legacy_state_dict": run_legacy_state_dict,
    "two_instances": run_two_instances,
    "module_dtype": run_module_dtype,
    "copy_and_save": run_copy_and_save,
    "explore": run_explore,
    "forward_ad": run_forward_ad,
    "positional": run_positional,
}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:300] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" [{last.filename}:{last.lineno}]"


def tolerant_constructor(impl: Implementation) -> Implementation:
    """``impl`` with a factory that copes with a constructor lacking some of nn.BatchNorm's
    arguments (a hand-written class without ``device``/``dtype``, or without torch 2.13's
    keyword-only ``bias``).

    The choice: such a class is still checked wherever it can be, not failed wholesale. When the
    factory raises TypeError, which of nn.BatchNorm's arguments it does not take is found once
    (bnbench.diagnose.constructor_gaps); those asked for at their default (device cpu, dtype
    float32, an eps of 1e-5...) are left out and the module is built without them, so every
    CPU float32 case runs as for any implementation. A case that needs another value (a float64
    or float16 module, device 'meta' or 'cuda', bias=False) fails, with the TypeError (the same
    line in every such case, so the report groups them as one cause), what the case needs and
    the signature to give the class: not taking nn.BatchNorm's constructor is a departure from
    it, so those cases fail rather than count as not supported. A factory that takes every
    argument it is given is called exactly as before."""
    factory = impl.factory

    def build(rank: int, num_features: int, *args, **kwargs) -> nn.Module:
        try:
            return factory(rank, num_features, *args, **kwargs)
        except TypeError as exc:
            gaps = constructor_gaps(factory, rank)
            left_out = [k for k in kwargs if gaps is not None and k in gaps.missing]
            if gaps is None or not left_out:
                raise
            needed = {k: kwargs[k] for k in left_out if not is_default_argument(k, kwargs[k])}
            if needed:
                raise CheckFailed(missing_arguments_message(gaps, needed, exc)) from exc
            kept = {k: v for k, v in kwargs.items() if k not in left_out}
            return factory(rank, num_features, *args, **kept)

    return dataclasses.replace(impl, factory=build)


def run_case(impl: Implementation, case: Case, device: str) -> Outcome:
    """Run ``case`` on ``impl``: a misbehaving implementation gives a failure, never raises."""
    reasons = impl.not_supported_reasons(case.config(device))
    if reasons:
        return Outcome(UNSUPPORTED, "; ".join(reasons))
    impl = tolerant_constructor(impl)
    try:
        problems = RUNNERS[case.kind](impl, case, device)
    except CheckFailed as exc:
        problems = [str(exc)]
    except Exception as exc:  # the implementation may fail in any way
        problems = [f"raised {_describe(exc)}{_where(exc)}"]
    if problems:
        return Outcome(FAIL, "\n".join(problems))
    return Outcome(PASS)
