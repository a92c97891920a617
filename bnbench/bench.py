"""Timed forward/backward benchmarks: sweeps as data, one isolated worker per implementation,
bandwidth floors measured in the same run, a tidy results table.

Modes: forward_train (training forward with autograd recording, as in a training step),
forward_eval (eval forward under no_grad), backward (backward alone, on a fresh graph built
untimed before each call, grad_output made beforehand), forward_backward (both).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bnbench import timing
from bnbench.cases import case_by_id
from bnbench.gate import environment, verdict, write_atomic
from bnbench.isolation import run_items
from bnbench.registry import Implementation

MODES = ("forward_train", "forward_eval", "backward", "forward_backward")
# Bytes moved per element, in units of the element size (shared/BENCHMARKING.md): a single-pass
# forward reads x and writes y; backward reads dy and x and writes dx.
BYTES_PER_ELEMENT = {"forward_train": 2, "forward_eval": 2, "backward": 3, "forward_backward": 5}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Sweep:
    """A benchmark sweep, declared: every (shape, dtype, memory format, mode) combination of
    the groups, for every implementation and device."""

    name: str
    groups: tuple[dict, ...]  # each: batch_sizes, channels, spatial (list of tuples), dtypes,
    #                           memory_formats (optional), modes (optional)
    budget_s: float = 0.4  # timing budget per row, once warm
    warmup_s: float = 0.05

    def rows(self) -> list[dict]:
        rows = []
        for group in self.groups:
            if "models" in group:  # whole training steps of the model zoo's networks
                for model, batch in itertools.product(group["models"], group["batch_sizes"]):
                    rows.append({"model": model, "shape": _model_input(model, batch),
                                 "dtype": "float32", "memory_format": "contiguous",
                                 "mode": "train_step"})
                continue
            for spatial, channels, batch, dtype, fmt, mode in itertools.product(
                    group["spatial"], group["channels"], group["batch_sizes"], group["dtypes"],
                    group.get("memory_formats", ("contiguous",)), group.get("modes", MODES)):
                shape = (batch, channels) + tuple(spatial)
                rows.append({"shape": shape, "dtype": dtype, "memory_format": fmt,
                             "mode": mode})
        return rows


def _model_input(model: str, batch: int) -> tuple:
    from bnbench.zoo import UPSAMPLED

    return (batch, 1, 28, 28) if model in UPSAMPLED else (batch, 1, 8, 8)


QUICK = Sweep("quick", groups=(
    dict(models=("conv_bn", "mlp_bn"), batch_sizes=(16, 128)),
    dict(batch_sizes=(1, 8, 32, 64), channels=(64,), spatial=((28, 28),), dtypes=("float32",)),
    dict(batch_sizes=(8, 256), channels=(512,), spatial=((),), dtypes=("float32",)),
    dict(batch_sizes=(32,), channels=(64,), spatial=((128,),), dtypes=("float32",)),
    dict(batch_sizes=(4,), channels=(32,), spatial=((8, 16, 16),), dtypes=("float32",)),
    dict(batch_sizes=(32,), channels=(64,), spatial=((28, 28),), dtypes=("bfloat16",)),
    dict(batch_sizes=(32,), channels=(64,), spatial=((28, 28),), dtypes=("float32",),
         memory_formats=("channels_last",)),
))

FULL = Sweep("full", budget_s=1.0, warmup_s=0.1, groups=(
    dict(batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), channels=(64,),
         spatial=((56, 56),), dtypes=("float32",)),
    dict(batch_sizes=(1, 8, 32, 128, 256), channels=(32, 256), spatial=((28, 28), (14, 14), (7, 7)),
         dtypes=("float32", "bfloat16", "float16")),
    dict(batch_sizes=(32, 128), channels=(64, 256), spatial=((28, 28),),
         dtypes=("float32", "bfloat16"), memory_formats=("channels_last",)),
    dict(batch_sizes=(1, 32, 256, 1024, 4096), channels=(256, 1024), spatial=((),),
         dtypes=("float32", "bfloat16")),
    dict(batch_sizes=(8, 64, 256), channels=(128,), spatial=((256,),), dtypes=("float32",)),
    dict(batch_sizes=(1, 4, 16), channels=(32, 64), spatial=((16, 32, 32),),
         dtypes=("float32",), memory_formats=("contiguous", "channels_last")),
    dict(batch_sizes=(64,), channels=(64,), spatial=((28, 28),), dtypes=("float64",)),
    dict(models=("conv_bn", "mlp_bn", "fc_bn_fc", "lenet_bn"), batch_sizes=(16, 64, 256)),
))

# Seconds, not minutes: for the bench tests and for trying an implementation out.
SMOKE = Sweep("smoke", budget_s=0.05, warmup_s=0.01, groups=(
    dict(batch_sizes=(8,), channels=(16,), spatial=((8, 8),), dtypes=("float32",)),
    dict(batch_sizes=(16,), channels=(32,), spatial=((),), dtypes=("float32",),
         modes=("forward_eval",)),
    dict(models=("mlp_bn",), batch_sizes=(16,)),
))

# Large forward rows, where work (not call overhead) dominates: for checking the timer and the
# regression gate against workloads of known relative cost.
CALIBRATION = Sweep("calibration", budget_s=1.0, groups=(
    dict(batch_sizes=(32,), channels=(64,), spatial=((56, 56),), dtypes=("float32",),
         modes=("forward_eval", "forward_train")),
))

SWEEPS = {"quick": QUICK, "full": FULL, "smoke": SMOKE, "calibration": CALIBRATION}

COLUMNS = [
    "implementation", "device", "dtype", "mode", "batch_size", "channels", "spatial", "rank",
    "shape", "memory_format", "status", "verified", "median_s", "p20_s", "p80_s", "iqr_s",
    "repetitions", "calls_per_repetition", "bytes", "gbps", "copy_gbps", "floor_s",
    "ratio_to_floor", "clone_s", "ratio_to_clone", "cache_effect", "peak_memory_bytes",
    "memory_method", "first_call_s", "compile_s", "graphs_compiled", "recompiled_while_timing",
    "threads", "model", "message",
]


def gate_case_for(row: dict) -> str:
    """The gate case whose verdict vouches for a benchmark row (a model's training step: the
    default case at the rank of its first BatchNorm)."""
    if row.get("model"):
        return "default-rank4" if row["model"] in ("conv_bn", "lenet_bn") else "default-rank2"
    rank = len(row["shape"])
    check = {"float32": "default", "float64": "float64", "float16": "float16",
             "bfloat16": "bfloat16"}[row["dtype"]]
    if row["memory_format"] == "channels_last" and rank in (4, 5):
        check = "channels_last" if row["dtype"] == "float32" else "channels_last_float16"
    return f"{check}-rank{rank}"


def _channels_last(rank: int):
    return torch.channels_last if rank == 4 else torch.channels_last_3d


def _input_sets(shape, dtype, fmt, device, requires_grad) -> tuple[list, list]:
    """Enough distinct inputs (and grad_outputs) that one call's data is cold in the cache."""
    element = torch.empty((), dtype=dtype).element_size()
    size = math.prod(shape) * element
    cache = timing.last_level_cache_bytes(device)
    count = max(1, min(32, math.ceil(2 * cache / max(size, 1)), (1 << 30) // max(size, 1)))
    xs, gs = [], []
    for _ in range(count):
        x = torch.randn(shape, device=device, dtype=dtype)
        if fmt == "channels_last":
            x = x.contiguous(memory_format=_channels_last(len(shape)))
        xs.append(x.requires_grad_(requires_grad))
        gs.append(torch.randn_like(x))
    return xs, gs


def _module_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass
class Workload:
    """What one benchmark row times: ``step(i)`` on rotating inputs, with ``prepare(i)`` run
    untimed before each call when the step needs it (backward needs a fresh graph)."""

    step: Callable[[int], object]
    prepare: Callable[[int], None] | None
    inputs: list
    bytes: int


def _train_step_workload(impl: Implementation, device: str, row: dict) -> Workload:
    """One SGD step of a zoo network with ``impl`` swapped in, on rotating digit batches."""
    import torch.nn.functional as F

    from bnbench import zoo
    from bnbench.models import swap

    name, batch = row["model"], row["shape"][0]
    model = swap(zoo.build(name, seed=0, device=device), impl)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x_train, y_train, _, _ = zoo.digits()
    x_train = zoo.prepare(name, x_train)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        index = torch.randint(0, len(y_train), (batch,), generator=generator)
        batches.append((x_train[index].to(device, torch.float32), y_train[index].to(device)))

    def step(i):
        xb, yb = batches[i % len(batches)]
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return Workload(step, None, [b[0] for b in batches], 0)


def make_workload(impl: Implementation, device: str, row: dict) -> Workload:
    if row.get("model"):
        return _train_step_workload(impl, device, row)
    shape, dtype, mode = tuple(row["shape"]), DTYPES[row["dtype"]], row["mode"]
    module = impl.factory(len(shape), shape[1], device=device, dtype=_module_dtype(dtype))
    train = mode != "forward_eval"
    module.train(train)
    xs, gs = _input_sets(shape, dtype, row["memory_format"], device, requires_grad=train)
    k = len(xs)
    pending: dict[int, torch.Tensor] = {}

    def forward_eval(i):
        with torch.no_grad():
            return module(xs[i % k])

    def forward_train(i):
        return module(xs[i % k])

    def prepare_backward(i):
        x = xs[i % k]
        x.grad = None
        module.zero_grad(set_to_none=True)
        pending[i] = module(x)

    def backward(i):
        pending.pop(i).backward(gs[i % k])

    def forward_backward(i):
        x = xs[i % k]
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(gs[i % k])

    steps = {"forward_eval": forward_eval, "forward_train": forward_train,
             "backward": backward, "forward_backward": forward_backward}
    element = xs[0].element_size()
    return Workload(steps[mode], prepare_backward if mode == "backward" else None, xs,
                    BYTES_PER_ELEMENT[mode] * math.prod(shape) * element)


def bench_row(impl: Implementation, device: str, row: dict, sweep: Sweep) -> dict:
    """Time one row; returns the measured columns (no floors: the parent adds those)."""
    workload = make_workload(impl, device, row)
    step, prepare, xs = workload.step, workload.prepare, workload.inputs
    k = len(xs)
    graph_counter = _graph_counter()

    # The first call pays any compilation; a graph compiled after it means the sweep
    # recompiled, and those samples are reported as such rather than silently timed.
    graphs_before = graph_counter()
    begin = time.perf_counter()
    if prepare:
        prepare(-1)
    out = step(-1)
    timing.synchronize(device)
    first_call_s = time.perf_counter() - begin
    graphs_after_first_call = graph_counter()
    check = out if isinstance(out, torch.Tensor) else xs[-1 % k].grad
    if isinstance(check, torch.Tensor) and not bool(torch.isfinite(check).all()):
        return {"status": "nan", "message": "non-finite values in the output or input grad",
                "first_call_s": first_call_s}
    samples = timing.measure(step, device, prepare=prepare, budget_s=sweep.budget_s,
                             warmup_s=sweep.warmup_s)
    recompiled = graph_counter() != graphs_after_first_call
    memory, method = timing.peak_memory(lambda: step(10**9), device,
                                        (lambda: prepare(10**9)) if prepare else None)
    median = samples.median
    return {
        "status": "recompiled" if recompiled else "ok",
        "median_s": median, "p20_s": samples.quantile(0.2), "p80_s": samples.quantile(0.8),
        "iqr_s": samples.quantile(0.75) - samples.quantile(0.25),
        "repetitions": len(samples.seconds), "calls_per_repetition": samples.calls_per_sample,
        "samples": samples.seconds, "peak_memory_bytes": memory, "memory_method": method,
        "first_call_s": first_call_s, "compile_s": max(0.0, first_call_s - median),
        "graphs_compiled": graphs_after_first_call - graphs_before,
        "recompiled_while_timing": recompiled,
        "message": "a graph was compiled while timing: samples include compilation"
        if recompiled else "",
    }


def _graph_counter() -> Callable[[], int]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return lambda: 0
    return lambda: int(counters["stats"]["unique_graphs"])


def _bench_worker(spec: str, device: str, threads: int, rows_json: str, sweep_name: str,
                  verify: bool, *, items: list[str], channel) -> None:
    torch.set_num_threads(threads)
    from bnbench.checks import run_case
    from bnbench.registry import resolve

    impl = resolve([spec])[0]
    rows = json.loads(rows_json)
    cases = case_by_id()
    sweep = SWEEPS[sweep_name]
    verdicts: dict[str, str] = {}
    for item in items:
        channel.start(item)
        row = rows[int(item)]
        row["shape"] = tuple(row["shape"])
        case_id = gate_case_for(row)
        if verify and case_id not in verdicts:
            verdicts[case_id] = verdict(impl, cases[case_id],
                                        run_case(impl, cases[case_id], device))[0]
        try:
            result = bench_row(impl, device, row, sweep)
        except Exception as exc:  # the implementation may fail in any way
            result = {"status": "error", "message": f"{type(exc).__name__}: {exc}"[:500]}
        result["verified"] = verdicts.get(case_id, "not-run")
        channel.done(item, result)


# ---------------------------------------------------------------------------------------------
# Floors, measured in the same run by the parent process.

def measure_floor(device: str, dtype: torch.dtype, shape: tuple, budget_s: float) -> dict:
    """Copy into a preallocated tensor (bytes read + written) and a clone (allocation too)."""
    xs, _ = _input_sets(shape, dtype, "contiguous", device, requires_grad=False)
    out = torch.empty_like(xs[0])
    k = len(xs)
    copy = timing.measure(lambda i: out.copy_(xs[i % k]), device, budget_s=budget_s)
    clone = timing.measure(lambda i: xs[i % k].clone(), device, budget_s=budget_s)
    nbytes = xs[0].numel() * xs[0].element_size()
    return {"copy_gbps": 2 * nbytes / copy.median / 1e9, "clone_s": clone.median}


def finish_row(base: dict, result: dict, floor: dict | None, threads: int) -> dict:
    row = {column: "" for column in COLUMNS}
    row.update({key: value for key, value in base.items() if key in COLUMNS})
    row.update({key: value for key, value in result.items() if key in COLUMNS})
    row["threads"] = threads
    if row["status"] in ("ok", "recompiled") and floor and row["bytes"]:
        median = result["median_s"]
        row["gbps"] = row["bytes"] / median / 1e9
        row["copy_gbps"] = floor["copy_gbps"]
        row["floor_s"] = row["bytes"] / (floor["copy_gbps"] * 1e9)
        row["ratio_to_floor"] = median / row["floor_s"]
        row["clone_s"] = floor["clone_s"]
        row["ratio_to_clone"] = median / floor["clone_s"]
        # Faster than the memory can feed: the data came from caches.
        row["cache_effect"] = row["gbps"] > 1.05 * floor["copy_gbps"]
    return row


def base_columns(impl_name: str, device: str, row: dict) -> dict:
    shape = row["shape"]
    element = torch.empty((), dtype=DTYPES[row["dtype"]]).element_size()
    moved = 0 if row.get("model") else BYTES_PER_ELEMENT[row["mode"]] * math.prod(shape) * element
    return {"implementation": impl_name, "device": device, "dtype": row["dtype"],
            "mode": row["mode"], "batch_size": shape[0], "channels": shape[1],
            "spatial": "x".join(map(str, shape[2:])) or "-", "rank": len(shape),
            "shape": "x".join(map(str, shape)), "memory_format": row["memory_format"],
            "bytes": moved, "model": row.get("model", "")}


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _fmt(row.get(c, "")) for c in columns})
    return buffer.getvalue()


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return value


