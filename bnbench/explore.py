"""Model-based exploration: random sequences of operations on one module, checked after each.

A Hypothesis rule-based state machine drives the implementation and the float64 oracle through
the life a BatchNorm layer has in real code: train and eval calls with batch and spatial sizes
that change from call to call, in any memory format, with or without backward and with a
grad_output in another layout; momentum, eps, ``training`` and ``track_running_stats`` assigned
between calls; ``load_state_dict``, resets, in-place parameter updates, deepcopy and state_dict
round trips; running buffers set to None. After every operation everything observable is
compared (outputs, gradients, running statistics, the batch counter, dtypes, layouts, in-place
buffer updates), with the same checks as the case table's steps.

The default run is a fixed-seed profile of a few seconds per rank; ``bnbench verify --explore
SECONDS`` searches longer with fresh seeds. A failure is shrunk to the shortest sequence that
still fails, and printed as a runnable Python snippet that runs the implementation and the
installed nn.BatchNorm side by side and prints where they differ.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnbench.cases import Case
from bnbench.checks import (
    CheckFailed,
    _check_state,
    _describe,
    _grad_output,
    _reference,
    check_step,
    held_buffers,
    make_input,
)
from bnbench.registry import RANK_TO_BUILTIN, Config, Implementation, _default_state

# The fixed-seed profile every verify runs, per rank: examples x operations each. About 1-3 s
# per rank for an eager implementation on 2 cores; cut at FAST_SECONDS for one that compiles
# each new configuration (torch.compile takes seconds per graph).
FAST_EXAMPLES = 30
STEPS_PER_EXAMPLE = 12
SHRINK_SECONDS = 10.0
FAST_SECONDS = 12.0
# --explore SECONDS hands its budget to the worker through the environment (workers are
# spawned processes that rebuild the case table themselves).
SECONDS_ENV = "BNBENCH_EXPLORE_SECONDS"

CHANNELS = (1, 2, 3, 5, 9)
# Per-rank spatial extents: small ones, and a few across vector widths and block sizes.
SPATIAL = {2: (), 3: (1, 2, 3, 7, 16, 33, 257), 4: (1, 2, 3, 5, 8, 17), 5: (1, 2, 3, 5)}
BATCHES = (1, 2, 3, 4, 8, 9, 65)
MOMENTA = (0.1, 0.5, 1.0, 0.0, None)
EPSILONS = (1e-5, 1e-3, 0.1)


class Mismatch(AssertionError):
    """The implementation departed from the oracle (or nn.BatchNorm) after an operation."""


def explore_input(shape, seed: int, layout: str = "contiguous", device: str = "cpu"):
    """The input of an exploration call: per-channel offsets and scales, one channel of small
    variance, in ``layout`` (contiguous | channels_last | non_contiguous). Deterministic in
    (shape, seed), so a reproducer snippet makes the same tensor."""
    return make_input(_input_case(shape, seed, layout), 0, device)


def explore_grad(x: torch.Tensor, seed: int, layout: str = "same") -> torch.Tensor:
    """grad_output for ``x``'s call: same layout as x, or permuted / channels_last /
    contiguous storage of the same values."""
    case = dataclasses.replace(_input_case(tuple(x.shape), seed, "contiguous"), grad_layout=layout)
    return _grad_output(case, 0, x)


def _input_case(shape, seed: int, layout: str) -> Case:
    shape = tuple(shape)
    return Case("explore", "steps", len(shape), shape, "", memory_format=layout, salt=seed)


def start_values(num_features: int) -> dict[str, torch.Tensor]:
    """Non-trivial weight and bias (float64) every exploration starts from."""
    g = torch.Generator().manual_seed(1000 + num_features)
    return {
        "weight": torch.randn(num_features, generator=g, dtype=torch.float64) * 0.5 + 1.2,
        "bias": torch.randn(num_features, generator=g, dtype=torch.float64),
    }


def set_start_values(impl: Implementation, module: nn.Module, *others: nn.Module) -> None:
    """Copy ``start_values`` into the implementation's module (and nn.BatchNorm twins)."""
    state = impl.state(module)
    values = start_values(int(state["weight"].numel()) if state["weight"] is not None else 0)
    with torch.no_grad():
        for name, value in values.items():
            for tensor in [state[name]] + [getattr(o, name, None) for o in others]:
                if tensor is not None:
                    tensor.copy_(value.reshape(tensor.shape).to(tensor.dtype))


