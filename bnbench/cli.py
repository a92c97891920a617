"""The ``bnbench`` command line.

Exit codes: 0 when nothing unexpected failed, 1 when something did, 2 on usage errors.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bnbench import api, gate
from bnbench.cases import CATEGORIES, all_cases
from bnbench.registry import UsageError, entry_point_implementations
from bnbench.results import (
    VERDICT_LABELS,
    OutputInUse,
    Status,
    Verdict,
    check_writable_directory,
    check_writable_file,
    write_all_atomic,
)

STYLE = {
    Verdict.PASS: "green",
    Verdict.FAIL: "bold red",
    Verdict.DEVIATION: "yellow",
    Verdict.UNEXPECTED_PASS: "bold magenta",
    Verdict.WAIVED: "cyan",
    Verdict.NOT_SUPPORTED: "dim",
}


def _console() -> Console:
    # soft_wrap: a long failure line stays one line in logs (greppable); tables still fit.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def _cell(results: list[gate.Result]) -> tuple[str, str]:
    """One matrix cell: the worst verdict among the case's ranks, with counts where mixed."""
    counts = {v: sum(r.verdict == v for r in results) for v in STYLE}
    run = len(results) - counts[Verdict.NOT_SUPPORTED]
    for verdict in (Verdict.FAIL, Verdict.UNEXPECTED_PASS, Verdict.WAIVED, Verdict.DEVIATION):
        if counts[verdict]:
            label = VERDICT_LABELS[verdict]
            # how many of the ranks that ran: "FAIL 4/4" and "FAIL 1/4" are different bugs
            text = label if run == 1 else f"{label} {counts[verdict]}/{run}"
            return text, STYLE[verdict]
    if run == 0:
        return VERDICT_LABELS[Verdict.NOT_SUPPORTED], STYLE[Verdict.NOT_SUPPORTED]
    label = VERDICT_LABELS[Verdict.PASS]
    return (label if run == len(results) else f"{label} {run}/{len(results)}"), STYLE[Verdict.PASS]


def print_matrix(console: Console, results: list[gate.Result], verbose: bool) -> None:
    columns = list(dict.fromkeys(f"{r.implementation}@{r.device}" for r in results))
    # A column whose implementation supports nothing on that device says so once, below.
    silent = [
        c
        for c in columns
        if all(
            r.verdict == Verdict.NOT_SUPPORTED
            for r in results
            if f"{r.implementation}@{r.device}" == c
        )
    ]
    columns = [c for c in columns if c not in silent]
    # Rows under category headings, the categories in CATEGORIES' order (any other last).
    category = {r.case if verbose else r.check: r.category for r in results}
    rows = sorted(
        category,
        key=lambda row: (
            CATEGORIES.index(category[row]) if category[row] in CATEGORIES else len(CATEGORIES)
        ),
    )
    cells: dict[tuple[str, str], list[gate.Result]] = {}
    for r in results:
        cells.setdefault(
            (r.case if verbose else r.check, f"{r.implementation}@{r.device}"), []
        ).append(r)
    table = Table(title="bnbench verify: implementation x check", show_lines=False)
    table.add_column("case" if verbose else "check", no_wrap=True)
    for column in columns:
        # implementation over @device: headers two lines high, so that the table fits
        name, _, device = column.rpartition("@")
        table.add_column(f"{escape(name)}\n@{escape(device)}", no_wrap=True)
    heading = None
    for row in rows:
        if category[row] != heading:
            heading = category[row]
            if table.row_count:
                table.add_section()
            table.add_row(f"[bold]{heading or 'other'}[/]", *([""] * len(columns)))
        rendered = []
        for column in columns:
            text, style = _cell(cells.get((row, column), []))
            rendered.append(f"[{style}]{text}[/]")
        table.add_row(f"  {row}", *rendered)
    console.print(table)
    for column in silent:
        reason = next(r.message for r in results if f"{r.implementation}@{r.device}" == column)
        console.print(f"{column}: not run ({reason})", style="dim", markup=False)


def print_details(console: Console, results: list[gate.Result], verbose: bool) -> None:
    # One root cause often fails many cases (a slip in the running variance, a constructor
    # without device/dtype, an implementation that could not be loaded): one entry per cause,
    # with the cases it covers and one message in full (-v: every message).
    from bnbench.diagnose import group_failures

    for group in group_failures(results):
        column = f"{group.implementation}@{group.device}"
        if len(group.cases) == 1:
            first = group.results[0]
            what = f"{first.case} ({first.description})"
        else:
            names = ", ".join(group.cases[:6]) + (", ..." if len(group.cases) > 6 else "")
            what = f"{len(group.cases)} cases: {group.cause} ({names})"
        console.print(
            f"\n[bold red]{str(group.verdict).upper()}[/] {escape(column)} {escape(what)}"
        )
        shown = group.results if verbose else group.results[:1]
        for r in shown:
            if len(group.cases) > 1:
                console.print(f"  {r.case}:", markup=False)
            for line in r.message.splitlines():
                console.print(f"    {line}", markup=False)
    deviations: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if r.verdict == Verdict.DEVIATION:
            reason = r.message.splitlines()[0]
            deviations.setdefault((r.implementation, reason), []).append(r.case)
    if deviations:
        console.print("\n[yellow]Declared deviations (expected to fail):[/]")
        for (name, reason), case_ids in deviations.items():
            console.print(f"  {name}: {reason}", markup=False)
            console.print(f"    [dim]{', '.join(dict.fromkeys(case_ids))}[/]")
            if verbose:
                for r in results:
                    if r.implementation == name and r.case in case_ids:
                        for line in r.message.splitlines()[1:]:
                            console.print(f"      {r.case}: {line}", markup=False)
    print_waived(console, results, verbose)
    if verbose:
        print_not_supported(console, results)


