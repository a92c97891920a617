"""The gate: verdicts, isolated runs, and what is written about them.

Each (implementation, device) runs in its own worker process (bnbench.isolation), one case at a
time: a case that hangs or kills its worker fails, the worker is restarted for the remaining
cases, and every other implementation carries on.

A user gating their own implementation can waive a category or a glob of cases with a reason
(``verify --ignore PATTERN=REASON``, as a linter's ignore): those cases still run, and a failure
among them is reported as waived instead of deciding the exit code.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import signal
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from bnbench import isolation
from bnbench.cases import CATEGORIES, Case, category_of
from bnbench.checks import FAIL, PASS, UNSUPPORTED, Outcome, run_case
from bnbench.isolation import run_items
from bnbench.registry import Implementation

if TYPE_CHECKING:  # pragma: no cover
    from bnbench.distributed import DistCase
from bnbench.results import BAD_VERDICTS, VERIFY_SCHEMA, Verdict


@dataclass(frozen=True)
class Waiver:
    """``--ignore PATTERN=REASON``: a category (exactly as in CATEGORIES) or a glob over case ids
    and check names (as ``--case``), and why its failures do not gate."""

    pattern: str
    reason: str

    @property
    def is_category(self) -> bool:
        return self.pattern in CATEGORIES

    def matches(self, case_id: str, check: str, category: str) -> bool:
        if self.is_category:
            return category == self.pattern
        return fnmatch.fnmatchcase(case_id, self.pattern) or fnmatch.fnmatchcase(
            check, self.pattern
        )

    def __str__(self) -> str:
        return f"{self.pattern}={self.reason}"


def parse_waiver(text: str, cases: Iterable[Case | DistCase]) -> Waiver:
    """``CATEGORY=REASON`` or ``GLOB=REASON``; ValueError saying what is wrong, including a
    pattern that matches no category and none of ``cases`` (a typo would waive nothing)."""
    pattern, sep, reason = text.partition("=")
    pattern, reason = pattern.strip(), reason.strip()
    expected = "expected CATEGORY=REASON or GLOB=REASON"
    if not sep:
        raise ValueError(f"--ignore {text!r}: no '=': {expected} (the reason is required)")
    if not pattern:
        raise ValueError(f"--ignore {text!r}: nothing before '=': {expected}")
    if not reason:
        raise ValueError(f"--ignore {text!r}: the reason after '=' is empty: say why it is waived")
    waiver = Waiver(pattern, reason)
    if not waiver.is_category and not any(waiver.matches(c.id, c.check, c.category) for c in cases):
        raise ValueError(
            f"--ignore {text!r}: {pattern!r} matches no category ({', '.join(CATEGORIES)}) "
            "and no case id or check"
        )
    return waiver


@dataclass
class Result:
    implementation: str
    device: str
    case: str
    check: str
    category: str
    rank: int
    description: str
    verdict: Verdict
    message: str
    seconds: float
    waiver: Waiver | None = None  # the --ignore that turned a fail or an XPASS into waived

    @property
    def ok(self) -> bool:
        return self.verdict not in BAD_VERDICTS

    def matched_by(self, waiver: Waiver) -> bool:
        return waiver.matches(self.case, self.check, self.category)


def waive(result: Result, waivers: Sequence[Waiver]) -> Result:
    """``result`` with the first matching waiver applied: a fail or an unexpected pass becomes
    waived (the message: the reason, then the original verdict and message); any other verdict
    stands (a waiver has nothing to do for a pass)."""
    if result.verdict not in BAD_VERDICTS:
        return result
    for waiver in waivers:
        if result.matched_by(waiver):
            return dataclasses.replace(
                result,
                verdict=Verdict.WAIVED,
                message=f"{waiver.reason}\n{result.verdict}: {result.message}",
                waiver=waiver,
            )
    return result


def unused_waivers(results: Iterable[Result], waivers: Sequence[Waiver]) -> list[Waiver]:
    """The waivers that waived nothing in ``results`` (what they match passed, was not
    supported or was not run): candidates for removal, as a linter's unused ignore."""
    used = {r.waiver for r in results if r.waiver is not None}
    return [w for w in waivers if w not in used]


def verdict(impl: Implementation, case: Case | DistCase, outcome: Outcome) -> tuple[Verdict, str]:
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


def judged(
    impl: Implementation,
    device: str,
    case: Case | DistCase,
    outcome: Outcome,
    seconds: float,
    waivers: Sequence[Waiver] = (),
) -> Result:
    """The Result of ``case`` on ``impl``: its outcome after declared deviations
    (:func:`verdict`) and then ``waivers`` (:func:`waive`)."""
    v, message = verdict(impl, case, outcome)
    return waive(
        Result(
            impl.name,
            device,
            case.id,
            case.check,
            case.category or category_of(case.check),
            case.rank,
            case.description,
            v,
            message,
            round(seconds, 4),
        ),
        waivers,
    )


