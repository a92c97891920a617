"""Runs one case on one implementation and says what differs from the oracle.

``run_case`` never raises for a misbehaving implementation: an exception, a NaN or a wrong value
becomes a failure message naming the step, the tensor and the difference.
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass

import torch
from torch import nn

from bnbench.cases import Case
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
    g = _generator(case, step)
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    mean = (torch.rand(channels, generator=g, dtype=torch.float64) * 2 - 1) + 0.25 * step
    std = torch.rand(channels, generator=g, dtype=torch.float64) * 1.5 + 0.2
    std[-1] = 0.01
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
        case.num_features, case.eps, case.momentum, case.affine, case.track_running_stats
    )


def _init_module_and_reference(impl: Implementation, case: Case, module: nn.Module):
    """Give ``module`` and a fresh oracle the same non-trivial weight, bias (and stats)."""
    ref = _reference(case)
    values = make_params(case)
    state = impl.state(module)
    if case.affine:
        _set(state["weight"], values["weight"], "weight")
        _set(state["bias"], values["bias"], "bias")
        ref.weight = values["weight"].clone()
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


def _check_state(impl, case, module, ref, problems):
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
        problem = compare_tensors(
            name, actual, expected, working_dtype(case.dtype, case.module_dtype), statistics=True
        )
        if problem:
            problems.append(problem)
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


def run_steps(impl: Implementation, case: Case, device: str) -> list[str]:
    module = make_module(impl, case, device)
    ref = _init_module_and_reference(impl, case, module)
    raw = impl.state is _default_state
    for i, step in enumerate(case.steps):
        problems: list[str] = []
        if case.stop_tracking_after == i:
            setattr(module, "track_running_stats", False)  # noqa: B010 (nn.Module attribute)
            ref.stop_tracking()
        training = step.startswith("train")
        grad_enabled = not step.endswith("nograd")
        backward = grad_enabled and case.backward
        module.train(training)
        module.zero_grad(set_to_none=True)
        x = make_input(case, i, device)
        x_before = x.clone()
        x_in = x.detach().requires_grad_(backward)
        try:
            with torch.set_grad_enabled(grad_enabled):
                y = module(x_in)
        except Exception as exc:
            raise CheckFailed(f"step {i} ({step}): forward raised {_describe(exc)}") from exc

        x64 = x.detach().to("cpu", torch.float64).requires_grad_(backward)
        ref_inputs = [x64]
        if case.affine:
            ref.weight.requires_grad_(backward)
            ref.bias.requires_grad_(backward)
            ref_inputs += [ref.weight, ref.bias]
        with torch.set_grad_enabled(backward):
            y_ref, _ = ref.forward(x64, training)

        if not isinstance(y, torch.Tensor):
            raise CheckFailed(f"step {i} ({step}): forward returned {type(y).__name__}")
        if y.dtype != x.dtype:
            problems.append(f"output: dtype {y.dtype}, expected the input's {x.dtype}")
        if y.device != x.device:
            problems.append(f"output: on {y.device}, expected {x.device}")
        fmt = _memory_format(case, x.dim())
        if fmt is not None and not y.is_contiguous(memory_format=fmt):
            problems.append(f"output: not in the input's memory format {fmt}")
        problem = compare_tensors("output", y, y_ref, case.dtype)
        if problem:
            problems.append(problem)

        if backward:
            grad_out = make_grad_output(case, i, x)
            try:
                y.backward(grad_out)
            except Exception as exc:
                raise CheckFailed(f"step {i} ({step}): backward raised {_describe(exc)}") from exc
            expected = torch.autograd.grad(
                y_ref, ref_inputs, grad_out.to("cpu", torch.float64), allow_unused=True
            )
            problem = compare_tensors("input grad", x_in.grad, expected[0], case.dtype)
            if problem:
                problems.append(problem)
            if (
                fmt is not None
                and x_in.grad is not None
                and not x_in.grad.is_contiguous(memory_format=fmt)
            ):
                problems.append(f"input grad: not in the input's memory format {fmt}")
            if case.affine:
                state = impl.state(module)
                for name, exp in zip(("weight", "bias"), expected[1:]):
                    param = state[name]
                    actual = None if param is None else param.grad
                    if actual is not None:
                        if actual.dtype != case.module_dtype:
                            problems.append(
                                f"{name} grad: dtype {actual.dtype}, expected {case.module_dtype}"
                            )
                        if not raw:
                            actual = actual.reshape(exp.shape)
                    problem = compare_tensors(
                        f"{name} grad", actual, exp, working_dtype(case.dtype, case.module_dtype)
                    )
                    if problem:
                        problems.append(problem)
            ref.weight = ref.weight.detach() if case.affine else None
            ref.bias = ref.bias.detach() if case.affine else None

        if not torch.equal(x, x_before):
            problems.append("input: modified in place by the implementation")
        _check_state(impl, case, module, ref, problems)
        if problems:
            return [f"step {i} ({step}): {p}" for p in problems]
    return []


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
        for name, value in (("weight", 1.0), ("bias", 0.0)):
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
    expected_keys = set()
    if case.affine:
        expected_keys |= {"weight", "bias"}
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


def _builtin_twin(case: Case, device: str) -> nn.Module:
    return RANK_TO_BUILTIN[case.rank](
        case.num_features, device=device, dtype=case.module_dtype, **case.module_kwargs()
    )


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
    module = make_module(impl, case, device)
    module.train(case.steps[0] == "train")
    x = make_input(case, 0, device)
    try:
        module(x)
    except ValueError as exc:
        if str(exc) != case.error:
            return [f"raised ValueError({str(exc)!r}), expected message {case.error!r}"]
        return []
    except Exception as exc:
        return [f"raised {_describe(exc)}, expected ValueError({case.error!r})"]
    return [f"returned an output, expected ValueError({case.error!r})"]


RUNNERS = {
    "steps": run_steps,
    "gradcheck": run_gradcheck,
    "defaults": run_defaults,
    "reset": run_reset,
    "state_dict": run_state_dict,
    "error": run_error,
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


def run_case(impl: Implementation, case: Case, device: str) -> Outcome:
    """Run ``case`` on ``impl``: a misbehaving implementation gives a failure, never raises."""
    reasons = impl.not_supported_reasons(case.config(device))
    if reasons:
        return Outcome(UNSUPPORTED, "; ".join(reasons))
    try:
        problems = RUNNERS[case.kind](impl, case, device)
    except CheckFailed as exc:
        problems = [str(exc)]
    except Exception as exc:  # the implementation may fail in any way
        problems = [f"raised {_describe(exc)}{_where(exc)}"]
    if problems:
        return Outcome(FAIL, "\n".join(problems))
    return Outcome(PASS)
