"""The Python API: what ``bnbench verify`` and ``bnbench bench`` do, for a notebook or a script.

::

    import bnbench

    verdict = bnbench.verify("mymodule:MyBatchNorm", cases=["default-*", "momentum*"])
    verdict.ok                 # what the CLI's exit code says
    verdict.failures           # the results that decide it
    verdict.to_frame()         # one row per (implementation, device, case), as a DataFrame

    timing = bnbench.benchmark(["builtin", "vectorized"], sweep="smoke", output="bench-out")
    timing.to_frame()          # results.csv as a DataFrame

The command line is a thin layer over these two: it resolves the same arguments, calls them and
prints what they return. Bad arguments raise :class:`bnbench.UsageError` naming what is wrong.
"""

from __future__ import annotations

import fnmatch
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from bnbench import gate
from bnbench.cases import Case, all_cases
from bnbench.registry import Implementation, UsageError, resolve, resolve_isolated
from bnbench.results import environment

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from bnbench.ab import ABResult

# The extras some features need, and the packages that stand for them.
EXTRAS = {
    "report": ("pandas", "matplotlib", "tabulate", "pydantic"),
    "models": ("sklearn",),
}


def missing_extra(extra: str) -> str | None:
    """None when the optional extra ``extra`` is installed; otherwise what to run to install it
    (a feature that needs it says so instead of dying with ModuleNotFoundError)."""
    import importlib.util

    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (
        f"this needs the '{extra}' extra ({', '.join(missing)} not installed): "
        f"pip install 'bnbench[{extra}]'"
    )


def require_extra(extra: str) -> None:
    problem = missing_extra(extra)
    if problem:
        raise UsageError(problem)


def _frame(records: list[dict]) -> pd.DataFrame:
    require_extra("report")
    import pandas as pd

    return pd.DataFrame.from_records(records)


# ---------------------------------------------------------------------------------------------
# verify


