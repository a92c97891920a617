"""Timed forward/backward benchmarks: sweeps as data, one isolated worker per implementation,
bandwidth floors measured in the same run, a tidy results table.

Modes: forward_train (training forward with autograd recording, as in a training step),
forward_eval (eval forward under no_grad), backward (backward alone, on a fresh graph built
untimed before each call, grad_output made beforehand), forward_backward (both).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bnbench import gpu, isolation, timing
from bnbench.cases import case_by_id
from bnbench.gate import verdict
from bnbench.isolation import run_items
from bnbench.registry import Config, Implementation
from bnbench.results import (
    BENCH_SCHEMA,
    COLUMNS,
    MEASURED,
    SAMPLE_COLUMNS,
    Flag,
    Status,
    Verdict,
    case_key,
    clear_run_files,
    environment,
    file_digest,
    geomean,
    join_flags,
    new_run_id,
    output_lock,
    split_flags,
    to_csv,
    write_all_atomic,
)

MODES = ("forward_train", "forward_eval", "backward", "forward_backward")
# Modes that run a backward pass (a network's training step too).
BACKWARD_MODES = ("backward", "forward_backward", "train_step")
# Bytes moved per element, in units of the element size (the least traffic any kernel needs):
# a single-pass forward reads x and writes y; backward reads dy and x and writes dx.
BYTES_PER_ELEMENT = {"forward_train": 2, "forward_eval": 2, "backward": 3, "forward_backward": 5}
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Row:
    """One benchmark row: a BatchNorm layer on one input in one mode, or (``model`` set) one
    SGD step of a zoo network whose BatchNorm layers are the implementation's."""

    shape: tuple[int, ...]
    dtype: str
    memory_format: str
    mode: str
    model: str = ""

    @property
    def rank(self) -> int:
        return len(self.shape)

    def config(self, device: str) -> Config:
        """What the row asks of an implementation (a network's training step asks for the rank
        of its BatchNorm layers: the zoo's networks use rank 4 or rank 2 layers)."""
        dtype = DTYPES[self.dtype]
        rank = (4 if self.model in ("conv_bn", "lenet_bn") else 2) if self.model else self.rank
        return Config(
            rank=rank,
            device=device,
            dtype=dtype,
            module_dtype=_module_dtype(dtype),
            memory_format=self.memory_format,
            needs_backward=self.mode in BACKWARD_MODES,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Row:
        return cls(**dict(data, shape=tuple(data["shape"])))


@dataclass(frozen=True)
class LayerGroup:
    """Every (spatial, channels, batch size, dtype, memory format, mode) combination."""

    batch_sizes: tuple[int, ...]
    channels: tuple[int, ...]
    spatial: tuple[tuple[int, ...], ...]  # () for (N, C) inputs
    dtypes: tuple[str, ...] = ("float32",)
    memory_formats: tuple[str, ...] = ("contiguous",)
    modes: tuple[str, ...] = MODES

    def rows(self) -> list[Row]:
        return [
            Row((batch, channels) + tuple(spatial), dtype, fmt, mode)
            for spatial, channels, batch, dtype, fmt, mode in itertools.product(
                self.spatial,
                self.channels,
                self.batch_sizes,
                self.dtypes,
                self.memory_formats,
                self.modes,
            )
        ]


@dataclass(frozen=True)
class ModelGroup:
    """Whole training steps of the model zoo's networks, at each batch size."""

    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]

    def rows(self) -> list[Row]:
        return [
            Row(_model_input(model, batch), "float32", "contiguous", "train_step", model)
            for model, batch in itertools.product(self.models, self.batch_sizes)
        ]


@dataclass(frozen=True)
class ShapeGroup:
    """Every (shape, dtype, memory format, mode) combination of listed shapes (channels_last
    only for rank 4 and 5 inputs)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...] = ("float32",)
    memory_formats: tuple[str, ...] = ("contiguous",)
    modes: tuple[str, ...] = MODES

    def rows(self) -> list[Row]:
        return [
            Row(shape, dtype, fmt, mode)
            for shape, dtype, fmt, mode in itertools.product(
                self.shapes, self.dtypes, self.memory_formats, self.modes
            )
            if fmt == "contiguous" or len(shape) in (4, 5)
        ]


@dataclass(frozen=True)
class Sweep:
    """A benchmark sweep, declared: the rows of its groups, for every implementation and
    device. ``cuda``: the sweep whose rows the CUDA leg runs instead (the CPU's sweeps are
    launch-bound on a GPU); ``devices``: the only device types it is meant for (empty: any).
    On CUDA, ``kernel_budget_s`` caps each row's kernel timing (bnbench.gpu.StopRule) and
    ``cache`` is cold (the L2 flushed between repetitions) or warm."""

    name: str
    groups: tuple[LayerGroup | ModelGroup | ShapeGroup, ...]
    budget_s: float = 0.4  # timing budget per row, once warm
    warmup_s: float = 0.05
    cuda: str = ""
    devices: tuple[str, ...] = ()
    kernel_budget_s: float = 0.5
    cache: str = "cold"
    # the rows kept (bench --dtype / --mode / --memory-format; empty: all)
    only_dtypes: tuple[str, ...] = ()
    only_modes: tuple[str, ...] = ()
    only_formats: tuple[str, ...] = ()

    def rows(self) -> list[Row]:
        return [
            row
            for group in self.groups
            for row in group.rows()
            if (not self.only_dtypes or row.dtype in self.only_dtypes)
            and (not self.only_modes or row.mode in self.only_modes)
            and (not self.only_formats or row.memory_format in self.only_formats)
        ]

    def on(self, device: str) -> Sweep:
        """The sweep ``device``'s leg runs (this one, or its CUDA sweep on a GPU), with this
        one's cache mode and row filters."""
        if torch.device(device).type == "cuda" and self.cuda:
            return dataclasses.replace(
                SWEEPS[self.cuda],
                cache=self.cache,
                only_dtypes=self.only_dtypes,
                only_modes=self.only_modes,
                only_formats=self.only_formats,
            )
        return self

    def timing(self) -> dict:
        """What a worker needs to time a row the way this sweep does."""
        return {
            "budget_s": self.budget_s,
            "warmup_s": self.warmup_s,
            "kernel_budget_s": self.kernel_budget_s,
            "cache": self.cache,
        }

    def stop_rule(self) -> gpu.StopRule:
        return gpu.StopRule(max_time_s=self.kernel_budget_s)


