"""Performance comparison reports: load results (bnbench bench directories or pytest-benchmark
JSON), draw the plots, build the tables, write Markdown + a self-contained HTML page + PNGs.

Every input problem is a ReportInputError naming the file and what is wrong with it; every
output file is written atomically (a temporary file renamed into place).

The inputs are data from elsewhere, so everything taken from them is treated as text to show,
never as markup or a path: HTML is escaped, Markdown cells and headings are escaped (a ``|`` or
a newline cannot break a table), matplotlib renders labels without mathtext, and plot file
names are sanitized and checked to land inside ``OUTPUT/plots``.

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
from itertools import chain
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import Formatter, FuncFormatter, NullFormatter  # noqa: E402

from bnbench.bench import MODES as BENCH_MODES  # noqa: E402
from bnbench.results import (  # noqa: E402
    CASE_KEY,
    VERDICT_LABELS,
    Status,
    Verdict,
    write_atomic,
)
from bnbench.runs import KEY, ReportInputError, Results, combine, load  # noqa: E402

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


def failed_verification(frame: pd.DataFrame) -> pd.Series:
    """Rows whose verified verdict says the implementation failed the vouching case."""
    if "verified" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["verified"].isin(FAILED_VERIFICATION)


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == Status.OK.value]


# ---------------------------------------------------------------------------------------------
# Tables


def _baseline_times(ok: pd.DataFrame, baseline: str, keys: list[str]) -> pd.DataFrame:
    """The baseline's median per case, from rows that passed verification only."""
    base = ok[(ok["implementation"] == baseline) & ~failed_verification(ok)]
    return base[keys + ["median_s"]].rename(columns={"median_s": "baseline_s"})


def fastest_table(frame: pd.DataFrame, baseline: str = "builtin") -> pd.DataFrame:
    """Per source and case: the fastest implementation among rows that did not fail
    verification, its verdict, and its speed-up over the baseline."""
    ok = _measured(frame)
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


def speedup_table(frame: pd.DataFrame, baseline: str = "builtin") -> pd.DataFrame:
    """Geometric-mean time relative to the baseline, per source, device, implementation and
    mode, over the rows that did not fail verification (their count is shown apart)."""
    ok = _measured(frame)
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
    grouped = merged.groupby(["source", "device", "implementation", "mode"], sort=True)
    table = grouped.agg(
        rows=("median_s", "size"),
        failed_verification=("failed", "sum"),
        log_ratio=("log_ratio", "mean"),
        log_floor=("log_floor", "mean"),
    ).reset_index()
    table[f"time_vs_{baseline}"] = np.exp(table.pop("log_ratio"))
    table["time_vs_floor"] = np.exp(table.pop("log_floor"))
    return table


def failed_verification_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every row whose implementation failed the case vouching for it."""
    rows = frame[failed_verification(frame)]
    columns = ["source", "implementation", "device", "mode", "shape", "dtype", "model"]
    table = rows[columns + ["verified", "status"]].copy()
    table["median_ms"] = rows["median_s"] * 1e3
    return table.reset_index(drop=True)


def correctness_table(results: list[Results]) -> pd.DataFrame:
    """Per source and check: the worst verdict of each implementation@device."""
    frames = []
    for r in results:
        if not r.verify:
            continue
        items = pd.DataFrame(
            r.verify.get("results", []), columns=["implementation", "device", "check", "verdict"]
        )
        if items.empty:
            continue
        items["column"] = items["implementation"] + "@" + items["device"]
        frames.append(items.assign(source=r.source))
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    order = [v.value for v in VERDICT_LABELS]  # worst first
    labels = [*VERDICT_LABELS.values(), VERDICT_LABELS[Verdict.NOT_SUPPORTED]]
    frame["rank"] = frame["verdict"].map({v: i for i, v in enumerate(order)}).fillna(len(order))
    worst = frame.groupby(["source", "check", "column"], sort=False)["rank"].min()
    table = worst.map(lambda rank: labels[int(rank)]).unstack("column").reset_index()
    table.columns.name = None
    return table


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


# ---------------------------------------------------------------------------------------------
# Plots


def safe_name(text: object, limit: int = MAX_NAME_PART) -> str:
    """``text`` as a part of a file name: only [A-Za-z0-9._-], no leading dot or dash (no
    hidden files, no options), at most ``limit`` characters, never empty."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:limit].lstrip(".-")
    return name or "_"


def _label(text: object) -> str:
    """A plot label from data: one line, bounded length, every ``$`` escaped (an even number
    of them would switch matplotlib to mathtext, which raises on text like ``$\\frac{$``) and
    no leading underscore (matplotlib leaves such labels out of legends)."""
    flat = " ".join(str(text).split())
    flat = flat if len(flat) <= MAX_LABEL else flat[: MAX_LABEL - 3] + "..."
    flat = flat.replace("$", r"\$")
    return " " + flat if flat.startswith("_") else flat


