"""Interleaved A/B benchmarking, ``bnbench ab BASELINE CANDIDATE``: two implementations measured
in the same time window, their timed blocks alternating in a randomized order, compared pair by
pair, so that what the machine does meanwhile (another job, a CI neighbour) hits both alike.

Two worker processes, one per side, are started through bnbench.isolation (job "ab"). The
parent drives them over the sweep's cases, one case at a time:

* ``prepare``: each worker builds the case's workload (bnbench.benchmark.make_workload), runs the
  gate case that vouches for it (as ``bench`` does), makes the first call (an output that is not
  nn.BatchNorm's kind, or non-finite, is not timed), warms up and estimates the time of a call;
* ``block``: the worker runs one timed block of k calls (the same k on both sides) and answers
  with its duration. The parent asks for blocks in quadruples ABBA or BAAB, chosen at random, and
  waits for each answer before asking the other side: only one side runs at a time, and two
  blocks of a pair are adjacent in time;
* ``finish``: the worker drops the workload and reports whether the implementation forked,
  patched the harness or left processes behind (bnbench.isolation.Channel.done).

Commands reach a worker as JSON lines on a FIFO of its own (its stdin is the lifeline
bnbench.isolation's workers die by); answers come back on the worker's result pipe as JSON lines
and are validated (pydantic) before use: durations are finite, positive, bounded, and no longer
than the parent itself waited for them. A side that raises, crashes, hangs or breaks the protocol
costs its case (a fresh worker runs the next), never the run.

Statistics (pure functions below, on arrays): a pair i gives d_i = log(b_i / a_i), the log of
the candidate's block time over the baseline's. A case's estimate is exp of the Hodges-Lehmann
estimator of d (the median of the Walsh averages), with the distribution-free Wilcoxon
signed-rank confidence interval (exact up to EXACT_SIGNED_RANK pairs). The implementation's
figure is the geometric mean over the cases, its interval pooled from the cases' intervals.
Verdicts against a threshold t: ``slower`` when the whole interval lies above 1 + t,
``faster`` when below 1 / (1 + t), ``same`` when inside [1 / (1 + t), 1 + t], ``unsure``
otherwise (the interval is too wide to decide: more time would settle it). A case stops taking
pairs as soon as its interval decides (slower and faster confirmed by a later look), or when its
time budget is spent (:func:`collect_pairs`).

Each side runs one thread by default, and both are pinned to the same CPUs: a neighbour on
those CPUs then slows whichever side runs, and the pair cancels it; two sides on different cores
would see different neighbours for seconds at a time, which no pairing undoes.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bnbench.registry import UsageError
from bnbench.results import Verdict

AB_SCHEMA = "bnbench-ab/1"
CONFIDENCE = 0.95
# Percent: a case or an implementation is slower only when its whole interval lies above
# 1 + DEFAULT_THRESHOLD_PCT/100. Measured on this project's 2-core machine: identical code in
# two workers read 0.93-1.05 per case over the quick sweep (under other jobs' load), and with
# a CPU-bound neighbour (suites/ab_error_rates.py, 20 trials) its geometric means 0.98-1.04
# with intervals never above 1.077, while a planted 1.28x slowdown's lower bounds never fell
# below 1.19: 10% lies between the two, above what identical code does, well below 1.3x.
DEFAULT_THRESHOLD_PCT = 10.0
# Pairs up to which the signed-rank distribution is computed exactly (normal beyond).
EXACT_SIGNED_RANK = 300
# A change of more than this factor is a broken measurement, not a result.
IMPLAUSIBLE_RATIO = 1000.0
VERDICTS = ("slower", "faster", "same", "unsure")
SIDES = ("baseline", "candidate")
# Verdicts of the vouching case that mean the side computes something else than nn.BatchNorm.
FAILED_VERIFICATION = (Verdict.FAIL, Verdict.UNEXPECTED_PASS, Verdict.WAIVED)
# How a case ended: ok (compared) or why not.
CASE_STATUSES = (
    "ok",
    "not-supported",
    "failed-verification",
    "error",
    "nan",
    "hung",
    "crashed",
    "implausible",
    "interrupted",
)


@dataclass(frozen=True)
class Plan:
    """How long a sweep's cases are timed: ``case_budget_s`` seconds of pairs per case at most
    (wall time, both sides; preparation not included), blocks of about ``block_s``, at least
    ``min_pairs`` pairs before the interval may decide, at most ``max_pairs``."""

    case_budget_s: float
    block_s: float
    min_pairs: int
    max_pairs: int
    warmup_s: float


# quick: 44 cases, at most 1.2 s of pairs each (most decide sooner): a run for one pair of
# implementations takes under 2 minutes on this project's 2-core machine, workers' start,
# verification, building the workloads and warm-up included.
PLANS = {
    "smoke": Plan(case_budget_s=0.3, block_s=0.002, min_pairs=8, max_pairs=200, warmup_s=0.01),
    "quick": Plan(case_budget_s=1.2, block_s=0.005, min_pairs=12, max_pairs=1000, warmup_s=0.05),
    "full": Plan(case_budget_s=3.0, block_s=0.01, min_pairs=12, max_pairs=2000, warmup_s=0.1),
    "calibration": Plan(
        case_budget_s=3.0, block_s=0.01, min_pairs=12, max_pairs=2000, warmup_s=0.1
    ),
}

# Threads per side. One by default: on a shared machine a multi-threaded op waits for its
# slowest thread, and a thread the scheduler put off behind a neighbour costs a whole tick
# (4 ms here): with 2 threads and neighbours, blocks of identical code varied tenfold.
DEFAULT_THREADS = 1


def shared_cpus(threads: int) -> list[int]:
    """The CPUs both sides are pinned to (the same for both: whatever runs there, both see it):
    the last ``threads`` of those this process may use (the first often serves interrupts);
    empty where affinity cannot be set."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[-threads:] if threads < len(allowed) else allowed


# ---------------------------------------------------------------------------------------------
# Statistics: pure functions on arrays


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


