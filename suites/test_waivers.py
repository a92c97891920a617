"""Graded verdicts: every check has a category, and `bnbench verify --ignore PATTERN=REASON`
waives a category or a glob of cases, as a linter's ignore does: the cases still run, their
failures are reported as waived, and the exit code is decided by what remains."""

import json
import xml.etree.ElementTree as ET

import pytest

from bnbench import gate
from bnbench.cases import CATEGORIES, all_cases
from bnbench.results import Verdict

from helpers import in_process

BIASED = "catalogue:BiasedRunningVar"  # fails default-rank* (numerics) and momentum_none


def verify(*args):
    return in_process("verify", "--impl", BIASED, "--device", "cpu", *args)


def result(case="default-rank4", verdict=Verdict.FAIL, message="step 0: running_var differs"):
    check = case.rsplit("-", 1)[0]
    category = next(c.category for c in all_cases() if c.id == case)
    return gate.Result("mine", "cpu", case, check, category, 4, "d", verdict, message, 0.1)


# ---- parsing and applying waivers, in this process --------------------------------------------


def test_a_waiver_is_a_category_or_a_glob_over_case_ids_and_checks():
    cases = all_cases()
    category = gate.parse_waiver("object contract=we rebind buffers by design", cases)
    assert category.is_category and category.reason == "we rebind buffers by design"
    glob = gate.parse_waiver(" default-* = known: see issue 12 (a=b) ", cases)
    assert glob == gate.Waiver("default-*", "known: see issue 12 (a=b)")
    assert glob.matches("default-rank2", "default", "numerics")
    assert not glob.matches("default_constructor-rank2", "default_constructor", "object contract")
    # a check name matches every rank of it, as --case does
    assert gate.parse_waiver("momentum_none=x", cases).matches(
        "momentum_none-rank5", "momentum_none", "running state"
    )


def test_every_case_has_one_of_the_categories():
    assert {c.category for c in all_cases()} <= set(CATEGORIES)


def test_waive_turns_a_failure_or_an_unexpected_pass_into_waived_and_nothing_else():
    waiver = gate.Waiver("numerics", "known")
    failed = gate.waive(result(), [waiver])
    assert failed.verdict == Verdict.WAIVED and failed.ok and failed.waiver == waiver
    assert failed.message == "known\nfail: step 0: running_var differs"
    xpass = gate.waive(result(verdict=Verdict.UNEXPECTED_PASS, message="declared"), [waiver])
    assert xpass.verdict == Verdict.WAIVED and "unexpected-pass: declared" in xpass.message
    for kept in (Verdict.PASS, Verdict.NOT_SUPPORTED, Verdict.DEVIATION):
        assert gate.waive(result(verdict=kept), [waiver]).verdict == kept
    # a waiver for another category or case leaves the failure failing
    other = [gate.Waiver("autograd", "x"), gate.Waiver("momentum*", "y")]
    assert gate.waive(result(), other).verdict == Verdict.FAIL
    # the first matching waiver applies; a waiver that waived nothing is reported as unused
    both = [waiver, gate.Waiver("default-*", "z")]
    assert gate.waive(result(), both).waiver == waiver
    assert gate.unused_waivers([gate.waive(result(), both)], both) == [both[1]]


def test_json_and_junit_group_by_category_and_keep_the_waiver():
    waiver = gate.Waiver("default-*", "known")
    results = [
        gate.waive(result("default-rank4"), [waiver]),
        result("momentum_none-rank2"),
        result("reset-rank2", Verdict.PASS, ""),
    ]
    report = json.loads(gate.to_json(results, {}, [waiver]))
    assert report["ok"] is False and report["waivers"] == [
        {"pattern": "default-*", "reason": "known"}
    ]
    assert report["summary_by_category"]["mine@cpu"] == {
        "numerics": {"waived": 1},
        "running state": {"fail": 1},
        "lifecycle": {"pass": 1},
    }
    waived = report["results"][0]
    assert waived["category"] == "numerics" and waived["waiver"]["reason"] == "known"
    suites = ET.fromstring(gate.to_junit(results))
    assert [s.get("name") for s in suites] == [
        "mine@cpu: numerics",
        "mine@cpu: running state",
        "mine@cpu: lifecycle",
    ]
    assert suites.get("tests") == "3" and suites.get("failures") == "1"
    assert suites.get("skipped") == "1"