def print_constructor_notes(console: Console, impls) -> None:
    """Said once, before the matrix: an implementation whose constructor lacks nn.BatchNorm's
    arguments, and the signature it should have."""

    for impl in impls:
        note = impl.constructor_note or (None if impl.load_error else _safe_note(impl))
        if note:
            console.print(f"{impl.name}: {note}", style="yellow", markup=False)


def _safe_note(impl) -> str | None:
    from bnbench.diagnose import constructor_problem

    try:
        return constructor_problem(impl)
    except Exception:  # the stand-in of a probed implementation cannot build modules
        return None


def print_not_supported(console: Console, results: list[gate.Result]) -> None:
    """With -v: why each case that did not run was not supported, once per reason."""
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if r.verdict == Verdict.NOT_SUPPORTED:
            reasons.setdefault((f"{r.implementation}@{r.device}", r.message), []).append(r.case)
    if not reasons:
        return
    console.print("\n[dim]Not supported (not run):[/]")
    for (column, reason), case_ids in reasons.items():
        shown = ", ".join(case_ids[:6]) + (", ..." if len(case_ids) > 6 else "")
        console.print(
            f"  {column}: {reason} ({len(case_ids)} cases: {shown})", style="dim", markup=False
        )


def print_waived(console: Console, results: list[gate.Result], verbose: bool) -> None:
    """Waived failures, per (implementation@device, waiver): the reason once, then one line per
    case with what it would have been (every line of it with -v)."""
    waived: dict[tuple[str, gate.Waiver], list[gate.Result]] = {}
    for r in results:
        if r.verdict == Verdict.WAIVED and r.waiver is not None:
            waived.setdefault((f"{r.implementation}@{r.device}", r.waiver), []).append(r)
    if not waived:
        return
    console.print("\n[cyan]Waived (--ignore: run and reported, not gated on):[/]")
    for (column, waiver), group in waived.items():
        console.print(f"  {column} {waiver.pattern}: {waiver.reason}", markup=False)
        for r in group:
            lines = r.message.splitlines()[1:]  # the first line is the reason
            for line in lines if verbose else lines[:1]:
                console.print(f"    {r.case}: {line}", markup=False)


def print_summary(
    console: Console, results: list[gate.Result], seconds: float, interrupted: bool = False
) -> None:
    groups: dict[str, dict[str, int]] = {}
    for r in results:
        g = groups.setdefault(f"{r.implementation}@{r.device}", {})
        g[r.verdict] = g.get(r.verdict, 0) + 1
    console.print()
    for name, counts in groups.items():
        parts = ", ".join(f"{counts[v]} {v}" for v in STYLE if counts.get(v))
        console.print(f"{name}: {parts}", markup=False)
    n_bad = sum(not r.ok for r in results)
    n_waived = sum(r.verdict == Verdict.WAIVED for r in results)
    n_run = sum(r.verdict == Verdict.PASS for r in results)
    if interrupted:
        status = "[bold red]INTERRUPTED[/]"
    elif n_bad or not n_run:
        status = "[bold red]FAILED[/]"
    else:
        status = "[bold green]OK[/]"
    tail = (
        " (not finished: the rest did not run)"
        if interrupted
        else ""
        if n_run
        else " (nothing was verified: no case passed; each was not supported, a declared "
        "deviation or waived)"
    )
    console.print(
        f"{status}: {n_bad} unexpected result(s) in {len(results)} "
        f"(implementation, device, case) combinations"
        + (f" ({n_waived} waived)" if n_waived else "")
        + f", {seconds:.1f} s{tail}"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnbench")
def main():
    """Verify and benchmark BatchNorm implementations against torch.nn.BatchNorm."""
    from bnbench.isolation import become_subreaper

    # what an implementation starts and detaches comes back to this process, to be killed
    become_subreaper()


def _need(*extras: str) -> None:
    """Usage error (exit 2) saying which ``pip install`` fixes a missing optional extra."""
    for extra in extras:
        problem = api.missing_extra(extra)
        if problem:
            command = click.get_current_context().command_path
            raise click.UsageError(f"{command}: {problem}")


def _check_outputs(files=(), directories=()) -> None:
    """Usage error (exit 2) naming the first output that cannot be written, before any work."""
    for path in files:
        problem = check_writable_file(path) if path else None
        if problem:
            raise click.UsageError(f"cannot write the output {problem}")
    for path in directories:
        problem = check_writable_directory(path)
        if problem:
            raise click.UsageError(f"cannot write the output directory {problem}")


class _Signals:
    """SIGTERM and SIGHUP take the Ctrl-C path (workers killed, finished work written); the
    exit code then says which signal: 128 + its number (130 for Ctrl-C)."""

    def __init__(self):
        self.number = signal.SIGINT

    def __enter__(self):
        self._previous = {}
        # SIGINT too: a shell that starts bnbench in the background may have it ignored
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[number] = signal.signal(number, self._raise)
        return self

    def _raise(self, number, frame):
        self.number = signal.Signals(number)
        raise KeyboardInterrupt()

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.number)


