"""The CUDA leg (bnbench.gpu): shapes, stopping on noise, NVML readings, bandwidth share,
the sweep's options. The parts that need a GPU skip without one."""

from __future__ import annotations

import math
import random

import pytest
import torch

from bnbench import api, benchmark, gpu
from bnbench.registry import UsageError
from bnbench.results import Flag, Status, split_flags
from bnbench.schema import BenchResult

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- shapes ----------------------------------------------------------------------------------


def test_resnet50_has_53_batchnorm_layers_in_12_shapes():
    assert sum(n for *_, n in gpu.RESNET50_BN) == 53
    assert len({(c, h, w) for c, h, w, _ in gpu.RESNET50_BN}) == 12
    assert gpu.resnet50_shapes(32)[0] == (32, 64, 112, 112)
    assert gpu.transformer_head_shape(256) == (256 * 197, 768)


def _bottleneck_walk() -> dict[tuple[int, int, int], int]:
    """ResNet-50's BN shapes from its definition (torchvision v1.5: the stride in the 3x3),
    written independently of the table."""
    found: dict[tuple[int, int, int], int] = {}

    def add(c, s):
        found[(c, s, s)] = found.get((c, s, s), 0) + 1

    size, channels = 112, 64
    add(64, 112)  # stem
    size = 56  # max pool
    for blocks, width, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
        for block in range(blocks):
            s = stride if block == 0 else 1
            add(width, size)  # 1x1 at the input size
            out = size // s
            add(width, out)  # 3x3 (strided)
            add(4 * width, out)  # 1x1 expansion
            if block == 0 and (s != 1 or channels != 4 * width):
                add(4 * width, out)  # downsample
            size, channels = out, 4 * width
    return found


def test_resnet50_table_matches_the_network_definition():
    table = {(c, h, w): n for c, h, w, n in gpu.RESNET50_BN}
    assert table == _bottleneck_walk()


def test_resnet50_table_matches_torchvision_when_installed():
    models = pytest.importorskip("torchvision.models")
    net = models.resnet50().to("meta")
    seen: dict[tuple[int, int, int], int] = {}

    def hook(module, args, output):
        shape = tuple(args[0].shape[1:])
        seen[shape] = seen.get(shape, 0) + 1

    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(hook)
    net(torch.empty(2, 3, 224, 224, device="meta"))
    assert seen == {(c, h, w): n for c, h, w, n in gpu.RESNET50_BN}


def test_the_cuda_sweep_covers_every_shape_dtype_and_format():
    rows = benchmark.RESNET50.rows()
    shapes = {r.shape for r in rows}
    assert shapes == set(benchmark._GPU_SHAPES) and len(shapes) == 26
    assert {r.dtype for r in rows} == {"float32", "bfloat16", "float16"}
    assert {r.mode for r in rows} == {"forward_train", "forward_backward"}
    # channels_last only where a 4-D input has it; the (N*L, C) head is contiguous
    assert all(r.memory_format == "contiguous" for r in rows if len(r.shape) == 2)
    assert sum(r.memory_format == "channels_last" for r in rows) == 24 * 3 * 2
    assert len(rows) == 24 * 3 * 2 * 2 + 2 * 3 * 2
    assert set(r.mode for r in benchmark.RESNET50_FULL.rows()) == set(benchmark.MODES)


def test_quick_and_full_run_the_cuda_sweep_on_a_gpu_and_stay_on_cpu():
    assert benchmark.QUICK.on("cpu") is benchmark.QUICK
    assert benchmark.QUICK.on("cuda").name == "resnet50"
    assert benchmark.QUICK.on("cuda:0").name == "resnet50"
    assert benchmark.FULL.on("cuda").name == "resnet50-full"
    assert benchmark.SMOKE.on("cuda") is benchmark.SMOKE  # the tests' sweep stays small
    warm = api.bench_sweep("quick", "warm", dtypes=["bfloat16"], memory_formats=["channels_last"])
    leg = warm.on("cuda")
    assert leg.cache == "warm"
    assert {r.dtype for r in leg.rows()} == {"bfloat16"}
    assert {r.memory_format for r in leg.rows()} == {"channels_last"}


def test_bench_options_are_checked():
    with pytest.raises(UsageError, match="--dtype float8"):
        api.bench_sweep("quick", dtypes=["float8"])
    with pytest.raises(UsageError, match="--mode sideways"):
        api.bench_sweep("quick", modes=["sideways"])
    with pytest.raises(UsageError, match="cache 'tepid'"):
        api.bench_sweep("quick", cache="tepid")
    with pytest.raises(UsageError, match="cuda only"):
        api.sweep_devices(benchmark.RESNET50, ["cpu"])


