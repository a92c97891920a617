"""The plug-in interface: what an implementation is, what it supports, and how it is found.

An :class:`Implementation` wraps a factory that builds a BatchNorm module for an input rank, with
nn.BatchNorm's constructor arguments, plus declarations of what it supports and how it knowingly
departs from nn.BatchNorm. What it supports is asked about a :class:`Config` (a gate case, a
benchmark row and ``swap`` each build one), never about a test case. Built-ins and third-party
packages register through the entry-point group ``bnbench.implementations``; ``MODULE:ATTR``
names one ad hoc.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib
import importlib.metadata
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

ENTRY_POINT_GROUP = "bnbench.implementations"

ALL_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
ALL_RANKS = frozenset({2, 3, 4, 5})
ALL_MEMORY_FORMATS = frozenset({"contiguous", "channels_last", "non_contiguous"})
ALL_DEVICES = frozenset({"cpu", "cuda"})

# nn.BatchNorm class per input rank: BatchNorm1d takes (N, C) and (N, C, L).
RANK_TO_BUILTIN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class UsageError(Exception):
    """A user named something that cannot be used (unknown implementation, bad module...)."""


@dataclass(frozen=True)
class Config:
    """One configuration an implementation may be asked to run: what its module is built with,
    what it is fed, and what is asked of autograd."""

    rank: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # input dtype
    module_dtype: torch.dtype = torch.float32
    memory_format: str = "contiguous"  # contiguous | channels_last | non_contiguous
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    bias: bool = True  # torch 2.13's keyword-only bias=False: a weight and no bias
    track_running_stats: bool = True
    # track_running_stats switched off after construction (buffers kept, no updates)
    tracking_switched_off: bool = False
    needs_backward: bool = False
    needs_double_backward: bool = False
    # the check is about a rank-specific class (BatchNorm2d rejecting a 3-D input...)
    rank_specific: bool = False
    # the check calls the constructor positionally, as nn.BatchNorm's signature allows
    positional_constructor: bool = False
    # ranks in the synchronized run (bnbench.distributed); 0: a single process, no process group
    world_size: int = 0


def _default_state(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: getattr(module, name, None)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }


@functools.cache
def _case_ids() -> tuple[str, ...]:
    from bnbench.cases import all_cases  # cases never import the registry: no cycle
    from bnbench.distributed import dist_cases  # imports the registry: called late, no cycle

    return tuple(case.id for case in all_cases()) + tuple(c.id for c in dist_cases())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Implementation:
    """A BatchNorm implementation under test.

    ``factory(rank, num_features, eps=..., momentum=..., affine=..., track_running_stats=...,
    device=..., dtype=...)`` returns a module for inputs of that rank (2 to 5).

    The ``supports_*`` declarations say what it can run; a configuration outside them is "not
    supported" with the reason. ``deviations`` maps case-id patterns (fnmatch) to the reason the
    implementation knowingly differs from nn.BatchNorm there: such a case is expected to fail,
    and passing is an error; a pattern that matches no case is an error at registration.
    ``state`` maps a module to its tensors by role (weight, bias, running_mean, running_var,
    num_batches_tracked) for implementations that name or shape them differently; the checks of
    the module's public interface (defaults, state_dict) never go through it.
    ``rank_specific``: the factory builds a different class per rank, each rejecting other ranks
    as nn.BatchNorm1d/2d/3d do (checked); a single class taking every rank is not.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str = ""
    supports_devices: frozenset[str] = ALL_DEVICES
    supports_dtypes: frozenset[torch.dtype] = ALL_DTYPES
    supports_ranks: frozenset[int] = ALL_RANKS
    supports_memory_formats: frozenset[str] = ALL_MEMORY_FORMATS
    supports_momentum_none: bool = True
    supports_affine_false: bool = True
    supports_bias_false: bool = True
    supports_no_running_stats: bool = True
    supports_backward: bool = True
    supports_double_backward: bool = True
    rank_specific: bool = True
    # factory(rank, num_features, *args) passes positional arguments on to an nn.BatchNorm-like
    # constructor (set by from_classes and from_module_class)
    positional_constructor: bool = False
    deviations: Mapping[str, str] = field(default_factory=dict)
    state: Callable[[nn.Module], dict[str, torch.Tensor | None]] = _default_state
    # Any further limit: a reason string when the configuration is not supported.
    extra_unsupported: Callable[[Config], str | None] | None = None
    # Set on the parent's stand-in for an implementation that could not be loaded (its import
    # exited, crashed or hung in the probe): every case it would run fails with this reason.
    load_error: str = ""
    # What a probe found wrong with its constructor (bnbench.diagnose.constructor_problem),
    # said once before the run: the stand-in cannot build a module to find out itself.
    constructor_note: str = ""
    # A synchronized BatchNorm: the factory also takes process_group (nn.SyncBatchNorm's
    # constructor) and, in training, normalizes with the statistics of the whole process
    # group's batch. Verified and timed only with --world-size (bnbench.distributed).
    distributed: bool = False

    def __post_init__(self):
        ids = _case_ids()
        unmatched = [p for p in self.deviations if not fnmatch.filter(ids, p)]
        if unmatched:
            raise UsageError(
                f"implementation {self.name!r} declares deviations for patterns "
                f"that match no case: {', '.join(unmatched)} (see `bnbench list`)"
            )

    def make(
        self,
        config: Config,
        num_features: int,
        *,
        explicit_kwargs: dict | None = None,
        **overrides: Any,
    ) -> nn.Module:
        """Build a module for ``config``. ``explicit_kwargs``: constructor arguments to pass;
        None passes only what nn.BatchNorm's defaults cannot say (device, dtype)."""
        if explicit_kwargs is not None:
            kwargs = dict(explicit_kwargs, device=config.device, dtype=config.module_dtype)
        else:
            kwargs = {} if torch.device(config.device).type == "cpu" else {"device": config.device}
            if config.module_dtype != torch.float32:
                kwargs["dtype"] = config.module_dtype
        if not config.bias:
            kwargs["bias"] = False
        kwargs.update(overrides)
        return self.factory(config.rank, num_features, **kwargs)

    def not_supported_reasons(self, config: Config) -> list[str]:
        """Why this implementation cannot run ``config`` (empty when it can)."""
        reasons = []
        if self.distributed and not config.world_size:
            reasons.append(
                "a synchronized BatchNorm: verified and timed across processes, with --world-size"
            )
        elif config.world_size and not self.distributed:
            reasons.append(
                "not a synchronized BatchNorm (its constructor takes no process_group): "
                "verified without --world-size"
            )
        dev = torch.device(config.device).type
        if dev not in self.supports_devices:
            reasons.append(f"device {dev} not supported")
        if config.rank not in self.supports_ranks:
            reasons.append(f"rank {config.rank} input not supported")
        for dtype in dict.fromkeys((config.dtype, config.module_dtype)):
            if dtype not in self.supports_dtypes:
                reasons.append(f"{_dtype_name(dtype)} not supported")
        if config.momentum is None and not self.supports_momentum_none:
            reasons.append("momentum=None (cumulative average) not supported")
        if not config.affine and not self.supports_affine_false:
            reasons.append("affine=False not supported")
        if config.affine and not config.bias and not self.supports_bias_false:
            reasons.append("bias=False not supported")
        if (not config.track_running_stats or config.tracking_switched_off) and not (
            self.supports_no_running_stats
        ):
            reasons.append("track_running_stats=False not supported")
        if config.memory_format not in self.supports_memory_formats:
            reasons.append(f"{config.memory_format} inputs not supported")
        if config.needs_backward and not self.supports_backward:
            reasons.append("backward not supported")
        if config.needs_double_backward and not self.supports_double_backward:
            reasons.append("double backward not supported")
        if config.rank_specific and not self.rank_specific:
            reasons.append("rank-specific check; the class takes every rank")
        if config.positional_constructor and not self.positional_constructor:
            reasons.append("built by a factory: nn.BatchNorm's positional signature does not apply")
        if self.extra_unsupported is not None:
            extra = self.extra_unsupported(config)
            if extra:
                reasons.append(extra)
        return reasons

    def deviation_for(self, case_id: str) -> str | None:
        for pattern, reason in self.deviations.items():
            if fnmatch.fnmatchcase(case_id, pattern):
                return reason
        return None

    def with_name(self, name: str) -> Implementation:
        return dataclasses.replace(self, name=name)

    def declarations(self) -> dict[str, Any]:
        """What it declares, as JSON-able data (what a probe reports back to the parent)."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("factory", "state", "extra_unsupported"):
                continue
            if f.name == "supports_dtypes":
                value = sorted(_dtype_name(d) for d in value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            elif f.name == "deviations":
                value = dict(value)
            data[f.name] = value
        return data

    @classmethod
    def from_declarations(cls, data: Mapping[str, Any]) -> Implementation:
        """The parent's stand-in built from :meth:`declarations`: it answers what is supported
        (a limit only the implementation's own ``extra_unsupported`` knows is applied in the
        worker) and what deviates, and cannot build a module (its factory raises)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        sets = {
            "supports_devices": ALL_DEVICES,
            "supports_ranks": ALL_RANKS,
            "supports_memory_formats": ALL_MEMORY_FORMATS,
            "supports_dtypes": frozenset(_dtype_name(d) for d in ALL_DTYPES),
        }
        for key, value in data.items():
            if key not in fields or key in ("factory", "state", "extra_unsupported"):
                raise UsageError(f"implementation declarations: unexpected field {key!r}")
            if key in sets:
                if not isinstance(value, list) or not all(
                    isinstance(v, (str, int)) and not isinstance(v, bool) and v in sets[key]
                    for v in value
                ):
                    raise UsageError(f"implementation declarations: {key}: {str(value)[:80]}")
                value = frozenset(value)
                if key == "supports_dtypes":
                    value = frozenset(getattr(torch, name) for name in value)
            elif key == "deviations":
                if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    raise UsageError("implementation declarations: deviations")
            elif key in ("name", "description", "load_error", "constructor_note"):
                if not isinstance(value, str):
                    raise UsageError(f"implementation declarations: {key} is not a string")
            elif not isinstance(value, bool):
                raise UsageError(f"implementation declarations: {key} is not true or false")
            kwargs[key] = value
        return cls(factory=_runs_in_a_worker, **kwargs)