class _Progress:
    """Progress you can see: on a terminal a live bar with the count, elapsed time and an ETA;
    elsewhere (a CI log) a line every LOG_EVERY_S seconds with the same figures."""

    LOG_EVERY_S = 15.0

    def __init__(self, console: Console, label: str):
        self.console, self.label = console, label
        self.total: int | None = None
        self.done = self.timed = 0
        self.begin = self.last = time.monotonic()
        self.bar: Progress | None = None

    def __enter__(self) -> _Progress:
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=self.console,
                transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=None)
        return self

    def start(self, total: int) -> None:
        self.total = total
        self.begin = self.last = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def advance(self, description: str, timed: bool = True) -> None:
        """One more item; ``timed=False`` for one that took no time (not supported), which
        must not make the ETA think the rest will be as quick."""
        self.done += 1
        self.timed += timed
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=escape(description))
            return
        now = time.monotonic()
        if now - self.last >= self.LOG_EVERY_S:
            self.last = now
            elapsed = now - self.begin
            left = (
                f", about {elapsed / self.timed * (self.total - self.done):.0f} s left"
                if self.total and self.timed
                else ""
            )
            of = f"/{self.total}" if self.total else ""
            self.console.print(
                f"{self.label}: {self.done}{of} in {elapsed:.0f} s{left} ({description})",
                markup=False,
                highlight=False,
            )

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