def test_rows_too_large_for_the_gpu_are_named():
    shape = (256, 64, 112, 112)
    assert gpu.memory_reason(shape, 2, 80 << 30) == ""
    reason = gpu.memory_reason(shape, 4, 4 << 30)
    assert "GiB of GPU memory" in reason and "4.0 GiB free" in reason


# --- stopping on noise -----------------------------------------------------------------------


def test_median_interval_brackets_the_median_and_narrows_with_more_samples():
    rng = random.Random(0)
    small = [rng.gauss(1.0, 0.05) for _ in range(30)]
    large = small + [rng.gauss(1.0, 0.05) for _ in range(2000)]
    for samples in (small, large):
        low, high = gpu.median_interval(samples)
        median = sorted(samples)[len(samples) // 2]
        assert low <= median <= high
    assert gpu.relative_noise(large) < gpu.relative_noise(small) / 3
    assert gpu.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # few samples: the whole range
    assert gpu.relative_noise([]) == math.inf


def test_the_median_interval_covers_the_true_median_about_95_percent():
    rng = random.Random(1)
    covered = 0
    for _ in range(400):
        samples = [rng.expovariate(1.0) for _ in range(50)]
        low, high = gpu.median_interval(samples)
        covered += low <= math.log(2) <= high
    assert 0.92 <= covered / 400 <= 0.99


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _sampler(clock, rng, spread, per_rep=1e-4):
    def run_batch(n):
        clock.now += n * per_rep * 3  # host time per repetition (flush, launch, event)
        return [per_rep * (1 + rng.gauss(0, spread)) for _ in range(n)]

    return run_batch


def test_quiet_kernels_stop_on_noise_before_the_cap():
    clock, rng = _Clock(), random.Random(2)
    rule = gpu.StopRule(min_samples=20, min_time_s=1e-3, max_time_s=10.0, max_noise=0.005)
    polls = []
    samples, reason = gpu.sample_until_stable(
        _sampler(clock, rng, 0.002), rule, lambda: polls.append(1), clock
    )
    assert reason == "noise"
    assert len(samples) >= 20 and math.fsum(samples) >= 1e-3  # the minimum time is honoured
    assert len(polls) == len(samples) // rule.batch  # the monitor is read after every batch


def test_noisy_kernels_run_to_the_time_cap():
    clock, rng = _Clock(), random.Random(3)
    rule = gpu.StopRule(max_time_s=0.05, max_noise=0.001)
    samples, reason = gpu.sample_until_stable(_sampler(clock, rng, 0.5), rule, None, clock)
    assert reason == "time-cap"
    assert clock.now >= 0.05


def test_noisier_kernels_take_more_repetitions():
    counts = []
    for spread in (0.01, 0.05):
        clock = _Clock()
        rule = gpu.StopRule(min_time_s=0.0, max_time_s=100.0, max_noise=0.005)
        samples, reason = gpu.sample_until_stable(
            _sampler(clock, random.Random(4), spread), rule, None, clock
        )
        assert reason == "noise"
        counts.append(len(samples))
    assert counts[1] > 5 * counts[0]


# --- NVML ------------------------------------------------------------------------------------


class _FakeNvml:
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self, clocks, reasons, fail=()):
        self.clocks, self.reasons, self.fail = list(clocks), list(reasons), set(fail)

    def _check(self, name):
        if name in self.fail:
            raise RuntimeError(f"{name}: not supported")

    def nvmlInit(self):
        self._check("init")

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index):
        return "handle"

    def nvmlDeviceGetClockInfo(self, handle, kind):
        self._check("clock")
        return self.clocks.pop(0) if kind == 1 else 2619

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        self._check("reasons")
        return self.reasons.pop(0)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetPowerUsage(self, handle):
        return 312_500

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 51

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        return 1980 if kind == 1 else 2619

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle):
        return 700_000

    def nvmlSystemGetDriverVersion(self):
        return b"580.159.04"


def test_monitor_records_clocks_power_and_a_thermal_slowdown():
    nvml = _FakeNvml(clocks=[1980, 1980, 1755, 1980], reasons=[0, 0, 0x40, 0])
    monitor = gpu.GpuMonitor(0, nvml)
    monitor.start()
    monitor.poll()
    monitor.poll()
    readings = monitor.finish()
    assert readings.sm_clock_min_mhz == 1755 and readings.sm_clock_mhz == 1980
    assert readings.mem_clock_mhz == 2619
    assert readings.power_limit_w == 700 and readings.power_w == 312.5
    assert readings.temperature_c == 51
    assert readings.throttled is True and readings.throttle_reasons == "hw-thermal"