def _runs_in_a_worker(*args, **kwargs) -> nn.Module:
    raise RuntimeError(
        "this implementation was loaded in a probe process: its modules are built only in "
        "bnbench's worker processes"
    )


def from_classes(
    name: str, classes: Mapping[int, type[nn.Module]], **declarations
) -> Implementation:
    """An implementation made of rank-specific classes, keyed by input rank (2, 3, 4, 5)."""
    classes = dict(classes)

    def factory(rank: int, num_features: int, *args, **kwargs) -> nn.Module:
        return classes[rank](num_features, *args, **kwargs)

    declarations.setdefault("supports_ranks", frozenset(classes))
    declarations.setdefault("positional_constructor", True)
    return Implementation(name=name, factory=factory, **declarations)


# A subclass of nn.BatchNorm1d/2d/3d takes the ranks its base takes, and rejects the others.
_BUILTIN_RANKS = (
    (nn.BatchNorm1d, frozenset({2, 3})),
    (nn.BatchNorm2d, frozenset({4})),
    (nn.BatchNorm3d, frozenset({5})),
)


def takes_process_group(cls: type) -> bool:
    """A synchronized BatchNorm class: nn.SyncBatchNorm, or a constructor with process_group."""
    if issubclass(cls, nn.SyncBatchNorm):
        return True
    # a constructor that forwards *args/**kwargs to a synchronized base counts as the base's
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return False
        if "process_group" in parameters:
            return True
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters.values()):
            return False
    return False


