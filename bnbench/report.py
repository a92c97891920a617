"""Performance comparison reports: load results (bnbench bench directories or pytest-benchmark
JSON), draw the plots, build the tables, write Markdown + a self-contained HTML page + PNGs.

Every input problem is a ReportInputError naming the file and what is wrong with it; every
output file is written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bnbench.bench import MODES as BENCH_MODES  # noqa: E402
from bnbench.gate import write_atomic  # noqa: E402

REQUIRED = ["implementation", "device", "dtype", "mode", "batch_size", "channels", "spatial",
            "shape", "memory_format", "status", "median_s"]
KEY = ["implementation", "device", "dtype", "mode", "shape", "memory_format", "model"]
BENCH_SCHEMA = "bnbench.bench/1"
VERIFY_SCHEMA = "bnbench.verify/1"
# The layer modes, then a whole model's training step, in plotting order.
MODES = [*BENCH_MODES, "train_step"]


class ReportInputError(Exception):
    """Unusable input: names the file and the problem."""


@dataclass
class Results:
    source: str  # a short label: the directory name
    path: Path
    rows: pd.DataFrame
    environment: dict
    samples: pd.DataFrame | None = None
    verify: dict | None = None
    kind: str = "bnbench"  # bnbench | pytest-benchmark
    claim: tuple[list[dict], dict] | None = None  # claim.csv rows and claim.json
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ReportInputError(f"{path}: missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: not valid JSON ({exc})") from exc


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise ReportInputError(f"{path}: missing")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ReportInputError(f"{path}: missing columns {', '.join(missing)} (is this a "
                               "bnbench results.csv?)")
    return frame


def _with_model_column(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of BatchNorm layers have no model; older results have no model column at all."""
    if "model" in rows:  # an all-empty column reads back as float NaN
        rows["model"] = rows["model"].astype(object).where(rows["model"].notna(), "").astype(str)
    else:
        rows["model"] = ""
    return rows


def load_bench_dir(path: Path) -> Results:
    env = _read_json(path / "environment.json")
    if env.get("schema") != BENCH_SCHEMA:
        raise ReportInputError(f"{path / 'environment.json'}: schema {env.get('schema')!r}, "
                               f"expected {BENCH_SCHEMA!r}")
    rows = _read_csv(path / "results.csv", REQUIRED)
    samples = None
    if (path / "samples.csv").is_file():
        samples = _read_csv(path / "samples.csv", ["row", "seconds"])
    verify = None
    if (path / "verify.json").is_file():
        verify = _read_json(path / "verify.json")
        if verify.get("schema") != VERIFY_SCHEMA:
            raise ReportInputError(f"{path / 'verify.json'}: schema {verify.get('schema')!r}, "
                                   f"expected {VERIFY_SCHEMA!r}")
    results = Results(path.name or str(path), path, _with_model_column(rows), env, samples,
                      verify)
    if (path / "claim.json").is_file():
        summary = _read_json(path / "claim.json")
        if summary.get("schema") != "bnbench.claim/1":
            raise ReportInputError(f"{path / 'claim.json'}: schema {summary.get('schema')!r}, "
                                   "expected 'bnbench.claim/1'")
        curve = _read_csv(path / "claim.csv", ["model", "batchnorm", "seed", "step",
                                               "test_accuracy"])
        results.claim = (curve.to_dict("records"), summary)
    if not env.get("complete", True):
        results.notes.append(f"{path}: the sweep was interrupted; {len(rows)} rows finished")
    return results


