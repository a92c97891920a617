"""The model-based exploration inside the gate: it passes faithful implementations, finds bugs
that need a sequence of operations, and shrinks them to a runnable reproducer."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from bnbench.cases import case_by_id
from bnbench.checks import FAIL, PASS, run_case
from bnbench.explore import QUICK_ENV, SECONDS_ENV, explore, explore_grad, explore_input
from bnbench.registry import load_spec, resolve

# A BatchNorm that reads eps once, at construction: only a sequence that assigns module.eps
# and then trains shows it.
_EPS_CACHED = """
import torch
from torch import nn


class EpsCached(nn.BatchNorm2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._eps_at_construction = self.eps

    def forward(self, x):
        eps, self.eps = self.eps, self._eps_at_construction
        try:
            return super().forward(x)
        finally:
            self.eps = eps
"""


@pytest.fixture(scope="module")
def eps_cached(tmp_path_factory):
    path = tmp_path_factory.mktemp("epscached")
    (path / "epscached.py").write_text(_EPS_CACHED)
    sys.path.insert(0, str(path))
    try:
        yield path, load_spec("epscached:EpsCached")
    finally:
        sys.path.remove(str(path))


@pytest.fixture(scope="module")
def eps_cached_found(eps_cached):
    """One timed exploration of EpsCached, shared by the tests below."""
    return explore(eps_cached[1], "cpu", 4, seconds=10, shrink_seconds=10)


def test_builtin_passes_the_fixed_profile():
    found = explore(resolve(["builtin"])[0], "cpu", 4)
    assert found.ok, found.message + "\n" + found.reproducer
    assert found.examples > 0


def test_a_bug_that_needs_a_sequence_is_found_and_shrunk_to_a_runnable_reproducer(
    eps_cached, eps_cached_found
):
    found = eps_cached_found
    assert not found.ok
    snippet = found.reproducer
    # shrunk: the eps assignment that matters and a call after it, not the whole search
    assert ".eps = " in snippet, snippet
    calls = snippet.count("ym, yr = m(xm), ref(xr)")
    assert 1 <= calls <= 3, snippet
    assert snippet.count("\n") < 30, snippet
    # runnable on its own, and it shows the difference against nn.BatchNorm
    path = eps_cached[0]
    (path / "repro.py").write_text(snippet)
    run = subprocess.run(
        [sys.executable, "repro.py"], cwd=path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "max abs diff" in run.stdout, run.stdout


def test_explore_is_a_case_of_the_gate_and_fails_with_the_reproducer(eps_cached, monkeypatch):
    monkeypatch.delenv(QUICK_ENV, raising=False)
    monkeypatch.setenv(SECONDS_ENV, "10")  # as verify --explore 10 does
    # declared as a deviation: the case still fails (as a deviation), without shrinking
    impl = dataclasses.replace(eps_cached[1], deviations={"explore-rank4": "known"})
    outcome = run_case(impl, case_by_id()["explore-rank4"], "cpu")
    assert outcome.status == FAIL
    assert "exploration (" in outcome.message
    assert "reproducer (runs the implementation and nn.BatchNorm side by side):" in outcome.message
    assert "import torch" in outcome.message


def test_explore_case_passes_for_builtin():
    outcome = run_case(resolve(["builtin"])[0], case_by_id()["explore-rank2"], "cpu")
    assert outcome.status == PASS, outcome.message


def test_reproducer_inputs_are_deterministic():
    a = explore_input((4, 3, 5, 5), seed=17, layout="channels_last")
    b = explore_input((4, 3, 5, 5), seed=17, layout="channels_last")
    assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
    g = explore_grad(a, seed=17, layout="permuted")
    assert torch.equal(g, explore_grad(b, seed=17, layout="permuted"))
    assert not g.is_contiguous()


def test_timed_search_runs_fresh_sequences_until_the_budget_is_spent():
    found = explore(resolve(["builtin"])[0], "cpu", 2, seconds=1.0, examples=3)
    assert found.ok
    assert found.examples >= 3


def test_snippet_header_names_the_implementation(eps_cached_found):
    assert "resolve(['epscached:EpsCached'])" in eps_cached_found.reproducer
    assert eps_cached_found.reproducer.startswith("# bnbench explore:")