def _model_input(model: str, batch: int) -> tuple:
    from bnbench.zoo import UPSAMPLED

    return (batch, 1, 28, 28) if model in UPSAMPLED else (batch, 1, 8, 8)


QUICK = Sweep(
    "quick",
    cuda="resnet50",
    groups=(
        ModelGroup(models=("conv_bn", "mlp_bn"), batch_sizes=(16, 128)),
        LayerGroup(batch_sizes=(1, 8, 32, 64), channels=(64,), spatial=((28, 28),)),
        LayerGroup(batch_sizes=(8, 256), channels=(512,), spatial=((),)),
        LayerGroup(batch_sizes=(32,), channels=(64,), spatial=((128,),)),
        LayerGroup(batch_sizes=(4,), channels=(32,), spatial=((8, 16, 16),)),
        LayerGroup(batch_sizes=(32,), channels=(64,), spatial=((28, 28),), dtypes=("bfloat16",)),
        LayerGroup(
            batch_sizes=(32,),
            channels=(64,),
            spatial=((28, 28),),
            memory_formats=("channels_last",),
        ),
    ),
)

FULL = Sweep(
    "full",
    cuda="resnet50-full",
    budget_s=1.0,
    warmup_s=0.1,
    groups=(
        LayerGroup(
            batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), channels=(64,), spatial=((56, 56),)
        ),
        LayerGroup(
            batch_sizes=(1, 8, 32, 128, 256),
            channels=(32, 256),
            spatial=((28, 28), (14, 14), (7, 7)),
            dtypes=("float32", "bfloat16", "float16"),
        ),
        LayerGroup(
            batch_sizes=(32, 128),
            channels=(64, 256),
            spatial=((28, 28),),
            dtypes=("float32", "bfloat16"),
            memory_formats=("channels_last",),
        ),
        LayerGroup(
            batch_sizes=(1, 32, 256, 1024, 4096),
            channels=(256, 1024),
            spatial=((),),
            dtypes=("float32", "bfloat16"),
        ),
        LayerGroup(batch_sizes=(8, 64, 256), channels=(128,), spatial=((256,),)),
        LayerGroup(
            batch_sizes=(1, 4, 16),
            channels=(32, 64),
            spatial=((16, 32, 32),),
            memory_formats=("contiguous", "channels_last"),
        ),
        LayerGroup(batch_sizes=(64,), channels=(64,), spatial=((28, 28),), dtypes=("float64",)),
        ModelGroup(models=("conv_bn", "mlp_bn", "fc_bn_fc", "lenet_bn"), batch_sizes=(16, 64, 256)),
    ),
)

# Seconds, not minutes: for the bench tests and for trying an implementation out.
SMOKE = Sweep(
    "smoke",
    budget_s=0.05,
    warmup_s=0.01,
    groups=(
        LayerGroup(batch_sizes=(8,), channels=(16,), spatial=((8, 8),)),
        LayerGroup(batch_sizes=(16,), channels=(32,), spatial=((),), modes=("forward_eval",)),
        ModelGroup(models=("mlp_bn",), batch_sizes=(16,)),
    ),
)

# Large forward rows, where work (not call overhead) dominates: for checking the timer and the
# regression gate against workloads of known relative cost.
CALIBRATION = Sweep(
    "calibration",
    budget_s=1.0,
    groups=(
        LayerGroup(
            batch_sizes=(32,),
            channels=(64,),
            spatial=((56, 56),),
            modes=("forward_eval", "forward_train"),
        ),
    ),
)

