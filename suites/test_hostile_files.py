"""`bnbench report` and `bnbench compare` on hostile, corrupt and stale input files.

Every test builds a small valid bench directory in tmp_path, breaks one thing, and checks the
answer: exit 2 with a message naming the file, the row and the field, or a report that shows
the hostile text as text (escaped HTML and Markdown, sanitized plot file names, no mathtext),
or a regression gate that does not call a crash "no regression".
"""

from __future__ import annotations

import html
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bnbench import regression, report, runs
from bnbench.results import COLUMNS, SAMPLE_COLUMNS, to_csv

from helpers import in_process

IMPLS = ("builtin", "vectorized")
MODES = ("forward_train", "backward")
BATCHES = (8, 32, 64)


def base_rows(impls=IMPLS, modes=MODES, slowdown=None, device="cpu", floor=True) -> list[dict]:
    """Valid results.csv rows: every implementation x mode x batch size, each a measurement;
    ``slowdown`` = (implementation, factor) multiplies one implementation's times; ``floor``
    gives them a ratio to the bandwidth floor (a third plot per family)."""
    rows = []
    for i, impl in enumerate(impls):
        for j, mode in enumerate(modes):
            for batch in BATCHES:
                median = (1 + i) * (1 + j) * batch * 1e-5
                if slowdown and impl == slowdown[0]:
                    median *= slowdown[1]
                rows.append(
                    {
                        "implementation": impl,
                        "device": device,
                        "dtype": "float32",
                        "mode": mode,
                        "batch_size": batch,
                        "channels": 16,
                        "spatial": "8x8",
                        "rank": 4,
                        "shape": f"{batch}x16x8x8",
                        "memory_format": "contiguous",
                        "status": "ok",
                        "verified": "pass",
                        "median_s": median,
                        "p20_s": median * 0.95,
                        "p80_s": median * 1.05,
                        "repetitions": 5,
                        "ratio_to_floor": 3.0 if floor else None,
                        "threads": 2,
                        "model": "",
                        "message": "",
                    }
                )
    return rows


