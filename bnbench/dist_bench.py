"""Synchronized BatchNorm, timed across processes: ``bnbench bench --world-size N``.

Each row is one per-rank input shape in one mode (forward_train, backward, forward_backward),
run in a world of N rank processes (bnbench.distributed.run_world: gloo on 127.0.0.1 for CPU,
NCCL with one GPU per rank for CUDA). Every rank times, on its own shard of a fixed per-rank
batch (the global batch grows with N), the synchronized module and, next to it, local
nn.BatchNorm (the ``builtin`` implementation) on the same shard at the same time, so that both
see the same contention. The timer is bnbench.timing.measure with the benchmark's workloads
(bnbench.benchmark.make_workload: rotating inputs, backward on a graph built untimed), made to
run in lockstep: one call per timed block, every rank entering each block together (a barrier
on bnbench's own group, never the module's), and the same number of warm-up calls and samples
on every rank (agreed before timing), since the module's collectives pair the ranks' calls.

A row's time is the slowest rank's median: a training step waits for it. Its communication
share is the time spent inside torch.distributed's collective functions during the timed
blocks, over the time of those blocks, summed over the ranks. World size 1 is the baseline: a
synchronized BatchNorm with one rank runs locally. On CPU the ranks run one thread each by
default (the same at every world size, so a rank's own work costs the same); more ranks than
cores share them (oversubscribed), and then the time also holds ranks waiting for a peer the
scheduler put off, which the ``oversubscribed`` column says.

What a rank sends is JSON, validated (RankResult) before any number is used; a rank that raises,
hangs or dies costs the row it was on (status error, hung or crashed, with what it said) and a
fresh world runs the remaining rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bnbench import isolation, timing
from bnbench.registry import Implementation
from bnbench.results import (
    BENCH_SCHEMA,
    COLUMNS,
    Status,
    clear_run_files,
    environment,
    file_digest,
    output_lock,
    to_csv,
    write_all_atomic,
)
from bnbench.schema import MAX_SAMPLES, Count, NonNegative, Seconds

MODES = ("forward_train", "backward", "forward_backward")
LOCAL = "builtin"  # local BatchNorm on the same shard
DIST_RESULTS = "dist_results.csv"

# Samples per timed module and row: at least this many, and at most (a sample is one call and a
# barrier: the budget bounds the wall time, not only the timed time).
MIN_SAMPLES = 7
MAX_DIST_SAMPLES = 1000
PROBE_SAMPLES = 3  # timed calls (after 3 warm-up calls) that estimate the cost of a sample


@dataclass(frozen=True)
class DistSweep:
    """Per-rank input shapes (N, C, *spatial), times modes; ``budget_s`` per timed module."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    modes: tuple[str, ...] = MODES
    budget_s: float = 0.4

    def rows(self):
        from bnbench.benchmark import Row

        return [
            Row(shape, "float32", "contiguous", mode)
            for shape in self.shapes
            for mode in self.modes
        ]


DIST_SWEEPS = {
    # about 40 s for sync at world sizes 1, 2 and 4 on 2 cores
    "quick": DistSweep("quick", ((16, 32, 16, 16), (32, 64))),
    "full": DistSweep(
        "full",
        ((16, 32, 16, 16), (32, 64), (32, 64, 28, 28), (256, 512), (8, 32, 8, 16, 16)),
        budget_s=1.0,
    ),
    "smoke": DistSweep("smoke", ((8, 16, 8, 8),), budget_s=0.02),
}

DIST_COLUMNS = [
    "implementation",
    "device",
    "world_size",
    "backend",
    "mode",
    "dtype",
    "shape",  # per rank
    "batch_per_rank",
    "global_batch",
    "channels",
    "spatial",
    "status",
    "median_s",  # the slowest rank's median
    "p20_s",
    "p80_s",
    "local_median_s",  # local nn.BatchNorm on the same shard, the slowest rank's median
    "ratio_to_local",
    "comm_share",  # empty with world_size > 1: no collective seen ("n/a")
    "collectives_per_call",
    "slowest_rank",
    "repetitions",
    "threads_per_rank",
    "oversubscribed",
    "message",
]
DIST_KEY = ("implementation", "device", "world_size", "dtype", "shape", "mode")
DIST_NUMERIC = {
    "median_s",
    "p20_s",
    "p80_s",
    "local_median_s",
    "ratio_to_local",
    "comm_share",
    "collectives_per_call",
}
DIST_INTEGER = {
    "world_size",
    "batch_per_rank",
    "global_batch",
    "channels",
    "slowest_rank",
    "repetitions",
    "threads_per_rank",
}


