"""The gate: verdicts, isolated runs, and what is written about them.

Each (implementation, device) runs in its own worker process (bnbench.isolation), one case at a
time: a case that hangs or kills its worker fails, the worker is restarted for the remaining
cases, and every other implementation carries on.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from bnbench.cases import Case
from bnbench.checks import FAIL, PASS, UNSUPPORTED, Outcome, run_case
from bnbench.isolation import run_items
from bnbench.registry import Implementation
from bnbench.results import BAD_VERDICTS, VERIFY_SCHEMA, Verdict


@dataclass
class Result:
    implementation: str
    device: str
    case: str
    check: str
    rank: int
    description: str
    verdict: Verdict
    message: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.verdict not in BAD_VERDICTS


def verdict(impl: Implementation, case: Case, outcome: Outcome) -> tuple[Verdict, str]:
    """Apply declared deviations: (verdict, message)."""
    if outcome.status == UNSUPPORTED:
        return Verdict.NOT_SUPPORTED, outcome.message
    reason = impl.deviation_for(case.id)
    if reason is None:
        return (Verdict.PASS, "") if outcome.status == PASS else (Verdict.FAIL, outcome.message)
    if outcome.status == PASS:
        return (
            Verdict.UNEXPECTED_PASS,
            f"declared deviation passed (remove the declaration?): {reason}",
        )
    return Verdict.DEVIATION, f"{reason}\n{outcome.message}"


def available_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# Worker process


def _gate_worker(spec: str, device: str, threads: int, *, items: list[str], channel) -> None:
    torch.set_num_threads(threads)
    from bnbench.cases import case_by_id
    from bnbench.registry import resolve

    impl = resolve([spec])[0]
    cases = case_by_id()
    for case_id in items:
        channel.start(case_id)
        start = time.perf_counter()
        outcome = run_case(impl, cases[case_id], device)
        channel.done(
            case_id,
            {
                "status": outcome.status,
                "message": outcome.message,
                "seconds": time.perf_counter() - start,
            },
        )


def run_isolated(
    spec: str,
    device: str,
    case_ids: list[str],
    timeout: float,
    threads: int,
    on_result: Callable[[str, Outcome, float], None],
) -> None:
    """Run cases in a worker process; a hang or a crash fails that case, not the run."""

    def received(case_id, result, problem, seconds):
        if result is None:
            on_result(case_id, Outcome(FAIL, problem), seconds)
        else:
            on_result(case_id, Outcome(result["status"], result["message"]), result["seconds"])

    run_items(_gate_worker, (spec, device, threads), case_ids, timeout, received)


def run_gate(
    impls: list[Implementation],
    specs: list[str],
    devices: list[str],
    cases: list[Case],
    *,
    timeout: float = 120.0,
    jobs: int | None = None,
    isolate: bool = True,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Every case for every (implementation, device); results in a stable order."""
    jobs = jobs or max(1, min(len(impls) * len(devices), os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    by_id = {c.id: c for c in cases}
    results: dict[tuple[str, str, str], Result] = {}

    def record(impl: Implementation, device: str, case_id: str, outcome: Outcome, seconds: float):
        case = by_id[case_id]
        v, message = verdict(impl, case, outcome)
        result = Result(
            impl.name,
            device,
            case.id,
            case.check,
            case.rank,
            case.description,
            v,
            message,
            round(seconds, 4),
        )
        results[(impl.name, device, case.id)] = result
        if progress:
            progress(result)

    work = []
    for impl, spec in zip(impls, specs):
        for device in devices:
            runnable = []
            for case in cases:
                reasons = impl.not_supported_reasons(case.config(device))
                if reasons:
                    record(impl, device, case.id, Outcome(UNSUPPORTED, "; ".join(reasons)), 0.0)
                else:
                    runnable.append(case.id)
            if runnable:
                work.append((impl, spec, device, runnable))

    def execute(item):
        impl, spec, device, case_ids = item
        callback = lambda cid, outcome, secs: record(impl, device, cid, outcome, secs)  # noqa
        if isolate:
            run_isolated(spec, device, case_ids, timeout, threads, callback)
        else:
            for cid in case_ids:
                start = time.perf_counter()
                callback(cid, run_case(impl, by_id[cid], device), time.perf_counter() - start)

    # compiled implementations pay compilation up front: start the biggest work first.
    work.sort(key=lambda item: -len(item[3]))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(execute, work))

    case_order = {c.id: i for i, c in enumerate(cases)}
    impl_order = {impl.name: i for i, impl in enumerate(impls)}
    return sorted(
        results.values(),
        key=lambda r: (impl_order[r.implementation], devices.index(r.device), case_order[r.case]),
    )


# ---------------------------------------------------------------------------------------------
# What gets written


def to_json(results: Iterable[Result], env: dict) -> str:
    results = list(results)
    summary: dict[str, dict[str, int]] = {}
    for r in results:
        key = f"{r.implementation}@{r.device}"
        summary.setdefault(key, {})
        summary[key][r.verdict] = summary[key].get(r.verdict, 0) + 1
    return json.dumps(
        {
            "schema": VERIFY_SCHEMA,
            "environment": env,
            "ok": all(r.ok for r in results),
            "summary": summary,
            "results": [asdict(r) for r in results],
        },
        indent=2,
    )


def to_junit(results: Iterable[Result]) -> str:
    results = list(results)
    suites = ET.Element("testsuites", name="bnbench verify")
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(f"{r.implementation}@{r.device}", []).append(r)
    for name, group in groups.items():
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=name,
            tests=str(len(group)),
            failures=str(sum(r.verdict in BAD_VERDICTS for r in group)),
            skipped=str(
                sum(r.verdict in (Verdict.NOT_SUPPORTED, Verdict.DEVIATION) for r in group)
            ),
            time=f"{sum(r.seconds for r in group):.3f}",
        )
        for r in group:
            tc = ET.SubElement(
                suite, "testcase", classname=f"bnbench.{name}", name=r.case, time=f"{r.seconds:.4f}"
            )
            if r.verdict in BAD_VERDICTS:
                first = r.message.splitlines()[0] if r.message else r.verdict
                ET.SubElement(
                    tc, "failure", message=f"{r.verdict}: {first}"[:500], type=r.verdict
                ).text = r.message
            elif r.verdict == Verdict.NOT_SUPPORTED:
                ET.SubElement(tc, "skipped", message=f"not supported: {r.message}"[:500])
            elif r.verdict == Verdict.DEVIATION:
                ET.SubElement(
                    tc,
                    "skipped",
                    message=("declared deviation: " + r.message.splitlines()[0])[:500],
                )
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)
