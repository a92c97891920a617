"""Property tests: random shapes and configurations, each implementation against the oracle.

The profile (BNBENCH_HYPOTHESIS_PROFILE=ci|dev|thorough, see conftest.py) sets how many.
Implementations with declared deviations are left out: their deviations are declared per case.
"""

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bnbench.cases import replace
from bnbench.checks import FAIL, PASS, UNSUPPORTED, run_case
from bnbench.registry import resolve

from catalogue import BiasedRunningVar, implementation
from strategies import configurations

FAITHFUL = [impl for impl in resolve() if not impl.deviations]


@pytest.mark.parametrize("impl", FAITHFUL, ids=lambda impl: impl.name)
@given(case=configurations())
def test_matches_the_oracle_on_random_configurations(impl, case):
    outcome = run_case(impl, case, "cpu")
    assert outcome.status in (PASS, UNSUPPORTED), f"{case}\n{outcome.message}"


@given(case=configurations(), momentum=st.one_of(st.none(), st.floats(0.3, 1.0)))
def test_property_cases_are_not_vacuous(case, momentum):
    # A broken implementation is caught on random configurations wherever its deviation shows
    # clearly: a first training step that updates the statistics by a visible amount.
    values_per_channel = case.shape[0]
    for size in case.shape[2:]:
        values_per_channel *= size
    assume(2 <= values_per_channel <= 40 and case.num_features >= 2)  # channel C-1 is tiny
    case = replace(
        case,
        track_running_stats=True,
        stop_tracking_after=None,
        momentum=momentum,
        steps=("train",) + case.steps[1:],
    )
    outcome = run_case(implementation(BiasedRunningVar), case, "cpu")
    assert outcome.status == FAIL, case
