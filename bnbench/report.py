"""Performance comparison reports: load results (bnbench bench directories or pytest-benchmark
JSON), draw the plots, build the tables, write Markdown + a self-contained HTML page + PNGs.

The report answers "which one should I use" before anything else: it opens with one summary
per device (and per source when several), giving each implementation's verification verdict,
its time relative to the baseline and to the bandwidth floor, and the fastest verified
implementation per mode; then the warnings (rows that did not measure or failed verification,
interrupted sweeps, a missing verify.json, notes); then the details (tables, the correctness
matrix grouped by category with the reason behind every ``n/s`` and ``dev`` cell, the compile
cost, the plots, one section per shape family).

Every input problem is a ReportInputError naming the file and what is wrong with it; every
output file is written atomically (a temporary file renamed into place).

The inputs are data from elsewhere, so everything taken from them is treated as text to show,
never as markup or a path: HTML is escaped, Markdown cells and headings are escaped (a ``|`` or
a newline cannot break a table), matplotlib renders labels without mathtext, and plot file
names are sanitized and checked to land inside ``OUTPUT/plots``. The HTML page is one file: its
style is inline, its images are data URIs, it has no script and loads nothing.

A row whose implementation failed verification (verified is fail, unexpected-pass or waived) is
fast for a reason that does not count: it is never the fastest, never a speed-up nor the
baseline of one, and is marked wherever it is shown.

Reports of 200,000 rows stay fast and readable: the tables are built with merges and groupbys,
the Markdown/HTML show the first MAX_TABLE_ROWS rows of each table (all of them are in a CSV
file next to report.md) and at most MAX_FAMILIES families are plotted.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import textwrap
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import Formatter, FuncFormatter, NullLocator  # noqa: E402

from bnbench.benchmark import MODES as BENCH_MODES  # noqa: E402
from bnbench.cases import CATEGORIES, category_of  # noqa: E402
from bnbench.results import (  # noqa: E402
    CASE_KEY,
    VERDICT_LABELS,
    Status,
    Verdict,
    write_atomic,
)
from bnbench.runs import (  # noqa: E402
    ReportInputError,
    Results,
    _check_integers,
    _fail,
    combine,
    load,
    read_bytes,
    read_table,
)

# The layer modes, then a whole model's training step, in plotting order.
MODES = [*BENCH_MODES, "train_step"]
# Verdicts of rows whose implementation failed the case vouching for them.
FAILED_VERIFICATION = [Verdict.FAIL.value, Verdict.UNEXPECTED_PASS.value, Verdict.WAIVED.value]
FAILED_LABEL = "failed verification"
# Limits that keep a report of hundreds of thousands of rows fast and readable.
MAX_TABLE_ROWS = 200
# Each plot takes 0.5-0.8 s to render on this project's 2-core machine and a family has up to
# 3: 8 families keep a report under half a minute however many rows it has.
MAX_FAMILIES = 8
MAX_LINES = 16  # implementations drawn per plot
MAX_BARS = 40
MAX_STUDY_ROWS = 50_000
MAX_STUDY_MODELS = 6
MAX_LABEL = 60  # characters of a label in a plot
MAX_NAME_PART = 40  # characters of a data-derived part of a file name
MAX_MATRIX_COLUMNS = 40  # implementation@device columns of a correctness matrix
MAX_WARNINGS = 60  # lines of the warnings section
MAX_REASON = 300  # characters of a reason (a message's first line) in a cell's note
MAX_CELL_TEXT = 400  # characters of a text cell shown in a table (the CSV files have all)

# How each verdict reads in the correctness matrix and what it means (the legend), and the CSS
# class that colours it.
VERDICT_CLASSES = {
    "pass": "v-pass",
    "FAIL": "v-fail",
    "XPASS": "v-xpass",
    "waived": "v-waived",
    "dev": "v-dev",
    "n/s": "v-ns",
}
LEGEND = {
    "pass": "every case of the check passed",
    "FAIL": "a case failed",
    "XPASS": "a declared deviation passed (an error: the declaration is wrong)",
    "waived": "a failure waived with --ignore (reported, not gated on)",
    "dev": "a declared deviation: expected to fail, and it did",
    "n/s": "not supported: the implementation declares it cannot run the case",
}
# The class of a benchmark row's verified verdict or status, wherever a table shows one.
CELL_CLASSES = {
    Verdict.PASS.value: "v-pass",
    Verdict.FAIL.value: "v-fail",
    Verdict.UNEXPECTED_PASS.value: "v-xpass",
    Verdict.WAIVED.value: "v-waived",
    Verdict.DEVIATION.value: "v-dev",
    Verdict.NOT_SUPPORTED.value: "v-ns",
    Verdict.NOT_RUN.value: "v-none",
    Status.ERROR.value: "v-fail",
    Status.NAN.value: "v-fail",
    Status.HUNG.value: "v-fail",
    Status.CRASHED.value: "v-fail",
    Status.RECOMPILED.value: "v-dev",
}


def failed_verification(frame: pd.DataFrame) -> pd.Series:
    """Rows whose verified verdict says the implementation failed the vouching case."""
    if "verified" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["verified"].isin(FAILED_VERIFICATION)


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == Status.OK.value]


def flagged(frame: pd.DataFrame) -> pd.Series:
    """Measured rows whose figures are not to be trusted (a non-empty ``flags``: results.Flag):
    kept out of the headline figures (summary, speed-ups, fastest), listed apart."""
    if "flags" not in frame:
        return pd.Series(False, index=frame.index)
    cells = frame["flags"].astype(object).where(frame["flags"].notna(), "").astype(str)
    return (frame["status"] == Status.OK.value) & (cells != "")


def _headline(frame: pd.DataFrame) -> pd.DataFrame:
    """The measured rows headline figures are made of: none of them flagged."""
    ok = _measured(frame)
    return ok[~flagged(ok)]


def _mode_order(modes) -> list[str]:
    """``modes`` in MODES' order, any other after them, sorted."""
    present = set(modes)
    return [m for m in MODES if m in present] + sorted(present - set(MODES), key=str)


# ---------------------------------------------------------------------------------------------
# Tables


def _baseline_times(ok: pd.DataFrame, baseline: str, keys: list[str]) -> pd.DataFrame:
    """The baseline's median per case, from rows that passed verification only."""
    base = ok[(ok["implementation"] == baseline) & ~failed_verification(ok)]
    return base[keys + ["median_s"]].rename(columns={"median_s": "baseline_s"})


def fastest_table(frame: pd.DataFrame, baseline: str = "builtin") -> pd.DataFrame:
    """Per source and case: the fastest implementation among rows that did not fail
    verification and are not flagged, its verdict, and its speed-up over the baseline."""
    ok = _headline(frame)
    ok = ok[~failed_verification(ok)]
    if ok.empty:
        return pd.DataFrame()
    if "verified" not in ok:
        ok = ok.assign(verified="")
    keys = ["source", *CASE_KEY]
    # the first row of each case after a stable sort by time: idxmin's choice, vectorized
    best = ok.sort_values("median_s", kind="stable").drop_duplicates(keys)
    table = best[keys + ["implementation", "verified", "median_s"]].merge(
        _baseline_times(ok, baseline, keys), on=keys, how="left"
    )
    table = table.sort_values(keys, kind="stable", ignore_index=True)
    table[f"speedup_vs_{baseline}"] = table.pop("baseline_s") / table["median_s"]
    table["median_ms"] = table.pop("median_s") * 1e3
    table["verified"] = table["verified"].replace("", Verdict.NOT_RUN.value)
    return table.rename(columns={"implementation": "fastest"})


