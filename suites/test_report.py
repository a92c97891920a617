"""Reports, the regression gate (`bnbench compare`) and the main job (`bnbench run`)."""

import json
import math
import os

import numpy as np
import pytest

from bnbench.results import COLUMNS, to_csv, write_atomic

from helpers import bnbench, in_process

MODES = ["forward_train", "forward_eval", "backward", "forward_backward"]


def make_results(
    directory, slowdown=None, drift_seed=None, per_case=None, samples=True, verify=True
):
    """A synthetic bnbench results directory: builtin, vectorized and compiled over batch
    sizes; ``slowdown`` multiplies one implementation's times; ``drift_seed`` gives every case
    the between-run drift measured on this machine (log-uniform, 0.6x to 1.6x)."""
    rng = np.random.default_rng(1 if drift_seed is None else drift_seed)
    drift = np.random.default_rng(drift_seed) if drift_seed is not None else None
    rows, sample_rows = [], []
    for impl, base in (("builtin", 1.0), ("vectorized", 2.0), ("compiled", 1.5)):
        for mode_index, mode in enumerate(MODES):
            for batch in (1, 8, 32, 64):
                shape = f"{batch}x64x28x28"
                median = base * (1 + mode_index) * batch * 1e-4 + 5e-5
                if slowdown and impl == slowdown[0]:
                    median *= slowdown[1]
                if per_case and (impl, mode, batch) == per_case[0]:
                    median *= per_case[1]
                if drift is not None:
                    median *= math.exp(drift.uniform(math.log(0.6), math.log(1.6)))
                draws = median * np.exp(rng.normal(0, 0.03, 15))
                rows.append(
                    {
                        "implementation": impl,
                        "device": "cpu",
                        "dtype": "float32",
                        "mode": mode,
                        "batch_size": batch,
                        "channels": 64,
                        "spatial": "28x28",
                        "rank": 4,
                        "shape": shape,
                        "memory_format": "contiguous",
                        "status": "ok",
                        "verified": "pass",
                        "median_s": float(np.median(draws)),
                        "p20_s": float(np.quantile(draws, 0.2)),
                        "p80_s": float(np.quantile(draws, 0.8)),
                        "iqr_s": 0.0,
                        "repetitions": 15,
                        "bytes": 2 * batch * 64 * 28 * 28 * 4,
                        "gbps": 1.0,
                        "copy_gbps": 20.0,
                        "floor_s": median / 5,
                        "ratio_to_floor": 5.0,
                        "clone_s": median / 3,
                        "ratio_to_clone": 3.0,
                        "cache_effect": False,
                        "threads": 2,
                        "compile_s": 2.0 if impl == "compiled" else 0.0,
                        "graphs_compiled": 1 if impl == "compiled" and batch == 1 else 0,
                        "first_call_s": 2.0,
                    }
                )
                sample_rows += [{"row": len(rows) - 1, "seconds": s} for s in draws]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.csv").write_text(to_csv(rows, COLUMNS))
    if samples:
        (directory / "samples.csv").write_text(to_csv(sample_rows, ["row", "seconds"]))
    (directory / "environment.json").write_text(
        json.dumps({"schema": "bnbench.bench/1", "host": "test", "torch": "x", "complete": True})
    )
    if verify:
        (directory / "verify.json").write_text(
            json.dumps(
                {
                    "schema": "bnbench.verify/1",
                    "results": [
                        {
                            "implementation": "builtin",
                            "device": "cpu",
                            "case": "default-rank4",
                            "check": "default",
                            "verdict": "pass",
                        },
                        {
                            "implementation": "d2l",
                            "device": "cpu",
                            "case": "default-rank4",
                            "check": "default",
                            "verdict": "deviation",
                        },
                    ],
                }
            )
        )
    return directory


def test_report_writes_markdown_self_contained_html_and_plots(tmp_path):
    a = make_results(tmp_path / "machine-a")
    b = make_results(tmp_path / "machine-b", slowdown=("vectorized", 0.5))
    result = in_process("report", str(a), str(b), "--output", str(tmp_path / "r"))
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "r" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5
    assert "http://" not in page and "https://" not in page  # opens from disk, no network
    md = (tmp_path / "r" / "report.md").read_text()
    for heading in (
        "Fastest implementation per case",
        "Correctness (bnbench verify)",
        "Environment",
        "Speed relative to builtin",
    ):
        assert heading in md and heading in page
    assert "machine-a" in md and "machine-b" in md
    plots = sorted(os.listdir(tmp_path / "r" / "plots"))
    for kind in ("-time.png", "-speedup.png", "-floor.png"):
        assert sum(p.endswith(kind) for p in plots) == 2, plots  # one per source
    assert "forward-backward-split.png" in plots and "compile-cost.png" in plots
    assert not [p for p in os.listdir(tmp_path / "r") if p.endswith(".tmp")]


