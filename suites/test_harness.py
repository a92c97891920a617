"""The harness is itself tested: every deliberately broken implementation must fail the gate
(on the case that targets its deviation), every faithful one written differently must pass."""

import pytest
from catalogue import BROKEN, CORRECT, PlainBatchNorm, implementation

from bnbench.cases import all_cases, case_by_id
from bnbench.checks import FAIL, Outcome, run_case
from bnbench.gate import (
    BAD_VERDICTS,
    V_DEVIATION,
    V_FAIL,
    V_UNEXPECTED_PASS,
    V_UNSUPPORTED,
    verdict,
)
from bnbench.registry import Implementation

CASES = all_cases()


def gate_failures(impl):
    failures = {}
    for case in CASES:
        v, message = verdict(impl, case, run_case(impl, case, "cpu"))
        if v in BAD_VERDICTS:
            failures[case.id] = message
    return failures


def test_catalogue_is_large_enough():
    assert len(BROKEN) >= 15
    assert len(CORRECT) >= 4


@pytest.mark.parametrize("cls", list(BROKEN), ids=lambda c: c.__name__)
def test_broken_implementation_fails_the_gate(cls):
    target = case_by_id()[BROKEN[cls]]
    v, message = verdict(implementation(cls), target, run_case(implementation(cls), target, "cpu"))
    assert v == V_FAIL, f"{cls.__name__} should fail {target.id}, got {v}"
    assert message  # a failure always says what differs


@pytest.mark.parametrize("cls", CORRECT, ids=lambda c: c.__name__)
def test_faithful_implementation_passes_the_gate(cls):
    failures = gate_failures(implementation(cls))
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


def test_broken_implementations_fail_overall_gate_not_just_one_case():
    # The whole gate (not only the targeted case) reports each broken implementation.
    for cls in list(BROKEN)[:5]:
        assert gate_failures(implementation(cls)), cls.__name__


def test_failure_message_names_tensor_difference_and_location():
    from catalogue import BiasedRunningVar

    outcome = run_case(implementation(BiasedRunningVar), case_by_id()["default-rank4"], "cpu")
    assert outcome.status == FAIL
    first = outcome.message.splitlines()[0]
    assert first.startswith("step 0 (train): running_var:")
    assert "max abs diff" in first and "max rel diff" in first and " at (" in first


def test_declared_deviation_is_expected_to_fail_and_passing_is_an_error():
    case = case_by_id()["default-rank2"]
    deviating = implementation(PlainBatchNorm, deviations={"default-*": "because"})
    assert verdict(deviating, case, Outcome(FAIL, "x"))[0] == V_DEVIATION
    assert verdict(deviating, case, run_case(deviating, case, "cpu"))[0] == V_UNEXPECTED_PASS


def test_unsupported_cases_are_skipped_with_the_reason():
    impl = implementation(PlainBatchNorm, momentum_none=False,
                          dtypes=frozenset({__import__("torch").float32}))
    outcome = run_case(impl, case_by_id()["momentum_none-rank2"], "cpu")
    assert outcome.status == "unsupported" and "momentum=None" in outcome.message
    outcome = run_case(impl, case_by_id()["float64-rank2"], "cpu")
    assert verdict(impl, case_by_id()["float64-rank2"], outcome)[0] == V_UNSUPPORTED
    assert "float64 not supported" in outcome.message


class _Raises(PlainBatchNorm):
    def forward(self, x):
        raise RuntimeError("kernel exploded")


class _ReturnsNaN(PlainBatchNorm):
    def forward(self, x):
        return super().forward(x) * float("nan")


class _ReturnsTuple(PlainBatchNorm):
    def forward(self, x):
        return super().forward(x), None


@pytest.mark.parametrize("cls, expected", [
    (_Raises, "forward raised RuntimeError: kernel exploded"),
    (_ReturnsNaN, "non-finite mismatch"),
    (_ReturnsTuple, "forward returned tuple"),
])
def test_misbehaving_implementation_fails_with_a_readable_message(cls, expected):
    outcome = run_case(implementation(cls), case_by_id()["default-rank4"], "cpu")
    assert outcome.status == FAIL
    assert expected in outcome.message


def test_factory_that_raises_fails_the_case_instead_of_crashing():
    def factory(rank, c, **kw):
        raise TypeError("unexpected keyword argument 'momentum'")

    outcome = run_case(Implementation("bad-ctor", factory), case_by_id()["default-rank2"], "cpu")
    assert outcome.status == FAIL and "TypeError" in outcome.message
