"""Performance comparison reports: load results (bnbench bench directories or pytest-benchmark
JSON), draw the plots, build the tables, write Markdown + a self-contained HTML page + PNGs.

Every input problem is a ReportInputError naming the file and what is wrong with it; every
output file is written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bnbench.bench import MODES as BENCH_MODES  # noqa: E402
from bnbench.results import (  # noqa: E402
    CASE_KEY,
    VERDICT_LABELS,
    Status,
    Verdict,
    geomean,
    write_atomic,
)
from bnbench.runs import KEY, Results, combine, load  # noqa: E402

# The layer modes, then a whole model's training step, in plotting order.
MODES = [*BENCH_MODES, "train_step"]


# ---------------------------------------------------------------------------------------------
# Tables


def fastest_table(frame: pd.DataFrame, baseline: str = "builtin") -> pd.DataFrame:
    ok = frame[frame.status == Status.OK]
    if ok.empty:
        return pd.DataFrame()
    keys = ["source", *CASE_KEY]
    best = ok.loc[ok.groupby(keys)["median_s"].idxmin()]
    base = ok[ok.implementation == baseline].set_index(keys)["median_s"]
    table = best[keys + ["implementation", "median_s"]].copy()
    table[f"speedup_vs_{baseline}"] = [
        base.get(tuple(row[k] for k in keys), math.nan) / row["median_s"]
        for _, row in table.iterrows()
    ]
    table["median_ms"] = table.pop("median_s") * 1e3
    return table.rename(columns={"implementation": "fastest"})


def speedup_table(frame: pd.DataFrame, baseline: str = "builtin") -> pd.DataFrame:
    """Geometric-mean time relative to the baseline, per source, device, implementation and
    mode."""
    ok = frame[frame.status == Status.OK]
    keys = ["source", *CASE_KEY]
    base = ok[ok.implementation == baseline].set_index(keys)["median_s"]
    rows = []
    for (source, device, impl, mode), group in ok.groupby(
        ["source", "device", "implementation", "mode"]
    ):
        ratios = [
            row["median_s"] / base[tuple(row[k] for k in keys)]
            for _, row in group.iterrows()
            if tuple(row[k] for k in keys) in base.index
        ]
        floor = group["ratio_to_floor"] if "ratio_to_floor" in group else []
        rows.append(
            {
                "source": source,
                "device": device,
                "implementation": impl,
                "mode": mode,
                "rows": len(group),
                f"time_vs_{baseline}": geomean(ratios),
                "time_vs_floor": geomean(floor),
            }
        )
    return pd.DataFrame(rows)


def correctness_table(results: list[Results]) -> pd.DataFrame:
    rows = []
    for r in results:
        if not r.verify:
            continue
        for item in r.verify.get("results", []):
            rows.append(
                {
                    "source": r.source,
                    "column": f"{item['implementation']}@{item['device']}",
                    "check": item["check"],
                    "verdict": item["verdict"],
                }
            )
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)

    def cell(verdicts):
        present = set(verdicts)
        for verdict, label in VERDICT_LABELS.items():  # worst first
            if verdict in present:
                return label
        return VERDICT_LABELS[Verdict.NOT_SUPPORTED]

    table = frame.groupby(["source", "check", "column"], sort=False)["verdict"].apply(cell)
    return table.unstack("column").reset_index()


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
    ]
    return pd.DataFrame(
        [{"source": r.source, **{k: r.environment.get(k) for k in keys}} for r in results]
    )


# ---------------------------------------------------------------------------------------------
# Plots


def _families(ok: pd.DataFrame):
    """Groups whose rows differ only by batch size and implementation."""
    keys = ["source", "device", "dtype", "memory_format", "channels", "spatial", "model"]
    for values, group in ok.groupby(keys):
        if group["batch_size"].nunique() >= 2:
            yield dict(zip(keys, values)), group


def _title(family: dict) -> str:
    spatial = "" if family["spatial"] == "-" else f"x{family['spatial']}"
    what = f"{family['model']} training step, " if family["model"] else ""
    return (
        f"{family['source']}: {what}{family['device']} {family['dtype']} "
        f"{family['memory_format']}, N x {family['channels']}{spatial}"
    )


def _plot_per_mode(family, group, value, ylabel, title, logy=True, hline=None):
    modes = [m for m in MODES if m in set(group["mode"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sub = group[group["mode"] == mode]
        for impl, lines in sub.groupby("implementation"):
            lines = lines.sort_values("batch_size")
            y = value(lines)
            if y.notna().any():
                ax.plot(lines["batch_size"], y, marker="o", label=impl)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(mode)
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}\n{_title(family)}", fontsize=10)
    fig.tight_layout()
    return fig


def make_plots(frame: pd.DataFrame, baseline: str = "builtin") -> list[tuple[str, str, plt.Figure]]:
    """(file name, caption, figure) for every plot."""
    ok = frame[frame.status == Status.OK].copy()
    plots = []
    for n, (family, group) in enumerate(_families(ok)):
        stem = (
            f"{n:02d}-{family['device']}-{family['dtype']}-{family['model'] or family['channels']}"
        )
        plots.append(
            (
                f"{stem}-time.png",
                "Time against batch size",
                _plot_per_mode(
                    family,
                    group,
                    lambda d: d["median_s"] * 1e3,
                    "median time (ms, log)",
                    "Time per call",
                ),
            )
        )
        keys = ["mode", "batch_size", "shape"]
        base = group[group.implementation == baseline].set_index(keys)["median_s"]
        if not base.empty:

            def speedup(d, base=base, keys=keys):
                index = pd.MultiIndex.from_frame(d[keys])
                return pd.Series(
                    base.reindex(index).to_numpy() / d["median_s"].to_numpy(), index=d.index
                )

            plots.append(
                (
                    f"{stem}-speedup.png",
                    f"Speed-up over {baseline}",
                    _plot_per_mode(
                        family,
                        group,
                        speedup,
                        f"{baseline} time / time (log)",
                        f"Speed-up over {baseline}",
                        hline=1.0,
                    ),
                )
            )
        if "ratio_to_floor" in group and group["ratio_to_floor"].notna().any():
            plots.append(
                (
                    f"{stem}-floor.png",
                    "Share of the bandwidth floor",
                    _plot_per_mode(
                        family,
                        group,
                        lambda d: 100.0 / d["ratio_to_floor"],
                        "% of measured copy bandwidth (log)",
                        "Achieved bandwidth as a share of the floor",
                    ),
                )
            )
    split = _forward_backward_split(ok)
    if split is not None:
        plots.append(("forward-backward-split.png", "Forward against backward", split))
    compile_plot = _compile_cost(ok)
    if compile_plot is not None:
        plots.append(
            ("compile-cost.png", "Compile cost of the implementations that compile", compile_plot)
        )
    return plots


def _forward_backward_split(ok: pd.DataFrame):
    both = ok[ok["mode"].isin(["forward_train", "backward"])]
    if both.empty:
        return None
    # At each (source, device, dtype, shape) family's largest batch, per implementation.
    pivot = both.pivot_table(
        index=["source", "device", "implementation", "shape", "dtype"],
        columns="mode",
        values="median_s",
        aggfunc="min",
    ).dropna()
    if pivot.empty:
        return None
    pivot = pivot.reset_index()
    pivot["elements"] = pivot["shape"].map(lambda s: math.prod(int(v) for v in s.split("x")))
    largest = pivot.loc[
        pivot.groupby(["source", "device", "implementation", "dtype"])["elements"].idxmax()
    ]
    labels = [f"{r.implementation}\n{r.device} {r.dtype}\n{r.shape}" for r in largest.itertuples()]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.2))
    fwd = largest["forward_train"].to_numpy() * 1e3
    bwd = largest["backward"].to_numpy() * 1e3
    ax.bar(labels, fwd, label="forward_train")
    ax.bar(labels, bwd, bottom=fwd, label="backward")
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
    )
    labels = [
        f"{r.implementation}@{r.device} {r.mode} ({int(r.graphs)} graphs, {r.rows} rows)"
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
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _md(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_nothing to show_\n"
    return frame.to_markdown(index=False, floatfmt=".3g") + "\n"


def write_report(inputs: list[str], output: str | os.PathLike, baseline: str = "builtin") -> Path:
    """report.md, a self-contained report.html and plots/*.png from stored runs; times are
    compared with the ``baseline`` implementation."""
    results = [load(p) for p in inputs]
    frame = combine(results)
    output = Path(output)
    (output / "plots").mkdir(parents=True, exist_ok=True)
    tables = [
        (
            f"Speed relative to {baseline} and to the floor (geometric means)",
            speedup_table(frame, baseline),
        ),
        ("Fastest implementation per case", fastest_table(frame, baseline)),
        ("Correctness (bnbench verify)", correctness_table(results)),
        ("Environment", environment_table(results)),
    ]
    problems = frame[~frame.status.isin([Status.OK, Status.NOT_SUPPORTED])]
    if not problems.empty:
        tables.append(
            (
                "Rows that did not measure",
                problems[
                    [
                        "source",
                        "implementation",
                        "device",
                        "mode",
                        "shape",
                        "dtype",
                        "status",
                        "message",
                    ]
                ]
                if "message" in problems
                else problems[KEY + ["status"]],
            )
        )
    figures = make_plots(frame, baseline)
    paragraphs: dict[str, list[str]] = {}
    for r in results:
        if not r.study:
            continue
        from bnbench.study import plot as study_plot

        rows, summary = r.study
        figures.append(
            (
                f"study-{r.source}.png",
                f"BatchNorm against no BatchNorm ({r.source})",
                study_plot(rows, summary["study"]["target"]),
            )
        )
        heading = f"BatchNorm against no BatchNorm on digits ({r.source})"
        tables.append((heading, pd.DataFrame(summary["summary"])))
        paragraphs[heading] = summary["conclusion"]
    plots = [(name, caption, _png(fig)) for name, caption, fig in figures]
    for name, _, data in plots:
        write_atomic(output / "plots" / name, data)

    notes = [n for r in results for n in r.notes]
    title = "bnbench report: " + ", ".join(r.source for r in results)
    md = [f"# {title}\n"] + [f"> {n}\n" for n in notes]
    md.append(
        f"{len(frame)} rows from {len(results)} source(s). Times are medians; "
        f"`time_vs_{baseline}` < 1 means faster than {baseline}.\n"
    )
    for heading, table in tables:
        md += [f"\n## {heading}\n\n"] + [f"{line}\n\n" for line in paragraphs.get(heading, [])]
        md.append(_md(table))
    md.append("\n## Plots\n")
    md += [f"\n### {caption}\n\n![{caption}](plots/{name})\n" for name, caption, _ in plots]
    write_atomic(output / "report.md", "".join(md))

    body = [f"<h1>{html.escape(title)}</h1>"] + [
        f"<p class=note>{html.escape(n)}</p>" for n in notes
    ]
    for heading, table in tables:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body += [f"<p>{html.escape(line)}</p>" for line in paragraphs.get(heading, [])]
        body.append(
            table.to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="", border=0)
            if not table.empty
            else "<p><em>nothing to show</em></p>"
        )
    body.append("<h2>Plots</h2>")
    for name, caption, data in plots:
        encoded = base64.b64encode(data).decode("ascii")
        body.append(
            f"<figure><img alt='{html.escape(caption)}' "
            f"src='data:image/png;base64,{encoded}'><figcaption>"
            f"{html.escape(caption)} ({name})</figcaption></figure>"
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