def test_report_reads_pytest_benchmark_json(tmp_path):
    data = {
        "machine_info": {"bnbench": {"host": "h"}},
        "datetime": "now",
        "benchmarks": [
            {
                "name": f"test_bench[{impl}-{batch}]",
                "stats": {
                    "median": t * batch,
                    "q1": t * batch * 0.9,
                    "q3": t * batch * 1.1,
                    "iqr": 0.1,
                    "rounds": 30,
                    "data": [t * batch] * 5,
                },
                "extra_info": {
                    "implementation": impl,
                    "device": "cpu",
                    "mode": "forward_eval",
                    "shape": f"{batch}x64x28x28",
                    "dtype": "float32",
                    "bytes": 100,
                },
            }
            for impl, t in (("builtin", 1e-4), ("vectorized", 2e-4))
            for batch in (8, 64)
        ],
    }
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(data))
    result = in_process("report", str(path), "--output", str(tmp_path / "r"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vectorized" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "results.csv").unlink(), "results.csv: missing"),
        (lambda d: (d / "results.csv").write_text("a,b\n1,2\n"), "missing columns implementation"),
        (lambda d: (d / "environment.json").write_text("{not json"), "not valid JSON"),
        (
            lambda d: (d / "environment.json").write_text('{"schema": "other/9"}'),
            "schema 'other/9', expected 'bnbench.bench/1'",
        ),
        (lambda d: (d / "verify.json").write_text('{"schema": "nope"}'), "verify.json: schema"),
    ],
)
def test_unusable_input_gets_a_clear_error_naming_the_file(tmp_path, damage, message):
    d = make_results(tmp_path / "broken")
    damage(d)
    for args in (
        ["report", str(d), "--output", str(tmp_path / "r")],
        ["compare", str(make_results(tmp_path / "ok")), str(d)],
    ):
        result = in_process(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in result.stderr and "broken" in result.stderr


def test_interrupted_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    write_atomic(target, "complete old report\n")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "half of a new rep")
    assert target.read_text() == "complete old report\n"


def test_compare_identical_code_with_this_machines_drift_is_not_flagged(tmp_path):
    base = make_results(tmp_path / "a", drift_seed=11)
    for seed in (12, 13, 14, 15):
        new = make_results(tmp_path / f"b{seed}", drift_seed=seed)
        result = in_process("compare", str(base), str(new))
        assert result.returncode == 0, result.stdout
        assert "no regression" in result.stdout


def test_compare_flags_a_2x_slowdown(tmp_path):
    base = make_results(tmp_path / "a", drift_seed=11)
    new = make_results(tmp_path / "b", drift_seed=12, slowdown=("vectorized", 2.0))
    result = in_process("compare", str(base), str(new))
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    row = next(text for text in lines if "vectorized" in text and "cpu" in text)
    assert "regression" in row
    assert not any("regression" in text for text in lines if "builtin" in text and "│" in text)


def test_per_case_gate_and_threshold(tmp_path):
    base = make_results(tmp_path / "a")
    new = make_results(tmp_path / "b", per_case=(("builtin", "backward", 64), 3.0))
    assert in_process("compare", str(base), str(new)).returncode == 0  # one case in 16
    assert in_process("compare", str(base), str(new), "--per-case").returncode == 1
    assert (
        in_process("compare", str(base), str(new), "--per-case", "--threshold", "250").returncode
        == 0
    )


def test_compare_without_samples_uses_the_spreads(tmp_path):
    base = make_results(tmp_path / "a", samples=False)
    new = make_results(tmp_path / "b", samples=False, slowdown=("compiled", 2.0))
    result = in_process("compare", str(base), str(new))
    assert result.returncode == 1 and "p20/p80" in result.stdout


def test_compare_with_nothing_in_common_is_unusable_input(tmp_path):
    base = make_results(tmp_path / "a")
    other = tmp_path / "b"
    make_results(other)
    text = (other / "results.csv").read_text().replace("x64x28x28", "x32x28x28")
    (other / "results.csv").write_text(text)
    result = in_process("compare", str(base), str(other))
    assert result.returncode == 2 and "no measured row matches" in result.stderr


def test_run_verifies_benchmarks_and_reports_into_reports_name(tmp_path):
    result = bnbench(
        "run",
        "--impl",
        "builtin",
        "--device",
        "cpu",
        "--sweep",
        "smoke",
        "--name",
        "t",
        "--reports-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "t"
    for name in (
        "verify.json",
        "verify.xml",
        "results.csv",
        "samples.csv",
        "environment.json",
        "report.md",
        "report.html",
    ):
        assert (out / name).is_file(), name
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    text = (out / "report.md").read_text()
    assert "Correctness (bnbench verify)" in text
    assert "BatchNorm against no BatchNorm on digits" in text and (out / "study.csv").is_file()
