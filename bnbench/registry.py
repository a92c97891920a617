"""The plug-in interface: what an implementation is, what it supports, and how it is found.

An :class:`Implementation` wraps a factory that builds a BatchNorm module for an input rank, with
nn.BatchNorm's constructor arguments, plus declarations of what it supports and how it knowingly
departs from nn.BatchNorm. Built-ins and third-party packages register through the entry-point
group ``bnbench.implementations``; ``MODULE:ATTR`` names one ad hoc.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.metadata
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from bnbench.cases import Case

ENTRY_POINT_GROUP = "bnbench.implementations"

ALL_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
ALL_RANKS = frozenset({2, 3, 4, 5})
ALL_MEMORY_FORMATS = frozenset({"contiguous", "channels_last", "non_contiguous"})
ALL_DEVICES = frozenset({"cpu", "cuda"})

# nn.BatchNorm class per input rank: BatchNorm1d takes (N, C) and (N, C, L).
RANK_TO_BUILTIN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class UsageError(Exception):
    """A user named something that cannot be used (unknown implementation, bad module...)."""


def _default_state(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: getattr(module, name, None)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }


@dataclass(frozen=True)
class Implementation:
    """A BatchNorm implementation under test.

    factory(rank, num_features, eps=..., momentum=..., affine=..., track_running_stats=...,
    device=..., dtype=...) returns a module for inputs of that rank (2 to 5).

    Capabilities say what it supports; a case outside them is skipped with the reason.
    ``deviations`` maps case-id patterns (fnmatch) to the reason the implementation knowingly
    differs from nn.BatchNorm there: such a case is expected to fail, and passing is an error.
    ``state`` maps a module to its tensors by role (weight, bias, running_mean, running_var,
    num_batches_tracked) for implementations that name or shape them differently; the checks of
    the module's public interface (defaults, state_dict) never go through it.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str = ""
    devices: frozenset[str] = ALL_DEVICES
    dtypes: frozenset[torch.dtype] = ALL_DTYPES
    ranks: frozenset[int] = ALL_RANKS
    momentum_none: bool = True
    affine_false: bool = True
    no_running_stats: bool = True
    memory_formats: frozenset[str] = ALL_MEMORY_FORMATS
    backward: bool = True
    double_backward: bool = True
    rank_specific: bool = True
    deviations: Mapping[str, str] = field(default_factory=dict)
    state: Callable[[nn.Module], dict[str, torch.Tensor | None]] = _default_state
    extra_unsupported: Callable[["Case"], str | None] | None = None

    def make(self, case: "Case", device: str, **overrides: Any) -> nn.Module:
        if case.explicit_kwargs:
            kwargs = dict(case.module_kwargs(), device=device, dtype=case.module_dtype)
        else:  # only what the defaults cannot say
            kwargs = {} if torch.device(device).type == "cpu" else {"device": device}
            if case.module_dtype != torch.float32:
                kwargs["dtype"] = case.module_dtype
        kwargs.update(overrides)
        return self.factory(case.rank, case.num_features, **kwargs)

    def not_supported_reasons(self, case: "Case", device: str) -> list[str]:
        """Why this implementation cannot run ``case`` on ``device`` (empty when it can)."""
        reasons = []
        dev = torch.device(device).type
        if dev not in self.devices:
            reasons.append(f"device {dev} not supported")
        if case.rank not in self.ranks:
            reasons.append(f"rank {case.rank} input not supported")
        for dtype in {case.dtype, case.module_dtype}:
            if dtype not in self.dtypes:
                reasons.append(f"{str(dtype).replace('torch.', '')} not supported")
        if case.momentum is None and not self.momentum_none:
            reasons.append("momentum=None (cumulative average) not supported")
        if not case.affine and not self.affine_false:
            reasons.append("affine=False not supported")
        if (not case.track_running_stats or case.stop_tracking_after is not None) and not (
            self.no_running_stats
        ):
            reasons.append("track_running_stats=False not supported")
        if case.memory_format not in self.memory_formats:
            reasons.append(f"{case.memory_format} inputs not supported")
        if case.needs_backward and not self.backward:
            reasons.append("backward not supported")
        if case.needs_double_backward and not self.double_backward:
            reasons.append("double backward not supported")
        if case.rank_specific and not self.rank_specific:
            reasons.append("rank-specific check; the class takes every rank")
        if self.extra_unsupported is not None:
            extra = self.extra_unsupported(case)
            if extra:
                reasons.append(extra)
        return reasons

    def deviation_for(self, case_id: str) -> str | None:
        for pattern, reason in self.deviations.items():
            if fnmatch.fnmatchcase(case_id, pattern):
                return reason
        return None

    def with_name(self, name: str) -> "Implementation":
        return dataclasses.replace(self, name=name)


def from_classes(name: str, classes: Mapping[int, type[nn.Module]],
                 **declarations) -> Implementation:
    """An implementation made of rank-specific classes, keyed by input rank (2, 3, 4, 5)."""
    classes = dict(classes)

    def factory(rank: int, num_features: int, **kwargs) -> nn.Module:
        return classes[rank](num_features, **kwargs)

    declarations.setdefault("ranks", frozenset(classes))
    return Implementation(name=name, factory=factory, **declarations)


def from_module_class(name: str, cls: type[nn.Module], **declarations) -> Implementation:
    """An implementation made of one class that takes inputs of rank 2 to 5 (as BatchNorm*d do)."""

    def factory(rank: int, num_features: int, **kwargs) -> nn.Module:
        return cls(num_features, **kwargs)

    declarations.setdefault("rank_specific", False)
    declarations.setdefault("description", f"{cls.__module__}.{cls.__qualname__}")
    return Implementation(name=name, factory=factory, **declarations)


def _coerce(name: str, obj: Any, origin: str) -> Implementation:
    if isinstance(obj, Implementation):
        return obj if obj.name == name else obj.with_name(name)
    if inspect.isclass(obj) and issubclass(obj, nn.Module):
        return from_module_class(name, obj)
    raise UsageError(
        f"{origin} is a {type(obj).__name__}, not a bnbench.Implementation or an nn.Module class"
    )


def entry_point_implementations() -> dict[str, Implementation]:
    """Every implementation registered in the ``bnbench.implementations`` entry-point group."""
    found: dict[str, Implementation] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue
        found[ep.name] = _coerce(ep.name, ep.load(), f"entry point {ep.name!r} ({ep.value})")
    return found


def load_spec(spec: str) -> Implementation:
    """Resolve ``MODULE:ATTR`` (importable from the current directory or PYTHONPATH)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--impl {spec!r}: expected a registered name or MODULE:ATTR")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way on import
        raise UsageError(f"--impl {spec!r}: cannot import module {module_name!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise UsageError(
            f"--impl {spec!r}: module {module_name!r} has no attribute {attr!r}") from exc
    return _coerce(spec, obj, f"--impl {spec!r}")


def resolve(specs: list[str] | None = None) -> list[Implementation]:
    """Implementations by registered name or MODULE:ATTR; all registered ones when none given."""
    registered = entry_point_implementations()
    if not specs:
        return list(registered.values())
    chosen = []
    for spec in specs:
        if spec in registered:
            chosen.append(registered[spec])
        elif ":" in spec:
            chosen.append(load_spec(spec))
        else:
            known = ", ".join(sorted(registered)) or "none"
            raise UsageError(f"unknown implementation {spec!r} (registered: {known}; "
                             "or give MODULE:ATTR)")
    return chosen