@main.command()
@click.option(
    "--impl",
    "impl_specs",
    multiple=True,
    metavar="NAME|MODULE:ATTR",
    help="Implementation to verify: a registered name, or MODULE:ATTR naming a "
    "bnbench.Implementation or an nn.Module class with nn.BatchNorm2d's "
    "constructor. Repeatable. Default: every registered implementation.",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    type=click.Choice(["cpu", "cuda"]),
    help="Device to verify on. Repeatable. Default: every available device.",
)
@click.option(
    "--case",
    "case_patterns",
    multiple=True,
    metavar="GLOB",
    help="Only cases whose id or check matches GLOB (e.g. 'momentum*'). Repeatable.",
)
@click.option(
    "--ignore",
    "ignore_specs",
    multiple=True,
    metavar="CATEGORY|GLOB=REASON",
    help="Waive a category (" + ", ".join(CATEGORIES) + ") or the cases whose id or check "
    "matches GLOB, with a reason: they still run, a failure among them is reported as "
    "waived and does not decide the exit code. Repeatable.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Write every result, with the environment, as JSON.",
)
@click.option(
    "--junit",
    "junit_path",
    type=click.Path(dir_okay=False),
    help="Write JUnit XML (one testsuite per implementation@device and category).",
)
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds a single case may take before it counts as hung.",
)
@click.option(
    "--explore",
    "explore_seconds",
    type=click.FloatRange(min=1),
    default=None,
    metavar="SECONDS",
    help="Search SECONDS per rank with fresh random sequences in the model-based exploration "
    "(the explore-rank* cases) instead of its fixed-seed fast profile.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes in parallel. Default: one per core.",
)
@click.option(
    "--world-size",
    "world_sizes",
    multiple=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Verify synchronized BatchNorms (nn.SyncBatchNorm's constructor, process_group) across "
    "N rank processes: gloo on 127.0.0.1 for cpu, NCCL with one GPU per rank for cuda. "
    "Repeatable. Default: the single-process gate of the other implementations.",
)
@click.option("-v", "--verbose", is_flag=True, help="One row per case instead of per check.")
def verify(
    impl_specs,
    devices,
    case_patterns,
    ignore_specs,
    json_path,
    junit_path,
    timeout,
    explore_seconds,
    jobs,
    world_sizes,
    verbose,
):
    """Check implementations against nn.BatchNorm semantics; exit 1 on an unexpected result
    or when nothing was verified, 2 on bad usage, 130 on Ctrl-C (143 on SIGTERM), after
    writing what finished."""
    if json_path and junit_path and os.path.realpath(json_path) == os.path.realpath(junit_path):
        raise click.UsageError(f"--json and --junit are the same file: {json_path}")
    _check_outputs(files=(json_path, junit_path))
    console = _console()
    with _Signals() as signals, _Progress(console, "verify") as bar:
        try:
            outcome = api.verify(
                list(impl_specs) or None,
                devices=devices,
                cases=case_patterns,
                ignore=ignore_specs,
                timeout=timeout,
                explore_seconds=explore_seconds,
                jobs=jobs,
                world_sizes=world_sizes,
                started=bar.start,
                progress=lambda r: bar.advance(
                    f"{r.implementation} {r.case}", timed=r.verdict != Verdict.NOT_SUPPORTED
                ),
            )
        except UsageError as exc:
            raise click.UsageError(str(exc)) from exc
        except KeyboardInterrupt:  # before the gate started (loading the implementations)
            outcome = api.VerifyResult([], 0.0, interrupted=True)
    results, interrupted = outcome.results, outcome.interrupted
    print_constructor_notes(console, outcome.implementations)
    print_matrix(console, results, verbose)
    print_details(console, results, verbose)
    for waiver in gate.unused_waivers(results, outcome.waivers):
        console.print(
            f"[dim]--ignore {escape(waiver.pattern)}: waived nothing in this run (what it "
            "matches passed, was not supported or not run, or an earlier --ignore waived it)[/]"
        )
    print_summary(console, results, outcome.seconds, interrupted=interrupted)
    outputs = {}
    if json_path:
        outputs[json_path] = outcome.to_json()
    if junit_path:
        outputs[junit_path] = outcome.to_junit()
    write_all_atomic(outputs)  # both or neither
    if interrupted:
        sys.exit(signals.exit_code)
    sys.exit(0 if outcome.ok else 1)


def _print_bench_summary(console: Console, directory, baseline: str = "builtin") -> list[dict]:
    """Per implementation: time relative to the baseline and to the floor; returns the rows."""
    import csv

    from bnbench import benchmark as engine
    from bnbench.results import parse_row

    with open(directory / "results.csv") as f:
        rows = [parse_row(r) for r in csv.DictReader(f)]
    for line in engine.summary_lines(rows, baseline):
        console.print(line, markup=False)
    return rows


@main.command()
@click.option(
    "--impl",
    "impl_specs",
    multiple=True,
    metavar="NAME|MODULE:ATTR",
    help="Implementation to benchmark (as for verify). Repeatable. Default: all.",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    type=click.Choice(["cpu", "cuda"]),
    help="Device. Repeatable. Default: every available device.",
)
@click.option(
    "--quick",
    "sweep_name",
    flag_value="quick",
    default=True,
    help="The quick sweep: under 3 minutes for the built-ins on 2 cores (default).",
)
@click.option("--full", "sweep_name", flag_value="full", help="The full sweep.")
@click.option(
    "--smoke",
    "sweep_name",
    flag_value="smoke",
    help="A few rows in seconds, to try an implementation out.",
)
@click.option(
    "--calibration",
    "sweep_name",
    flag_value="calibration",
    help="Two large forward rows where work dominates, for checking the timer and "
    "compare against a workload of known cost.",
)
@click.option(
    "--resnet50",
    "sweep_name",
    flag_value="resnet50",
    help="The CUDA sweep (what --quick runs on a GPU): every distinct BatchNorm shape of "
    "ResNet-50 at 32 and 256 images and a transformer's BatchNorm1d head, float32/bfloat16/"
    "float16, contiguous and channels_last, training forward and forward+backward. CUDA only.",
)
@click.option(
    "--warm-cache",
    is_flag=True,
    help="CUDA: do not flush the L2 between kernel repetitions (default: flushed, cold cache).",
)
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    metavar="DTYPE",
    help="Keep only rows of this dtype (float32, bfloat16, float16, float64). Repeatable.",
)
@click.option(
    "--mode",
    "modes",
    multiple=True,
    metavar="MODE",
    help="Keep only rows of this mode (forward_train, forward_eval, backward, "
    "forward_backward, train_step). Repeatable.",
)
@click.option(
    "--memory-format",
    "memory_formats",
    multiple=True,
    type=click.Choice(["contiguous", "channels_last"]),
    help="Keep only rows of this memory format. Repeatable.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    default="bench-results",
    show_default=True,
    help="Directory for results.csv, samples.csv, environment.json.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for every measurement (recorded). Default: every core.",
)
@click.option(
    "--timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds one row may take before the implementation counts as hung.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Do not run the gate case that vouches for each row (rows say not-run).",
)
@click.option(
    "--world-size",
    "world_sizes",
    multiple=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Time synchronized BatchNorms across N rank processes instead (gloo on 127.0.0.1 for "
    "cpu, NCCL with one GPU per rank for cuda), at a fixed per-rank batch, next to local "
    "nn.BatchNorm on each rank's shard, with the share of time spent communicating; writes "
    "dist_results.csv. Repeatable: give 1 for the baseline. --threads is per rank.",
)
def bench(
    impl_specs,
    devices,
    sweep_name,
    warm_cache,
    dtypes,
    modes,
    memory_formats,
    output,
    threads,
    timeout,
    no_verify,
    world_sizes,
):
    """Time forward/backward over a sweep; write a tidy results table.

    On a GPU each row is timed twice: the call as a training loop makes it, and the GPU time
    with launch overhead removed (a CUDA graph, the L2 flushed between repetitions), with the
    bandwidth as a share of a copy of the same size and the GPU's clocks and power."""
    from pathlib import Path

    _check_outputs(directories=(output,))
    console = _console()
    if world_sizes:
        _bench_distributed(
            console, impl_specs, devices, sweep_name, output, threads, timeout, world_sizes
        )
        return
    try:
        sweep = api.bench_sweep(
            sweep_name, "warm" if warm_cache else "cold", dtypes, modes, memory_formats
        )
    except UsageError as exc:
        raise click.UsageError(str(exc)) from exc
    with _Signals() as signals, _Progress(console, f"bench {sweep.name}") as bar:
        try:
            chosen_devices = api.sweep_devices(sweep, devices)
            prepared = api.implementations(list(impl_specs) or None, timeout)
            bar.start(len(prepared[0]) * sum(len(sweep.on(d).rows()) for d in chosen_devices))
            timing = api.bench(
                devices=chosen_devices,
                sweep=sweep_name,
                cache=sweep.cache,
                dtypes=dtypes,
                modes=modes,
                memory_formats=memory_formats,
                output=output,
                threads=threads,
                timeout=timeout,
                verify=not no_verify,
                progress=lambda row: bar.advance(
                    f"{row['implementation']} {row['mode']} {row['shape']} {row['dtype']}",
                    timed=row["status"] != Status.NOT_SUPPORTED,
                ),
                prepared=prepared,
            )
        except (UsageError, OutputInUse) as exc:
            raise click.UsageError(str(exc)) from exc
        except KeyboardInterrupt:
            console.print(
                f"interrupted: the finished rows are in {output}/results.csv", markup=False
            )
            sys.exit(signals.exit_code)
    assert isinstance(timing, api.BenchResult)
    rows = timing.rows
    for line in timing.summary():
        console.print(line, markup=False)
    bad = [r for r in rows if r["status"] not in (Status.OK, Status.NOT_SUPPORTED)]
    for r in bad:
        console.print(
            f"{r['status']} {r['implementation']}@{r['device']} {r['mode']} "
            f"{r['shape']} {r['dtype']}: {r['message']}",
            style="red",
            markup=False,
        )
    console.print(
        f"{len(rows)} rows in {time.monotonic() - bar.begin:.0f} s: {Path(output) / 'results.csv'}",
        markup=False,
    )


def _bench_distributed(
    console: Console, impl_specs, devices, sweep_name, output, threads, timeout, world_sizes
) -> None:
    """bench --world-size: time synchronized BatchNorms across ranks; print how the cost grows
    with the number of ranks."""
    from pathlib import Path

    from rich.text import Text

    from bnbench import dist_bench

    if sweep_name not in dist_bench.DIST_SWEEPS:
        raise click.UsageError(
            f"--{sweep_name} has no --world-size sweep (use --quick, --full or --smoke)"
        )
    sweep = dist_bench.DIST_SWEEPS[sweep_name]
    sizes = list(dict.fromkeys(world_sizes))
    with _Signals() as signals, _Progress(console, f"bench --world-size {sweep.name}") as bar:
        try:
            chosen_devices = dist_bench.dist_devices(devices)
            prepared = api.implementations(list(impl_specs) or None, timeout, distributed=True)
            bar.start(len(prepared[0]) * len(chosen_devices) * len(sizes) * len(sweep.rows()))
            outcome = api.bench(
                devices=chosen_devices,
                sweep=sweep_name,
                output=output,
                threads=threads,
                timeout=timeout,
                progress=lambda row: bar.advance(
                    f"{row['implementation']} {row['device']} x{row['world_size']} "
                    f"{row['mode']} {row['shape']}",
                    timed=row["status"] != Status.NOT_SUPPORTED,
                ),
                prepared=prepared,
                world_sizes=sizes,
            )
        except (UsageError, OutputInUse) as exc:
            raise click.UsageError(str(exc)) from exc
        except KeyboardInterrupt:
            console.print(
                f"interrupted: the finished rows are in {output}/{dist_bench.DIST_RESULTS}",
                markup=False,
            )
            sys.exit(signals.exit_code)
    assert isinstance(outcome, api.DistBenchResult)
    rows = outcome.rows
    table = Table(
        title="Synchronized BatchNorm across ranks (per-rank batch fixed; time: the slowest "
        "rank's median)",
        title_justify="left",
    )
    for name in ("implementation", "device", "shape/rank", "mode", "ranks"):
        table.add_column(name)
    for name in ("time", "vs 1 rank", "vs local BN", "comm share"):
        table.add_column(name, justify="right")
    previous = None
    for r in outcome.scaling():
        group = (r["implementation"], r["device"], r["shape"], r["mode"])
        if previous is not None and group[:3] != previous[:3]:
            table.add_section()
        shown = [Text(str(v)) for v in group] if group != previous else [Text("")] * 4
        previous = group
        ratio = r["vs_world_size_1"]
        table.add_row(
            *shown,
            Text(f"{r['world_size']}{'*' if r['oversubscribed'] else ''}"),
            Text(f"{r['median_s'] * 1e6:.0f} us"),
            Text("" if ratio is None else f"{ratio:.2f}x"),
            Text("" if r["vs_local"] is None else f"{r['vs_local']:.2f}x"),
            Text(dist_bench.share_text(r["comm_share"])),
        )
    if table.row_count:
        console.print(table)
    for line in outcome.summary():
        console.print(line, markup=False)
    for note in dist_bench.oversubscription_notes(rows):
        console.print(f"* {note}", markup=False)
    unsupported: dict[tuple, str] = {}
    for r in rows:
        if r["status"] == Status.NOT_SUPPORTED:
            unsupported.setdefault(
                (r["implementation"], r["device"], r["world_size"]), r["message"]
            )
        elif r["status"] != Status.OK:
            console.print(
                f"{r['status']} {r['implementation']}@{r['device']} x{r['world_size']} "
                f"{r['mode']} {r['shape']}: {r['message']}",
                style="red",
                markup=False,
            )
    for (impl, device, size), reason in unsupported.items():
        console.print(f"not supported: {impl}@{device} x{size}: {reason}", markup=False)
    console.print(
        f"{len(rows)} rows in {time.monotonic() - bar.begin:.0f} s: "
        f"{Path(output) / dist_bench.DIST_RESULTS}",
        markup=False,
    )


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="RESULTS...")
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    required=True,
    help="Directory for report.md, report.html (self-contained) and plots/*.png.",
)
@click.option(
    "--baseline",
    default="builtin",
    show_default=True,
    metavar="NAME",
    help="Implementation every time is compared with.",
)
def report(inputs, output, baseline):
    """Write a comparison report from bnbench bench directories and/or pytest-benchmark JSON."""
    _need("report")
    from bnbench.report import write_report
    from bnbench.runs import ReportInputError

    _check_outputs(directories=(output,))
    try:
        path = write_report(list(inputs), output, baseline=baseline)
    except ReportInputError as exc:
        raise click.UsageError(str(exc)) from exc
    _console().print(f"report: {path}")


