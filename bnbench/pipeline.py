"""The main job, ``bnbench run``: verify, benchmark, the BatchNorm study and a report, all into
one directory. The CLI calls :func:`run`; a notebook can too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bnbench import gate
from bnbench.cases import all_cases
from bnbench.registry import Implementation
from bnbench.results import (
    Status,
    Verdict,
    clear_run_files,
    environment,
    new_run_id,
    output_lock,
    write_all_atomic,
)


class Listener:
    """What the pipeline says while it works; the CLI prints it, the default says nothing."""

    def stage(self, number: int, total: int, title: str) -> None:
        pass

    def counting(self, what: str, total: int) -> None:
        """A stage with ``total`` items starts (verify: results, bench: rows)."""

    def advance(self, description: str, timed: bool = True) -> None:
        """One more item of the current stage is done (``timed=False``: it took no time)."""

    def verified(self, results: list[gate.Result], seconds: float) -> None:
        pass

    def benchmarked(self, directory: Path) -> None:
        pass

    def line(self, text: str) -> None:
        pass


@dataclass
class RunOutcome:
    directory: Path
    report: Path
    results: list[gate.Result]

    @property
    def ok(self) -> bool:
        """Every gate result as expected (what ``bnbench run``'s exit code says)."""
        return gate.passed(self.results)


def run(
    impls: list[Implementation],
    specs: list[str],
    devices: list[str],
    output: Path,
    *,
    sweep_name: str = "quick",
    baseline: str = "builtin",
    listener: Listener | None = None,
    synchronized: tuple[list[Implementation], list[str]] = ([], []),
) -> RunOutcome:
    """verify.json/.xml, results.csv (the sweep), study.csv/.json and report.html in
    ``output``. ``synchronized``: synchronized BatchNorms (and their specs), verified by the
    distributed gate at world size DIST_WORLD_SIZE on CPU, their results in verify.json too
    (under ``cpu-ws2``); they are not benchmarked here (``bench --world-size`` times them)."""
    from bnbench import benchmark as bench
    from bnbench.report import write_report
    from bnbench.study import QUICK_STUDY, SMOKE_STUDY, write_study

    say = listener or Listener()
    output = Path(output)
    with output_lock(output):
        clear_run_files(output)
        run_id = new_run_id()
        say.stage(1, 4, f"verify -> {output}/verify.json")
        start = time.perf_counter()
        cases = all_cases()
        say.counting("verify", len(impls) * len(devices) * len(cases))
        try:
            results = gate.run_gate(
                impls,
                specs,
                devices,
                cases,
                progress=lambda r: say.advance(
                    f"{r.implementation} {r.case}", r.verdict != Verdict.NOT_SUPPORTED
                ),
            )
        except gate.Interrupted as stopped:
            _write_verify(output, stopped.results, run_id, interrupted=True)
            raise
        dist_impls, dist_specs = synchronized
        if dist_impls:
            from bnbench import distributed

            dist_cases = distributed.dist_cases()
            say.counting("verify --world-size 2", len(dist_impls) * len(dist_cases))
            try:
                results += distributed.run_dist_gate(
                    dist_impls,
                    dist_specs,
                    ["cpu"],
                    [DIST_WORLD_SIZE],
                    dist_cases,
                    progress=lambda r: say.advance(
                        f"{r.implementation} {r.case}", r.verdict != Verdict.NOT_SUPPORTED
                    ),
                )
            except gate.Interrupted as stopped:
                _write_verify(output, results + stopped.results, run_id, interrupted=True)
                raise
        say.verified(results, time.perf_counter() - start)
        _write_verify(output, results, run_id)
        sweep = bench.SWEEPS[sweep_name]
        say.stage(2, 4, f"bench ({sweep.name} sweep) -> {output}/results.csv")
        say.counting(
            f"bench {sweep.name}", len(impls) * sum(len(sweep.on(d).rows()) for d in devices)
        )
        bench.run_sweep(
            impls,
            specs,
            devices,
            sweep,
            output,
            run_id=run_id,
            progress=lambda row: say.advance(
                f"{row['implementation']} {row['mode']} {row['shape']} {row['dtype']}",
                row["status"] != Status.NOT_SUPPORTED,
            ),
        )
        say.benchmarked(output)
        say.stage(3, 4, "BatchNorm against no BatchNorm on digits")
        for text in write_study(output, SMOKE_STUDY if sweep_name == "smoke" else QUICK_STUDY):
            say.line(text)
        say.stage(4, 4, "report")
        report = write_report([str(output)], output, baseline=baseline)
    return RunOutcome(output, report, results)


# The world size the main job verifies synchronized BatchNorms at (on CPU, gloo).
DIST_WORLD_SIZE = 2


def _write_verify(
    output: Path, results: list[gate.Result], run_id: str, interrupted: bool = False
) -> None:
    write_all_atomic(
        {
            output / "verify.json": gate.to_json(
                results, environment(), interrupted=interrupted, run_id=run_id
            ),
            output / "verify.xml": gate.to_junit(results),
        }
    )
