"""What bnbench writes, and the vocabulary of its results.

One place for: the status of a benchmark row and the verdict of a gate case (with their
labels), the key that identifies a benchmark row, the results-table schema and its parsing, the
geometric mean every summary uses, the environment recorded with every run, and the atomic
writer every output file goes through.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
import uuid
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


class Flag(_Text):
    """Why a measured row's figures are not to be trusted (results.csv ``flags``, ';'-joined).
    A flagged row keeps its figures in results.csv but is left out of every headline figure
    (summaries, speed-ups, the fastest per case, compare's geometric means)."""

    # too few undisturbed blocks (bnbench.timing): the machine took the CPU away while timing
    DISTURBED = "disturbed"
    # timed under FASTER_THAN_FLOOR of the copy floor of the same bytes: the floor (or the row)
    # is wrong, and it stayed so after the floor was measured again
    FASTER_THAN_FLOOR = "faster-than-floor"
    # the row's copy or clone floor took longer than a larger tensor's floor (by more than a
    # margin), measured again and still so
    FLOOR_NOT_MONOTONE = "floor-not-monotone"
    # the row's floor implies a bandwidth no memory has (too slow or too fast)
    FLOOR_IMPLAUSIBLE = "floor-implausible"
    # the row's floor was measured with too few undisturbed blocks
    FLOOR_DISTURBED = "floor-disturbed"
    # CUDA: the row's kernel time implies more bandwidth than a copy of the same size timed
    # the same way in the same run (bnbench.gpu): a share over 100% is not a result
    OVER_COPY_BANDWIDTH = "over-copy-bandwidth"
    # CUDA: the GPU's clocks were held down (thermal, hardware slowdown, power brake) while
    # the row was timed
    THROTTLED = "throttled"


def join_flags(flags) -> str:
    """The ``flags`` cell: the distinct codes, in a fixed order (Flag's), ';'-joined."""
    present = {str(f) for f in flags if f}
    order = [f.value for f in Flag]
    return ";".join(sorted(present, key=lambda f: (order.index(f) if f in order else 99, f)))


def split_flags(cell: object) -> list[str]:
    """The codes of a ``flags`` cell (empty, None or NaN: none)."""
    if not isinstance(cell, str):
        return []
    return [f for f in cell.split(";") if f]


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
    "flags",
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
    "disturbed_blocks",
    "cpu_per_wall",
    "load",
    # CUDA (bnbench.gpu): the GPU time with launch overhead removed, how it was timed, and what
    # the GPU's clocks and power did meanwhile
    "kernel_s",
    "kernel_p20_s",
    "kernel_p80_s",
    "kernel_repetitions",
    "kernel_calls_per_repetition",
    "kernel_method",
    "kernel_noise",
    "cache",
    "stop_reason",
    "kernel_gbps",
    "copy_kernel_gbps",
    "bandwidth_share",
    "sm_clock_mhz",
    "sm_clock_min_mhz",
    "mem_clock_mhz",
    "power_limit_w",
    "power_w",
    "temperature_c",
    "throttled",
    "throttle_reasons",
    "capture_error",
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
    "cpu_per_wall",
    "load",
    "kernel_s",
    "kernel_p20_s",
    "kernel_p80_s",
    "kernel_noise",
    "kernel_gbps",
    "copy_kernel_gbps",
    "bandwidth_share",
    "sm_clock_mhz",
    "sm_clock_min_mhz",
    "mem_clock_mhz",
    "power_limit_w",
    "power_w",
    "temperature_c",
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
    "disturbed_blocks",
    "kernel_repetitions",
    "kernel_calls_per_repetition",
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
    """Write ``content`` so that a reader never sees a half-written file, and a crash right
    after leaves the new content or the old, never an empty file: a temporary file is written,
    fsynced, renamed into place, and the directory fsynced."""
    write_all_atomic({path: content})


def write_all_atomic(files: dict[str | os.PathLike, str | bytes], durable: bool = True) -> None:
    """Write several files as one step: every temporary file is written (and, ``durable``,
    fsynced) first, and only then are they renamed into place, so that a failure to write one
    (a full disk, a permission) leaves none of them changed. Temporary files are created
    exclusively (never through a planted symlink). ``durable=False`` skips the fsyncs, for a
    set rewritten often (each row of a sweep) and made durable at its end."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((Path(name), path))
            data = content.encode("utf-8") if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        for directory in dict.fromkeys(path.parent for _, path in staged):
            _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse a directory fsync
        pass
    finally:
        os.close(fd)


def check_writable_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be written as an output file (None when it can): its directory
    must exist or be creatable and accept a new file, and the path must not be a directory.
    Nothing is left behind by the check."""
    path = Path(path)
    if path.is_dir():
        return f"{path}: is a directory"
    problem = check_writable_directory(path.parent if str(path.parent) else Path("."))
    if problem:
        return f"{path} (its directory {problem})"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path}: not writable"
    return None


