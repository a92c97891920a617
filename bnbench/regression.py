"""The regression gate, ``bnbench compare BASELINE NEW``: per-case ratios of two stored runs
with 95% intervals, and a verdict per implementation.

Everything is vectorized, so that runs of 200,000 rows compare in seconds:

* a case's interval is a bootstrap of the ratio of medians (method ``bootstrap``) while the work
  (cases x samples x resamples) stays under BOOTSTRAP_BUDGET: the cases are grouped by sample
  count, and each chunk of a group draws one index matrix and takes medians over an axis. Beyond
  the budget each median gets the McKean-Schrader standard error (order statistics, no
  distribution assumed) on the log scale, and a case's interval is the normal one of the log
  ratio (method ``order-statistics``). Cases without raw samples fall back to the p20/p80
  spreads (method ``p20/p80``);
* an implementation's interval is a bootstrap of the mean log ratio over its cases, or, with
  more than GEOMEAN_BOOTSTRAP_CASES cases, the normal interval of that mean (method ``normal``).

Rows measured in BASELINE but not in NEW (missing, or not measured: error, hung, crashed, nan,
not-supported) are *lost*: a row that used to work and now crashes is a regression for CI.
Rows measured only in NEW are listed for information. A case whose row is flagged in either run
(results.csv ``flags``: a measurement not to be trusted, bnbench.results.Flag) has the verdict
``flagged``: listed, left out of the implementation's geometric mean, never failing the gate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bnbench.runs import KEY, MEASURED_STATUSES, ReportInputError, Results, load

# Elements sorted by the per-case bootstrap (cases x samples x resamples, both runs) beyond
# which it gives way to order statistics: about 10 ns each on this project's 2-core machine.
BOOTSTRAP_BUDGET = 5e8
# Elements in one bootstrap chunk (x 8 bytes, twice): bounds the memory a compare takes.
CHUNK_ELEMENTS = 4_000_000
# Cases per implementation beyond which its interval is normal rather than bootstrapped.
GEOMEAN_BOOTSTRAP_CASES = 1000
Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
Z995 = 2.5758293035489004  # the 99.5% quantile, as McKean and Schrader (1984) use it
MIN_SAMPLES = 3
# Lines of each kind (flagged cases, lost rows, rows only in NEW) ``compare`` prints; the rest
# are counted.
LISTED = 100


@dataclass
class Comparison:
    """What ``compare`` reports: the matched cases, the rows lost in NEW and the rows only NEW
    measured."""

    cases: pd.DataFrame
    lost: pd.DataFrame  # KEY, baseline_s, new_status ("missing" when absent), message
    added: pd.DataFrame  # KEY, new_s, baseline_status ("missing" when absent)


class _Samples:
    """A run's raw samples, grouped by results row without a Python loop per row."""

    def __init__(self, results: Results):
        rows = len(results.rows)
        if results.samples is None or results.samples.empty:
            self.counts = np.zeros(rows, dtype=np.int64)
            self.values = np.zeros(0)
            self.offsets = np.zeros(rows, dtype=np.int64)
            return
        row = results.samples["row"].to_numpy(dtype=np.int64)
        order = np.argsort(row, kind="stable")
        self.values = results.samples["seconds"].to_numpy(dtype=float)[order]
        self.counts = np.bincount(row, minlength=rows)
        self.offsets = np.cumsum(self.counts) - self.counts

    def matrix(self, positions: np.ndarray, n: int) -> np.ndarray:
        """(len(positions), n): the samples of the rows at ``positions``, which have n each."""
        return self.values[self.offsets[positions][:, None] + np.arange(n)]