# ---------------------------------------------------------------------------------------------
# Time inside the collectives


# The torch.distributed functions a synchronized BatchNorm may call. Wrapped as attributes of
# torch.distributed and torch.distributed.distributed_c10d (the Python functions, so that the
# wait for the peers is inside what is timed; the ProcessGroup methods bnbench.distributed
# counts return before a gloo/NCCL wait). An implementation that imported one by name (``from
# torch.distributed import all_reduce``) before the wrapping holds the original: its calls are
# not seen, and its share reads "n/a" at world sizes above 1 (never 0, which would claim it
# does not communicate). Collectives issued with async_op=True count their issue, not the
# wait on the handle they return; torch.compile's functional collectives are not seen either.
_COLLECTIVES = (
    "all_reduce all_reduce_coalesced all_gather all_gather_into_tensor all_gather_single "
    "all_gather_coalesced all_gather_object _all_gather_base reduce_scatter "
    "reduce_scatter_tensor reduce_scatter_single _reduce_scatter_base broadcast "
    "broadcast_object_list reduce all_to_all all_to_all_single gather gather_object scatter "
    "scatter_object_list barrier monitored_barrier send recv isend irecv batch_isend_irecv "
    "send_object_list recv_object_list"
).split()


class CollectiveClock:
    """While installed, the time spent inside torch.distributed's collectives during each
    timed call (between begin_call and end_call); calls outside a timed call (bnbench's own
    barriers) pass through untimed. A collective called by another (all_gather_object by
    all_gather) counts once. CPU: perf_counter around the call (gloo returns when done). CUDA:
    events on the current stream around it (a synchronous NCCL collective makes the stream
    wait for it), read after the block's synchronization."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.active = False
        self._depth = 0
        self._saved: list[tuple[Any, str, Any]] = []
        self._call_s = 0.0
        self._call_events: list[tuple[Any, Any]] = []
        self._call_count = 0
        self.per_call: list[tuple[float | list[tuple[Any, Any]], int]] = []

    def __enter__(self) -> CollectiveClock:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        wrappers: dict[int, Any] = {}
        for namespace in (dist, c10d):
            for name in _COLLECTIVES:
                original = namespace.__dict__.get(name)
                if not callable(original):
                    continue
                if id(original) not in wrappers:
                    wrappers[id(original)] = self._wrap(original)
                self._saved.append((namespace, name, original))
                setattr(namespace, name, wrappers[id(original)])
        return self

    def __exit__(self, *exc) -> None:
        for namespace, name, original in reversed(self._saved):
            setattr(namespace, name, original)
        self._saved.clear()

    def _wrap(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def timed(*args, **kwargs):
            if not self.active or self._depth:
                return original(*args, **kwargs)
            self._depth += 1
            self._call_count += 1
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    return original(*args, **kwargs)
                finally:
                    end.record()
                    self._call_events.append((start, end))
                    self._depth -= 1
            begin = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._call_s += time.perf_counter() - begin
                self._depth -= 1

        return timed

    def begin_call(self) -> None:
        self._call_s, self._call_events, self._call_count = 0.0, [], 0
        self.active = True

    def end_call(self) -> None:
        self.active = False
        spent: float | list[tuple[Any, Any]] = self._call_events if self.cuda else self._call_s
        self.per_call.append((spent, self._call_count))

    def totals(self, last: int) -> tuple[float, int]:
        """(seconds inside collectives, collectives called) over the ``last`` timed calls."""
        if self.cuda:
            torch.cuda.synchronize()
        seconds, count = 0.0, 0
        for spent, calls in self.per_call[len(self.per_call) - last :]:
            if isinstance(spent, list):
                seconds += sum(start.elapsed_time(end) for start, end in spent) / 1e3
            else:
                seconds += spent
            count += calls
        return seconds, count


# ---------------------------------------------------------------------------------------------
# A rank's side


def _agree_max(value: float, group) -> float:
    """The largest ``value`` over the ranks of ``group`` (bnbench's own gloo group)."""
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return float(tensor.item())


class _RowFailed(Exception):
    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


def time_lockstep(workload, row, device: str, harness, budget_s: float, clock) -> dict:
    """Time ``workload`` (bnbench.benchmark.Workload) with bnbench.timing.measure, every rank
    in step: one call per timed block, a barrier on ``harness`` before each (untimed, after
    the graph a backward needs is built), 3 warm-up calls, and a number of samples every rank
    agrees on (from the slowest rank's cost of a sample, within ``budget_s``)."""
    import torch.distributed as dist

    from bnbench.benchmark import _wrong_output

    step, prepare, xs = workload.step, workload.prepare, workload.inputs
    k = len(xs)

    def entered(i: int) -> None:  # untimed: what the call needs, then every rank together
        if prepare is not None:
            prepare(i)
        timing.synchronize(device)
        dist.barrier(group=harness)

    def timed(i: int):
        clock.begin_call()
        try:
            return step(i)
        finally:
            clock.end_call()

    try:
        entered(-1)
        out = timed(-1)
        timing.synchronize(device)
    except Exception as exc:
        raise _RowFailed(Status.ERROR, f"raised {_describe(exc)}") from exc
    wrong = _wrong_output(row, out, xs[-1 % k])
    if wrong:
        raise _RowFailed(Status.ERROR, wrong)
    check = out if isinstance(out, torch.Tensor) else xs[-1 % k].grad
    if isinstance(check, torch.Tensor) and not bool(torch.isfinite(check).all()):
        raise _RowFailed(Status.NAN, "non-finite values in the output or input grad")
    try:
        begin = time.perf_counter()
        probe = timing.measure(
            timed,
            device,
            prepare=entered,
            warmup_s=0.0,
            min_samples=PROBE_SAMPLES,
            max_samples=PROBE_SAMPLES,
        )
        per_sample = (time.perf_counter() - begin) / (probe.warmup_calls + len(probe.seconds))
        per_sample = _agree_max(per_sample, harness)
        n = int(min(MAX_DIST_SAMPLES, max(MIN_SAMPLES, budget_s / max(per_sample, 1e-9))))
        samples = timing.measure(
            timed, device, prepare=entered, warmup_s=0.0, min_samples=n, max_samples=n
        )
    except Exception as exc:
        raise _RowFailed(Status.ERROR, f"raised {_describe(exc)}") from exc
    if len(samples.seconds) != n or samples.calls_per_sample != 1:  # pragma: no cover
        raise _RowFailed(Status.ERROR, "bnbench's timer did not run in lockstep")
    comm_s, collectives = clock.totals(last=n)
    return {
        "median_s": samples.median,
        "p20_s": samples.quantile(0.2),
        "p80_s": samples.quantile(0.8),
        "repetitions": n,
        "block_s": math.fsum(samples.seconds),
        "comm_s": comm_s,
        "collectives": collectives,
    }


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:500]}"


