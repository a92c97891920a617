"""Timed benchmarks under pytest-benchmark (`pytest --benchmark`; skipped otherwise).

Each test times one (implementation, device, mode, shape) with pytest-benchmark's pedantic mode;
the timed function synchronizes CUDA itself, since pytest-benchmark knows nothing of streams.
Bytes moved, GB/s, the implementation and the shape go into extra_info, the environment into
machine_info. pytest-benchmark's own options (--benchmark-json, --benchmark-compare...) work.
"""

import math

import pytest
import torch

from bnbench import timing
from bnbench.benchmark import QUICK, Row, make_workload
from bnbench.registry import resolve

from workloads import twice

pytestmark = pytest.mark.benchmark_suite

ROWS = [
    row
    for row in QUICK.rows()
    if row.rank == 4
    and row.dtype == "float32"
    and not row.model
    and row.memory_format == "contiguous"
    and row.shape[0] in (8, 64)
]


def _params():
    for impl in resolve():
        for device in ("cpu", "cuda"):
            for row in ROWS:
                shape = "x".join(map(str, row.shape))
                yield pytest.param(impl, device, row, id=f"{impl.name}-{device}-{row.mode}-{shape}")


@pytest.mark.parametrize("impl, device, row", list(_params()))
def test_bench(benchmark, impl, device, row):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    reasons = impl.not_supported_reasons(row.config(device))
    if reasons:
        pytest.skip("; ".join(reasons))
    workload = make_workload(impl, device, row)
    calls = iter(range(10**9))
    state = {}

    def setup():
        state["i"] = next(calls)
        if workload.prepare:
            workload.prepare(state["i"])

    def target():
        workload.step(state["i"])
        timing.synchronize(device)

    for _ in range(3):  # warm-up (and compilation) outside the rounds
        setup()
        target()
    benchmark.extra_info.update(
        implementation=impl.name,
        device=device,
        mode=row.mode,
        shape="x".join(map(str, row.shape)),
        dtype=row.dtype,
        bytes=workload.bytes,
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(target, setup=setup, rounds=30, iterations=1, warmup_rounds=2)
    benchmark.extra_info["gbps"] = workload.bytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("mode", ["forward_eval", "forward_train"])
def test_timer_measures_double_work_as_twice_the_time(mode, device):
    """A workload doing builtin's forward twice must time at 2x builtin (within 20%)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    builtin = resolve(["builtin"])[0]
    # Twice the work means twice the bytes from memory: the input must not fit in the cache,
    # or the second pass reads it from there (1.56x seen on a 16-core host with 6 MB inputs).
    per_sample = 64 * 56 * 56 * 4
    shape = (math.ceil(2 * timing.last_level_cache_bytes(device) / per_sample), 64, 56, 56)
    row = Row(shape, "float32", "contiguous", mode)
    medians = {}
    for _ in range(2):  # interleave so drifting load hits both alike
        for impl in (builtin, twice):
            w = make_workload(impl, device, row)
            samples = timing.measure(w.step, device, prepare=w.prepare, budget_s=1.0)
            medians.setdefault(impl.name, []).append(samples.median)
    ratio = min(medians["twice"]) / min(medians["builtin"])
    print(
        f"\ntimer check, {device} {mode} {row.shape}: twice / builtin = {ratio:.3f} "
        f"(builtin {min(medians['builtin']) * 1e3:.3f} ms, twice "
        f"{min(medians['twice']) * 1e3:.3f} ms)"
    )
    assert 1.6 <= ratio <= 2.4


def test_compare_real_runs_identical_code_passes_and_2x_is_flagged(tmp_path):
    """Real runs on this machine: the same code twice is not flagged; a 2x slowdown is."""
    from helpers import bnbench

    def run(directory, body):
        directory.mkdir()
        (directory / "candidate.py").write_text(body)
        result = bnbench(
            "bench",
            "--impl",
            "candidate:impl",
            "--calibration",
            "--no-verify",
            "--output",
            str(directory / "out"),
            cwd=directory,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return directory / "out"

    same = "from bnbench.implementations.builtin import builtin as impl\n"
    slow = "from workloads import twice as impl\n"
    first, second = run(tmp_path / "a", same), run(tmp_path / "b", same)
    slower = run(tmp_path / "c", slow)
    identical = bnbench("compare", str(first), str(second))
    doubled = bnbench("compare", str(first), str(slower))
    print("\n" + identical.stdout + doubled.stdout)
    assert identical.returncode == 0
    assert doubled.returncode == 1