FAMILY_KEYS = ["source", "device", "dtype", "memory_format", "channels", "spatial", "model"]


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


def _title(family: dict) -> str:
    spatial = "" if family["spatial"] == "-" else f"x{family['spatial']}"
    what = f"{family['model']} training step, " if family["model"] else ""
    return _label(
        f"{family['source']}: {what}{family['device']} {family['dtype']} "
        f"{family['memory_format']}, N x {family['channels']}{spatial}"
    )


def _drawn_implementations(group: pd.DataFrame, baseline: str) -> tuple[list[str], int]:
    """The implementations a plot draws (the baseline first), and how many it leaves out."""
    names = sorted(set(group["implementation"]), key=lambda n: (n != baseline, n))
    return names[:MAX_LINES], max(0, len(names) - MAX_LINES)


def _plot_per_mode(family, group, value, ylabel, title, baseline, logy=True, hline=None):
    """One panel per mode, one line per implementation against batch size; rows that failed
    verification are drawn dashed with a "failed verification" legend entry (when ``value``
    gives them a value at all)."""
    modes = [m for m in MODES if m in set(group["mode"])] + sorted(set(group["mode"]) - set(MODES))
    modes = modes[:6]
    drawn, left_out = _drawn_implementations(group, baseline)
    group = group[group["implementation"].isin(drawn)]
    failed = failed_verification(group)
    fig, axes = plt.subplots(
        1, len(modes), figsize=(max(6.0, 4.2 * len(modes)), 3.6), squeeze=False
    )
    for ax, mode in zip(axes[0], modes):
        in_mode = group["mode"] == mode
        for impl in drawn:
            lines = group[in_mode & (group["implementation"] == impl)].sort_values("batch_size")
            if lines.empty:
                continue
            y = value(lines)
            bad = failed[lines.index].to_numpy()
            good_y, bad_y = y.where(~bad), y.where(bad)
            if good_y.notna().any():
                ax.plot(lines["batch_size"], good_y, marker="o", label=_label(impl))
            if bad_y.notna().any():
                ax.plot(
                    lines["batch_size"],
                    bad_y,
                    marker="x",
                    linestyle="--",
                    color="red",
                    label=_label(f"{impl} ({FAILED_LABEL})"),
                )
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        _plain_ticks(ax, logy)
        if hline is not None:
            ax.axhline(hline, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(_label(mode))
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    more = f"; {left_out} more implementations not drawn" if left_out else ""
    fig.suptitle(f"{title}{more}\n{_title(family)}", fontsize=10)
    # Fixed margins (in inches) rather than tight_layout, which draws the figure once more:
    # rendering dominates the time a report takes.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=0.75 / width,
        right=1 - 0.15 / width,
        bottom=0.55 / height,
        top=1 - 0.85 / height,
        wspace=0.35,
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
    ax.xaxis.set_minor_formatter(NullFormatter())
    if logy:
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(_MinorLabels())


def make_plots(
    frame: pd.DataFrame, baseline: str = "builtin", notes: list[str] | None = None
) -> Iterator[tuple[str, str, plt.Figure]]:
    """(file name, caption, figure) for every plot, one at a time (render and close each
    before asking for the next); what was left out is added to ``notes``."""
    ok = _measured(frame).copy()
    failed = failed_verification(ok)
    families, not_plotted = _families(ok)
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
        yield (
            f"{stem}-time.png",
            "Time against batch size"
            + (f" (dashed: {FAILED_LABEL})" if failed[group.index].any() else ""),
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

            yield (
                f"{stem}-speedup.png",
                f"Speed-up over {baseline} (rows that failed verification not drawn)",
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
            yield (
                f"{stem}-floor.png",
                "Share of the bandwidth floor",
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
        yield ("forward-backward-split.png", "Forward against backward", split)
    compile_plot = _compile_cost(ok)
    if compile_plot is not None:
        yield (
            "compile-cost.png",
            "Compile cost of the implementations that compile",
            compile_plot,
        )


def _elements(shapes: pd.Series) -> pd.Series:
    """The element count of each ``NxCx...`` shape; NaN for anything else."""
    well_formed = shapes.str.fullmatch(r"[0-9]{1,9}(x[0-9]{1,9}){0,7}")
    parts = shapes.where(well_formed, "").str.split("x", expand=True)
    numbers = parts.apply(pd.to_numeric, errors="coerce")
    return numbers.prod(axis=1, min_count=1).where(well_formed)


def _forward_backward_split(ok: pd.DataFrame):
    """Stacked forward_train and backward time at each family's largest shape, for rows that
    have both (a calibration run has no backward rows: no plot)."""
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
    labels = [
        f"{_label(r.implementation)}\n{_label(f'{r.device} {r.dtype}')}\n{_label(r.shape)}"
        for r in largest.itertuples()
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.2))
    fwd = largest["forward_train"].to_numpy() * 1e3
    bwd = largest["backward"].to_numpy() * 1e3
    positions = np.arange(len(labels))
    ax.bar(positions, fwd, label="forward_train")
    ax.bar(positions, bwd, bottom=fwd, label="backward")
    ax.set_xticks(positions, labels)
    ax.set_ylabel("median time (ms)")
    ax.set_title("Forward against backward at each family's largest batch")
    ax.legend()
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def _compile_cost(ok: pd.DataFrame):
    """Seconds spent compiling, per implementation, device and mode, for every implementation
    whose first calls compiled graphs (whatever it is named)."""
    if "compile_s" not in ok or "graphs_compiled" not in ok:  # pytest-benchmark: no compile time
        return None
    compiling = ok[ok["graphs_compiled"].fillna(0) > 0]
    if compiling.empty:
        return None
    totals = (
        compiling.groupby(["implementation", "device", "mode"])
        .agg(
            compile_s=("compile_s", "sum"),
            graphs=("graphs_compiled", "sum"),
            rows=("compile_s", "size"),
        )
        .reset_index()
        .head(MAX_BARS)
    )
    labels = [
        f"{_label(f'{r.implementation}@{r.device} {r.mode}')} ({int(r.graphs)} graphs, "
        f"{r.rows} rows)"
        for r in totals.itertuples()
    ]
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.35 * len(labels)))
    ax.barh(range(len(labels)), totals["compile_s"])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds spent compiling (first call - steady-state call, summed over rows)")
    ax.set_title("Compile cost")
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


def _md_cell(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    return md_text(value)


def _md(frame: pd.DataFrame) -> str:
    """A Markdown table whose every cell is escaped text (numbers formatted here, so tabulate
    parses nothing)."""
    if frame.empty:
        return "_nothing to show_\n"
    numeric = [
        pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        for c in frame.columns
    ]
    cells = [[_md_cell(v) for v in row] for row in frame.itertuples(index=False)]
    return (
        pd.DataFrame(cells).to_markdown(
            index=False,
            headers=[md_text(c) for c in frame.columns],
            disable_numparse=True,
            colalign=["right" if n else "left" for n in numeric],
        )
        + "\n"
    )


def _html(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>nothing to show</em></p>"
    return frame.to_html(
        index=False, escape=True, float_format=lambda v: f"{v:.3g}", na_rep="", border=0
    )


# Tables that can grow with the input, and the CSV file each is written to in full.
CSV_NAMES = {
    "speedup": "speedup.csv",
    "fastest": "fastest.csv",
    "failed": "failed-verification.csv",
    "correctness": "correctness.csv",
    "problems": "not-measured.csv",
}


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
    compared with the ``baseline`` implementation."""
    results = [load(p) for p in inputs]
    frame = combine(results)
    output = Path(output)
    plots_dir = output / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    if not plots_dir.resolve().is_relative_to(output.resolve()):
        raise ReportInputError(f"{plots_dir}: resolves outside {output} ({plots_dir.resolve()})")
    notes = [n for r in results for n in r.notes]
    # (heading, table, CSV file for the full table or None)
    tables: list[tuple[str, pd.DataFrame, str | None]] = [
        (
            f"Speed relative to {baseline} and to the floor (geometric means)",
            speedup_table(frame, baseline),
            CSV_NAMES["speedup"],
        ),
        ("Fastest implementation per case", fastest_table(frame, baseline), CSV_NAMES["fastest"]),
    ]
    failed = failed_verification_table(frame)
    if not failed.empty:
        tables.append(("Rows that failed verification", failed, CSV_NAMES["failed"]))
        notes.append(
            f"{len(failed)} rows failed verification: they are never the fastest nor a "
            "speed-up, and are marked in tables and plots"
        )
    tables += [
        (
            "Correctness (bnbench verify)",
            correctness_table(results),
            CSV_NAMES["correctness"],
        ),
        ("Environment", environment_table(results), None),
    ]
    problems = frame[~frame["status"].isin([Status.OK.value, Status.NOT_SUPPORTED.value])]
    if not problems.empty:
        columns = ["source", "implementation", "device", "mode", "shape", "dtype", "status"]
        tables.append(
            (
                "Rows that did not measure",
                problems[columns + ["message"] if "message" in problems else KEY + ["status"]],
                CSV_NAMES["problems"],
            )
        )
    paragraphs: dict[str, list[str]] = {}
    studies = []
    for r in results:
        if not r.study:
            continue
        rows, summary = r.study
        heading = f"BatchNorm against no BatchNorm on digits ({r.source})"
        tables.append((heading, pd.DataFrame(summary["summary"]), None))
        paragraphs[heading] = [str(line) for line in summary["conclusion"]]
        studies.append((r.source, rows, float(summary["study"]["target"])))

    plots = _render_plots(frame, baseline, studies, plots_dir, notes)

    shown: dict[str, pd.DataFrame] = {}
    written: set[str] = set()
    for heading, table, csv_name in tables:
        if csv_name and not table.empty:
            write_atomic(output / csv_name, table.to_csv(index=False))
            written.add(csv_name)
        if len(table) > MAX_TABLE_ROWS:
            note = (
                f"Showing the first {MAX_TABLE_ROWS} of {len(table)} rows; all of them are in "
                f"{csv_name}."
            )
            paragraphs.setdefault(heading, []).append(note)
            table = table.head(MAX_TABLE_ROWS)
        shown[heading] = table

    for stale in set(CSV_NAMES.values()) - written:  # an earlier report's, now wrong
        if (output / stale).is_file():
            (output / stale).unlink()
    title = "bnbench report: " + ", ".join(r.source for r in results)
    md = [f"# {md_text(title)}\n"] + [f"> {md_text(n)}\n\n" for n in notes]
    md.append(
        f"{len(frame)} rows from {len(results)} source(s). Times are medians; "
        f"`time_vs_{md_text(baseline)}` < 1 means faster than {md_text(baseline)}. Rows whose "
        f"implementation failed verification (verified: fail, unexpected-pass or waived) are "
        "never the fastest nor a speed-up.\n"
    )
    for heading, table in shown.items():
        md += [f"\n## {md_text(heading)}\n\n"]
        md += [f"{md_text(line)}\n\n" for line in paragraphs.get(heading, [])]
        md.append(_md(table))
    md.append("\n## Plots\n")
    md += [
        f"\n### {md_text(caption)}\n\n![{md_text(caption)}](plots/{name})\n"
        for name, caption, _ in plots
    ]
    write_atomic(output / "report.md", "".join(md))

    body = [f"<h1>{html.escape(title)}</h1>"] + [
        f"<p class=note>{html.escape(n)}</p>" for n in notes
    ]
    for heading, table in shown.items():
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body += [f"<p>{html.escape(line)}</p>" for line in paragraphs.get(heading, [])]
        body.append(_html(table))
    body.append("<h2>Plots</h2>")
    for name, caption, data in plots:
        encoded = base64.b64encode(data).decode("ascii")
        body.append(
            f"<figure><img alt='{html.escape(caption)}' "
            f"src='data:image/png;base64,{encoded}'><figcaption>"
            f"{html.escape(caption)} ({html.escape(name)})</figcaption></figure>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse;font-size:12px}td,th{padding:2px 6px;"
        "border-bottom:1px solid #ddd}img{max-width:100%}.note{color:#a60}</style>"
        "</head><body>" + "\n".join(body) + "</body></html>"
    )
    write_atomic(output / "report.html", page)
    return output / "report.html"


def _render_plots(
    frame: pd.DataFrame,
    baseline: str,
    studies: list[tuple[str, list[dict], float]],
    plots_dir: Path,
    notes: list[str],
) -> list[tuple[str, str, bytes]]:
    """Every plot rendered to PNG and written into ``plots_dir``: (name, caption, PNG bytes).
    Each figure is closed before the next is drawn. Labels from data go through _label, so a
    ``$`` in them is a dollar sign, not mathtext."""
    plots: list[tuple[str, str, bytes]] = []
    taken: set[str] = set()
    with matplotlib.rc_context({"text.usetex": False}):
        for name, caption, fig in chain(
            make_plots(frame, baseline, notes), _study_plots(studies, notes)
        ):
            stem, suffix = name.rsplit(".", 1)
            unique, k = name, 1
            while unique in taken:  # names are unique by construction; belt and braces
                k += 1
                unique = f"{stem}-{k}.{suffix}"
            taken.add(unique)
            data = _png(fig)
            write_atomic(_plot_path(plots_dir, unique), data)
            plots.append((unique, caption, data))
    return plots


def _study_plots(
    studies: list[tuple[str, list[dict], float]], notes: list[str]
) -> Iterator[tuple[str, str, plt.Figure]]:
    """The BatchNorm study's curves per source (bounded: a huge study.csv is not plotted)."""
    from bnbench.study import plot as study_plot

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
        yield (
            f"study-{n:02d}-{safe_name(source)}.png",
            f"BatchNorm against no BatchNorm ({source})",
            study_plot(rows, target),
        )