def run_rank_row(impl: Implementation, local: Implementation, row, world, budget_s: float) -> dict:
    """This rank's part of ``row``: {"status", "message", "sync", "local"}."""
    from bnbench.benchmark import make_workload

    device_type = torch.device(world.device).type
    config = dataclasses.replace(row.config(device_type), world_size=world.world_size)
    reasons = impl.not_supported_reasons(config)
    if reasons:
        return {"status": Status.NOT_SUPPORTED.value, "message": "; ".join(reasons)}
    result: dict[str, Any] = {"status": Status.OK.value, "message": ""}
    for key, which, what in (
        ("sync", impl, "the synchronized module"),
        ("local", local, "local nn.BatchNorm"),
    ):
        try:
            try:
                workload = make_workload(which, world.device, row)
            except Exception as exc:
                raise _RowFailed(Status.ERROR, f"constructor raised {_describe(exc)}") from exc
            with CollectiveClock(world.device) as clock:
                result[key] = time_lockstep(
                    workload, row, world.device, world.harness, budget_s, clock
                )
            del workload  # its inputs freed before the next module's are made
        except _RowFailed as failed:
            return {"status": failed.status.value, "message": f"{what}: {failed}"}
    return result


def _whole_world(impl: Implementation) -> Implementation:
    """``impl`` whose modules synchronize over the whole world: process_group=None, as
    nn.SyncBatchNorm's default."""
    factory = impl.factory

    def build(rank: int, num_features: int, *args, **kwargs):
        return factory(rank, num_features, *args, process_group=None, **kwargs)

    return dataclasses.replace(impl, factory=build)


