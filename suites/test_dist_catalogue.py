"""The distributed gate judges the synchronized BatchNorm catalogue (suites/dist_catalogue.py)
right: every BROKEN class fails somewhere (a real fail, not just "not supported"), every
FAITHFUL one passes and fails nothing. At world size 2; at 3 for what needs a subgroup of two
ranks and for the two classes that leave their peers inside a collective, on a few cases."""

from __future__ import annotations

import os

import pytest
from dist_catalogue import BROKEN, FAITHFUL

import bnbench
from bnbench.distributed import dist_cases
from bnbench.results import Verdict

HANGS = "ZeroRankSkipsCollectiveSyncBN"  # its peers wait in a collective until the deadline
RAISES = "RaisingRankSyncBN"
# wrong only in a subgroup of two ranks out of three (at two ranks each subgroup is one rank,
# which runs locally)
NEED_THREE = (
    "GlobalRankIndexSyncBN",
    "WorldSizeGatherSyncBN",
)  # every case it fails ends its world: a fresh one per case
ZERO_RANK_CASES = ["dist-empty-rank-rank4"]  # the gate's cases with a 0-sample rank
# The cases that catch each broken class (see its docstring), so that the default test run
# stays short; BNBENCH_FULL_CATALOGUE=1 runs every distributed case but the DDP trainings.
CASES = [
    f"dist-{check}"
    for check in (
        "uneven-rank4",
        "uneven-rank2",
        "empty-rank-rank4",
        "no-running-stats-rank4",
        "subgroup-rank4",
        "momentum-none-rank4",
        "large-offset-rank2",
        "float64-rank2",
        "float16-rank4",
        "bfloat16-offset-rank4",
        "channels-last-rank4",
        "bias-false-rank4",
        "momentum-0-rank4",
        "tracking-off-rank4",
        "momentum-assigned-rank4",
        "eval-train-eval-rank4",
    )
]
if os.environ.get("BNBENCH_FULL_CATALOGUE"):
    CASES = [c.id for c in dist_cases() if not c.model]

pytestmark = pytest.mark.timeout(900)


def _spec(name: str) -> str:
    return f"dist_catalogue:{name}"


@pytest.fixture(scope="module")
def results_by_class() -> dict[str, list]:
    apart = (HANGS, RAISES, *NEED_THREE)
    specs = [_spec(name) for name in FAITHFUL + BROKEN if name not in apart]
    runs = [
        # two ranks: one process per core, the quickest world that shows the rest
        bnbench.verify(specs, world_sizes=[2], timeout=60, cases=CASES),
        # three ranks: a subgroup of two non-adjacent ranks (a group rank is not the global
        # rank); and the two that leave their peers inside a collective, whose every failed
        # case costs a fresh world (and a collective timeout for the one that skips them)
        bnbench.verify(
            [_spec(name) for name in (*NEED_THREE, RAISES, HANGS)],
            world_sizes=[3],
            timeout=20,
            cases=["dist-subgroup-rank4", "dist-uneven-rank4", *ZERO_RANK_CASES],
        ),
    ]
    by_class: dict[str, list] = {name: [] for name in FAITHFUL + BROKEN}
    for run in runs:
        for result in run.results:
            by_class[result.implementation.rpartition(":")[2]].append(result)
    return by_class


def _lines(results) -> str:
    return "\n".join(f"{r.case}: {r.verdict} {r.message[:200]}" for r in results)


@pytest.mark.parametrize("name", BROKEN)
def test_broken_sync_batchnorm_fails_the_gate(results_by_class, name):
    results = results_by_class[name]
    assert any(r.verdict != Verdict.PASS for r in results), f"{name} passed everything"
    assert any(r.verdict == Verdict.FAIL for r in results), (
        f"{name} never failed (only not-supported or other non-pass verdicts):\n{_lines(results)}"
    )


@pytest.mark.parametrize("name", FAITHFUL)
def test_faithful_sync_batchnorm_passes_the_gate(results_by_class, name):
    results = results_by_class[name]
    failed = [r for r in results if r.verdict in (Verdict.FAIL, Verdict.UNEXPECTED_PASS)]
    assert not failed, f"{name} failed:\n{_lines(failed)}"
    assert any(r.verdict == Verdict.PASS for r in results), f"{name} passed nothing"