@main.command()
@click.argument("baseline", metavar="BASELINE")
@click.argument("new", metavar="NEW")
@click.option(
    "--threshold",
    default=25.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Percent slowdown that counts: flagged only when the whole 95% interval "
    "lies above 1 + PCT/100.",
)
@click.option(
    "--per-case",
    is_flag=True,
    help="Let single cases fail the gate too (for quiet machines): by default the "
    "gate decides on each implementation's geometric mean over its cases.",
)
@click.option(
    "--metric",
    type=click.Choice(["call", "kernel"]),
    default="call",
    show_default=True,
    help="What to compare: the call time, or (CUDA rows) the GPU time with launch overhead "
    "removed, which a kernel regression shows in even where launches dominate the call.",
)
def compare(baseline, new, threshold, per_case, metric):
    """NEW / BASELINE per implementation and case; exit 1 on a regression or on rows measured in
    BASELINE but not in NEW, 2 on bad input. Runs made at different times carry the machine's
    drift between them: to gate a change, prefer `bnbench ab BASELINE CANDIDATE`, which measures
    both in one run, interleaved; keep compare for history."""
    _need("report")
    from bnbench.regression import LISTED, compare_implementations, printable
    from bnbench.regression import compare as compare_stored
    from bnbench.runs import ReportInputError

    try:
        result = compare_stored(baseline, new, threshold, metric=metric)
    except ReportInputError as exc:
        raise click.UsageError(str(exc)) from exc
    cases = result.cases
    summary = compare_implementations(cases, threshold)
    console = _console()
    methods = ", ".join(sorted((set(summary.method) | set(cases.method)) - {"none"}))
    what = "" if metric == "call" else " of the kernel time"
    table = Table(
        title=f"NEW / BASELINE{what}, 95% intervals ({methods}), threshold {threshold:g}%"
    )
    for column in ("implementation", "device", "cases", "geomean ratio", "95% interval", "verdict"):
        table.add_column(column)
    for r in summary.itertuples():
        style = {"regression": "bold red", "improvement": "green"}.get(r.verdict, "")
        table.add_row(
            escape(printable(r.implementation)),
            escape(printable(r.device)),
            str(r.cases),
            f"{r.geomean_ratio:.3f}",
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
            f"[{style}]{r.verdict}[/]" if style else r.verdict,
        )
    console.print(table)

    def key(r) -> str:
        return printable(
            f"{r.implementation}@{r.device} {r.mode} {r.shape} {r.dtype} {r.memory_format}"
            + (f" {r.model}" if r.model else "")
        )

    def listing(lines: list[str], total: int, what: str) -> None:
        for line in lines:
            console.print(line, markup=False, highlight=False)
        if total > len(lines):
            console.print(f"  ... and {total - len(lines)} more {what}", markup=False)

    flagged = cases[cases.verdict != "same"]
    listing(
        [
            f"  case {r.verdict}: {key(r)}: {r.ratio:.3f} [{r.ci_low:.3f}, "
            f"{r.ci_high:.3f}] ({r.method})"
            for r in flagged.head(LISTED).itertuples()
        ],
        len(flagged),
        "flagged cases",
    )
    lost, added = result.lost, result.added
    listing(
        [
            f"  lost: measured in BASELINE, not in NEW: {r.new_status}: {key(r)}"
            + (f": {printable(r.message)[:200]}" if r.message else "")
            for r in lost.head(LISTED).itertuples()
        ],
        len(lost),
        "lost rows",
    )
    listing(
        [
            f"  new: measured in NEW only (BASELINE: {r.baseline_status}): {key(r)}"
            for r in added.head(LISTED).itertuples()
        ],
        len(added),
        "rows only in NEW",
    )
    regressed = (summary.verdict == "regression").any() or (
        per_case and (cases.verdict == "regression").any()
    )
    implausible = int((cases.verdict == "implausible").sum())
    if regressed or len(lost) or implausible:
        why = ["slower"] if regressed else []
        why += [f"{len(lost)} rows measured in BASELINE are not in NEW"] if len(lost) else []
        why += (
            [f"{implausible} cases changed over 1000x (a broken measurement)"]
            if implausible
            else []
        )
        console.print(f"[bold red]REGRESSION[/] ({'; '.join(why)})")
    else:
        console.print("[green]no regression[/]")
    sys.exit(1 if regressed or len(lost) or implausible else 0)


