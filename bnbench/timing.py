"""The timer: warm-up, adaptive repetitions until the median is stable, raw samples kept.

CPU: perf_counter around a block of calls, at the thread count the caller fixed. CUDA: CUDA
events around the block, no synchronization inside it, every stream synchronized after it.
A step that needs untimed preparation (backward needs a fresh graph) is timed one call at a
time, the preparation outside the events / perf_counter pair.
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Samples:
    """Per-call times in seconds, one per timed block (the block's time / its calls)."""

    seconds: list[float] = field(default_factory=list)
    calls_per_sample: int = 1
    warmup_calls: int = 0

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
) -> Samples:
    """Time ``step(i)`` (i counts calls, for rotating inputs) until stable or out of budget.

    ``prepare(i)``, when given, runs untimed before each call, and each sample is one call.
    A CUDA block holds enough calls (20 ms) that the launch gap before its first kernel, which
    the events count, is amortized: with one call per block a 2x workload reads as 1.7x.
    """
    cuda = torch.device(device).type == "cuda"
    if min_block_s is None:
        min_block_s = 2e-2 if cuda else 1e-3
    calls = 0

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

    samples = Samples()
    # Warm-up: at least three calls and warmup_s of work; estimates the per-call time.
    begin = time.perf_counter()
    warm = 0
    while warm < 3 or time.perf_counter() - begin < warmup_s:
        if prepare is not None:
            run_prepared()
        else:
            run_block(1)
        warm += 1
    synchronize(device)
    samples.warmup_calls = warm
    per_call = (time.perf_counter() - begin) / warm
    inner = (
        1 if prepare is not None else max(1, min(10_000, int(min_block_s / max(per_call, 1e-9))))
    )
    samples.calls_per_sample = inner
    deadline = time.perf_counter() + budget_s
    while len(samples.seconds) < max_samples:
        elapsed = run_prepared() if prepare is not None else run_block(inner)
        samples.seconds.append(elapsed / inner)
        if len(samples.seconds) >= min_samples and (
            samples.stable or time.perf_counter() > deadline
        ):
            break
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