def from_module_class(name: str, cls: type[nn.Module], **declarations) -> Implementation:
    """An implementation made of one class with nn.BatchNorm's constructor: a subclass of
    nn.BatchNorm1d/2d/3d takes its base's ranks, any other class inputs of rank 2 to 5. A class
    whose constructor takes ``process_group`` (nn.SyncBatchNorm's) is a synchronized one."""

    def factory(rank: int, num_features: int, *args, **kwargs) -> nn.Module:
        return cls(num_features, *args, **kwargs)

    declarations.setdefault("positional_constructor", True)
    declarations.setdefault("distributed", takes_process_group(cls))
    for base, ranks in _BUILTIN_RANKS:
        if issubclass(cls, base):
            declarations.setdefault("supports_ranks", ranks)
            break
    else:
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
        raise UsageError(
            f"--impl {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise UsageError(
            f"--impl {spec!r}: module {module_name!r} has no attribute {attr!r}"
        ) from exc
    return _coerce(spec, obj, f"--impl {spec!r}")


def resolve(specs: list[str] | None = None) -> list[Implementation]:
    """Implementations by registered name or MODULE:ATTR; all registered ones when none given."""
    if not specs:
        return list(entry_point_implementations().values())
    # only the named entry points are imported: another plugin's import cannot cost them
    registered = _entry_points()
    chosen = []
    for spec in specs:
        if spec in registered:
            ep = registered[spec]
            chosen.append(_coerce(spec, ep.load(), f"entry point {spec!r} ({ep.value})"))
        elif ":" in spec:
            chosen.append(load_spec(spec))
        else:
            known = ", ".join(sorted(registered)) or "none"
            raise UsageError(
                f"unknown implementation {spec!r} (registered: {known}; or give MODULE:ATTR)"
            )
    return chosen


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _is_own(ep: importlib.metadata.EntryPoint) -> bool:
    """A built-in: registered by bnbench itself, safe to import in the parent."""
    return ep.value.split(":")[0].split(".")[0] == "bnbench"


