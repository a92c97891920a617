"""The model-based exploration inside the gate: it passes faithful implementations, finds bugs
that need a sequence of operations, and shrinks them to a runnable reproducer."""

import subprocess
import sys
import textwrap

import pytest
import torch

from bnbench.cases import case_by_id
from bnbench.checks import FAIL, PASS, run_case
from bnbench.explore import QUICK_ENV, explore, explore_grad, explore_input
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


@pytest.fixture
def eps_cached(tmp_path, monkeypatch):
    (tmp_path / "epscached.py").write_text(_EPS_CACHED)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return load_spec("epscached:EpsCached")


def test_builtin_passes_the_fixed_profile():
    found = explore(resolve(["builtin"])[0], "cpu", 4)
    assert found.ok, found.message + "\n" + found.reproducer
    assert found.examples > 0


def test_a_bug_that_needs_a_sequence_is_found_and_shrunk_to_a_runnable_reproducer(
    eps_cached, tmp_path
):
    found = explore(eps_cached, "cpu", 4, seconds=10, shrink_seconds=20)
    assert not found.ok
    snippet = found.reproducer
    # shrunk: the eps assignment that matters and a call after it, not the whole search
    assert ".eps = " in snippet, snippet
    calls = snippet.count("ym, yr = m(xm), ref(xr)")
    assert 1 <= calls <= 3, snippet
    assert snippet.count("\n") < 30, snippet
    # runnable on its own, and it shows the difference against nn.BatchNorm
    (tmp_path / "repro.py").write_text(snippet)
    run = subprocess.run(
        [sys.executable, "repro.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "max abs diff" in run.stdout, run.stdout


def test_explore_is_a_case_of_the_gate_and_fails_with_the_reproducer(eps_cached, monkeypatch):
    monkeypatch.delenv(QUICK_ENV, raising=False)  # the fixed-seed profile verify runs
    outcome = run_case(eps_cached, case_by_id()["explore-rank4"], "cpu")
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


def test_snippet_header_names_the_implementation(eps_cached):
    found = explore(eps_cached, "cpu", 4, seconds=10, shrink_seconds=1)
    assert "resolve(['epscached:EpsCached'])" in found.reproducer
    assert textwrap.dedent(found.reproducer).startswith("# bnbench explore:")