@dataclass
class VerifyResult:
    """What a gate run found: every (implementation, device, case) result, in a stable order.

    ``ok`` is what ``bnbench verify``'s exit code says: the run finished, something was
    verified and nothing unexpected failed (a declared deviation, a waived failure and a case
    the implementation does not support do not fail it)."""

    results: list[gate.Result]
    seconds: float
    interrupted: bool = False
    waivers: list[gate.Waiver] = field(default_factory=list)
    implementations: list[Implementation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return gate.passed(self.results) and not self.interrupted

    @property
    def failures(self) -> list[gate.Result]:
        """The results that fail the run (fail, unexpected-pass)."""
        return [r for r in self.results if not r.ok]

    def causes(self) -> list:
        """The failures grouped by root cause (bnbench.diagnose.Group: cause, cases, example,
        hint), one entry for a cause that shows in many cases."""
        from bnbench.diagnose import group_failures

        return group_failures(self.results)

    def summary(self) -> dict[str, dict[str, int]]:
        """Verdict counts per implementation@device."""
        counts: dict[str, dict[str, int]] = {}
        for r in self.results:
            group = counts.setdefault(f"{r.implementation}@{r.device}", {})
            group[str(r.verdict)] = group.get(str(r.verdict), 0) + 1
        return counts

    def to_frame(self) -> pd.DataFrame:
        """One row per result (pandas, the 'report' extra)."""
        return _frame(
            [
                {
                    "implementation": r.implementation,
                    "device": r.device,
                    "case": r.case,
                    "check": r.check,
                    "category": r.category,
                    "rank": r.rank,
                    "verdict": str(r.verdict),
                    "message": r.message,
                    "seconds": r.seconds,
                    "waiver": r.waiver.pattern if r.waiver else None,
                }
                for r in self.results
            ]
        )

    def to_json(self) -> str:
        return gate.to_json(self.results, environment(), self.waivers, interrupted=self.interrupted)

    def to_junit(self) -> str:
        return gate.to_junit(self.results)

    def __repr__(self) -> str:
        state = "interrupted" if self.interrupted else "ok" if self.ok else "FAILED"
        return (
            f"<VerifyResult {state}: {len(self.failures)} unexpected in {len(self.results)} "
            f"results, {self.seconds:.1f} s>"
        )


def select_cases(patterns: Iterable[str] = ()) -> list[Case]:
    """The cases whose id or check matches one of the globs (every case when none given)."""
    cases = all_cases()
    patterns = list(patterns)
    if not patterns:
        return cases
    chosen = [
        c
        for c in cases
        if any(fnmatch.fnmatchcase(c.id, p) or fnmatch.fnmatchcase(c.check, p) for p in patterns)
    ]
    if not chosen:
        raise UsageError(f"--case {' '.join(patterns)}: no case matches")
    return chosen


def implementations(
    impls: str | Implementation | Sequence[str | Implementation] | None,
    timeout: float = 120.0,
    distributed: bool = False,
) -> tuple[list[Implementation], list[str], bool]:
    """(implementations, their specs, whether they can run in worker processes). Names and
    MODULE:ATTR specs can (code that is not bnbench's own is imported first in a probe
    process); an Implementation object made here (in a notebook) cannot be imported by a
    worker, so a run that includes one runs in this process. With none named: every registered
    one of the kind the run is for (synchronized ones when ``distributed``, the others when
    not)."""
    if impls is None:
        items: list[str | Implementation] = []
    elif isinstance(impls, (str, Implementation)):
        items = [impls]
    else:
        items = list(impls)
    names = [i if isinstance(i, str) else i.name for i in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--impl {repeated[0]} is given more than once")
    specs = [i for i in items if isinstance(i, str)]
    isolated = len(specs) == len(items)
    if not items:
        chosen = [
            impl
            for impl in resolve_isolated(None, timeout=timeout)
            if impl.distributed == distributed
        ]
    else:
        # in this process with an object (a worker could not import it): the specs too
        found = iter(
            (resolve_isolated(specs, timeout=timeout) if isolated else resolve(specs))
            if specs
            else []
        )
        chosen = [next(found) if isinstance(i, str) else i for i in items]
    return chosen, [impl.name for impl in chosen], isolated


def devices_available(requested: Iterable[str] = ()) -> list[str]:
    """The requested devices (every available one when none), checked."""
    import torch

    requested = list(requested)
    if not requested:
        return gate.available_devices()
    for device in requested:
        if device not in ("cpu", "cuda"):
            raise UsageError(f"--device {device}: expected cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine")
    return list(dict.fromkeys(requested))


def bench_sweep(
    name: str,
    cache: str = "cold",
    dtypes: Sequence[str] = (),
    modes: Sequence[str] = (),
    memory_formats: Sequence[str] = (),
):
    """The sweep ``name`` with bench's options applied, checked (UsageError names what is
    wrong)."""
    import dataclasses

    from bnbench import benchmark as engine

    if name not in engine.SWEEPS:
        raise UsageError(f"sweep {name!r}: expected one of {', '.join(engine.SWEEPS)}")
    if cache not in ("cold", "warm"):
        raise UsageError(f"cache {cache!r}: expected cold or warm")
    for what, values, allowed in (
        ("--dtype", dtypes, tuple(engine.DTYPES)),
        ("--mode", modes, engine.MODES + ("train_step",)),
        ("--memory-format", memory_formats, ("contiguous", "channels_last")),
    ):
        for value in values:
            if value not in allowed:
                raise UsageError(f"{what} {value}: expected one of {', '.join(allowed)}")
    return dataclasses.replace(
        engine.SWEEPS[name],
        cache=cache,
        only_dtypes=tuple(dtypes),
        only_modes=tuple(modes),
        only_formats=tuple(memory_formats),
    )


def sweep_devices(sweep, requested: Iterable[str] = ()) -> list[str]:
    """The devices a bench of ``sweep`` runs on: those requested (checked), else every
    available one; a sweep meant for some device types only (the CUDA sweeps) refuses the
    others and, with none requested, takes the available ones of its kinds."""
    if not sweep.devices:
        return devices_available(requested)
    requested = list(requested)
    wrong = [d for d in requested if d not in sweep.devices]
    if wrong:
        raise UsageError(
            f"the {sweep.name} sweep runs on {' and '.join(sweep.devices)} only (its largest "
            f"rows move gigabytes), not --device {wrong[0]}: use --quick or --full there"
        )
    available = [d for d in gate.available_devices() if d in sweep.devices]
    if not requested and not available:
        raise UsageError(
            f"the {sweep.name} sweep runs on {' and '.join(sweep.devices)} only, and this "
            "machine has none"
        )
    return devices_available(requested or available)


def verify(
    impls: str | Implementation | Sequence[str | Implementation] | None = None,
    *,
    devices: Sequence[str] = (),
    cases: Sequence[str] = (),
    ignore: Sequence[str] = (),
    timeout: float = 120.0,
    explore_seconds: float | None = None,
    jobs: int | None = None,
    progress: Callable[[gate.Result], None] | None = None,
    started: Callable[[int], None] | None = None,
    prepared: tuple[list[Implementation], list[str], bool] | None = None,
    world_sizes: Sequence[int] = (),
) -> VerifyResult:
    """Verify implementations against nn.BatchNorm, as ``bnbench verify`` does.

    ``impls``: registered names, ``MODULE:ATTR`` specs or Implementation objects (default:
    every registered one). ``cases``: globs over case ids and checks (``--case``). ``ignore``:
    waivers, ``CATEGORY=REASON`` or ``GLOB=REASON`` (``--ignore``). ``explore_seconds``: fresh
    random sequences for that long per rank in the model-based exploration (``--explore``).
    Ctrl-C stops the run at once and returns what finished, with ``interrupted`` set.
    ``started(total)`` is told how many results to expect, ``progress(result)`` each one as it
    comes; ``prepared``: what :func:`implementations` returned, when the caller resolved them.

    ``world_sizes``: verify synchronized BatchNorms instead (bnbench.distributed), each in
    worlds of that many rank processes (``--world-size``); results go under ``cpu-ws2``..."""
    from bnbench.explore import SECONDS_ENV, SHRINK_SECONDS

    if world_sizes:
        return _verify_distributed(
            impls,
            devices=devices,
            cases=cases,
            ignore=ignore,
            timeout=timeout,
            progress=progress,
            started=started,
            prepared=prepared,
            world_sizes=world_sizes,
        )
    every = all_cases()
    try:
        # against every case, so that a waiver kept in CI survives a case selection
        waivers = list(dict.fromkeys(gate.parse_waiver(spec, every) for spec in ignore))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    selected = select_cases(cases)
    devices = devices_available(devices)
    # The workers read it (and a later verify in this process must not inherit it).
    os.environ.pop(SECONDS_ENV, None)
    if explore_seconds is not None:
        os.environ[SECONDS_ENV] = repr(float(explore_seconds))
        # the explore cases get the search, shrinking and slack before they count as hung
        timeout = max(timeout, explore_seconds + SHRINK_SECONDS + 60)
    start = time.perf_counter()
    chosen, specs, isolated = prepared or implementations(impls, timeout)
    _same_kind(chosen, distributed=False)
    if started:
        started(len(chosen) * len(devices) * len(selected))
    try:
        results = gate.run_gate(
            chosen,
            specs,
            devices,
            selected,
            timeout=timeout,
            jobs=jobs,
            isolate=isolated,
            progress=progress,
            waivers=waivers,
        )
        interrupted = False
    except gate.Interrupted as stopped:
        results, interrupted = stopped.results, True
    return VerifyResult(results, time.perf_counter() - start, interrupted, waivers, chosen)


def _same_kind(chosen: list[Implementation], distributed: bool) -> None:
    """A synchronized BatchNorm named for the single-process gate, or a plain one named with
    --world-size, would verify nothing: said at once (exit 2), not as a column of
    not-supported cases beside others that pass."""
    wrong = [
        impl.name for impl in chosen if impl.distributed != distributed and not impl.load_error
    ]
    if not wrong:
        return
    if distributed:
        raise UsageError(
            f"--impl {wrong[0]} is not a synchronized BatchNorm (its constructor takes no "
            "process_group): verify it without --world-size"
        )
    raise UsageError(
        f"--impl {wrong[0]} is a synchronized BatchNorm (nn.SyncBatchNorm's constructor): "
        "verify it with --world-size N"
    )


def _verify_distributed(
    impls, *, devices, cases, ignore, timeout, progress, started, prepared, world_sizes
) -> VerifyResult:
    from bnbench import distributed

    sizes = list(dict.fromkeys(int(w) for w in world_sizes))
    if any(w < 1 for w in sizes):
        raise UsageError(f"--world-size {min(sizes)}: expected 1 or more ranks")
    every = distributed.dist_cases()
    try:
        waivers = list(dict.fromkeys(gate.parse_waiver(spec, every) for spec in ignore))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    selected = distributed.select_dist_cases(cases)
    if not selected:
        raise UsageError(f"--case {' '.join(cases)}: no distributed case matches")
    devices = devices_available(devices)
    start = time.perf_counter()
    chosen, specs, isolated = prepared or implementations(impls, timeout, distributed=True)
    _same_kind(chosen, distributed=True)
    if not isolated:
        raise UsageError(
            "the distributed gate runs each rank in a worker process: give registered names or "
            "MODULE:ATTR specs, not Implementation objects"
        )
    if started:
        started(len(chosen) * len(devices) * len(sizes) * len(selected))
    try:
        results = distributed.run_dist_gate(
            chosen,
            specs,
            devices,
            sizes,
            selected,
            timeout=timeout,
            progress=progress,
            waivers=waivers,
        )
        interrupted = False
    except gate.Interrupted as stopped:
        results, interrupted = stopped.results, True
    return VerifyResult(results, time.perf_counter() - start, interrupted, waivers, chosen)


# ---------------------------------------------------------------------------------------------
# bench


@dataclass
class _TimedRows:
    """What a timing run wrote: its directory, its rows, how long it took."""

    directory: Path
    rows: list[dict[str, Any]]
    seconds: float

    def to_frame(self) -> pd.DataFrame:
        """The rows (the run's results table) as a DataFrame (pandas, the 'report' extra)."""
        return _frame(self.rows)

    @property
    def problems(self) -> list[dict[str, Any]]:
        """Rows that did not measure (error, nan, hung, crashed)."""
        from bnbench.results import Status

        return [r for r in self.rows if r["status"] not in (Status.OK, Status.NOT_SUPPORTED)]

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {len(self.rows)} rows ({len(self.problems)} not measured) "
            f"in {self.directory}, {self.seconds:.0f} s>"
        )


@dataclass(repr=False)
class BenchResult(_TimedRows):
    """A benchmark run: its directory (results.csv, samples.csv, environment.json) and rows."""

    def samples_frame(self) -> pd.DataFrame:
        """samples.csv (every raw sample, keyed by row) as a DataFrame."""
        require_extra("report")
        import pandas as pd

        return pd.read_csv(self.directory / "samples.csv")

    def summary(self, baseline: str = "builtin") -> list[str]:
        """Per implementation and device: time relative to the baseline and to the floor."""
        from bnbench.benchmark import summary_lines

        return summary_lines(self.rows, baseline)


def bench(
    impls: str | Sequence[str] | None = None,
    *,
    devices: Sequence[str] = (),
    sweep: str = "quick",
    output: str | os.PathLike = "bench-results",
    threads: int | None = None,
    timeout: float = 300.0,
    verify: bool = True,
    progress: Callable[[dict], None] | None = None,
    prepared: tuple[list[Implementation], list[str], bool] | None = None,
    world_sizes: Sequence[int] = (),
    cache: str = "cold",
    dtypes: Sequence[str] = (),
    modes: Sequence[str] = (),
    memory_formats: Sequence[str] = (),
) -> BenchResult | DistBenchResult:
    """Time forward/backward over a sweep, as ``bnbench bench`` does; results in ``output``.

    ``impls``: registered names or ``MODULE:ATTR`` specs (each runs in a worker process, so an
    Implementation object made in a notebook cannot be timed: register it in a module).
    ``sweep``: quick, full, smoke or calibration. ``verify``: run the gate case that vouches for
    each row. Raises KeyboardInterrupt on Ctrl-C, the finished rows kept in ``output``.

    ``world_sizes``: time synchronized BatchNorms instead (bnbench.dist_bench), in worlds of
    that many rank processes (``--world-size``), next to local nn.BatchNorm on each rank's
    shard; ``sweep`` quick, full or smoke picks the per-rank shapes and the timing budget; the
    rows go to ``output``/dist_results.csv and a DistBenchResult is returned. Nothing vouches
    for these rows (``verify`` does not apply): ``bnbench verify --world-size N`` checks them.

    On CUDA the quick and full sweeps run their CUDA sweeps (resnet50, resnet50-full: ResNet-50's
    BatchNorm shapes and a transformer head), each row timed as a call and as GPU time
    (bnbench.gpu); ``cache`` cold flushes the L2 between kernel repetitions, warm does not.
    ``dtypes``, ``modes``, ``memory_formats``: keep only these rows (empty: all)."""
    import csv

    from bnbench import benchmark as engine
    from bnbench.results import parse_row

    if world_sizes:
        return _bench_distributed(
            impls,
            devices=devices,
            sweep=sweep,
            output=output,
            threads=threads,
            timeout=timeout,
            progress=progress,
            prepared=prepared,
            world_sizes=world_sizes,
        )
    if sweep not in engine.SWEEPS:
        raise UsageError(f"sweep {sweep!r}: expected one of {', '.join(engine.SWEEPS)}")
    chosen_sweep = bench_sweep(sweep, cache, dtypes, modes, memory_formats)
    devices = sweep_devices(chosen_sweep, devices)
    if not any(chosen_sweep.on(d).rows() for d in devices):
        raise UsageError(
            f"sweep {sweep!r}: no row has "
            + ", ".join(
                f"{what} {' or '.join(values)}"
                for what, values in (
                    ("dtype", dtypes),
                    ("mode", modes),
                    ("memory format", memory_formats),
                )
                if values
            )
        )
    if any(row.model for d in devices for row in chosen_sweep.on(d).rows()):
        require_extra("models")
    chosen, specs, isolated = prepared or implementations(impls, timeout)
    if not isolated:
        raise UsageError(
            "bench runs each implementation in a worker process: give registered names or "
            "MODULE:ATTR specs, not Implementation objects"
        )
    start = time.perf_counter()
    directory = Path(output)
    engine.run_sweep(
        chosen,
        specs,
        devices,
        chosen_sweep,
        directory,
        threads=threads,
        timeout=timeout,
        verify=verify,
        progress=progress,
    )
    with open(directory / "results.csv", newline="") as f:
        rows = [parse_row(r) for r in csv.DictReader(f)]
    return BenchResult(directory, rows, time.perf_counter() - start)


@dataclass(repr=False)
class DistBenchResult(_TimedRows):
    """A run of synchronized BatchNorms across ranks (``bench(..., world_sizes=...)``): its
    directory (dist_results.csv, environment.json) and rows, one per implementation, device,
    world size, per-rank shape and mode."""

    def scaling(self) -> list[dict[str, Any]]:
        """The measured rows with their time relative to world size 1 and to local
        BatchNorm, and their communication share (None: n/a), per world size."""
        from bnbench.dist_bench import scaling

        return scaling(self.rows)

    def summary(self) -> list[str]:
        """Per implementation, device and world size: time relative to local BatchNorm and to
        one rank (geometric means), and the communication share."""
        from bnbench.dist_bench import summary_lines

        return summary_lines(self.rows)


def _bench_distributed(
    impls, *, devices, sweep, output, threads, timeout, progress, prepared, world_sizes
) -> DistBenchResult:
    from bnbench import dist_bench

    sizes = list(dict.fromkeys(int(w) for w in world_sizes))
    if any(w < 1 for w in sizes):
        raise UsageError(f"--world-size {min(sizes)}: expected 1 or more ranks")
    if sweep not in dist_bench.DIST_SWEEPS:
        raise UsageError(
            f"sweep {sweep!r} with --world-size: expected one of "
            f"{', '.join(dist_bench.DIST_SWEEPS)}"
        )
    devices = dist_bench.dist_devices(devices)
    chosen, specs, isolated = prepared or implementations(impls, timeout, distributed=True)
    _same_kind(chosen, distributed=True)
    if not isolated:
        raise UsageError(
            "bench --world-size runs each rank in a worker process: give registered names or "
            "MODULE:ATTR specs, not Implementation objects"
        )
    start = time.perf_counter()
    directory = Path(output)
    dist_bench.run_dist_bench(
        chosen,
        specs,
        devices,
        sizes,
        dist_bench.DIST_SWEEPS[sweep],
        directory,
        threads=threads,
        timeout=timeout,
        progress=progress,
    )
    return DistBenchResult(
        directory, dist_bench.read_dist_results(directory), time.perf_counter() - start
    )


# ---------------------------------------------------------------------------------------------
# ab


def ab(
    baseline: str,
    candidate: str,
    *,
    sweep: str = "quick",
    device: str = "cpu",
    threshold: float | None = None,
    threads: int | None = None,
    timeout: float = 120.0,
    baseline_path: str | os.PathLike | None = None,
    verify: bool = True,
    budget: float | None = None,
    seed: int | None = None,
    per_case: bool = False,
    progress: Callable[[Any], None] | None = None,
) -> ABResult:
    """Compare two implementations in one time window, as ``bnbench ab`` does: their timed
    blocks alternate in a randomized order over the sweep's cases, and each case's ratio
    candidate / baseline comes with an interval from the pairs (bnbench.ab).

    ``baseline``, ``candidate``: registered names or ``MODULE:ATTR`` specs (each side runs in a
    worker process of its own). ``baseline_path``: a directory the baseline's ``MODULE:ATTR`` is
    imported from (another checkout of the same module); the candidate's comes from the current
    directory. ``threshold``: percent (default bnbench.ab.DEFAULT_THRESHOLD_PCT). ``budget``:
    seconds of pairs per case at most (default: the sweep's). ``per_case``: a single slower case
    fails the gate too. ``threads``: per side (default 1; both sides pinned to the same CPUs).
    Ctrl-C returns what finished, with ``interrupted`` set."""
    import random

    from bnbench import ab as engine
    from bnbench.results import environment as machine

    for role, spec in (("baseline", baseline), ("candidate", candidate)):
        if not isinstance(spec, str) or not spec:
            raise UsageError(
                f"{role}: give a registered name or MODULE:ATTR (each side runs in a worker "
                "process: an Implementation object made here cannot be imported there)"
            )
    if sweep not in engine.PLANS:
        raise UsageError(f"sweep {sweep!r}: expected one of {', '.join(engine.PLANS)}")
    devices = devices_available([device])
    threshold = engine.DEFAULT_THRESHOLD_PCT if threshold is None else float(threshold)
    if not (0 <= threshold <= 10_000):
        raise UsageError(f"--threshold {threshold:g}: expected a percentage from 0 to 10000")
    if budget is not None and not (0 < budget <= 86_400):
        raise UsageError(f"--budget {budget:g}: expected seconds above 0")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: expected 1 or more")
    from bnbench.registry import _entry_points

    registered = _entry_points()
    for spec in (baseline, candidate):
        if ":" not in spec and spec not in registered:
            known = ", ".join(sorted(registered)) or "none"
            raise UsageError(
                f"unknown implementation {spec!r} (registered: {known}; or give MODULE:ATTR)"
            )
    path = os.path.abspath(baseline_path) if baseline_path else ""
    engine.check_baseline_path(baseline, path)
    rows = engine.select_rows(sweep, devices[0])
    if any(row.model for row in rows):
        require_extra("models")
    plan = engine.PLANS[sweep]
    if budget is not None:
        import dataclasses

        plan = dataclasses.replace(plan, case_budget_s=float(budget))
    seed = random.SystemRandom().randrange(2**31) if seed is None else int(seed)
    threads = threads or engine.DEFAULT_THREADS
    try:
        run = engine.run_ab(
            {"baseline": baseline, "candidate": candidate},
            rows,
            device=devices[0],
            threads=threads,
            plan=plan,
            threshold_pct=threshold,
            timeout=timeout,
            verify=verify,
            baseline_path=path,
            seed=seed,
            progress=progress,
        )
    except KeyboardInterrupt as stopped:
        run = getattr(stopped, "run", None) or engine.ABRun([], {}, 0.0, True)
    env = machine()
    env["cpus"] = engine.shared_cpus(threads)
    return engine.ABResult(
        baseline=baseline,
        candidate=candidate,
        baseline_path=path,
        device=devices[0],
        threads=threads,
        sweep=sweep,
        threshold_pct=threshold,
        per_case=per_case,
        seed=seed,
        plan=plan,
        cases=run.cases,
        files=run.files,
        seconds=run.seconds,
        interrupted=run.interrupted,
        environment=env,
    )