def resolve_isolated(
    specs: list[str] | None = None, timeout: float = 120.0
) -> list[Implementation]:
    """As :func:`resolve`, but code that is not bnbench's own (``MODULE:ATTR`` and third-party
    entry points) is imported first in a probe process, under ``timeout``, which reports its
    declarations back as JSON: a module that exits, crashes or hangs while being imported cannot
    end or block the caller. Such an implementation comes back as a stand-in whose
    ``load_error`` says what happened (its every case fails); an import that raises, a missing
    attribute or an object of the wrong kind is a UsageError, as with :func:`resolve`."""
    eps = _entry_points()
    specs = list(specs) if specs else list(eps)
    chosen: dict[str, Implementation] = {}
    probed = []
    for spec in specs:
        if spec in eps and _is_own(eps[spec]):
            chosen[spec] = _coerce(spec, eps[spec].load(), f"entry point {spec!r}")
        elif spec in eps or ":" in spec:
            probed.append(spec)
        else:
            known = ", ".join(sorted(eps)) or "none"
            raise UsageError(
                f"unknown implementation {spec!r} (registered: {known}; or give MODULE:ATTR)"
            )
    if probed:
        chosen.update(_probe(probed, timeout))
    return [chosen[spec] for spec in specs]


def _probe(specs: list[str], timeout: float) -> dict[str, Implementation]:
    from bnbench.isolation import begin, run_items

    begin()  # a new run: an earlier interruption in this process is over
    found: dict[str, Implementation] = {}
    usage: list[str] = []

    def received(spec: str, result: dict | None, problem: str | None, seconds: float) -> None:
        if result is not None:
            if set(result) == {"usage"} and isinstance(result["usage"], str):
                usage.append(result["usage"][:2000])
                return
            if set(result) == {"declarations"} and isinstance(result["declarations"], dict):
                try:
                    impl = Implementation.from_declarations(result["declarations"])
                    if impl.name == spec:
                        found[spec] = impl
                        return
                    problem = f"the probe reported a different name ({impl.name!r:.80})"
                except (UsageError, TypeError, AttributeError, ValueError) as exc:
                    problem = f"the probe sent unusable declarations ({exc})"
            else:
                problem = f"the probe sent an invalid answer (keys {sorted(result)!r:.200})"
        found[spec] = Implementation(
            name=spec,
            factory=_runs_in_a_worker,
            description="could not be loaded",
            load_error=f"could not be loaded (imported first in a probe process): {problem}",
        )

    run_items("probe", (), specs, timeout, received)
    if usage:
        raise UsageError("\n".join(usage))
    return found


def probe_worker(*, items: list[str], channel) -> None:
    """The probe (bnbench.isolation's "probe" job): resolve each spec, send its declarations."""
    for spec in items:
        channel.start(spec)
        try:
            from bnbench.diagnose import constructor_problem

            impl = resolve([spec])[0]
            note = constructor_problem(impl) or ""
            result: dict[str, Any] = {
                "declarations": dict(impl.declarations(), constructor_note=note)
            }
        except UsageError as exc:
            result = {"usage": str(exc)}
        except Exception as exc:  # a third-party entry point's import may fail in any way
            result = {"usage": f"implementation {spec!r}: {type(exc).__name__}: {exc}"}
        channel.done(spec, result)
