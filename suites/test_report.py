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


# ---------------------------------------------------------------------------------------------
# The report people read: verdict first, warnings, a matrix with reasons, readable plots


def bench_rows(
    impls=("builtin", "vectorized"),
    device="cpu",
    modes=("forward_train", "backward"),
    batches=(8, 32),
    verified=None,
    factor=None,
    model="",
    spatial="8x8",
) -> list[dict]:
    """Measured results.csv rows: every implementation x mode x batch size; ``factor`` =
    {implementation: time multiplier}, ``verified`` = {implementation: the row's verdict}."""
    rows = []
    for impl in impls:
        for j, mode in enumerate(modes):
            for batch in batches:
                median = (1 + j) * batch * 1e-5 * (factor or {}).get(impl, 1.0)
                rows.append(
                    {
                        "implementation": impl,
                        "device": device,
                        "dtype": "float32",
                        "mode": mode,
                        "batch_size": batch,
                        "channels": 16,
                        "spatial": spatial,
                        "rank": 4 if spatial != "-" else 2,
                        "shape": f"{batch}x16" + (f"x{spatial}" if spatial != "-" else ""),
                        "memory_format": "contiguous",
                        "status": "ok",
                        "verified": (verified or {}).get(impl, "pass"),
                        "median_s": median,
                        "p20_s": median * 0.95,
                        "p80_s": median * 1.05,
                        "repetitions": 5,
                        "ratio_to_floor": 3.0,
                        "threads": 2,
                        "model": model,
                        "message": "",
                    }
                )
    return rows


def result(impl, device, check, verdict, message="", rank=4, category=None) -> dict:
    """One verify.json result (``category`` None: left out, as files before categories)."""
    item = {
        "implementation": impl,
        "device": device,
        "case": f"{check}-rank{rank}",
        "check": check,
        "verdict": verdict,
        "message": message,
    }
    return item | ({"category": category} if category else {})


def write_run(path, rows, verify=None, complete=True):
    """A bnbench bench directory (results.csv, environment.json, verify.json if given)."""
    from bnbench.results import BENCH_SCHEMA, VERIFY_SCHEMA

    path.mkdir(parents=True, exist_ok=True)
    (path / "results.csv").write_text(to_csv(rows, COLUMNS))
    environment = {"schema": BENCH_SCHEMA, "host": "test", "complete": complete, "cpu_count": 2}
    (path / "environment.json").write_text(json.dumps(environment))
    if verify is not None:
        (path / "verify.json").write_text(json.dumps({"schema": VERIFY_SCHEMA, "results": verify}))
    return path


def no_plots(monkeypatch):
    from bnbench import report

    monkeypatch.setattr(report, "make_plots", lambda *args, **kwargs: iter(()))


def report_of(tmp_path, *directories, monkeypatch=None):
    if monkeypatch is not None:
        no_plots(monkeypatch)
    out = tmp_path / "out"
    result_ = in_process("report", *map(str, directories), "--output", str(out))
    assert result_.returncode == 0, result_.stdout + result_.stderr
    return (out / "report.md").read_text(), (out / "report.html").read_text(), out


def section(md: str, heading: str) -> str:
    """The text of a ``## heading`` section of report.md, up to the next ``## ``."""
    return md.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


# Two devices; on cpu "identity" is the fastest but its rows failed verification, vectorized
# fails one check, slow has a declared deviation; on cuda only builtin runs.
VERIFY = [
    result("builtin", "cpu", "default", "pass"),
    result("builtin", "cpu", "eps_zero", "pass"),
    result("vectorized", "cpu", "default", "pass"),
    result("vectorized", "cpu", "eps_zero", "fail", "raised nothing"),
    result("slow", "cpu", "default", "deviation", "biased variance\nstep 0: running_var ..."),
    result("slow", "cpu", "eps_zero", "pass"),
    result("identity", "cpu", "default", "fail", "returns its input"),
    result("identity", "cpu", "eps_zero", "fail", "returns its input"),
    result("builtin", "cuda", "default", "pass"),
    result("builtin", "cuda", "eps_zero", "pass"),
]


def two_device_run(directory):
    rows = bench_rows(("builtin", "vectorized", "slow"), factor={"vectorized": 0.5, "slow": 3.0})
    rows += bench_rows(("identity",), factor={"identity": 0.01}, verified={"identity": "fail"})
    rows += bench_rows(("builtin",), device="cuda")
    return write_run(directory, rows, verify=VERIFY)