def _row_logs(frame: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Every measured row with the log of its time relative to the baseline's on the same case
    and the log of its ratio to the bandwidth floor (NaN where there is none, and for rows that
    failed verification), and whether it failed verification. Flagged rows are left out."""
    ok = _headline(frame)
    if ok.empty:
        return pd.DataFrame()
    keys = ["source", *CASE_KEY]
    merged = ok.merge(_baseline_times(ok, baseline, keys), on=keys, how="left")
    failed = failed_verification(merged).to_numpy()
    ratio = merged["median_s"].to_numpy(dtype=float) / merged["baseline_s"].to_numpy(dtype=float)
    floor = (
        merged["ratio_to_floor"].to_numpy(dtype=float)
        if "ratio_to_floor" in merged
        else np.full(len(merged), np.nan)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        merged["log_ratio"] = np.where(failed, np.nan, np.log(ratio))
        usable = ~failed & np.isfinite(floor) & (floor > 0)
        merged["log_floor"] = np.where(usable, np.log(np.where(usable, floor, 1.0)), np.nan)
    merged["failed"] = failed
    return merged


def _geomeans(logs: pd.DataFrame, keys: list[str], baseline: str) -> pd.DataFrame:
    """Per ``keys``: the rows, how many failed verification, and the geometric means of the
    time relative to the baseline and to the floor (over the rows that did not fail)."""
    grouped = logs.groupby(keys, sort=True)
    table = grouped.agg(
        rows=("median_s", "size"),
        failed_verification=("failed", "sum"),
        log_ratio=("log_ratio", "mean"),
        log_floor=("log_floor", "mean"),
    ).reset_index()
    table[f"time_vs_{baseline}"] = np.exp(table.pop("log_ratio"))
    table["time_vs_floor"] = np.exp(table.pop("log_floor"))
    return table


def speedup_table(frame: pd.DataFrame, baseline: str = "builtin") -> pd.DataFrame:
    """Geometric-mean time relative to the baseline, per source, device, implementation and
    mode, over the rows that did not fail verification (their count is shown apart)."""
    logs = _row_logs(frame, baseline)
    if logs.empty:
        return pd.DataFrame()
    return _geomeans(logs, ["source", "device", "implementation", "mode"], baseline)


GPU_HEADING = "GPU time: the kernel apart from the call"
GPU_HOW = (
    "CUDA rows are timed twice: the call as a training loop makes it (median_s) and the GPU "
    "time with launch overhead removed (kernel_s: the call captured in a CUDA graph, the L2 "
    "flushed between repetitions unless the run was --warm-cache; repetitions stop once the "
    "median is known within 0.5% or at a time cap). Per implementation, dtype, memory format "
    "and mode: the kernel time relative to the baseline's (geometric mean; below 1 is faster), "
    "the call time over the kernel time (how much launch and Python add: near 1 means the GPU "
    "is busy, large means the kernel is not what a user waits for), and the achieved bandwidth "
    "as a share of a copy of the same size timed the same way (the least traffic the mode "
    "needs: a forward reads x and writes y). Flagged rows (throttled, over 100% of the copy) "
    "are left out."
)


def gpu_table(frame: pd.DataFrame, baseline: str = "builtin") -> pd.DataFrame:
    """The CUDA rows' kernel figures (GPU_HOW), per source, implementation, dtype, memory
    format and mode, over the unflagged rows that did not fail verification. Empty without
    kernel times."""
    if "kernel_s" not in frame:
        return pd.DataFrame()
    ok = _headline(frame)
    ok = ok[~failed_verification(ok) & (ok["kernel_s"].astype(float) > 0)]
    if ok.empty:
        return pd.DataFrame()
    keys = ["source", *CASE_KEY]
    base = ok[ok["implementation"] == baseline][keys + ["kernel_s"]]
    merged = ok.merge(base.rename(columns={"kernel_s": "baseline_kernel_s"}), on=keys, how="left")
    share = (
        merged["bandwidth_share"].astype(float)
        if "bandwidth_share" in merged
        else pd.Series(np.nan, index=merged.index)
    )
    merged = merged.assign(
        log_vs=np.log(merged["kernel_s"].astype(float) / merged["baseline_kernel_s"]),
        log_call=np.log(merged["median_s"].astype(float) / merged["kernel_s"].astype(float)),
        share=share,
    )
    group = ["source", "implementation", "dtype", "memory_format", "mode"]
    table = (
        merged.groupby(group, sort=True)
        .agg(
            rows=("kernel_s", "size"),
            log_vs=("log_vs", "mean"),
            log_call=("log_call", "mean"),
            median_share=("share", "median"),
            lowest_share=("share", "min"),
        )
        .reset_index()
    )
    table[f"kernel_vs_{baseline}"] = np.exp(table.pop("log_vs"))
    table["call_over_kernel"] = np.exp(table.pop("log_call"))
    table["median_share_of_copy"] = table.pop("median_share")
    table["lowest_share_of_copy"] = table.pop("lowest_share")
    return table


def failed_verification_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every row whose implementation failed the case vouching for it."""
    rows = frame[failed_verification(frame)]
    columns = ["source", "implementation", "device", "mode", "shape", "dtype", "model"]
    table = rows[columns + ["verified", "status"]].copy()
    table["median_ms"] = rows["median_s"] * 1e3
    return table.reset_index(drop=True)


FLAGGED_HEADING = "Rows flagged as unreliable measurements"
FLAGGED_HOW = (
    "These rows were timed, but their figures are not to be trusted, so no summary, speed-up "
    "or fastest uses them: disturbed (the machine took the CPU away while timing: too few "
    "blocks had the process on the CPU throughout), floor-disturbed (the same, for the "
    "row's copy / clone floor), floor-not-monotone (the floor took longer than a larger "
    "tensor's, measured again and still so), floor-implausible (the floor's bandwidth is "
    "beyond what memory does), faster-than-floor (timed under 0.8x the copy of its bytes). "
    "cpu_per_wall is the timing process's CPU time over wall time (about 1 or more when "
    "nothing else took the CPU), load the machine's 1-minute load average. Worst first."
)


def flagged_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every flagged row (see flagged), most flags first, then fastest relative to its floor."""
    rows = frame[flagged(frame)]
    columns = ["source", "implementation", "device", "mode", "shape", "dtype", "model", "flags"]
    table = rows[columns].copy()
    table["median_ms"] = rows["median_s"] * 1e3
    for column in ("ratio_to_floor", "disturbed_blocks", "repetitions", "cpu_per_wall", "load"):
        if column in rows:
            table[column] = rows[column]
    table = table.assign(
        _count=table["flags"].str.count(";"),
        _floor=table["ratio_to_floor"] if "ratio_to_floor" in table else 0.0,
    )
    table = table.sort_values(["_count", "_floor"], ascending=[False, True], kind="stable")
    return table.drop(columns=["_count", "_floor"]).reset_index(drop=True)


def flagged_warnings(frame: pd.DataFrame, several: bool) -> list[str]:
    """One warning per source with flagged rows: how many, by flag, the worst examples and
    the machine's load while they were timed."""
    out = []
    table = flagged_table(frame)
    for source, group in table.groupby("source", sort=False):
        counts: dict[str, int] = {}
        for cell in group["flags"]:
            for flag in str(cell).split(";"):
                counts[flag] = counts.get(flag, 0) + 1
        by_flag = ", ".join(f"{flag}: {n}" for flag, n in sorted(counts.items()))
        examples = []
        for r in group.head(3).itertuples():
            floor = getattr(r, "ratio_to_floor", None)
            shown = f", {floor:.3g}x its floor" if isinstance(floor, float) and floor > 0 else ""
            examples.append(f"{r.implementation}@{r.device} {r.mode} {r.shape} ({r.flags}{shown})")
        load = ""
        if "load" in group and group["load"].notna().any():
            load = f"; the 1-minute load average reached {group['load'].max():.2f}"
        out.append(
            (f"{source}: " if several else "")
            + f"{len(group)} measured rows FLAGGED as unreliable ({by_flag}), left out of the "
            f"summary, speed-ups and fastest{load}; worst: {'; '.join(examples)} (see "
            f"{FLAGGED_HEADING})"
        )
    return out


def not_measured_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every row that did not measure (an error, NaN, a hang, a crash, a recompilation while
    timing): what a reader must not take for a slow or a missing implementation."""
    problems = frame[~frame["status"].isin([Status.OK.value, Status.NOT_SUPPORTED.value])]
    columns = ["source", "implementation", "device", "mode", "shape", "dtype", "status"]
    return problems[columns + (["message"] if "message" in problems else [])].reset_index(drop=True)


def environment_table(results: list[Results]) -> pd.DataFrame:
    keys = [
        "time",
        "host",
        "processor",
        "cpu_count",
        "threads",
        "torch",
        "cuda",
        "cudnn",
        "gpu",
        "python",
        "git_revision",
        "sweep",
        "complete",
        "run_id",
    ]
    return pd.DataFrame(
        [{"source": r.source, **{k: r.environment.get(k) for k in keys}} for r in results]
    )


def compile_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Seconds spent compiling (first call less a steady-state call, summed over the rows whose
    first calls compiled graphs) per source and implementation@device, one column per mode, with
    the total, the graphs compiled and the rows: every implementation that compiles, whatever it
    is named, most expensive first. Empty for inputs without compile times (pytest-benchmark)."""
    ok = _measured(frame)
    if "compile_s" not in ok or "graphs_compiled" not in ok:
        return pd.DataFrame()
    compiling = ok[ok["graphs_compiled"].fillna(0) > 0]
    if compiling.empty:
        return pd.DataFrame()
    compiling = compiling.assign(
        where=compiling["implementation"] + "@" + compiling["device"],
        compile_s=compiling["compile_s"].fillna(0.0),
    )
    keys = ["source", "where"]
    per_mode = compiling.pivot_table(
        index=keys, columns="mode", values="compile_s", aggfunc="sum", observed=True
    )
    per_mode = per_mode[_mode_order(per_mode.columns)]
    per_mode.columns = [f"{mode}_s" for mode in per_mode.columns]
    totals = compiling.groupby(keys).agg(
        total_s=("compile_s", "sum"),
        graphs=("graphs_compiled", "sum"),
        rows=("compile_s", "size"),
    )
    table = per_mode.join(totals).reset_index()
    table["graphs"] = table["graphs"].astype("int64")
    table = table.sort_values(["total_s", "where"], ascending=[False, True], kind="stable")
    return table.rename(columns={"where": "implementation@device"}).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Verification: verify.json's results, each implementation's verdict, the correctness matrix

ITEM_COLUMNS = ["implementation", "device", "case", "check", "verdict", "message", "category"]


def verify_items(results: list[Results]) -> pd.DataFrame:
    """Every result of every source's verify.json, one row each: source, implementation,
    device, column (implementation@device), case, check, category (from the file; from the
    check's name for files written before results carried one), verdict, message and reason
    (the message's first line, bounded: why a case is not supported or deviates)."""
    frames = []
    for r in results:
        if r.verify:
            items = pd.DataFrame(r.verify.get("results", []), columns=ITEM_COLUMNS)
            frames.append(items.assign(source=r.source))
    if not frames or all(f.empty for f in frames):
        return pd.DataFrame(columns=["source", *ITEM_COLUMNS, "column", "reason"])
    items = pd.concat([f for f in frames if not f.empty], ignore_index=True)
    # message and category are not part of the validated schema: text or nothing
    items["message"] = [m if isinstance(m, str) else "" for m in items["message"]]
    items["category"] = [c if isinstance(c, str) else "" for c in items["category"]]
    missing = items["category"] == ""
    if missing.any():
        names = items.loc[missing, "check"]
        items.loc[missing, "category"] = names.map({c: category_of(c) for c in names.unique()})
    items["column"] = items["implementation"] + "@" + items["device"]
    first = items["message"].str.strip().str.split(r"[\r\n]", n=1, regex=True).str[0]
    items["reason"] = first.fillna("").str.slice(0, MAX_REASON)
    return items


def verification_counts(items: pd.DataFrame) -> pd.DataFrame:
    """Per source, device and implementation: how many verify.json results have each verdict
    (one column per verdict)."""
    keys = ["source", "device", "implementation"]
    verdicts = [v.value for v in Verdict]
    if items.empty:
        return pd.DataFrame(columns=keys + verdicts)
    counts = pd.crosstab([items[k] for k in keys], items["verdict"])
    counts = counts.reindex(columns=verdicts, fill_value=0)
    counts.columns.name = None
    return counts.reset_index()


def verdict_of(counts: dict[str, int], has_verify: bool = True) -> tuple[str, str]:
    """One implementation@device's verdict from its verify.json counts: (kind, words). The
    kind (pass, fail, waived, dev, ns, none) picks the colour; failures and unexpected passes
    count as failed, declared deviations make it "verified with declared deviations"."""
    total = sum(counts.values())
    if total == 0:
        return "none", "not verified" + ("" if has_verify else " (no verify.json)")
    failed = counts.get(Verdict.FAIL.value, 0) + counts.get(Verdict.UNEXPECTED_PASS.value, 0)
    unsupported = counts.get(Verdict.NOT_SUPPORTED.value, 0) + counts.get(Verdict.NOT_RUN.value, 0)
    run = total - unsupported
    deviations = counts.get(Verdict.DEVIATION.value, 0)
    waived = counts.get(Verdict.WAIVED.value, 0)
    also = f", {unsupported} not supported" if unsupported and run else ""
    if failed:
        return "fail", f"{failed} of {run} checks failed"
    if waived:
        return "waived", f"{waived} of {run} checks failed, waived"
    if run == 0:
        return "ns", f"not verified: none of its {total} checks supported"
    if deviations:
        return "dev", f"verified with {deviations} declared deviations{also}"
    if unsupported:
        return "pass", f"verified: all {run} supported checks pass{also}"
    return "pass", f"verified: all {run} checks pass"


FASTEST_INTRO = (
    "Fastest verified implementation per mode (among those none of whose rows in the mode "
    "failed verification; its verdict on every check in parentheses):"
)
KIND_CLASSES = {
    "pass": "v-pass",
    "fail": "v-fail",
    "waived": "v-waived",
    "dev": "v-dev",
    "ns": "v-ns",
    "none": "v-none",
}


@dataclass
class DeviceSummary:
    """The verdict-first summary of one device of one source: a table with one row per
    implementation, the colour kind of each row's verdict, and the fastest verified
    implementation per mode as (mode, implementation, its verdict, the rest of the sentence;
    no implementation when none could be chosen)."""

    source: str
    device: str
    machine: str
    table: pd.DataFrame
    kinds: list[str]
    fastest: list[tuple[str, str, str, str]] = field(default_factory=list)
    total: int = 0  # implementations, shown or not
    ratios: list[int] = field(default_factory=list)  # columns of times relative to the baseline


def _machine(env: dict, device: str) -> str:
    """The machine behind a device in a few words, from environment.json (free-form data)."""
    parts = []
    if str(device).startswith("cuda"):
        if env.get("gpu"):
            parts.append(str(env["gpu"]))
    elif env.get("cpu_count"):
        processor = f" {env['processor']}" if env.get("processor") else ""
        parts.append(f"{env['cpu_count']}-CPU{processor}")
    if env.get("threads"):
        parts.append(f"{env['threads']} threads")
    if env.get("torch"):
        parts.append(f"torch {env['torch']}")
    return ", ".join(parts)[:200]


def device_summaries(
    frame: pd.DataFrame, results: list[Results], items: pd.DataFrame, baseline: str = "builtin"
) -> tuple[list[DeviceSummary], pd.DataFrame]:
    """One summary per source and device (every implementation in its rows or its verify.json),
    and all of them as one table (summary.csv).

    Times are geometric means over the measured rows that did not fail verification, relative
    to the baseline on the same case (per mode, and over all modes) and to the bandwidth floor,
    as speedup_table computes them. The fastest per mode is chosen among the implementations
    none of whose rows in that mode failed verification, by that geometric mean; the baseline
    wins a tie."""
    keys = ["source", "device", "implementation"]
    tv = f"time_vs_{baseline}"
    logs = _row_logs(frame, baseline)
    if logs.empty:
        empty: dict[str, list] = {
            "rows": [],
            "failed_verification": [],
            tv: [],
            "time_vs_floor": [],
        }
        overall = pd.DataFrame({**{k: [] for k in keys}, **empty})
        per_mode = pd.DataFrame({**{k: [] for k in keys}, "mode": [], **empty})
    else:
        overall = _geomeans(logs, keys, baseline)
        per_mode = _geomeans(logs, keys + ["mode"], baseline)
    counts = verification_counts(items)
    verdict_columns = [v.value for v in Verdict]
    lost = frame[~frame["status"].isin([Status.OK.value, Status.NOT_SUPPORTED.value])]
    not_measured = lost.groupby(keys).size().rename("not_measured").reset_index()
    unreliable = frame[flagged(frame)].groupby(keys).size().rename("flagged").reset_index()
    everyone = pd.concat([frame[keys], counts[keys]], ignore_index=True).drop_duplicates()
    table = (
        everyone.merge(overall, on=keys, how="left")
        .merge(counts, on=keys, how="left")
        .merge(not_measured, on=keys, how="left")
        .merge(unreliable, on=keys, how="left")
    )
    for column in ["rows", "failed_verification", "not_measured", "flagged", *verdict_columns]:
        table[column] = table[column].fillna(0).astype("int64")
    with_verify = {r.source for r in results if r.verify}
    verdicts = [
        verdict_of(dict(zip(verdict_columns, numbers)), source in with_verify)
        for numbers, source in zip(
            table[verdict_columns].to_numpy().tolist(), table["source"].tolist()
        )
    ]
    table["kind"] = [kind for kind, _ in verdicts]
    table["verification"] = [words for _, words in verdicts]
    modes = per_mode.set_index(keys + ["mode"])[tv].unstack("mode")
    modes = modes.reindex(columns=_mode_order(modes.columns))
    # prefixed, so that no mode name (data) can collide with another column
    mode_columns = {f"{tv}:{m}": str(m) for m in modes.columns}
    modes.columns = list(mode_columns)
    table = table.merge(modes.reset_index(), on=keys, how="left")
    # sources in the order given, then devices, then fastest first
    order = {r.source: k for k, r in enumerate(results)}
    table = (
        table.assign(order=table["source"].map(order))
        .sort_values(["order", "device", tv, "implementation"], na_position="last", kind="stable")
        .drop(columns="order")
        .reset_index(drop=True)
    )
    full = table.drop(columns=["kind", *verdict_columns])

    clean = set(zip(table["source"], table["device"], table["implementation"], table["kind"]))
    clean_keys = {(s, d, i) for s, d, i, kind in clean if kind == "pass"}
    fastest = _fastest_per_mode(per_mode, tv, baseline, clean_keys)
    machines = {r.source: r.environment for r in results}
    summaries = []
    for (source, device), group in table.groupby(["source", "device"], sort=False):
        present = [m for m in mode_columns if group[m].notna().any()]
        shown = group.head(MAX_TABLE_ROWS)
        columns = {"implementation": "implementation", "verification": "verification"}
        columns["rows"] = "rows"
        if shown["failed_verification"].any():
            columns["failed_verification"] = "failed verification"
        if shown["not_measured"].any():
            columns["not_measured"] = "not measured"
        if shown["flagged"].any():
            columns["flagged"] = "flagged (left out)"
        columns |= {m: mode_columns[m] for m in present}
        if len(present) > 1:
            columns[tv] = "all modes"
        if shown["time_vs_floor"].notna().any():
            columns["time_vs_floor"] = "time vs floor"
        verdict_words = dict(zip(group["implementation"], group["verification"]))
        in_device = (per_mode["source"] == source) & (per_mode["device"] == device)
        sentences = []
        for mode in _mode_order(per_mode.loc[in_device, "mode"]):
            impl, words = fastest.get(
                (source, device, mode),
                (
                    "",
                    f"no verified {baseline} rows to compare with (--baseline NAME picks another)",
                ),
            )
            sentences.append((mode, impl, verdict_words.get(impl, "") if impl else "", words))
        summaries.append(
            DeviceSummary(
                str(source),
                str(device),
                _machine(machines.get(source, {}), device),
                shown[list(columns)].rename(columns=columns).reset_index(drop=True),
                shown["kind"].tolist(),
                sentences,
                len(group),
                [k for k, name in enumerate(columns) if name in mode_columns or name == tv],
            )
        )
    return summaries, full


def _fastest_per_mode(
    per_mode: pd.DataFrame, tv: str, baseline: str, clean: set[tuple[str, str, str]]
) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(source, device, mode) -> (the fastest implementation among those none of whose rows in
    the mode failed verification, what to say about it): by the geometric mean of its time
    relative to the baseline, the baseline first on a tie. The words say how much faster it is
    (or the runner-up when it is the baseline), on how many of the mode's cases it was measured
    when fewer than others, and, when it is not ``clean`` (every check of verify.json passing),
    the fastest that is."""
    if per_mode.empty:
        return {}
    keys = ["source", "device", "mode"]
    most = per_mode.groupby(keys)["rows"].transform("max")
    eligible = (per_mode["failed_verification"] == 0) & np.isfinite(per_mode[tv])
    candidates = per_mode[eligible].assign(
        others=(per_mode["implementation"] != baseline).astype(int), most=most[eligible]
    )
    candidates = candidates.sort_values(keys + [tv, "others", "implementation"], kind="stable")
    place = candidates.groupby(keys).cumcount().to_numpy()

    def first(rows: pd.DataFrame) -> dict[tuple, tuple[str, float]]:
        return {
            tuple(k): (str(impl), float(t))
            for k, impl, t in zip(rows[keys].to_numpy().tolist(), rows["implementation"], rows[tv])
        }

    runner_up = first(candidates[place == 1])
    is_clean = [
        key in clean
        for key in zip(candidates["source"], candidates["device"], candidates["implementation"])
    ]
    fastest_clean = first(candidates[is_clean].drop_duplicates(keys))
    answers = {}
    best = candidates[place == 0]
    for k, impl, t, rows, most_rows in zip(
        best[keys].to_numpy().tolist(),
        best["implementation"],
        best[tv],
        best["rows"],
        best["most"],
    ):
        key = (k[0], k[1], k[2])
        if impl == baseline:
            second = runner_up.get(key)
            words = (
                f"the baseline; next: {second[0]} at {second[1]:.3g}x its time"
                if second
                else "the baseline; no other verified implementation was measured"
            )
        else:
            words = f"{t:.3g}x {baseline}'s time"
        if rows < most_rows:
            words += f", measured on {rows} of {most_rows} cases"
        alternative = fastest_clean.get(key)
        if (k[0], k[1], impl) not in clean and alternative:
            words += (
                f"; the fastest with every check passing: {alternative[0]} at "
                f"{alternative[1]:.3g}x {baseline}'s time"
            )
        answers[key] = (str(impl), words)
    return answers


def warnings_list(
    frame: pd.DataFrame, results: list[Results], items: pd.DataFrame, notes: list[str]
) -> list[str]:
    """What a reader must know before trusting the summary: rows flagged as unreliable
    measurements (first), each source's notes (an interrupted sweep, a verify.json from
    another run), a missing verify.json, checks that failed in
    verify.json, rows that failed verification, did not measure or were not supported, and the
    report's own notes (what was left out); at most MAX_WARNINGS lines."""
    several = len(results) > 1
    out = flagged_warnings(frame, several)
    out += [n for r in results for n in r.notes]

    def where(source, column) -> str:
        return f"{column} ({source})" if several else str(column)

    for r in results:
        if r.kind == "pytest-benchmark":
            out.append(f"{r.source}: pytest-benchmark JSON carries no verification: not verified")
        elif r.verify is None and not os.path.lexists(r.path / "verify.json"):
            out.append(
                f"{r.source}: no verify.json in {r.path}: its implementations are not verified "
                "(bnbench run writes one; or bnbench verify --json DIR/verify.json)"
            )
    bad = items[items["verdict"].isin([v.value for v in (Verdict.FAIL, Verdict.UNEXPECTED_PASS)])]
    for (source, column), group in bad.groupby(["source", "column"], sort=False):
        cases = ", ".join(group["case"].head(4)) + (", ..." if len(group) > 4 else "")
        out.append(f"{where(source, column)}: {len(group)} checks failed in verify.json ({cases})")
    frame = frame.assign(column=frame["implementation"] + "@" + frame["device"])
    failed = frame[failed_verification(frame)]
    for (source, column), group in failed.groupby(["source", "column"], sort=True):
        verdicts = ", ".join(sorted(set(group["verified"])))
        out.append(
            f"{where(source, column)}: {len(group)} rows failed verification (verified: "
            f"{verdicts}): never the fastest nor a speed-up (see Rows that failed verification)"
        )
    lost = frame[~frame["status"].isin([Status.OK.value, Status.NOT_SUPPORTED.value])]
    for (source, column), group in lost.groupby(["source", "column"], sort=True):
        statuses = group["status"].value_counts()
        how = ", ".join(f"{status}: {n}" for status, n in statuses.items())
        out.append(
            f"{where(source, column)}: {len(group)} rows did not measure ({how}; see Rows that "
            "did not measure)"
        )
    unsupported = frame[frame["status"] == Status.NOT_SUPPORTED.value]
    for (source, column), group in unsupported.groupby(["source", "column"], sort=True):
        out.append(f"{where(source, column)}: {len(group)} rows not supported (not timed)")
    out += notes
    if len(out) > MAX_WARNINGS:
        out = out[: MAX_WARNINGS - 1] + [f"... and {len(out) - MAX_WARNINGS + 1} more"]
    return out