def report(label: str, impl: Implementation, module, twin, outputs=None, inputs=None) -> None:
    """Print where ``module`` and nn.BatchNorm ``twin`` differ after one call (snippets)."""
    pairs = []
    if outputs is not None:
        pairs.append(("output", *outputs))
    if inputs is not None:
        pairs.append(("input grad", inputs[0].grad, inputs[1].grad))
    state = impl.state(module)
    for name in ("weight", "bias"):
        mine, theirs = state[name], getattr(twin, name, None)
        pairs.append(
            (
                f"{name} grad",
                None if mine is None else mine.grad,
                None if theirs is None else theirs.grad,
            )
        )
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        pairs.append((name, state[name], getattr(twin, name, None)))
    lines = []
    for name, mine, theirs in pairs:
        if mine is None and theirs is None:
            continue
        if mine is None or theirs is None:
            lines.append(
                f"  {name}: {'None' if mine is None else 'a tensor'} here, "
                f"{'None' if theirs is None else 'a tensor'} in nn.BatchNorm"
            )
            continue
        a, b = mine.detach().double().cpu(), theirs.detach().double().cpu()
        if a.numel() != b.numel():
            lines.append(f"  {name}: {a.numel()} values, nn.BatchNorm has {b.numel()}")
            continue
        diff = (a.reshape(b.shape) - b).abs()
        worst = float(diff.max()) if diff.numel() else 0.0
        if worst or not torch.equal(torch.isnan(a.reshape(b.shape)), torch.isnan(b)):
            lines.append(f"  {name}: max abs diff {worst:.3g}")
    print(label + (":" if lines else ": same"))
    for line in lines:
        print(line)


@dataclass(frozen=True)
class Setup:
    """How the explored module is constructed."""

    rank: int
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    bias: bool
    track_running_stats: bool

    def case(self) -> Case:
        shape = (2, self.num_features) + (2,) * (self.rank - 2)
        return Case(
            "explore",
            "steps",
            self.rank,
            shape,
            "",
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            bias=self.bias,
            track_running_stats=self.track_running_stats,
        )

    def kwargs(self) -> dict:
        kwargs = dict(
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
        )
        if not self.bias:
            kwargs["bias"] = False
        return kwargs


