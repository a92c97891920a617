"""The regression gate, ``bnbench compare BASELINE NEW``: per-case ratios of two stored runs
with bootstrap intervals, and a verdict per implementation.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from bnbench.results import Status
from bnbench.runs import KEY, ReportInputError, Results, load


def _sample_sets(results: Results) -> dict[tuple, np.ndarray]:
    sets: dict[tuple, np.ndarray] = {}
    if results.samples is None:
        return sets
    by_row = results.samples.groupby("row")["seconds"].apply(lambda s: s.to_numpy())
    for index, row in results.rows.iterrows():
        if index in by_row.index and row["status"] == Status.OK:
            sets[tuple(row[k] for k in KEY)] = by_row[index]
    return sets


def compare_runs(
    baseline: str | os.PathLike,
    new: str | os.PathLike,
    threshold_pct: float,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """NEW / BASELINE per matched row, with a bootstrap 95% interval of the ratio of medians.

    A row is a regression only when the whole interval lies above 1 + threshold: significant
    *and* above the threshold. Rows without raw samples fall back to the p20/p80 spreads:
    flagged only when NEW's p20 exceeds BASELINE's p80 by the threshold.
    """
    base, newer = load(baseline), load(new)
    base_ok = base.rows[base.rows.status == Status.OK].set_index(KEY)
    new_ok = newer.rows[newer.rows.status == Status.OK].set_index(KEY)
    common = base_ok.index.intersection(new_ok.index)
    if len(common) == 0:
        raise ReportInputError(
            f"{new}: no measured row matches {baseline} (implementation, "
            "device, dtype, mode, shape, memory format)"
        )
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
        verdict = "regression" if low > limit else "improvement" if high < 1 / limit else "same"
        rows.append(
            dict(
                zip(KEY, key),
                baseline_s=b_med,
                new_s=n_med,
                ratio=ratio,
                ci_low=float(low),
                ci_high=float(high),
                method=method,
                verdict=verdict,
            )
        )
    return pd.DataFrame(rows).sort_values("ratio", ascending=False, ignore_index=True)


def compare_implementations(
    cases: pd.DataFrame, threshold_pct: float, resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
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
        rows.append(
            {
                "implementation": impl,
                "device": device,
                "cases": len(group),
                "geomean_ratio": float(np.exp(logs.mean())),
                "ci_low": float(low),
                "ci_high": float(high),
                "verdict": "regression"
                if low > limit
                else "improvement"
                if high < 1 / limit
                else "same",
            }
        )
    return pd.DataFrame(rows)
