"""The harness is itself tested: every deliberately broken implementation must fail the gate
(on the case that targets its deviation), every faithful one written differently must pass."""

import re

import pytest

from bnbench.cases import all_cases, case_by_id
from bnbench.checks import FAIL, UNSUPPORTED, Outcome, run_case
from bnbench.gate import verdict
from bnbench.registry import Implementation, UsageError
from bnbench.results import Verdict

from catalogue import BROKEN, CORRECT, PlainBatchNorm, implementation
from helpers import gate_failures


@pytest.mark.parametrize("cls", list(BROKEN), ids=lambda c: c.__name__)
def test_broken_implementation_fails_its_case_for_its_stated_reason(cls):
    expect = BROKEN[cls]
    target = case_by_id()[expect.case]
    v, message = verdict(implementation(cls), target, run_case(implementation(cls), target, "cpu"))
    assert v == Verdict.FAIL, f"{cls.__name__} should fail {target.id}, got {v}"
    assert re.search(expect.message, message), (
        f"{cls.__name__} failed {target.id} for another reason than stated "
        f"({expect.message!r}):\n{message}"
    )


@pytest.mark.parametrize("cls", CORRECT, ids=lambda c: c.__name__)
def test_faithful_implementation_passes_the_gate(cls):
    failures = gate_failures(implementation(cls))
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


def test_a_deviation_pattern_that_matches_no_case_is_an_error_at_registration():
    with pytest.raises(UsageError, match="match no case: momentum_nonee-"):
        implementation(PlainBatchNorm, deviations={"momentum_nonee-*": "typo"})


def test_broken_implementations_fail_overall_gate_not_just_one_case():
    # The whole case table (not only the targeted case) reports each broken implementation.
    # Without the exploration: on a failing implementation it searches and then shrinks for
    # about a minute per rank (test_explore.py covers it).
    table = [case for case in all_cases() if case.kind != "explore"]
    for cls in list(BROKEN)[:5]:
        assert gate_failures(implementation(cls), table), cls.__name__


def test_a_limitation_a_faithful_class_declares_is_not_supported_rather_than_failed():
    from faithful_styles import OnceDifferentiableBatchNorm

    impl = implementation(OnceDifferentiableBatchNorm)
    assert not impl.supports_double_backward
    case = case_by_id()["gradgradcheck_train-rank4"]
    v, message = verdict(impl, case, run_case(impl, case, "cpu"))
    assert v == Verdict.NOT_SUPPORTED and "double backward" in message
    # the declaration is what makes it so: undeclared, the once-differentiable backward fails
    undeclared = implementation(OnceDifferentiableBatchNorm, supports_double_backward=True)
    assert verdict(undeclared, case, run_case(undeclared, case, "cpu"))[0] == Verdict.FAIL


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
    assert verdict(deviating, case, Outcome(FAIL, "x"))[0] == Verdict.DEVIATION
    assert verdict(deviating, case, run_case(deviating, case, "cpu"))[0] == Verdict.UNEXPECTED_PASS


def test_unsupported_cases_are_skipped_with_the_reason():
    impl = implementation(
        PlainBatchNorm,
        supports_momentum_none=False,
        supports_dtypes=frozenset({__import__("torch").float32}),
    )
    outcome = run_case(impl, case_by_id()["momentum_none-rank2"], "cpu")
    assert outcome.status == UNSUPPORTED and "momentum=None" in outcome.message
    outcome = run_case(impl, case_by_id()["float64-rank2"], "cpu")
    assert verdict(impl, case_by_id()["float64-rank2"], outcome)[0] == Verdict.NOT_SUPPORTED
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


@pytest.mark.parametrize(
    "cls, expected",
    [
        (_Raises, "forward raised RuntimeError: kernel exploded"),
        (_ReturnsNaN, "non-finite mismatch"),
        (_ReturnsTuple, "forward returned tuple"),
    ],
)
def test_misbehaving_implementation_fails_with_a_readable_message(cls, expected):
    outcome = run_case(implementation(cls), case_by_id()["default-rank4"], "cpu")
    assert outcome.status == FAIL
    assert expected in outcome.message


def test_factory_that_raises_fails_the_case_instead_of_crashing():
    def factory(rank, c, **kw):
        raise TypeError("unexpected keyword argument 'momentum'")

    outcome = run_case(Implementation("bad-ctor", factory), case_by_id()["default-rank2"], "cpu")
    assert outcome.status == FAIL and "TypeError" in outcome.message