def correctness_table(results: list[Results] | pd.DataFrame) -> pd.DataFrame:
    """Per source, category and check: the worst verdict of each implementation@device (the
    full matrix, written to correctness.csv); from the results or from verify_items."""
    items = results if isinstance(results, pd.DataFrame) else verify_items(results)
    if items.empty:
        return pd.DataFrame()
    ranked = _ranked(items)
    worst = ranked.groupby(["source", "category", "check", "column"], sort=False)["rank"].min()
    labels = np.array(RANK_LABELS, dtype=object)
    table = pd.Series(labels[worst.to_numpy()], index=worst.index).unstack("column")
    table = table.reset_index()
    table.columns.name = None
    order = table["category"].map(_category_rank)
    return table.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


# The verdicts worst first, and how each reads (an unknown verdict reads as n/s).
RANK_ORDER = [v.value for v in VERDICT_LABELS]
RANK_LABELS = [*VERDICT_LABELS.values(), VERDICT_LABELS[Verdict.NOT_SUPPORTED]]
FOOTNOTED = {"n/s", "dev", "waived"}


def _ranked(items: pd.DataFrame) -> pd.DataFrame:
    rank = items["verdict"].map({v: i for i, v in enumerate(RANK_ORDER)})
    return items.assign(rank=rank.fillna(len(RANK_ORDER)).astype("int64"))