# The CUDA leg: every distinct BatchNorm shape of ResNet-50 at 224x224 for 32 and 256 images,
# and a BatchNorm1d over a transformer's tokens, in three dtypes and both memory formats: the
# layers users train, large enough that the GPU's time (not the launch) is measured.
_GPU_SHAPES = tuple(shape for batch in (32, 256) for shape in gpu.resnet50_shapes(batch)) + tuple(
    gpu.transformer_head_shape(batch) for batch in (32, 256)
)
_GPU_GROUP = ShapeGroup(
    shapes=_GPU_SHAPES,
    dtypes=("float32", "bfloat16", "float16"),
    memory_formats=("contiguous", "channels_last"),
)
RESNET50 = Sweep(
    "resnet50",
    groups=(dataclasses.replace(_GPU_GROUP, modes=("forward_train", "forward_backward")),),
    budget_s=0.1,
    warmup_s=0.02,
    devices=("cuda",),
    kernel_budget_s=0.3,
)
RESNET50_FULL = Sweep(
    "resnet50-full",
    groups=(_GPU_GROUP,),
    budget_s=0.3,
    warmup_s=0.05,
    devices=("cuda",),
    kernel_budget_s=1.0,
)

SWEEPS = {
    "quick": QUICK,
    "full": FULL,
    "smoke": SMOKE,
    "calibration": CALIBRATION,
    "resnet50": RESNET50,
    "resnet50-full": RESNET50_FULL,
}


def gate_case_for(row: Row) -> str:
    """The gate case whose verdict vouches for a benchmark row (a network's training step: the
    default case at the rank of its BatchNorm layers)."""
    rank = row.config("cpu").rank
    if row.model:
        return f"default-rank{rank}"
    check = {
        "float32": "default",
        "float64": "float64",
        "float16": "float16",
        "bfloat16": "bfloat16",
    }[row.dtype]
    if row.memory_format == "channels_last" and rank in (4, 5):
        check = "channels_last" if row.dtype == "float32" else "channels_last_float16"
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


def _train_step_workload(impl: Implementation, device: str, row: Row) -> Workload:
    """One SGD step of a zoo network with ``impl`` swapped in, on rotating digit batches."""
    import torch.nn.functional as F

    from bnbench import zoo
    from bnbench.swap import swap

    name, batch = row.model, row.shape[0]
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


def make_workload(impl: Implementation, device: str, row: Row) -> Workload:
    if row.model:
        return _train_step_workload(impl, device, row)
    shape, dtype, mode = row.shape, DTYPES[row.dtype], row.mode
    module = impl.factory(len(shape), shape[1], device=device, dtype=_module_dtype(dtype))
    train = mode != "forward_eval"
    module.train(train)
    xs, gs = _input_sets(shape, dtype, row.memory_format, device, requires_grad=train)
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

    steps = {
        "forward_eval": forward_eval,
        "forward_train": forward_train,
        "backward": backward,
        "forward_backward": forward_backward,
    }
    element = xs[0].element_size()
    return Workload(
        steps[mode],
        prepare_backward if mode == "backward" else None,
        xs,
        BYTES_PER_ELEMENT[mode] * math.prod(shape) * element,
    )


def bench_row(impl: Implementation, device: str, row: Row, sweep: Sweep) -> dict:
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
    wrong = _wrong_output(row, out, xs[-1 % k])
    if wrong:
        return {"status": Status.ERROR, "message": wrong, "first_call_s": first_call_s}
    check = out if isinstance(out, torch.Tensor) else xs[-1 % k].grad
    if isinstance(check, torch.Tensor) and not bool(torch.isfinite(check).all()):
        return {
            "status": Status.NAN,
            "message": "non-finite values in the output or input grad",
            "first_call_s": first_call_s,
        }
    samples = timing.measure(
        step,
        device,
        prepare=prepare,
        budget_s=sweep.budget_s,
        warmup_s=sweep.warmup_s,
        drop_disturbed=True,
    )
    kernel: dict = {}
    if torch.device(device).type == "cuda" and not row.model:
        kernel = gpu.time_kernel(
            step, device, prepare=prepare, cache=sweep.cache, rule=sweep.stop_rule()
        ).columns()
    recompiled = graph_counter() != graphs_after_first_call
    memory, method = timing.peak_memory(
        lambda: step(10**9), device, (lambda: prepare(10**9)) if prepare else None
    )
    median = samples.median
    return {
        "status": Status.RECOMPILED if recompiled else Status.OK,
        "median_s": median,
        "p20_s": samples.quantile(0.2),
        "p80_s": samples.quantile(0.8),
        "iqr_s": samples.quantile(0.75) - samples.quantile(0.25),
        "repetitions": len(samples.seconds),
        "calls_per_repetition": samples.calls_per_sample,
        "samples": samples.seconds,
        "peak_memory_bytes": memory,
        "memory_method": method,
        "first_call_s": first_call_s,
        "compile_s": max(0.0, first_call_s - median),
        "graphs_compiled": graphs_after_first_call - graphs_before,
        "recompiled_while_timing": recompiled,
        "message": "a graph was compiled while timing: samples include compilation"
        if recompiled
        else "",
        **timer_report(samples),
        **kernel,
    }


def timer_report(samples: timing.Samples) -> dict:
    """What the timer saw of the machine, as a worker sends it (bnbench.schema.BenchResult)."""
    ratio = samples.cpu_per_wall
    return {
        "disturbed": samples.disturbed,
        "disturbed_blocks": samples.disturbed_blocks,
        "cpu_per_wall": round(ratio, 4) if math.isfinite(ratio) and samples.classified else None,
        "load": samples.load.load1,
    }


