"""`bnbench bench`: the tidy table and environment on disk, and rows that cost only themselves
when an implementation raises, hangs, crashes or returns NaN."""

import csv
import json
import textwrap

from bnbench.benchmark import SMOKE
from bnbench.results import COLUMNS, parse_row

from helpers import bnbench

MISBEHAVING = textwrap.dedent("""
    import os, time
    import torch
    from catalogue import PlainBatchNorm

    class Flaky(PlainBatchNorm):
        def forward(self, x):
            if x.dim() == 2:
                os._exit(3)                      # the 1d row kills the worker
            if not self.training:
                while True:                      # eval hangs
                    time.sleep(1)
            if not torch.is_grad_enabled():
                raise RuntimeError("boom")
            return super().forward(x) * float("nan")
""")


def read(path):
    with open(path) as f:
        return [parse_row(r) for r in csv.DictReader(f)]


def test_bench_writes_results_samples_and_environment(tmp_path):
    out = tmp_path / "b"
    result = bnbench("bench", "--impl", "builtin", "--impl", "d2l", "--smoke", "--output", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read(out / "results.csv")
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 2 * len(SMOKE.rows())
    builtin = [r for r in rows if r["implementation"] == "builtin"]
    assert all(r["status"] == "ok" and r["verified"] == "pass" for r in builtin)
    for r in builtin:
        assert r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["threads"] >= 1 and r["repetitions"] >= 7
        if r["model"]:  # a whole training step: no bandwidth floor applies
            assert r["mode"] == "train_step" and r["bytes"] == 0 and r["gbps"] is None
        else:
            assert r["gbps"] > 0 and r["ratio_to_floor"] > 0 and r["copy_gbps"] > 0
            assert r["bytes"] > 0
    # A row vouched for by a case where d2l declares a deviation says so.
    d2l = {r["shape"]: r for r in rows if r["implementation"] == "d2l"}
    assert d2l["16x32"]["verified"] == "deviation"
    samples = list(csv.DictReader(open(out / "samples.csv")))
    assert {int(s["row"]) for s in samples} >= {0, 1, 2, 3}
    env = json.loads((out / "environment.json").read_text())
    assert env["complete"] is True and env["threads"] >= 1 and env["torch"]
    assert env["processor"] and env["processor"] not in ("x86_64", "aarch64")  # a model name


def test_misbehaving_rows_are_recorded_and_the_sweep_goes_on(tmp_path):
    (tmp_path / "flaky.py").write_text(MISBEHAVING)
    out = tmp_path / "b"
    result = bnbench(
        "bench",
        "--impl",
        "flaky:Flaky",
        "--impl",
        "builtin",
        "--smoke",
        "--output",
        str(out),
        "--timeout",
        "6",
        "--no-verify",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {(r["implementation"], r["mode"], r["shape"]): r for r in read(out / "results.csv")}
    flaky = "flaky:Flaky"
    assert rows[(flaky, "forward_train", "8x16x8x8")]["status"] == "nan"
    assert rows[(flaky, "forward_eval", "8x16x8x8")]["status"] == "hung"
    assert rows[(flaky, "forward_eval", "16x32")]["status"] == "crashed"
    assert "exit code 3" in rows[(flaky, "forward_eval", "16x32")]["message"]
    assert all(r["status"] == "ok" for k, r in rows.items() if k[0] == "builtin")
    assert all(r["verified"] == "not-run" for r in rows.values())


def test_ctrl_c_keeps_the_finished_rows(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "b"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bnbench.cli",
            "bench",
            "--impl",
            "builtin",
            "--output",
            str(out),
            "--no-verify",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "results.csv").is_file() and len(read(out / "results.csv")) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    rows = read(out / "results.csv")
    assert len(rows) >= 3 and all(r["status"] == "ok" for r in rows)
    env_json = json.loads((out / "environment.json").read_text())
    assert env_json["complete"] is False and env_json["rows"] == len(rows)


FORWARD_ONLY = textwrap.dedent("""
    from catalogue import PlainBatchNorm, implementation

    impl = implementation(PlainBatchNorm, supports_backward=False)
""")


def test_forward_only_implementation_gets_forward_rows_and_backward_rows_not_supported(tmp_path):
    (tmp_path / "fwdonly.py").write_text(FORWARD_ONLY)
    out = tmp_path / "b"
    result = bnbench(
        "bench",
        "--impl",
        "fwdonly:impl",
        "--smoke",
        "--output",
        str(out),
        cwd=tmp_path,
        pythonpath=[tmp_path],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    by_mode = {}
    for r in read(out / "results.csv"):
        by_mode.setdefault(r["mode"], []).append(r)
    for mode in ("forward_train", "forward_eval"):
        assert by_mode[mode] and all(r["status"] == "ok" for r in by_mode[mode]), mode
        # vouched for by the same gate case run forward only
        assert all(r["verified"] == "pass" for r in by_mode[mode]), by_mode[mode]
    for mode in ("backward", "forward_backward", "train_step"):
        assert by_mode[mode], mode
        for r in by_mode[mode]:
            assert r["status"] == "not-supported" and "backward not supported" in r["message"]