def write_dir(path: Path, rows: list[dict], samples: bool = True, env=None, verify=True) -> Path:
    """A bench directory written the way bnbench writes one (results.to_csv)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.csv").write_text(to_csv(rows, COLUMNS))
    if samples:
        sample_rows = []
        for index, row in enumerate(rows):
            if row["status"] in ("ok", "recompiled") and isinstance(row["median_s"], float):
                for k, factor in enumerate((0.97, 0.99, 1.0, 1.01, 1.03)):
                    sample_rows.append(
                        {
                            "row": index,
                            **{c: row[c] for c in SAMPLE_COLUMNS[1:6]},
                            "sample": k,
                            "seconds": row["median_s"] * factor,
                        }
                    )
        (path / "samples.csv").write_text(to_csv(sample_rows, SAMPLE_COLUMNS))
    environment = {"schema": "bnbench.bench/1", "host": "test", "complete": True}
    (path / "environment.json").write_text(json.dumps(environment if env is None else env))
    if verify:
        (path / "verify.json").write_text(json.dumps(verify_document()))
    return path


def verify_document(**extra) -> dict:
    return {
        "schema": "bnbench.verify/1",
        "results": [
            {
                "implementation": impl,
                "device": "cpu",
                "case": "default-rank4",
                "check": "default",
                "verdict": "pass",
            }
            for impl in IMPLS
        ],
        **extra,
    }


# Tests about plots draw few: one mode, no floor (a plot takes about half a second here).
FEW_PLOTS = dict(modes=("forward_eval",), floor=False)


@pytest.fixture
def no_plots(monkeypatch):
    """For tests about tables and notes: the plots are not drawn (they take seconds)."""
    monkeypatch.setattr(report, "make_plots", lambda *args, **kwargs: iter(()))


def usage_error(*args: str) -> str:
    """Runs the CLI, checks it exits 2 (a usage error, not a traceback), returns stderr."""
    result = in_process(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    return " ".join(result.stderr.split())  # click wraps long messages


def both_commands_refuse(tmp_path: Path, broken: Path) -> list[str]:
    """``report BROKEN`` and ``compare GOOD BROKEN`` both exit 2; their messages."""
    good = write_dir(tmp_path / "good", base_rows())
    return [
        usage_error("report", str(broken), "--output", str(tmp_path / "out")),
        usage_error("compare", str(good), str(broken)),
    ]


# ---------------------------------------------------------------------------------------------
# 1. compare: NEW medians that are not measurements, lost rows


@pytest.mark.parametrize("median", ["", "nan", "inf", "0", "-1e-3", "abc"])
def test_compare_refuses_a_measured_row_whose_median_is_not_a_time(tmp_path, median):
    # NEW: vectorized 10x slower, and one row's median broken: used to exit 0 "no regression"
    rows = base_rows(slowdown=("vectorized", 10.0))
    rows[7]["median_s"] = median
    new = write_dir(tmp_path / "new", rows, samples=False)
    message = usage_error("compare", str(write_dir(tmp_path / "base", base_rows())), str(new))
    assert f"{new / 'results.csv'}: row 8 (line 9), median_s" in message


@pytest.mark.parametrize("column", ["p20_s", "p80_s"])
def test_compare_refuses_a_non_positive_spread(tmp_path, column):
    rows = base_rows()
    rows[2][column] = 0.0 if column == "p20_s" else -1.0
    new = write_dir(tmp_path / "new", rows)
    message = usage_error("compare", str(write_dir(tmp_path / "base", base_rows())), str(new))
    assert f"results.csv: row 3 (line 4), {column}" in message and "not positive" in message


def test_a_row_that_crashes_in_new_is_a_regression(tmp_path):
    base = write_dir(tmp_path / "base", base_rows())
    rows = base_rows()
    rows[4].update(status="crashed", median_s=None, message="worker died (signal 11)")
    del rows[10]  # and one row missing altogether
    new = write_dir(tmp_path / "new", rows)
    result = in_process("compare", str(base), str(new))
    assert result.returncode == 1, result.stdout
    out = result.stdout
    assert "lost: measured in BASELINE, not in NEW: crashed: builtin@cpu backward 32x16x8x8" in out
    assert "worker died (signal 11)" in out
    assert "lost: measured in BASELINE, not in NEW: missing: vectorized@cpu backward 32x16" in out
    assert "no regression" not in out and "REGRESSION" in out


def test_rows_only_in_new_are_listed_and_do_not_fail(tmp_path):
    base = write_dir(tmp_path / "base", base_rows())
    new = write_dir(tmp_path / "new", base_rows(impls=(*IMPLS, "fresh")))
    result = in_process("compare", str(base), str(new))
    assert result.returncode == 0, result.stdout
    assert "new: measured in NEW only (BASELINE: missing): fresh@cpu" in result.stdout


def test_cases_without_an_interval_are_never_same(tmp_path):
    rows = [dict(r, p20_s=None, p80_s=None) for r in base_rows()]
    base = write_dir(tmp_path / "base", rows, samples=False)
    new = write_dir(tmp_path / "new", rows, samples=False)
    cases = regression.compare(base, new, 25).cases
    assert set(cases["verdict"]) == {"no interval"} and set(cases["method"]) == {"none"}


def test_compare_output_shows_markup_in_names_as_text(tmp_path):
    rows = base_rows(impls=("builtin", "[red]x[/red]"))
    base = write_dir(tmp_path / "base", rows)
    new = write_dir(
        tmp_path / "new", base_rows(impls=("builtin", "[red]x[/red]"), slowdown=("[red]x[/red]", 3))
    )
    result = in_process("compare", str(base), str(new))
    assert result.returncode == 1
    row = [line for line in result.stdout.splitlines() if "│" in line and "regression" in line]
    assert len(row) == 1 and "[red]x[/red]" in row[0]  # in the table, not read as markup


def test_compare_output_shows_terminal_escapes_in_messages_as_text(tmp_path):
    base = write_dir(tmp_path / "base", base_rows())
    rows = base_rows()
    rows[0].update(status="error", median_s=None, message="\x1b[2J\nREGRESSION? no: all fine")
    result = in_process("compare", str(base), str(write_dir(tmp_path / "new", rows)))
    assert result.returncode == 1 and "\x1b" not in result.stdout
    assert "error: builtin@cpu forward_train 8x16x8x8 float32 contiguous: \\x1b[2J\\nREG" in (
        result.stdout
    )


# ---------------------------------------------------------------------------------------------
# 2. every input checked against its schema


def test_environment_json_that_is_a_list(tmp_path):
    d = write_dir(tmp_path / "d", base_rows())
    (d / "environment.json").write_text("[1, 2]")
    for message in both_commands_refuse(tmp_path, d):
        assert f"{d / 'environment.json'}: the document is not a JSON object (a list)" in message


def test_environment_json_that_is_a_directory(tmp_path):
    d = write_dir(tmp_path / "d", base_rows())
    (d / "environment.json").unlink()
    (d / "environment.json").mkdir()
    for message in both_commands_refuse(tmp_path, d):
        assert "environment.json: not a regular file (a directory)" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["environment.json", "results.csv", "samples.csv", "verify.json"])
def test_a_fifo_is_refused_without_being_opened(tmp_path, name):
    d = write_dir(tmp_path / "d", base_rows())
    (d / name).unlink()
    os.mkfifo(d / name)
    outcome: list = []

    def load():
        try:
            runs.load(d)
        except runs.ReportInputError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), f"loading a directory with a FIFO {name} hangs"
    assert outcome == [f"{d / name}: not a regular file (a FIFO)"]


@pytest.mark.parametrize(
    "document, message",
    [
        ({"schema": "bnbench.verify/1"}, "verify.json: results: Field required"),
        ({"schema": "bnbench.verify/1", "results": {}}, "results: Input should be a valid list"),
        (
            verify_document() | {"results": [{"implementation": "builtin", "device": "cpu"}]},
            "verify.json: results[0].case: Field required",
        ),
        (
            verify_document()
            | {
                "results": [
                    {
                        "implementation": "builtin",
                        "device": "cpu",
                        "case": "c",
                        "check": "default",
                        "verdict": "great",
                    }
                ]
            },
            "verify.json: results[0].verdict: Input should be 'pass', 'fail'",
        ),
        (
            verify_document()
            | {
                "results": [
                    {
                        "implementation": 3,
                        "device": "cpu",
                        "case": "c",
                        "check": "default",
                        "verdict": "pass",
                    }
                ]
            },
            "results[0].implementation: Input should be a valid string",
        ),
        ("not an object", "verify.json: the document is not a JSON object (a string)"),
    ],
)
def test_malformed_verify_json(tmp_path, document, message):
    d = write_dir(tmp_path / "d", base_rows())
    (d / "verify.json").write_text(json.dumps(document))
    assert message in usage_error("report", str(d), "--output", str(tmp_path / "out"))


STUDY = {
    "schema": "bnbench.study/1",
    "study": {"target": 0.9},
    "summary": [{"model": "mlp_bn", "batchnorm": True, "seeds": 2}],
    "conclusion": ["mlp_bn: BatchNorm helps."],
}
CURVE = "model,batchnorm,seed,step,test_accuracy\nmlp_bn,True,0,10,0.5\nmlp_bn,False,0,10,0.4\n"


@pytest.mark.parametrize(
    "stem, document, curve, message",
    [
        ("study", STUDY | {"study": {}}, CURVE, "study.json: study.target: Field required"),
        (
            "study",
            STUDY | {"conclusion": "text"},
            CURVE,
            "conclusion: Input should be a valid list",
        ),
        (
            "claim",
            STUDY | {"schema": "bnbench.claim/1", "summary": 3},
            CURVE,
            "claim.json: summary",
        ),
        ("study", STUDY, CURVE.replace(",10,0.4", ",ten,0.4"), "row 2 (line 3), step: 'ten'"),
        ("study", STUDY, CURVE.replace("False", "maybe"), "row 2 (line 3), batchnorm: 'maybe'"),
        ("study", STUDY, CURVE.replace("0.4", "7"), "row 2 (line 3), test_accuracy: 7.0 is not in"),
    ],
)
def test_malformed_study_files(tmp_path, stem, document, curve, message):
    d = write_dir(tmp_path / "d", base_rows())
    (d / f"{stem}.json").write_text(json.dumps(document))
    (d / f"{stem}.csv").write_text(curve)
    assert message in usage_error("report", str(d), "--output", str(tmp_path / "out"))


def test_a_valid_study_is_reported(tmp_path, no_plots):
    d = write_dir(tmp_path / "d", base_rows())
    (d / "study.json").write_text(json.dumps(STUDY))
    (d / "study.csv").write_text(CURVE)
    assert in_process("report", str(d), "--output", str(tmp_path / "out")).returncode == 0
    assert "mlp_bn: BatchNorm helps." in (tmp_path / "out" / "report.md").read_text()


def pytest_benchmark(**stats) -> dict:
    return {
        "machine_info": {"node": "h"},
        "benchmarks": [
            {"name": "not ours", "stats": "anything", "extra_info": {}},
            {
                "name": "test_bench[builtin]",
                "stats": {"median": 1e-3, "q1": 9e-4, "q3": 2e-3, "data": [1e-3] * 4} | stats,
                "extra_info": {
                    "implementation": "builtin",
                    "shape": "8x16x8x8",
                    "mode": "forward_eval",
                },
            },
        ],
    }


@pytest.mark.parametrize(
    "document, message",
    [
        (
            pytest_benchmark(median="abc"),
            "benchmarks[1].stats.median: Input should be a valid number",
        ),
        (pytest_benchmark(median=0), "benchmarks[1].stats.median: Input should be greater than 0"),
        (pytest_benchmark(data=[1e-3, None]), "benchmarks[1].stats.data[1]"),
        (
            pytest_benchmark() | {"benchmarks": {"a": 1}},
            "benchmarks: Input should be a valid list",
        ),
        (
            {
                "machine_info": {},
                "benchmarks": [{"extra_info": {"implementation": "x", "shape": "8"}}],
            },
            "benchmarks[0].name: Field required",
        ),
        ([1, 2], "not pytest-benchmark JSON"),
    ],
)
def test_malformed_pytest_benchmark_json(tmp_path, document, message):
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(document))
    assert message in usage_error("report", str(path), "--output", str(tmp_path / "out"))


def test_nan_median_in_pytest_benchmark_json(tmp_path):
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(pytest_benchmark(median=float("nan"))))  # json writes NaN
    message = usage_error("report", str(path), "--output", str(tmp_path / "out"))
    assert "benchmarks[1].stats.median: Input should be a finite number" in message


def corrupt_csv(d: Path, name: str, edit) -> None:
    path = d / name
    path.write_bytes(edit(path.read_bytes()))


@pytest.mark.parametrize(
    "edit, message",
    [
        # a truncated last row (a run killed mid-write, an editor)
        (
            lambda b: b.rstrip(b"\n").rsplit(b",", 3)[0] + b"\n",
            f"row 12 (line 13): {len(COLUMNS) - 3} fields, the header has {len(COLUMNS)} "
            "(a truncated row?)",
        ),
        (lambda b: b.replace(b"ok,pass", b"ok,pa\0ss", 1), "line 2: a NUL byte"),
        (lambda b: b.replace(b"\n", b"\n\xff", 1), "line 2: not UTF-8 text"),
        (
            lambda b: b.replace(
                b"\nbuiltin,cpu,float32,forward_train,8,",
                b"\nbuiltin,cpu,float32,forward_train,eight,",
                1,
            ),
            "row 1 (line 2), batch_size: 'eight' is not a number",
        ),
        (
            lambda b: b.replace(b",32,16,8x8", b",32.5,16,8x8", 1),
            "row 2 (line 3), batch_size: 32.5 is not an integer",
        ),
        (
            lambda b: b.replace(b",64,16,8x8", b",0,16,8x8", 1),
            "row 3 (line 4), batch_size: 0 is not positive",
        ),
        (
            lambda b: b.replace(b",ok,pass,", b",great,pass,", 1),
            "row 1 (line 2), status: 'great' is not a status",
        ),
        (
            lambda b: b.replace(b",ok,pass,", b",ok,maybe,", 1),
            "row 1 (line 2), verified: 'maybe' is not a verdict",
        ),
        (
            lambda b: b.replace(b",2,,", b",two,,", 1),
            "row 1 (line 2), threads: 'two' is not a number",
        ),
        (
            lambda b: b + b.split(b"\n")[3] + b"\n",
            "row 13 (line 14): the same row as row 3 (line 4)",
        ),
        (lambda b: b.replace(b",float32,", b",,", 1), "row 1 (line 2), dtype: '' is required"),
        (
            lambda b: b.replace(b"message\n", b"message,extra\n", 1),
            f"row 1 (line 2): {len(COLUMNS)} fields, the header has {len(COLUMNS) + 1}",
        ),
    ],
)
def test_corrupt_results_csv(tmp_path, edit, message):
    d = write_dir(tmp_path / "d", base_rows(), samples=False)
    corrupt_csv(d, "results.csv", edit)
    for text in both_commands_refuse(tmp_path, d):
        assert f"{d / 'results.csv'}: {message}" in text


def test_line_numbers_count_the_lines_of_quoted_multi_line_messages(tmp_path):
    rows = base_rows()
    rows[0].update(status="error", median_s=None, message='first line\nsecond, "quoted" line')
    rows[2]["median_s"] = "abc"
    d = write_dir(tmp_path / "d", rows, samples=False)
    message = usage_error("report", str(d), "--output", str(tmp_path / "out"))
    assert "results.csv: row 3 (line 5), median_s: 'abc' is not a number" in message


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda b: b.replace(b"\n0,", b"\n99,", 1),
            "row 1 (line 2), row: 99 points past the last row of results.csv (12 rows)",
        ),
        (
            lambda b: b.rstrip(b"\n").rsplit(b",", 1)[0] + b",fast\n",
            "row 60 (line 61), seconds: 'fast' is not a number",
        ),
        (
            lambda b: b.replace(b"\n0,builtin,", b"\n0,vectorized,", 1),
            "row 1 (line 2), implementation: 'vectorized' differs from the implementation of "
            "the results row",
        ),
        (lambda b: b.replace(b"\n0,", b"\n-1,", 1), "row 1 (line 2), row: -1 is negative"),
    ],
)
def test_corrupt_samples_csv(tmp_path, edit, message):
    d = write_dir(tmp_path / "d", base_rows())
    corrupt_csv(d, "samples.csv", edit)
    for text in both_commands_refuse(tmp_path, d):
        assert f"{d / 'samples.csv'}: {message}" in text


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    d = write_dir(tmp_path / "d", base_rows())
    corrupt_csv(d, "results.csv", lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n"))
    loaded = runs.load(d)
    assert list(loaded.rows.columns[:2]) == ["implementation", "device"]
    assert loaded.rows["message"].tolist() == [""] * 12  # no stray \r
    lines = (d / "results.csv").read_bytes().split(b"\r\n")
    lines[2] = lines[2].replace(b",ok,pass,", b",ok,maybe,")
    (d / "results.csv").write_bytes(b"\r\n".join(lines))
    with pytest.raises(runs.ReportInputError, match=r"row 2 \(line 3\), verified: 'maybe'"):
        runs.load(d)


def test_files_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    d = write_dir(tmp_path / "d", base_rows())
    monkeypatch.setattr(runs, "MAX_JSON_BYTES", 32)
    with pytest.raises(runs.ReportInputError, match="environment.json: .* bytes, more than the 32"):
        runs.load(d)
    monkeypatch.setattr(runs, "MAX_JSON_BYTES", 2**20)
    monkeypatch.setattr(runs, "MAX_CSV_BYTES", 100)
    with pytest.raises(runs.ReportInputError, match="results.csv: .* bytes, more than the 100"):
        runs.load(d)


def test_deeply_nested_json_is_an_input_error(tmp_path):
    d = write_dir(tmp_path / "d", base_rows())
    (d / "verify.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "verify.json: not valid JSON" in usage_error(
        "report", str(d), "--output", str(tmp_path / "out")
    )


# ---------------------------------------------------------------------------------------------
# 3-6. hostile text in the report: HTML, paths, Markdown tables, mathtext

SCRIPT = "<script>alert(1)</script>"
IMG = "\"'><img src=x onerror=alert(1)>"


def test_html_and_markdown_show_hostile_text_as_text(tmp_path):
    rows = base_rows(device=SCRIPT + IMG, **FEW_PLOTS)
    for r in rows:
        r["implementation"] = {"builtin": "builtin", "vectorized": IMG + "v"}[r["implementation"]]
    rows[0]["mode"] = rows[1]["mode"] = rows[2]["mode"] = SCRIPT
    rows[3]["model"] = IMG
    rows[4].update(shape=SCRIPT, status="error", median_s=None, message=SCRIPT)
    d = write_dir(tmp_path / IMG, rows, verify=False)  # the source directory's name too
    document = verify_document()
    document["results"][1].update(implementation=IMG + "v", device=SCRIPT, check=SCRIPT)
    (d / "verify.json").write_text(json.dumps(document))
    result = in_process("report", str(d), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    for raw in (SCRIPT, IMG, "<img src=x", "<script"):
        assert raw not in page and raw not in md
    assert html.escape(IMG) in page and "&lt;script&gt;" in md  # shown, escaped


@pytest.mark.parametrize(
    "device", ["/../../../../escape", "../../escape", ".hidden", "-rf", "x" * 300]
)
def test_plot_files_stay_inside_the_output_directory(tmp_path, device):
    d = write_dir(tmp_path / "in", base_rows(device=device, **FEW_PLOTS))
    out = tmp_path / "deep" / "out"
    result = in_process("report", str(d), "--output", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    written = {p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(d)}
    assert all(p.is_relative_to(out) for p in written), sorted(written)
    names = os.listdir(out / "plots")
    assert any(n.endswith("-time.png") for n in names)
    assert all((out / "plots" / n).is_file() for n in names)  # no directories made from data
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}", n) for n in names), names


def test_pipes_and_newlines_do_not_break_markdown_tables(tmp_path, no_plots):
    d = write_dir(tmp_path / "d", base_rows(device="a|b\nc"))
    assert in_process("report", str(d), "--output", str(tmp_path / "out")).returncode == 0
    md = (tmp_path / "out" / "report.md").read_text()
    tables: list[list[str]] = [[]]
    for line in md.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    tables = [t for t in tables if t]
    assert len(tables) >= 3
    for table in tables:
        assert len({line.count("|") for line in table}) == 1, table
    assert "a&#124;b c" in md


@pytest.mark.parametrize("name", ["$\\frac{$", "$x^$"])
def test_dollar_signs_in_labels_are_not_mathtext(tmp_path, name):
    d = write_dir(tmp_path / "d", base_rows(impls=("builtin", name), **FEW_PLOTS))
    result = in_process("report", str(d), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(p.endswith("-time.png") for p in os.listdir(tmp_path / "out" / "plots"))


def test_plot_labels_escape_dollars_and_keep_underscored_names_in_legends():
    assert report._label("$\\frac{$") == "\\$\\frac{\\$"
    assert report._label("_x") == " _x" and len(report._label("y" * 500)) == report.MAX_LABEL


# ---------------------------------------------------------------------------------------------
# 7. a calibration run (forward rows only)


def test_report_of_a_calibration_run_with_forward_rows_only(tmp_path):
    d = write_dir(tmp_path / "d", base_rows(modes=("forward_eval", "forward_train"), floor=False))
    result = in_process("report", str(d), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "forward-backward-split.png" not in os.listdir(tmp_path / "out" / "plots")
    frame = runs.combine([runs.load(d)])
    assert report._forward_backward_split(report._measured(frame)) is None


# ---------------------------------------------------------------------------------------------
# 8. rows that failed verification


def test_an_implementation_that_failed_verification_is_never_fastest(tmp_path, no_plots):
    rows = base_rows()
    identity = [dict(r, implementation="identity", median_s=r["median_s"] / 100) for r in rows[:6]]
    for r in identity:
        r.update(verified="fail", p20_s=r["median_s"] * 0.9, p80_s=r["median_s"] * 1.1)
    d = write_dir(tmp_path / "d", rows + identity)
    result = in_process("report", str(d), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    fastest = pd.read_csv(tmp_path / "out" / "fastest.csv")
    assert len(fastest) == 6 and "identity" not in set(fastest["fastest"])
    assert set(fastest["verified"]) == {"pass"}
    speed = pd.read_csv(tmp_path / "out" / "speedup.csv").set_index(["implementation", "mode"])
    assert np.isnan(speed.loc[("identity", "forward_train"), "time_vs_builtin"])
    assert speed.loc[("identity", "forward_train"), "failed_verification"] == 3
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Rows that failed verification" in md
    assert (tmp_path / "out" / "failed-verification.csv").is_file()


def test_a_baseline_that_failed_verification_is_no_reference():
    frame = pd.DataFrame(base_rows()).assign(source="s")
    frame.loc[frame["implementation"] == "builtin", "verified"] = "unexpected-pass"
    table = report.speedup_table(frame)
    assert table["time_vs_builtin"].isna().all()
    fastest = report.fastest_table(frame)
    assert set(fastest["fastest"]) == {"vectorized"} and fastest["speedup_vs_builtin"].isna().all()
    frame["verified"] = "waived"
    assert report.fastest_table(frame).empty


def test_plots_mark_rows_that_failed_verification_and_leave_them_out_of_speedups():
    rows = base_rows(**FEW_PLOTS)
    rows += [dict(r, implementation="identity", verified="fail") for r in rows[:3]]
    frame = pd.DataFrame(rows).assign(source="s")
    figures = {name: fig for name, _, fig in report.make_plots(frame)}
    try:
        time_legend = figures["00-cpu-float32-16-time.png"].axes[0].get_legend_handles_labels()[1]
        speed_legend = figures["00-cpu-float32-16-speedup.png"].axes[0].get_legend_handles_labels()
    finally:
        for fig in figures.values():
            report.plt.close(fig)
    assert "identity (failed verification)" in time_legend and "identity" not in time_legend
    assert not any("identity" in label for label in speed_legend[1])


# ---------------------------------------------------------------------------------------------
# 9. stale files: run ids and recorded digests

RUN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("verify_run", ["fedcba9876543210fedcba9876543210", None])
def test_a_verify_json_from_another_run_is_not_shown(tmp_path, verify_run, no_plots):
    env = {"schema": "bnbench.bench/1", "run_id": RUN}
    d = write_dir(tmp_path / "d", base_rows(), env=env, verify=False)
    extra = {"run_id": verify_run} if verify_run else {}
    (d / "verify.json").write_text(json.dumps(verify_document(**extra)))
    result = in_process("report", str(d), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"verify.json in {d} is from another run" in md and "not shown" in md
    correctness = md.split("## Correctness (bnbench verify)")[1].split("##")[0]
    assert "nothing to show" in correctness


def test_a_verify_json_of_this_run_is_shown(tmp_path, no_plots):
    env = {"schema": "bnbench.bench/1", "run_id": RUN}
    d = write_dir(tmp_path / "d", base_rows(), env=env, verify=False)
    (d / "verify.json").write_text(json.dumps(verify_document(run_id=RUN)))
    assert in_process("report", str(d), "--output", str(tmp_path / "out")).returncode == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "another run" not in md and "builtin@cpu" in md


def recorded(d: Path, **rows) -> dict:
    import hashlib

    return {
        name: {"sha256": hashlib.sha256((d / name).read_bytes()).hexdigest()}
        | ({"rows": rows[name.split(".")[0]]} if name.split(".")[0] in rows else {})
        for name in ("results.csv", "samples.csv")
    }


def test_tables_from_different_writes_are_refused(tmp_path):
    d = write_dir(tmp_path / "d", base_rows())
    env = {"schema": "bnbench.bench/1", "run_id": RUN, "files": recorded(d, results=12)}
    (d / "environment.json").write_text(json.dumps(env))
    assert len(runs.load(d).rows) == 12  # the files are the ones recorded
    rows = base_rows()
    rows[0]["median_s"] *= 2  # another write of results.csv
    (d / "results.csv").write_text(to_csv(rows, COLUMNS))
    for message in both_commands_refuse(tmp_path, d):
        assert f"{d / 'results.csv'}: sha256" in message and "different writes" in message


def test_a_recorded_table_that_is_missing_is_refused(tmp_path):
    d = write_dir(tmp_path / "d", base_rows())
    env = {"schema": "bnbench.bench/1", "run_id": RUN, "files": recorded(d)}
    (d / "environment.json").write_text(json.dumps(env))
    (d / "samples.csv").unlink()
    for message in both_commands_refuse(tmp_path, d):
        assert f"{d / 'samples.csv'}: missing, but {d / 'environment.json'} records it" in message


def test_a_recorded_row_count_that_differs_is_refused(tmp_path):
    d = write_dir(tmp_path / "d", base_rows())
    env = {"schema": "bnbench.bench/1", "files": recorded(d, results=13)}
    (d / "environment.json").write_text(json.dumps(env))
    with pytest.raises(runs.ReportInputError, match="12 rows, .* records 13"):
        runs.load(d)


# ---------------------------------------------------------------------------------------------
# 10. scale: vectorized intervals, capped report


def test_beyond_the_bootstrap_budget_order_statistics_still_flag_a_slowdown(tmp_path):
    base = write_dir(tmp_path / "base", base_rows())
    new = write_dir(tmp_path / "new", base_rows(slowdown=("vectorized", 2.0)))
    cases = regression.compare(base, new, 25, budget=0).cases
    assert set(cases["method"]) == {"order-statistics"}
    slow = cases[cases["implementation"] == "vectorized"]
    assert (slow["verdict"] == "regression").all()
    assert (cases[cases["implementation"] == "builtin"]["verdict"] == "same").all()
    boot = regression.compare(base, new, 25).cases
    assert set(boot["method"]) == {"bootstrap"} and (boot["verdict"] == cases["verdict"]).all()


def test_many_cases_get_a_normal_interval_per_implementation(monkeypatch):
    rng = np.random.default_rng(0)
    cases = pd.DataFrame(
        {
            "implementation": ["a"] * 40 + ["b"] * 3,
            "device": "cpu",
            "ratio": np.exp(np.r_[rng.normal(0.7, 0.05, 40), [0.0, 0.01, -0.01]]),
        }
    )
    monkeypatch.setattr(regression, "GEOMEAN_BOOTSTRAP_CASES", 10)
    summary = regression.compare_implementations(cases, 25).set_index("implementation")
    assert summary.loc["a", "method"] == "normal" and summary.loc["a", "verdict"] == "regression"
    assert summary.loc["b", "method"] == "bootstrap" and summary.loc["b", "verdict"] == "same"
    assert (
        summary.loc["a", "ci_low"] < summary.loc["a", "geomean_ratio"] < summary.loc["a", "ci_high"]
    )


def test_large_reports_cap_tables_and_plots_and_keep_the_full_tables_as_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MAX_TABLE_ROWS", 4)
    monkeypatch.setattr(report, "MAX_FAMILIES", 1)
    rows = base_rows(**FEW_PLOTS) + [
        dict(r, channels=32, shape=r["shape"].replace("x16x", "x32x"))
        for r in base_rows(**FEW_PLOTS)
    ]
    d = write_dir(tmp_path / "d", rows)
    assert in_process("report", str(d), "--output", str(tmp_path / "out")).returncode == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Showing the first 4 of 6 rows; all of them are in fastest.csv." in md
    assert "1 more plot families not plotted" in md
    assert len(pd.read_csv(tmp_path / "out" / "fastest.csv")) == 6
    section = md.split("## Fastest implementation per case")[1].split("\n## ")[0]
    assert sum(line.startswith("| ") for line in section.splitlines()) == 1 + 4  # header + rows
    assert not any(p.startswith("01-") for p in os.listdir(tmp_path / "out" / "plots"))


def test_the_scale_benchmark_runs(capsys, monkeypatch):
    import bench_scale

    monkeypatch.setattr(report, "MAX_FAMILIES", 0)  # the plots are what takes time here
    figures = bench_scale.main(["--rows", "80", "--samples", "4"])
    assert figures["compare_s"] > 0 and figures["report_s"] > 0
    assert "compare:" in capsys.readouterr().out


def test_compare_does_not_let_one_tiny_median_hide_a_slowdown(tmp_path):
    """A positive but absurd median (1e-300 s) passes the schema; its ratio must not pull the
    geometric mean down over the 10x slowdown beside it."""
    rows = base_rows(slowdown=("vectorized", 10.0))
    tiny = next(i for i, r in enumerate(rows) if r["implementation"] == "vectorized")
    rows[tiny].update(median_s=1e-300, p20_s=1e-300, p80_s=1e-300)
    new = write_dir(tmp_path / "new", rows, samples=False)
    base = write_dir(tmp_path / "base", base_rows(), samples=False)
    result = in_process("compare", str(base), str(new))
    assert result.returncode == 1, result.stdout
    assert "implausible" in result.stdout and "REGRESSION" in result.stdout


def test_a_number_too_large_for_a_float_is_named_not_a_traceback(tmp_path):
    rows = base_rows()
    rows[2]["bytes"] = "9" * 400
    broken = write_dir(tmp_path / "broken", rows, samples=False)
    message = usage_error("report", str(broken), "--output", str(tmp_path / "out"))
    assert f"{broken / 'results.csv'}: row 3 (line 4), bytes" in message