def _wrong_output(row: Row, out: object, x: torch.Tensor) -> str:
    """Why the first call's result cannot be what nn.BatchNorm gives (empty when it can): a
    forward returns a tensor of the input's shape and dtype; a backward leaves the input a
    gradient of its shape. Timing anything else would time a different computation."""
    if row.model:
        return ""
    if row.mode in ("forward_train", "forward_eval"):
        if not isinstance(out, torch.Tensor):
            return f"forward returned {type(out).__name__}, not a tensor: not timed"
        if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
            return (
                f"forward returned a {out.dtype} tensor of shape {tuple(out.shape)} for a "
                f"{x.dtype} input of shape {tuple(x.shape)}: not timed"
            )
        return ""
    grad = x.grad
    if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != tuple(x.shape):
        return "backward left no gradient of the input's shape in the input: not timed"
    return ""


def _graph_counter() -> Callable[[], int]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return lambda: 0
    return lambda: int(counters["stats"]["unique_graphs"])


def vouching_case(impl: Implementation, row: Row, cases: dict):
    """The gate case that vouches for ``row``: forward rows of an implementation without a
    backward are vouched for by the same case run forward only."""
    case = cases[gate_case_for(row)]
    if not impl.supports_backward and row.mode not in BACKWARD_MODES:
        case = dataclasses.replace(case, backward=False)
    return case


def bench_worker(
    spec: str,
    device: str,
    threads: int,
    rows_json: str,
    timing_json: str,
    verify: bool,
    *,
    items: list[str],
    channel,
) -> None:
    """The worker's loop (bnbench.isolation's "bench" job): vouch for and time each row."""
    torch.set_num_threads(threads)
    from bnbench.checks import run_case, tolerant_constructor
    from bnbench.registry import resolve

    # a class without device/dtype is timed where only their defaults are asked for (CPU
    # float32), as the gate checks it; rows that need them fail with what to change
    impl = tolerant_constructor(resolve([spec])[0])
    rows = [Row.from_dict(r) for r in json.loads(rows_json)]
    # the sweep's timing budget (the sweep itself may be one the worker cannot look up)
    sweep = Sweep("worker", (), **json.loads(timing_json))
    cases = case_by_id()
    verdicts: dict = {}
    for item in items:
        channel.start(item)
        row = rows[int(item)]
        # a limit only the implementation's own code knows (the parent may hold a stand-in)
        reasons = impl.not_supported_reasons(row.config(device))
        if reasons:
            result = {
                "status": Status.NOT_SUPPORTED,
                "verified": Verdict.NOT_SUPPORTED,
                "message": "; ".join(reasons),
            }
            channel.done(item, result)
            continue
        if torch.device(device).type == "cuda" and not row.model:
            # the CUDA sweep is sized from the GPU's memory, row by row
            element = torch.empty((), dtype=DTYPES[row.dtype]).element_size()
            too_large = gpu.memory_reason(row.shape, element, torch.cuda.mem_get_info()[0])
            if too_large:
                result = {
                    "status": Status.NOT_SUPPORTED,
                    "verified": Verdict.NOT_RUN,
                    "message": too_large,
                }
                channel.done(item, result)
                continue
        case = vouching_case(impl, row, cases)
        if verify and case not in verdicts:
            verdicts[case] = verdict(impl, case, run_case(impl, case, device))[0]
        try:
            result = bench_row(impl, device, row, sweep)
        except Exception as exc:  # the implementation may fail in any way
            result = {"status": Status.ERROR, "message": f"{type(exc).__name__}: {exc}"[:500]}
        result["verified"] = verdicts.get(case, Verdict.NOT_RUN)
        channel.done(item, result)


def validate_result(result: dict) -> tuple[dict, list[float]]:
    """A worker's row result, checked (bnbench.schema.BenchResult): (the columns it sets, its
    samples). ValueError saying which field is wrong: a worker's numbers are not trusted, a
    zero or NaN median would divide by zero or poison every summary."""
    from pydantic import ValidationError

    from bnbench.schema import BenchResult, describe

    try:
        checked = BenchResult.model_validate(result)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None
    data = checked.model_dump(exclude_none=True)
    return data, data.pop("samples", [])


# ---------------------------------------------------------------------------------------------
# Floors, measured in the same run by the parent process.


