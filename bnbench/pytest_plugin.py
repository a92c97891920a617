"""bnbench as a pytest plugin, registered through the ``pytest11`` entry point: installed with
bnbench, it is active in every project's pytest.

Options it adds:
  ``--bnbench-impl NAME|MODULE:ATTR`` (repeatable) the implementations the gate verifies;
  ``--bnbench-device cpu|cuda`` (repeatable) where (default: both; CUDA skips without a GPU);
  ``--benchmark`` run the tests marked ``benchmark_suite`` (timed); skipped otherwise.

The gate in your own test file, one test per (implementation, device, case), with ids such as
``mybn-cpu-momentum_none-rank4``::

    from bnbench.pytest_plugin import check_gate_case, gate_cases

    @pytest.mark.parametrize("gate_case", gate_cases("mypkg.bn:MyBatchNorm"))
    def test_my_batchnorm(gate_case):
        check_gate_case(gate_case)

or let ``--bnbench-impl`` (or a ``@pytest.mark.bnbench_impl("mypkg.bn:MyBatchNorm")`` marker)
choose, by asking for the ``bnbench_gate_case`` argument::

    def test_gate(bnbench_gate_case):
        check_gate_case(bnbench_gate_case)

A case the implementation does not support is skipped with the reason, a declared deviation is
an expected failure, anything else that differs from nn.BatchNorm fails with the diagnosis.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, NamedTuple

import pytest

GATE_ARGUMENT = "bnbench_gate_case"
DEVICES = ("cpu", "cuda")


class GateCase(NamedTuple):
    """One gate test: an implementation, a device and a case."""

    impl: Any  # bnbench.registry.Implementation (imported lazily: plugins load early)
    device: str
    case: Any  # bnbench.cases.Case

    @property
    def id(self) -> str:
        return f"{self.impl.name}-{self.device}-{self.case.id}"


def _implementations(impls) -> list:
    from bnbench.registry import Implementation, resolve

    if impls is None or isinstance(impls, (str, Implementation)):
        impls = None if impls is None else [impls]
    if impls is None:  # the single-process gate: synchronized ones need --world-size
        return [impl for impl in resolve() if not impl.distributed]
    chosen = []
    for impl in impls:
        chosen += [impl] if isinstance(impl, Implementation) else resolve([impl])
    return chosen


def gate_cases(
    impls=None, devices: Iterable[str] = DEVICES, cases: Iterable[str] | None = None
) -> list:
    """``pytest.param``s, one per (implementation, device, case), with readable ids.

    ``impls``: a registered name, ``MODULE:ATTR``, an Implementation, or a list of them (default:
    every registered implementation). ``cases``: case-id globs (default: every case).
    """
    from bnbench.cases import all_cases

    selected = [
        c for c in all_cases() if cases is None or any(fnmatch.fnmatchcase(c.id, p) for p in cases)
    ]
    params = []
    for impl in _implementations(impls):
        for device in devices:
            for case in selected:
                item = GateCase(impl, device, case)
                params.append(pytest.param(item, id=item.id))
    return params


def check_gate_case(item: GateCase) -> None:
    """Run one gate case: skip (not supported), xfail (declared deviation) or fail with the
    diagnosis."""
    import torch

    from bnbench.checks import run_case
    from bnbench.gate import verdict
    from bnbench.results import Verdict

    impl, device, case = item
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    v, message = verdict(impl, case, run_case(impl, case, device))
    if v == Verdict.NOT_SUPPORTED:
        pytest.skip(f"{impl.name}: {message}")
    if v == Verdict.DEVIATION:
        pytest.xfail(f"{impl.name}: declared deviation: {message.splitlines()[0]}")
    if v in (Verdict.FAIL, Verdict.UNEXPECTED_PASS):
        pytest.fail(
            f"{impl.name} on {device}, {case.id} ({case.description}):\n{message}", pytrace=False
        )


def pytest_addoption(parser):
    group = parser.getgroup("bnbench", "bnbench: BatchNorm verification and benchmarks")
    group.addoption(
        "--bnbench-impl",
        action="append",
        default=[],
        metavar="NAME|MODULE:ATTR",
        help="Implementation the gate verifies (tests that take the "
        f"{GATE_ARGUMENT} argument): a registered name or MODULE:ATTR. "
        "Repeatable. Default: the test's bnbench_impl marker, else every "
        "registered implementation.",
    )
    group.addoption(
        "--bnbench-device",
        action="append",
        default=[],
        choices=DEVICES,
        help="Device the gate runs on. Repeatable. Default: cpu and cuda (CUDA "
        "cases skip without a GPU).",
    )
    group.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="Run the timed benchmark tests (marked benchmark_suite) through "
        "pytest-benchmark. Without it they are skipped.",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "benchmark_suite: timed benchmarks, run only with --benchmark"
    )
    config.addinivalue_line(
        "markers",
        "bnbench_impl(*specs): implementations the gate "
        f"verifies in this test (the {GATE_ARGUMENT} argument)",
    )


def pytest_generate_tests(metafunc):
    if GATE_ARGUMENT not in metafunc.fixturenames:
        return
    specs = list(metafunc.config.getoption("bnbench_impl"))
    marker = metafunc.definition.get_closest_marker("bnbench_impl")
    if not specs and marker is not None:
        specs = list(marker.args)
    devices = metafunc.config.getoption("bnbench_device") or DEVICES
    metafunc.parametrize(GATE_ARGUMENT, gate_cases(specs or None, devices))


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark"):
        return
    skip = pytest.mark.skip(reason="timed benchmarks run with --benchmark")
    for item in items:
        if "benchmark_suite" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    from bnbench.results import environment

    machine_info["bnbench"] = environment()
