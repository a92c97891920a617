"""`bnbench verify` as a CI gate: exit codes, messages, JSON/JUnit, and isolation from
implementations that hang, crash or return NaN."""

import json
import textwrap
import xml.etree.ElementTree as ET

import pytest
import torch

from helpers import bnbench


def test_passing_run_exits_0_and_writes_json_and_junit(tmp_path):
    result = bnbench(
        "verify",
        "--impl",
        "builtin",
        "--impl",
        "catalogue:PlainBatchNorm",
        "--device",
        "cpu",
        "--case",
        "default",
        "--case",
        "wrong_rank",
        "--json",
        str(tmp_path / "r.json"),
        "--junit",
        str(tmp_path / "r.xml"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 0 unexpected" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is True and report["schema"] == "bnbench.verify/1"
    assert report["environment"]["torch"] == torch.__version__
    verdicts = {(r["implementation"], r["case"]): r["verdict"] for r in report["results"]}
    assert verdicts[("builtin", "default-rank4")] == "pass"
    # A plain class takes every rank: the rank-specific error check does not apply to it.
    assert verdicts[("catalogue:PlainBatchNorm", "wrong_rank-rank4")] == "not-supported"
    suites = ET.parse(tmp_path / "r.xml").getroot()
    # one testsuite per implementation@device and category
    assert {s.get("name") for s in suites} == {
        "builtin@cpu: numerics",
        "builtin@cpu: errors",
        "catalogue:PlainBatchNorm@cpu: numerics",
        "catalogue:PlainBatchNorm@cpu: errors",
    }
    assert {r["category"] for r in report["results"]} == {"numerics", "errors"}
    assert all(s.get("failures") == "0" for s in suites)


def test_broken_implementation_exits_1_with_a_readable_report(tmp_path):
    (tmp_path / "mybn.py").write_text(
        textwrap.dedent("""
        from catalogue import BiasedRunningVar, implementation
        biased = implementation(BiasedRunningVar)
    """)
    )
    result = bnbench(
        "verify",
        "--impl",
        "mybn:biased",
        "--case",
        "default-rank4",
        "--junit",
        str(tmp_path / "r.xml"),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL mybn:biased@cpu default-rank4" in result.stdout
    assert "running_var" in result.stdout and "max abs diff" in result.stdout
    failure = ET.parse(tmp_path / "r.xml").getroot().find(".//failure")
    assert failure is not None and "running_var" in failure.text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--impl", "nosuch"], "unknown implementation 'nosuch'"),
        (["--impl", "no_such_module:X"], "cannot import module 'no_such_module'"),
        (["--impl", "catalogue:NoSuchClass"], "has no attribute 'NoSuchClass'"),
        (["--impl", "catalogue:BROKEN"], "not a bnbench.Implementation or an nn.Module class"),
        (["--device", "tpu"], "Invalid value for '--device'"),
        (["--case", "no-such-case"], "no case matches"),
    ],
)
def test_usage_errors_exit_2_and_say_what_was_wrong(args, message):
    result = bnbench("verify", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_a_usage_error():
    result = bnbench("verify", "--device", "cuda")
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr


MISBEHAVING = textwrap.dedent("""
    import os, time
    from catalogue import PlainBatchNorm

    class Hangs(PlainBatchNorm):
        def forward(self, x):
            if self.momentum is None:
                while True:
                    time.sleep(1)
            return super().forward(x)

    class Crashes(PlainBatchNorm):
        def forward(self, x):
            if x.dtype == __import__("torch").float64:
                os._exit(7)
            return super().forward(x)

    class NaNs(PlainBatchNorm):
        def forward(self, x):
            return super().forward(x) * float("nan")
""")


def test_hang_crash_and_nan_fail_their_cases_without_stopping_the_run(tmp_path):
    (tmp_path / "misbehaving.py").write_text(MISBEHAVING)
    result = bnbench(
        "verify",
        "--impl",
        "misbehaving:Hangs",
        "--impl",
        "misbehaving:Crashes",
        "--impl",
        "misbehaving:NaNs",
        "--impl",
        "builtin",
        "--case",
        "momentum_none-rank2",
        "--case",
        "float64-rank2",
        "--case",
        "default-rank2",
        "--timeout",
        "5",
        "--json",
        str(tmp_path / "r.json"),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    results = {
        (r["implementation"], r["case"]): r
        for r in json.loads((tmp_path / "r.json").read_text())["results"]
    }
    hung = results[("misbehaving:Hangs", "momentum_none-rank2")]
    assert hung["verdict"] == "fail" and "hung" in hung["message"]
    crashed = results[("misbehaving:Crashes", "float64-rank2")]
    assert crashed["verdict"] == "fail" and "exit code 7" in crashed["message"]
    nan = results[("misbehaving:NaNs", "default-rank2")]
    assert nan["verdict"] == "fail" and "non-finite" in nan["message"]
    # Everything else still ran: the worker was restarted after the hang and the crash.
    for impl in ("misbehaving:Hangs", "misbehaving:Crashes", "builtin"):
        assert results[(impl, "default-rank2")]["verdict"] == "pass", impl
    assert results[("builtin", "momentum_none-rank2")]["verdict"] == "pass"
    assert results[("builtin", "float64-rank2")]["verdict"] == "pass"


def test_list_shows_registered_implementations_and_cases():
    result = bnbench("list")
    assert result.returncode == 0
    for name in ("builtin", "vectorized", "compiled", "d2l"):
        assert name in result.stdout
    assert "momentum_none" in result.stdout