def measure_floor(
    device: str, dtype: torch.dtype, shape: tuple, budget_s: float, cache: str = "cold"
) -> dict:
    """Copy into a preallocated tensor (bytes read + written) and a clone (allocation too),
    disturbed blocks timed again (bnbench.timing). On CUDA also the copy's kernel time, timed
    as the rows' kernels are (bnbench.gpu.time_kernel, ``cache``): the bandwidth each row's
    share is of."""
    xs, _ = _input_sets(shape, dtype, "contiguous", device, requires_grad=False)
    out = torch.empty_like(xs[0])
    k = len(xs)
    copy = timing.measure(
        lambda i: out.copy_(xs[i % k]), device, budget_s=budget_s, drop_disturbed=True
    )
    clone = timing.measure(
        lambda i: xs[i % k].clone(), device, budget_s=budget_s, drop_disturbed=True
    )
    nbytes = xs[0].numel() * xs[0].element_size()
    floor = {
        "copy_gbps": 2 * nbytes / copy.median / 1e9,
        "copy_s": copy.median,
        "clone_s": clone.median,
        "bytes": nbytes,
        "disturbed": copy.disturbed or clone.disturbed,
        "flags": [],
    }
    if torch.device(device).type == "cuda":
        kernel = gpu.time_kernel(lambda i: out.copy_(xs[0]), device, cache=cache)
        floor["copy_kernel_s"] = kernel.median
        floor["copy_kernel_gbps"] = 2 * nbytes / kernel.median / 1e9
    return floor


# Checks of a sweep's floors. A floor (copy or clone) may not take under FLOOR_SHRINK of the
# time of a smaller (or equal) tensor's floor of the same device and dtype: moving more bytes
# is never faster, and a busy machine only ever makes a floor slower, so the slower one of
# such a pair is the suspect. Its bandwidth (2 x bytes: read and written) must lie between
# MIN_FLOOR_GBPS, once FLOOR_OVERHEAD_S of per-call overhead is allowed for (it dominates
# small tensors), and MAX_FLOOR_GBPS (beyond any GPU's memory). Measured on this project's
# 2-core machine, quiet: 200 KB to 25 MB copies at 45-93 GB/s with 2 threads, 25-70 GB/s with
# one; with a busy neighbour a 3.2 MB clone read 8 ms (0.8 GB/s), 66x its quiet time.
FLOOR_SHRINK = 0.6
MIN_FLOOR_GBPS = 1.0
FLOOR_OVERHEAD_S = 5e-4
MAX_FLOOR_GBPS = 10_000.0
# Times a suspect floor is measured again before it is flagged.
FLOOR_RETRIES = 2
# A row timed under this fraction of its copy floor (the same bytes) is faster than memory
# can feed it; rows between this and 1 / 1.05 are marked cache_effect (from the caches).
FASTER_THAN_FLOOR = 0.8
# Flags a row takes from its floor.
FLOOR_FLAGS = (Flag.FLOOR_NOT_MONOTONE, Flag.FLOOR_IMPLAUSIBLE, Flag.FLOOR_DISTURBED)


def check_floors(floors: dict[tuple, dict]) -> dict[tuple, list[str]]:
    """The flags of each floor (keys ``(device, dtype, shape)``, values measure_floor's):
    floor-not-monotone (its copy or clone took over 1 / FLOOR_SHRINK times a larger or
    equal tensor's), floor-implausible (a bandwidth outside MIN_FLOOR_GBPS..MAX_FLOOR_GBPS),
    floor-disturbed (measured with too few undisturbed blocks)."""
    flags: dict[tuple, list[str]] = {key: [] for key in floors}
    groups: dict[tuple, list[tuple]] = {}
    for key in floors:
        groups.setdefault((key[0], key[1]), []).append(key)
    for keys in groups.values():
        for kind in ("copy_s", "clone_s"):
            sized = sorted(
                ((floors[k]["bytes"], floors[k][kind], k) for k in keys if floors[k].get(kind)),
                key=lambda item: (item[0], item[1]),
            )
            for position, (nbytes, seconds, key) in enumerate(sized):
                # the fastest floor of any larger or equal tensor (other than this one)
                others = [t for b, t, k in sized[position + 1 :] if b >= nbytes] + [
                    t for b, t, k in sized[:position] if b == nbytes
                ]
                if others and min(others) < FLOOR_SHRINK * seconds:
                    flags[key].append(Flag.FLOOR_NOT_MONOTONE)
                slowest = FLOOR_OVERHEAD_S + 2 * nbytes / (MIN_FLOOR_GBPS * 1e9)
                fastest = 2 * nbytes / (MAX_FLOOR_GBPS * 1e9)
                if not fastest <= seconds <= slowest:
                    flags[key].append(Flag.FLOOR_IMPLAUSIBLE)
    for key, floor in floors.items():
        if floor.get("disturbed"):
            flags[key].append(Flag.FLOOR_DISTURBED)
    return {key: list(dict.fromkeys(found)) for key, found in flags.items()}


def measure_floors(
    device: str,
    keys: list[tuple[str, tuple]],
    budget_s: float,
    measure: Callable[[str, torch.dtype, tuple, float], dict] = measure_floor,
) -> dict[tuple, dict]:
    """The floors of ``keys`` ((dtype, shape)) on ``device``, checked (check_floors): a
    suspect floor is measured again, up to FLOOR_RETRIES times, and one still wrong keeps its
    flags (``flags``), which its rows take."""
    floors = {(device,) + key: measure(device, DTYPES[key[0]], key[1], budget_s) for key in keys}
    for _ in range(FLOOR_RETRIES):
        suspects = [key for key, found in check_floors(floors).items() if found]
        if not suspects:
            break
        for key in suspects:
            floors[key] = measure(device, DTYPES[key[1]], key[2], budget_s)
    for key, found in check_floors(floors).items():
        floors[key]["flags"] = found
    return floors