def test_the_software_power_cap_is_recorded_but_is_not_a_slowdown():
    nvml = _FakeNvml(clocks=[1700, 1700], reasons=[0x4, 0x4])
    monitor = gpu.GpuMonitor(0, nvml)
    monitor.start()
    readings = monitor.finish()
    assert readings.throttled is False and readings.throttle_reasons == "sw-power-cap"


def test_a_machine_without_nvml_still_times_rows():
    monitor = gpu.GpuMonitor(0, _FakeNvml([], [], fail={"init"}))
    assert not monitor.available
    monitor.start()
    monitor.poll()
    assert monitor.finish().columns() == {}
    partial = gpu.GpuMonitor(0, _FakeNvml([], [], fail={"clock", "reasons"}))
    partial.start()
    readings = partial.finish()
    assert readings.sm_clock_mhz is None and readings.power_limit_w == 700


def test_gpu_environment_from_nvml():
    facts = gpu.gpu_environment(0, _FakeNvml([], []))
    assert facts["max_sm_clock_mhz"] == 1980 and facts["power_limit_w"] == 700
    assert facts["driver"] == "580.159.04"


# --- rows ------------------------------------------------------------------------------------


def _row(**kernel):
    base = benchmark.base_columns(
        "x", "cuda", benchmark.Row((32, 64, 56, 56), "float32", "contiguous", "forward_train")
    )
    result = {
        "status": Status.OK,
        "verified": "pass",
        "median_s": 1e-4,
        "p20_s": 9e-5,
        "p80_s": 1.1e-4,
        "repetitions": 10,
        **kernel,
    }
    return base, result


def test_bandwidth_share_is_of_a_copy_of_the_same_size_and_over_100_percent_is_flagged():
    base, result = _row(kernel_s=4e-5)
    nbytes = 32 * 64 * 56 * 56 * 4
    floor = {
        "copy_gbps": 1000.0,
        "copy_s": 2 * nbytes / 1e12,
        "clone_s": 3e-5,
        "bytes": nbytes,
        "copy_kernel_gbps": 2500.0,
    }
    row = benchmark.finish_row(base, result, floor, 1)
    assert row["kernel_gbps"] == pytest.approx(2 * nbytes / 4e-5 / 1e9)
    assert row["bandwidth_share"] == pytest.approx(row["kernel_gbps"] / 2500.0)
    assert row["bandwidth_share"] < 1 and not split_flags(row["flags"])
    fast = benchmark.finish_row(base, dict(result, kernel_s=1e-5), floor, 1)
    assert fast["bandwidth_share"] > 1
    assert Flag.OVER_COPY_BANDWIDTH.value in split_flags(fast["flags"])
    # measured again against a better floor, the flag goes
    again = benchmark.apply_floor(dict(fast), dict(floor, copy_kernel_gbps=20_000.0))
    assert Flag.OVER_COPY_BANDWIDTH.value not in split_flags(again["flags"])


def test_a_throttled_row_is_flagged_and_left_out_of_the_summary():
    base, result = _row(kernel_s=4e-5, throttled=True, throttle_reasons="hw-thermal")
    row = benchmark.finish_row(base, result, None, 1)
    assert Flag.THROTTLED.value in split_flags(row["flags"])
    assert "flagged" in benchmark.summary_lines([row], baseline="x")[0]


def test_the_summary_gives_kernel_time_and_launch_overhead():
    rows = []
    for name, call, kernel in (("builtin", 5e-5, 2e-5), ("slow", 3e-4, 4e-5)):
        base, result = _row(kernel_s=kernel, median_s=call, p20_s=call, p80_s=call)
        base["implementation"] = name
        floor = {
            "copy_gbps": 1e3,
            "copy_s": 1e-5,
            "clone_s": 1e-5,
            "bytes": 1,
            "copy_kernel_gbps": 3e3,
        }
        rows.append(benchmark.finish_row(base, result, floor, 1))
    lines = benchmark.summary_lines(rows)
    slow = next(line for line in lines if line.startswith("slow@cuda GPU time"))
    assert "kernel / builtin (geometric mean) 2.00x" in slow
    assert "call / kernel 7.50x" in slow


