"""The Python API (bnbench.verify, bnbench.bench) and the CLI's edges for people: progress with
an ETA where there is no terminal, FAIL n/m in the matrix, why a case was not supported, a
missing extra named with its pip install, run output kept out of git status."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

import bnbench
from bnbench import api, gate
from bnbench import benchmark as engine
from bnbench.cli import _Progress, print_details, print_matrix
from bnbench.results import Verdict

from catalogue import BiasedRunningVar, PlainBatchNorm, implementation
from helpers import in_process

ROOT = Path(__file__).parent.parent


def test_verify_returns_results_a_frame_and_the_exit_codes_verdict():
    good = implementation(PlainBatchNorm)
    outcome = bnbench.verify(good, cases=["default-rank2", "momentum_none-rank2"])
    assert outcome.ok and not outcome.failures and not outcome.interrupted
    assert outcome.summary() == {"PlainBatchNorm@cpu": {"pass": 2}}
    frame = outcome.to_frame()
    assert list(frame["case"]) == ["default-rank2", "momentum_none-rank2"]
    assert set(frame["verdict"]) == {"pass"}
    assert "PlainBatchNorm@cpu" in outcome.to_json() and "<testsuites" in outcome.to_junit()

    bad = bnbench.verify(implementation(BiasedRunningVar), cases=["default-rank2"])
    assert not bad.ok and [r.case for r in bad.failures] == ["default-rank2"]
    assert "FAILED" in repr(bad)


def test_verify_by_name_runs_in_a_worker_and_bad_arguments_raise_usage_errors():
    outcome = bnbench.verify("builtin", cases=["default-rank4"], devices=["cpu"])
    assert outcome.ok and [r.verdict for r in outcome.results] == [Verdict.PASS]
    for kwargs, words in [
        ({"cases": ["no-such-case*"]}, "no case matches"),
        ({"ignore": ["numerics"]}, "the reason is required"),
        ({"devices": ["tpu"]}, "expected cpu or cuda"),
    ]:
        with pytest.raises(bnbench.UsageError, match=words):
            bnbench.verify("builtin", **kwargs)
    with pytest.raises(bnbench.UsageError, match="more than once"):
        bnbench.verify(["builtin", "builtin"])
    with pytest.raises(bnbench.UsageError, match="unknown implementation"):
        bnbench.verify("no-such-implementation")


def test_bench_returns_its_rows_as_a_frame(tmp_path):
    sweep = engine.Sweep(
        "api-one", (engine.LayerGroup((8,), (4,), ((),), modes=("forward_eval",)),)
    )
    engine.SWEEPS["api-one"] = sweep
    try:
        timing = bnbench.bench("builtin", sweep="api-one", output=tmp_path / "b", verify=False)
    finally:
        del engine.SWEEPS["api-one"]
    assert len(timing.rows) == 1 and timing.rows[0]["status"] == "ok"
    frame = timing.to_frame()
    assert frame.loc[0, "median_s"] > 0 and frame.loc[0, "implementation"] == "builtin"
    assert len(timing.samples_frame()) == timing.rows[0]["repetitions"]
    assert timing.summary()[0].startswith("builtin@cpu: 1 rows")
    with pytest.raises(bnbench.UsageError, match="Implementation objects"):
        bnbench.bench(implementation(PlainBatchNorm), sweep="smoke", output=tmp_path / "c")  # type: ignore[arg-type]
    with pytest.raises(bnbench.UsageError, match="expected one of"):
        bnbench.bench("builtin", sweep="huge", output=tmp_path / "d")


def test_a_missing_extra_says_which_pip_install_fixes_it(monkeypatch, tmp_path):
    monkeypatch.setitem(api.EXTRAS, "report", ("no_such_module_for_bnbench",))
    result = in_process("report", str(tmp_path), "--output", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "pip install 'bnbench[report]'" in result.stderr
    assert "no_such_module_for_bnbench" in result.stderr
    monkeypatch.setitem(api.EXTRAS, "models", ("no_such_module_for_bnbench",))
    with pytest.raises(bnbench.UsageError, match=r"bnbench\[models\]"):
        bnbench.bench("builtin", sweep="smoke", output=tmp_path / "b")


def test_progress_without_a_terminal_logs_counts_and_an_eta():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with _Progress(console, "verify") as bar:
        bar.LOG_EVERY_S = 0.0
        bar.start(4)
        bar.advance("builtin default-rank2")
        bar.advance("builtin default-rank3")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("verify: 2/4 in ") and "s left (builtin default-rank3)" in lines[1]


def _result(impl, case, check, verdict, message=""):
    return gate.Result(impl, "cpu", case, check, "numerics", 2, "", verdict, message, 0.0)


def test_matrix_counts_failed_ranks_and_verbose_details_say_why_not_supported():
    results = [
        _result("mine", "default-rank2", "default", Verdict.FAIL, "output: off"),
        _result("mine", "default-rank4", "default", Verdict.PASS),
        _result("mine", "float16-rank2", "float16", Verdict.NOT_SUPPORTED, "float16 not supported"),
        _result("mine", "float16-rank4", "float16", Verdict.NOT_SUPPORTED, "float16 not supported"),
    ]
    out = io.StringIO()
    console = Console(file=out, width=200)
    print_matrix(console, results, verbose=False)
    print_details(console, results, verbose=True)
    text = out.getvalue()
    assert "FAIL 1/2" in text
    assert "cpu: float16 not supported (2 cases: float16-rank2, float16-rank4)" in text


def test_run_output_stays_out_of_git_status_and_the_samples_stay_tracked():
    def ignored(path: str) -> bool:
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        return done.returncode == 0

    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    assert ignored("reports/myhost-20261123-1200/report.html")
    assert ignored("bench-results/results.csv")
    assert not ignored("reports/cpu-2core-sample/report.html")
    assert not ignored("reports/evidence/h100-cuda/verify.json")


def test_bench_times_a_class_without_device_and_dtype_where_only_their_defaults_are_asked():
    import json

    class Collect:
        def __init__(self):
            self.results = {}

        def start(self, item):
            pass

        def done(self, item, result):
            self.results[item] = result

    rows = [
        engine.Row((8, 4), "float32", "contiguous", "forward_eval"),
        engine.Row((8, 4), "float64", "contiguous", "forward_eval"),
    ]
    channel = Collect()
    engine.bench_worker(
        "catalogue:NoDeviceDtypeArguments",
        "cpu",
        1,
        json.dumps([r.to_dict() for r in rows]),
        json.dumps({"budget_s": 0.05, "warmup_s": 0.01}),
        False,
        items=["0", "1"],
        channel=channel,
    )
    assert channel.results["0"]["status"] == "ok"
    assert channel.results["1"]["status"] == "error"
    assert "dtype" in channel.results["1"]["message"]
