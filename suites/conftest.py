"""pytest wiring for bnbench's suites: options, Hypothesis profiles, parametrization."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# CI and local runs differ only in settings: BNBENCH_HYPOTHESIS_PROFILE=ci|dev|thorough.
settings.register_profile("ci", max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("BNBENCH_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    group = parser.getgroup("bnbench")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="Run the timed benchmark suite (suites/test_benchmarks.py) through "
                         "pytest-benchmark. Without it those tests are skipped.")
    group.addoption("--impl", action="append", default=[], metavar="NAME|MODULE:ATTR",
                    help="Implementation(s) the gate suite verifies: registered names or "
                         "MODULE:ATTR. Default: every registered implementation.")


def pytest_generate_tests(metafunc):
    if "gate_item" in metafunc.fixturenames:
        from bnbench.cases import all_cases
        from bnbench.registry import resolve

        impls = resolve(metafunc.config.getoption("impl") or None)
        params = []
        for impl in impls:
            for device in ("cpu", "cuda"):
                for case in all_cases():
                    params.append(pytest.param((impl, device, case),
                                               id=f"{impl.name}-{device}-{case.id}"))
        metafunc.parametrize("gate_item", params)


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark"):
        return
    skip = pytest.mark.skip(reason="timed benchmarks run with --benchmark")
    for item in items:
        if "benchmark_suite" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    from bnbench.gate import environment

    machine_info["bnbench"] = environment()
