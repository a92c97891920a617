"""What bnbench writes, and the vocabulary of its results.

One place for: the status of a benchmark row and the verdict of a gate case (with their
labels), the key that identifies a benchmark row, the results-table schema and its parsing, the
geometric mean every summary uses, the environment recorded with every run, and the atomic
writer every output file goes through.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import re
import socket
import subprocess
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Iterable

import torch

BENCH_SCHEMA = "bnbench.bench/1"
VERIFY_SCHEMA = "bnbench.verify/1"
STUDY_SCHEMA = "bnbench.study/1"
# Studies written before the module was named for what it holds.
LEGACY_STUDY_SCHEMA = "bnbench.claim/1"


class _Text(str, Enum):
    """A string enum whose members print and format as their plain value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Status(_Text):
    """How a benchmark row ended."""

    OK = "ok"
    NOT_SUPPORTED = "not-supported"
    RECOMPILED = "recompiled"  # measured, but a graph was compiled while timing
    ERROR = "error"
    NAN = "nan"
    HUNG = "hung"
    CRASHED = "crashed"


# Rows whose median is a measurement (recompiled ones are measured, but flagged).
MEASURED = (Status.OK, Status.RECOMPILED)


class Verdict(_Text):
    """What a gate case's outcome means once the implementation's declarations are applied."""

    PASS = "pass"
    FAIL = "fail"
    DEVIATION = "deviation"  # declared, expected to fail, and it did
    UNEXPECTED_PASS = "unexpected-pass"  # declared deviation that passed: an error
    NOT_SUPPORTED = "not-supported"
    NOT_RUN = "not-run"  # a benchmark row whose vouching case was not run
    # a fail or unexpected-pass the user waived (verify --ignore): reported, not gated on, and
    # it vouches for nothing
    WAIVED = "waived"


BAD_VERDICTS = (Verdict.FAIL, Verdict.UNEXPECTED_PASS)
# How a verdict reads in matrices and reports, worst first.
VERDICT_LABELS = {
    Verdict.FAIL: "FAIL",
    Verdict.UNEXPECTED_PASS: "XPASS",
    Verdict.WAIVED: "waived",
    Verdict.DEVIATION: "dev",
    Verdict.PASS: "pass",
    Verdict.NOT_SUPPORTED: "n/s",
}

# What a benchmark row measures (a whole model's training step has a model name; BatchNorm
# layer rows have none); with the implementation, the key of a row.
CASE_KEY = ("device", "dtype", "mode", "shape", "memory_format", "model")
ROW_KEY = ("implementation", *CASE_KEY)

COLUMNS = [
    "implementation",
    "device",
    "dtype",
    "mode",
    "batch_size",
    "channels",
    "spatial",
    "rank",
    "shape",
    "memory_format",
    "status",
    "verified",
    "median_s",
    "p20_s",
    "p80_s",
    "iqr_s",
    "repetitions",
    "calls_per_repetition",
    "bytes",
    "gbps",
    "copy_gbps",
    "floor_s",
    "ratio_to_floor",
    "clone_s",
    "ratio_to_clone",
    "cache_effect",
    "peak_memory_bytes",
    "memory_method",
    "first_call_s",
    "compile_s",
    "graphs_compiled",
    "recompiled_while_timing",
    "threads",
    "model",
    "message",
]
SAMPLE_COLUMNS = ["row", "implementation", "device", "mode", "shape", "dtype", "sample", "seconds"]
NUMERIC = {
    "median_s",
    "p20_s",
    "p80_s",
    "iqr_s",
    "gbps",
    "copy_gbps",
    "floor_s",
    "ratio_to_floor",
    "clone_s",
    "ratio_to_clone",
    "first_call_s",
    "compile_s",
}
INTEGER = {
    "batch_size",
    "channels",
    "rank",
    "repetitions",
    "calls_per_repetition",
    "bytes",
    "peak_memory_bytes",
    "graphs_compiled",
    "threads",
}


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the positive finite values (NaN when there are none)."""
    kept = [float(v) for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in kept) / len(kept)) if kept else math.nan


def case_key(row: dict) -> tuple:
    """What ``row`` measured, whoever measured it: rows of two implementations pair on it."""
    return tuple(row.get(k) or "" for k in CASE_KEY)


def parse_row(raw: dict) -> dict:
    """A results.csv row with its numbers as numbers (empty cells as None)."""
    row = dict(raw)
    for key in NUMERIC | INTEGER:
        if key in row:
            value = row[key]
            row[key] = (
                None
                if value in ("", None)
                else (int(float(value)) if key in INTEGER else float(value))
            )
    return row


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _fmt(row.get(c, "")) for c in columns})
    return buffer.getvalue()


def _fmt(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return value


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    """Write ``content`` so that a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def environment() -> dict:
    """The machine and software a run was made on, recorded with every output."""
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # None when this is not a checkout, or it has no commit yet
        "git_revision": revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None,
    }


def _cpu_model() -> str:
    """The CPU's model name (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
