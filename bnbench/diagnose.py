"""Diagnoses: what a failure's numbers say about its cause, what a constructor lacks, and
failures grouped by root cause.

A comparison against the float64 oracle says *that* a tensor differs. Most slips in a
hand-written BatchNorm are one of a few well-known ones (the biased variance in running_var,
momentum the wrong way round, eps outside the square root, batch statistics in eval...), and
each leaves a signature in the numbers: the tensor the implementation produced equals what the
oracle produces with that slip. So where a comparison failed, :func:`output_hint` and
:func:`statistic_hint` recompute the tensor under each known slip, in float64 from the very
values the implementation received, and when the implementation's tensor, which did not match
the truth, matches one of them (within the tolerance and rounding allowance the comparison
used, on every element), they name the slip in one line (``hint: ...``). Candidates are
computed only when a comparison already failed (what they start from, the oracle's per-channel
state before the call, is kept for every call: a few small copies), and a hint never changes a
verdict.

:func:`constructor_problem` says once, up front, which of nn.BatchNorm's constructor arguments
an implementation does not take (``device``, ``dtype``, torch 2.13's ``bias``...), with the
signature it should have. :func:`group_failures` folds the failures one root cause produces in
many cases into one entry.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from bnbench.tolerances import outside_tolerance

HINT_PREFIX = "hint: "

# ---------------------------------------------------------------------------------------------
# The constructor


def _constructor_signature() -> inspect.Signature:
    """nn.BatchNorm's constructor signature as the installed torch has it, without annotations
    (what a user is advised to give their class)."""
    signature = inspect.signature(nn.BatchNorm2d.__init__)
    return signature.replace(
        parameters=[
            p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()
        ],
        return_annotation=inspect.Signature.empty,
    )


BATCHNORM_SIGNATURE = _constructor_signature()
# The arguments after num_features, with their defaults: eps, momentum, affine,
# track_running_stats, device, dtype (and the keyword-only bias where torch has it).
CONSTRUCTOR_DEFAULTS: dict[str, Any] = {
    name: p.default
    for name, p in BATCHNORM_SIGNATURE.parameters.items()
    if name not in ("self", "num_features") and p.default is not inspect.Parameter.empty
}


def advised_signature(init_name: str) -> str:
    """``init_name`` (``MyBN.__init__``) followed by nn.BatchNorm's constructor signature."""
    return f"{init_name}{BATCHNORM_SIGNATURE}"


def is_default_argument(name: str, value: Any) -> bool:
    """Whether passing ``name=value`` asks nothing of the constructor that leaving it out
    does not: nn.BatchNorm's default (a CPU device and the default dtype count as the defaults
    None stands for)."""
    if name == "device":
        try:
            return value is None or torch.device(value) == torch.device("cpu")
        except (TypeError, RuntimeError, ValueError):
            return False
    if name == "dtype":
        return value is None or value == torch.get_default_dtype()
    default = CONSTRUCTOR_DEFAULTS.get(name, inspect.Parameter.empty)
    return type(value) is type(default) and value == default


@dataclass(frozen=True)
class ConstructorGaps:
    """What an implementation's constructor lacks: the name of its ``__init__`` (as a
    TypeError names it) and nn.BatchNorm's arguments it does not take."""

    init_name: str
    missing: tuple[str, ...]


# (id(factory), rank) -> (factory, gaps): detected once per process; the factory is kept so
# its id cannot be reused by another object.
_GAPS: dict[tuple[int, int], tuple[Callable[..., Any], ConstructorGaps | None]] = {}


def constructor_gaps(factory: Callable[..., nn.Module], rank: int) -> ConstructorGaps | None:
    """Which of nn.BatchNorm's constructor arguments ``factory(rank, num_features, ...)`` does
    not take, found by trying: a module built with none of them, then one built with each
    argument at nn.BatchNorm's default; one that raises TypeError only with the argument is not
    taken. None when it cannot be told (the factory fails without arguments too). Cached per
    factory and rank: it builds a few modules, once."""
    key = (id(factory), rank)
    cached = _GAPS.get(key)
    if cached is not None and cached[0] is factory:
        return cached[1]
    gaps: ConstructorGaps | None = None
    try:
        module = factory(rank, 3)
    except Exception:  # an implementation may fail in any way: nothing can be told
        module = None
    if module is not None:
        missing = []
        for name, default in CONSTRUCTOR_DEFAULTS.items():
            try:
                factory(rank, 3, **{name: default})
            except TypeError:
                missing.append(name)
            except Exception:  # takes the argument, and fails for another reason
                pass
        init = getattr(type(module).__init__, "__qualname__", "")
        init_name = init if init.endswith("__init__") else f"{type(module).__name__}.__init__"
        gaps = ConstructorGaps(init_name, tuple(missing))
    _GAPS[key] = (factory, gaps)
    return gaps