def test_the_report_opens_with_a_verdict_per_device_then_warnings_then_details(
    tmp_path, monkeypatch
):
    md, page, out = report_of(tmp_path, two_device_run(tmp_path / "run"), monkeypatch=monkeypatch)
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:3] == [
        "## Summary",
        "## Warnings",
        "## Speed relative to builtin and to the floor (geometric means)",
    ]
    summary = section(md, "Summary")
    assert summary.index("### cpu") < summary.index("### cuda")
    cpu = summary.split("### cpu")[1].split("### cuda")[0]
    rows = {line.split("|")[1].strip(): line for line in cpu.splitlines() if line.startswith("| ")}
    assert "verified: all 2 checks pass" in rows["builtin"]
    assert "1 of 2 checks failed" in rows["vectorized"]
    assert "verified with 1 declared deviations" in rows["slow"]
    assert "2 of 2 checks failed" in rows["identity"]
    # time relative to builtin per mode and overall, and to the floor
    cells = [c.strip() for c in rows["vectorized"].split("|")[1:-1]]
    header = [c.strip() for c in rows["implementation"].split("|")[1:-1]]
    assert header[:4] == ["implementation", "verification", "rows", "failed verification"]
    assert {"forward_train", "backward", "all modes", "time vs floor"} <= set(header)
    assert cells[header.index("all modes")] == "0.5" and cells[header.index("time vs floor")] == "3"
    # the fastest verified per mode: vectorized, never identity (its rows failed verification)
    fastest = [line for line in cpu.splitlines() if line.startswith("- ")]
    assert fastest == [
        "- forward_train: **vectorized** (1 of 2 checks failed): 0.5x builtin's time; the "
        "fastest with every check passing: builtin at 1x builtin's time",
        "- backward: **vectorized** (1 of 2 checks failed): 0.5x builtin's time; the fastest "
        "with every check passing: builtin at 1x builtin's time",
    ]
    assert "**builtin** (verified: all 2 checks pass): the baseline; no other verified" in summary
    # the HTML page has the same order, and colours the verdicts
    assert (
        page.index(">Summary</h2>")
        < page.index(">Warnings</h2>")
        < page.index(">Speed relative to builtin and to the floor (geometric means)</h2>")
    )
    assert "<td class='v-fail'>1 of 2 checks failed</td>" in page
    assert "<td class='v-dev'>verified with 1 declared deviations</td>" in page
    assert "<td class='num faster'>0.5</td>" in page  # faster than builtin, in green
    assert "<td class='num faster'>0</td>" not in page  # a count is no time
    assert (out / "summary.csv").is_file()


def test_warnings_name_what_did_not_measure_failed_was_interrupted_or_is_not_verified(
    tmp_path, monkeypatch
):
    rows = bench_rows(("builtin", "vectorized"))
    rows += [
        dict(
            rows[0],
            implementation="crashy",
            status="crashed",
            median_s=None,
            p20_s=None,
            p80_s=None,
            repetitions=None,
            message="worker died",
        ),
        dict(rows[0], implementation="identity", verified="fail"),
        dict(
            rows[0],
            implementation="nobackward",
            mode="backward",
            status="not-supported",
            verified="not-supported",
            median_s=None,
            p20_s=None,
            p80_s=None,
            repetitions=None,
        ),
    ]
    verified = two_device_run(tmp_path / "verified")
    unverified = write_run(tmp_path / "unverified", rows, complete=False)
    md, page, _ = report_of(tmp_path, verified, unverified, monkeypatch=monkeypatch)
    warnings = section(md, "Warnings")
    expected = [
        f"{unverified}: the sweep was interrupted; 11 rows finished",
        f"unverified: no verify.json in {unverified}: its implementations are not verified",
        "vectorized@cpu (verified): 1 checks failed in verify.json (eps_zero-rank4)",
        "identity@cpu (unverified): 1 rows failed verification (verified: fail)",
        "crashy@cpu (unverified): 1 rows did not measure (crashed: 1",
        "nobackward@cpu (unverified): 1 rows not supported",
    ]
    for text in expected:
        assert text in warnings, text
    assert "<ul class=warnings>" in page
    unverified_summary = section(md, "Summary").split("### cpu (unverified)")[1]
    assert "not verified (no verify.json)" in unverified_summary


def test_no_warnings_says_none(tmp_path, monkeypatch):
    rows = bench_rows(("builtin", "vectorized"))
    verify = [result(i, "cpu", "default", "pass") for i in ("builtin", "vectorized")]
    md, page, _ = report_of(
        tmp_path, write_run(tmp_path / "r", rows, verify), monkeypatch=monkeypatch
    )
    assert section(md, "Warnings").strip().startswith("None.")
    assert "<p class=none>None.</p>" in page