def load_pytest_benchmark(path: Path) -> Results:
    data = _read_json(path)
    if "benchmarks" not in data or "machine_info" not in data:
        raise ReportInputError(f"{path}: not pytest-benchmark JSON (no 'benchmarks' / "
                               "'machine_info')")
    rows, samples = [], []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "implementation" not in info or "shape" not in info:
            continue  # not one of bnbench's benchmarks
        shape = [int(s) for s in str(info["shape"]).split("x")]
        stats = bench["stats"]
        median = stats["median"]
        rows.append({
            "implementation": info["implementation"], "device": info.get("device", "cpu"),
            "dtype": info.get("dtype", "float32"), "mode": info.get("mode", bench["name"]),
            "batch_size": shape[0], "channels": shape[1],
            "spatial": "x".join(map(str, shape[2:])) or "-", "rank": len(shape),
            "shape": info["shape"], "memory_format": info.get("memory_format", "contiguous"),
            "status": "ok", "verified": "not-run", "median_s": median,
            "p20_s": stats.get("q1"), "p80_s": stats.get("q3"), "iqr_s": stats.get("iqr"),
            "repetitions": stats.get("rounds"), "bytes": info.get("bytes"),
            "gbps": info.get("gbps"), "threads": info.get("threads"),
        })
        samples += [{"row": len(rows) - 1, "seconds": s} for s in stats.get("data", [])]
    if not rows:
        raise ReportInputError(f"{path}: no bnbench benchmarks in it (extra_info lacks "
                               "implementation/shape)")
    env = dict(data["machine_info"].get("bnbench") or {}, schema=BENCH_SCHEMA,
               source="pytest-benchmark", datetime=data.get("datetime"))
    return Results(path.stem, path, _with_model_column(pd.DataFrame(rows)), env,
                   pd.DataFrame(samples) if samples else None, kind="pytest-benchmark")


def load(path: str | os.PathLike) -> Results:
    path = Path(path)
    if path.is_dir():
        return load_bench_dir(path)
    if path.suffix == ".json" and path.is_file():
        return load_pytest_benchmark(path)
    raise ReportInputError(f"{path}: neither a bnbench results directory nor a "
                           "pytest-benchmark JSON file")


def combine(results: list[Results]) -> pd.DataFrame:
    """One table; a ``source`` column tells the inputs apart (made unique if names collide)."""
    frames, seen = [], {}
    for r in results:
        label = r.source
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}#{seen[label]}"
            r.source = label
        frames.append(r.rows.assign(source=label))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Tables

def fastest_table(frame: pd.DataFrame) -> pd.DataFrame:
    ok = frame[frame.status == "ok"]
    if ok.empty:
        return pd.DataFrame()
    keys = ["source", "device", "dtype", "mode", "shape", "memory_format", "model"]
    best = ok.loc[ok.groupby(keys)["median_s"].idxmin()]
    builtin = ok[ok.implementation == "builtin"].set_index(keys)["median_s"]
    table = best[keys + ["implementation", "median_s"]].copy()
    table["speedup_vs_builtin"] = [
        builtin.get(tuple(row[k] for k in keys), math.nan) / row["median_s"]
        for _, row in table.iterrows()]
    table["median_ms"] = table.pop("median_s") * 1e3
    return table.rename(columns={"implementation": "fastest"})