def dist_bench_worker(
    spec: str,
    device: str,
    world_size: int,
    rank: int,
    port: int,
    prefix: str,
    threads: int,
    collective_timeout: float,
    rows_json: str,
    budget_s: float,
    *,
    items: list[str],
    channel,
) -> None:
    """One rank (bnbench.isolation's "dist-bench" job): join the world, time each row."""
    import torch.distributed as dist

    from bnbench.benchmark import Row
    from bnbench.checks import tolerant_constructor
    from bnbench.distributed import join_world
    from bnbench.registry import resolve

    torch.set_num_threads(threads)
    impl = _whole_world(tolerant_constructor(resolve([spec])[0]))
    local = resolve([LOCAL])[0]
    world = join_world(device, world_size, rank, port, prefix, collective_timeout)
    rows = [Row.from_dict(r) for r in json.loads(rows_json)]
    for item in items:
        channel.start(item)
        dist.barrier(group=world.harness)  # every rank is here: the row starts together
        channel.done(item, run_rank_row(impl, local, rows[int(item)], world, budget_s))


# ---------------------------------------------------------------------------------------------
# What a rank sends, validated (nothing from a worker is trusted)


class TimedModule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    median_s: Seconds
    p20_s: Seconds
    p80_s: Seconds
    repetitions: Annotated[int, Field(ge=1, le=MAX_SAMPLES, strict=True)]
    block_s: Seconds
    comm_s: NonNegative
    collectives: Count

    @model_validator(mode="after")
    def _consistent(self) -> TimedModule:
        if not self.p20_s <= self.median_s <= self.p80_s:
            raise ValueError("median_s is not between p20_s and p80_s")
        if self.median_s > self.block_s:
            raise ValueError("median_s is larger than the time of all the samples")
        # the collectives ran inside the blocks: their time cannot exceed the blocks' (timer
        # granularity aside)
        if self.comm_s > self.block_s * 1.01 + 1e-6:
            raise ValueError("comm_s is larger than the time of the blocks it was measured in")
        return self


class RankResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok", "not-supported", "error", "nan"]
    message: Annotated[str, Field(max_length=20_000)] = ""
    sync: TimedModule | None = None
    local: TimedModule | None = None

    @field_validator("message")
    @classmethod
    def _printable(cls, value: str) -> str:
        from bnbench.gate import printable

        return printable(value)

    @model_validator(mode="after")
    def _measured_rows_have_times(self) -> RankResult:
        if self.status == "ok" and (self.sync is None or self.local is None):
            raise ValueError("an ok result without the times of both modules")
        return self


def validate_rank(result: dict | None) -> RankResult | str:
    """The rank's result checked, or what is wrong with it."""
    from bnbench.schema import describe

    try:
        return RankResult.model_validate(result)
    except ValidationError as exc:
        return f"the rank sent an invalid result: {describe(exc)}"


def _broken(report) -> bool:
    """Whether the world must be restarted after this rank's report: it gave no result, an
    invalid one, or failed (its peers may be waiting in a collective)."""
    if report.result is None:
        return True
    checked = validate_rank(report.result)
    return isinstance(checked, str) or checked.status not in ("ok", "not-supported")


