"""Stored runs: a ``bnbench bench`` (or ``run``) output directory, or pytest-benchmark JSON,
loaded into tables for reports and the regression gate.

Every input is treated as hostile: it may come from another machine, another version, a run
that is still writing or a person with a text editor. So every file is checked before it is
used, and every problem is a ReportInputError naming the file and, for tables, the row (the
1-based data row and the file line it starts on) and the field:

* only regular files are opened (a FIFO would block the reader forever, a device never ends),
  and none larger than MAX_JSON_BYTES / MAX_CSV_BYTES;
* JSON documents are validated against pydantic models of the fields that are used;
* CSV tables are validated column by column with vectorized pandas/numpy checks (200,000 rows
  in well under a second): field counts per record (a truncated last row), NUL bytes, text in
  numeric columns, non-finite or non-positive medians of measured rows, unknown statuses and
  verdicts, duplicate rows, samples that point at no row or at a different row;
* when environment.json records the sha256 of the tables it was written with, the tables must
  match it (otherwise they come from different writes), and a verify.json whose run_id is not
  environment.json's is from another run and is not shown.

Nothing read here is executed or unpickled: JSON and CSV only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError as PydanticValidationError

from bnbench.results import (
    BENCH_SCHEMA,
    INTEGER,
    LEGACY_STUDY_SCHEMA,
    MEASURED,
    NUMERIC,
    ROW_KEY,
    STUDY_SCHEMA,
    VERIFY_SCHEMA,
    Status,
    Verdict,
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

# Larger files are refused: a report reads everything into memory.
MAX_JSON_BYTES = 64 * 2**20
MAX_CSV_BYTES = 2**30

STATUSES = [s.value for s in Status]
MEASURED_STATUSES = [s.value for s in MEASURED]
VERDICTS = [v.value for v in Verdict]
# Key columns that must name something (model is empty for BatchNorm layer rows).
NON_EMPTY = ["implementation", "device", "dtype", "mode", "shape", "memory_format", "status"]
# Integer columns every row needs, and that must be positive (plots use them on log scales).
POSITIVE_INTEGER = ["batch_size", "channels"]
# Per-sample identity columns of samples.csv, checked against the results row they point at.
SAMPLE_IDENTITY = ["implementation", "device", "mode", "shape", "dtype"]
# A flags cell: empty, or short codes (results.Flag; a later version may add codes) joined by ';'.
FLAGS_PATTERN = r"(?:[a-z][a-z0-9-]{0,39}(?:;[a-z][a-z0-9-]{0,39}){0,15})?"
# Integers beyond this are not exact in float64; no count bnbench writes comes near it.
MAX_INTEGER = 2**53


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


# ---------------------------------------------------------------------------------------------
# Reading files


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def _exists(path: Path) -> bool:
    """Whether anything (a dangling link included) is at ``path``: such a thing is read and
    rejected with a reason rather than skipped."""
    return os.path.lexists(path)


def read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, refusing anything else and anything larger than
    ``limit``. Non-regular files are never opened (opening a FIFO blocks until a writer comes);
    the open is non-blocking and re-checked in case the file was swapped in between."""
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise ReportInputError(f"{path}: missing") from exc
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot be read ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ReportInputError(f"{path}: not a regular file (a {_kind(info.st_mode)})")
    if info.st_size > limit:
        raise ReportInputError(
            f"{path}: {info.st_size} bytes, more than the {limit} bytes a report reads"
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot be read ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ReportInputError(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ReportInputError(f"{path}: more than the {limit} bytes a report reads")
    return data


def _read_json(path: Path) -> tuple[Any, bytes]:
    """The parsed document and its bytes."""
    data = read_bytes(path, MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8-sig")), data
    except UnicodeDecodeError as exc:
        raise ReportInputError(f"{path}: not valid JSON (not UTF-8: {exc.reason})") from exc
    except RecursionError as exc:
        raise ReportInputError(f"{path}: not valid JSON (nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise ReportInputError(f"{path}: not valid JSON ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# JSON documents


class _Document(BaseModel):
    """A JSON object whose listed fields have these types (strictly: no "1" for 1); fields not
    listed are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


HEX = r"^[0-9a-fA-F]{1,128}$"
Scalar = Union[StrictStr, StrictInt, StrictFloat, StrictBool, None]


class FileRecord(_Document):
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    rows: int | None = Field(default=None, ge=0)


class Environment(_Document):
    """environment.json of a bench directory: free-form facts about the machine, plus these."""

    schema_: str = Field(alias="schema")
    run_id: str | None = Field(default=None, pattern=HEX)
    complete: bool = True
    files: dict[str, FileRecord] | None = None


class VerifyResult(_Document):
    implementation: str
    device: str
    case: str
    check: str
    verdict: Verdict = Field(strict=False)  # a string in the file


class VerifyDocument(_Document):
    schema_: str = Field(alias="schema")
    run_id: str | None = Field(default=None, pattern=HEX)
    results: list[VerifyResult]


class StudyParameters(_Document):
    target: float = Field(ge=0, le=1, allow_inf_nan=False)


class StudyDocument(_Document):
    schema_: str = Field(alias="schema")
    study: StudyParameters
    summary: list[dict[str, Scalar]]
    conclusion: list[str]


class BenchmarkStats(_Document):
    median: float = Field(gt=0, allow_inf_nan=False)
    q1: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    q3: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    iqr: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    rounds: int | None = Field(default=None, ge=0)
    data: list[float] = Field(default_factory=list)


class BenchmarkInfo(_Document):
    implementation: str = Field(min_length=1)
    shape: str = Field(pattern=r"^[1-9][0-9]{0,8}(x[1-9][0-9]{0,8})+$")
    device: str = Field(default="cpu", min_length=1)
    dtype: str = Field(default="float32", min_length=1)
    mode: str | None = Field(default=None, min_length=1)
    memory_format: str = Field(default="contiguous", min_length=1)
    bytes: int | None = Field(default=None, ge=0)
    gbps: float | None = Field(default=None, allow_inf_nan=False)
    threads: int | None = Field(default=None, ge=0)


class Benchmark(_Document):
    name: str
    stats: BenchmarkStats
    extra_info: BenchmarkInfo


class PytestBenchmarkDocument(_Document):
    machine_info: dict[str, Any]
    benchmarks: list[dict[str, Any]]
    datetime: str | None = None


def _validate(model: type[BaseModel], document: Any, path: Path, where: str = "") -> Any:
    """``document`` checked against ``model``; the first problems, with their place in the
    document, make the error."""
    if not isinstance(document, dict):
        raise ReportInputError(
            f"{path}: {where or 'the document'} is not a JSON object (a {_json_type(document)})"
        )
    try:
        return model.model_validate(document)
    except PydanticValidationError as exc:
        problems = []
        for error in exc.errors()[:3]:
            place = where + "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]
            )
            value = "" if error["type"] == "missing" else f" (got {_short(error['input'])})"
            problems.append(f"{place.lstrip('.')}: {error['msg']}{value}")
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise ReportInputError(f"{path}: " + "; ".join(problems) + more) from None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, (int, float)) else "null"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_schema(document: dict, expected: str, path: Path) -> None:
    if document.get("schema") != expected:
        raise ReportInputError(
            f"{path}: schema {_short(document.get('schema'))}, expected {expected!r}"
        )


# ---------------------------------------------------------------------------------------------
# CSV tables


@dataclass
class Table:
    """A parsed CSV file: the frame, and where each data row starts (for error messages)."""

    path: Path
    frame: pd.DataFrame
    data: bytes
    starts: np.ndarray  # byte offset of each record, the header's first
    newlines: np.ndarray  # byte offset of every newline

    def where(self, position: int) -> str:
        """How an error names data row ``position`` (0-based): 1-based row and file line."""
        line = int(np.searchsorted(self.newlines, self.starts[position + 1])) + 1
        return f"row {position + 1} (line {line})"


def _records(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte offsets of every newline, of the start of each CSV record, and each record's field
    count; vectorized (quoted newlines and commas are inside quotes: an odd number of quotes
    before them in the file)."""
    raw = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(raw == ord("\n"))
    quotes = np.flatnonzero(raw == ord('"'))
    ends = newlines
    if len(quotes):
        ends = newlines[np.searchsorted(quotes, newlines) % 2 == 0]
    starts = np.concatenate([[0], ends + 1])
    if starts[-1] >= len(data):  # the file ends with a newline: no record after it
        starts = starts[:-1]
    commas = np.flatnonzero(raw == ord(","))
    bounds = np.append(starts, len(data))
    counts = np.diff(np.searchsorted(commas, bounds)) + 1
    if len(quotes):  # recount the records that quote (messages, mostly) with the csv module
        for record in np.unique(np.searchsorted(starts, quotes, side="right") - 1):
            text = data[bounds[record] : bounds[record + 1]].decode("utf-8", "replace")
            counts[record] = max((len(r) for r in csv.reader(io.StringIO(text))), default=1)
    return newlines, starts, counts


def read_table(
    path: Path,
    required: list[str],
    numeric: set[str],
    data: bytes | None = None,
    what: str = "",
) -> Table:
    """``path`` parsed as CSV: every record has the header's field count, the ``required``
    columns are present, the ``numeric`` ones hold numbers (or nothing) and every other column
    is text. ``what`` says what kind of file the columns are expected of."""
    if data is None:
        data = read_bytes(path, MAX_CSV_BYTES)
    nul = data.find(b"\0")
    if nul >= 0:
        raise ReportInputError(f"{path}: line {_line(data, nul)}: a NUL byte (not a text file)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportInputError(
            f"{path}: line {_line(data, exc.start)}: not UTF-8 text ({exc.reason})"
        ) from exc
    if data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (it holds no newline: lines stay)
        data = data[3:]
    if not data.strip():
        raise ReportInputError(f"{path}: empty (not even a header)")
    newlines, starts, counts = _records(data)
    header_end = starts[1] if len(starts) > 1 else len(data)
    header = next(csv.reader(io.StringIO(data[:header_end].decode("utf-8").strip())), [])
    if not header or any(not name.strip() for name in header):
        raise ReportInputError(f"{path}: line 1: the header has an empty column name")
    if len(set(header)) != len(header):
        twice = sorted({n for n in header if header.count(n) > 1})
        raise ReportInputError(f"{path}: line 1: column {twice[0]!r} appears twice")
    missing = [c for c in required if c not in header]
    if missing:
        raise ReportInputError(
            f"{path}: missing columns {', '.join(missing)}"
            + (f" (is this a bnbench {what}?)" if what else "")
        )
    table = Table(path, pd.DataFrame(), data, starts, newlines)
    wrong = np.flatnonzero(counts[1:] != len(header))
    if len(wrong):
        first = int(wrong[0])
        raise ReportInputError(
            f"{path}: {table.where(first)}: {counts[first + 1]} fields, the header has "
            f"{len(header)}"
            + (" (a truncated row?)" if counts[first + 1] < len(header) else "")
            + _more(len(wrong))
        )
    numbers = [c for c in header if c in numeric]
    try:
        frame = pd.read_csv(
            io.BytesIO(data),
            index_col=False,
            skip_blank_lines=False,
            keep_default_na=False,
            na_values={c: [""] for c in numbers},
            dtype={c: str for c in header if c not in numeric},
        )
    except (pd.errors.ParserError, ValueError) as exc:
        raise ReportInputError(f"{path}: not a readable CSV ({exc})") from exc
    if list(frame.columns) != header or len(frame) != len(starts) - 1:
        raise ReportInputError(
            f"{path}: not a readable CSV (unbalanced quotes, or line ends other than \\n?)"
        )
    table.frame = frame
    for column in numbers:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            parsed = _to_float(values)
            _fail(table, column, parsed.isna() & values.notna(), values, "is not a number")
            frame[column] = values = parsed.astype("float64")
        _fail(table, column, values.isin([np.inf, -np.inf]), values, "is not finite")
    return table


def _to_float(values: pd.Series) -> pd.Series:
    """``values`` as float64, NaN where a value is not a number; a number too large for a
    float (a 400-digit integer) becomes inf, which the finiteness checks then name."""
    try:
        return pd.to_numeric(values.astype(object), errors="coerce").astype("float64")
    except (OverflowError, TypeError, ValueError):

        def one(value: object) -> float:
            try:
                return float(value)  # type: ignore[arg-type]
            except (OverflowError, TypeError, ValueError):
                return float("inf") if isinstance(value, int) else float("nan")

        return values.astype(object).map(one).astype("float64")


def _line(data: bytes, offset: int) -> int:
    """The 1-based line of ``data`` that byte ``offset`` lies on."""
    return data.count(b"\n", 0, offset) + 1


def _more(count: int) -> str:
    return f" (and {count - 1} more rows like it)" if count > 1 else ""


def _fail(table: Table, column: str, bad: pd.Series, values: pd.Series, problem: str) -> None:
    """A ReportInputError naming the first row where ``bad`` holds, if any."""
    positions = np.flatnonzero(bad.to_numpy(dtype=bool, na_value=False))
    if len(positions):
        first = int(positions[0])
        value = values.iloc[first]
        shown = (
            "empty"
            if value is None or (isinstance(value, float) and np.isnan(value))
            else (_short(value.item() if hasattr(value, "item") else value))
        )
        raise ReportInputError(
            f"{table.path}: {table.where(first)}, {column}: {shown} {problem}"
            + _more(len(positions))
        )


def _check_integers(table: Table, columns: list[str], positive: list[str]) -> None:
    """The ``columns`` hold whole numbers (empty allowed, except in the ``positive`` ones,
    which must be > 0) and become int64 where nothing is empty."""
    frame = table.frame
    for column in columns:
        values = frame[column]
        present = values.notna()
        _fail(table, column, present & (values % 1 != 0), values, "is not an integer")
        _fail(table, column, present & (values.abs() >= MAX_INTEGER), values, "is out of range")
        if column in positive:
            _fail(table, column, ~present, values, "is required")
            _fail(table, column, values <= 0, values, "is not positive")
            frame[column] = values.astype("int64")
        else:
            _fail(table, column, values < 0, values, "is negative")
            if present.all():
                frame[column] = values.astype("int64")


def validate_results(table: Table) -> pd.DataFrame:
    """The checks a results table must pass before anything is computed from it (see the
    module docstring); returns the frame with a ``model`` and a ``verified`` column."""
    frame = table.frame
    for column in NON_EMPTY:
        _fail(table, column, frame[column] == "", frame[column], "is required")
    status = frame["status"]
    _fail(
        table,
        "status",
        ~status.isin(STATUSES),
        status,
        f"is not a status (one of {', '.join(STATUSES)})",
    )
    if "verified" in frame:
        verified = frame["verified"]
        _fail(
            table,
            "verified",
            ~verified.isin([*VERDICTS, ""]),
            verified,
            f"is not a verdict (one of {', '.join(VERDICTS)})",
        )
    else:
        frame["verified"] = ""
    # results written before rows were flagged have no flags column: nothing flagged
    if "flags" in frame:
        flags = frame["flags"].astype(object).where(frame["flags"].notna(), "").astype(str)
        _fail(
            table,
            "flags",
            ~flags.str.fullmatch(FLAGS_PATTERN),
            flags,
            "is not a ';'-joined list of flags (lower-case words joined by '-')",
        )
        frame["flags"] = flags
    else:
        frame["flags"] = ""
    _check_integers(table, [c for c in frame if c in INTEGER], POSITIVE_INTEGER)
    measured = status.isin(MEASURED_STATUSES)
    median = frame["median_s"]
    _fail(table, "median_s", measured & median.isna(), median, "is required for a measured row")
    _fail(table, "median_s", measured & (median <= 0), median, "is not positive")
    # The spreads are optional; where present they bound intervals, so they must be positive.
    for column in ("p20_s", "p80_s"):
        if column in frame:
            _fail(table, column, measured & (frame[column] <= 0), frame[column], "is not positive")
    if "iqr_s" in frame:
        _fail(table, "iqr_s", measured & (frame["iqr_s"] < 0), frame["iqr_s"], "is negative")
    frame = _with_model_column(frame)
    table.frame = frame
    twice = frame.duplicated(KEY, keep=False).to_numpy()
    if twice.any():
        first = int(np.flatnonzero(twice)[0])
        same = frame.iloc[first][KEY]
        later = frame.index[twice & (frame[KEY] == same).all(axis=1).to_numpy()]
        second = int(later[1])
        raise ReportInputError(
            f"{table.path}: {table.where(second)}: the same row as {table.where(first)} "
            f"({', '.join(f'{k}={_short(v)}' for k, v in same.items() if v != '')}); "
            f"a row's key ({', '.join(KEY)}) must be unique" + _more(int(twice.sum()) // 2)
        )
    return frame


def validate_samples(table: Table, rows: pd.DataFrame, results: Path) -> pd.DataFrame:
    """samples.csv: each sample points at a results.csv row (0-based ``row``) holding the same
    implementation, device, mode, shape and dtype, and is a finite positive time."""
    frame = table.frame
    _check_integers(table, ["row"], [])
    row = frame["row"]
    _fail(table, "row", row.isna(), row, "is required")
    _fail(
        table,
        "row",
        row >= len(rows),
        row,
        f"points past the last row of {results.name} ({len(rows)} rows)",
    )
    seconds = frame["seconds"]
    _fail(table, "seconds", seconds.isna(), seconds, "is required")
    _fail(table, "seconds", seconds <= 0, seconds, "is not positive")
    index = row.to_numpy(dtype="int64")
    for column in SAMPLE_IDENTITY:
        if column in frame and column in rows:
            expected = rows[column].to_numpy(dtype=object)[index]
            _fail(
                table,
                column,
                pd.Series(frame[column].to_numpy(dtype=object) != expected),
                frame[column],
                f"differs from the {column} of the results row it points at "
                "(samples from another run?)",
            )
    return frame[["row", "seconds"]]


def _with_model_column(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of BatchNorm layers have no model; older results have no model column at all."""
    if "model" in rows:  # an all-empty column reads back as float NaN
        rows["model"] = rows["model"].astype(object).where(rows["model"].notna(), "").astype(str)
    else:
        rows["model"] = ""
    return rows


# ---------------------------------------------------------------------------------------------
# Loading


def _check_recorded_files(
    env: Environment, path: Path, read: dict[str, bytes], rows: dict[str, int]
) -> None:
    """The sha256 (and row count) environment.json recorded for the files it was written with
    must match the files read: otherwise they come from different writes."""
    for name, record in (env.files or {}).items():
        if name not in read:
            if name in ("results.csv", "samples.csv"):
                raise ReportInputError(
                    f"{path / name}: missing, but {path / 'environment.json'} records it"
                )
            continue
        digest = hashlib.sha256(read[name]).hexdigest()
        if digest != record.sha256.lower():
            raise ReportInputError(
                f"{path / name}: sha256 {digest[:12]}... is not the {record.sha256[:12]}... "
                f"that {path / 'environment.json'} records: the files come from different "
                "writes (two runs into one directory, or a run still writing)"
            )
        if record.rows is not None and name in rows and record.rows != rows[name]:
            raise ReportInputError(
                f"{path / name}: {rows[name]} rows, {path / 'environment.json'} records "
                f"{record.rows}: the files come from different writes"
            )


def load_bench_dir(path: Path) -> Results:
    env_path = path / "environment.json"
    env_doc, _ = _read_json(env_path)
    if isinstance(env_doc, dict):
        _check_schema(env_doc, BENCH_SCHEMA, env_path)
    env = _validate(Environment, env_doc, env_path)
    read: dict[str, bytes] = {}
    read["results.csv"] = read_bytes(path / "results.csv", MAX_CSV_BYTES)
    table = read_table(
        path / "results.csv",
        REQUIRED,
        NUMERIC | INTEGER,
        read["results.csv"],
        "results.csv",
    )
    rows = validate_results(table)
    samples = None
    if _exists(path / "samples.csv"):
        read["samples.csv"] = read_bytes(path / "samples.csv", MAX_CSV_BYTES)
        sample_table = read_table(
            path / "samples.csv", ["row", "seconds"], {"row", "seconds"}, read["samples.csv"]
        )
        samples = validate_samples(sample_table, rows, path / "results.csv")
    counts = {"results.csv": len(rows)} | (
        {"samples.csv": len(samples)} if samples is not None else {}
    )
    _check_recorded_files(env, path, read, counts)
    results = Results(path.name or str(path), path, rows, env_doc, samples)
    verify_path = path / "verify.json"
    if _exists(verify_path):
        verify_doc, _ = _read_json(verify_path)
        if isinstance(verify_doc, dict):
            _check_schema(verify_doc, VERIFY_SCHEMA, verify_path)
        verify = _validate(VerifyDocument, verify_doc, verify_path)
        if verify.run_id == env.run_id:  # both None in directories written before run ids
            results.verify = verify_doc
        else:
            results.notes.append(
                f"verify.json in {path} is from another run (run_id {verify.run_id or 'none'}, "
                f"environment.json's {env.run_id or 'none'}); not shown"
            )
    # The BatchNorm study; runs made before it was named so call it claim.
    for stem, schema in (("study", STUDY_SCHEMA), ("claim", LEGACY_STUDY_SCHEMA)):
        summary_path = path / f"{stem}.json"
        if _exists(summary_path):
            summary, _ = _read_json(summary_path)
            if isinstance(summary, dict):
                _check_schema(summary, schema, summary_path)
            _validate(StudyDocument, summary, summary_path)
            curve = read_table(
                path / f"{stem}.csv",
                ["model", "batchnorm", "seed", "step", "test_accuracy"],
                {"seed", "step", "test_accuracy"},
            )
            _check_study_curve(curve)
            results.study = (curve.frame.to_dict("records"), summary)
            break
    if not env.complete:
        results.notes.append(f"{path}: the sweep was interrupted; {len(rows)} rows finished")
    return results


def _check_study_curve(table: Table) -> None:
    frame = table.frame
    _fail(table, "model", frame["model"] == "", frame["model"], "is required")
    flags = frame["batchnorm"]
    _fail(table, "batchnorm", ~flags.isin(["True", "False"]), flags, "is not True or False")
    frame["batchnorm"] = flags == "True"
    for column in ("seed", "step", "test_accuracy"):
        _fail(table, column, frame[column].isna(), frame[column], "is required")
    _check_integers(table, ["seed", "step"], [])
    accuracy = frame["test_accuracy"]
    _fail(table, "test_accuracy", (accuracy < 0) | (accuracy > 1), accuracy, "is not in [0, 1]")


def load_pytest_benchmark(path: Path) -> Results:
    document, _ = _read_json(path)
    if not isinstance(document, dict) or (
        "benchmarks" not in document or "machine_info" not in document
    ):
        raise ReportInputError(
            f"{path}: not pytest-benchmark JSON (no 'benchmarks' / 'machine_info')"
        )
    data = _validate(PytestBenchmarkDocument, document, path)
    rows, samples, origin = [], [], []
    for number, entry in enumerate(data.benchmarks):
        info = entry.get("extra_info") if isinstance(entry, dict) else None
        if not isinstance(info, dict) or "implementation" not in info or "shape" not in info:
            continue  # not one of bnbench's benchmarks
        bench = _validate(Benchmark, entry, path, f"benchmarks[{number}]")
        info, stats = bench.extra_info, bench.stats
        shape = [int(s) for s in info.shape.split("x")]
        rows.append(
            {
                "implementation": info.implementation,
                "device": info.device,
                "dtype": info.dtype,
                "mode": info.mode or bench.name,
                "batch_size": shape[0],
                "channels": shape[1],
                "spatial": "x".join(map(str, shape[2:])) or "-",
                "rank": len(shape),
                "shape": info.shape,
                "memory_format": info.memory_format,
                "status": "ok",
                "verified": "not-run",
                "median_s": stats.median,
                "p20_s": stats.q1,
                "p80_s": stats.q3,
                "iqr_s": stats.iqr,
                "repetitions": stats.rounds,
                "bytes": info.bytes,
                "gbps": info.gbps,
                "threads": info.threads,
            }
        )
        origin.append(number)
        samples += [{"row": len(rows) - 1, "seconds": s} for s in stats.data]
    if not rows:
        raise ReportInputError(
            f"{path}: no bnbench benchmarks in it (extra_info lacks implementation/shape)"
        )
    frame = _with_model_column(pd.DataFrame(rows))
    numbers = [c for c in frame if c in NUMERIC | INTEGER]
    for column in numbers:
        frame[column] = _to_float(frame[column])
    for column in ("batch_size", "channels", "rank"):
        frame[column] = frame[column].astype("int64")
    table = _BenchmarkTable(path, frame, origin)
    validate_results(table)
    sample_frame = pd.DataFrame(samples, columns=["row", "seconds"])
    bad = ~np.isfinite(sample_frame["seconds"].to_numpy(dtype=float)) | (
        sample_frame["seconds"].to_numpy(dtype=float) <= 0
    )
    if bad.any():
        row = int(sample_frame["row"].iloc[int(np.flatnonzero(bad)[0])])
        raise ReportInputError(
            f"{path}: benchmarks[{origin[row]}].stats.data: a sample that is not a finite "
            "positive time"
        )
    env = dict(
        _mapping(data.machine_info.get("bnbench")),
        schema=BENCH_SCHEMA,
        source="pytest-benchmark",
        datetime=data.datetime,
    )
    return Results(
        path.stem,
        path,
        table.frame,
        env,
        sample_frame if samples else None,
        kind="pytest-benchmark",
    )


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


class _BenchmarkTable(Table):
    """Rows made from pytest-benchmark entries: errors name the entry."""

    def __init__(self, path: Path, frame: pd.DataFrame, origin: list[int]):
        super().__init__(path, frame, b"", np.zeros(0), np.zeros(0))
        self.origin = origin

    def where(self, position: int) -> str:
        return f"benchmarks[{self.origin[position]}]"


def load(path: str | os.PathLike) -> Results:
    path = Path(path)
    if path.is_dir():
        return load_bench_dir(path)
    if path.suffix == ".json" and _exists(path):
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