# ---- the command line: BiasedRunningVar fails default-rank* ----------------------------------


def test_a_failure_without_a_waiver_exits_1():
    run = verify("--case", "default-rank4")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL catalogue:BiasedRunningVar@cpu default-rank4" in run.stdout


def test_a_glob_waiver_runs_the_cases_reports_them_waived_and_exits_0(tmp_path):
    run = verify(
        "--case",
        "default-*",
        "--case",
        "wrong_channels-rank2",  # one that passes: a run of waived cases only verified nothing
        "--ignore",
        "default-*=biased running_var: known, issue 12",
        "--json",
        str(tmp_path / "r.json"),
        "--junit",
        str(tmp_path / "r.xml"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "OK: 0 unexpected" in out and "(4 waived)" in out and "4 waived" in out
    assert "numerics" in out and "waived" in out  # the matrix: category heading, cell
    # the reason once, then one line per case with the failure it waives
    assert out.count("biased running_var: known, issue 12") == 1
    assert "default-rank4: fail: step 0 (train): running_var" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is True
    assert {(r["category"], r["verdict"]) for r in report["results"]} == {
        ("numerics", "waived"),
        ("errors", "pass"),
    }
    first = report["results"][0]
    assert first["waiver"] == {
        "pattern": "default-*",
        "reason": "biased running_var: known, issue 12",
    }
    assert first["message"].startswith("biased running_var: known, issue 12\nfail: step 0")
    assert report["summary_by_category"][f"{BIASED}@cpu"] == {
        "numerics": {"waived": 4},
        "errors": {"pass": 1},
    }
    suites = ET.parse(tmp_path / "r.xml").getroot()
    assert [s.get("name") for s in suites] == [f"{BIASED}@cpu: numerics", f"{BIASED}@cpu: errors"]
    cases = suites[0].findall(".//testcase")
    assert len(cases) == 4 and {c.get("classname") for c in cases} == {
        f"bnbench.{BIASED}@cpu.numerics"
    }
    skipped = [c.find("skipped") for c in cases]
    assert all(s is not None and "biased running_var: known" in s.get("message") for s in skipped)
    assert suites.find(".//failure") is None and suites.get("failures") == "0"


def test_a_category_waiver_waives_its_category_and_the_rest_decides_the_exit_code(tmp_path):
    run = verify(
        "--case",
        "default-rank4",
        "--case",
        "momentum_none-rank2",
        "--ignore",
        "numerics=we accept float32 drift",
        "--ignore",
        "lifecycle=nothing to waive here",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert run.returncode == 1, run.stdout + run.stderr
    verdicts = {
        r["case"]: (r["category"], r["verdict"])
        for r in json.loads((tmp_path / "r.json").read_text())["results"]
    }
    assert verdicts == {
        "default-rank4": ("numerics", "waived"),
        "momentum_none-rank2": ("running state", "fail"),
    }
    assert "FAIL catalogue:BiasedRunningVar@cpu momentum_none-rank2" in run.stdout
    assert "--ignore lifecycle: waived nothing in this run" in run.stdout


@pytest.mark.parametrize(
    "ignore, message",
    [
        ("default-*", "no '=': expected CATEGORY=REASON or GLOB=REASON"),
        ("default-*=", "the reason after '=' is empty"),
        ("default-*=   ", "the reason after '=' is empty"),
        ("=a reason", "nothing before '='"),
        ("no_such_check*=x", "'no_such_check*' matches no category (numerics, running state"),
        ("Object Contract=x", "'Object Contract' matches no category"),
    ],
)
def test_a_bad_ignore_is_a_usage_error_that_says_what_was_wrong(ignore, message):
    run = verify("--case", "default-rank4", "--ignore", ignore)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr and "--ignore" in run.stderr


def test_a_run_whose_every_case_was_waived_verified_nothing_and_exits_1():
    run = verify("--case", "default-*", "--ignore", "default-*=known")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "nothing was verified" in run.stdout