def speedup_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Geometric-mean time relative to builtin, per source, device, implementation and mode."""
    ok = frame[frame.status == "ok"]
    keys = ["source", "device", "dtype", "mode", "shape", "memory_format", "model"]
    builtin = ok[ok.implementation == "builtin"].set_index(keys)["median_s"]
    rows = []
    for (source, device, impl, mode), group in ok.groupby(["source", "device", "implementation",
                                                            "mode"]):
        ratios = [row["median_s"] / builtin[tuple(row[k] for k in keys)]
                  for _, row in group.iterrows() if tuple(row[k] for k in keys) in builtin.index]
        floor = group["ratio_to_floor"].dropna() if "ratio_to_floor" in group else []
        rows.append({"source": source, "device": device, "implementation": impl, "mode": mode,
                     "rows": len(group),
                     "time_vs_builtin": _geomean(ratios) if ratios else math.nan,
                     "time_vs_floor": _geomean(list(floor)) if len(floor) else math.nan})
    return pd.DataFrame(rows)


def _geomean(values) -> float:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def correctness_table(results: list[Results]) -> pd.DataFrame:
    rows = []
    for r in results:
        if not r.verify:
            continue
        for item in r.verify.get("results", []):
            rows.append({"source": r.source, "column": f"{item['implementation']}@"
                         f"{item['device']}", "check": item["check"], "verdict": item["verdict"]})
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)

    def cell(verdicts):
        counts = verdicts.value_counts()
        for verdict, label in (("fail", "FAIL"), ("unexpected-pass", "XPASS"),
                               ("deviation", "dev")):
            if counts.get(verdict, 0):
                return label
        return "pass" if counts.get("pass", 0) else "n/s"

    table = frame.groupby(["source", "check", "column"], sort=False)["verdict"].apply(cell)
    return table.unstack("column").reset_index()


def environment_table(results: list[Results]) -> pd.DataFrame:
    keys = ["time", "host", "processor", "cpu_count", "threads", "torch", "cuda", "cudnn", "gpu",
            "python", "git_revision", "sweep", "complete"]
    return pd.DataFrame([{"source": r.source, **{k: r.environment.get(k) for k in keys}}
                         for r in results])


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
    return (f"{family['source']}: {what}{family['device']} {family['dtype']} "
            f"{family['memory_format']}, N x {family['channels']}{spatial}")


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


def make_plots(frame: pd.DataFrame) -> list[tuple[str, str, plt.Figure]]:
    """(file name, caption, figure) for every plot."""
    ok = frame[frame.status == "ok"].copy()
    plots = []
    for n, (family, group) in enumerate(_families(ok)):
        stem = (f"{n:02d}-{family['device']}-{family['dtype']}-"
                f"{family['model'] or family['channels']}")
        plots.append((f"{stem}-time.png", "Time against batch size",
                      _plot_per_mode(family, group, lambda d: d["median_s"] * 1e3,
                                     "median time (ms, log)", "Time per call")))
        keys = ["mode", "batch_size", "shape"]
        base = group[group.implementation == "builtin"].set_index(keys)["median_s"]
        if not base.empty:
            def speedup(d, base=base, keys=keys):
                index = pd.MultiIndex.from_frame(d[keys])
                return pd.Series(base.reindex(index).to_numpy() / d["median_s"].to_numpy(),
                                 index=d.index)
            plots.append((f"{stem}-speedup.png", "Speed-up over builtin",
                          _plot_per_mode(family, group, speedup,
                                         "builtin time / time (log)", "Speed-up over builtin",
                                         hline=1.0)))
        if "ratio_to_floor" in group and group["ratio_to_floor"].notna().any():
            plots.append((f"{stem}-floor.png", "Share of the bandwidth floor",
                          _plot_per_mode(family, group, lambda d: 100.0 / d["ratio_to_floor"],
                                         "% of measured copy bandwidth (log)",
                                         "Achieved bandwidth as a share of the floor")))
    split = _forward_backward_split(ok)
    if split is not None:
        plots.append(("forward-backward-split.png", "Forward against backward", split))
    compile_plot = _compile_cost(ok)
    if compile_plot is not None:
        plots.append(("compile-cost.png", "Compile cost of the compiled implementation",
                      compile_plot))
    return plots


def _forward_backward_split(ok: pd.DataFrame):
    both = ok[ok["mode"].isin(["forward_train", "backward"])]
    if both.empty:
        return None
    # At each (source, device, dtype, shape) family's largest batch, per implementation.
    pivot = both.pivot_table(index=["source", "device", "implementation", "shape", "dtype"],
                             columns="mode", values="median_s", aggfunc="min").dropna()
    if pivot.empty:
        return None
    pivot = pivot.reset_index()
    pivot["elements"] = pivot["shape"].map(lambda s: math.prod(int(v) for v in s.split("x")))
    largest = pivot.loc[pivot.groupby(["source", "device", "implementation", "dtype"])[
        "elements"].idxmax()]
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
    if "compile_s" not in ok:  # pytest-benchmark results have no compile time
        return None
    compiled = ok[(ok.implementation == "compiled") & ok["compile_s"].notna()]
    if compiled.empty:
        return None
    compiled = compiled.sort_values(["device", "mode", "batch_size"])
    labels = [f"{r.device} {r.mode}\n{r.shape}" for r in compiled.itertuples()]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels)), 4.2))
    ax.bar(range(len(labels)), compiled["compile_s"], label="compile (first call - median)")
    ax.bar(range(len(labels)), compiled["median_s"], bottom=compiled["compile_s"],
           label="steady-state call")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("seconds (symlog)")
    ax.set_title("Compile cost of the compiled implementation, per row (graphs compiled: "
                 f"{int(compiled['graphs_compiled'].fillna(0).sum())})")
    ax.legend()
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


def write_report(inputs: list[str], output: str | os.PathLike) -> Path:
    results = [load(p) for p in inputs]
    frame = combine(results)
    output = Path(output)
    (output / "plots").mkdir(parents=True, exist_ok=True)
    tables = [
        ("Speed relative to builtin and to the floor (geometric means)", speedup_table(frame)),
        ("Fastest implementation per case", fastest_table(frame)),
        ("Correctness (bnbench verify)", correctness_table(results)),
        ("Environment", environment_table(results)),
    ]
    problems = frame[~frame.status.isin(["ok", "not-supported"])]
    if not problems.empty:
        tables.append(("Rows that did not measure", problems[
            ["source", "implementation", "device", "mode", "shape", "dtype", "status",
             "message"]] if "message" in problems else problems[KEY + ["status"]]))
    figures = make_plots(frame)
    paragraphs: dict[str, list[str]] = {}
    claims = [r for r in results if r.claim]
    for r in claims:
        from bnbench.claim import plot as claim_plot

        rows, summary = r.claim
        figures.append((f"claim-{r.source}.png", f"BatchNorm against no BatchNorm ({r.source})",
                        claim_plot(rows, summary["study"]["target"])))
        heading = f"BatchNorm against no BatchNorm on digits ({r.source})"
        tables.append((heading, pd.DataFrame(summary["summary"])))
        paragraphs[heading] = summary["conclusion"]
    plots = [(name, caption, _png(fig)) for name, caption, fig in figures]
    for name, _, data in plots:
        write_atomic(output / "plots" / name, data)

    notes = [n for r in results for n in r.notes]
    title = "bnbench report: " + ", ".join(r.source for r in results)
    md = [f"# {title}\n"] + [f"> {n}\n" for n in notes]
    md.append(f"{len(frame)} rows from {len(results)} source(s). Times are medians; "
              "`time_vs_builtin` < 1 means faster than nn.BatchNorm.\n")
    for heading, table in tables:
        md += [f"\n## {heading}\n\n"] + [f"{line}\n\n" for line in paragraphs.get(heading, [])]
        md.append(_md(table))
    md.append("\n## Plots\n")
    md += [f"\n### {caption}\n\n![{caption}](plots/{name})\n" for name, caption, _ in plots]
    write_atomic(output / "report.md", "".join(md))

    body = [f"<h1>{html.escape(title)}</h1>"] + [f"<p class=note>{html.escape(n)}</p>"
                                                   for n in notes]
    for heading, table in tables:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body += [f"<p>{html.escape(line)}</p>" for line in paragraphs.get(heading, [])]
        body.append(table.to_html(index=False, float_format=lambda v: f"{v:.3g}",
                                  na_rep="", border=0) if not table.empty else
                    "<p><em>nothing to show</em></p>")
    body.append("<h2>Plots</h2>")
    for name, caption, data in plots:
        encoded = base64.b64encode(data).decode("ascii")
        body.append(f"<figure><img alt='{html.escape(caption)}' "
                    f"src='data:image/png;base64,{encoded}'><figcaption>"
                    f"{html.escape(caption)} ({name})</figcaption></figure>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse;font-size:12px}td,th{padding:2px 6px;"
            "border-bottom:1px solid #ddd}img{max-width:100%}.note{color:#a60}</style>"
            "</head><body>" + "\n".join(body) + "</body></html>")
    write_atomic(output / "report.html", page)
    return output / "report.html"


# ---------------------------------------------------------------------------------------------
# Regression gate

def _sample_sets(results: Results) -> dict[tuple, np.ndarray]:
    sets: dict[tuple, np.ndarray] = {}
    if results.samples is None:
        return sets
    by_row = results.samples.groupby("row")["seconds"].apply(lambda s: s.to_numpy())
    for index, row in results.rows.iterrows():
        if index in by_row.index and row["status"] == "ok":
            sets[tuple(row[k] for k in KEY)] = by_row[index]
    return sets


def compare_runs(baseline: str | os.PathLike, new: str | os.PathLike, threshold_pct: float,
                 resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """NEW / BASELINE per matched row, with a bootstrap 95% interval of the ratio of medians.

    A row is a regression only when the whole interval lies above 1 + threshold: significant
    *and* above the threshold. Rows without raw samples fall back to the p20/p80 spreads:
    flagged only when NEW's p20 exceeds BASELINE's p80 by the threshold.
    """
    base, newer = load(baseline), load(new)
    base_ok = base.rows[base.rows.status == "ok"].set_index(KEY)
    new_ok = newer.rows[newer.rows.status == "ok"].set_index(KEY)
    common = base_ok.index.intersection(new_ok.index)
    if len(common) == 0:
        raise ReportInputError(f"{new}: no measured row matches {baseline} (implementation, "
                               "device, dtype, mode, shape, memory format)")
    base_sets, new_sets = _sample_sets(base), _sample_sets(newer)
    rng = np.random.default_rng(seed)
    limit = 1 + threshold_pct / 100
    rows = []
    for key in common:
        b_med, n_med = float(base_ok.loc[key, "median_s"]), float(new_ok.loc[key, "median_s"])
        ratio = n_med / b_med
        a, c = base_sets.get(key), new_sets.get(key)
        if a is not None and c is not None and len(a) >= 3 and len(c) >= 3:
            med_a = np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
            med_c = np.median(c[rng.integers(0, len(c), (resamples, len(c)))], axis=1)
            low, high = np.percentile(med_c / med_a, [2.5, 97.5])
            method = "bootstrap"
        else:
            low = float(new_ok.loc[key, "p20_s"]) / float(base_ok.loc[key, "p80_s"])
            high = float(new_ok.loc[key, "p80_s"]) / float(base_ok.loc[key, "p20_s"])
            method = "p20/p80"
        verdict = ("regression" if low > limit else
                   "improvement" if high < 1 / limit else "same")
        rows.append(dict(zip(KEY, key), baseline_s=b_med, new_s=n_med, ratio=ratio,
                         ci_low=float(low), ci_high=float(high), method=method,
                         verdict=verdict))
    return pd.DataFrame(rows).sort_values("ratio", ascending=False, ignore_index=True)


def compare_implementations(cases: pd.DataFrame, threshold_pct: float, resamples: int = 2000,
                            seed: int = 0) -> pd.DataFrame:
    """Per implementation and device: the geometric mean of NEW / BASELINE over its cases, with
    a bootstrap 95% interval over the cases.

    On this project's noisy 2-core machine one case of identical code varied from 0.56x to
    1.68x between runs, while the geometric mean over an implementation's cases stayed within
    0.77x-1.08x (interval lower bounds at most 1.03): the gate decides at this level.
    """
    rng = np.random.default_rng(seed)
    limit = 1 + threshold_pct / 100
    rows = []
    for (impl, device), group in cases.groupby(["implementation", "device"], sort=False):
        logs = np.log(group["ratio"].to_numpy())
        means = logs[rng.integers(0, len(logs), (resamples, len(logs)))].mean(axis=1)
        low, high = np.exp(np.percentile(means, [2.5, 97.5]))
        rows.append({"implementation": impl, "device": device, "cases": len(group),
                     "geomean_ratio": float(np.exp(logs.mean())), "ci_low": float(low),
                     "ci_high": float(high),
                     "verdict": "regression" if low > limit else
                     "improvement" if high < 1 / limit else "same"})
    return pd.DataFrame(rows)