def matrix_run(directory):
    verify = [
        result("builtin", "cpu", "wrong_rank", "pass", category="errors"),
        result("builtin", "cpu", "default", "pass"),  # no category: from the check's name
        result("builtin", "cpu", "momentum_none", "pass"),
        result("odd", "cpu", "default", "fail", "step 0: output differs"),
        result("odd", "cpu", "momentum_none", "deviation", "cumulative average not kept\nstep 0"),
        result("odd", "cpu", "wrong_rank", "unexpected-pass", "the declared deviation passed"),
        result("odd", "cpu", "eps_zero", "waived", "we rebind buffers\nstep 1"),
        result(
            "book",
            "cpu",
            "default",
            "not-supported",
            "rank 3 input not supported; float64 not supported",
            rank=3,
        ),
        result("book", "cpu", "default", "not-supported", "float64 not supported", rank=4),
        result("book", "cpu", "momentum_none", "not-supported", "float64 not supported"),
        result("book", "cpu", "wrong_rank", "pass"),
        result("native", "cpu", "default", "not-supported", "device cpu not supported"),
        result("native", "cpu", "momentum_none", "not-supported", "device cpu not supported"),
    ]
    return write_run(directory, bench_rows(("builtin",)), verify)


def test_the_correctness_matrix_is_grouped_coloured_explained_and_has_no_all_ns_column(
    tmp_path, monkeypatch
):
    md, page, out = report_of(tmp_path, matrix_run(tmp_path / "run"), monkeypatch=monkeypatch)
    matrix = page.split(">Correctness (bnbench verify)</h2>")[1].split("<h2")[0]
    # a legend for every label, each chip in its colour
    for label, css in (
        ("pass", "v-pass"),
        ("FAIL", "v-fail"),
        ("XPASS", "v-xpass"),
        ("waived", "v-waived"),
        ("dev", "v-dev"),
        ("n/s", "v-ns"),
    ):
        assert f"<span class='chip {css}'>{label}</span>" in matrix
    # no index column: the header starts with the check, then one column per impl@device
    # that is not n/s everywhere (native@cpu is dropped, and said why, once)
    header = matrix.split("<thead><tr>")[1].split("</tr>")[0]
    assert header == (
        "<th scope=col>check</th><th scope=col>builtin@cpu</th><th scope=col>odd@cpu</th>"
        "<th scope=col>book@cpu</th>"
    )
    assert "Columns not shown, every check not supported: native@cpu (device cpu not " in matrix
    assert (
        "native@cpu"
        not in md.split("## Correctness (bnbench verify)")[1].split("Columns not shown")[0]
    )
    # rows grouped under their categories, in the CLI's order
    categories = [c.split(">")[1] for c in matrix.split("scope=rowgroup")[1:]]
    assert [c.split("<")[0] for c in categories] == ["numerics", "running state", "errors"]
    # colours, reasons on hover and as footnotes (identical reasons once; n/s reasons split)
    assert "<td class='v-fail' title='default-rank4: step 0: output differs'>FAIL</td>" in matrix
    assert "class='v-xpass' title='wrong_rank-rank4: the declared deviation passed'>XPASS" in matrix
    footnotes = matrix.split("<ol class=footnotes>")[1].split("</ol>")[0]
    reasons = [item.split(">", 1)[1].split("</li>")[0] for item in footnotes.split("<li")[1:]]
    assert reasons == [
        "rank 3 input not supported",
        "float64 not supported",
        "cumulative average not kept",
        "we rebind buffers",
    ]
    assert "<td class='v-waived' title='eps_zero-rank4: we rebind buffers'>waived<sup>" in matrix
    assert (
        "<td class='v-ns' title='default-rank3: rank 3 input not supported; float64 not "
        "supported\ndefault-rank4: float64 not supported'>n/s<sup><a href='#fn0-1'>[1]</a>"
        "<a href='#fn0-2'>[2]</a></sup></td>" in matrix
    )
    assert (
        "<td class='v-ns' title='momentum_none-rank4: float64 not supported'>n/s<sup><a "
        "href='#fn0-2'>[2]</a></sup>" in matrix
    )
    assert "<li id='fn0-3'>cumulative average not kept</li>" in matrix
    # the Markdown matrix: the same rows, footnote numbers and reasons
    correctness = section(md, "Correctness (bnbench verify)")
    table = [line.split("|")[1:-1] for line in correctness.splitlines() if line.startswith("| ")]
    assert [[cell.strip() for cell in row] for row in table] == [
        ["category", "check", "builtin@cpu", "odd@cpu", "book@cpu"],
        ["numerics", "default", "pass", "FAIL", "n/s \\[1, 2\\]"],
        ["running state", "momentum_none", "pass", "dev \\[3\\]", "n/s \\[2\\]"],
        ["errors", "wrong_rank", "pass", "XPASS", "pass"],
        ["", "eps_zero", "", "waived \\[4\\]", ""],
    ]
    assert "1. rank 3 input not supported\n2. float64 not supported\n" in correctness
    assert "- `n/s`: not supported" in correctness and "- `dev`: a declared deviation" in (
        correctness
    )
    csv = (out / "correctness.csv").read_text().splitlines()
    assert csv[0] == "source,category,check,builtin@cpu,odd@cpu,book@cpu,native@cpu"


