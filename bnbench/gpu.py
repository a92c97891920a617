"""The CUDA leg's timing: real networks' BatchNorm shapes, kernel time apart from call time.

A CUDA row reports two times:

- the *call* (``median_s``, bnbench.timing.measure): blocks of back-to-back calls as a training
  loop makes them, CUDA events around each block. When the kernels are short the GPU waits
  for the host between them, and this is the Python and launch cost, not BatchNorm's.
- the *kernel* (``kernel_s``, time_kernel here): the GPU time of one call with launch overhead
  removed. The call is captured once in a CUDA graph and each repetition replays it between
  two events; the L2 is flushed before each repetition by zeroing a buffer larger than it
  (cold cache, as Triton's do_bench does; ``cache="warm"`` leaves it), and while the GPU
  zeroes that buffer the host has already queued the replay, so no launch gap is counted.
  A call that cannot be captured (it synchronizes, or reads a tensor on the host) is timed
  the same way without the graph (``kernel_method`` events: launch gaps then count once the
  kernels are shorter than the flush), and says why.

Repetitions stop on noise, not on a count (as NVIDIA's nvbench does): once ``min_samples``
repetitions and ``min_time_s`` of GPU time are in, timing stops when the 95% confidence
interval of the median (distribution-free, from order statistics) is within ``max_noise`` of
it on either side, or when ``max_time_s`` has passed (``stop_reason`` noise / time-cap).

While a row is timed, NVML (the nvidia-ml-py package) is read after every batch of
repetitions: the SM clock (median and lowest), the memory clock, the enforced power limit,
the power draw and temperature at the end, and the clock event ("throttle") reasons. A row
during which the clocks were held down by a thermal or hardware slowdown or the power brake is
marked ``throttled``; the software power cap (the GPU keeping under its power limit) is
recorded in ``throttle_reasons`` but is how a loaded GPU normally runs.

Bandwidth. Each row's bytes are the least traffic its mode needs (bnbench.benchmark
BYTES_PER_ELEMENT: a forward reads x and writes y); ``kernel_gbps`` is those bytes over the
kernel time and ``bandwidth_share`` its ratio to a device-to-device copy of a tensor of the
row's size, timed the same way in the same run (read + written). A share above 1 is a
measurement that cannot be right and the row is flagged (over-copy-bandwidth).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

# ---------------------------------------------------------------------------------------------
# Shapes users train.

# ResNet-50's BatchNorm2d layers at 224x224 input (torchvision's layout: the stride in the
# 3x3 conv of a bottleneck), grouped by shape: (channels, height, width, layers of that shape).
# 53 layers, 12 distinct shapes.
RESNET50_BN = (
    (64, 112, 112, 1),  # stem
    (64, 56, 56, 6),  # layer1: the bottlenecks' 1x1 and 3x3
    (256, 56, 56, 4),  # layer1: expansion and downsample
    (128, 56, 56, 1),  # layer2, first block's 1x1 (before the stride)
    (128, 28, 28, 7),
    (512, 28, 28, 5),
    (256, 28, 28, 1),  # layer3, first block's 1x1
    (256, 14, 14, 11),
    (1024, 14, 14, 7),
    (512, 14, 14, 1),  # layer4, first block's 1x1
    (512, 7, 7, 5),
    (2048, 7, 7, 4),
)
# A BatchNorm1d over a transformer's tokens, (batch x tokens, features): ViT-B/16 at 224x224
# has 197 tokens of 768 features (a BN feature head normalizes every token).
TRANSFORMER_TOKENS, TRANSFORMER_FEATURES = 197, 768


def resnet50_shapes(batch: int) -> list[tuple[int, ...]]:
    """ResNet-50's distinct BatchNorm input shapes at ``batch`` images."""
    return [(batch, c, h, w) for c, h, w, _ in RESNET50_BN]


def transformer_head_shape(batch: int) -> tuple[int, int]:
    return (batch * TRANSFORMER_TOKENS, TRANSFORMER_FEATURES)


# A row needs the input, grad_output, output, input grad and saved statistics, and the call
# timer keeps rotating copies of the input and grad_output (up to two L2 sizes in all, at
# least one of each): FOOTPRINT_TENSORS tensors of the row's size is a safe upper bound.
FOOTPRINT_TENSORS = 8
# The share of the GPU's free memory a row may plan to use (the rest: allocator slack, the
# flush buffer, the floors' tensors, the CUDA context of the parent).
MEMORY_SHARE = 0.6