def apply_floor(row: dict, floor: dict | None) -> dict:
    """Set ``row``'s floor columns from ``floor`` (none: cleared) and its flags: its own
    (disturbed), its floor's, and faster-than-floor when it was timed under FASTER_THAN_FLOOR
    of the copy floor."""
    own = [f for f in split_flags(row.get("flags")) if f not in FLOOR_FLAGS]
    own = [f for f in own if f not in (Flag.FASTER_THAN_FLOOR, Flag.OVER_COPY_BANDWIDTH)]
    for column in (
        "gbps",
        "copy_gbps",
        "floor_s",
        "ratio_to_floor",
        "clone_s",
        "ratio_to_clone",
        "kernel_gbps",
        "copy_kernel_gbps",
        "bandwidth_share",
    ):
        row[column] = ""
    row["cache_effect"] = ""
    if row["status"] in MEASURED and floor and row["bytes"]:
        median = row["median_s"]
        row["gbps"] = row["bytes"] / median / 1e9
        row["copy_gbps"] = floor["copy_gbps"]
        row["floor_s"] = row["bytes"] / (floor["copy_gbps"] * 1e9)
        row["ratio_to_floor"] = median / row["floor_s"]
        row["clone_s"] = floor["clone_s"]
        row["ratio_to_clone"] = median / floor["clone_s"]
        # Faster than the memory can feed: the data came from caches.
        row["cache_effect"] = row["gbps"] > 1.05 * floor["copy_gbps"]
        own += floor.get("flags", [])
        if row["ratio_to_floor"] < FASTER_THAN_FLOOR:
            own.append(Flag.FASTER_THAN_FLOOR)
        kernel_s = row.get("kernel_s")
        if isinstance(kernel_s, float) and kernel_s > 0 and floor.get("copy_kernel_gbps"):
            # the GPU's time against a copy of the same size timed the same way
            row["kernel_gbps"] = row["bytes"] / kernel_s / 1e9
            row["copy_kernel_gbps"] = floor["copy_kernel_gbps"]
            row["bandwidth_share"] = row["kernel_gbps"] / floor["copy_kernel_gbps"]
            if row["bandwidth_share"] > 1.0:
                own.append(Flag.OVER_COPY_BANDWIDTH)
    row["flags"] = join_flags(own)
    return row


def faster_than_floor(row: dict, floor: dict | None) -> bool:
    """Whether ``row`` (a finished row's columns) would be flagged faster-than-floor."""
    return Flag.FASTER_THAN_FLOOR.value in split_flags(apply_floor(dict(row), floor)["flags"])


def remeasure_floors(
    floors: dict[tuple, dict],
    keys: list[tuple],
    budget_s: float,
    writer: ResultsWriter,
    measure: Callable[[str, torch.dtype, tuple, float], dict] = measure_floor,
) -> None:
    """Measure again the floors of ``keys`` that a row was timed faster than (the floor is the
    suspect: a busy machine slows it), after the worker is done (so that neither disturbs the
    other), check them against the others, and give them to every row already written."""
    for key in keys:
        floors[key] = measure(key[0], DTYPES[key[1]], key[2], budget_s)
    for key in keys:
        same = {k: floors[k] for k in floors if k[:2] == key[:2]}
        floors[key]["flags"] = check_floors(same)[key]
    shapes = {(k[0], k[1], "x".join(map(str, k[2]))): floors[k] for k in keys}
    for row in writer.rows:
        floor = shapes.get((row["device"], row["dtype"], row["shape"]))
        if floor is not None and not row.get("model"):
            apply_floor(row, floor)
    writer.flush()


def finish_row(base: dict, result: dict, floor: dict | None, threads: int) -> dict:
    row: dict[str, Any] = {column: "" for column in COLUMNS}
    row.update({key: value for key, value in base.items() if key in COLUMNS})
    row.update({key: value for key, value in result.items() if key in COLUMNS})
    row["threads"] = threads
    measured = row["status"] in MEASURED
    row["flags"] = join_flags(
        ([Flag.DISTURBED] if result.get("disturbed") and measured else [])
        + ([Flag.THROTTLED] if result.get("throttled") and measured else [])
    )
    return apply_floor(row, floor)


def base_columns(impl_name: str, device: str, row: Row) -> dict:
    shape = row.shape
    element = torch.empty((), dtype=DTYPES[row.dtype]).element_size()
    moved = 0 if row.model else BYTES_PER_ELEMENT[row.mode] * math.prod(shape) * element
    return {
        "implementation": impl_name,
        "device": device,
        "dtype": row.dtype,
        "mode": row.mode,
        "batch_size": shape[0],
        "channels": shape[1],
        "spatial": "x".join(map(str, shape[2:])) or "-",
        "rank": len(shape),
        "shape": "x".join(map(str, shape)),
        "memory_format": row.memory_format,
        "bytes": moved,
        "model": row.model,
    }