def passed(results: Sequence[Result]) -> bool:
    """What the exit code says: nothing unexpected failed, and something was verified: at
    least one case passed (a run where every case was not supported, a declared deviation or
    waived verified nothing: not a pass)."""
    return all(r.ok for r in results) and any(r.verdict == Verdict.PASS for r in results)


def available_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# Worker process


def gate_worker(spec: str, device: str, threads: int, *, items: list[str], channel) -> None:
    """The worker's loop (bnbench.isolation's "gate" job): run each case, send its outcome."""
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
        if result is not None:
            problem = _invalid_outcome(result)
        if problem is not None:
            on_result(case_id, Outcome(FAIL, problem), seconds)
        else:
            on_result(case_id, Outcome(result["status"], result["message"]), result["seconds"])

    run_items("gate", (spec, device, threads), case_ids, timeout, received)


# The longest failure message kept from a worker (a diagnosis, not a dump).
MAX_MESSAGE_CHARS = 20_000


def _invalid_outcome(result: dict) -> str | None:
    """Why a worker's outcome cannot be used (None when it can); a valid message is cut to
    MAX_MESSAGE_CHARS in place."""
    if set(result) != {"status", "message", "seconds"}:
        return f"the worker sent an invalid outcome (keys {sorted(result)!r:.200})"
    if result["status"] not in (PASS, FAIL, UNSUPPORTED):
        return f"the worker sent an invalid outcome (status {result['status']!r:.80})"
    if not isinstance(result["message"], str):
        return "the worker sent an invalid outcome (message is not a string)"
    if result["status"] == PASS and result["message"]:
        return "the worker sent an invalid outcome (a pass with a failure message)"
    seconds = result["seconds"]
    if (
        not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not 0 <= seconds <= MAX_CASE_SECONDS
    ):
        return f"the worker sent an invalid outcome (seconds {str(seconds)[:40]})"
    result["message"] = printable(result["message"][:MAX_MESSAGE_CHARS]) + (
        "\n[... cut]" if len(result["message"]) > MAX_MESSAGE_CHARS else ""
    )
    return None