class ResultsWriter:
    """Rewrites results.csv and samples.csv atomically after every row, so an interrupted
    sweep leaves every finished row on disk and never a half-written file."""

    def __init__(self, directory: Path, env: dict):
        self.directory = Path(directory)
        self.rows: list[dict] = []
        self.samples: list[dict] = []
        self.env = env
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict, samples: list[float]) -> None:
        self.rows.append(row)
        index = len(self.rows) - 1
        self.samples += [{"row": index, "implementation": row["implementation"],
                          "device": row["device"], "mode": row["mode"], "shape": row["shape"],
                          "dtype": row["dtype"], "sample": i, "seconds": s}
                         for i, s in enumerate(samples)]
        self.flush()

    def flush(self, complete: bool = False) -> None:
        write_atomic(self.directory / "results.csv", to_csv(self.rows, COLUMNS))
        write_atomic(self.directory / "samples.csv", to_csv(
            self.samples, ["row", "implementation", "device", "mode", "shape", "dtype",
                           "sample", "seconds"]))
        env = dict(self.env, complete=complete, rows=len(self.rows))
        write_atomic(self.directory / "environment.json", json.dumps(env, indent=2))


def run_sweep(impls: list[Implementation], specs: list[str], devices: list[str], sweep: Sweep,
              output: Path, *, threads: int | None = None, timeout: float = 300.0,
              verify: bool = True, progress: Callable[[dict], None] | None = None) -> Path:
    """Benchmark every implementation on every device over the sweep; returns the directory."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = sweep.rows()
    env = environment()
    env.update({"schema": "bnbench.bench/1", "sweep": sweep.name, "threads": threads,
                "devices": devices, "implementations": specs})
    writer = ResultsWriter(output, env)
    floors: dict[tuple, dict] = {}
    try:
        for device in devices:
            for key in sorted({(r["dtype"], r["shape"]) for r in rows if not r.get("model")},
                              key=str):
                floors[(device,) + key] = measure_floor(device, DTYPES[key[0]], key[1],
                                                        sweep.budget_s / 2)
            for impl, spec in zip(impls, specs):
                runnable = []
                for index, row in enumerate(rows):
                    case = case_by_id()[gate_case_for(row)]
                    reasons = impl.not_supported_reasons(case, device)
                    if row["mode"] in ("backward", "forward_backward") and not impl.backward:
                        reasons.append("backward not supported")
                    if reasons:
                        writer.add(finish_row(base_columns(impl.name, device, row), {
                            "status": "not-supported", "verified": "not-supported",
                            "message": "; ".join(reasons)}, None, threads), [])
                        if progress:
                            progress(writer.rows[-1])
                    else:
                        runnable.append(str(index))

                def received(item, result, problem, seconds, impl=impl, device=device):
                    row = rows[int(item)]
                    if result is None:
                        result = {"status": "hung" if problem.startswith("hung") else "crashed",
                                  "message": problem, "verified": "not-run"}
                    samples = result.pop("samples", [])
                    writer.add(finish_row(base_columns(impl.name, device, row), result,
                                          floors.get((device, row["dtype"], row["shape"])),
                                          threads), samples)
                    if progress:
                        progress(writer.rows[-1])

                if runnable:
                    rows_json = json.dumps(rows)
                    run_items(_bench_worker, (spec, device, threads, rows_json, sweep.name,
                                              verify), runnable, timeout, received)
        writer.flush(complete=True)
    except KeyboardInterrupt:
        writer.flush(complete=False)
        raise
    return output


NUMERIC = {"median_s", "p20_s", "p80_s", "iqr_s", "gbps", "copy_gbps", "floor_s",
           "ratio_to_floor", "clone_s", "ratio_to_clone", "first_call_s", "compile_s"}
INTEGER = {"batch_size", "channels", "rank", "repetitions", "calls_per_repetition", "bytes",
           "peak_memory_bytes", "graphs_compiled", "threads"}


def parse_row(raw: dict) -> dict:
    """A results.csv row with its numbers as numbers (empty cells as None)."""
    row = dict(raw)
    for key in NUMERIC | INTEGER:
        if key in row:
            value = row[key]
            row[key] = None if value in ("", None) else (
                int(float(value)) if key in INTEGER else float(value))
    return row


def summary_lines(rows: list[dict]) -> list[str]:
    """Per implementation and device: geometric-mean time relative to builtin and to the floor."""
    ok = [r for r in rows if r["status"] == "ok"]
    lines = []
    def key(r):
        return (r["device"], r["dtype"], r["mode"], r["shape"], r["memory_format"],
                r.get("model") or "")

    by_key = {key(r): r for r in ok if r["implementation"] == "builtin"}
    for name, device in dict.fromkeys((r["implementation"], r["device"]) for r in ok):
        mine = [r for r in ok if r["implementation"] == name and r["device"] == device]
        floors = [r["ratio_to_floor"] for r in mine if r["ratio_to_floor"]]
        floor = math.exp(sum(math.log(f) for f in floors) / len(floors)) if floors else math.nan
        paired = [(r["median_s"], by_key[key(r)]["median_s"]) for r in mine if key(r) in by_key]
        vs_builtin = (math.exp(sum(math.log(a / b) for a, b in paired) / len(paired))
                      if paired else float("nan"))
        lines.append(f"{name}@{device}: {len(mine)} rows, time / builtin (geometric mean) "
                     f"{vs_builtin:.2f}x, time / floor {floor:.2f}x")
    return lines