VERDICT_STYLE = {"slower": "bold red", "faster": "green", "same": "", "unsure": "yellow"}


@main.command("ab")
@click.argument("baseline", metavar="BASELINE")
@click.argument("candidate", metavar="CANDIDATE")
@click.option(
    "--quick",
    "sweep_name",
    flag_value="quick",
    default=True,
    help="The quick sweep's cases (default): under 2 minutes for one pair on 2 cores.",
)
@click.option("--full", "sweep_name", flag_value="full", help="The full sweep's cases.")
@click.option("--smoke", "sweep_name", flag_value="smoke", help="A few cases in seconds.")
@click.option(
    "--threshold",
    default=None,
    type=click.FloatRange(min=0, max=10_000),
    metavar="PCT",
    help="Percent that counts: slower only when the whole 95% interval lies above "
    "1 + PCT/100, same when it lies within [1/(1 + PCT/100), 1 + PCT/100]. Default 10.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Write every case (with its raw pairs), the verdicts and the environment as JSON; "
    "name it ab.json in a results directory and `bnbench report` shows it.",
)
@click.option(
    "--baseline-path",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Import the baseline's MODULE:ATTR from DIR (e.g. a worktree of the main branch); "
    "the candidate's comes from the current directory. Only the baseline's worker sees DIR.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads per side. Default 1 (both sides pinned to the same CPUs: on a shared "
    "machine, more threads mostly measure the neighbours).",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0.01, max=86_400),
    default=None,
    metavar="SECONDS",
    help="Seconds of pairs per case at most (default: smoke 0.3, quick 1.2, full 3). A case "
    "stops earlier once its interval decides.",
)
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds a side may take to answer (prepare a case, run a block) before it counts "
    "as hung.",
)
@click.option("--seed", type=int, default=None, help="Seed of the randomized order (recorded).")
@click.option(
    "--per-case",
    is_flag=True,
    help="Let a single slower case fail the gate too: by default the gate decides on the "
    "geometric mean over the cases.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Do not run the gate case that vouches for each case (a side that fails it gets no "
    "speed verdict).",
)
def ab_command(
    baseline,
    candidate,
    sweep_name,
    threshold,
    json_path,
    baseline_path,
    device,
    threads,
    budget,
    timeout,
    seed,
    per_case,
    no_verify,
):
    """CANDIDATE / BASELINE, both measured in one run: their timed blocks alternate in a
    randomized order (two worker processes), and each case's ratio comes with a 95% interval
    from the pairs. Verdicts per case and overall: faster, slower, same or unsure. Exit 1 when
    the candidate is slower or failed cases the baseline measured, 2 on bad usage, 130 on
    Ctrl-C (after writing what finished)."""
    from bnbench import ab as engine

    _check_outputs(files=(json_path,))
    console = _console()
    with _Signals() as signals, _Progress(console, f"ab {sweep_name}") as bar:
        try:
            rows = engine.select_rows(sweep_name, device)
            bar.start(len(rows))
            outcome = api.ab(
                baseline,
                candidate,
                sweep=sweep_name,
                device=device,
                threshold=threshold,
                threads=threads,
                timeout=timeout,
                baseline_path=baseline_path,
                verify=not no_verify,
                budget=budget,
                seed=seed,
                per_case=per_case,
                progress=lambda case: bar.advance(
                    f"{case.key}: {case.verdict or case.status}",
                    timed=case.status != "not-supported",
                ),
            )
        except UsageError as exc:
            raise click.UsageError(str(exc)) from exc
        except KeyboardInterrupt:  # before the first case (loading the implementations)
            console.print("interrupted", markup=False)
            sys.exit(signals.exit_code)
    print_ab(console, outcome)
    if json_path:
        write_all_atomic({json_path: outcome.to_json()})
    if outcome.interrupted:
        sys.exit(signals.exit_code)
    sys.exit(0 if outcome.ok else 1)