class Session:
    """One explored module, its oracle, and the snippet that replays what was done to it."""

    def __init__(self, impl: Implementation, device: str, setup: Setup):
        self.impl, self.device, self.setup = impl, device, setup
        self.case = setup.case()
        self.calls = 0
        kwargs = setup.kwargs()
        builtin = RANK_TO_BUILTIN[setup.rank].__name__
        extra = "" if device == "cpu" else f", device={device!r}"
        self.lines = [
            f"m = impl.factory({setup.rank}, {setup.num_features}, {_kw(kwargs)}{extra})",
            f"ref = nn.{builtin}({setup.num_features}, {_kw(kwargs)}{extra})",
            "set_start_values(impl, m, ref)  # the same non-trivial weight and bias",
        ]
        self.module = self._guard(
            "construction",
            lambda: impl.make(self.case.config(device), setup.num_features, explicit_kwargs=kwargs),
        )
        self.ref = _reference(self.case)
        if setup.affine:
            values = start_values(setup.num_features)
            self._guard("setting weight and bias", lambda: set_start_values(impl, self.module))
            self.ref.weight = values["weight"].clone()
            if setup.bias:
                self.ref.bias = values["bias"].clone()
        self.held = held_buffers(impl, self.module)
        self._verify_state("construction")

    # -- helpers --------------------------------------------------------------------------------

    def _guard(self, what: str, call):
        try:
            return call()
        except Mismatch:
            raise
        except Exception as exc:  # the implementation may fail in any way
            raise Mismatch(f"{what} raised {_describe(exc)}") from exc

    def _verify_state(self, after: str) -> None:
        problems: list[str] = []
        _check_state(self.impl, self.case, self.module, self.ref, problems)
        if problems:
            raise Mismatch(f"after {after}: " + "; ".join(problems))

    def _both(self, statement: str) -> None:
        self.lines.append(f"{statement.format('m')}; {statement.format('ref')}")

    # -- operations -----------------------------------------------------------------------------

    def call(
        self,
        training: bool,
        shape: tuple[int, ...],
        layout: str,
        seed: int,
        backward: bool,
        grad_layout: str,
        how: str,
    ) -> None:
        """One forward (and backward) in train or eval; ``how``: method | attr | nograd."""
        self.calls += 1
        step = ("train" if training else "eval") + {"method": "", "attr": "_attr"}.get(
            how, "_nograd"
        )
        if how == "attr":
            self._both(f"{{}}.training = {training}")
        else:
            self._both(f"{{}}.train({training})")
        x = explore_input(shape, seed, layout, self.device)
        case = dataclasses.replace(
            self.case, shape=tuple(shape), memory_format=layout, backward=backward
        )
        grad = explore_grad(x, seed, grad_layout) if backward else None
        self.lines.append(
            f"x = explore_input({tuple(shape)}, seed={seed}, layout={layout!r}"
            + ("" if self.device == "cpu" else f", device={self.device!r}")
            + ")"
        )
        grad_wanted = backward and how != "nograd"
        self.lines.append(
            "xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()"
            if grad_wanted
            else "xm, xr = x.clone(), x.clone()"
        )
        ctx = "" if how != "nograd" else "with torch.no_grad(): "
        self.lines.append(f"{ctx}ym, yr = m(xm), ref(xr)")
        if grad_wanted:
            self.lines.append(f"g = explore_grad(x, seed={seed}, layout={grad_layout!r})")
            self.lines.append("ym.backward(g); yr.backward(g)")
        label = f"call {self.calls} ({step})"
        self.lines.append(
            f"report({label!r}, impl, m, ref, outputs=(ym, yr)"
            + (", inputs=(xm, xr))" if grad_wanted else ")")
        )
        try:
            problems = check_step(
                self.impl,
                case,
                self.module,
                self.ref,
                self.held,
                self.calls,
                step,
                x,
                grad_out=grad,
            )
        except CheckFailed as exc:
            raise Mismatch(str(exc)) from exc
        except Exception as exc:  # the implementation may fail in any way
            raise Mismatch(f"{label}: raised {_describe(exc)}") from exc
        if problems:
            raise Mismatch(f"{label}: " + "; ".join(problems))

    def assign(self, name: str, value) -> None:
        self._both(f"{{}}.{name} = {value!r}")
        self._guard(f"assigning {name}", lambda: setattr(self.module, name, value))
        if name == "track_running_stats":
            if value:
                self.ref.track_running_stats = True
            else:
                self.ref.stop_tracking()
        else:
            setattr(self.ref, name, value)

    def load_statistics(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        c = self.setup.num_features
        mean = torch.randn(c, generator=g, dtype=torch.float64)
        var = torch.rand(c, generator=g, dtype=torch.float64) + 0.3
        self.lines.append(f"g = torch.Generator().manual_seed({seed}); c = {c}")
        self.lines.append(
            "stats = {'running_mean': torch.randn(c, generator=g, dtype=torch.float64), "
            "'running_var': torch.rand(c, generator=g, dtype=torch.float64) + 0.3}"
        )
        self.lines.append(
            "for mod in (m, ref): mod.load_state_dict({**mod.state_dict(), **{k: v.to("
            "mod.state_dict()[k].dtype).reshape(mod.state_dict()[k].shape) "
            "for k, v in stats.items()}})"
        )
        sd = self._guard("state_dict()", self.module.state_dict)
        for key, value in (("running_mean", mean), ("running_var", var)):
            if key not in sd:
                raise Mismatch(f"state_dict() has no {key!r} (nn.BatchNorm's has)")
            sd[key] = value.to(sd[key].dtype).reshape(sd[key].shape).to(sd[key].device)
            setattr(self.ref, key, value.clone())
        self._guard("load_state_dict", lambda: self.module.load_state_dict(sd))
        self._verify_state("load_state_dict")

    def reset_running_stats(self) -> None:
        self._both("{}.reset_running_stats()")
        self._guard("reset_running_stats()", lambda: getattr(self.module, "reset_running_stats")())  # noqa: B009
        c = self.setup.num_features
        if self.ref.running_mean is not None:
            self.ref.running_mean = torch.zeros(c, dtype=torch.float64)
            self.ref.running_var = torch.ones(c, dtype=torch.float64)
        if self.ref.num_batches_tracked is not None:
            self.ref.num_batches_tracked = 0
        self._verify_state("reset_running_stats()")

    def reset_parameters(self) -> None:
        """nn.BatchNorm's reset_parameters: running statistics reset, weight 1, bias 0."""
        self._both("{}.reset_parameters()")
        self._guard("reset_parameters()", lambda: getattr(self.module, "reset_parameters")())  # noqa: B009
        c = self.setup.num_features
        if self.ref.track_running_stats and self.ref.running_mean is not None:
            self.ref.running_mean = torch.zeros(c, dtype=torch.float64)
            self.ref.running_var = torch.ones(c, dtype=torch.float64)
            self.ref.num_batches_tracked = 0
        if self.ref.weight is not None:
            self.ref.weight = torch.ones(c, dtype=torch.float64)
        if self.ref.bias is not None:
            self.ref.bias = torch.zeros(c, dtype=torch.float64)
        self._verify_state("reset_parameters()")

    def scale_parameters(self) -> None:
        self.lines.append(
            "with torch.no_grad():\n"
            "    for p in [*m.parameters(), *ref.parameters()]: p.mul_(1.5).add_(0.25)"
        )
        state = self._guard("reading weight and bias", lambda: self.impl.state(self.module))
        with torch.no_grad():
            for key in ("weight", "bias"):
                tensor = state[key]
                if tensor is not None:
                    self._guard(
                        f"{key}.mul_(1.5).add_(0.25)", lambda t=tensor: t.mul_(1.5).add_(0.25)
                    )
                ref_value = getattr(self.ref, key)
                if ref_value is not None:
                    setattr(self.ref, key, ref_value * 1.5 + 0.25)

    def buffers_to_none(self) -> None:
        self._both("{}.running_mean = None")
        self._both("{}.running_var = None")

        def to_none() -> None:
            setattr(self.module, "running_mean", None)  # noqa: B010 (nn.Module attribute)
            setattr(self.module, "running_var", None)  # noqa: B010 (nn.Module attribute)

        self._guard("setting running buffers to None", to_none)
        self.ref.running_mean = self.ref.running_var = None
        self.held = [h for h in self.held if h[0] == "num_batches_tracked"]

    def deepcopy(self) -> None:
        self._both("{0} = copy.deepcopy({0})")
        self.module = self._guard("copy.deepcopy", lambda: copy.deepcopy(self.module))
        self.held = held_buffers(self.impl, self.module)
        self._verify_state("copy.deepcopy")

    def state_dict_round_trip(self) -> None:
        """A new module built with the current settings, loaded from this one's state_dict."""
        s = self.setup
        kwargs = dict(s.kwargs(), eps=self.ref.eps, momentum=self.ref.momentum)
        extra = "" if self.device == "cpu" else f", device={self.device!r}"
        builtin = RANK_TO_BUILTIN[s.rank].__name__
        self.lines += [
            f"m2 = impl.factory({s.rank}, {s.num_features}, {_kw(kwargs)}{extra})",
            f"ref2 = nn.{builtin}({s.num_features}, {_kw(kwargs)}{extra})",
            "m2.load_state_dict(m.state_dict()); ref2.load_state_dict(ref.state_dict())",
            "m, ref = m2.train(m.training), ref2.train(ref.training)",
        ]
        config = dataclasses.replace(
            self.case.config(self.device), eps=self.ref.eps, momentum=self.ref.momentum
        )
        fresh = self._guard(
            "construction", lambda: self.impl.make(config, s.num_features, explicit_kwargs=kwargs)
        )
        sd = self._guard("state_dict()", self.module.state_dict)
        self._guard("load_state_dict(state_dict())", lambda: fresh.load_state_dict(sd))
        fresh.train(self.module.training)
        self.module = fresh
        self.held = held_buffers(self.impl, self.module)
        self._verify_state("a state_dict round trip into a new module")


def _kw(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# ---------------------------------------------------------------------------------------------
# The state machine


def _choices(impl: Implementation, device: str, rank: int):
    """What this implementation supports, per construction argument (others at defaults)."""
    base = Config(rank=rank, device=device, needs_backward=True)

    def ok(**changes) -> bool:
        return not impl.not_supported_reasons(dataclasses.replace(base, **changes))

    return dict(
        momentum=[m for m in MOMENTA if ok(momentum=m)],
        eps=[e for e in EPSILONS if ok(eps=e)],
        affine=[a for a in (True, False) if ok(affine=a)],
        bias=[b for b in (True, False) if ok(bias=b)] if _has_bias() else [True],
        # a tracking module twice as often: most bugs live in the running statistics
        track=[t for t in (True, True, False) if ok(track_running_stats=t)],
        switch_off=ok(tracking_switched_off=True),
        backward=ok(needs_backward=True),
        channels_last=ok(memory_format="channels_last") and rank in (4, 5),
        non_contiguous=ok(memory_format="non_contiguous"),
        raw=impl.state is _default_state,
    )


def _has_bias() -> bool:
    from bnbench.cases import builtin_has_bias_argument

    return builtin_has_bias_argument()


@dataclass
class Budget:
    """When the search and the shrinking stop. The search ends at ``search_end``; shrinking
    ``shrink`` seconds after the first failure. Past the deadline sequences do nothing, so
    Hypothesis runs out of work at once: every remaining example passes, every shrink attempt
    fails to reproduce."""

    search_end: float
    shrink: float
    deadline: float  # the search's end until a failure is found
    sequences: int = 0  # sequences that ran (started before the deadline)
    failing: bool = False

    def failed(self) -> None:
        if not self.failing:
            self.failing = True
            self.deadline = time.monotonic() + self.shrink


def machine(impl: Implementation, device: str, rank: int, found: list, budget: Budget):
    """A RuleBasedStateMachine class exploring ``impl`` at ``rank``. Every failing sequence is
    appended to ``found`` as (number of lines, snippet lines, message)."""
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

    opts = _choices(impl, device, rank)
    if not (opts["momentum"] and opts["eps"] and opts["affine"] and opts["track"]):
        raise ValueError("the implementation supports no constructor configuration here")
    layouts = ["contiguous"]
    layouts += ["channels_last"] if opts["channels_last"] else []
    layouts += ["non_contiguous"] if opts["non_contiguous"] else []
    grad_layouts = ["same", "permuted"] + (["channels_last"] if rank in (4, 5) else [])

    @st.composite
    def shapes(draw, training: bool):
        n = draw(st.sampled_from(BATCHES))
        spatial = tuple(draw(st.sampled_from(SPATIAL[rank])) for _ in range(rank - 2))
        values = n
        for size in spatial:
            values *= size
        if values < 2:  # one value per channel raises in training: the case table checks it
            n = 2
        return n, spatial

    class Explore(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.session: Session | None = None

        def _live(self) -> bool:
            return self.session is not None and time.monotonic() < budget.deadline

        def _run(self, op) -> None:
            if not self._live():
                return
            try:
                op(self.session)
            except Mismatch as exc:
                lines = self.session.lines  # type: ignore[union-attr]
                found.append((len(lines), list(lines), str(exc)))
                budget.failed()
                raise

        @initialize(
            channels=st.sampled_from(CHANNELS),
            eps=st.sampled_from(opts["eps"]),
            momentum=st.sampled_from(opts["momentum"]),
            affine=st.sampled_from(opts["affine"]),
            bias=st.sampled_from(opts["bias"]),
            track=st.sampled_from(opts["track"]),
        )
        def build(self, channels, eps, momentum, affine, bias, track):
            if time.monotonic() >= budget.deadline:
                return
            budget.sequences += 1
            setup = Setup(rank, channels, eps, momentum, affine, bias or not affine, track)
            try:
                self.session = Session(impl, device, setup)
            except Mismatch as exc:
                found.append((0, [], f"construction: {exc}"))
                budget.failed()
                raise

        def _call(self, training, data, seed, backward, layout, grad_layout, how):
            n, spatial = data.draw(shapes(training))
            if self.session is None:
                return
            if n == 1:
                # torch 2.13's CPU kernel gets the input grad wrong for N=1 with strides that
                # size-1 dimensions make ambiguous; the case table covers N=1 contiguously.
                layout, grad_layout = "contiguous", "same"
            shape = (n, self.session.setup.num_features) + spatial
            self._run(lambda s: s.call(training, shape, layout, seed, backward, grad_layout, how))

        # Calls are two rules of three, so sequences are mostly calls with changes between.
        call_args: dict[str, Any] = dict(
            data=st.data(),
            seed=st.integers(0, 9999),
            backward=st.booleans() if opts["backward"] else st.just(False),
            layout=st.sampled_from(layouts),
            grad_layout=st.sampled_from(grad_layouts),
            how=st.sampled_from(["method", "attr", "nograd"]),
        )

        @rule(**call_args)
        def train(self, **kw):
            self._call(True, **kw)

        @rule(**call_args)
        def eval(self, **kw):
            self._call(False, **kw)

        @rule(data=st.data())
        def change(self, data):
            """One thing a user does between calls (those that apply to the module now)."""
            s = self.session
            if s is None:
                return
            tracking_now = s.ref.track_running_stats
            as_built = tracking_now == s.setup.track_running_stats
            buffers = self._tracking_buffers()
            what = ["momentum", "eps", "deepcopy"]
            what += ["tracking"] if opts["switch_off"] else []
            what += ["load_statistics"] if buffers else []
            what += ["reset_running_stats"] if buffers and tracking_now else []
            if as_built and (buffers or not s.setup.track_running_stats):
                what += ["reset_parameters", "state_dict_round_trip"]
            what += ["scale_parameters"] if s.setup.affine else []
            what += ["buffers_to_none"] if opts["raw"] and buffers else []
            kind = data.draw(st.sampled_from(what), label="change")
            if kind == "momentum":
                value = data.draw(st.sampled_from(opts["momentum"]), label="momentum")
                self._run(lambda s: s.assign("momentum", value))
            elif kind == "eps":
                value = data.draw(st.sampled_from(opts["eps"]), label="eps")
                self._run(lambda s: s.assign("eps", value))
            elif kind == "tracking":
                on = data.draw(st.booleans(), label="track_running_stats")
                self._run(lambda s: s.assign("track_running_stats", on))
            elif kind == "load_statistics":
                seed = data.draw(st.integers(0, 9999), label="seed")
                self._run(lambda s: s.load_statistics(seed))
            else:
                self._run(lambda s: getattr(s, kind)())

        def _tracking_buffers(self) -> bool:
            s = self.session
            return s is not None and s.setup.track_running_stats and s.ref.running_mean is not None

    return Explore


@dataclass
class Exploration:
    ok: bool
    message: str = ""
    reproducer: str = ""
    examples: int = 0


def snippet(impl: Implementation, lines: list[str], message: str, rank: int) -> str:
    head = [
        f"# bnbench explore: the shortest sequence found where {impl.name} (rank {rank}) "
        "departs from nn.BatchNorm",
        *[f"# {line}" for line in message.splitlines()[:3]],
        "import copy",
        "",
        "import torch",
        "from torch import nn",
        "",
        "from bnbench.explore import explore_grad, explore_input, report, set_start_values",
        "from bnbench.registry import resolve",
        "",
        f"impl = resolve([{impl.name!r}])[0]",
    ]
    return "\n".join(head + lines) + "\n"


def explore(
    impl: Implementation,
    device: str,
    rank: int,
    *,
    seconds: float | None = None,
    examples: int = FAST_EXAMPLES,
    steps: int = STEPS_PER_EXAMPLE,
    fast_seconds: float = FAST_SECONDS,
    shrink_seconds: float = SHRINK_SECONDS,
) -> Exploration:
    """Explore ``impl`` at ``rank``: the fixed-seed profile (``seconds`` None: ``examples``
    sequences in a fixed order, cut short after ``fast_seconds`` for implementations that
    compile every new configuration), or fresh random searches until ``seconds`` have passed.
    Shrinking a failure gets ``shrink_seconds`` more."""
    from hypothesis import HealthCheck, Verbosity, settings
    from hypothesis.stateful import run_state_machine_as_test

    found: list[tuple[int, list[str], str]] = []
    start = time.monotonic()
    search_end = start + (fast_seconds if seconds is None else seconds)
    budget = Budget(search_end=search_end, shrink=shrink_seconds, deadline=search_end)
    cls = machine(impl, device, rank, found, budget)
    while True:
        profile = settings(
            settings.get_profile("default"),  # whatever profile the caller has loaded
            max_examples=examples,
            stateful_step_count=steps,
            derandomize=seconds is None,
            database=None,
            deadline=None,
            verbosity=Verbosity.quiet,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        try:
            run_state_machine_as_test(cls, settings=profile)
        except Exception:  # Mismatch once shrunk, or Hypothesis giving up (Flaky)
            if not found:
                # Not the implementation's doing (every failure of its own is a Mismatch, in
                # found): past the deadline sequences stop drawing, which Hypothesis may call
                # a flaky strategy. The search ran what it could, and found nothing.
                return Exploration(True, examples=budget.sequences)
            break
        if seconds is None or time.monotonic() >= budget.search_end:
            return Exploration(True, examples=budget.sequences)
    _, lines, message = min(found, key=lambda item: (item[0], len(item[2])))
    return Exploration(False, message, snippet(impl, lines, message, rank), budget.sequences)


# The test suite's own profile (set in its conftest): fewer sequences, so that the gate's
# pytest run over every implementation stays in budget. Users never set it.
QUICK_ENV = "BNBENCH_EXPLORE_QUICK"


def fast_profile() -> dict:
    if os.environ.get(QUICK_ENV) == "1":
        return {"examples": 6, "fast_seconds": 3.0, "shrink_seconds": 2.0}
    return {}


def explore_seconds() -> float | None:
    value = os.environ.get(SECONDS_ENV)
    return float(value) if value else None