def check_writable_directory(directory: str | os.PathLike) -> str | None:
    """Why no file can be written in ``directory`` (None when one can): it is created if
    missing (what an output directory will be anyway), then a probe file is made and
    removed."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{directory}: exists and is not a directory"
    except OSError as exc:
        return f"{directory}: cannot create the directory ({exc.strerror or exc})"
    if not directory.is_dir():
        return f"{directory}: is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".bnbench-probe-", dir=directory)
    except OSError as exc:
        return f"{directory}: cannot write there ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None


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


# ---------------------------------------------------------------------------------------------
# Output directories: one writer at a time, and no file left over from an earlier run.

# What bnbench writes into an output directory (bench, run, study, report): a new run removes
# these first, so that no earlier run's file is read as part of the new one.
RUN_FILES = (
    "results.csv",
    "samples.csv",
    "environment.json",
    "verify.json",
    "verify.xml",
    "study.csv",
    "study.json",
    "claim.csv",
    "claim.json",
    "report.md",
    "report.html",
    # the report's full tables
    "fastest.csv",
    "speedup.csv",
    "failed-verification.csv",
    "flagged.csv",
    "correctness.csv",
    "not-measured.csv",
    "dist_results.csv",
    "ab.json",
    "ab.csv",
    "sync-across-ranks.csv",
    "gpu.csv",
)
LOCK_NAME = ".bnbench.lock"


class OutputInUse(Exception):
    """Another bnbench process is writing to the output directory."""


_HELD: dict[Path, list] = {}


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike):
    """Hold ``directory`` for this process (an OS lock on DIRECTORY/.bnbench.lock, released
    when the process ends, however it ends): a second bnbench run writing there is refused
    with OutputInUse instead of interleaving its rows with this one's. Re-entrant within a
    process (``bnbench run`` holds it across its bench)."""
    from filelock import FileLock, Timeout

    directory = Path(directory).resolve()
    if directory in _HELD:
        _HELD[directory][1] += 1
        try:
            yield
        finally:
            _HELD[directory][1] -= 1
        return
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputInUse(
            f"{directory}: another bnbench run is writing there (it holds "
            f"{directory / LOCK_NAME}); wait for it or choose another --output"
        ) from None
    _HELD[directory] = [lock, 1]
    try:
        yield
    finally:
        del _HELD[directory]
        lock.release()


def clear_run_files(directory: str | os.PathLike) -> None:
    """Remove what an earlier bnbench run left in ``directory`` (RUN_FILES only; nothing else),
    when it is a bnbench output directory (its environment.json or verify.json says so): a
    results.csv of someone else's in a directory given as --output is left alone."""
    directory = Path(directory)
    ours = False
    for name in ("environment.json", "verify.json"):
        try:
            head = (directory / name).open("rb").read(4096) if (directory / name).is_file() else b""
        except OSError:
            continue
        ours = ours or b'"bnbench.' in head
    if not ours:
        return
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)


def new_run_id() -> str:
    """Ties the files of one run together (environment.json, verify.json): a reader shows a
    verify.json only next to the results of the run that wrote it."""
    return uuid.uuid4().hex


def file_digest(content: str | bytes) -> str:
    data = content.encode("utf-8") if isinstance(content, str) else content
    return hashlib.sha256(data).hexdigest()
