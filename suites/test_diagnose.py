"""The gate diagnoses (bnbench/diagnose.py): hints derived from the numbers, a constructor
without nn.BatchNorm's device/dtype still checked where it can be, and failures grouped by root
cause. Every hint is tested on a broken implementation of the catalogue that has its slip; every
other broken implementation must get no hint at all on the case that catches it."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from bnbench import diagnose
from bnbench.cases import all_cases, case_by_id
from bnbench.checks import FAIL, PASS, run_case
from bnbench.diagnose import (
    CONSTRUCTOR_DEFAULTS,
    StepState,
    cause_key,
    constructor_problem,
    group_failures,
    hints_in,
    output_hint,
    statistic_hint,
)
from bnbench.gate import Result, verdict
from bnbench.reference import ReferenceBatchNorm
from bnbench.registry import Implementation, from_module_class, resolve
from bnbench.results import Verdict

import catalogue
from catalogue import BROKEN, CORRECT, implementation

# (class, case, the hint's cause): every hint, on a broken implementation that has its slip.
HINTED = [
    ("BiasedRunningVar", "default-rank4", "biased variance in running_var (n/(n-1))"),
    ("MomentumInverted", "default-rank2", "momentum inverted (1-m)"),
    ("MomentumZeroAsNone", "momentum_0-rank4", "momentum=0 taken for None"),
    ("MomentumNoneIgnored", "momentum_none-rank2", "momentum=None ignored"),
    ("MomentumArgumentIgnored", "momentum_float-rank4", "momentum argument ignored"),
    (
        "MomentumCachedAtConstruction",
        "momentum_assigned-rank3",
        "module.momentum assigned after construction is ignored",
    ),
    ("WrongDefaultMomentum", "default_constructor-rank4", "wrong momentum"),
    (
        "TrackingFixedAtConstruction",
        "stop_tracking-rank4",
        "track_running_stats=False set after construction is ignored",
    ),
    ("EpsOutsideSqrt", "default-rank4", "eps added outside the square root"),
    (
        "EpsOutsideSqrtForTinyVariance",
        "variance_below_eps-rank4",
        "eps added outside the square root",
    ),
    ("VarianceFlooredAtEps", "default-rank4", "eps left out"),
    ("EpsIgnored", "eps-rank4", "eps argument ignored"),
    (
        "EpsCachedAtConstruction",
        "eps_assigned-rank4",
        "module.eps assigned after construction is ignored",
    ),
    ("WrongDefaultEps", "default_constructor-rank2", "wrong eps"),
    ("UnbiasedNormalization", "default-rank2", "unbiased variance used to normalize (n/(n-1))"),
    (
        "UnbiasedNormalization",
        "default-rank2",
        "batch variance corrected twice in running_var (n/(n-1) twice)",
    ),
    (
        "SingleChannelUnbiasedVariance",
        "size_7_c1-rank2",
        "unbiased variance used to normalize (n/(n-1))",
    ),
    ("EvalUsesBatchStats", "eval_first-rank4", "eval used the batch statistics"),
    ("ModeFromTrainCalls", "training_assigned-rank4", "eval used the batch statistics"),
    (
        "ModeFromGradMode",
        "mode_from_training_flag-rank4",
        "a training-mode call used the running statistics",
    ),
    ("StatisticsPerSampleAndChannel", "default-rank4", "statistics over the wrong dimensions"),
    ("StatisticsOverBatchOnly", "default-rank4", "statistics over the wrong dimensions"),
    ("StatisticsPerSample", "default-rank2", "statistics over the wrong dimensions"),
]
# The classes whose slip a hint names (on the case that catches them): all others get none.
HINTED_CLASSES = {name for name, _, _ in HINTED} | {"NoneBuffersNotBatchStats"}


def _outcome(cls_name: str, case_id: str):
    cls = getattr(catalogue, cls_name)
    return run_case(implementation(cls), case_by_id()[case_id], "cpu")


@pytest.mark.parametrize(
    "cls_name, case_id, cause", HINTED, ids=[f"{c}-{h.split()[0]}" for c, _, h in HINTED]
)
def test_a_known_slip_gets_its_hint(cls_name, case_id, cause):
    outcome = _outcome(cls_name, case_id)
    assert outcome.status == FAIL
    hints = hints_in(outcome.message)
    assert cause in [h.split(": ")[0] for h in hints], outcome.message
    # one line of its own, right after the problem it explains; the cause (what names its
    # group) ends at the first ": ", and no hint has the "; " the exploration joins problems with
    lines = outcome.message.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("hint: "))
    assert at > 0 and not lines[at - 1].startswith("hint: ")
    assert all("; " not in line for line in lines if line.startswith("hint: "))


@pytest.mark.parametrize(
    "cls", [c for c in BROKEN if c.__name__ not in HINTED_CLASSES], ids=lambda c: c.__name__
)
def test_a_bug_no_hint_describes_gets_no_hint(cls):
    outcome = run_case(implementation(cls), case_by_id()[BROKEN[cls].case], "cpu")
    assert outcome.status == FAIL
    assert not hints_in(outcome.message), outcome.message


def test_the_hint_names_the_slip_the_numbers_show_and_not_a_neighbour():
    # biased running_var: the running_var line, not running_mean, and not "corrected twice"
    message = _outcome("BiasedRunningVar", "default-rank4").message
    assert hints_in(message) == [
        "biased variance in running_var (n/(n-1)): it matches the update with the biased batch "
        "variance, nn.BatchNorm's running_var takes the unbiased one"
    ]
    assert "running_var:" in message.split("\nhint: ")[0].splitlines()[-1]
    # the wrong dimensions are named
    message = _outcome("StatisticsPerSampleAndChannel", "default-rank4").message
    assert "per sample and channel (as InstanceNorm), over dims (2, 3)" in message
    assert "per channel, over dims (0, 2, 3)" in message
    message = _outcome("StatisticsOverBatchOnly", "default-rank4").message
    assert "over dims (0,)" in message
    # momentum: the same hint for running_mean and running_var is said once
    message = _outcome("MomentumInverted", "default-rank2").message
    assert message.count("hint: ") == 1


def test_where_two_slips_fit_the_numbers_both_are_named():
    # momentum=0 at the first step: "taken for None" (1/1) and "inverted" (1-0) move the same
    message = _outcome("MomentumZeroAsNone", "momentum_0-rank4").message
    assert "(also fits: momentum inverted (1-m))" in hints_in(message)[0]


@pytest.mark.parametrize("cls", CORRECT, ids=lambda c: c.__name__)
def test_faithful_implementations_get_no_hint(cls):
    cases = [
        case_by_id()[i]
        for i in ("default-rank4", "eval_first-rank2", "momentum_none-rank3", "eps-rank4")
    ]
    for case in cases:
        outcome = run_case(implementation(cls), case, "cpu")
        assert outcome.status == PASS and "hint:" not in outcome.message


def _state(training=True, momentum=0.1, eps=1e-5, n=6, c=3, **kw) -> StepState:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5, 0.01])
    ref = ReferenceBatchNorm(c, eps=eps, momentum=momentum)
    ref.running_mean = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    ref.running_var = torch.tensor([1.5, 0.7, 2.0], dtype=torch.float64)
    return diagnose.step_state(ref, x, training, built={"eps": eps, "momentum": momentum}, **kw)


def test_no_hint_where_the_tensor_matches_the_truth_or_nothing_known_fits():
    s = _state()
    ref = ReferenceBatchNorm(3)
    ref.running_mean, ref.running_var = s.running_mean.clone(), s.running_var.clone()
    y, _ = ref.forward(s.x, True)
    assert output_hint(s, y.float(), y, torch.float32) is None  # within the tolerance
    assert output_hint(s, y + 0.5, y, torch.float32) is None  # wrong, but no known slip
    assert output_hint(s, "not a tensor", y, torch.float32) is None
    assert (
        statistic_hint(s, "running_mean", ref.running_mean + 1, ref.running_mean, torch.float32)
        is None
    )
    assert (
        statistic_hint(s, "num_batches_tracked", torch.tensor(2), torch.tensor(1), torch.float32)
        is None
    )


def test_hint_candidates_are_computed_only_when_a_comparison_failed(monkeypatch):
    calls = []
    monkeypatch.setattr("bnbench.checks.output_hint", lambda *a, **k: calls.append(a))
    monkeypatch.setattr("bnbench.checks.statistic_hint", lambda *a, **k: calls.append(a))
    impl = implementation(catalogue.PlainBatchNorm)
    assert run_case(impl, case_by_id()["default-rank4"], "cpu").status == PASS
    assert not calls


# ---------------------------------------------------------------------------------------------
# A constructor without device / dtype


class HandWrittenBN(nn.Module):
    """What a new user writes: nn.BatchNorm's arithmetic, no device or dtype arguments."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x):
        dims = [0] + list(range(2, x.dim()))
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.training or self.running_mean is None:
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            n = x.numel() // x.shape[1]
            if self.training and self.track_running_stats and self.running_mean is not None:
                self.num_batches_tracked.add_(1)
                m = 1 / int(self.num_batches_tracked) if self.momentum is None else self.momentum
                with torch.no_grad():
                    self.running_mean.mul_(1 - m).add_(m * mean)
                    self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(view)) / torch.sqrt(var.view(view) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(view) + self.bias.view(view)
        return y


def _advised(init_name: str) -> str:
    signature = inspect.signature(nn.BatchNorm2d.__init__)
    plain = signature.replace(
        parameters=[
            p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()
        ],
        return_annotation=inspect.Signature.empty,
    )
    return f"{init_name}{plain}"


def test_constructor_problem_names_what_is_missing_and_the_signature_to_give():
    problem = constructor_problem(from_module_class("hand", HandWrittenBN))
    assert problem is not None
    missing = "device, dtype, bias" if "bias" in CONSTRUCTOR_DEFAULTS else "device, dtype"
    assert f"HandWrittenBN.__init__ does not take nn.BatchNorm's {missing} argument(s)" in problem
    assert problem.endswith(_advised("HandWrittenBN.__init__"))
    # derived from the installed torch: its defaults, and bias=True keyword-only on 2.13
    assert (
        "(self, num_features, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
        in problem
    )
    if "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters:
        assert problem.endswith("device=None, dtype=None, *, bias=True)")
    assert "\n" not in problem


def test_constructor_problem_is_none_for_a_full_constructor_or_a_stand_in():
    assert constructor_problem(implementation(catalogue.PlainBatchNorm)) is None
    assert constructor_problem(resolve(["builtin"])[0]) is None
    stand_in = Implementation.from_declarations(
        implementation(catalogue.PlainBatchNorm).declarations()
    )
    assert constructor_problem(stand_in) is None  # its code runs only in workers
    lost = Implementation("lost", factory=lambda *a, **k: None, load_error="could not be loaded")
    assert constructor_problem(lost) is None


def test_a_class_without_device_and_dtype_is_checked_on_cpu_float32_and_fails_what_needs_them():
    impl = from_module_class("hand", HandWrittenBN)
    ids = [
        "default-rank4",
        "default_constructor-rank2",
        "eval_first-rank3",
        "momentum_none-rank5",
        "non_contiguous-rank4",
        "float64-rank4",
        "module_dtype-rank4",
        "gradcheck_train-rank2",
    ]
    outcomes = {i: run_case(impl, case_by_id()[i], "cpu") for i in ids}
    for i in ids[:5]:
        assert outcomes[i].status == PASS, (i, outcomes[i].message)
    for i in ids[5:]:
        message = outcomes[i].message
        assert outcomes[i].status == FAIL
        first, second = message.splitlines()
        # the same first line in every such case (one group), and no path into bnbench
        assert first == (
            "raised TypeError: HandWrittenBN.__init__() got an unexpected keyword argument 'device'"
        )
        assert "bnbench" not in message
        assert "needs dtype=torch.float" in second
        assert second.endswith(_advised("HandWrittenBN.__init__"))


def test_the_missing_bias_argument_fails_only_where_bias_false_is_asked_for():
    if "bias" not in CONSTRUCTOR_DEFAULTS:
        pytest.skip("the installed torch's nn.BatchNorm has no bias argument")
    impl = implementation(catalogue.NoBiasArgument)
    assert run_case(impl, case_by_id()["default-rank4"], "cpu").status == PASS
    outcome = run_case(impl, case_by_id()["bias_false-rank4"], "cpu")
    assert outcome.status == FAIL and "this one needs bias=False" in outcome.message


def test_a_factory_that_takes_everything_is_called_as_before():
    seen = []

    def factory(rank, c, **kwargs):
        seen.append(dict(kwargs))
        return nn.BatchNorm2d(c, **kwargs)

    outcome = run_case(Implementation("plain", factory), case_by_id()["float64-rank4"], "cpu")
    assert outcome.status == PASS, outcome.message
    assert all(k["dtype"] == torch.float64 for k in seen if "dtype" in k)
    assert all("device" in k for k in seen)  # nothing left out


# ---------------------------------------------------------------------------------------------
# Grouping by root cause


def _result(message, case="default-rank4", impl="mine", device="cpu", v=Verdict.FAIL):
    return Result(impl, device, case, case.split("-")[0], "numerics", 4, "", v, message, 0.0)


def test_messages_that_differ_only_in_numbers_indices_and_shapes_are_one_group():
    results = [
        _result(
            "step 0 (train): output: 36/180 elements outside rtol=0.0001 atol=0.0001x4.83; max "
            "abs diff 0.119 at (2, 4, 0, 2) (got 3.96285, expected 3.84419)",
            "default-rank4",
        ),
        _result(
            "step 2 (train): output: 7/30 elements outside rtol=0.0001 atol=0.0001x2.1; max abs "
            "diff 1.5e-03 at (1, 0) (got -nan, expected 1e+05)",
            "eval_first-rank2",
        ),
        _result("step 0 (train): input grad: 3/30 elements outside", "default-rank3"),
        _result("step 0 (eval): output: 7/30 elements outside", "default-rank5"),
        _result("anything", "default-rank2", v=Verdict.PASS),
        _result("anything", "default-rank2", v=Verdict.WAIVED),
        _result("step 0 (train): output: 1/3 elements outside", "default-rank4", impl="other"),
    ]
    groups = group_failures(results)
    assert [(g.implementation, g.cases) for g in groups] == [
        ("mine", ["default-rank4", "eval_first-rank2"]),
        ("mine", ["default-rank3"]),
        ("mine", ["default-rank5"]),
        ("other", ["default-rank4"]),
    ]
    first = groups[0]
    assert (
        first.cause
        == "step 0 (train): output: 36/180 elements outside rtol=0.0001 atol=0.0001x4.83"
    )
    assert first.example == results[0].message and first.hint is None
    assert first.results == results[:2]


def test_a_hint_names_its_group_whatever_else_the_messages_say():
    hint = "hint: eps added outside the square root: the output matches (x - mean) / ..."
    results = [
        _result(
            f"step 0 (train): output: 36/180 elements outside\n{hint}\n"
            "step 0 (train): input grad: 2/3"
        ),
        _result(f"step 3 (eval): output: 1/5 elements outside\n{hint}", "eval_first-rank2"),
        _result(
            "exploration (25 sequences): call 1 (train): output: 3/4 elements outside\n"
            f"{hint}; input grad: 1/4 elements outside\nreproducer (runs ...):\nimpl = ...",
            "explore-rank4",
        ),
        _result(
            "step 0 (train): running_var: 4/5 elements outside\n"
            "hint: biased variance in running_var (n/(n-1)): it ..."
        ),
    ]
    groups = group_failures(results)
    assert [g.cause for g in groups] == [
        "eps added outside the square root",
        "biased variance in running_var (n/(n-1))",
    ]
    assert groups[0].cases == ["default-rank4", "eval_first-rank2", "explore-rank4"]
    assert groups[0].hint == hint[len("hint: ") :]


def test_an_exception_with_the_same_type_and_text_is_one_group_wherever_it_was_raised():
    results = [
        _result(
            "raised TypeError: MyBN.__init__() got an unexpected keyword argument 'device' "
            "[/x/registry.py:254]"
        ),
        _result(
            "step 2 (eval): forward raised TypeError: MyBN.__init__() got an unexpected keyword "
            "argument 'device'",
            "eval_first-rank2",
        ),
        _result(
            "raised TypeError: MyBN.__init__() got an unexpected keyword argument 'dtype'",
            "float64-rank4",
        ),
        _result(
            "step 0 (train): backward raised RuntimeError: view size is not compatible",
            "grad-rank4",
        ),
    ]
    groups = group_failures(results)
    assert [g.cases for g in groups] == [
        ["default-rank4", "eval_first-rank2"],
        ["float64-rank4"],
        ["grad-rank4"],
    ]
    assert groups[0].cause == (
        "raised TypeError: MyBN.__init__() got an unexpected keyword argument 'device'"
    )
    assert cause_key("raised ValueError('a'), expected ValueError('b')") != cause_key(
        "raised ValueError('c'), expected ValueError('b')"
    )


def _gate_results(impl, cases):
    results = []
    for case in cases:
        v, message = verdict(impl, case, run_case(impl, case, "cpu"))
        results.append(
            Result(
                impl.name, "cpu", case.id, case.check, case.category, case.rank, "", v, message, 0.0
            )
        )
    return results


def _steps_cases(rank):
    return [
        c
        for c in all_cases()
        if c.kind == "steps" and c.rank == rank and math.prod(c.shape) <= 12000
    ]


@pytest.mark.parametrize(
    "cls_name, cause",
    [
        ("EpsOutsideSqrt", "eps added outside the square root"),
        ("BiasedRunningVar", "biased variance in running_var (n/(n-1))"),
        ("MomentumInverted", "momentum inverted (1-m)"),
    ],
)
def test_one_root_cause_over_many_cases_is_one_entry(cls_name, cause):
    impl = implementation(getattr(catalogue, cls_name))
    results = _gate_results(impl, _steps_cases(4))
    failed = [r for r in results if not r.ok]
    groups = group_failures(results)
    assert groups[0].cause == cause
    assert len(groups[0].cases) >= 30, [(g.cause, len(g.cases)) for g in groups]
    # the rest, if any, are few: cases where the slip shows only in another tensor
    assert len(groups) <= 4 and sum(len(g.cases) for g in groups) == len(failed)


def test_a_constructor_without_device_and_dtype_is_one_entry():
    impl = from_module_class("hand", HandWrittenBN)
    cases = [c for c in all_cases() if c.rank == 4 and c.kind not in ("explore", "steps")]
    cases += [case_by_id()[i] for i in ("float64-rank4", "default-rank4", "eps-rank4")]
    groups = group_failures(_gate_results(impl, cases))
    constructor = [g for g in groups if "unexpected keyword argument" in g.cause]
    assert len(constructor) == 1, [g.cause for g in groups]
    assert {"float64-rank4", "module_dtype-rank4", "gradcheck_train-rank4"} <= set(
        constructor[0].cases
    )


def test_statistics_over_the_whole_input_are_named():
    s = _state()
    ref = ReferenceBatchNorm(3)
    ref.running_mean, ref.running_var = s.running_mean.clone(), s.running_var.clone()
    truth, _ = ref.forward(s.x, True)
    whole = (s.x - s.x.mean()) / torch.sqrt(s.x.var(unbiased=False) + 1e-5)
    hint = output_hint(s, whole.float(), truth, torch.float32)
    assert hint is not None and hint.startswith("statistics over the wrong dimensions")
    assert "across the whole input, over dims (0, 1)" in hint


def test_a_candidate_the_tolerance_cannot_tell_from_the_truth_explains_nothing():
    truth = torch.full((4,), 2.0, dtype=torch.float64)
    near = truth + 0.05  # within bfloat16's tolerance of the truth: no slip would show
    actual = (truth + 0.12).to(torch.bfloat16)  # outside the truth's, within near's
    assert not diagnose.explains(actual, truth, near, torch.bfloat16)
    far = truth + 0.15  # a slip that would itself fail
    assert diagnose.explains(actual, truth, far, torch.bfloat16)
    # a bfloat16 kernel's rounding with 300 values per channel is not the Bessel factor 300/299
    outcome = run_case(
        from_module_class("hand", HandWrittenBN), case_by_id()["bfloat16_bessel_300-rank3"], "cpu"
    )
    assert outcome.status == FAIL and not hints_in(outcome.message), outcome.message


def test_the_first_problem_of_a_message_is_its_symptom():
    first = "step 0 (train): output: dtype torch.float32, expected the input's torch.float16"
    results = [
        _result(first, "float16-rank4"),
        _result(f"{first}\nstep 0 (train): output: 3/180 elements outside", "float16-rank3"),
        _result(first.replace("float16", "bfloat16"), "bfloat16-rank4"),
    ]
    assert [g.cases for g in group_failures(results)] == [
        ["float16-rank4", "float16-rank3"],
        ["bfloat16-rank4"],
    ]
