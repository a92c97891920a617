"""pytest wiring for bnbench's own suites. The options (--bnbench-impl, --benchmark) and the
gate's parametrization come from bnbench's pytest plugin (bnbench/pytest_plugin.py), the same
one a user's project gets; here only the Hypothesis profiles are set."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI and local runs differ only in settings: BNBENCH_HYPOTHESIS_PROFILE=ci|dev|thorough.
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("BNBENCH_HYPOTHESIS_PROFILE", "ci"))

# The gate's model-based exploration runs a shorter profile here (spawned workers inherit it);
# test_explore.py runs the full fixed-seed profile itself.
os.environ.setdefault("BNBENCH_EXPLORE_QUICK", "1")