def _category_rank(category: str) -> int:
    return CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES)


@dataclass
class Matrix:
    """One source's correctness matrix, ready to render: one row per check (its category
    alongside, categories in CATEGORIES' order), one column per implementation@device that is
    not n/s everywhere; per cell with anything but pass, its hover text (each case's reason)
    and its footnote numbers (n/s, dev and waived cells; identical reasons share one)."""

    source: str
    checks: list[str]
    categories: list[str]
    columns: list[str]
    labels: np.ndarray  # checks x columns of verdict labels, "" where the check did not run
    titles: dict[tuple[int, int], str]
    refs: dict[tuple[int, int], list[int]]
    footnotes: list[str]
    dropped: list[tuple[str, list[str]]]  # columns n/s everywhere, with their reasons
    more_checks: int = 0
    more_columns: int = 0


def correctness_matrices(items: pd.DataFrame) -> list[Matrix]:
    """The correctness matrix of each source with a verify.json (see Matrix); at most
    MAX_TABLE_ROWS checks and MAX_MATRIX_COLUMNS columns each (correctness.csv has them all)."""
    if items.empty:
        return []
    matrices = []
    for source, group in _ranked(items).groupby("source", sort=False):
        worst = group.groupby(["check", "column"], sort=False)["rank"].min()
        checks = group.drop_duplicates("check")[["check", "category"]]
        checks = checks.iloc[
            np.argsort(checks["category"].map(_category_rank).to_numpy(), kind="stable")
        ]
        columns = list(dict.fromkeys(group["column"]))
        ranks = worst.unstack("column").reindex(index=checks["check"], columns=columns)
        codes = ranks.fillna(len(RANK_LABELS)).to_numpy(dtype="int64")
        labels = np.array([*RANK_LABELS, ""], dtype=object)[codes]
        unsupported = labels == "n/s"
        all_ns = ((unsupported | (labels == "")).all(axis=0)) & unsupported.any(axis=0)
        dropped_columns = [c for c, flag in zip(columns, all_ns) if flag]
        dropped = [
            (
                c,
                list(
                    dict.fromkeys(
                        part
                        for reason in group.loc[group["column"] == c, "reason"]
                        for part in _reasons(reason, "n/s")
                    )
                )[:3],
            )
            for c in dropped_columns
        ]
        kept = [i for i, flag in enumerate(all_ns) if not flag]
        shown_columns = kept[:MAX_MATRIX_COLUMNS]
        n_checks = min(len(checks), MAX_TABLE_ROWS)
        labels = labels[:n_checks][:, shown_columns]
        check_names = checks["check"].tolist()[:n_checks]
        column_names = [columns[i] for i in shown_columns]
        titles, refs, footnotes = _cell_notes(group, worst, check_names, column_names)
        matrices.append(
            Matrix(
                str(source),
                check_names,
                checks["category"].tolist()[:n_checks],
                column_names,
                labels,
                titles,
                refs,
                footnotes,
                dropped,
                len(checks) - n_checks,
                len(kept) - len(shown_columns),
            )
        )
    return matrices


def _reasons(reason: str, label: str) -> list[str]:
    """The separate reasons in a cell's reason: a case is not supported for one or more
    declared reasons, joined with "; " (registry.not_supported_reasons), and each is one
    footnote; any other reason is one."""
    if label != "n/s":
        return [reason]
    return [part.strip() for part in reason.split("; ") if part.strip()] or [reason]


def _cell_notes(
    group: pd.DataFrame, worst: pd.Series, checks: list[str], columns: list[str]
) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], list[int]], list[str]]:
    """For the shown cells that are not pass: hover text (case: reason, one line per case with
    the cell's verdict) and footnote numbers (for n/s, dev and waived; a reason is one footnote
    however many cells share it), and the footnotes in order of first use."""
    row_of = {c: i for i, c in enumerate(checks)}
    column_of = {c: j for j, c in enumerate(columns)}
    shown = group[group["check"].isin(row_of) & group["column"].isin(column_of)]
    shown = shown.merge(worst.rename("worst").reset_index(), on=["check", "column"])
    shown = shown[(shown["rank"] == shown["worst"]) & (shown["verdict"] != Verdict.PASS.value)]
    shown = shown.assign(
        i=shown["check"].map(row_of),
        j=shown["column"].map(column_of),
        label=np.array(RANK_LABELS, dtype=object)[shown["rank"].to_numpy()],
        why=shown["reason"].where(shown["reason"] != "", "(no reason given)"),
    ).sort_values(["i", "j"], kind="stable")
    noted = shown[shown["label"].isin(FOOTNOTED)]
    noted = noted.assign(why=[_reasons(w, label) for w, label in zip(noted["why"], noted["label"])])
    noted = noted.explode("why")
    footnotes = list(dict.fromkeys(noted["why"]))
    number = {reason: k + 1 for k, reason in enumerate(footnotes)}
    titles: dict[tuple[int, int], str] = {}
    refs: dict[tuple[int, int], list[int]] = {}
    lines = (shown["case"] + ": " + shown["why"]).tolist()
    for (i, j), positions in shown.groupby(["i", "j"], sort=False).indices.items():
        cell = list(dict.fromkeys(lines[p] for p in positions))
        titles[(int(i), int(j))] = "\n".join(cell[:8]) + ("\n..." if len(cell) > 8 else "")
    for (i, j), reasons in noted.groupby(["i", "j"], sort=False)["why"]:
        refs[(int(i), int(j))] = sorted({number[r] for r in reasons})
    return titles, refs, footnotes


# ---------------------------------------------------------------------------------------------
# Plots


def safe_name(text: object, limit: int = MAX_NAME_PART) -> str:
    """``text`` as a part of a file name: only [A-Za-z0-9._-], no leading dot or dash (no
    hidden files, no options), at most ``limit`` characters, never empty."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:limit].lstrip(".-")
    return name or "_"


def _label(text: object, limit: int = MAX_LABEL) -> str:
    """A plot label from data: one line, bounded length, every ``$`` escaped (an even number
    of them would switch matplotlib to mathtext, which raises on text like ``$\\frac{$``) and
    no leading underscore (matplotlib leaves such labels out of legends)."""
    flat = " ".join(str(text).split())
    flat = flat if len(flat) <= limit else flat[: limit - 3] + "..."
    flat = flat.replace("$", r"\$")
    return " " + flat if flat.startswith("_") else flat


FAMILY_KEYS = ["source", "device", "dtype", "memory_format", "channels", "spatial", "model"]
MAX_PANELS = 6  # modes drawn side by side


def _families(ok: pd.DataFrame) -> tuple[list[tuple[dict, pd.DataFrame]], int]:
    """Groups whose rows differ only by batch size and implementation: the first
    MAX_FAMILIES of them, and how many more there are."""
    ids = ok.groupby(FAMILY_KEYS, sort=True).ngroup()
    sizes = ok["batch_size"].groupby(ids).nunique()
    plotted = sizes.index[sizes.to_numpy() >= 2]
    chosen = ok[ids.isin(plotted[:MAX_FAMILIES])]
    families = [
        (dict(zip(FAMILY_KEYS, group.iloc[0][FAMILY_KEYS])), group)
        for _, group in chosen.groupby(ids[chosen.index], sort=True)
    ]
    return families, max(0, len(plotted) - MAX_FAMILIES)


def family_text(family: dict, part: Callable[[object], str] = str) -> str:
    """A shape family in words: the model (for a training step) or BatchNorm, the device, dtype
    and memory format, and N x C x spatial. Plain text for headings; ``part=_label`` makes each
    part taken from data a plot label of its own (bounded, ``$`` escaped)."""
    spatial = family.get("spatial")
    shape = f"N x {part(family['channels'])}"
    if spatial not in (None, "", "-") and not pd.isna(spatial):
        shape += f" x {part(spatial)}"
    where = f"{part(family['device'])} {part(family['dtype'])} {part(family['memory_format'])}"
    model = family.get("model")
    if model and not pd.isna(model):
        return f"{part(model)} training step, {where}, input {shape}"
    return f"BatchNorm, {where}, input {shape}"


def _section(family: dict, several_sources: bool) -> str:
    """The heading a family's plots go under (the source's name when a report has several)."""
    text = family_text(family)
    return f"{text} ({family['source']})" if several_sources else text


def _wrap(text: str, width_in: float, fontsize: float = 10) -> list[str]:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points. Words
    are never split (a split could separate an escaped ``\\$`` from its backslash)."""
    chars = max(20, int(width_in * 72 / (0.58 * fontsize)))
    return [
        piece
        for line in text.split("\n")
        for piece in textwrap.wrap(line, chars, break_long_words=False, break_on_hyphens=False)
        or [""]
    ]


def _drawn_implementations(group: pd.DataFrame, baseline: str) -> tuple[list[str], int]:
    """The implementations a plot draws (the baseline first), and how many it leaves out."""
    names = sorted(set(group["implementation"]), key=lambda n: (n != baseline, n))
    return names[:MAX_LINES], max(0, len(names) - MAX_LINES)


def _plot_per_mode(family, group, value, ylabel, title, baseline, logy=True, hline=None):
    """One panel per mode, one line per implementation against batch size; rows that failed
    verification are drawn dashed with a "failed verification" legend entry (when ``value``
    gives them a value at all).

    The figure is sized for its panels, its wrapped title and its legend (to the right of the
    panels, never over a line), with fixed margins in inches rather than tight_layout, which
    draws the figure once more: rendering dominates the time a report takes."""
    modes = _mode_order(group["mode"].unique())[:MAX_PANELS]
    drawn, left_out = _drawn_implementations(group, baseline)
    group = group[group["implementation"].isin(drawn)]
    failed = failed_verification(group)
    entries = {}  # legend label -> line, over every panel
    panel, gap, left, bottom = 3.9, 0.9, 0.8, 0.6
    lines = []
    for mode in modes:
        in_mode = group["mode"] == mode
        for impl in drawn:
            rows = group[in_mode & (group["implementation"] == impl)].sort_values("batch_size")
            if not rows.empty:
                lines.append((mode, impl, rows))
    with_failures = set(group.loc[failed, "implementation"])
    labels = [_label(impl) for impl in drawn]
    labels += [_label(f"{impl} ({FAILED_LABEL})") for impl in drawn if impl in with_failures]
    legend_width = 0.75 + 0.062 * max(len(label) for label in labels)
    width = left + len(modes) * panel + (len(modes) - 1) * gap + legend_width
    more = f"; {left_out} more implementations not drawn" if left_out else ""
    source = f" ({_label(family['source'])})"
    heading = _wrap(f"{title}{more}\n{family_text(family, _label)}{source}", width - 0.4)
    top = 0.2 + 0.19 * len(heading) + 0.35
    height = max(3.6, top + bottom + 2.4, top + 0.3 + 0.18 * len(labels))
    fig = plt.figure(figsize=(width, height))
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        for _, impl, rows in (item for item in lines if item[0] == mode):
            y = value(rows)
            bad = failed[rows.index].to_numpy()
            good_y, bad_y = y.where(~bad), y.where(bad)
            if good_y.notna().any():
                (line,) = ax.plot(rows["batch_size"], good_y, marker="o", label=_label(impl))
                entries.setdefault(line.get_label(), line)
            if bad_y.notna().any():
                (line,) = ax.plot(
                    rows["batch_size"],
                    bad_y,
                    marker="x",
                    linestyle="--",
                    color="red",
                    label=_label(f"{impl} ({FAILED_LABEL})"),
                )
                entries.setdefault(line.get_label(), line)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        _plain_ticks(ax, logy)
        if hline is not None:
            ax.axhline(hline, color="grey", linewidth=0.8, linestyle="--")
        # a fixed position: placing it automatically measures every tick label, a third of the
        # time a figure takes
        ax.set_title(_label(mode), fontsize=10, y=1.0, pad=6)
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("\n".join(heading), fontsize=10, y=1 - 0.12 / height, va="top")
    fig.subplots_adjust(
        left=left / width,
        right=(width - legend_width) / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap / panel,
    )
    if entries:
        fig.legend(
            list(entries.values()),
            list(entries),
            loc="upper left",
            bbox_to_anchor=((width - legend_width + 0.2) / width, 1 - top / height),
            fontsize=8,
            frameon=False,
        )
    return fig