def footprint_bytes(shape: tuple[int, ...], element_size: int) -> int:
    return FOOTPRINT_TENSORS * math.prod(shape) * element_size


def memory_reason(shape: tuple[int, ...], element_size: int, free_bytes: int) -> str:
    """Why a row of ``shape`` does not fit a GPU with ``free_bytes`` free (empty when it
    does): the CUDA sweep is sized from the GPU's memory, row by row."""
    need = footprint_bytes(shape, element_size)
    if need <= MEMORY_SHARE * free_bytes:
        return ""
    return (
        f"needs about {need / 2**30:.1f} GiB of GPU memory, more than {MEMORY_SHARE:.0%} of "
        f"the {free_bytes / 2**30:.1f} GiB free"
    )


# ---------------------------------------------------------------------------------------------
# Stopping on noise.


@dataclass(frozen=True)
class StopRule:
    """When time_kernel stops repeating: after ``min_samples`` repetitions and ``min_time_s``
    of measured time, once the median's 95% interval is within ``max_noise`` of it; at
    ``max_time_s`` of wall time in any case (the cap), or ``max_samples``."""

    min_samples: int = 20
    min_time_s: float = 0.01
    max_time_s: float = 0.5
    max_noise: float = 0.005
    max_samples: int = 20_000
    batch: int = 10  # repetitions between checks (and NVML reads)


