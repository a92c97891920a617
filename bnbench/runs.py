"""Stored runs: a ``bnbench bench`` (or ``run``) output directory, or pytest-benchmark JSON,
loaded into tables for reports and the regression gate.

Every input problem is a ReportInputError naming the file and what is wrong with it. Nothing
read here is executed or unpickled: JSON and CSV only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bnbench.results import (
    BENCH_SCHEMA,
    LEGACY_STUDY_SCHEMA,
    ROW_KEY,
    STUDY_SCHEMA,
    VERIFY_SCHEMA,
)

REQUIRED = [
    "implementation",
    "device",
    "dtype",
    "mode",
    "batch_size",
    "channels",
    "spatial",
    "shape",
    "memory_format",
    "status",
    "median_s",
]
KEY = list(ROW_KEY)


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
    study: tuple[list[dict], dict] | None = None  # study.csv rows and study.json
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
        raise ReportInputError(
            f"{path}: missing columns {', '.join(missing)} (is this a bnbench results.csv?)"
        )
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
        raise ReportInputError(
            f"{path / 'environment.json'}: schema {env.get('schema')!r}, expected {BENCH_SCHEMA!r}"
        )
    rows = _read_csv(path / "results.csv", REQUIRED)
    samples = None
    if (path / "samples.csv").is_file():
        samples = _read_csv(path / "samples.csv", ["row", "seconds"])
    verify = None
    if (path / "verify.json").is_file():
        verify = _read_json(path / "verify.json")
        if verify.get("schema") != VERIFY_SCHEMA:
            raise ReportInputError(
                f"{path / 'verify.json'}: schema {verify.get('schema')!r}, "
                f"expected {VERIFY_SCHEMA!r}"
            )
    results = Results(path.name or str(path), path, _with_model_column(rows), env, samples, verify)
    # The BatchNorm study; runs made before it was named so call it claim.
    for stem, schema in (("study", STUDY_SCHEMA), ("claim", LEGACY_STUDY_SCHEMA)):
        if (path / f"{stem}.json").is_file():
            summary = _read_json(path / f"{stem}.json")
            if summary.get("schema") != schema:
                raise ReportInputError(
                    f"{path / (stem + '.json')}: schema "
                    f"{summary.get('schema')!r}, expected {schema!r}"
                )
            curve = _read_csv(
                path / f"{stem}.csv", ["model", "batchnorm", "seed", "step", "test_accuracy"]
            )
            results.study = (curve.to_dict("records"), summary)
            break
    if not env.get("complete", True):
        results.notes.append(f"{path}: the sweep was interrupted; {len(rows)} rows finished")
    return results


def load_pytest_benchmark(path: Path) -> Results:
    data = _read_json(path)
    if "benchmarks" not in data or "machine_info" not in data:
        raise ReportInputError(
            f"{path}: not pytest-benchmark JSON (no 'benchmarks' / 'machine_info')"
        )
    rows, samples = [], []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "implementation" not in info or "shape" not in info:
            continue  # not one of bnbench's benchmarks
        shape = [int(s) for s in str(info["shape"]).split("x")]
        stats = bench["stats"]
        median = stats["median"]
        rows.append(
            {
                "implementation": info["implementation"],
                "device": info.get("device", "cpu"),
                "dtype": info.get("dtype", "float32"),
                "mode": info.get("mode", bench["name"]),
                "batch_size": shape[0],
                "channels": shape[1],
                "spatial": "x".join(map(str, shape[2:])) or "-",
                "rank": len(shape),
                "shape": info["shape"],
                "memory_format": info.get("memory_format", "contiguous"),
                "status": "ok",
                "verified": "not-run",
                "median_s": median,
                "p20_s": stats.get("q1"),
                "p80_s": stats.get("q3"),
                "iqr_s": stats.get("iqr"),
                "repetitions": stats.get("rounds"),
                "bytes": info.get("bytes"),
                "gbps": info.get("gbps"),
                "threads": info.get("threads"),
            }
        )
        samples += [{"row": len(rows) - 1, "seconds": s} for s in stats.get("data", [])]
    if not rows:
        raise ReportInputError(
            f"{path}: no bnbench benchmarks in it (extra_info lacks implementation/shape)"
        )
    env = dict(
        data["machine_info"].get("bnbench") or {},
        schema=BENCH_SCHEMA,
        source="pytest-benchmark",
        datetime=data.get("datetime"),
    )
    return Results(
        path.stem,
        path,
        _with_model_column(pd.DataFrame(rows)),
        env,
        pd.DataFrame(samples) if samples else None,
        kind="pytest-benchmark",
    )


def load(path: str | os.PathLike) -> Results:
    path = Path(path)
    if path.is_dir():
        return load_bench_dir(path)
    if path.suffix == ".json" and path.is_file():
        return load_pytest_benchmark(path)
    raise ReportInputError(
        f"{path}: neither a bnbench results directory nor a pytest-benchmark JSON file"
    )


def combine(results: list[Results]) -> pd.DataFrame:
    """One table; a ``source`` column tells the inputs apart (made unique if names collide)."""
    frames, seen = [], dict[str, int]()
    for r in results:
        label = r.source
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}#{seen[label]}"
            r.source = label
        frames.append(r.rows.assign(source=label))
    return pd.concat(frames, ignore_index=True)