class _MinorLabels(Formatter):
    """Labels 2x and 5x minor ticks of a log axis (plain text) when it spans less than about a
    decade, where the major ticks alone may label nothing."""

    def __call__(self, x, pos=None):
        low, high = sorted(self.axis.get_view_interval()) if self.axis else (0, 0)
        if x <= 0 or low <= 0 or high / low > 12:
            return ""
        lead = round(x / 10 ** np.floor(np.log10(x)))
        return f"{x:g}" if lead in (2, 5) else ""


def _plain_ticks(ax, logy: bool) -> None:
    """Tick labels as plain numbers (1, 8, 0.01): log axes otherwise label with mathtext, whose
    parsing is most of the time a plot takes."""
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    # no minor ticks on the base-2 batch axis: they label nothing and cost a tenth of a plot
    ax.xaxis.set_minor_locator(NullLocator())
    if logy:
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(_MinorLabels())


ACROSS_FAMILIES = "Across shape families"


def make_plots(
    frame: pd.DataFrame,
    baseline: str = "builtin",
    notes: list[str] | None = None,
    sections: dict[str, str] | None = None,
) -> Iterator[tuple[str, str, plt.Figure]]:
    """(file name, caption, figure) for every plot, one at a time (render and close each
    before asking for the next); what was left out is added to ``notes``, and the heading each
    plot goes under (its shape family, in words) to ``sections``. Captions name the family and
    the modes drawn."""
    ok = _measured(frame).copy()
    failed = failed_verification(ok)
    families, not_plotted = _families(ok)
    several = ok["source"].nunique() > 1
    sections = {} if sections is None else sections
    if not_plotted and notes is not None:
        notes.append(f"{not_plotted} more plot families not plotted (the first {MAX_FAMILIES} are)")
    for n, (family, group) in enumerate(families):
        stem = "-".join(
            [
                f"{n:02d}",
                safe_name(family["device"]),
                safe_name(family["dtype"]),
                safe_name(family["model"] or family["channels"]),
            ]
        )
        section = _section(family, several)
        modes = ", ".join(_mode_order(group["mode"].unique())[:MAX_PANELS])
        about = f"{family_text(family)}; one panel per mode: {modes}"
        dashed = f" (dashed: {FAILED_LABEL})" if failed[group.index].any() else ""
        sections[f"{stem}-time.png"] = section
        yield (
            f"{stem}-time.png",
            f"Time per call against batch size{dashed}: {about}",
            _plot_per_mode(
                family,
                group,
                lambda d: d["median_s"] * 1e3,
                "median time (ms, log)",
                "Time per call",
                baseline,
            ),
        )
        keys = ["mode", "batch_size", "shape"]
        usable = group[~failed[group.index]]
        base = usable[usable["implementation"] == baseline].drop_duplicates(keys)
        base = base.set_index(keys)["median_s"]
        if not base.empty:

            def speedup(d, base=base, keys=keys):
                index = pd.MultiIndex.from_frame(d[keys])
                times = base.reindex(index).to_numpy() / d["median_s"].to_numpy()
                # a row that failed verification is no speed-up: not drawn
                times[failed[d.index].to_numpy()] = np.nan
                return pd.Series(times, index=d.index)

            sections[f"{stem}-speedup.png"] = section
            yield (
                f"{stem}-speedup.png",
                f"Speed-up over {baseline} (rows that failed verification not drawn): {about}",
                _plot_per_mode(
                    family,
                    group,
                    speedup,
                    f"{_label(baseline)} time / time (log)",
                    f"Speed-up over {_label(baseline)}",
                    baseline,
                    hline=1.0,
                ),
            )
        if "ratio_to_floor" in group and group["ratio_to_floor"].notna().any():
            sections[f"{stem}-floor.png"] = section
            yield (
                f"{stem}-floor.png",
                f"Share of the bandwidth floor: {about}",
                _plot_per_mode(
                    family,
                    group,
                    lambda d: 100.0 / d["ratio_to_floor"],
                    "% of measured copy bandwidth (log)",
                    "Achieved bandwidth as a share of the floor",
                    baseline,
                ),
            )
    split = _forward_backward_split(ok)
    if split is not None:
        sections["forward-backward-split.png"] = ACROSS_FAMILIES
        yield (
            "forward-backward-split.png",
            "Forward (forward_train) against backward at each family's largest batch, per device",
            split,
        )
    compile_plot = _compile_cost(ok)
    if compile_plot is not None:
        sections["compile-cost.png"] = ACROSS_FAMILIES
        yield (
            "compile-cost.png",
            "Compile cost: seconds spent compiling per implementation@device, by mode",
            compile_plot,
        )


def _elements(shapes: pd.Series) -> pd.Series:
    """The element count of each ``NxCx...`` shape; NaN for anything else."""
    well_formed = shapes.str.fullmatch(r"[0-9]{1,9}(x[0-9]{1,9}){0,7}")
    parts = shapes.where(well_formed, "").str.split("x", expand=True)
    numbers = parts.apply(pd.to_numeric, errors="coerce")
    return numbers.prod(axis=1, min_count=1).where(well_formed)


MAX_SPLIT_PANELS = 4  # devices side by side in the forward/backward plot