def missing_arguments_message(
    gaps: ConstructorGaps, needed: Mapping[str, Any], error: BaseException
) -> str:
    """The failure of a case that needs constructor arguments the implementation does not take:
    the TypeError it raised (the same line in every such case, so they group as one), then what
    this case needs and the signature to give the class."""
    text = str(error).strip().splitlines()
    first = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    wanted = ", ".join(f"{k}={v!r}" for k, v in needed.items())
    return (
        f"raised {first}\n"
        f"{gaps.init_name} does not take nn.BatchNorm's {', '.join(gaps.missing)} "
        f"argument(s): cases that need only their defaults are checked without them, this one "
        f"needs {wanted}. nn.BatchNorm's signature: {advised_signature(gaps.init_name)}"
    )


# What a case may need of an argument other than its default (for constructor_problem).
_NEEDS = {
    "device": "device 'meta' or 'cuda'",
    "dtype": "a float64 or float16 module",
    "bias": "bias=False",
    "momentum": "momentum=None or another momentum",
}


def constructor_problem(impl: Any) -> str | None:
    """One line on what ``impl``'s constructor lacks of nn.BatchNorm's (None: nothing, or it
    cannot be told here), to print once before a run: which arguments it does not take, what
    bnbench does about it, and the signature it should have, derived from the installed torch's
    nn.BatchNorm. It builds modules, so call it where the implementation's code may run: a
    stand-in for code imported in a probe process (``impl.load_error``, or a factory that only
    workers can call) gives None."""
    if getattr(impl, "load_error", ""):
        return None
    for rank in sorted(impl.supports_ranks):
        gaps = constructor_gaps(impl.factory, rank)
        if gaps is None or not gaps.missing:
            continue
        needs = ", ".join(_NEEDS.get(name, f"another {name}") for name in gaps.missing)
        return (
            f"{gaps.init_name} does not take nn.BatchNorm's {', '.join(gaps.missing)} "
            "argument(s): bnbench builds it without them wherever only their default is asked "
            f"for and checks it there, and fails each case that needs another value ({needs}). "
            f"Give it nn.BatchNorm's signature: {advised_signature(gaps.init_name)}"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Hints from the numbers


@dataclass(frozen=True)
class StepState:
    """What the oracle knew just before one call of the module: enough to recompute, under
    each known slip, the tensor a slipped implementation would have produced.

    ``built``: the eps and momentum the module was constructed with; ``attributes``: the
    module's own ``eps`` and ``momentum`` attributes where it has them as numbers (a wrong
    constructor default shows there)."""

    x: torch.Tensor  # the input, float64 on the CPU, detached
    training: bool
    eps: float
    momentum: float | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: int | None
    track_running_stats: bool
    built: Mapping[str, Any] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def batch_stats(self) -> bool:
        """Whether nn.BatchNorm normalizes this call with the batch's statistics."""
        return self.training or (self.running_mean is None and self.running_var is None)

    @property
    def updates(self) -> bool:
        """Whether nn.BatchNorm updates the running statistics in this call."""
        return (
            self.training
            and self.track_running_stats
            and self.running_mean is not None
            and self.running_var is not None
            and self.x.numel() > 0
        )

    @property
    def factor(self) -> float:
        """The weight nn.BatchNorm gives this batch in the running statistics."""
        if self.momentum is None:
            return 1.0 / ((self.num_batches_tracked or 0) + 1)
        return self.momentum


def _number_attributes(module: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ("eps", "momentum"):
        try:
            value = getattr(module, name)
        except Exception:  # a module may have anything, or nothing, under that name
            continue
        if value is None and name == "momentum":
            found[name] = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def step_state(
    ref: Any, x: torch.Tensor, training: bool, *, built: Mapping[str, Any], module: Any = None
) -> StepState:
    """Snapshot the oracle ``ref`` (a ReferenceBatchNorm) before it runs the call on ``x``."""

    def copy(t):
        return None if t is None else t.detach().clone()

    return StepState(
        x=x.detach().to("cpu", torch.float64),
        training=training,
        eps=ref.eps,
        momentum=ref.momentum,
        weight=copy(ref.weight),
        bias=copy(ref.bias),
        running_mean=copy(ref.running_mean),
        running_var=copy(ref.running_var),
        num_batches_tracked=ref.num_batches_tracked,
        track_running_stats=ref.track_running_stats,
        built=dict(built),
        attributes=_number_attributes(module) if module is not None else {},
    )


def explains(
    actual: Any,
    truth: torch.Tensor,
    candidate: torch.Tensor,
    dtype: torch.dtype,
    statistics: bool = False,
    condition: torch.Tensor | None = None,
) -> bool:
    """Whether ``candidate`` explains ``actual``, with the tolerance and rounding allowance of
    the comparison that failed: ``actual`` is outside the tolerance of ``truth`` somewhere; the
    candidate is too, on every element where ``actual`` is (the slip would have failed there
    itself: a candidate the tolerance cannot tell from the truth explains nothing); and
    ``actual`` is within the tolerance of ``candidate`` everywhere (not only where the truth
    was missed: a slip that shows on one channel must leave the others as the candidate has
    them, so that another bug whose wrong elements happen to fit is not given its name)."""
    if not isinstance(actual, torch.Tensor) or tuple(actual.shape) != tuple(truth.shape):
        return False
    if tuple(candidate.shape) != tuple(truth.shape) or actual.numel() == 0:
        return False
    wrong = outside_tolerance(actual, truth, dtype, statistics, condition)
    if not bool(wrong.any()):
        return False
    if bool((wrong & ~outside_tolerance(candidate, truth, dtype, statistics, condition)).any()):
        return False
    return not bool(outside_tolerance(actual, candidate, dtype, statistics, condition).any())


@dataclass(frozen=True)
class Slip:
    """A known slip: its ``cause`` (a few words, the name a group of failures gets),
    ``evidence`` (what the numbers show, and what nn.BatchNorm does instead), and ``make``:
    the tensor an implementation with that slip produces, recomputed in float64."""

    cause: str
    evidence: str
    make: Callable[[], torch.Tensor]


def _name(slips: Iterable[Slip], fits: Callable[[torch.Tensor], bool]) -> str | None:
    """The hint for the slips whose tensor ``fits``: the first one's cause and evidence, and
    the causes of the others that fit as well (a tolerance can leave two slips apart by less
    than it allows: they are named, not chosen between)."""
    found = [slip for slip in slips if fits(slip.make())]
    if not found:
        return None
    first = found[0]
    others = list(dict.fromkeys(f.cause for f in found[1:] if f.cause != first.cause))
    also = f" (also fits: {', '.join(others)})" if others else ""
    return f"{first.cause}: {first.evidence}{also}"


def _dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _view(s: StepState) -> tuple[int, ...]:
    return (1, s.x.shape[1]) + (1,) * (s.x.dim() - 2)


def _affine(s: StepState, y: torch.Tensor) -> torch.Tensor:
    if s.weight is not None:
        y = y * s.weight.view(_view(s))
    if s.bias is not None:
        y = y + s.bias.view(_view(s))
    return y


def _normalized(
    s: StepState,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float | None = None,
    eps_outside: bool = False,
) -> torch.Tensor:
    """y as nn.BatchNorm computes it from ``mean`` and ``var`` (broadcastable to x), with
    ``eps`` (the step's unless given) inside the square root, or outside it."""
    e = s.eps if eps is None else eps
    std = torch.sqrt(var) + e if eps_outside else torch.sqrt(var + e)
    return _affine(s, (s.x - mean) / std)


def _moments(s: StepState, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of the input over ``dims`` (kept broadcastable)."""
    mean = s.x.mean(dims, keepdim=True)
    return mean, ((s.x - mean) ** 2).mean(dims, keepdim=True)


def _fmt(value: Any) -> str:
    return repr(value) if value is None else f"{value:g}"


def _eps_slips(s: StepState, mean: torch.Tensor, var: torch.Tensor) -> list[Slip]:
    """An eps other than this step's: the one the module was built with (a later assignment
    ignored), nn.BatchNorm's default (the argument ignored), the module's own attribute (a
    wrong constructor default), none at all."""
    slips = []
    built = s.built.get("eps")
    default = CONSTRUCTOR_DEFAULTS["eps"]
    attribute = s.attributes.get("eps")
    if built is not None and built != s.eps:
        slips.append(
            Slip(
                "module.eps assigned after construction is ignored",
                f"the output matches the constructor's eps={_fmt(built)}, not the current "
                f"eps={_fmt(s.eps)}",
                lambda: _normalized(s, mean, var, eps=built),
            )
        )
    if default != s.eps:
        slips.append(
            Slip(
                "eps argument ignored",
                f"the output matches nn.BatchNorm's default eps={_fmt(default)}, not the "
                f"module's eps={_fmt(s.eps)}",
                lambda: _normalized(s, mean, var, eps=default),
            )
        )
    if attribute is not None and attribute != s.eps:
        slips.append(
            Slip(
                "wrong eps",
                f"the output matches eps={_fmt(attribute)} (the module's own eps attribute), "
                f"nn.BatchNorm's is eps={_fmt(s.eps)}: a different constructor default?",
                lambda: _normalized(s, mean, var, eps=attribute),
            )
        )
    slips.append(
        Slip(
            "eps left out",
            "the output matches (x - mean) / sqrt(var), nn.BatchNorm divides by sqrt(var + eps)",
            lambda: _normalized(s, mean, var, eps=0.0),
        )
    )
    return slips


def _normalized_over(s: StepState, dims: list[int]) -> Callable[[], torch.Tensor]:
    return lambda: _normalized(s, *_moments(s, dims))


def _wrong_dims(s: StepState) -> list[tuple[list[int], str]]:
    """Reductions other than nn.BatchNorm's (each channel over the batch and spatial dims),
    with what each means."""
    r = s.x.dim()
    options = []
    if r > 2:
        options.append((list(range(2, r)), "per sample and channel (as InstanceNorm)"))
        options.append(([0], "per channel and position (the batch dim alone)"))
    options.append((list(range(1, r)), "per sample across the channels (as LayerNorm)"))
    options.append((list(range(r)), "across the whole input"))
    return options


def output_slips(s: StepState) -> list[Slip]:
    """The known slips that show in the output of the call ``s`` describes, most specific
    first."""
    if s.x.numel() == 0:
        return []
    view = _view(s)
    if s.batch_stats:
        mean, var = _moments(s, _dims(s.x))
    elif s.running_mean is not None and s.running_var is not None:
        mean, var = s.running_mean.view(view), s.running_var.view(view)
    else:  # pragma: no cover - the oracle has running statistics or uses the batch's
        return []
    where = "this batch's" if s.batch_stats else "the running"
    slips = [
        Slip(
            "eps added outside the square root",
            f"the output matches (x - mean) / (sqrt(var) + eps) with {where} statistics, "
            "nn.BatchNorm divides by sqrt(var + eps)",
            lambda: _normalized(s, mean, var, eps_outside=True),
        )
    ]
    n = s.x.numel() // s.x.shape[1]
    if s.batch_stats and n > 1:
        slips.append(
            Slip(
                "unbiased variance used to normalize (n/(n-1))",
                "the output matches the batch variance times n/(n-1), nn.BatchNorm normalizes "
                "with the biased variance and keeps the unbiased one for running_var",
                lambda: _normalized(s, mean, var * n / (n - 1)),
            )
        )
    slips += _eps_slips(s, mean, var)
    if not s.batch_stats:
        slips.append(
            Slip(
                "eval used the batch statistics",
                "the output matches normalizing with this batch's mean and variance, "
                "nn.BatchNorm's eval uses running_mean and running_var",
                lambda: _normalized(s, *_moments(s, _dims(s.x))),
            )
        )
        return slips
    channel_dims = tuple(_dims(s.x))
    for dims, meaning in _wrong_dims(s):
        slips.append(
            Slip(
                "statistics over the wrong dimensions",
                f"the output matches mean and variance taken {meaning}, over dims "
                f"{tuple(dims)}: nn.BatchNorm takes them per channel, over dims {channel_dims}",
                _normalized_over(s, dims),
            )
        )
    if s.training and s.running_mean is not None and s.running_var is not None:
        rm, rv = s.running_mean.view(view), s.running_var.view(view)
        slips.append(
            Slip(
                "a training-mode call used the running statistics",
                "the output matches normalizing with running_mean and running_var as eval "
                "does, nn.BatchNorm uses the batch's whenever module.training is True, "
                "whatever the grad mode",
                lambda: _normalized(s, rm, rv),
            )
        )
    return slips


def output_hint(
    s: StepState,
    actual: Any,
    expected: torch.Tensor,
    dtype: torch.dtype,
    condition: torch.Tensor | None = None,
) -> str | None:
    """The hint for an output ``actual`` that departs from the oracle's ``expected``: the
    known slips (:func:`output_slips`) whose output it matches, with the tolerance and rounding
    ``condition`` of the failed comparison; None when none does."""
    return _name(
        output_slips(s),
        lambda candidate: explains(actual, expected, candidate, dtype, condition=condition),
    )


def _moved(old: torch.Tensor, batch: torch.Tensor, factor: float) -> torch.Tensor:
    return (1 - factor) * old + factor * batch


def statistic_slips(s: StepState, name: str) -> list[Slip]:
    """The known slips that show in running statistic ``name`` (running_mean | running_var)
    after the call ``s`` describes, most specific first."""
    old = {"running_mean": s.running_mean, "running_var": s.running_var}.get(name)
    if old is None or not s.training or s.x.numel() == 0:
        return []
    c = s.x.shape[1]
    mean, biased = (t.reshape(c) for t in _moments(s, _dims(s.x)))
    n = s.x.numel() // c
    if n < 2:
        return []
    unbiased = biased * n / (n - 1)
    batch = mean if name == "running_mean" else unbiased
    m = s.momentum
    if not s.updates:
        if s.track_running_stats or m is None:
            return []
        return [
            Slip(
                "track_running_stats=False set after construction is ignored",
                "the running statistics still moved with this batch, nn.BatchNorm leaves them "
                "as they are",
                lambda: _moved(old, batch, m),
            )
        ]
    f = s.factor
    slips = []
    if name == "running_var":
        slips.append(
            Slip(
                "biased variance in running_var (n/(n-1))",
                "it matches the update with the biased batch variance, nn.BatchNorm's "
                "running_var takes the unbiased one",
                lambda: _moved(old, biased, f),
            )
        )
        slips.append(
            Slip(
                "batch variance corrected twice in running_var (n/(n-1) twice)",
                "it matches the update with the unbiased variance times n/(n-1) again: was "
                "the unbiased variance taken as the batch variance (to normalize with too)?",
                lambda: _moved(old, unbiased * n / (n - 1), f),
            )
        )
    cumulative = 1.0 / ((s.num_batches_tracked or 0) + 1)
    if m == 0:
        slips.append(
            Slip(
                "momentum=0 taken for None",
                "the running statistics follow the cumulative average 1/num_batches_tracked: "
                "is momentum tested for truth rather than `is None`?",
                lambda: _moved(old, batch, cumulative),
            )
        )
    # momentum=1 inverted is "never moves", which says nothing of the momentum; 0.5 is its
    # own inverse
    if m is not None and 0 <= m < 1 and m != 0.5:
        slips.append(
            Slip(
                "momentum inverted (1-m)",
                "the running statistics match new = m*old + (1-m)*batch, nn.BatchNorm's "
                "update is new = (1-m)*old + m*batch",
                lambda: _moved(old, batch, 1 - m),
            )
        )
    default = CONSTRUCTOR_DEFAULTS["momentum"]
    if m is None:
        slips.append(
            Slip(
                "momentum=None ignored",
                f"the running statistics moved with the default momentum={_fmt(default)}, "
                "not the cumulative average 1/num_batches_tracked",
                lambda: _moved(old, batch, default),
            )
        )
    built = s.built.get("momentum", m)
    if built != m:
        by = 1.0 / ((s.num_batches_tracked or 0) + 1) if built is None else built
        slips.append(
            Slip(
                "module.momentum assigned after construction is ignored",
                f"the running statistics moved with the constructor's momentum={_fmt(built)}, "
                f"not the current momentum={_fmt(m)}",
                lambda: _moved(old, batch, by),
            )
        )
    if m is not None and m != default:
        slips.append(
            Slip(
                "momentum argument ignored",
                f"the running statistics moved with nn.BatchNorm's default "
                f"momentum={_fmt(default)}, not the module's momentum={_fmt(m)}",
                lambda: _moved(old, batch, default),
            )
        )
    attribute = s.attributes.get("momentum", m)
    if attribute is not None and attribute != m:
        slips.append(
            Slip(
                "wrong momentum",
                f"the running statistics moved with momentum={_fmt(attribute)} (the module's "
                f"own momentum attribute), nn.BatchNorm's is momentum={_fmt(m)}: a different "
                "constructor default?",
                lambda: _moved(old, batch, attribute),
            )
        )
    return slips


def statistic_hint(
    s: StepState, name: str, actual: Any, expected: torch.Tensor, dtype: torch.dtype
) -> str | None:
    """The hint for running statistic ``name`` when ``actual`` departs from the oracle's
    ``expected`` (after the call): the known slips (:func:`statistic_slips`) whose update it
    matches, with the statistics tolerance of ``dtype``; None when none does."""
    return _name(
        statistic_slips(s, name),
        lambda candidate: explains(actual, expected, candidate, dtype, statistics=True),
    )


def with_hint(problem: str, hint: str | None) -> str:
    """``problem`` with the hint, if any, as a line of its own after it."""
    return problem if not hint else f"{problem}\n{HINT_PREFIX}{hint}"


def hints_in(message: str) -> list[str]:
    """The hints in a failure message, in order, each once. (A hint line ends at "; " too:
    the exploration joins one call's problems with it.)"""
    found: dict[str, None] = {}
    for line in message.splitlines():
        if line.startswith(HINT_PREFIX):
            found[line[len(HINT_PREFIX) :].split("; ")[0].strip()] = None
    return list(found)


# ---------------------------------------------------------------------------------------------
# Grouping by root cause


@dataclass
class Group:
    """Failures of one implementation@device (and verdict) with one root cause.

    ``cause``: one line naming it (the hint's cause where the messages carry a hint, else the
    first line of the first message); ``cases``: the case ids it covers, in run order;
    ``example``: one message in full; ``hint``: the first case's hint, if any; ``results``:
    the results themselves."""

    cause: str
    implementation: str
    device: str
    verdict: str
    cases: list[str]
    example: str
    hint: str | None = None
    results: list[Any] = field(default_factory=list)


_LOCATION = re.compile(r" \[[^\]\n]*:\d+\]")
_RAISED = re.compile(r"\braised ([A-Za-z_][\w.]*)(.*)$")


def normalized(text: str) -> str:
    """``text`` with what differs between cases of one cause taken out: numbers (digits,
    decimals, exponents, nan, inf), indices and shapes (a tuple of numbers) and locations
    (`` [file:line]``), whitespace collapsed."""
    text = _LOCATION.sub("", text)
    text = re.sub(r"\d+", "#", text)
    text = re.sub(r"[-+]?(?:#(?:\.#)?(?:[eE][-+]?#)?|\b(?:nan|inf)\b)", "#", text)
    text = re.sub(r"[(\[]\s*#(?:\s*,\s*#)*\s*,?\s*[)\]]", "(#)", text)
    return re.sub(r"\s+", " ", text).strip()


def cause_key(message: str) -> str:
    """What the failure messages of one root cause share. A message with a hint: the first
    hint's cause (the first tensor that went wrong names it, whatever else the case shows). One
    whose first line says something raised: the exception's type and text, wherever it was
    raised (forward, backward, construction). Any other: its first line :func:`normalized` (the
    first problem a case meets is the symptom; which other tensors differ after it depends on
    the case's configuration, and the exploration's reproducer is the case's own code)."""
    hints = hints_in(message)
    if hints:
        return "hint: " + hints[0].split(": ")[0]
    first = _LOCATION.sub("", message.splitlines()[0]) if message else ""
    raised = _RAISED.search(first)
    if raised:
        return "raised: " + normalized(raised.group(1) + raised.group(2))
    return "message: " + normalized(first)


def _cause_line(message: str) -> str:
    hints = hints_in(message)
    if hints:
        return hints[0].split(": ")[0]
    first = _LOCATION.sub("", message.splitlines()[0]) if message else ""
    first = first.split("; max abs diff")[0]
    return first if len(first) <= 240 else first[:237] + "..."


def group_failures(results: Iterable[Any]) -> list[Group]:
    """The failures among ``results`` (bnbench.gate.Result objects; a fail or an unexpected
    pass, as print_details lists them), grouped by root cause (:func:`cause_key`) within each
    implementation@device and verdict, in the order each cause first appears: a cause that
    shows in 40 cases is one entry."""
    groups: dict[tuple[str, str, str, str], Group] = {}
    for r in results:
        if r.ok:
            continue
        verdict = str(r.verdict)
        key = (r.implementation, r.device, verdict, cause_key(r.message))
        group = groups.get(key)
        if group is None:
            hints = hints_in(r.message)
            group = groups[key] = Group(
                cause=_cause_line(r.message),
                implementation=r.implementation,
                device=r.device,
                verdict=verdict,
                cases=[],
                example=r.message,
                hint=hints[0] if hints else None,
            )
        group.cases.append(r.case)
        group.results.append(r)
    return list(groups.values())