def test_worker_kernel_columns_are_validated():
    good = {
        "status": "ok",
        "verified": "pass",
        "median_s": 1e-4,
        "p20_s": 9e-5,
        "p80_s": 1.1e-4,
        "repetitions": 10,
        "kernel_s": 2e-5,
        "kernel_p20_s": 1.9e-5,
        "kernel_p80_s": 2.1e-5,
        "kernel_method": "cuda-graph",
        "stop_reason": "noise",
        "cache": "cold",
        "throttle_reasons": "sw-power-cap;hw-thermal",
    }
    BenchResult.model_validate(good)
    for bad in (
        {"kernel_s": 0.0},
        {"kernel_s": 5e-5},  # outside its quantiles
        {"kernel_method": "guess"},
        {"stop_reason": "bored"},
        {"throttle_reasons": "<script>"},
        {"sm_clock_mhz": float("nan")},
    ):
        with pytest.raises(ValueError):
            BenchResult.model_validate(dict(good, **bad))


# --- on a GPU --------------------------------------------------------------------------------


@cuda
def test_kernel_time_of_twice_the_work_is_twice_as_long():
    x = torch.randn(64 << 20, device="cuda")
    out = torch.empty_like(x)

    def once(i):
        out.copy_(x)

    def twice(i):
        out.copy_(x)
        out.copy_(x)

    one = gpu.time_kernel(once, "cuda")
    two = gpu.time_kernel(twice, "cuda")
    assert one.method == two.method == "cuda-graph"
    assert 1.8 < two.median / one.median < 2.2


@cuda
def test_a_call_that_cannot_be_captured_is_timed_with_events_and_says_why():
    x = torch.randn(1 << 20, device="cuda")

    def synchronizing(i):
        return float(x.sum())  # reads the result on the host

    timed = gpu.time_kernel(synchronizing, "cuda", rule=gpu.StopRule(max_time_s=0.05))
    assert timed.method == "events" and timed.capture_error
    assert timed.median > 0


@cuda
def test_the_cold_cache_is_slower_than_the_warm_one_for_an_l2_sized_tensor():
    x = torch.randn(2 << 20, device="cuda")  # 8 MB: fits the L2 of any recent GPU
    out = torch.empty_like(x)
    cold = gpu.time_kernel(lambda i: out.copy_(x), "cuda", cache="cold")
    warm = gpu.time_kernel(lambda i: out.copy_(x), "cuda", cache="warm")
    assert warm.median < cold.median


# --- the report ------------------------------------------------------------------------------


def test_the_report_separates_kernel_time_from_call_time(tmp_path, monkeypatch):
    from test_report import bench_rows, report_of, section, write_run

    from bnbench.report import GPU_HEADING

    rows = bench_rows(("builtin", "triton"), device="cuda", modes=("forward_backward",))
    for row in rows:
        kernel = row["median_s"] / (1.25 if row["implementation"] == "builtin" else 10.0)
        row.update(kernel_s=kernel, bandwidth_share=0.8, kernel_method="cuda-graph")
    rows[-1].update(bandwidth_share=1.3, flags="over-copy-bandwidth")  # left out
    _, html, out = report_of(tmp_path, write_run(tmp_path / "run", rows), monkeypatch=monkeypatch)
    md = (out / "report.md").read_text()
    text = section(md, GPU_HEADING)
    assert "call_over_kernel" in text and "kernel_vs_builtin" in text
    table = (out / "gpu.csv").read_text().splitlines()
    triton = next(line for line in table if ",triton," in line)
    # one of triton's two rows is flagged: the other's kernel is 1.25/10 of builtin's
    assert "0.125" in triton and ",1," in triton
    assert "GPU time" in html


# --- time_kernel's logic, with torch.cuda stood in for (no GPU here) -------------------------