def _forward_backward_split(ok: pd.DataFrame):
    """Stacked forward_train and backward time at each family's largest shape, for rows that
    have both (a calibration run has no backward rows: no plot); one panel per source and
    device, each on its own scale (a GPU's bars would vanish next to a CPU's)."""
    both = ok[ok["mode"].isin(["forward_train", "backward"]) & ~failed_verification(ok)]
    if both.empty:
        return None
    # At each (source, device, dtype, shape) family's largest batch, per implementation.
    pivot = both.pivot_table(
        index=["source", "device", "implementation", "shape", "dtype"],
        columns="mode",
        values="median_s",
        aggfunc="min",
    )
    if not {"forward_train", "backward"} <= set(pivot.columns):
        return None
    pivot = pivot[["forward_train", "backward"]].dropna()
    if pivot.empty:
        return None
    pivot = pivot.reset_index()
    pivot["elements"] = _elements(pivot["shape"]).fillna(0)
    largest = pivot.sort_values("elements", kind="stable").drop_duplicates(
        ["source", "device", "implementation", "dtype"], keep="last"
    )
    largest = largest.sort_values(["source", "device", "implementation", "dtype"]).head(MAX_BARS)
    panels = list(largest.groupby(["source", "device"], sort=False))[:MAX_SPLIT_PANELS]
    several = largest["source"].nunique() > 1
    bars = [len(g) for _, g in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(6.0, 1.0 + 0.85 * sum(bars) + 0.9 * len(panels)), 4.6),
        squeeze=False,
        gridspec_kw={"width_ratios": [max(b, 2) for b in bars]},
    )
    for ax, ((source, device), group) in zip(axes[0], panels):
        labels = [
            "\n".join([_label(r.implementation, 16), _label(r.dtype, 16), _label(r.shape, 16)])
            for r in group.itertuples()
        ]
        fwd = group["forward_train"].to_numpy() * 1e3
        bwd = group["backward"].to_numpy() * 1e3
        positions = np.arange(len(labels))
        ax.bar(positions, fwd, label="forward_train")
        ax.bar(positions, bwd, bottom=fwd, label="backward")
        ax.set_xticks(positions, labels)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("median time (ms)")
        ax.set_title(_label(f"{device} ({source})" if several else device, 40), fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Forward against backward at each family's largest batch", fontsize=11)
    fig.tight_layout()
    return fig


def _compile_cost(ok: pd.DataFrame):
    """One horizontal bar per implementation@device (per source when several) that compiled,
    its seconds summed over rows and stacked by mode, the most expensive first, with readable
    labels; None when nothing compiled."""
    table = compile_table(ok)
    if table.empty:
        return None
    shown = table.head(MAX_BARS)
    several = shown["source"].nunique() > 1
    labels = [
        _label(f"{where} ({source})" if several else where, 40) + f" ({graphs} graphs)"
        for where, source, graphs in zip(
            shown["implementation@device"], shown["source"], shown["graphs"]
        )
    ]
    modes = [c for c in shown.columns if c.endswith("_s") and c != "total_s"]
    height = 1.4 + 0.42 * len(shown)
    fig, ax = plt.subplots(figsize=(9.0, height))
    positions = np.arange(len(shown))
    start = np.zeros(len(shown))
    for column in modes:
        seconds = shown[column].fillna(0.0).to_numpy(dtype=float)
        ax.barh(positions, seconds, left=start, label=_label(column[:-2]), height=0.6)
        start += seconds
    for y, total in zip(positions, start):
        ax.text(float(total), float(y), f" {total:.3g} s", va="center", fontsize=8)
    ax.set_yticks(positions, labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(float(start.max()), 1e-3) * 1.18)  # room for the totals
    ax.set_xlabel("seconds spent compiling, summed over rows")
    more = f" (the {len(shown)} most expensive of {len(table)})" if len(table) > len(shown) else ""
    ax.set_title(f"Compile cost per implementation@device{more}", fontsize=10)
    ax.legend(
        fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="mode", title_fontsize=8
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Output


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=90)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def md_text(value: object) -> str:
    """``value`` as Markdown text that renders as itself: on one line, no table-breaking
    ``|``, no HTML, no emphasis, links, code spans or math."""
    text = " ".join(str(value).splitlines())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("|", "&#124;")
    return re.sub(r"([\\`*\[\]$~])", r"\\\1", text)


def _missing(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and bool(np.isnan(value))


def _cell(value: object) -> str:
    """A table cell's text (not yet escaped): nothing for a missing value, whole numbers
    whole, other numbers to 3 significant digits, text cut at MAX_CELL_TEXT characters (the
    CSV files next to report.md have it all)."""
    if _missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= MAX_CELL_TEXT else text[: MAX_CELL_TEXT - 3] + "..."


def _md_cell(value: object) -> str:
    return md_text(_cell(value))


def _numeric(frame: pd.DataFrame) -> list[bool]:
    """Per column position: whether it holds numbers (right-aligned)."""
    return [
        pd.api.types.is_numeric_dtype(frame.iloc[:, k])
        and not pd.api.types.is_bool_dtype(frame.iloc[:, k])
        for k in range(frame.shape[1])
    ]


def _md(frame: pd.DataFrame) -> str:
    """A Markdown table whose every cell is escaped text (numbers formatted here, so tabulate
    parses nothing)."""
    if frame.empty:
        return "_nothing to show_\n"
    cells = [[_md_cell(v) for v in row] for row in frame.itertuples(index=False)]
    return (
        pd.DataFrame(cells).to_markdown(
            index=False,
            headers=[md_text(c) for c in frame.columns],
            disable_numparse=True,
            colalign=["right" if n else "left" for n in _numeric(frame)],
        )
        + "\n"
    )


def _md_summary(summary: DeviceSummary, several: bool, baseline: str) -> str:
    heading = f"{summary.device} ({summary.source})" if several else summary.device
    out = [f"\n### {md_text(heading)}\n\n"]
    if summary.machine:
        out.append(f"{md_text(summary.machine)}\n\n")
    out.append(_md(summary.table))
    if summary.total > len(summary.table):
        out.append(
            f"\n{md_text(f'Showing {len(summary.table)} of {summary.total} implementations')}"
            " (summary.csv has them all).\n"
        )
    if summary.fastest:
        out.append(f"\n{FASTEST_INTRO}\n\n")
        out += [
            f"- {md_text(mode)}: **{md_text(impl)}** ({md_text(verdict or 'not verified')}): "
            f"{md_text(words)}\n"
            if impl
            else f"- {md_text(mode)}: {md_text(words)}\n"
            for mode, impl, verdict, words in summary.fastest
        ]
    return "".join(out)


def _md_matrix(matrix: Matrix, several: bool) -> str:
    out = [f"\n### {md_text(matrix.source)}\n\n"] if several else ["\n"]
    rows, current = [], None
    for i, check in enumerate(matrix.checks):
        category = matrix.categories[i]
        cells = []
        for j, label in enumerate(matrix.labels[i]):
            refs = matrix.refs.get((i, j))
            cells.append(f"{label} [{', '.join(map(str, refs))}]" if refs else label)
        rows.append(["" if category == current else category, check, *cells])
        current = category
    out.append(_md(pd.DataFrame(rows, columns=["category", "check", *matrix.columns])))
    out += [f"\n{md_text(line)}\n" for line in _matrix_remarks(matrix)]
    if matrix.footnotes:
        out.append("\nWhy (the reasons behind n/s, dev and waived cells):\n\n")
        out += [f"{k}. {md_text(reason)}\n" for k, reason in enumerate(matrix.footnotes, 1)]
    return "".join(out)


def _matrix_remarks(matrix: Matrix) -> list[str]:
    """What a matrix leaves out, in words: columns not supported anywhere, and the caps."""
    out = []
    if matrix.dropped:
        dropped = "; ".join(
            f"{column} ({', '.join(reasons) or 'no reason given'})"
            for column, reasons in matrix.dropped
        )
        out.append(f"Columns not shown, every check not supported: {dropped}.")
    if matrix.more_checks:
        out.append(
            f"Showing the first {len(matrix.checks)} of {len(matrix.checks) + matrix.more_checks}"
            f" checks; all of them are in {CSV_NAMES['correctness']}."
        )
    if matrix.more_columns:
        out.append(
            f"Showing {len(matrix.columns)} of {len(matrix.columns) + matrix.more_columns} "
            f"columns; all of them are in {CSV_NAMES['correctness']}."
        )
    return out


def _md_legend() -> str:
    return "".join(f"- `{label}`: {md_text(meaning)}\n" for label, meaning in LEGEND.items())


def _html_table(frame: pd.DataFrame, classes: dict[int, list[str]] | None = None) -> str:
    """An HTML table of escaped text inside a wrapper that scrolls sideways (a wide table
    never widens the page): numbers right-aligned, long text wrapped, a verdict or status
    coloured; ``classes`` adds a CSS class per cell of the columns at those positions."""
    if frame.empty:
        return "<p><em>nothing to show</em></p>"
    classes = classes or {}
    # a long column name may break after an underscore when the page is narrow
    head = "".join(
        f"<th scope=col>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in frame.columns
    )
    columns = []
    for k, (name, numeric) in enumerate(zip(frame.columns, _numeric(frame))):
        values = frame.iloc[:, k].tolist()
        texts = [_cell(v) for v in values]
        base = "num" if numeric else ("long" if any(len(t) > 80 for t in texts) else "")
        coloured = str(name) in ("verified", "status", "verdict")
        extra = classes.get(k, [""] * len(values))
        cells = []
        for value, text, more in zip(values, texts, extra):
            names = " ".join(
                n for n in (base, CELL_CLASSES.get(str(value), "") if coloured else "", more) if n
            )
            attribute = f" class='{names}'" if names else ""
            cells.append(f"<td{attribute}>{html.escape(text)}</td>")
        columns.append(cells)
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in zip(*columns))
    return (
        f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
        "</table></div>"
    )


def _html_summary(summary: DeviceSummary, several: bool, baseline: str) -> str:
    heading = f"{summary.device} ({summary.source})" if several else summary.device
    out = [f"<h3>{html.escape(heading)}</h3>"]
    if summary.machine:
        out.append(f"<p class=machine>{html.escape(summary.machine)}</p>")
    table = summary.table
    classes = {1: [KIND_CLASSES.get(kind, "") for kind in summary.kinds]}
    for k in summary.ratios:  # faster than the baseline: in green
        values = table.iloc[:, k].to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            classes[k] = ["faster" if v < 0.995 else "" for v in values]
    out.append(_html_table(table, classes))
    if summary.total > len(table):
        out.append(
            f"<p>Showing {len(table)} of {summary.total} implementations (summary.csv has them "
            "all).</p>"
        )
    if summary.fastest:
        out.append(f"<p>{FASTEST_INTRO}</p><ul class=fastest>")
        out += [
            f"<li>{html.escape(mode)}: <strong>{html.escape(impl)}</strong> "
            f"({html.escape(verdict or 'not verified')}): {html.escape(words)}</li>"
            if impl
            else f"<li>{html.escape(mode)}: {html.escape(words)}</li>"
            for mode, impl, verdict, words in summary.fastest
        ]
        out.append("</ul>")
    return "".join(out)


def _html_matrix(matrix: Matrix, number: int, several: bool) -> str:
    """A correctness matrix: rows grouped under their category, cells coloured by verdict,
    each non-pass cell's reasons on hover (title) and n/s, dev and waived cells linked to the
    footnotes below it."""
    out = [f"<h3>{html.escape(matrix.source)}</h3>"] if several else []
    head = "<th scope=col>check</th>" + "".join(
        f"<th scope=col>{html.escape(c)}</th>" for c in matrix.columns
    )
    body, current = [], None
    span = len(matrix.columns) + 1
    for i, check in enumerate(matrix.checks):
        if matrix.categories[i] != current:
            current = matrix.categories[i]
            body.append(
                f"<tr class=cat><th colspan={span} scope=rowgroup>{html.escape(current)}</th></tr>"
            )
        cells = []
        for j, label in enumerate(matrix.labels[i]):
            title = matrix.titles.get((i, j))
            attributes = f" class='{VERDICT_CLASSES[label]}'" if label in VERDICT_CLASSES else ""
            if title:
                attributes += f" title='{html.escape(title)}'"
            refs = "".join(
                f"<a href='#fn{number}-{k}'>[{k}]</a>" for k in matrix.refs.get((i, j), [])
            )
            cells.append(
                f"<td{attributes}>{html.escape(label)}{f'<sup>{refs}</sup>' * bool(refs)}</td>"
            )
        body.append(f"<tr><th scope=row>{html.escape(check)}</th>{''.join(cells)}</tr>")
    out.append(
        f"<div class=scroll><table class=matrix><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )
    out += [f"<p class=remark>{html.escape(line)}</p>" for line in _matrix_remarks(matrix)]
    if matrix.footnotes:
        out.append("<p>Why (the reasons behind n/s, dev and waived cells):</p><ol class=footnotes>")
        out += [
            f"<li id='fn{number}-{k}'>{html.escape(reason)}</li>"
            for k, reason in enumerate(matrix.footnotes, 1)
        ]
        out.append("</ol>")
    return "".join(out)


def _html_legend() -> str:
    return (
        "<ul class=legend>"
        + "".join(
            f"<li><span class='chip {VERDICT_CLASSES[label]}'>{html.escape(label)}</span> "
            f"{html.escape(meaning)}</li>"
            for label, meaning in LEGEND.items()
        )
        + "</ul>"
    )


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:#1f2328;margin:0 auto;max-width:1280px;padding:1em 1.5em 3em;overflow-wrap:anywhere}
h1{font-size:1.6em;margin:.4em 0}
h2{font-size:1.3em;margin-top:1.8em;padding-bottom:.2em;border-bottom:1px solid #d0d7de}
h3{font-size:1.08em;margin:1.4em 0 .4em}
nav{font-size:.9em;color:#57606a}nav a{margin-right:.9em}
a{color:#0969da}
.scroll{overflow-x:auto;max-width:100%;margin:.4em 0 1em}
table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top;
white-space:nowrap;overflow-wrap:normal}
thead th{background:#f6f8fa;font-weight:600;white-space:normal}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.long{white-space:normal;min-width:18em;max-width:48em;overflow-wrap:anywhere}
td.faster{color:#116329;font-weight:600}
.v-pass{background:#dafbe1;color:#116329}
.v-fail{background:#ffd7d5;color:#82071e;font-weight:600}
.v-xpass{background:#fbd4f6;color:#8a1a7b;font-weight:600}
.v-waived{background:#cdf3f9;color:#0b5a66}
.v-dev{background:#fff1b8;color:#6b4b00}
.v-ns{background:#e6e8eb;color:#57606a}
.v-none{background:#f6f8fa;color:#57606a;font-style:italic}
table.matrix td{text-align:center}
table.matrix td[title]{cursor:help}
table.matrix tbody th{font-weight:normal}
tr.cat th{background:#eef1f4;font-weight:600}
sup a{text-decoration:none;font-size:.85em}
.legend{list-style:none;padding:0;margin:.4em 0;display:flex;flex-wrap:wrap;gap:.3em 1.4em;
font-size:.9em}
.chip{display:inline-block;min-width:3em;text-align:center;padding:0 .4em;border-radius:3px;
border:1px solid #d0d7de}
.warnings{background:#fff8e6;border-left:4px solid #d4a72c;margin:.5em 0;
padding:.5em 1em .5em 2.2em}
.warnings li{margin:.15em 0}
.none{color:#116329}
.machine{color:#57606a;margin:-.2em 0 .3em}
.remark{color:#57606a;font-size:.92em}
ol.footnotes{font-size:.9em;color:#3d444d}
figure{margin:.8em 0 2em}
figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.9em;color:#57606a}
""".strip()


# Tables that can grow with the input, and the CSV file each is written to in full.
CSV_NAMES = {
    "summary": "summary.csv",
    "speedup": "speedup.csv",
    "fastest": "fastest.csv",
    "failed": "failed-verification.csv",
    "flagged": "flagged.csv",
    "correctness": "correctness.csv",
    "compile": "compile-cost.csv",
    "problems": "not-measured.csv",
    "dist": "sync-across-ranks.csv",
    "ab": "ab.csv",
    "gpu": "gpu.csv",
}
CORRECTNESS = "Correctness (bnbench verify)"


def _plot_path(plots: Path, name: str) -> Path:
    """Where plot ``name`` is written: a sanitized name, resolving inside ``plots``."""
    if name != safe_name(name, limit=200):
        raise ValueError(f"unsafe plot file name {name!r}")
    target = plots / name
    if target.resolve().parent != plots.resolve():
        raise ValueError(f"plot file {name!r} would be written outside {plots}")
    return target


def write_report(inputs: list[str], output: str | os.PathLike, baseline: str = "builtin") -> Path:
    """report.md, a self-contained report.html and plots/*.png from stored runs; times are
    compared with the ``baseline`` implementation. Both documents open with the summary per
    device and the warnings, then the details."""
    results = [load(p) for p in inputs]
    frame = combine(results)
    output = Path(output)
    plots_dir = output / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    if not plots_dir.resolve().is_relative_to(output.resolve()):
        raise ReportInputError(f"{plots_dir}: resolves outside {output} ({plots_dir.resolve()})")
    several = len(results) > 1
    items = verify_items(results)
    dist_notes: list[str] = []
    dist = dist_frames(results, dist_notes)
    summaries: list[DeviceSummary]
    if frame.empty:  # a directory of bench --world-size holds an empty results.csv
        summaries, summary_table = [], pd.DataFrame()
    else:
        summaries, summary_table = device_summaries(frame, results, items, baseline)
    matrices = correctness_matrices(items)
    # (heading, table, CSV file for the full table or None)
    tables: list[tuple[str, pd.DataFrame, str | None]] = [
        (
            f"Speed relative to {baseline} and to the floor (geometric means)",
            speedup_table(frame, baseline),
            CSV_NAMES["speedup"],
        ),
        ("Fastest implementation per case", fastest_table(frame, baseline), CSV_NAMES["fastest"]),
    ]
    unreliable = flagged_table(frame)
    if not unreliable.empty:
        tables.append((FLAGGED_HEADING, unreliable, CSV_NAMES["flagged"]))
    failed = failed_verification_table(frame)
    if not failed.empty:
        tables.append(("Rows that failed verification", failed, CSV_NAMES["failed"]))
    tables.append((CORRECTNESS, correctness_table(items), CSV_NAMES["correctness"]))
    compiled = compile_table(frame)
    if not compiled.empty:
        tables.append(
            (
                "Compile cost (seconds spent compiling, summed over rows)",
                compiled,
                CSV_NAMES["compile"],
            )
        )
    problems = not_measured_table(frame)
    if not problems.empty:
        tables.append(("Rows that did not measure", problems, CSV_NAMES["problems"]))
    paragraphs: dict[str, list[str]] = {}
    if not unreliable.empty:
        paragraphs[FLAGGED_HEADING] = [FLAGGED_HOW]
    if dist:
        tables.append((DIST_HEADING, dist_table(dist), CSV_NAMES["dist"]))
        paragraphs[DIST_HEADING] = [DIST_HOW]
    gpu = gpu_table(frame, baseline)
    if not gpu.empty:
        tables.append((GPU_HEADING, gpu, CSV_NAMES["gpu"]))
        paragraphs[GPU_HEADING] = [GPU_HOW]
    ab = ab_section(results)
    if ab is not None:
        tables.append((AB_HEADING, ab[0], CSV_NAMES["ab"]))
        paragraphs[AB_HEADING] = ab[1]
    tables.append(("Environment", environment_table(results), None))
    studies = []
    for r in results:
        if not r.study:
            continue
        rows, summary = r.study
        heading = f"BatchNorm against no BatchNorm on digits ({r.source})"
        tables.append((heading, pd.DataFrame(summary["summary"]), None))
        paragraphs[heading] = [str(line) for line in summary["conclusion"]]
        studies.append((r.source, rows, float(summary["study"]["target"])))

    notes: list[str] = dist_notes  # the report's own: what it left out
    plots = _render_plots(frame, baseline, studies, plots_dir, notes, dist)
    warnings = warnings_list(frame, results, items, notes)

    shown: dict[str, pd.DataFrame] = {}
    written: set[str] = set()
    if not summary_table.empty:
        write_atomic(output / CSV_NAMES["summary"], summary_table.to_csv(index=False))
        written.add(CSV_NAMES["summary"])
    for heading, table, csv_name in tables:
        if csv_name and not table.empty:
            write_atomic(output / csv_name, table.to_csv(index=False))
            written.add(csv_name)
        if len(table) > MAX_TABLE_ROWS and heading != CORRECTNESS:  # matrices say it apart
            note = (
                f"Showing the first {MAX_TABLE_ROWS} of {len(table)} rows; all of them are in "
                f"{csv_name}."
            )
            paragraphs.setdefault(heading, []).append(note)
            table = table.head(MAX_TABLE_ROWS)
        if not several and "source" in table:  # one source: its name in the title is enough
            table = table.drop(columns="source")
        shown[heading] = table

    for stale in set(CSV_NAMES.values()) - written:  # an earlier report's, now wrong
        if (output / stale).is_file():
            (output / stale).unlink()
    title = "bnbench report: " + ", ".join(r.source for r in results)
    intro = (
        f"{len(frame)} rows from {len(results)} source(s). Times are medians. Rows whose "
        "implementation failed verification (verified: fail, unexpected-pass or waived) are "
        "never the fastest nor a speed-up."
    )
    if not unreliable.empty:
        intro += (
            f" WARNING: {len(unreliable)} measured rows are flagged as unreliable measurements "
            "(a busy machine, or a wrong floor) and left out of every summary figure: see "
            "Warnings."
        )
    how = (
        f"Per implementation: its verification verdict (from verify.json), the rows it measured "
        "(and how many failed verification or did not measure), "
        f"and its time relative to {baseline}'s on the same cases (geometric mean over the rows "
        f"that did not fail verification; below 1 is faster than {baseline}) per mode and over "
        "all modes, and relative to the bandwidth floor (copying the same bytes; 1 is as fast "
        "as memory allows). The fastest per mode is chosen among the implementations none of "
        "whose rows in that mode failed verification."
    )
    by_section: dict[str, list[tuple[str, str, bytes]]] = {}
    for name, caption, data, section in plots:
        by_section.setdefault(section, []).append((name, caption, data))

    md = [f"# {md_text(title)}\n\n{md_text(intro)}\n\n## Summary\n\n{md_text(how)}\n"]
    md += [_md_summary(s, several, baseline) for s in summaries] or ["\n_nothing measured_\n"]
    md.append("\n## Warnings\n\n")
    md += [f"- {md_text(w)}\n" for w in warnings] or ["None.\n"]
    md.append("\nThe details follow: tables, the correctness matrix, the plots.\n")
    for heading, table in shown.items():
        md += [f"\n## {md_text(heading)}\n\n"]
        md += [f"{md_text(line)}\n\n" for line in paragraphs.get(heading, [])]
        if heading == CORRECTNESS:
            if matrices:
                md.append(_md_legend())
                md += [_md_matrix(m, several) for m in matrices]
            else:
                md.append("_nothing to show_\n")
        else:
            md.append(_md(table))
    md.append("\n## Plots\n")
    for section, items_in in by_section.items():
        md.append(f"\n### {md_text(section)}\n")
        md += [
            f"\n{md_text(caption)}\n\n![{md_text(caption)}](plots/{name})\n"
            for name, caption, _ in items_in
        ]
    write_atomic(output / "report.md", "".join(md))

    headings = ["Summary", "Warnings", *shown, "Plots"]
    anchors = {h: f"s{k}" for k, h in enumerate(headings)}
    body = [
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p><nav>"
        + "".join(f"<a href='#{anchors[h]}'>{html.escape(h)}</a>" for h in headings)
        + "</nav>",
        f"<h2 id={anchors['Summary']}>Summary</h2><p>{html.escape(how)}</p>",
    ]
    body += [_html_summary(s, several, baseline) for s in summaries] or [
        "<p><em>nothing measured</em></p>"
    ]
    body.append(f"<h2 id={anchors['Warnings']}>Warnings</h2>")
    if warnings:
        body.append(
            "<ul class=warnings>"
            + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
            + "</ul>"
        )
    else:
        body.append("<p class=none>None.</p>")
    for heading, table in shown.items():
        body.append(f"<h2 id={anchors[heading]}>{html.escape(heading)}</h2>")
        body += [f"<p>{html.escape(line)}</p>" for line in paragraphs.get(heading, [])]
        if heading == CORRECTNESS:
            if matrices:
                body.append(_html_legend())
                body += [_html_matrix(m, k, several) for k, m in enumerate(matrices)]
            else:
                body.append("<p><em>nothing to show</em></p>")
        else:
            body.append(_html_table(table))
    body.append(f"<h2 id={anchors['Plots']}>Plots</h2>")
    for section, items_in in by_section.items():
        body.append(f"<h3>{html.escape(section)}</h3>")
        for name, caption, data in items_in:
            encoded = base64.b64encode(data).decode("ascii")
            body.append(
                f"<figure><img alt='{html.escape(caption)}' "
                f"src='data:image/png;base64,{encoded}'><figcaption>"
                f"{html.escape(caption)} ({html.escape(name)})</figcaption></figure>"
            )
    page = (
        "<!doctype html><html lang=en><head><meta charset='utf-8'>"
        "<meta name=viewport content='width=device-width, initial-scale=1'><title>"
        f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    write_atomic(output / "report.html", page)
    return output / "report.html"


def _render_plots(
    frame: pd.DataFrame,
    baseline: str,
    studies: list[tuple[str, list[dict], float]],
    plots_dir: Path,
    notes: list[str],
    dist: list[tuple[str, pd.DataFrame]] | None = None,
) -> list[tuple[str, str, bytes, str]]:
    """Every plot rendered to PNG and written into ``plots_dir``: (name, caption, PNG bytes,
    the heading it goes under). Each figure is closed before the next is drawn. Labels from
    data go through _label, so a ``$`` in them is a dollar sign, not mathtext."""
    plots: list[tuple[str, str, bytes, str]] = []
    taken: set[str] = set()
    sections: dict[str, str] = {}
    with matplotlib.rc_context({"text.usetex": False}):
        for name, caption, fig in chain(
            make_plots(frame, baseline, notes, sections),
            _study_plots(studies, notes, sections),
            _dist_plots(dist or [], notes, sections),
        ):
            stem, suffix = name.rsplit(".", 1)
            unique, k = name, 1
            while unique in taken:  # names are unique by construction; belt and braces
                k += 1
                unique = f"{stem}-{k}.{suffix}"
            taken.add(unique)
            data = _png(fig)
            write_atomic(_plot_path(plots_dir, unique), data)
            plots.append((unique, caption, data, sections.get(name, ACROSS_FAMILIES)))
    return plots


def _study_plots(
    studies: list[tuple[str, list[dict], float]],
    notes: list[str],
    sections: dict[str, str] | None = None,
) -> Iterator[tuple[str, str, plt.Figure]]:
    """The BatchNorm study's curves per source (bounded: a huge study.csv is not plotted)."""
    from bnbench.study import plot as study_plot

    sections = {} if sections is None else sections
    for n, (source, rows, target) in enumerate(studies):
        if len(rows) > MAX_STUDY_ROWS:
            notes.append(f"{source}: the study has {len(rows)} rows; its curves are not plotted")
            continue
        models = list(dict.fromkeys(r["model"] for r in rows))
        if len(models) > MAX_STUDY_MODELS:
            notes.append(
                f"{source}: the study's curves are plotted for its first "
                f"{MAX_STUDY_MODELS} of {len(models)} models"
            )
            keep = set(models[:MAX_STUDY_MODELS])
            rows = [r for r in rows if r["model"] in keep]
        rows = [dict(r, model=_label(r["model"])) for r in rows]  # the plot's titles
        name = f"study-{n:02d}-{safe_name(source)}.png"
        sections[name] = "BatchNorm against no BatchNorm on digits"
        yield (
            name,
            f"BatchNorm against no BatchNorm: test accuracy per training step ({source})",
            study_plot(rows, target),
        )


# ---------------------------------------------------------------------------------------------
# Synchronized BatchNorm across ranks (bench --world-size: dist_results.csv)

DIST_HEADING = "Synchronized BatchNorm across ranks"
DIST_HOW = (
    "bnbench bench --world-size: each rank runs the same per-rank batch (the global batch "
    "grows with the ranks). time: the slowest rank's median per call (a step waits for it). "
    "vs 1 rank: against the same row with one rank, where a synchronized BatchNorm runs "
    "locally. vs local BN: against nn.BatchNorm on the same shard, timed on every rank at the "
    "same time. comm share: time inside torch.distributed collectives over the timed time, "
    "over all ranks (n/a: none seen at more than one rank). oversubscribed: more ranks x "
    "threads than cores: times include ranks waiting for a descheduled peer."
)
DIST_REQUIRED = ["implementation", "device", "world_size", "mode", "shape", "status", "median_s"]
MAX_DIST_PLOTS = 8


def validate_dist(table) -> pd.DataFrame:
    """dist_results.csv checked as results.csv is: key columns named, statuses known, counts
    whole and positive, measured rows with positive times, shares within [0, 1], each row's
    key once."""
    from bnbench.dist_bench import DIST_INTEGER, DIST_KEY

    frame = table.frame
    for column in ("implementation", "device", "mode", "shape", "status"):
        _fail(table, column, frame[column] == "", frame[column], "is required")
    statuses = [s.value for s in Status]
    _fail(
        table,
        "status",
        ~frame["status"].isin(statuses),
        frame["status"],
        f"is not a status (one of {', '.join(statuses)})",
    )
    positive = [c for c in ("world_size", "batch_per_rank", "global_batch") if c in frame]
    _check_integers(table, [c for c in frame if c in DIST_INTEGER], positive)
    measured = frame["status"] == Status.OK.value
    for column in ("median_s", "p20_s", "p80_s", "local_median_s", "ratio_to_local"):
        if column not in frame:
            continue
        values = frame[column]
        if column in ("median_s", "local_median_s"):
            _fail(table, column, measured & values.isna(), values, "is required for a measured row")
        _fail(table, column, measured & (values <= 0), values, "is not positive")
    if "comm_share" in frame:
        share = frame["comm_share"]
        _fail(table, "comm_share", (share < 0) | (share > 1), share, "is not between 0 and 1")
    key = [k for k in DIST_KEY if k in frame]
    twice = frame.duplicated(key, keep=False).to_numpy()
    if twice.any():
        first = int(np.flatnonzero(twice)[0])
        raise ReportInputError(
            f"{table.path}: {table.where(first)}: a row whose key ({', '.join(key)}) is not unique"
        )
    return frame


def dist_frames(results: list[Results], notes: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(source, validated dist_results.csv) for each bench directory that holds one written
    with its environment.json (recorded there with its sha256); another run's is noted and
    left out."""
    import hashlib

    from bnbench.dist_bench import DIST_NUMERIC, DIST_RESULTS
    from bnbench.runs import MAX_CSV_BYTES

    out = []
    for r in results:
        path = r.path / DIST_RESULTS
        if r.kind != "bnbench" or not os.path.lexists(path):
            continue
        data = read_bytes(path, MAX_CSV_BYTES)
        record = (r.environment.get("files") or {}).get(DIST_RESULTS)
        if (
            not isinstance(record, dict)
            or hashlib.sha256(data).hexdigest() != str(record.get("sha256", "")).lower()
        ):
            notes.append(
                f"{r.source}: {DIST_RESULTS} in {r.path} is not the one its environment.json "
                "records (from another run); not shown"
            )
            continue
        frame = validate_dist(
            read_table(path, DIST_REQUIRED, set(DIST_NUMERIC) | _dist_ints(), data, DIST_RESULTS)
        )
        lost = frame[~frame["status"].isin([Status.OK.value, Status.NOT_SUPPORTED.value])]
        for row in lost.head(10).itertuples(index=False):
            first = str(row.message).splitlines()[0] if isinstance(row.message, str) else ""
            notes.append(
                f"{r.source}: {row.implementation}@{row.device} x{row.world_size} {row.mode} "
                f"{row.shape}: {row.status} ({first[:MAX_REASON]})"
            )
        if len(lost) > 10:
            notes.append(f"{r.source}: ... and {len(lost) - 10} more rows across ranks lost")
        out.append((r.source, frame))
    return out


def _dist_ints() -> set[str]:
    from bnbench.dist_bench import DIST_INTEGER

    return set(DIST_INTEGER)


def dist_table(dist: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """How the cost grows with the ranks: one row per measured (source, implementation,
    device, per-rank shape, mode, world size)."""
    from bnbench.dist_bench import scaling, share_text

    rows = []
    for source, frame in dist:
        records = frame.astype(object).where(frame.notna(), None).to_dict("records")
        for r in scaling(records):
            rows.append(
                {
                    "source": source,
                    "implementation": r["implementation"],
                    "device": r["device"],
                    "shape per rank": r["shape"],
                    "mode": r["mode"],
                    "ranks": r["world_size"],
                    "time (ms)": r["median_s"] * 1e3,
                    "vs 1 rank": r["vs_world_size_1"],
                    "vs local BN": r["vs_local"],
                    "comm share": share_text(r["comm_share"]),
                    "oversubscribed": r["oversubscribed"],
                }
            )
    columns = [
        "source",
        "implementation",
        "device",
        "shape per rank",
        "mode",
        "ranks",
        "time (ms)",
        "vs 1 rank",
        "vs local BN",
        "comm share",
        "oversubscribed",
    ]
    return pd.DataFrame(rows, columns=columns)


def _dist_plots(
    dist: list[tuple[str, pd.DataFrame]], notes: list[str], sections: dict[str, str]
) -> Iterator[tuple[str, str, plt.Figure]]:
    """Time against the number of ranks, one figure per (source, device, per-rank shape): a
    line per implementation and mode, local BatchNorm dashed."""
    table = dist_table(dist)
    groups = list(table.groupby(["source", "device", "shape per rank"], sort=False))
    if len(groups) > MAX_DIST_PLOTS:
        notes.append(
            f"{len(groups) - MAX_DIST_PLOTS} more per-rank shapes across ranks not plotted "
            f"(the first {MAX_DIST_PLOTS} are)"
        )
    frames = {source: frame for source, frame in dist}
    for n, ((source, device, shape), group) in enumerate(groups[:MAX_DIST_PLOTS]):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        raw = frames[source]
        raw = raw[(raw["device"] == device) & (raw["shape"] == shape) & (raw["status"] == "ok")]
        local_drawn: set[str] = set()  # local BN once per mode (each implementation's run
        # timed its own, on the same shards)
        for k, ((impl, mode), line) in enumerate(group.groupby(["implementation", "mode"])):
            if k >= MAX_LINES:
                notes.append(f"{source}, {device}, {shape}: the first {MAX_LINES} lines drawn")
                break
            line = line.sort_values("ranks")
            colour = colours[k % len(colours)]
            ax.plot(
                line["ranks"], line["time (ms)"], "o-", color=colour, label=_label(f"{impl} {mode}")
            )
            if mode in local_drawn:
                continue
            local_drawn.add(mode)
            local = raw[(raw["implementation"] == impl) & (raw["mode"] == mode)]
            local = local.sort_values("world_size")
            ax.plot(
                local["world_size"],
                local["local_median_s"] * 1e3,
                "x--",
                color=colour,
                alpha=0.6,
                label=_label(f"local BN {mode}"),
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ranks = sorted(set(group["ranks"]))
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ranks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("ranks (world size)")
        ax.set_ylabel("median time per call (ms, log)")
        ax.set_title(_label(f"{device}, {shape} per rank", limit=80))
        ax.legend(fontsize=7, loc="best")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        name = f"dist-{n:02d}-{safe_name(device)}-{safe_name(shape)}.png"
        sections[name] = DIST_HEADING
        yield (
            name,
            f"Time per call against the number of ranks ({source}, {device}, per-rank shape "
            f"{shape}; dashed: local BatchNorm on the same shard)",
            fig,
        )


AB_HEADING = "Interleaved A/B (bnbench ab)"
AB_HOW = (
    "Both implementations measured in one run, their timed blocks alternating in a randomized "
    "order, so that the machine's noise hits both alike. Per case: candidate / baseline (the "
    "Hodges-Lehmann estimate of the pairs' log ratios) with its 95% interval; slower when the "
    "whole interval lies above 1 + threshold, faster when below its inverse, same when inside, "
    "unsure otherwise. Times are medians per call."
)


def ab_section(results: list[Results]) -> tuple[pd.DataFrame, list[str]] | None:
    """The cases of every ``ab.json`` (``bnbench ab --json DIR/ab.json``) in the input
    directories, and a line per file with its verdict; None when there is none. An unusable
    ab.json is an input error naming it."""
    from bnbench.ab import load_document
    from bnbench.regression import printable

    rows, lines = [], [AB_HOW]
    for r in results:
        path = Path(r.path) / "ab.json"
        if not Path(r.path).is_dir() or not os.path.lexists(path):
            continue
        try:
            doc = load_document(path)
        except ValueError as exc:
            raise ReportInputError(str(exc)) from None
        s = doc.summary
        figure = (
            "nothing compared"
            if s.ratio is None or s.ci_low is None or s.ci_high is None
            else f"geometric mean {s.ratio:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}] over "
            f"{s.cases} cases: {s.verdict}"
        )
        where = f" (baseline from {doc.baseline.path})" if doc.baseline.path else ""
        gate = "not slower" if doc.ok else "FAILED: " + "; ".join(doc.reasons)
        lines.append(
            printable(
                f"{r.source}: {doc.candidate.spec} / {doc.baseline.spec}{where} on {doc.device}, "
                f"{doc.threads} thread(s), {doc.sweep} sweep, threshold {doc.threshold_pct:g}%: "
                f"{figure}; {gate}" + (" (interrupted)" if doc.interrupted else "")
            )
        )
        for case in doc.cases:
            rows.append(
                {
                    "source": r.source,
                    "case": " ".join(
                        p
                        for p in (case.mode, case.shape, case.dtype, case.memory_format, case.model)
                        if p
                    ),
                    "status": case.status,
                    "verdict": case.verdict,
                    "ratio": case.ratio,
                    "ci_low": case.ci_low,
                    "ci_high": case.ci_high,
                    "pairs": case.pairs,
                    "baseline_s": case.baseline_s,
                    "candidate_s": case.candidate_s,
                    "message": case.message,
                }
            )
    if len(lines) == 1:
        return None
    return pd.DataFrame(rows), lines