# No case runs for longer than a day: a worker's larger (or infinite) figure is invented.
MAX_CASE_SECONDS = 86_400.0

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to print and to write as UTF-8 JSON or XML: control characters (a
    terminal's escape sequences) and lone surrogates shown as escapes; newlines and tabs
    kept."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


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
    waivers: Sequence[Waiver] = (),
) -> list[Result]:
    """Every case for every (implementation, device); results in a stable order. ``waivers``
    turn the failures they match into waived results (see :func:`waive`)."""
    jobs = jobs or max(1, min(len(impls) * len(devices), os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    by_id = {c.id: c for c in cases}
    results: dict[tuple[str, str, str], Result] = {}

    def record(impl: Implementation, device: str, case_id: str, outcome: Outcome, seconds: float):
        result = judged(impl, device, by_id[case_id], outcome, seconds, waivers)
        results[(impl.name, device, case_id)] = result
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
                elif impl.load_error:
                    record(impl, device, case.id, Outcome(FAIL, impl.load_error), 0.0)
                else:
                    runnable.append(case.id)
            if runnable:
                work.append((impl, spec, device, runnable))

    def execute(item):
        impl, spec, device, case_ids = item
        callback = lambda cid, outcome, secs: record(impl, device, cid, outcome, secs)  # noqa
        try:
            if isolate:
                run_isolated(spec, device, case_ids, timeout, threads, callback)
            else:
                for cid in case_ids:
                    start = time.perf_counter()
                    callback(cid, run_case(impl, by_id[cid], device), time.perf_counter() - start)
        except isolation.Interrupted:
            raise
        except Exception as exc:  # bnbench's own fault: it costs this column, not the run
            problem = f"bnbench failed running this implementation: {type(exc).__name__}: {exc}"
            for cid in case_ids:
                if (impl.name, device, cid) not in results:
                    callback(cid, Outcome(FAIL, problem), 0.0)

    # compiled implementations pay compilation up front: start the biggest work first.
    work.sort(key=lambda item: -len(item[3]))
    isolation.begin()
    interrupted = False
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(execute, item) for item in work]
        for future in futures:
            future.result()
    except (KeyboardInterrupt, isolation.Interrupted):
        # Ctrl-C or SIGTERM: kill every worker now (the threads waiting on them return within
        # a poll), keep what finished; a second signal meanwhile must not lose it.
        interrupted = True
        with _signals_held():
            isolation.interrupt()
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    case_order = {c.id: i for i, c in enumerate(cases)}
    impl_order = {impl.name: i for i, impl in enumerate(impls)}
    ordered = sorted(
        results.values(),
        key=lambda r: (impl_order[r.implementation], devices.index(r.device), case_order[r.case]),
    )
    if interrupted:
        raise Interrupted(ordered)
    return ordered


class _signals_held:
    """SIGINT, SIGTERM and SIGHUP ignored while an interrupted run tears down (main thread)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, signal.SIG_IGN)

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False


class Interrupted(Exception):
    """The gate was interrupted (Ctrl-C, SIGTERM); ``results``: the cases that finished."""

    def __init__(self, results: list[Result]):
        super().__init__(f"interrupted after {len(results)} results")
        self.results = results


# ---------------------------------------------------------------------------------------------
# What gets written


def _category_order(category: str) -> int:
    return CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES)


def _counts(results: Iterable[Result]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    return counts


def to_json(
    results: Iterable[Result],
    env: dict,
    waivers: Sequence[Waiver] = (),
    *,
    interrupted: bool = False,
    run_id: str | None = None,
) -> str:
    """Every result (with its category, and the waiver that waived it); per implementation@device
    the verdict counts, overall and by category; the run's waivers. ``ok`` is true only when
    the run finished, something was verified and nothing unexpected failed; ``run_id`` ties it
    to the benchmark results written into the same directory by the same run."""
    results = list(results)
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(f"{r.implementation}@{r.device}", []).append(r)
    by_category: dict[str, dict[str, dict[str, int]]] = {}
    for key, group in groups.items():
        categories = sorted({r.category for r in group}, key=_category_order)
        by_category[key] = {c: _counts(r for r in group if r.category == c) for c in categories}
    return json.dumps(
        {
            "schema": VERIFY_SCHEMA,
            **({"run_id": run_id} if run_id else {}),
            "environment": env,
            "ok": passed(results) and not interrupted,
            "interrupted": interrupted,
            "verified": sum(r.verdict == Verdict.PASS for r in results),
            "waivers": [dataclasses.asdict(w) for w in waivers],
            "summary": {key: _counts(group) for key, group in groups.items()},
            "summary_by_category": by_category,
            "results": [asdict(r) for r in results],
        },
        indent=2,
    )


def _skipped(r: Result) -> str | None:
    """Why a result reads as skipped in JUnit (None: it does not)."""
    if r.verdict == Verdict.NOT_SUPPORTED:
        return f"not supported: {r.message}"
    first = r.message.splitlines()[0] if r.message else ""
    if r.verdict == Verdict.DEVIATION:
        return f"declared deviation: {first}"
    if r.verdict == Verdict.WAIVED:
        pattern = r.waiver.pattern if r.waiver else "?"
        return f"waived (--ignore {pattern}): {first}"
    return None


def to_junit(results: Iterable[Result]) -> str:
    """One testsuite per implementation@device and category ("vectorized@cpu: lifecycle"); each
    testcase's classname is bnbench.IMPL@DEVICE.CATEGORY, so that viewers that build a
    package/class tree from it (Jenkins) show implementations as packages and categories as
    classes. Deviations, waived and unsupported cases are skipped, with the reason."""
    results = list(results)
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((f"{r.implementation}@{r.device}", r.category), []).append(r)
    # implementations in the order they ran; within each, categories in CATEGORIES' order
    columns = list(dict.fromkeys(name for name, _ in groups))
    ordered = sorted(
        groups.items(), key=lambda kv: (columns.index(kv[0][0]), _category_order(kv[0][1]))
    )

    def totals(group: list[Result]) -> dict[str, str]:
        return {
            "tests": str(len(group)),
            "failures": str(sum(r.verdict in BAD_VERDICTS for r in group)),
            "errors": "0",
            "skipped": str(sum(_skipped(r) is not None for r in group)),
            "time": f"{sum(r.seconds for r in group):.3f}",
        }

    suites = ET.Element("testsuites", {"name": "bnbench verify", **totals(results)})
    for (name, category), group in ordered:
        suite = ET.SubElement(suites, "testsuite", {"name": f"{name}: {category}", **totals(group)})
        classname = f"bnbench.{name}.{category.replace(' ', '_')}"
        for r in group:
            tc = ET.SubElement(
                suite, "testcase", classname=classname, name=r.case, time=f"{r.seconds:.4f}"
            )
            skipped = _skipped(r)
            if r.verdict in BAD_VERDICTS:
                first = r.message.splitlines()[0] if r.message else r.verdict
                ET.SubElement(
                    tc, "failure", message=f"{r.verdict}: {first}"[:500], type=r.verdict
                ).text = r.message
            elif skipped is not None:
                element = ET.SubElement(tc, "skipped", message=skipped[:500])
                if r.verdict == Verdict.WAIVED:
                    element.text = r.message  # the reason, then the failure it waives
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)