def merge_ranks(reports: list, world_size: int) -> dict:
    """One row's measured columns from every rank's report."""
    from bnbench.distributed import _waited_on_a_peer

    ok: list[tuple[int, RankResult]] = []
    failed: list[tuple[int, str, str]] = []  # (rank, status, message)
    for rank, report in enumerate(reports):
        if report.result is None:
            problem = report.problem or "no result"
            status = (
                Status.HUNG.value
                if problem.startswith("hung")
                else Status.CRASHED.value
                if problem.startswith("crashed")
                else Status.ERROR.value
            )
            failed.append((rank, status, problem))
            continue
        checked = validate_rank(report.result)
        if isinstance(checked, str):
            failed.append((rank, Status.ERROR.value, checked))
        elif checked.status == "ok":
            ok.append((rank, checked))
        else:
            failed.append((rank, checked.status, checked.message))
    if failed and all(status == Status.NOT_SUPPORTED.value for _, status, _ in failed):
        if not ok:
            return {"status": Status.NOT_SUPPORTED, "message": failed[0][2]}
        failed = [
            (r, Status.ERROR.value, f"not supported on this rank only: {m}") for r, _, m in failed
        ]
    if failed:
        # the rank that went wrong first, then those that only waited on it
        failed.sort(key=lambda f: (_waited_on_a_peer(f[2]), f[0]))
        lines = [f"rank {rank}: {message}" for rank, _, message in failed[:3]]
        if len(failed) > 3:
            lines.append(f"... and {len(failed) - 3} more rank(s)")
        return {"status": Status(failed[0][1]), "message": "\n".join(lines)}
    syncs = [(rank, r.sync) for rank, r in ok if r.sync is not None]
    locals_ = [r.local for _, r in ok if r.local is not None]
    slowest, sync = max(syncs, key=lambda rs: rs[1].median_s)
    local_median = max(t.median_s for t in locals_)
    calls = sum(t.repetitions for _, t in syncs)
    collectives = sum(t.collectives for _, t in syncs)
    comm_share: float | str
    if collectives:
        comm_share = min(1.0, sum(t.comm_s for _, t in syncs) / sum(t.block_s for _, t in syncs))
    else:
        comm_share = 0.0 if world_size == 1 else ""  # "n/a": communicating, or not seen
    return {
        "status": Status.OK,
        "median_s": sync.median_s,
        "p20_s": sync.p20_s,
        "p80_s": sync.p80_s,
        "local_median_s": local_median,
        "ratio_to_local": sync.median_s / local_median,
        "comm_share": comm_share,
        "collectives_per_call": collectives / calls,
        "slowest_rank": slowest,
        "repetitions": sync.repetitions,
        "message": ""
        if collectives or world_size == 1
        else "no torch.distributed collective seen during the timed calls: communication "
        "share n/a (collectives imported by name, or issued async, are not seen)",
    }


# ---------------------------------------------------------------------------------------------
# The parent's side


def dist_devices(requested: Sequence[str] = ()) -> list[str]:
    """The devices to run on: those requested (cuda even where there is none: its rows are
    not supported, with the reason), or every available one."""
    from bnbench.gate import available_devices
    from bnbench.registry import UsageError

    for device in requested:
        if device not in ("cpu", "cuda"):
            raise UsageError(f"--device {device}: expected cpu or cuda")
    return list(dict.fromkeys(requested)) or available_devices()


def threads_per_rank(world_sizes: Sequence[int], threads: int | None = None) -> int:
    """Threads each rank runs with, the same at every world size: the cores shared by the
    largest world (at least 1), or ``threads``."""
    return threads or max(1, (os.cpu_count() or 1) // max(world_sizes))


def base_columns(impl_name: str, device: str, world_size: int, row, threads: int) -> dict:
    shape = row.shape
    cpu = torch.device(device).type == "cpu"
    return {
        "implementation": impl_name,
        "device": device,
        "world_size": world_size,
        "backend": "gloo" if cpu else "nccl",
        "mode": row.mode,
        "dtype": row.dtype,
        "shape": "x".join(map(str, shape)),
        "batch_per_rank": shape[0],
        "global_batch": shape[0] * world_size,
        "channels": shape[1],
        "spatial": "x".join(map(str, shape[2:])) or "-",
        "threads_per_rank": threads,
        "oversubscribed": bool(cpu and world_size * threads > (os.cpu_count() or 1)),
    }


class DistResultsWriter:
    """dist_results.csv, an empty results.csv (so that the directory is a bnbench results
    directory that ``bnbench report`` reads) and environment.json, rewritten as one set after
    every row (bnbench.benchmark.ResultsWriter's rules: staged, then renamed, environment.json
    last with every table's sha256; fsynced at the end)."""

    def __init__(self, directory: Path, env: dict):
        self.directory = Path(directory)
        self.rows: list[dict] = []
        self.env = env
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self, complete: bool = False, final: bool = False) -> None:
        table = to_csv(self.rows, DIST_COLUMNS)
        empty = to_csv([], COLUMNS)
        env = dict(
            self.env,
            complete=complete,
            rows=0,
            dist_rows=len(self.rows),
            files={
                "results.csv": {"sha256": file_digest(empty), "rows": 0},
                DIST_RESULTS: {"sha256": file_digest(table), "rows": len(self.rows)},
            },
        )
        write_all_atomic(
            {
                self.directory / "results.csv": empty,
                self.directory / DIST_RESULTS: table,
                self.directory / "environment.json": json.dumps(env, indent=2),
            },
            durable=final,
        )