def _times(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def print_ab(console: Console, outcome) -> None:
    """The cases' table, the cases that were not compared, the verdict and the exit's reasons."""
    from rich.text import Text

    from bnbench import ab as engine
    from bnbench.regression import printable

    threshold = outcome.threshold_pct
    table = Table(
        title=f"{printable(outcome.candidate)} / {printable(outcome.baseline)} "
        f"({outcome.device}, {outcome.threads} thread(s)): interleaved pairs, 95% intervals, "
        f"threshold {threshold:g}%",
        title_justify="left",
    )
    for column in ("case", "baseline", "candidate"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for column in ("ratio", "95% interval", "pairs", "verdict"):
        table.add_column(column, justify="right" if column != "verdict" else "left")
    for case in outcome.cases:
        if case.status != "ok":
            continue
        style = VERDICT_STYLE.get(case.verdict, "")
        table.add_row(
            Text(printable(case.key)),
            Text(_times(case.baseline_s)),
            Text(_times(case.candidate_s)),
            Text(f"{case.ratio:.3f}"),
            Text(f"[{case.ci_low:.3f}, {case.ci_high:.3f}]"),
            Text(str(case.pairs)),
            Text(case.verdict, style=style),
        )
    if table.row_count:
        console.print(table)
    for case in outcome.cases:
        if case.status == "ok" and case.verdict == "unsure":
            console.print(
                f"  unsure: {printable(case.key)}: "
                + engine.settle_text(case.settle, case.timed_s),
                markup=False,
            )
    for case in outcome.cases:
        if case.status == "ok":
            continue
        style = "red" if case.lost else "dim" if case.status == "not-supported" else "yellow"
        console.print(
            f"  {case.status}: {printable(case.key)}: {printable(case.message)[:400]}",
            style=style,
            markup=False,
        )
    summary = outcome.summary
    counts = ", ".join(f"{n} {v}" for v, n in summary.counts.items() if n)
    if summary.ratio is None:
        console.print(f"nothing compared ({len(outcome.cases)} cases)", markup=False)
    else:
        console.print(
            Text.assemble(
                f"geometric mean over {summary.cases} cases: {summary.ratio:.3f} "
                f"[{summary.ci_low:.3f}, {summary.ci_high:.3f}]: ",
                (summary.verdict, VERDICT_STYLE.get(summary.verdict, "")),
                f" ({counts}; {outcome.seconds:.0f} s)",
            )
        )
        if summary.verdict == "unsure":
            timed = sum(c.timed_s for c in outcome.cases if c.status == "ok")
            console.print(
                "  unsure: " + engine.settle_text(summary.settle, timed, " overall"),
                markup=False,
            )
    if outcome.ok:
        console.print("[green]not slower[/]")
    else:
        console.print(f"[bold red]FAILED[/] ({escape('; '.join(outcome.reasons()))})")


class _ConsoleListener:
    """Prints what ``bnbench run`` is doing."""

    def __init__(self, console: Console, baseline: str):
        self.console, self.baseline = console, baseline
        self.bar: _Progress | None = None

    def stage(self, number: int, total: int, title: str) -> None:
        self.close()
        self.console.print(f"[bold]{number}/{total}[/] {escape(title)}")

    def counting(self, what: str, total: int) -> None:
        self.close()
        self.bar = _Progress(self.console, what).__enter__()
        self.bar.start(total)

    def advance(self, description: str, timed: bool = True) -> None:
        if self.bar is not None:
            self.bar.advance(description, timed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def verified(self, results: list[gate.Result], seconds: float) -> None:
        self.close()
        print_matrix(self.console, results, verbose=False)
        print_summary(self.console, results, seconds)

    def benchmarked(self, directory) -> None:
        self.close()
        _print_bench_summary(self.console, directory, self.baseline)

    def line(self, text: str) -> None:
        self.console.print(text, markup=False)


@main.command()
@click.option(
    "--name",
    default=None,
    help="Report directory name under reports/. Default: HOST-YYYYMMDD-HHMM.",
)
@click.option(
    "--reports-dir", type=click.Path(file_okay=False), default="reports", show_default=True
)
@click.option(
    "--impl",
    "impl_specs",
    multiple=True,
    metavar="NAME|MODULE:ATTR",
    help="Implementations (as for verify). Default: every registered one.",
)
@click.option("--device", "devices", multiple=True, type=click.Choice(["cpu", "cuda"]))
@click.option(
    "--sweep",
    "sweep_name",
    type=click.Choice(["quick", "full", "smoke"]),
    default="quick",
    show_default=True,
    help="Which benchmark sweep to run.",
)
@click.option(
    "--baseline",
    default="builtin",
    show_default=True,
    metavar="NAME",
    help="Implementation the report compares every time with.",
)
def run(name, reports_dir, impl_specs, devices, sweep_name, baseline):
    """The main job: verify, a quick benchmark, BN against no BN, a report: reports/NAME/."""
    import socket
    from datetime import datetime
    from pathlib import Path

    _need("report", "models")
    from bnbench import pipeline

    try:
        devices = api.devices_available(devices)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from exc
    name = name or f"{socket.gethostname()}-{datetime.now():%Y%m%d-%H%M}"
    output = Path(reports_dir) / name
    _check_outputs(directories=(output,))
    console = _console()
    listener = _ConsoleListener(console, baseline)
    with _Signals() as signals:
        try:
            impls, specs, _ = api.implementations(list(impl_specs) or None)
            if impl_specs:  # the synchronized ones named go to the distributed gate
                sync = [(i, s) for i, s in zip(impls, specs) if i.distributed]
                plain = [(i, s) for i, s in zip(impls, specs) if not i.distributed]
                impls, specs = [i for i, _ in plain], [s for _, s in plain]
                synchronized = ([i for i, _ in sync], [s for _, s in sync])
            else:
                found, found_specs, _ = api.implementations(None, distributed=True)
                synchronized = (found, found_specs)
            outcome = pipeline.run(
                impls,
                specs,
                devices,
                output,
                sweep_name=sweep_name,
                baseline=baseline,
                listener=listener,
                synchronized=synchronized,
            )
        except (UsageError, OutputInUse) as exc:
            raise click.UsageError(str(exc)) from exc
        except (KeyboardInterrupt, gate.Interrupted):
            listener.close()
            console.print(f"interrupted: what finished is in {output}", markup=False)
            sys.exit(signals.exit_code)
        finally:
            listener.close()
    console.print(f"report: {outcome.report}")
    sys.exit(0 if outcome.ok else 1)


@main.command()
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    required=True,
    help="Directory for study.csv and study.json (a report of it shows the plot).",
)
@click.option("--smoke", is_flag=True, help="One model, two seeds, 40 steps: seconds.")
def study(output, smoke):
    """The BatchNorm study: does BatchNorm speed up training on scikit-learn's digits?"""
    from pathlib import Path

    _need("models")
    from bnbench.study import QUICK_STUDY, SMOKE_STUDY, write_study

    _check_outputs(directories=(output,))
    for line in write_study(Path(output), SMOKE_STUDY if smoke else QUICK_STUDY):
        _console().print(line, markup=False)


# The study's first name, kept (hidden) so existing scripts keep working.
main.add_command(
    click.Command(
        "claim", callback=study.callback, params=study.params, help=study.help, hidden=True
    )
)


@main.command("list")
def list_command():
    """List registered implementations, what they support, and the cases."""
    console = _console()
    table = Table(title="registered implementations")
    for col in ("name", "devices", "ranks", "dtypes", "declared deviations", "description"):
        table.add_column(col)
    for name, impl in entry_point_implementations().items():
        dtypes = ", ".join(sorted(str(d).replace("torch.", "") for d in impl.supports_dtypes))
        table.add_row(
            name,
            ", ".join(sorted(impl.supports_devices)),
            ", ".join(map(str, sorted(impl.supports_ranks))),
            dtypes,
            str(len(impl.deviations)),
            impl.description
            + (" [synchronized: verify --world-size N]" if impl.distributed else ""),
        )
    console.print(table)
    from bnbench.distributed import dist_cases

    for title, cases in (
        ("cases", all_cases()),
        ("distributed cases (verify --world-size N)", dist_cases()),
    ):
        checks = len({c.check for c in cases})
        console.print(f"\n{len(cases)} {title} in {checks} checks:", markup=False)
        for check in dict.fromkeys(c.check for c in cases):
            sample = next(c for c in cases if c.check == check)
            ranks = ",".join(str(c.rank) for c in cases if c.check == check)
            console.print(f"  {check:<38} ranks {ranks:<8} {sample.description}", markup=False)


if __name__ == "__main__":  # pragma: no cover
    main()