def _sorted_median(sorted_values: np.ndarray) -> np.ndarray:
    """Medians along the last axis of an array sorted along it."""
    n = sorted_values.shape[-1]
    return 0.5 * (sorted_values[..., (n - 1) // 2] + sorted_values[..., n // 2])


def _bootstrap(
    base: _Samples,
    new: _Samples,
    b_pos: np.ndarray,
    n_pos: np.ndarray,
    resamples: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Per case, the 2.5% and 97.5% percentiles of the bootstrapped ratio of medians."""
    low, high = np.empty(len(b_pos)), np.empty(len(b_pos))
    nb, nn = base.counts[b_pos], new.counts[n_pos]
    pairs = np.unique(np.stack([nb, nn], axis=1), axis=0)
    for na, nc in pairs:
        members = np.flatnonzero((nb == na) & (nn == nc))
        step = max(1, CHUNK_ELEMENTS // (resamples * max(na, nc)))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            a = base.matrix(b_pos[chunk], na)
            c = new.matrix(n_pos[chunk], nc)
            # one index matrix per chunk: every case in it resamples the same positions
            med_a = _sorted_median(np.sort(a[:, rng.integers(0, na, (resamples, na))], axis=2))
            med_c = _sorted_median(np.sort(c[:, rng.integers(0, nc, (resamples, nc))], axis=2))
            low[chunk], high[chunk] = np.percentile(med_c / med_a, [2.5, 97.5], axis=1)
    return low, high


def _log_median_se(samples: _Samples, positions: np.ndarray) -> np.ndarray:
    """McKean-Schrader standard error of the median of log samples, per row: from the order
    statistics X(c) and X(n-c+1), c = (n+1)/2 - z_0.995 sqrt(n/4) rounded (at least 1)."""
    se = np.empty(len(positions))
    counts = samples.counts[positions]
    for n in np.unique(counts):
        members = np.flatnonzero(counts == n)
        ordered = np.sort(np.log(samples.matrix(positions[members], int(n))), axis=1)
        c = max(1, int(round((n + 1) / 2 - Z995 * np.sqrt(n / 4))))
        se[members] = (ordered[:, n - c] - ordered[:, c - 1]) / (2 * Z995)
    return se


# NEW / BASELINE beyond this factor (either way) is not believed: see compare.
IMPLAUSIBLE_RATIO = 1000.0


def _verdicts(low: np.ndarray, high: np.ndarray, limit: float) -> np.ndarray:
    """regression when the whole interval lies above ``limit``, improvement when below its
    inverse, same otherwise, and "no interval" when there is none (never "same")."""
    known = np.isfinite(low) & np.isfinite(high)
    return np.where(
        ~known,
        "no interval",
        np.where(low > limit, "regression", np.where(high < 1 / limit, "improvement", "same")),
    )


def compare(
    baseline: str | os.PathLike,
    new: str | os.PathLike,
    threshold_pct: float,
    resamples: int = 2000,
    seed: int = 0,
    budget: float = BOOTSTRAP_BUDGET,
    metric: str = "call",
) -> Comparison:
    """NEW / BASELINE per matched measured row with a 95% interval of the ratio of medians,
    and the rows measured on one side only.

    A row is a regression only when the whole interval lies above 1 + threshold: significant
    *and* above the threshold. Rows without raw samples (or fewer than 3) fall back to the
    p20/p80 spreads: flagged only when NEW's p20 exceeds BASELINE's p80 by the threshold.

    ``metric``: ``call`` compares the call times (median_s); ``kernel`` the CUDA rows' GPU
    times (kernel_s, bnbench.gpu), which launch overhead does not hide: only rows with a
    kernel time in both runs are compared, on their p20/p80 spreads (samples.csv holds the
    call's samples).
    """
    if metric not in METRICS:
        raise ReportInputError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    base, newer = load(baseline), load(new)
    columns = KEY + ["status", "median_s", "p20_s", "p80_s", "message", "flags"]
    b = _table(base, columns, METRICS[metric])
    n = _table(newer, columns, METRICS[metric])
    if metric != "call":  # rows without the metric are not measured for it
        for table in (b, n):
            table.loc[
                table["median_s"].isna() & table["status"].isin(MEASURED_STATUSES), "status"
            ] = "no " + metric + " time"
    b_measured = b[b["status"].isin(MEASURED_STATUSES)]
    n_measured = n[n["status"].isin(MEASURED_STATUSES)]
    common = b_measured.merge(n_measured, on=KEY, suffixes=("_b", "_n"))
    if common.empty:
        raise ReportInputError(
            f"{new}: no measured row matches {baseline} (implementation, "
            "device, dtype, mode, shape, memory format)"
            + (f" with a {metric} time in both (CUDA rows have one)" if metric != "call" else "")
        )
    lost = b_measured.merge(n[KEY + ["status", "message"]], on=KEY, how="left", suffixes=("", "_n"))
    lost = lost[~lost["status_n"].isin(MEASURED_STATUSES)]
    lost = pd.DataFrame(
        {
            **{k: lost[k] for k in KEY},
            "baseline_s": lost["median_s"],
            "new_status": lost["status_n"].fillna("missing"),
            "message": lost["message_n"].fillna(""),
        }
    ).reset_index(drop=True)
    added = n_measured.merge(b[KEY + ["status"]], on=KEY, how="left", suffixes=("", "_b"))
    added = added[~added["status_b"].isin(MEASURED_STATUSES)]
    added = pd.DataFrame(
        {
            **{k: added[k] for k in KEY},
            "new_s": added["median_s"],
            "baseline_status": added["status_b"].fillna("missing"),
        }
    ).reset_index(drop=True)

    b_med = common["median_s_b"].to_numpy(dtype=float)
    n_med = common["median_s_n"].to_numpy(dtype=float)
    ratio = n_med / b_med
    # the p20/p80 fallback (NaN where a spread is missing: no interval)
    with np.errstate(invalid="ignore", divide="ignore"):
        low = common["p20_s_n"].to_numpy(dtype=float) / common["p80_s_b"].to_numpy(dtype=float)
        high = common["p80_s_n"].to_numpy(dtype=float) / common["p20_s_b"].to_numpy(dtype=float)
    method = np.where(np.isfinite(low) & np.isfinite(high), "p20/p80", "none").astype(object)

    base_samples, new_samples = _Samples(base), _Samples(newer)
    b_pos = common["position_b"].to_numpy(dtype=np.int64)
    n_pos = common["position_n"].to_numpy(dtype=np.int64)
    sampled = np.flatnonzero(
        (base_samples.counts[b_pos] >= MIN_SAMPLES) & (new_samples.counts[n_pos] >= MIN_SAMPLES)
    )
    if metric != "call":  # the raw samples are the call's
        sampled = sampled[:0]
    if len(sampled):
        work = float(
            (base_samples.counts[b_pos[sampled]] + new_samples.counts[n_pos[sampled]]).sum()
        )
        if work * resamples <= budget:
            rng = np.random.default_rng(seed)
            low[sampled], high[sampled] = _bootstrap(
                base_samples, new_samples, b_pos[sampled], n_pos[sampled], resamples, rng
            )
            method[sampled] = "bootstrap"
        else:
            se = np.hypot(
                _log_median_se(base_samples, b_pos[sampled]),
                _log_median_se(new_samples, n_pos[sampled]),
            )
            center = np.log(ratio[sampled])
            low[sampled] = np.exp(center - Z95 * se)
            high[sampled] = np.exp(center + Z95 * se)
            method[sampled] = "order-statistics"
    limit = 1 + threshold_pct / 100
    flags = _case_flags(common["flags_b"], common["flags_n"])
    cases = pd.DataFrame(
        {
            **{k: common[k] for k in KEY},
            "baseline_s": b_med,
            "new_s": n_med,
            "ratio": ratio,
            "ci_low": low,
            "ci_high": high,
            "method": method.astype(str),
            # a 1000x change of a BatchNorm layer is a broken measurement, not a result: left
            # out of the geometric mean (where one tiny median would hide a 10x slowdown)
            # and failing the gate on its own
            "verdict": np.where(
                (ratio < 1 / IMPLAUSIBLE_RATIO) | (ratio > IMPLAUSIBLE_RATIO),
                "implausible",
                # a flagged row's figure is not a result: listed, not judged
                np.where(flags != "", "flagged", _verdicts(low, high, limit)),
            ),
            "flags": flags,
        }
    )
    cases = cases.sort_values("ratio", ascending=False, kind="stable", ignore_index=True)
    return Comparison(cases, lost, added)


def _case_flags(base: pd.Series, new: pd.Series) -> np.ndarray:
    """Per case, the flags of either run's row, each marked with its run ("BASELINE:disturbed;
    NEW:faster-than-floor"); empty when neither is flagged."""

    def marked(cells: pd.Series, run: str) -> list[list[str]]:
        return [
            [f"{run}:{flag}" for flag in cell.split(";") if flag] if isinstance(cell, str) else []
            for cell in cells.tolist()
        ]

    return np.array(
        [";".join(b + n) for b, n in zip(marked(base, "BASELINE"), marked(new, "NEW"))],
        dtype=object,
    ).astype(str)


def printable(text: object) -> str:
    """``text`` for a terminal: control characters (escape sequences, newlines) shown escaped,
    so a name from an input file cannot move the cursor or fake a line of output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# What ``compare --metric`` compares: results.csv's columns read as median_s, p20_s, p80_s.
METRICS = {
    "call": {},
    "kernel": {"median_s": "kernel_s", "p20_s": "kernel_p20_s", "p80_s": "kernel_p80_s"},
}


def _table(results: Results, columns: list[str], renamed: dict | None = None) -> pd.DataFrame:
    """The columns ``compare`` uses (absent optional ones as NaN / empty; ``renamed``: read
    from another column), and each row's position in results.csv (what samples.csv points
    at)."""
    rows = results.rows
    frame = pd.DataFrame({"position": np.arange(len(rows))}, index=rows.index)
    for column in columns:
        source = (renamed or {}).get(column, column)
        if source in rows:
            frame[column] = rows[source]
        else:
            frame[column] = "" if column in ("message", "flags") else np.nan
    return frame.reset_index(drop=True)


def compare_runs(
    baseline: str | os.PathLike,
    new: str | os.PathLike,
    threshold_pct: float,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The matched cases of :func:`compare` (lost and added rows left out)."""
    return compare(baseline, new, threshold_pct, resamples, seed).cases


def compare_implementations(
    cases: pd.DataFrame, threshold_pct: float, resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per implementation and device: the geometric mean of NEW / BASELINE over its cases, with
    a bootstrap 95% interval over the cases (the normal interval of the mean log ratio beyond
    GEOMEAN_BOOTSTRAP_CASES cases).

    On this project's noisy 2-core machine one case of identical code varied from 0.56x to
    1.68x between runs, while the geometric mean over an implementation's cases stayed within
    0.77x-1.08x (interval lower bounds at most 1.03): the gate decides at this level.
    """
    rng = np.random.default_rng(seed)
    limit = 1 + threshold_pct / 100
    if "verdict" in cases:
        cases = cases[~cases["verdict"].isin(["implausible", "flagged"])]
    logs = np.log(cases["ratio"].to_numpy(dtype=float))
    group = cases.groupby(["implementation", "device"], sort=False).ngroup().to_numpy()
    groups = int(group.max()) + 1 if len(group) else 0
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=groups)
    offsets = np.cumsum(sizes) - sizes
    sums = np.bincount(group, weights=logs, minlength=groups)
    mean = sums / np.maximum(sizes, 1)
    low, high = np.empty(groups), np.empty(groups)
    method = np.full(groups, "bootstrap", dtype=object)
    ordered = logs[order]
    for k in np.unique(sizes):
        members = np.flatnonzero(sizes == k)
        values = ordered[offsets[members][:, None] + np.arange(k)]  # (groups, k)
        if k > GEOMEAN_BOOTSTRAP_CASES:
            half = Z95 * values.std(axis=1, ddof=1) / np.sqrt(k)
            low[members], high[members] = mean[members] - half, mean[members] + half
            method[members] = "normal"
            continue
        step = max(1, CHUNK_ELEMENTS // (resamples * k))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            means = values[start : start + step][:, rng.integers(0, k, (resamples, k))]
            low[chunk], high[chunk] = np.percentile(means.mean(axis=2), [2.5, 97.5], axis=1)
    first = cases.iloc[order[offsets]] if groups else cases.iloc[:0]
    low, high = np.exp(low), np.exp(high)
    return pd.DataFrame(
        {
            "implementation": first["implementation"].to_numpy(),
            "device": first["device"].to_numpy(),
            "cases": sizes,
            "geomean_ratio": np.exp(mean),
            "ci_low": low,
            "ci_high": high,
            "method": method.astype(str),
            "verdict": _verdicts(low, high, limit),
        }
    )