def run_dist_bench(
    impls: list[Implementation],
    specs: list[str],
    devices: list[str],
    world_sizes: Sequence[int],
    sweep: DistSweep,
    output: Path,
    *,
    threads: int | None = None,
    timeout: float = 300.0,
    progress: Callable[[dict], None] | None = None,
) -> Path:
    """Time every implementation on every device at every world size over the sweep's rows;
    returns the directory. The directory is held for the run (OutputInUse for a second
    writer) and what an earlier run left there is removed first (dist_results.csv is
    rewritten at once)."""
    from bnbench.results import new_run_id

    with output_lock(output):
        clear_run_files(output)
        return _run(
            impls,
            specs,
            devices,
            list(world_sizes),
            sweep,
            Path(output),
            threads,
            timeout,
            progress,
            new_run_id(),
        )


def _run(impls, specs, devices, world_sizes, sweep, output, threads, timeout, progress, run_id):
    from bnbench.distributed import collective_timeout, run_world, world_device_problem

    isolation.begin()
    threads = threads_per_rank(world_sizes, threads)
    rows = sweep.rows()
    env = environment()
    env.update(
        {
            "schema": BENCH_SCHEMA,
            "sweep": f"dist-{sweep.name}",
            "kind": "dist-bench",
            "world_sizes": world_sizes,
            "threads": threads,
            "threads_per_rank": threads,
            "devices": devices,
            "implementations": specs,
            "run_id": run_id,
        }
    )
    writer = DistResultsWriter(output, env)
    writer.flush()  # an earlier run's dist_results.csv is gone from the start

    def record(base: dict, measured: dict) -> None:
        row = {c: "" for c in DIST_COLUMNS}
        row.update(base)
        row.update({k: v for k, v in measured.items() if k in DIST_COLUMNS})
        writer.add(row)
        if progress:
            progress(row)

    rows_json = json.dumps([r.to_dict() for r in rows])
    ct = collective_timeout(timeout)
    try:
        for impl, spec in zip(impls, specs):
            for device in devices:
                for world_size in world_sizes:
                    blocked = world_device_problem(device, world_size)
                    runnable = []
                    for index, row in enumerate(rows):
                        base = base_columns(impl.name, device, world_size, row, threads)
                        config = dataclasses.replace(row.config(device), world_size=world_size)
                        reasons = impl.not_supported_reasons(config)
                        if blocked:
                            reasons.append(blocked)
                        if reasons:
                            record(
                                base,
                                {"status": Status.NOT_SUPPORTED, "message": "; ".join(reasons)},
                            )
                        elif impl.load_error:
                            record(base, {"status": Status.CRASHED, "message": impl.load_error})
                        else:
                            runnable.append(str(index))
                    if not runnable:
                        continue

                    def args(rank, port, prefix, _spec=spec, _d=device, _w=world_size):
                        return (
                            _spec,
                            _d,
                            _w,
                            rank,
                            port,
                            prefix,
                            threads,
                            ct,
                            rows_json,
                            sweep.budget_s,
                        )

                    def received(item, reports, secs, _impl=impl, _d=device, _w=world_size):
                        base = base_columns(_impl.name, _d, _w, rows[int(item)], threads)
                        record(base, merge_ranks(reports, _w))

                    try:
                        run_world(
                            "dist-bench", args, runnable, world_size, timeout, received, _broken
                        )
                    except isolation.Interrupted:
                        raise
                    except Exception as exc:  # bnbench's own fault: this world's rows
                        problem = f"bnbench failed running this world: {_describe(exc)}"
                        done = {
                            (
                                r["implementation"],
                                r["device"],
                                r["world_size"],
                                r["shape"],
                                r["mode"],
                            )
                            for r in writer.rows
                        }
                        for item in runnable:
                            row = rows[int(item)]
                            base = base_columns(impl.name, device, world_size, row, threads)
                            key = (impl.name, device, world_size, base["shape"], row.mode)
                            if key not in done:
                                record(base, {"status": Status.ERROR, "message": problem})
        writer.flush(complete=True, final=True)
    except (KeyboardInterrupt, isolation.Interrupted):
        writer.flush(complete=False, final=True)
        raise KeyboardInterrupt() from None
    return output