class ResultsWriter:
    """Rewrites results.csv, samples.csv and environment.json after every row, so an
    interrupted sweep leaves every finished row on disk and never a half-written file. The
    three are written as one set (every file staged and fsynced before any is renamed), and
    environment.json, renamed last, records each table's sha256 and the run's ``run_id``: a
    reader that finds tables not matching it knows they come from different writes."""

    def __init__(self, directory: Path, env: dict):
        self.directory = Path(directory)
        self.rows: list[dict] = []
        self.samples: list[dict] = []
        self.env = env
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict, samples: list[float]) -> None:
        self.rows.append(row)
        index = len(self.rows) - 1
        self.samples += [
            {
                "row": index,
                "implementation": row["implementation"],
                "device": row["device"],
                "mode": row["mode"],
                "shape": row["shape"],
                "dtype": row["dtype"],
                "sample": i,
                "seconds": s,
            }
            for i, s in enumerate(samples)
        ]
        self.flush()

    def flush(self, complete: bool = False, final: bool = False) -> None:
        results = to_csv(self.rows, COLUMNS)
        samples = to_csv(self.samples, SAMPLE_COLUMNS)
        env = dict(
            self.env,
            complete=complete,
            rows=len(self.rows),
            files={
                "results.csv": {"sha256": file_digest(results), "rows": len(self.rows)},
                "samples.csv": {"sha256": file_digest(samples), "rows": len(self.samples)},
            },
        )
        # environment.json last: its digests describe the tables already in place. fsynced
        # at the end (and on Ctrl-C), not after every row: a sweep rewrites them row by row.
        write_all_atomic(
            {
                self.directory / "results.csv": results,
                self.directory / "samples.csv": samples,
                self.directory / "environment.json": json.dumps(env, indent=2),
            },
            durable=final,
        )


def run_sweep(
    impls: list[Implementation],
    specs: list[str],
    devices: list[str],
    sweep: Sweep,
    output: Path,
    *,
    threads: int | None = None,
    timeout: float = 300.0,
    verify: bool = True,
    progress: Callable[[dict], None] | None = None,
    run_id: str | None = None,
) -> Path:
    """Benchmark every implementation on every device over the sweep; returns the directory.

    The directory is held for the run (a second run writing there is refused: OutputInUse)
    and a new run (no ``run_id`` given) first removes what an earlier run left there;
    ``bnbench run`` passes the run_id it wrote into verify.json."""
    with output_lock(output):
        if run_id is None:
            run_id = new_run_id()
            clear_run_files(output)
        return _run_sweep(
            impls, specs, devices, sweep, Path(output), threads, timeout, verify, progress, run_id
        )


def _run_sweep(impls, specs, devices, sweep, output, threads, timeout, verify, progress, run_id):
    isolation.begin()
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    env = environment()
    env.update(
        {
            "schema": BENCH_SCHEMA,
            "sweep": sweep.name,
            "threads": threads,
            "devices": devices,
            "implementations": specs,
            "run_id": run_id,
        }
    )
    if any(torch.device(d).type == "cuda" for d in devices):
        env["cuda_sweep"] = sweep.on("cuda").name
        env["cache"] = sweep.cache
        env["gpu_facts"] = gpu.gpu_environment()
    writer = ResultsWriter(output, env)
    floors: dict[tuple, dict] = {}
    remeasured: set[tuple] = set()  # floors measured again for a row faster than them
    try:
        for device in devices:
            leg = sweep.on(device)  # the CUDA leg runs its own sweep
            rows = leg.rows()
            measure = functools.partial(measure_floor, cache=leg.cache)
            keys = sorted({(r.dtype, r.shape) for r in rows if not r.model}, key=str)
            floors.update(measure_floors(device, keys, leg.budget_s / 2, measure))
            for impl, spec in zip(impls, specs):
                suspects: set[tuple] = set()
                runnable = []
                for index, row in enumerate(rows):
                    reasons = impl.not_supported_reasons(row.config(device))
                    if reasons or impl.load_error:
                        writer.add(
                            finish_row(
                                base_columns(impl.name, device, row),
                                {
                                    "status": Status.NOT_SUPPORTED,
                                    "verified": Verdict.NOT_SUPPORTED,
                                    "message": "; ".join(reasons),
                                }
                                if reasons
                                else {
                                    "status": Status.CRASHED,
                                    "verified": Verdict.NOT_RUN,
                                    "message": impl.load_error,
                                },
                                None,
                                threads,
                            ),
                            [],
                        )
                        if progress:
                            progress(writer.rows[-1])
                    else:
                        runnable.append(str(index))

                def received(
                    item,
                    result,
                    problem,
                    seconds,
                    impl=impl,
                    device=device,
                    suspects=suspects,
                    rows=rows,
                ):
                    row = rows[int(item)]
                    samples: list[float] = []
                    if result is not None:
                        try:
                            result, samples = validate_result(result)
                        except ValueError as exc:
                            result = {
                                "status": Status.ERROR,
                                "message": f"the worker sent an invalid result: {exc}"[:2000],
                                "verified": Verdict.NOT_RUN,
                            }
                    else:
                        status = Status.HUNG if problem.startswith("hung") else Status.CRASHED
                        result = {"status": status, "message": problem, "verified": Verdict.NOT_RUN}
                    key = (device, row.dtype, row.shape)
                    finished = finish_row(
                        base_columns(impl.name, device, row), result, floors.get(key), threads
                    )
                    if key not in remeasured and faster_than_floor(finished, floors.get(key)):
                        suspects.add(key)  # measured again once the worker is done
                    writer.add(finished, samples)
                    if progress:
                        progress(writer.rows[-1])

                if runnable:
                    rows_json = json.dumps([r.to_dict() for r in rows])
                    run_items(
                        "bench",
                        (
                            spec,
                            device,
                            threads,
                            rows_json,
                            json.dumps(leg.timing()),
                            verify,
                        ),
                        runnable,
                        timeout,
                        received,
                    )
                if suspects:
                    remeasure_floors(
                        floors, sorted(suspects, key=str), leg.budget_s / 2, writer, measure
                    )
                    remeasured.update(suspects)
        writer.flush(complete=True, final=True)
    except KeyboardInterrupt:
        writer.flush(complete=False, final=True)
        raise
    return output