def test_plot_sections_and_captions_name_the_shape_family_and_the_modes(tmp_path):
    rows = bench_rows(("builtin", "vectorized"), modes=("forward_eval",))
    rows += bench_rows(("builtin",), modes=("train_step",), model="conv_bn", batches=(16, 128))
    md, page, _ = report_of(tmp_path, write_run(tmp_path / "run", rows))
    plots = section(md, "Plots")
    assert "Time against batch size" not in md
    assert "\n### BatchNorm, cpu float32 contiguous, input N x 16 x 8x8\n" in plots
    assert "\n### conv_bn training step, cpu float32 contiguous, input N x 16 x 8x8\n" in plots
    assert (
        "Time per call against batch size: BatchNorm, cpu float32 contiguous, input N x 16 x "
        "8x8; one panel per mode: forward_eval" in plots
    )
    assert "<h3>conv_bn training step, cpu float32 contiguous, input N x 16 x 8x8</h3>" in page


def overflow(fig) -> tuple[float, float, float, float] | None:
    """None when everything a figure draws (titles, labels, tick labels, legends) lies inside
    it; else the bounding box of what it draws, in inches."""
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    width, height = fig.get_size_inches()
    inside = box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= width + 0.01
    return None if inside and box.y1 <= height + 0.01 else (box.x0, box.y0, box.x1, box.y1)


def test_plot_titles_and_legends_fit_a_single_panel_figure():
    import pandas as pd

    from bnbench import report

    long = "an-implementation-with-a-rather-long-name-" + "x" * 20
    rows = bench_rows(("builtin", long), modes=("train_step",), model="conv_bn_with_a_long_name")
    frame = pd.DataFrame(rows).assign(source="a-source-directory-with-a-long-name-" + "y" * 20)
    ok = report._measured(frame)
    ((family, group),) = report._families(ok)[0]
    fig = report._plot_per_mode(
        family, group, lambda d: d["median_s"], "s", "Time per call", "builtin"
    )
    try:
        title = fig._suptitle.get_text()
        assert "conv_bn_with_a_long_name training step" in title and "N x 16 x 8x8" in title
        assert "..." not in title  # wrapped, not cut
        assert overflow(fig) is None
    finally:
        report.plt.close(fig)


def test_the_compile_cost_is_a_table_and_one_readable_bar_per_implementation_and_device():
    import pandas as pd

    from bnbench import report

    rows = []
    for k in range(12):
        for mode in ("forward_train", "forward_eval", "backward"):
            for batch in (8, 32, 64):
                rows.append(
                    dict(
                        bench_rows((f"compiled-variant-{k}",), modes=(mode,), batches=(batch,))[0],
                        compile_s=1.0 + k,
                        graphs_compiled=1,
                    )
                )
    frame = pd.DataFrame(rows).assign(source="s")
    table = report.compile_table(frame)
    assert len(table) == 12  # one row per implementation@device, not per mode or row
    top = table.iloc[0]
    assert top["implementation@device"] == "compiled-variant-11@cpu"
    assert (top["forward_train_s"], top["total_s"], top["graphs"], top["rows"]) == (
        36.0,
        108.0,
        9,
        9,
    )
    fig = report._compile_cost(frame)
    try:
        labels = [t for t in fig.axes[0].get_yticklabels()]
        assert len(labels) == 12 and overflow(fig) is None
        fig.canvas.draw()
        boxes = sorted(t.get_window_extent().y0 for t in labels)
        heights = [t.get_window_extent().height for t in labels]
        assert min(b - a for a, b in zip(boxes, boxes[1:])) >= max(heights)  # no overlap
    finally:
        report.plt.close(fig)