def median_interval(samples: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free confidence interval of the median (order statistics: the ranks
    n/2 - z sqrt(n)/2 and 1 + n/2 + z sqrt(n)/2, from the binomial's normal approximation),
    at least about 95% for z = 1.96. The whole range for fewer than 6 samples."""
    ordered = sorted(samples)
    n = len(ordered)
    if n < 6:
        return ordered[0], ordered[-1]
    half = z * math.sqrt(n) / 2
    # the 1-based ranks floor(n/2 - half) and ceil(1 + n/2 + half), 0-based here
    low = max(0, int(math.floor(n / 2 - half)) - 1)
    high = min(n - 1, int(math.ceil(1 + n / 2 + half)) - 1)
    return ordered[low], ordered[high]


def relative_noise(samples: list[float]) -> float:
    """The median's interval's larger half-width over the median (inf when undefined)."""
    if not samples:
        return math.inf
    median = statistics.median(samples)
    if median <= 0:
        return math.inf
    low, high = median_interval(samples)
    return max(median - low, high - median) / median


def stop_reason(samples: list[float], elapsed_s: float, rule: StopRule) -> str | None:
    """Why to stop now (``noise``, ``time-cap``, ``max-samples``), or None to go on."""
    if len(samples) >= rule.max_samples:
        return "max-samples"
    if elapsed_s >= rule.max_time_s:
        return "time-cap"
    if (
        len(samples) >= rule.min_samples
        and math.fsum(samples) >= rule.min_time_s
        and relative_noise(samples) <= rule.max_noise
    ):
        return "noise"
    return None


def sample_until_stable(
    run_batch: Callable[[int], list[float]],
    rule: StopRule,
    poll: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], str]:
    """Repetitions from ``run_batch(n)`` (n per-repetition times) until stop_reason says so;
    ``poll()`` after every batch (the GPU monitor). Returns (samples, stop reason)."""
    samples: list[float] = []
    begin = clock()
    while True:
        samples += run_batch(rule.batch)
        if poll is not None:
            poll()
        reason = stop_reason(samples, clock() - begin, rule)
        if reason:
            return samples, reason


# ---------------------------------------------------------------------------------------------
# The GPU's clocks, power and throttling (NVML).

# nvmlClocksEventReason* bits (nvml.h): a slowdown marks the row throttled; the software power
# cap is recorded but is the normal state of a GPU at its power limit.
THROTTLE_BITS = {
    0x4: "sw-power-cap",
    0x8: "hw-slowdown",
    0x20: "sw-thermal",
    0x40: "hw-thermal",
    0x80: "hw-power-brake",
}
SLOWDOWN_BITS = 0x8 | 0x20 | 0x40 | 0x80


@dataclass
class GpuReadings:
    """What NVML said while one row was timed (None: not available)."""

    sm_clock_mhz: float | None = None  # median of the reads
    sm_clock_min_mhz: float | None = None
    mem_clock_mhz: float | None = None
    power_limit_w: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    throttled: bool | None = None
    throttle_reasons: str = ""

    def columns(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


class GpuMonitor:
    """NVML reads for one CUDA device (``nvml``: the pynvml module, or a stand-in in tests).
    Every read that fails leaves its field None: a machine without NVML still times rows."""

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        self.nvml = nvml
        self.handle = None
        self.clocks: list[float] = []
        self.reasons = 0
        try:
            if self.nvml is None:
                import pynvml  # nvidia-ml-py

                self.nvml = pynvml
            self.nvml.nvmlInit()
            self.handle = self._handle(index)
        except Exception:  # no NVML, no driver, no permission: no readings
            self.handle = None

    def _handle(self, index: int):
        nvml = self.nvml
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(index)
            bus = (
                f"{getattr(props, 'pci_domain_id', 0):08x}:{getattr(props, 'pci_bus_id', 0):02x}:"
                f"{getattr(props, 'pci_device_id', 0):02x}.0"
            )
            try:  # NVML counts devices its own way; the PCI address names the same one
                return nvml.nvmlDeviceGetHandleByPciBusId(bus)
            except Exception:
                pass
        return nvml.nvmlDeviceGetHandleByIndex(index)

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _read(self, name: str, *args):
        try:
            return getattr(self.nvml, name)(self.handle, *args)
        except Exception:
            return None

    def start(self) -> None:
        self.clocks, self.reasons = [], 0
        self.poll()

    def poll(self) -> None:
        """One read of the SM clock and the clock event reasons (tens of microseconds)."""
        if not self.available:
            return
        clock = self._read("nvmlDeviceGetClockInfo", getattr(self.nvml, "NVML_CLOCK_SM", 1))
        if clock is not None:
            self.clocks.append(float(clock))
        reasons = self._read("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None:
            reasons = self._read("nvmlDeviceGetCurrentClocksThrottleReasons")
        if reasons is not None:
            self.reasons |= int(reasons)

    def finish(self) -> GpuReadings:
        if not self.available:
            return GpuReadings()
        self.poll()
        mem = self._read("nvmlDeviceGetClockInfo", getattr(self.nvml, "NVML_CLOCK_MEM", 2))
        limit = self._read("nvmlDeviceGetEnforcedPowerLimit")
        power = self._read("nvmlDeviceGetPowerUsage")
        temperature = self._read(
            "nvmlDeviceGetTemperature", getattr(self.nvml, "NVML_TEMPERATURE_GPU", 0)
        )
        names = [name for bit, name in THROTTLE_BITS.items() if self.reasons & bit]
        return GpuReadings(
            sm_clock_mhz=statistics.median(self.clocks) if self.clocks else None,
            sm_clock_min_mhz=min(self.clocks) if self.clocks else None,
            mem_clock_mhz=None if mem is None else float(mem),
            power_limit_w=None if limit is None else limit / 1000,  # milliwatts
            power_w=None if power is None else power / 1000,
            temperature_c=None if temperature is None else float(temperature),
            throttled=bool(self.reasons & SLOWDOWN_BITS),
            throttle_reasons=";".join(names),
        )


def gpu_environment(index: int = 0, nvml: Any = None) -> dict:
    """The GPU's fixed facts for environment.json: name, SMs, L2, memory, the clocks it can
    reach, its power limits, the driver (what NVML and torch say; missing ones left out)."""
    found: dict[str, Any] = {}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(index)
        found.update(
            gpu_name=props.name,
            multiprocessors=props.multi_processor_count,
            l2_bytes=int(getattr(props, "L2_cache_size", 0)) or None,
            memory_bytes=props.total_memory,
            compute_capability=f"{props.major}.{props.minor}",
        )
    monitor = GpuMonitor(index, nvml)
    if monitor.available:
        read = monitor._read
        nvml = monitor.nvml
        sm = getattr(nvml, "NVML_CLOCK_SM", 1)
        mem = getattr(nvml, "NVML_CLOCK_MEM", 2)
        for key, value in (
            ("max_sm_clock_mhz", read("nvmlDeviceGetMaxClockInfo", sm)),
            ("max_mem_clock_mhz", read("nvmlDeviceGetMaxClockInfo", mem)),
            ("power_limit_w", read("nvmlDeviceGetEnforcedPowerLimit")),
            ("default_power_limit_w", read("nvmlDeviceGetPowerManagementDefaultLimit")),
        ):
            if value is not None:
                found[key] = value / 1000 if key.endswith("_w") else value
        try:
            driver = nvml.nvmlSystemGetDriverVersion()
            found["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        except Exception:
            pass
    return {k: v for k, v in found.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Kernel time.

# The flush buffer: at least this, and at least four L2s (do_bench zeroes 256 MB).
FLUSH_BYTES = 256 << 20
# Warm cache: repetitions of the call captured in one graph, so that each replay keeps the GPU
# busy for about this long (the events then see no launch gap).
WARM_GRAPH_S = 1e-3
MAX_CALLS_PER_GRAPH = 200


@dataclass
class KernelTiming:
    """time_kernel's result: per-call GPU seconds, one per repetition."""

    seconds: list[float] = field(default_factory=list)
    method: str = ""  # cuda-graph | events
    cache: str = "cold"
    stop_reason: str = ""
    calls_per_repetition: int = 1
    # why the call could not be captured (method events), else empty
    capture_error: str = ""
    readings: GpuReadings = field(default_factory=GpuReadings)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.seconds)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    def columns(self) -> dict[str, Any]:
        """The row's kernel columns (bnbench.schema.BenchResult)."""
        return {
            "kernel_s": self.median,
            "kernel_p20_s": self.quantile(0.2),
            "kernel_p80_s": self.quantile(0.8),
            "kernel_repetitions": len(self.seconds),
            "kernel_calls_per_repetition": self.calls_per_repetition,
            "kernel_method": self.method,
            "kernel_noise": min(relative_noise(self.seconds), 1e6),
            "cache": self.cache,
            "stop_reason": self.stop_reason,
            **self.readings.columns(),
            **({"capture_error": self.capture_error[:500]} if self.capture_error else {}),
        }


class L2Flush:
    """Zeroes a buffer larger than the L2 (cold cache between repetitions)."""

    def __init__(self, device: str) -> None:
        from bnbench.timing import last_level_cache_bytes

        nbytes = max(FLUSH_BYTES, 4 * last_level_cache_bytes(device))
        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def capture(step: Callable[[int], object], calls: int = 1) -> torch.cuda.CUDAGraph:
    """``step(0)`` ``calls`` times, captured in a CUDA graph (after a warm-up on a side stream,
    so that libraries allocate their workspaces outside the capture). Raises what the capture
    raised when the call cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(0)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step(0)
    torch.cuda.synchronize()
    return graph


def _event_batch(launch: Callable[[], None], flush: L2Flush | None) -> Callable[[int], list[float]]:
    """run_batch for sample_until_stable: ``n`` repetitions of flush, event, launch, event,
    then one synchronization; seconds per repetition."""

    def run_batch(n: int) -> list[float]:
        pairs = []
        for _ in range(n):
            if flush is not None:
                flush()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            launch()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in pairs]

    return run_batch


def time_kernel(
    step: Callable[[int], object],
    device: str,
    *,
    prepare: Callable[[int], None] | None = None,
    cache: str = "cold",
    rule: StopRule = StopRule(),
    monitor: GpuMonitor | None = None,
) -> KernelTiming:
    """The GPU time of ``step`` (see the module docstring), on a CUDA ``device``.

    A step with ``prepare`` (backward alone: a fresh autograd graph before each call) is not
    captured: it is timed with events, ``prepare`` run before the flush."""
    if cache not in ("cold", "warm"):
        raise ValueError(f"cache {cache!r}: expected cold or warm")
    flush = L2Flush(device) if cache == "cold" else None
    result = KernelTiming(cache=cache)
    graph = None
    calls = 1
    if prepare is None:
        try:
            graph = capture(step)
            if cache == "warm":  # one replay of many calls, long enough to hide its launch
                single = _event_batch(graph.replay, None)(5)
                calls = max(1, min(MAX_CALLS_PER_GRAPH, round(WARM_GRAPH_S / min(single))))
                if calls > 1:
                    graph = capture(step, calls)
        except Exception as exc:  # synchronizing or host-reading calls cannot be captured
            result.capture_error = f"{type(exc).__name__}: {exc}"
            graph = None
            torch.cuda.synchronize()
    monitor = monitor or GpuMonitor(torch.device(device).index or 0)
    monitor.start()
    if graph is not None:
        result.method = "cuda-graph"
        run_batch = _event_batch(graph.replay, flush)
    else:
        result.method = "events"
        counter = [0]

        def launch() -> None:
            step(counter[0])
            counter[0] += 1

        plain = _event_batch(launch, flush)

        def run_batch(n: int) -> list[float]:
            if prepare is None:
                return plain(n)
            out = []
            for _ in range(n):  # prepare is host work with kernels of its own: untimed
                prepare(counter[0])
                torch.cuda.synchronize()
                out += plain(1)
            return out

    samples, result.stop_reason = sample_until_stable(run_batch, rule, monitor.poll)
    result.seconds = [s / calls for s in samples]
    result.calls_per_repetition = calls
    result.readings = monitor.finish()
    del graph
    return result