# A row vouched for by one of these verdicts timed something that is not nn.BatchNorm's
# computation (or that nobody vouches for: waived): never a speed-up, never the fastest.
FAILED_VERIFICATION = (Verdict.FAIL, Verdict.UNEXPECTED_PASS, Verdict.WAIVED)


def summary_lines(rows: list[dict], baseline: str = "builtin") -> list[str]:
    """Per implementation and device: geometric-mean time relative to the baseline
    implementation and to the floor, over the rows that did not fail verification and are not
    flagged (results.Flag: a measurement not to be trusted). Rows that failed verification are
    counted and named as such, with no ratio; flagged rows are counted, by flag, first."""
    ok = [r for r in rows if r["status"] == Status.OK]
    failed = [r for r in ok if r.get("verified") in FAILED_VERIFICATION]
    ok = [r for r in ok if r.get("verified") not in FAILED_VERIFICATION]
    flagged = [r for r in ok if split_flags(r.get("flags"))]
    ok = [r for r in ok if not split_flags(r.get("flags"))]
    by_case = {case_key(r): r for r in ok if r["implementation"] == baseline}
    lines = []
    if flagged:
        counts: dict[str, int] = {}
        for r in flagged:
            for flag in split_flags(r.get("flags")):
                counts[flag] = counts.get(flag, 0) + 1
        lines.append(
            f"WARNING: {len(flagged)} measured rows are flagged as unreliable and left out of "
            "the figures below ("
            + ", ".join(f"{flag}: {n}" for flag, n in sorted(counts.items()))
            + "): the machine was busy or a floor is wrong; see the flags column of results.csv"
        )
    for name, device in dict.fromkeys((r["implementation"], r["device"]) for r in ok):
        mine = [r for r in ok if r["implementation"] == name and r["device"] == device]
        floor = geomean(r["ratio_to_floor"] for r in mine)
        vs_baseline = geomean(
            r["median_s"] / by_case[case_key(r)]["median_s"] for r in mine if case_key(r) in by_case
        )
        left_out = sum(r["implementation"] == name and r["device"] == device for r in flagged)
        lines.append(
            f"{name}@{device}: {len(mine)} rows, time / {baseline} (geometric mean) "
            f"{vs_baseline:.2f}x, time / floor {floor:.2f}x"
            + (f" ({left_out} flagged rows left out)" if left_out else "")
        )
        kernel_line = _kernel_summary(name, device, mine, by_case, baseline)
        if kernel_line:
            lines.append(kernel_line)
    for name, device in dict.fromkeys((r["implementation"], r["device"]) for r in flagged):
        if not any(r["implementation"] == name and r["device"] == device for r in ok):
            n = sum(r["implementation"] == name and r["device"] == device for r in flagged)
            lines.append(f"{name}@{device}: all {n} measured rows flagged: no figure is given")
    for name, device in dict.fromkeys((r["implementation"], r["device"]) for r in failed):
        n = sum(r["implementation"] == name and r["device"] == device for r in failed)
        lines.append(
            f"{name}@{device}: {n} rows FAILED VERIFICATION (timed, but what they compute is not "
            "nn.BatchNorm's): no speed-up is given for them"
        )
    return lines


def _kernel_summary(name: str, device: str, mine: list[dict], by_case: dict, baseline: str) -> str:
    """The CUDA rows' GPU-time line: kernel time against the baseline's, call time over kernel
    time (what launch and Python add) and the median bandwidth share of a copy."""
    timed = [r for r in mine if isinstance(r.get("kernel_s"), float) and r["kernel_s"] > 0]
    if not timed:
        return ""
    paired = [
        r["kernel_s"] / by_case[case_key(r)]["kernel_s"]
        for r in timed
        if case_key(r) in by_case and isinstance(by_case[case_key(r)].get("kernel_s"), float)
    ]
    shares = [r["bandwidth_share"] for r in timed if isinstance(r.get("bandwidth_share"), float)]
    return (
        f"{name}@{device} GPU time: kernel / {baseline} (geometric mean) "
        + (f"{geomean(paired):.2f}x" if paired else "n/a")
        + f", call / kernel {geomean(r['median_s'] / r['kernel_s'] for r in timed):.2f}x"
        + (f", median share of copy bandwidth {statistics.median(shares):.0%}" if shares else "")
    )
