"""The timer: warm-up, adaptive repetitions until the median is stable, raw samples kept.

CPU: perf_counter around a block of calls, at the thread count the caller fixed. CUDA: CUDA
events around the block, no synchronization inside it, every stream synchronized after it.
A step that needs untimed preparation (backward needs a fresh graph) is timed one call at a
time, the preparation outside the events / perf_counter pair.

Disturbed blocks (CPU). Each block also records the process's CPU time (all its threads) and
its involuntary context switches, and the machine's load is read when timing starts. On a
machine where another program keeps a core busy, a block sometimes takes a scheduler time
slice longer than it should: the process (or one of its OpenMP threads, which the others then
wait for at the end of a parallel region) is off the CPU, runnable but not running, for one or
more 4 ms ticks. Such a block is *disturbed* (``disturbed``): its process CPU time is under
DISTURBED_CPU_RATIO of its wall time (the main thread is on the CPU for the whole of an
undisturbed block, working or spinning, so an undisturbed block reads at least 0.93), or the
process was preempted during it and it took over DISTURBED_SLOWDOWN times the row's fastest
block per call (a worker thread preempted while the main thread spins at the barrier). With
``drop_disturbed`` the timer leaves disturbed blocks out of the samples and times more blocks
in their place, for up to one more budget; a row that still has fewer than ``min_samples``
undisturbed blocks keeps every block and is marked disturbed (``Samples.disturbed``). So is a
row whose kept blocks' threads spent over DISTURBED_WAIT_RATIO of their time waiting on a run
queue (Linux schedstat): a row stuck at the step in every block, where no block is slower
than another and the spinning main thread keeps the CPU time up.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

try:
    import resource
except ImportError:  # pragma: no cover - not a Unix
    resource = None  # type: ignore[assignment]

# A block whose process CPU time is under this fraction of its wall time was off the CPU (or
# waiting for a thread that was) for at least a fifth of it. Measured on the project's 2-core
# machine: undisturbed blocks read 0.93-1.16 (quiet and busy alike); blocks slowed by a busy
# neighbour 0.01-0.7 with one thread, 0.25-0.71 with two, except those described next.
DISTURBED_CPU_RATIO = 0.8
# A row whose kept blocks' threads waited on a run queue (runnable, not running) for more than
# this fraction of their wall time, summed over threads and blocks, is disturbed whatever its
# CPU time: with two threads a parallel region can wait a slice for a worker put off while the
# main thread spins (counted as CPU time), in every block, so that no block is slower than the
# others. Measured: a row stuck at such a step (8-24 ms a call for a 15-27 us forward) read
# CPU / wall 1.0 and waiting 1.0-1.08 in every block; a 25 MB clone 3x its quiet time, 0.74;
# quiet rows 0.00-0.01. Per block it says less: an idle worker spinning between regions waits
# too, and a few unslowed blocks of a quiet row waited over half their time.
DISTURBED_WAIT_RATIO = 0.5
# A preempted block taking this many times the row's fastest block per call is disturbed
# whatever its CPU time: with two threads, the main thread spinning at the end of a parallel
# region stays on the CPU (and is counted) while the worker it waits for is off it.
DISTURBED_SLOWDOWN = 2.0


@dataclass(frozen=True)
class Block:
    """One timed block: wall seconds, the process's CPU seconds over it (every thread; other
    threads' time is counted at scheduler ticks and switches, the calling thread's exactly),
    its involuntary context switches (every thread), its calls, and the time its threads
    waited on a run queue (Linux schedstat; 0 where unknown)."""

    wall_s: float
    cpu_s: float
    involuntary: int
    calls: int
    # seconds this process's threads spent runnable but not running (on a run queue), summed
    waiting_s: float = 0.0

    @property
    def per_call(self) -> float:
        return self.wall_s / self.calls

    @property
    def cpu_per_wall(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else math.nan


def disturbed(block: Block, fastest_per_call: float) -> bool:
    """Whether ``block`` was slowed by something outside it (see the module docstring):
    off the CPU for over a fifth of its wall time, or preempted and over DISTURBED_SLOWDOWN
    times the fastest block per call (``fastest_per_call``, the row's)."""
    if block.wall_s <= 0:
        return False
    if block.cpu_s < DISTURBED_CPU_RATIO * block.wall_s:
        return True
    return block.involuntary > 0 and block.per_call > DISTURBED_SLOWDOWN * fastest_per_call


def classify(blocks: list[Block]) -> list[bool]:
    """disturbed() of every block, against the fastest of them."""
    if not blocks:
        return []
    fastest = min(b.per_call for b in blocks)
    return [disturbed(b, fastest) for b in blocks]


@dataclass
class Load:
    """The machine's load when timing started: the 1-minute load average, the tasks running or
    runnable now (/proc/stat procs_running, this process's running threads included) and the
    CPUs. None where /proc does not say (not Linux)."""

    load1: float | None = None
    runnable: int | None = None
    cpus: int = 1


def machine_load() -> Load:
    load = Load(cpus=os.cpu_count() or 1)
    try:
        with open("/proc/loadavg") as f:
            load.load1 = float(f.read().split()[0])
        with open("/proc/stat") as f:
            found = re.search(r"^procs_running (\d+)", f.read(), re.MULTILINE)
        load.runnable = int(found.group(1)) if found else None
    except (OSError, ValueError, IndexError):
        pass
    return load


@dataclass
class Samples:
    """Per-call times in seconds, one per timed block (the block's time / its calls), and what
    the blocks say about how undisturbed the machine let them be."""

    seconds: list[float] = field(default_factory=list)
    calls_per_sample: int = 1
    warmup_calls: int = 0
    # every timed block, in order (those left out of ``seconds`` too)
    blocks: list[Block] = field(default_factory=list)
    # per-call times of the disturbed blocks left out of ``seconds`` (drop_disturbed)
    dropped: list[float] = field(default_factory=list)
    disturbed_blocks: int = 0
    # too few undisturbed blocks (``seconds`` then holds every block, disturbed ones included),
    # or the kept blocks' threads waited on a run queue over DISTURBED_WAIT_RATIO of the time
    disturbed: bool = False
    # run-queue waiting of the kept blocks' threads over their wall time (NaN: not classified)
    waiting_per_wall: float = math.nan
    # whether blocks were classified at all (CPU only: a CUDA block is timed on the GPU)
    classified: bool = False
    load: Load = field(default_factory=Load)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.seconds)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def stable(self) -> bool:
        """The median's uncertainty (IQR / sqrt(n)) is within 1% of it."""
        n = len(self.seconds)
        if n < 7:
            return False
        iqr = self.quantile(0.75) - self.quantile(0.25)
        return iqr / (n**0.5) <= 0.01 * self.median

    @property
    def cpu_per_wall(self) -> float:
        """The process's CPU time over the wall time, summed over every block (NaN when none):
        about 1 or more when nothing else took the CPU."""
        wall = math.fsum(b.wall_s for b in self.blocks)
        return math.fsum(b.cpu_s for b in self.blocks) / wall if wall > 0 else math.nan

    def settle(self, min_samples: int, drop: bool) -> None:
        """Classify every block against the fastest of all of them; the row is disturbed when
        fewer than ``min_samples`` blocks are not, or when the kept blocks' threads waited on a
        run queue over DISTURBED_WAIT_RATIO of their time. ``drop``: the undisturbed blocks
        become the samples when there are enough of them (otherwise every block stays)."""
        if not self.classified or not self.blocks:
            return
        flags = classify(self.blocks)
        self.disturbed_blocks = sum(flags)
        clean = [b for b, bad in zip(self.blocks, flags) if not bad]
        kept = clean if drop and len(clean) >= min_samples else self.blocks
        wall = math.fsum(b.wall_s for b in kept)
        self.waiting_per_wall = math.fsum(b.waiting_s for b in kept) / wall if wall else 0.0
        self.disturbed = len(clean) < min_samples or self.waiting_per_wall > DISTURBED_WAIT_RATIO
        if not drop:  # counted and judged, the samples left as timed
            return
        self.seconds = [b.per_call for b in kept]
        self.dropped = [b.per_call for b, bad in zip(self.blocks, flags) if bad and kept is clean]