# ---------------------------------------------------------------------------------------------
# Reading the table back, and how the cost grows with the ranks


def parse_dist_row(raw: dict) -> dict:
    """A dist_results.csv row with its numbers as numbers (empty cells as None)."""
    row: dict[str, Any] = dict(raw)
    for key in DIST_NUMERIC | DIST_INTEGER:
        value = row.get(key)
        if value in ("", None):
            row[key] = None
        elif key in DIST_INTEGER:
            row[key] = int(float(value))
        else:
            row[key] = float(value)
    if "oversubscribed" in row:
        row["oversubscribed"] = str(row["oversubscribed"]) == "True"
    return row


def read_dist_results(directory: str | os.PathLike) -> list[dict]:
    import csv

    with open(Path(directory) / DIST_RESULTS, newline="") as f:
        return [parse_dist_row(r) for r in csv.DictReader(f)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def scaling(rows: list[dict]) -> list[dict]:
    """The measured rows with how their cost grows: per implementation, device, shape and
    mode, each world size's time, its ratio to the same row at world size 1 (None without
    one), its ratio to local BatchNorm and its communication share (None: n/a)."""
    measured = [r for r in rows if r.get("status") == Status.OK.value]

    def key(r: dict) -> tuple:
        return (r["implementation"], r["device"], r["dtype"], r["shape"], r["mode"])

    at_one = {key(r): _number(r["median_s"]) for r in measured if int(r["world_size"]) == 1}
    out = []
    for r in sorted(
        measured,
        key=lambda r: (
            key(r)[:4],
            MODES.index(r["mode"]) if r["mode"] in MODES else 99,
            int(r["world_size"]),
        ),
    ):
        median = _number(r["median_s"])
        one = at_one.get(key(r))
        out.append(
            {
                "implementation": r["implementation"],
                "device": r["device"],
                "shape": r["shape"],
                "mode": r["mode"],
                "world_size": int(r["world_size"]),
                "median_s": median,
                "vs_world_size_1": median / one if median and one else None,
                "vs_local": _number(r.get("ratio_to_local")),
                "comm_share": _number(r.get("comm_share")),
                "oversubscribed": str(r.get("oversubscribed")) in ("True", "true", "1"),
            }
        )
    return out


def summary_lines(rows: list[dict]) -> list[str]:
    """Per implementation, device and world size: geometric means over its measured rows of
    the time relative to local BatchNorm and to one rank, and the range of the communication
    share."""
    from bnbench.results import geomean

    scaled = scaling(rows)
    lines = []
    for impl, device, ws in dict.fromkeys(
        (r["implementation"], r["device"], r["world_size"]) for r in scaled
    ):
        mine = [
            r
            for r in scaled
            if (r["implementation"], r["device"], r["world_size"]) == (impl, device, ws)
        ]
        shares = [r["comm_share"] for r in mine if r["comm_share"] is not None]
        share = (
            f"{share_text(min(shares))} to {share_text(max(shares))}"
            if len(shares) == len(mine)
            else "n/a for some rows"
        )
        vs_one = geomean(r["vs_world_size_1"] for r in mine if r["vs_world_size_1"])
        lines.append(
            f"{impl}@{device} x{ws}: {len(mine)} rows, time / local BN (geometric mean) "
            f"{geomean(r['vs_local'] for r in mine if r['vs_local']):.2f}x, time / 1 rank "
            + ("n/a" if math.isnan(vs_one) else f"{vs_one:.2f}x")
            + f", comm share {share}"
        )
    return lines


def share_text(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def oversubscription_notes(rows: list[dict]) -> list[str]:
    """One line per (device, world size) whose ranks shared cores."""
    seen = dict.fromkeys(
        (r["device"], int(r["world_size"]), int(r["threads_per_rank"]))
        for r in rows
        if str(r.get("oversubscribed")) in ("True", "true", "1")
    )
    cores = os.cpu_count() or 1
    return [
        f"{device}, {ws} ranks x {t} thread(s) on {cores} core(s): oversubscribed, the ranks "
        "share cores, so these times also hold ranks waiting for a peer the scheduler put off "
        "(expected: they measure the machine as much as the communication)"
        for device, ws, t in seen
    ]