@functools.lru_cache(maxsize=1024)
def signed_rank_depth(n: int, confidence: float = CONFIDENCE) -> int:
    """How many Walsh averages to cut from each end for a ``confidence`` interval of the
    Hodges-Lehmann estimator: the k with P(W <= k - 1) <= alpha/2 < P(W <= k), W the Wilcoxon
    signed-rank statistic of n pairs under the null. 0 when n pairs cannot give such an interval
    (n < 6 at 95%). Exact (the distribution counted) up to EXACT_SIGNED_RANK pairs, normal
    beyond."""
    if n < 1:
        return 0
    half_alpha = (1 - confidence) / 2
    if n <= EXACT_SIGNED_RANK:
        probabilities = np.zeros(n * (n + 1) // 2 + 1)
        probabilities[0] = 1.0
        for rank in range(1, n + 1):
            shifted = np.zeros_like(probabilities)
            shifted[rank:] = probabilities[:-rank]
            probabilities = 0.5 * (probabilities + shifted)
        cdf = np.cumsum(probabilities)
        return int(np.searchsorted(cdf, half_alpha * (1 + 1e-12), side="right"))
    mean = n * (n + 1) / 4
    sd = math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    return max(0, int(math.floor(mean - _z(confidence) * sd + 0.5)))


def hodges_lehmann(d: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(estimate, low, high) of the centre of ``d``: the median of the Walsh averages
    (d_i + d_j) / 2, i <= j, and the signed-rank interval between the k-th smallest and the
    k-th largest of them. Infinite bounds when there are too few values for an interval."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n == 0:
        return math.nan, -math.inf, math.inf
    i, j = np.triu_indices(n)
    walsh = (d[i] + d[j]) / 2
    m = len(walsh)
    k = signed_rank_depth(n, confidence)
    wanted = sorted({(m - 1) // 2, m // 2} | ({k - 1, m - k} if k >= 1 else set()))
    ordered = np.partition(walsh, wanted)
    estimate = 0.5 * (ordered[(m - 1) // 2] + ordered[m // 2])
    if k < 1:
        return float(estimate), -math.inf, math.inf
    return float(estimate), float(ordered[k - 1]), float(ordered[m - k])


def log_ratios(baseline: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """d_i = log(candidate_i / baseline_i) for pairs of times taken adjacent in time."""
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(candidate, dtype=float)
    if a.shape != b.shape:
        raise ValueError("pairs: the two sides have different counts")
    return np.log(b) - np.log(a)


@dataclass(frozen=True)
class Estimate:
    """A ratio candidate / baseline with its interval (ratios, not logs)."""

    ratio: float
    low: float
    high: float

    @property
    def decided(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def paired_estimate(
    baseline: np.ndarray, candidate: np.ndarray, confidence: float = CONFIDENCE
) -> Estimate:
    """The ratio candidate / baseline from paired times, with its ``confidence`` interval."""
    estimate, low, high = hodges_lehmann(log_ratios(baseline, candidate), confidence)
    return Estimate(math.exp(estimate), math.exp(low), math.exp(high))


def verdict(low: float, high: float, threshold_pct: float) -> str:
    """slower when the whole interval lies above 1 + t, faster when below 1 / (1 + t), same when
    it lies inside [1 / (1 + t), 1 + t], unsure otherwise (and without an interval)."""
    limit = 1 + threshold_pct / 100
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0:
        return "unsure"
    if low > limit:
        return "slower"
    if high < 1 / limit:
        return "faster"
    if low >= 1 / limit and high <= limit:
        return "same"
    return "unsure"


def settle_factor(ratio: float, low: float, high: float, threshold_pct: float) -> float:
    """How many times the pairs taken so far would make an unsure interval decide, were the
    estimate to stay where it is and the interval to narrow as 1/sqrt(pairs): the square of
    (the interval's half-width / the estimate's distance to the nearest threshold). Infinite
    when the estimate sits on a threshold or there is no interval; 1 when it decides now."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or ratio <= 0:
        return math.inf
    if verdict(low, high, threshold_pct) != "unsure":
        return 1.0
    bound = math.log(1 + threshold_pct / 100)
    centre = abs(math.log(ratio))
    margin = abs(centre - bound)
    if margin <= 1e-12:
        return math.inf
    half = (math.log(high) - math.log(low)) / 2
    return max(1.0, (half / margin) ** 2)


def pooled(estimates: list[Estimate], confidence: float = CONFIDENCE) -> Estimate:
    """The geometric mean of the cases' ratios with an interval pooled from theirs: each case's
    standard error (on the log scale) taken from its interval's width, the mean's as
    sqrt(sum se^2) / m. The cases are the sweep's, fixed, not a sample of cases: the question
    is whether these cases, together, got slower."""
    kept = [e for e in estimates if e.decided and e.ratio > 0]
    if not kept:
        return Estimate(math.nan, -math.inf, math.inf)
    z = _z(confidence)
    logs = np.log([e.ratio for e in kept])
    se = (np.log([e.high for e in kept]) - np.log([e.low for e in kept])) / (2 * z)
    centre = float(logs.mean())
    half = z * float(np.sqrt(np.sum(se**2))) / len(kept)
    return Estimate(math.exp(centre), math.exp(centre - half), math.exp(centre + half))


def balanced_orders(rng: np.random.Generator, quadruples: int) -> list[tuple[str, str]]:
    """Who goes first in each pair: quadruples ABBA or BAAB at random ("ab": baseline first),
    so that every two pairs are balanced (a drift within a quadruple cancels) and nothing
    about the order can be predicted."""
    orders: list[tuple[str, str]] = []
    for first in rng.integers(0, 2, quadruples):
        a, b = ("baseline", "candidate") if first else ("candidate", "baseline")
        orders += [(a, b), (b, a)]
    return orders


def calls_per_block(per_call_a: float, per_call_b: float, block_s: float) -> int:
    """The calls of one block, the same on both sides: a block of about ``block_s`` at the
    geometric mean of the two sides' per-call times."""
    per_call = math.sqrt(max(per_call_a, 1e-9) * max(per_call_b, 1e-9))
    return max(1, min(100_000, int(round(block_s / per_call))))


# ---------------------------------------------------------------------------------------------
# What a case found


@dataclass
class CaseResult:
    """One case of the sweep compared: its key, how it ended, and (status ok) the ratio
    candidate / baseline with its interval and verdict."""

    mode: str
    shape: str
    dtype: str
    memory_format: str
    model: str
    status: str
    message: str = ""
    # which side the status is about (baseline, candidate, both; empty when ok)
    side: str = ""
    baseline_verified: str = str(Verdict.NOT_RUN)
    candidate_verified: str = str(Verdict.NOT_RUN)
    pairs: int = 0
    calls_per_block: int = 0
    seconds: float = 0.0  # the whole case, preparation included
    timed_s: float = 0.0  # the pairs alone (wall time, both sides)
    baseline_s: float | None = None  # median per-call time over the pairs
    candidate_s: float | None = None
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: str = ""
    settle: float | None = None  # unsure: settle_factor (None when it is infinite)
    # per-call times of the pairs, in the order taken, and who went first in each
    baseline_samples: list[float] = field(default_factory=list)
    candidate_samples: list[float] = field(default_factory=list)
    baseline_first: list[bool] = field(default_factory=list)

    @property
    def key(self) -> str:
        extra = f" {self.model}" if self.model else ""
        return f"{self.mode} {self.shape} {self.dtype} {self.memory_format}{extra}"

    @property
    def estimate(self) -> Estimate | None:
        if self.ratio is None or self.ci_low is None or self.ci_high is None:
            return None
        return Estimate(self.ratio, self.ci_low, self.ci_high)

    @property
    def lost(self) -> bool:
        """The candidate failed where the baseline did not: a regression of another kind."""
        return self.status not in ("ok", "not-supported", "interrupted") and self.side == (
            "candidate"
        )


@dataclass
class Summary:
    """The implementation pair over its compared cases."""

    cases: int
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: str
    settle: float | None
    counts: dict[str, int]


def summarize(cases: list[CaseResult], threshold_pct: float) -> Summary:
    """The geometric mean over the compared cases (status ok) and its verdict."""
    compared = [c for c in cases if c.status == "ok" and c.estimate is not None]
    counts = {v: sum(c.verdict == v for c in compared) for v in VERDICTS}
    if not compared:
        return Summary(0, None, None, None, "unsure", None, counts)
    total = pooled([c.estimate for c in compared if c.estimate is not None])
    if not total.decided:
        return Summary(len(compared), None, None, None, "unsure", None, counts)
    factor = settle_factor(total.ratio, total.low, total.high, threshold_pct)
    return Summary(
        len(compared),
        total.ratio,
        total.low,
        total.high,
        verdict(total.low, total.high, threshold_pct),
        None if math.isinf(factor) else factor,
        counts,
    )


def settle_text(factor: float | None, seconds: float, what: str = "") -> str:
    """What would settle an unsure verdict: about ``factor`` times the time spent."""
    if factor is None:
        return (
            "the estimate sits on the threshold (or there is no interval): more time will not "
            "settle it; a different --threshold would"
        )
    return (
        f"about {factor:.1f}x the pairs would settle it{what} (about {factor * seconds:.1f} s "
        f"of timing instead of {seconds:.1f} s: --budget)"
    )


# ---------------------------------------------------------------------------------------------
# The worker's side (bnbench.isolation's "ab" job)


class _Commands:
    """The parent's commands: JSON lines on a FIFO the worker reads."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        self.buffer = b""

    def next(self) -> dict | None:
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None  # the parent is gone
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def _module_file(spec: str) -> str | None:
    """The file the implementation's module was imported from (for --baseline-path)."""
    if ":" in spec:
        name = spec.partition(":")[0]
    else:
        from bnbench.registry import _entry_points

        ep = _entry_points().get(spec)
        name = ep.value.split(":")[0] if ep else ""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return os.path.realpath(path) if isinstance(path, str) else None


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


class _Case:
    """A prepared case in the worker: the workload, and the count of calls made (inputs
    rotate with it)."""

    def __init__(self, workload, device: str):
        self.step, self.prepare = workload.step, workload.prepare
        self.device = device
        self.calls = 0
        self.cuda = device.startswith("cuda")

    def block(self, n: int) -> float:
        """n calls, timed (a step that needs untimed preparation: each call timed alone, the
        preparation outside, the block's time their sum)."""
        if self.prepare is not None:
            total = 0.0
            for _ in range(n):
                self.prepare(self.calls)
                total += self._timed(1)
            return total
        return self._timed(n)

    def _timed(self, n: int) -> float:
        import torch

        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(n):
                self.step(self.calls)
                self.calls += 1
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        for _ in range(n):
            self.step(self.calls)
            self.calls += 1
        return time.perf_counter() - begin


def ab_worker(
    spec: str,
    device: str,
    threads: int,
    cpus: list[int],
    rows_json: str,
    extra_path: str,
    fifo: str,
    verify: bool,
    *,
    items: list[str],
    channel,
) -> None:
    """The worker's loop: load the implementation, then answer the parent's commands."""
    import torch

    from bnbench.benchmark import Row
    from bnbench.cases import case_by_id
    from bnbench.checks import tolerant_constructor
    from bnbench.registry import resolve

    if cpus and hasattr(os, "sched_setaffinity"):
        # both sides on the same cores: a neighbour there slows both alike
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass
    torch.set_num_threads(threads)
    commands = _Commands(fifo)
    send = channel._send
    try:
        if extra_path:
            # the other directory's copy first; bnbench itself (imported already) and the
            # libraries it imported stay what they are. cwd stays on the path, after it (the
            # resolver would otherwise put it first).
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.append(cwd)
            sys.path.insert(0, extra_path)
        impl = tolerant_constructor(resolve([spec])[0])
    except UsageError as exc:
        send({"reply": 0, "usage": str(exc)[:4000]})
        return
    except Exception as exc:  # an entry point's or a module's import may fail in any way
        send({"reply": 0, "usage": f"implementation {spec!r}: {_error_text(exc)}"[:4000]})
        return
    send({"reply": 0, "ready": True, "file": _module_file(spec)})
    rows = [Row.from_dict(r) for r in json.loads(rows_json)]
    cases = case_by_id()
    verdicts: dict = {}
    current: _Case | None = None
    item = ""
    while True:
        command = commands.next()
        if command is None or command.get("op") == "quit":
            return
        seq, op = command["seq"], command["op"]
        if op == "prepare":
            current = None
            gc.collect()
            index = int(command["row"])
            item = str(index)
            channel.start(item)
            reply, current = _prepare(
                impl,
                device,
                rows[index],
                verify,
                float(command["warmup_s"]),
                float(command["block_s"]),
                cases,
                verdicts,
            )
            send(dict(reply, reply=seq))
        elif op == "block":
            if current is None:
                send({"reply": seq, "error": "no case prepared"})
                continue
            try:
                seconds = current.block(int(command["calls"]))
            except Exception as exc:  # the implementation may fail in any way
                send({"reply": seq, "error": _error_text(exc)})
                continue
            send({"reply": seq, "seconds": seconds})
        elif op == "finish":
            current = None
            gc.collect()
            channel.done(item, {})


def _prepare(
    impl,
    device: str,
    row,
    verify: bool,
    warmup_s: float,
    block_s: float,
    cases: dict,
    verdicts: dict,
) -> tuple[dict, _Case | None]:
    """Vouch for, build, check and warm up one case: (the reply's fields, the case when it
    can be timed)."""
    import torch

    from bnbench.benchmark import _wrong_output, make_workload, vouching_case
    from bnbench.checks import run_case
    from bnbench.gate import verdict as gate_verdict
    from bnbench.timing import synchronize

    reasons = impl.not_supported_reasons(row.config(device))
    if reasons:
        return {
            "status": "not-supported",
            "verified": str(Verdict.NOT_SUPPORTED),
            "message": "; ".join(reasons)[:2000],
        }, None
    verified = Verdict.NOT_RUN
    if verify:
        case = vouching_case(impl, row, cases)
        if case not in verdicts:
            verdicts[case] = gate_verdict(impl, case, run_case(impl, case, device))[0]
        verified = verdicts[case]
    try:
        workload = make_workload(impl, device, row)
        k = len(workload.inputs)
        if workload.prepare:
            workload.prepare(-1)
        out = workload.step(-1)
        synchronize(device)
        x = workload.inputs[-1 % k]
        wrong = _wrong_output(row, out, x)
        if wrong:
            return {"status": "error", "verified": str(verified), "message": wrong[:2000]}, None
        check = out if isinstance(out, torch.Tensor) else x.grad
        if isinstance(check, torch.Tensor) and not bool(torch.isfinite(check).all()):
            return {
                "status": "nan",
                "verified": str(verified),
                "message": "non-finite values in the output or input grad",
            }, None
        del out, check
        case_ = _Case(workload, device)
        begin = time.perf_counter()
        calls = 0
        while calls < 3 or time.perf_counter() - begin < warmup_s:
            case_.block(1)
            calls += 1
        # the time of a call, from a block of at least a quarter of the blocks to come (the
        # first calls, and one call alone, cost more than a call among others)
        calls = 1
        while True:
            seconds = case_.block(calls)
            if seconds >= block_s / 4 or calls >= 100_000:
                break
            calls *= 4
    except Exception as exc:  # the implementation may fail in any way
        return {"status": "error", "verified": str(verified), "message": _error_text(exc)}, None
    return {"status": "ok", "verified": str(verified), "per_call_s": seconds / calls}, case_


# ---------------------------------------------------------------------------------------------
# What a worker may send (validated before use)

_Seconds = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False, strict=True)]
_Text = Annotated[str, Field(max_length=4000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Ready(_Strict):
    reply: Annotated[int, Field(strict=True)]
    ready: Literal[True]
    file: Annotated[str, Field(max_length=4096)] | None = None


class _Usage(_Strict):
    reply: Annotated[int, Field(strict=True)]
    usage: _Text


class _Prepared(_Strict):
    reply: Annotated[int, Field(strict=True)]
    status: Literal["ok", "not-supported", "error", "nan"]
    verified: Verdict
    message: _Text = ""
    per_call_s: _Seconds | None = None

    @field_validator("message")
    @classmethod
    def _printable(cls, value: str) -> str:
        from bnbench.regression import printable

        return printable(value)


class _Block(_Strict):
    reply: Annotated[int, Field(strict=True)]
    seconds: _Seconds


class _BlockError(_Strict):
    reply: Annotated[int, Field(strict=True)]
    error: _Text


class _Done(_Strict):
    done: str
    result: dict
    problem: _Text | None = None


def _parse(model: type[BaseModel], message: dict) -> Any:
    from bnbench.schema import describe

    try:
        return model.model_validate(message)
    except ValidationError as exc:
        raise _SideFailure("error", f"the worker sent an invalid answer: {describe(exc)}") from None


# ---------------------------------------------------------------------------------------------
# The parent's side


class _SideFailure(Exception):
    """A side's case ends: ``status`` (error, hung, crashed) and why."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Side:
    """One side's worker: started on demand, restarted after a failure (unless it never got as
    far as loading the implementation: then every case of the side fails at once)."""

    def __init__(self, role: str, spec: str, path: str, job: tuple, timeout: float):
        self.role, self.spec, self.path = role, spec, path
        self.job = job  # (device, threads, cpus, rows_json, verify)
        self.timeout = timeout
        self.worker: Any = None
        self.fifo_dir: str | None = None
        self.fd: int | None = None
        self.seq = 0
        self.ever_ready = False
        self.fatal: str | None = None  # why every case of this side fails
        self.file: str | None = None
        self.item: str | None = None

    # -- life

    def start(self) -> None:
        """Start a worker (its answer is awaited by :meth:`ready`)."""
        from bnbench.isolation import _Worker

        self.fifo_dir = tempfile.mkdtemp(prefix="bnbench-ab-")
        fifo = os.path.join(self.fifo_dir, "commands")
        os.mkfifo(fifo, 0o600)
        # read-write: opening does not wait for the worker, and the worker's open (read-only)
        # does not wait for us; non-blocking: a worker that stopped reading cannot block us
        self.fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        device, threads, cpus, rows_json, verify = self.job
        self.seq = 0
        try:
            self.worker = _Worker(
                "ab", (self.spec, device, threads, cpus, rows_json, self.path, fifo, verify), []
            )
        except OSError as exc:
            self.close()
            raise _SideFailure("crashed", f"no worker process could be started ({exc})") from None

    def ready(self) -> None:
        """Wait for the worker to load the implementation. UsageError when it cannot be
        imported (exit 2); _SideFailure when the worker dies or hangs doing it."""
        from bnbench.isolation import STARTUP_ALLOWANCE_S

        try:
            message = self._read(time.monotonic() + self.timeout + STARTUP_ALLOWANCE_S)
        except _SideFailure as failure:
            if not self.ever_ready:
                self.fatal = (
                    f"{failure.status}: the {self.role}'s worker could not load the "
                    f"implementation: {failure.message}"
                )
            raise
        if "usage" in message:
            usage = _parse(_Usage, message)
            self.close()
            raise UsageError(f"{self.role}: {usage.usage}")
        ready = _parse(_Ready, message)
        if ready.reply != 0:
            raise self._violation(f"an answer {ready.reply} to the start")
        self.file = ready.file
        self.ever_ready = True
        if self.fifo_dir:  # the worker has it open: the name is no longer needed
            shutil.rmtree(self.fifo_dir, ignore_errors=True)
            self.fifo_dir = None

    def close(self) -> None:
        if self.worker is not None:
            if self.fd is not None:
                try:
                    os.write(self.fd, b'{"op": "quit"}\n')
                except OSError:
                    pass
            self.worker.close()
            self.worker = None
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.fifo_dir:
            shutil.rmtree(self.fifo_dir, ignore_errors=True)
            self.fifo_dir = None
        self.item = None

    @property
    def alive(self) -> bool:
        return self.worker is not None

    # -- talk

    def send(self, op: str, **fields) -> int:
        self.seq += 1
        line = json.dumps(dict(fields, op=op, seq=self.seq)).encode() + b"\n"
        assert self.fd is not None
        try:
            written = os.write(self.fd, line)
        except OSError as exc:
            raise self._fail("crashed", f"its command pipe failed ({exc})") from None
        if written != len(line):
            raise self._fail("error", "its command pipe is full (the worker stopped reading)")
        return self.seq

    def answer(self, seq: int, deadline: float) -> dict:
        """The reply to command ``seq`` (a start message of the current item may come first)."""
        while True:
            message = self._read(deadline)
            if set(message) == {"start"}:
                if message["start"] != self.item:
                    raise self._violation(f"a start of {message['start']!r:.80}")
                continue
            if message.get("reply") != seq:
                raise self._violation(f"keys {sorted(message)!r:.120} while waiting for {seq}")
            return message

    def done(self, deadline: float) -> str | None:
        """Finish the current item: None, or the problem the worker found (forked, patched
        the harness, left processes running)."""
        self.send("finish")
        message = self._read(deadline)
        done = _parse(_Done, message)
        if done.done != self.item:
            raise self._violation(f"a result for {done.done!r:.80}")
        self.item = None
        return done.problem

    def _read(self, deadline: float) -> dict:
        from bnbench.isolation import Interrupted, _exit_text, _Violation

        assert self.worker is not None
        try:
            message = self.worker.read(deadline)
        except TimeoutError:
            raise self._fail(
                "hung", f"no answer within {self.timeout:g} s (worker killed)"
            ) from None
        except _Violation as exc:
            raise self._violation(str(exc)) from None
        except Interrupted:
            raise
        if message is None:
            code = self.worker.exit_code()
            raise self._fail("crashed", f"the worker process {_exit_text(code)}")
        return message

    def _violation(self, what: str) -> _SideFailure:
        return self._fail(
            "error",
            f"broke the worker protocol: {what} (the implementation wrote to bnbench's result "
            "pipe, or a process it started did); worker killed",
        )

    def _fail(self, status: str, message: str) -> _SideFailure:
        self.close()
        return _SideFailure(status, message)


@dataclass
class ABRun:
    """What :func:`run_ab` found: every case, the sides' module files, the interruption."""

    cases: list[CaseResult]
    files: dict[str, str | None]
    seconds: float
    interrupted: bool = False


def _case_result(row, **fields) -> CaseResult:
    return CaseResult(
        mode=row.mode,
        shape="x".join(map(str, row.shape)),
        dtype=row.dtype,
        memory_format=row.memory_format,
        model=row.model,
        **fields,
    )


def run_ab(
    specs: dict[str, str],
    rows: list,
    *,
    device: str = "cpu",
    threads: int | None = None,
    plan: Plan = PLANS["quick"],
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
    timeout: float = 120.0,
    verify: bool = True,
    baseline_path: str = "",
    seed: int = 0,
    progress: Callable[[CaseResult], None] | None = None,
) -> ABRun:
    """Compare ``specs["candidate"]`` with ``specs["baseline"]`` over ``rows``, interleaved.
    UsageError when a side cannot be imported; KeyboardInterrupt stops it (the finished cases
    are in the exception's ``run`` attribute)."""
    from bnbench import isolation

    isolation.begin()
    threads = threads or DEFAULT_THREADS
    cpus = shared_cpus(threads)
    rows_json = json.dumps([r.to_dict() for r in rows])
    job = (device, threads, cpus, rows_json, verify)
    sides = {
        "baseline": _Side("baseline", specs["baseline"], baseline_path, job, timeout),
        "candidate": _Side("candidate", specs["candidate"], "", job, timeout),
    }
    rng = np.random.default_rng(seed)
    cases: list[CaseResult] = []
    begin = time.perf_counter()
    files: dict[str, str | None] = {}
    try:
        _start(sides)
        files = {role: side.file for role, side in sides.items()}
        _check_files(files, baseline_path)
        for index, row in enumerate(rows):
            case = _compare_case(sides, index, row, plan, threshold_pct, timeout, rng)
            cases.append(case)
            if progress:
                progress(case)
    except (KeyboardInterrupt, isolation.Interrupted) as exc:
        isolation.interrupt()
        stopped = KeyboardInterrupt()
        stopped.run = ABRun(cases, files, time.perf_counter() - begin, True)  # type: ignore
        raise stopped from exc
    finally:
        for side in sides.values():
            side.close()
    return ABRun(cases, files, time.perf_counter() - begin)


def _start(sides: dict[str, _Side]) -> None:
    """Start both workers at once, then wait for each to load its implementation."""
    for side in sides.values():
        try:
            side.start()
        except _SideFailure as failure:
            side.fatal = f"{failure.status}: {failure.message}"
    for side in sides.values():
        if side.alive:
            try:
                side.ready()
            except _SideFailure:
                pass  # side.fatal says why; its cases fail
            except UsageError:
                for other in sides.values():
                    other.close()
                raise


def _compare_case(
    sides: dict[str, _Side],
    index: int,
    row,
    plan: Plan,
    threshold_pct: float,
    timeout: float,
    rng: np.random.Generator,
) -> CaseResult:
    began = time.perf_counter()
    failures: dict[str, tuple[str, str]] = {}
    prepared: dict[str, _Prepared] = {}
    # both sides prepare at once (verification, building, warm-up: untimed)
    pending: dict[str, int] = {}
    for role, side in sides.items():
        if side.fatal:
            failures[role] = ("crashed", side.fatal)
            continue
        try:
            if not side.alive:
                side.start()
                side.ready()
            side.item = str(index)
            pending[role] = side.send(
                "prepare", row=index, warmup_s=plan.warmup_s, block_s=plan.block_s
            )
        except _SideFailure as failure:
            failures[role] = (failure.status, side.fatal or failure.message)
    deadline = time.monotonic() + timeout
    for role, seq in pending.items():
        try:
            prepared[role] = _parse(_Prepared, sides[role].answer(seq, deadline))
        except _SideFailure as failure:
            failures[role] = (failure.status, failure.message)
    verified = {role: str(p.verified) for role, p in prepared.items()}
    for role, p in prepared.items():
        if p.status != "ok":
            failures[role] = (p.status, p.message)
    result: CaseResult | None = None
    if not failures:
        failed = [r for r in SIDES if prepared[r].verified in FAILED_VERIFICATION]
        if failed:
            result = _case_result(
                row,
                status="failed-verification",
                side=failed[0] if len(failed) == 1 else "both",
                message=f"the vouching gate case: {', '.join(failed)} "
                f"{'fails' if len(failed) == 1 else 'fail'} it (no speed verdict)",
            )
        else:
            result = _time_case(sides, row, prepared, plan, threshold_pct, timeout, rng)
            if result.status != "ok":
                failures[result.side] = (result.status, result.message)
                result = None
    # finish: every side still holding the case reports what the implementation did meanwhile
    for role, side in sides.items():
        if side.alive and side.item is not None:
            try:
                problem = side.done(time.monotonic() + timeout)
            except _SideFailure as failure:
                failures[role] = (failure.status, failure.message)
                continue
            if problem:
                failures[role] = ("error", problem)
    if failures:
        status, message, side_name = _blame(failures)
        result = _case_result(row, status=status, message=message, side=side_name)
    assert result is not None
    result.baseline_verified = verified.get("baseline", str(Verdict.NOT_RUN))
    result.candidate_verified = verified.get("candidate", str(Verdict.NOT_RUN))
    result.seconds = time.perf_counter() - began
    return result


def _blame(failures: dict[str, tuple[str, str]]) -> tuple[str, str, str]:
    """One status for a case from the sides' failures: (status, message, side)."""
    if len(failures) == 1:
        (role, (status, message)) = next(iter(failures.items()))
        return status, f"{role}: {message}", role
    statuses = {status for status, _ in failures.values()}
    status = statuses.pop() if len(statuses) == 1 else "error"
    if status == "not-supported":
        message = "; ".join(f"{role}: {m}" for role, (_, m) in failures.items())
        return status, message, "both"
    message = "; ".join(f"{role}: {s}: {m}" for role, (s, m) in failures.items())
    return status, message, "both"


@dataclass
class Pairs:
    """What :func:`collect_pairs` took: per-call times of each pair, who went first, the
    interval of the last look, and the wall time spent."""

    baseline: list[float]
    candidate: list[float]
    baseline_first: list[bool]
    estimate: Estimate
    seconds: float


def collect_pairs(
    take_pair: Callable[[tuple[str, str]], dict[str, float]],
    plan: Plan,
    threshold_pct: float,
    rng: np.random.Generator,
    clock: Callable[[], float] = time.perf_counter,
) -> Pairs:
    """The stop rule. ``take_pair(order)`` runs one block on each side in that order and returns
    their per-call times. The first pair is a warm-up (discarded: a side waking up after the
    other's preparation). After ``min_pairs`` pairs, and then every eighth more, the interval
    is computed: the case stops as soon as it says same; a look that says slower (faster) is
    confirmed by a look after as many pairs again, which must say so too while the new pairs
    alone put their estimate beyond the threshold the same way (a burst of noise on one side
    lasts a fraction of a second: it must not decide a case by itself). Otherwise the case
    stops when ``case_budget_s`` of wall time is spent, or at ``max_pairs``, with what its
    interval says then."""
    times: dict[str, list[float]] = {role: [] for role in SIDES}
    baseline_first: list[bool] = []
    began = clock()
    next_check = plan.min_pairs
    estimate = Estimate(math.nan, -math.inf, math.inf)
    pending: str | None = None  # a verdict one look gave, waiting for the next to confirm it
    mark = 0  # the pairs that look had
    limit = math.log(1 + threshold_pct / 100)
    orders: list[tuple[str, str]] = []
    warm = True
    while True:
        if not orders:
            orders = balanced_orders(rng, 8)
        order = orders.pop(0)
        pair = take_pair(order)
        if warm:
            warm = False
            continue
        for role in SIDES:
            times[role].append(pair[role])
        baseline_first.append(order[0] == "baseline")
        n = len(times["baseline"])
        looked = False
        if n >= next_check:
            estimate = paired_estimate(np.array(times["baseline"]), np.array(times["candidate"]))
            looked = True
            said = verdict(estimate.low, estimate.high, threshold_pct)
            if said == "same":
                break
            if pending is not None and said == pending:
                logs = log_ratios(np.array(times["baseline"]), np.array(times["candidate"]))
                newer = hodges_lehmann(logs[mark:])
                if (newer[0] > limit) if said == "slower" else (newer[0] < -limit):
                    break
            if said in ("slower", "faster") and pending is None:
                pending, mark = said, n
                next_check = n + max(6, n)
            else:
                pending = None
                next_check = n + max(2, n // 8)
        if clock() - began >= plan.case_budget_s or n >= plan.max_pairs:
            if not looked:
                estimate = paired_estimate(
                    np.array(times["baseline"]), np.array(times["candidate"])
                )
            break
    return Pairs(times["baseline"], times["candidate"], baseline_first, estimate, clock() - began)


class _CaseEnd(Exception):
    """A side's block failed: the case ends with ``status`` on that side."""

    def __init__(self, status: str, message: str, side: str):
        super().__init__(message)
        self.status, self.message, self.side = status, message, side


def _time_case(
    sides: dict[str, _Side],
    row,
    prepared: dict[str, _Prepared],
    plan: Plan,
    threshold_pct: float,
    timeout: float,
    rng: np.random.Generator,
) -> CaseResult:
    """The pairs of one case (see :func:`collect_pairs`), and their verdict."""
    per_call = {role: prepared[role].per_call_s or 1e-6 for role in SIDES}
    calls = calls_per_block(per_call["baseline"], per_call["candidate"], plan.block_s)

    def take_pair(order: tuple[str, str]) -> dict[str, float]:
        pair: dict[str, float] = {}
        for role in order:
            side = sides[role]
            sent = time.monotonic()
            try:
                seq = side.send("block", calls=calls)
                message = side.answer(seq, sent + timeout)
                waited = time.monotonic() - sent
                if "error" in message:
                    error = _parse(_BlockError, message)
                    raise _CaseEnd("error", f"raised while timed: {_printable(error.error)}", role)
                seconds = _parse(_Block, message).seconds
            except _SideFailure as failure:
                raise _CaseEnd(failure.status, failure.message, role) from None
            if seconds > waited * 1.05 + 0.002:
                side.close()
                raise _CaseEnd(
                    "error",
                    f"the worker reported a block of {seconds:.6g} s, longer than the "
                    f"{waited:.6g} s the parent waited for it: not a measurement; worker killed",
                    role,
                )
            pair[role] = seconds / calls
        return pair

    try:
        pairs = collect_pairs(take_pair, plan, threshold_pct, rng)
    except _CaseEnd as end:
        return _case_result(row, status=end.status, message=end.message, side=end.side)
    estimate = pairs.estimate
    result = _case_result(
        row,
        status="ok",
        timed_s=pairs.seconds,
        pairs=len(pairs.baseline),
        calls_per_block=calls,
        baseline_s=float(np.median(pairs.baseline)),
        candidate_s=float(np.median(pairs.candidate)),
        baseline_samples=pairs.baseline,
        candidate_samples=pairs.candidate,
        baseline_first=pairs.baseline_first,
    )
    if not (1 / IMPLAUSIBLE_RATIO <= estimate.ratio <= IMPLAUSIBLE_RATIO):
        result.status, result.side = "implausible", "both"
        result.message = (
            f"candidate / baseline = {estimate.ratio:.3g}: a change over "
            f"{IMPLAUSIBLE_RATIO:g}x is a broken measurement, not a result"
        )
        return result
    result.ratio, result.ci_low, result.ci_high = estimate.ratio, estimate.low, estimate.high
    result.verdict = verdict(estimate.low, estimate.high, threshold_pct)
    if result.verdict == "unsure":
        factor = settle_factor(estimate.ratio, estimate.low, estimate.high, threshold_pct)
        result.settle = None if math.isinf(factor) else factor
    return result


def _printable(text: str) -> str:
    from bnbench.regression import printable

    return printable(text)


# ---------------------------------------------------------------------------------------------
# The result, its JSON and the stored document's schema


@dataclass
class ABResult:
    """An A/B run: every case, the implementation pair's summary, and what decides the exit.

    ``slower``: the gate's verdict is slower (the implementation's geometric mean, or with
    ``per_case`` any case). ``lost``: cases the candidate failed (raised, crashed, hung, NaN,
    failed verification) where the baseline did not. ``ok`` is what the exit code says: not
    slower, nothing lost, something compared, not interrupted."""

    baseline: str
    candidate: str
    baseline_path: str
    device: str
    threads: int
    sweep: str
    threshold_pct: float
    per_case: bool
    seed: int
    plan: Plan
    cases: list[CaseResult]
    files: dict[str, str | None]
    seconds: float
    interrupted: bool = False
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> Summary:
        return summarize(self.cases, self.threshold_pct)

    @property
    def lost(self) -> list[CaseResult]:
        return [c for c in self.cases if c.lost]

    @property
    def slower(self) -> bool:
        if self.summary.verdict == "slower":
            return True
        return self.per_case and any(c.verdict == "slower" for c in self.cases if c.status == "ok")

    @property
    def compared(self) -> int:
        return sum(c.status == "ok" for c in self.cases)

    @property
    def ok(self) -> bool:
        return not self.slower and not self.lost and self.compared > 0 and not self.interrupted

    def reasons(self) -> list[str]:
        """Why the gate fails (empty when it passes)."""
        why = []
        if self.summary.verdict == "slower":
            why.append("the candidate is slower (geometric mean over the cases)")
        elif self.slower:
            why.append("the candidate is slower on some case (--per-case)")
        if self.lost:
            why.append(f"{len(self.lost)} case(s) the candidate failed where the baseline did not")
        if not self.compared:
            why.append("nothing was compared")
        if self.interrupted:
            why.append("interrupted")
        return why

    def to_dict(self) -> dict[str, Any]:
        s = self.summary
        return {
            "schema": AB_SCHEMA,
            "baseline": {
                "spec": self.baseline,
                "path": self.baseline_path or None,
                "file": self.files.get("baseline"),
            },
            "candidate": {
                "spec": self.candidate,
                "path": None,
                "file": self.files.get("candidate"),
            },
            "device": self.device,
            "threads": self.threads,
            "sweep": self.sweep,
            "threshold_pct": self.threshold_pct,
            "confidence": CONFIDENCE,
            "per_case": self.per_case,
            "seed": self.seed,
            "plan": dataclasses.asdict(self.plan),
            "seconds": self.seconds,
            "interrupted": self.interrupted,
            "ok": self.ok,
            "slower": self.slower,
            "reasons": self.reasons(),
            "summary": dataclasses.asdict(s),
            "cases": [dataclasses.asdict(c) for c in self.cases],
            "environment": self.environment,
        }

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=1, allow_nan=False)

    def to_frame(self):
        """One row per case (pandas, the 'report' extra), without the raw samples."""
        from bnbench.api import _frame

        return _frame(
            [
                {
                    k: v
                    for k, v in dataclasses.asdict(c).items()
                    if k not in ("baseline_samples", "candidate_samples", "baseline_first")
                }
                for c in self.cases
            ]
        )

    def __repr__(self) -> str:
        s = self.summary
        ratio = "n/a" if s.ratio is None else f"{s.ratio:.3f}"
        return (
            f"<ABResult {self.candidate} / {self.baseline}: {ratio} ({s.verdict}), "
            f"{self.compared} of {len(self.cases)} cases compared, "
            f"{'ok' if self.ok else 'FAILED'}, {self.seconds:.0f} s>"
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# The stored document, as the report reads it back (validated: it is an input like any other).
_Ratio = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Name = Annotated[str, Field(max_length=4096)]


class _StoredSide(BaseModel):
    spec: _Name
    path: _Name | None = None
    file: _Name | None = None


class _StoredSummary(BaseModel):
    cases: Annotated[int, Field(ge=0)]
    ratio: _Ratio | None = None
    ci_low: _Ratio | None = None
    ci_high: _Ratio | None = None
    verdict: Literal["slower", "faster", "same", "unsure"]
    settle: Annotated[float, Field(ge=1, allow_inf_nan=False)] | None = None


class _StoredCase(BaseModel):
    mode: _Name
    shape: _Name
    dtype: _Name
    memory_format: _Name
    model: _Name = ""
    status: Literal[CASE_STATUSES]  # type: ignore[valid-type]
    message: Annotated[str, Field(max_length=20_000)] = ""
    side: Literal["", "baseline", "candidate", "both"] = ""
    pairs: Annotated[int, Field(ge=0)] = 0
    ratio: _Ratio | None = None
    ci_low: _Ratio | None = None
    ci_high: _Ratio | None = None
    baseline_s: _Ratio | None = None
    candidate_s: _Ratio | None = None
    verdict: Literal["", "slower", "faster", "same", "unsure"] = ""


class ABDocument(BaseModel):
    """ab.json, as far as the report uses it."""

    schema_: Literal["bnbench-ab/1"] = Field(alias="schema")
    baseline: _StoredSide
    candidate: _StoredSide
    device: _Name
    threads: Annotated[int, Field(ge=1)]
    sweep: _Name
    threshold_pct: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    interrupted: bool
    ok: bool
    reasons: list[Annotated[str, Field(max_length=2000)]] = []
    summary: _StoredSummary
    cases: Annotated[list[_StoredCase], Field(max_length=100_000)]


MAX_AB_BYTES = 256 << 20


def load_document(path: str | os.PathLike) -> ABDocument:
    """Read and validate an ab.json (ValueError naming the file and the field otherwise)."""
    from bnbench.schema import describe

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    if path.stat().st_size > MAX_AB_BYTES:
        raise ValueError(f"{path}: over {MAX_AB_BYTES >> 20} MiB")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        document = json.loads(path.read_bytes().decode("utf-8"), parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: not JSON ({str(exc)[:200]})") from None
    try:
        return ABDocument.model_validate(document)
    except ValidationError as exc:
        raise ValueError(f"{path}: {describe(exc)}") from None


def select_rows(sweep: str, device: str):
    """The sweep's rows (UsageError for an unknown sweep)."""
    from bnbench.benchmark import SWEEPS

    if sweep not in SWEEPS or sweep not in PLANS:
        raise UsageError(f"sweep {sweep!r}: expected one of {', '.join(PLANS)}")
    return SWEEPS[sweep].rows()


def _within(path: str | None, directory: str) -> bool:
    if not path:
        return False
    try:
        return Path(path).resolve().is_relative_to(Path(directory).resolve())
    except (OSError, ValueError):
        return False


def check_baseline_path(baseline: str, baseline_path: str) -> None:
    """--baseline-path applies to a MODULE:ATTR baseline outside bnbench (UsageError)."""
    if not baseline_path:
        return
    if ":" not in baseline:
        raise UsageError(
            f"--baseline-path {baseline_path}: the baseline must be MODULE:ATTR (a registered "
            f"name, {baseline!r}, is imported from where it is installed)"
        )
    if baseline.split(":")[0].split(".")[0] == "bnbench":
        raise UsageError(
            f"--baseline-path {baseline_path}: {baseline!r} is bnbench's own module, always the "
            "installed one (a worker runs bnbench itself): compare a module of your own"
        )
    if not Path(baseline_path).is_dir():
        raise UsageError(f"--baseline-path {baseline_path}: not a directory")


def _check_files(files: dict[str, str | None], baseline_path: str) -> None:
    """With --baseline-path, the baseline's module must come from that directory."""
    if not baseline_path:
        return
    found = files.get("baseline")
    if found is not None and not _within(found, baseline_path):
        raise UsageError(
            f"--baseline-path {baseline_path}: the baseline's module was imported from "
            f"{found}, not from that directory (is the module there? a module of that name "
            "imported earlier, or an installed package, wins)"
        )