class _FakeCuda:
    """Just enough of torch.cuda for time_kernel's control flow: events read a host clock, a
    graph replays nothing, ``capturing`` is true inside torch.cuda.graph."""

    def __init__(self):
        self.capturing = False
        self.captures = 0
        self.synchronized = 0

    def install(self, monkeypatch):
        import contextlib
        import time as _time

        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = _time.perf_counter()

            def elapsed_time(self, other):
                return max(other.t - self.t, 1e-9) * 1e3

        class Graph:
            def replay(self):
                pass

        @contextlib.contextmanager
        def graph(g):
            fake.capturing = True
            fake.captures += 1
            try:
                yield
            finally:
                fake.capturing = False

        @contextlib.contextmanager
        def stream(s):
            yield

        class Stream:
            def wait_stream(self, other):
                pass

        def synchronize():
            fake.synchronized += 1

        for name, value in {
            "Event": Event,
            "CUDAGraph": Graph,
            "graph": graph,
            "stream": stream,
            "Stream": Stream,
            "current_stream": lambda: Stream(),
            "synchronize": synchronize,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(gpu, "L2Flush", lambda device: lambda: None)
        return self


_QUICK = gpu.StopRule(min_samples=5, min_time_s=0.0, max_time_s=0.05, max_noise=10.0)


def test_a_capturable_call_is_replayed_from_a_graph(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    calls = []
    timed = gpu.time_kernel(
        lambda i: calls.append(i),
        "cuda",
        rule=_QUICK,
        monitor=gpu.GpuMonitor(0, _FakeNvml([], [], {"init"})),
    )
    assert timed.method == "cuda-graph" and not timed.capture_error
    assert fake.captures == 1
    # the warm-up and the capture ran the step; the replays did not call Python
    assert len(calls) == 3 and timed.stop_reason == "noise" and len(timed.seconds) >= 5
    assert set(timed.columns()) >= {"kernel_s", "kernel_method", "stop_reason", "cache"}


def test_a_call_that_fails_to_capture_is_timed_with_events(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    calls = []

    def step(i):
        if fake.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        calls.append(i)

    timed = gpu.time_kernel(
        step, "cuda", rule=_QUICK, monitor=gpu.GpuMonitor(0, _FakeNvml([], [], {"init"}))
    )
    assert timed.method == "events" and "stream is capturing" in timed.capture_error
    assert len(calls) == 2 + len(timed.seconds)  # warm-up, then one call per repetition
    assert calls[2:] == list(range(len(timed.seconds)))  # rotating through the step's inputs


def test_a_prepared_step_is_prepared_before_every_repetition(monkeypatch):
    _FakeCuda().install(monkeypatch)
    prepared, stepped = [], []
    timed = gpu.time_kernel(
        lambda i: stepped.append(i),
        "cuda",
        prepare=lambda i: prepared.append(i),
        rule=_QUICK,
        monitor=gpu.GpuMonitor(0, _FakeNvml([], [], {"init"})),
    )
    assert timed.method == "events" and prepared == stepped  # each call's own graph


def test_warm_cache_captures_enough_calls_to_hide_the_launch(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    timed = gpu.time_kernel(
        lambda i: None,
        "cuda",
        cache="warm",
        rule=_QUICK,
        monitor=gpu.GpuMonitor(0, _FakeNvml([], [], {"init"})),
    )
    # a replay of nothing takes microseconds: the warm graph holds the most calls allowed
    assert timed.cache == "warm" and timed.calls_per_repetition == gpu.MAX_CALLS_PER_GRAPH
    assert fake.captures == 2
    with pytest.raises(ValueError, match="tepid"):
        gpu.time_kernel(lambda i: None, "cuda", cache="tepid")


# --- compare on the kernel time --------------------------------------------------------------


def test_compare_kernel_metric_sees_a_kernel_regression_the_call_time_hides(tmp_path):
    from test_report import bench_rows, write_run

    from bnbench.regression import compare

    from helpers import in_process

    def run(name, kernel_factor):
        rows = bench_rows(
            ("builtin",), device="cuda", modes=("forward_train",), batches=(8, 32, 64)
        )
        for row in rows:
            # launch-bound: the call stays the same while the kernel slows down
            kernel = 1e-5 * row["batch_size"] / 64 * kernel_factor
            row.update(kernel_s=kernel, kernel_p20_s=kernel * 0.99, kernel_p80_s=kernel * 1.01)
        return write_run(tmp_path / name, rows)

    base, slow = run("base", 1.0), run("slow", 2.0)
    calls = compare(base, slow, 10.0)
    assert set(calls.cases.verdict) == {"same"}
    kernels = compare(base, slow, 10.0, metric="kernel")
    assert set(kernels.cases.verdict) == {"regression"}
    assert kernels.cases.ratio.tolist() == pytest.approx([2.0] * 3)
    assert set(kernels.cases.method) == {"p20/p80"}
    result = in_process("compare", str(base), str(slow), "--metric", "kernel", "--threshold", "10")
    assert result.returncode == 1 and "kernel time" in result.stdout
    assert in_process("compare", str(base), str(slow), "--threshold", "10").returncode == 0


def test_compare_kernel_metric_on_runs_without_kernel_times_is_bad_input(tmp_path):
    from test_report import bench_rows, write_run

    from helpers import in_process

    run = write_run(tmp_path / "cpu", bench_rows(("builtin",)))
    result = in_process("compare", str(run), str(run), "--metric", "kernel")
    assert result.returncode == 2 and "kernel time in both" in result.stdout + result.stderr