def last_level_cache_bytes(device: str) -> int:
    """The cache that rotating inputs must overflow: L2 on a GPU, the last level on a CPU."""
    if torch.device(device).type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    largest = 0
    for index in range(5):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        largest = max(largest, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return largest or 32 << 20


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _RunQueueClock:
    """The time this process's threads have waited on a run queue (runnable, not running), in
    seconds: the second field of each thread's /proc/self/task/TID/schedstat, opened once (the
    threads there when timing starts: torch's pool exists after the warm-up) and re-read with
    pread (about 1.5 us a thread). 0 where there is no schedstat."""

    def __init__(self, enabled: bool = True) -> None:
        self.fds: list[int] = []
        if not enabled:
            return
        try:
            for tid in os.listdir("/proc/self/task"):
                try:
                    self.fds.append(os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY))
                except OSError:
                    continue
        except OSError:
            pass

    def waited_s(self) -> float:
        total = 0
        for fd in self.fds:
            try:
                total += int(os.pread(fd, 128, 0).split()[1])
            except (OSError, ValueError, IndexError):  # a thread that has exited
                continue
        return total / 1e9

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _involuntary_switches() -> int:
    """Involuntary context switches of this process so far (every thread)."""
    if resource is None:  # pragma: no cover - not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def measure(
    step: Callable[[int], object],
    device: str,
    *,
    prepare: Callable[[int], None] | None = None,
    budget_s: float = 1.0,
    warmup_s: float = 0.05,
    min_samples: int = 7,
    max_samples: int = 1000,
    min_block_s: float | None = None,
    drop_disturbed: bool = False,
) -> Samples:
    """Time ``step(i)`` (i counts calls, for rotating inputs) until stable or out of budget.

    ``prepare(i)``, when given, runs untimed before each call, and each sample is one call.
    A CUDA block holds enough calls (20 ms) that the launch gap before its first kernel, which
    the events count, is amortized: with one call per block a 2x workload reads as 1.7x.

    On CPU every block is classified (disturbed or not; see the module docstring) and counted
    in ``Samples.disturbed_blocks``. ``drop_disturbed`` leaves disturbed blocks out of the
    samples and times others in their place, for up to ``budget_s`` more (so the number of
    samples is not fixed: callers that need exactly ``max_samples`` blocks, ranks timing in
    lockstep, leave it off).
    """
    cuda = torch.device(device).type == "cuda"
    if min_block_s is None:
        min_block_s = 2e-2 if cuda else 1e-3
    calls = 0
    samples = Samples(classified=not cuda)

    def run_block(n: int) -> float:
        nonlocal calls
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                step(calls)
                calls += 1
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        for _ in range(n):
            step(calls)
            calls += 1
        return time.perf_counter() - begin

    def run_prepared() -> float:
        assert prepare is not None
        prepare(calls)  # outside the block: untimed
        return run_block(1)

    def timed_block(n: int) -> Block:
        """A block of ``n`` calls (one prepared call when ``prepare``), with the process's CPU
        time and involuntary switches over it."""
        if prepare is not None:
            prepare(calls)  # outside the block: untimed
        waited, switches, cpu = queue.waited_s(), _involuntary_switches(), time.process_time()
        wall = run_block(n)
        cpu = time.process_time() - cpu
        switches = _involuntary_switches() - switches
        return Block(wall, cpu, switches, n, max(0.0, queue.waited_s() - waited))

    # Warm-up: at least three calls and warmup_s of work; estimates the per-call time (on CPU
    # from the median call, so that one call slowed by the machine does not shrink the blocks).
    begin = time.perf_counter()
    warm = 0
    warm_times = []
    while warm < 3 or time.perf_counter() - begin < warmup_s:
        if prepare is not None:
            warm_times.append(run_prepared())
        else:
            warm_times.append(run_block(1))
        warm += 1
    synchronize(device)
    samples.warmup_calls = warm
    per_call = (time.perf_counter() - begin) / warm
    if not cuda:
        per_call = min(per_call, statistics.median(warm_times))
    inner = (
        1 if prepare is not None else max(1, min(10_000, int(min_block_s / max(per_call, 1e-9))))
    )
    samples.calls_per_sample = inner
    samples.load = machine_load()
    now = time.perf_counter()
    deadline = now + budget_s
    # disturbed blocks are timed again, for up to one more budget
    hard_deadline = deadline + (budget_s if drop_disturbed and not cuda else 0.0)
    drop = drop_disturbed and not cuda
    fastest = math.inf
    flags: list[bool] = []  # each block disturbed or not, against the fastest so far
    # the threads are there now (the warm-up started torch's pool); a CUDA block is timed on
    # the GPU, and its blocks are not classified
    queue = _RunQueueClock(enabled=not cuda)
    try:
        while len(samples.seconds) < max_samples and len(samples.blocks) < 2 * max_samples:
            block = timed_block(inner)
            samples.blocks.append(block)
            if not drop:
                samples.seconds.append(block.per_call)
            elif block.per_call < fastest:  # a new fastest: every block judged again
                fastest = block.per_call
                flags = classify(samples.blocks)
                samples.seconds = [b.per_call for b, bad in zip(samples.blocks, flags) if not bad]
            else:
                flags.append(disturbed(block, fastest))
                if not flags[-1]:
                    samples.seconds.append(block.per_call)
            now = time.perf_counter()
            if len(samples.seconds) >= min_samples and (samples.stable or now > deadline):
                break
            if len(samples.blocks) >= min_samples and now > hard_deadline:
                break
    finally:
        queue.close()
    samples.settle(min_samples, drop_disturbed and not cuda)
    return samples


# ---------------------------------------------------------------------------------------------
# Peak memory: the increase over what is already held (the inputs) during one call.

_LIBC = None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        found = re.search(rf"{key}:\s+(\d+) kB", f.read())
    return int(found.group(1)) * 1024 if found else 0


def peak_memory(
    call: Callable[[], object], device: str, prepare: Callable[[], None] | None = None
) -> tuple[int | None, str]:
    """(bytes, method). CUDA: the caching allocator's peak over what was allocated before.
    CPU: the peak resident set size over the resident size before (Linux: freed memory is
    returned with malloc_trim, then VmHWM is reset through /proc/self/clear_refs)."""
    if prepare is not None:
        prepare()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak, "cuda-allocator-peak"
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS")
        result = call()
        peak = _status_bytes("VmHWM") - base
        del result
        return max(peak, 0), "cpu-rss-high-water-mark"
    except (OSError, AttributeError):
        call()
        return None, "unavailable"
