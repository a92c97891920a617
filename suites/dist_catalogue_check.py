"""Checks suites/dist_catalogue.py on its own, without bnbench's distributed gate: spawns
world_size gloo processes on 127.0.0.1 and compares every class, rank by rank, with a float64
nn.BatchNorm (F.batch_norm) on the group's concatenated batch, over a few scenarios. Prints,
per class, the scenarios where it differs and why; a FAITHFUL class must differ nowhere, a
BROKEN one somewhere.

    .venv/bin/python suites/dist_catalogue_check.py [--world-sizes 2 3] [CLASS ...]

Not a test (pytest does not collect it): suites/test_dist_catalogue.py runs the catalogue
through the real gate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp
import torch.nn.functional as F

from bnbench.tolerances import compare_tensors, working_dtype

C = 5  # odd on purpose
EPS = 1e-5
COLLECTIVES = (
    "all_reduce all_gather all_gather_into_tensor all_gather_object reduce_scatter "
    "reduce_scatter_tensor broadcast barrier reduce gather scatter all_to_all all_to_all_single"
).split()


@dataclass(frozen=True)
class Scenario:
    name: str
    splits: dict[int, list[int]]  # world size -> samples per rank
    spatial: tuple[int, ...] = (3, 2)
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    offset: float = 0.0
    low_var: bool = False  # channel 0 has std 2e-3: variance 4e-6, below eps
    momentum: float | None = 0.1
    steps: int = 1
    mode: str = "train"  # train | eval (one training step, then eval) | eval_no_stats
    groups: list[list[int]] | None = None
    affine: bool = True

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32


SCENARIOS = [
    Scenario("even", {2: [3, 3], 3: [3, 3, 3]}, spatial=(4,)),
    Scenario("uneven-1-0", {2: [1, 5], 3: [1, 0, 5]}),
    Scenario("zero-rank", {2: [0, 4]}),
    Scenario("rank2-uneven", {2: [1, 4], 3: [1, 0, 4]}, spatial=()),
    Scenario("momentum-none-3-steps", {2: [2, 3], 3: [2, 1, 3]}, momentum=None, steps=3),
    Scenario("eval", {2: [2, 3], 3: [2, 3, 2]}, mode="eval"),
    Scenario("eval-no-stats", {2: [2, 3], 3: [2, 3, 2]}, mode="eval_no_stats"),
    Scenario("subgroup-[0,2]-[1]", {3: [2, 3, 4]}, groups=[[0, 2], [1]]),
    Scenario("offset-100", {2: [3, 4], 3: [3, 2, 4]}, offset=100.0),
    Scenario("channels-last", {2: [2, 3], 3: [2, 1, 3]}, spatial=(3, 3), channels_last=True),
    Scenario("low-var-channel", {2: [3, 4], 3: [3, 2, 4]}, low_var=True),
    Scenario("float16", {2: [2, 3], 3: [2, 1, 3]}, dtype=torch.float16),
    Scenario(
        "rank5-cl3d-bfloat16",
        {2: [2, 1], 3: [2, 0, 1]},
        spatial=(2, 3, 2),
        dtype=torch.bfloat16,
        channels_last=True,
    ),
    Scenario("float64-no-affine", {2: [1, 3], 3: [2, 1, 2]}, dtype=torch.float64, affine=False),
]


def batch(sc: Scenario, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and its grad_output, rounded to the scenario's dtype, as float64."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1 + sc.offset
    std = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    if sc.low_var:
        std[0] = 2e-3
    view = (1, C) + (1,) * len(sc.spatial)
    x = torch.randn((n, C, *sc.spatial), generator=g, dtype=torch.float64)
    x = x * std.view(view) + mean.view(view)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.to(sc.dtype).double(), grad.to(sc.dtype).double()


def as_input(t: torch.Tensor, sc: Scenario) -> torch.Tensor:
    t = t.to(sc.dtype)
    if not sc.channels_last:
        return t
    return t.contiguous(memory_format=_channels_last(t))


def _channels_last(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d


@contextmanager
def counting_collectives():
    calls: list[str] = []
    saved = []
    for module in (dist, c10d):
        for name in COLLECTIVES:
            fn = getattr(module, name, None)
            if fn is None:
                continue

            def counted(*args, _fn=fn, _name=name, **kwargs):
                calls.append(_name)
                return _fn(*args, **kwargs)

            saved.append((module, name, fn))
            setattr(module, name, counted)
    try:
        yield calls
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def run_scenario(cls, sc: Scenario, rank: int, ws: int) -> list[str]:
    problems: list[str] = []
    split = sc.splits[ws]
    starts = [sum(split[:r]) for r in range(ws + 1)]
    group, members = None, list(range(ws))
    if sc.groups:
        made = [dist.new_group(g) for g in sc.groups]  # every rank, in the same order
        i = next(i for i, g in enumerate(sc.groups) if rank in g)
        group, members = made[i], sc.groups[i]
    trs = sc.mode != "eval_no_stats"
    bn = cls(C, EPS, sc.momentum, sc.affine, trs, process_group=group, dtype=sc.param_dtype)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        if sc.affine:
            bn.weight.copy_(torch.randn(C, generator=g) * 0.5 + 1.2)
            bn.bias.copy_(torch.randn(C, generator=g))
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    w64 = bn.weight.detach().double() if sc.affine else None
    b64 = bn.bias.detach().double() if sc.affine else None
    rm64 = bn.running_mean.double().clone() if bn.running_mean is not None else None
    rv64 = bn.running_var.double().clone() if bn.running_var is not None else None
    dims = [0, *range(2, 2 + len(sc.spatial))]
    mine = slice(starts[rank], starts[rank + 1])
    # the rows of the group's batch (its members' shards, concatenated) that are this rank's
    offset = sum(split[m] for m in members if m < rank)
    own = slice(offset, offset + split[rank])
    wd = working_dtype(sc.dtype, sc.param_dtype)  # weight grads and statistics
    steps = sc.steps if sc.mode != "eval_no_stats" else 0
    for step in range(steps):
        x64, dy64 = batch(sc, starts[-1], seed=100 + step)
        x = as_input(x64[mine], sc).requires_grad_()
        y = bn(x)
        y.backward(as_input(dy64[mine], sc))
        # oracle: float64 BatchNorm over the group's batch
        X = torch.cat([x64[starts[m] : starts[m + 1]] for m in members]).requires_grad_()
        G = torch.cat([dy64[starts[m] : starts[m + 1]] for m in members])
        factor = 1.0 / (step + 1) if sc.momentum is None else sc.momentum
        Y = F.batch_norm(X, rm64, rv64, w64, b64, True, factor, EPS)
        (Y * G).sum().backward()
        var, mean = torch.var_mean(X.detach(), dims, correction=0)
        view = (1, C) + (1,) * len(sc.spatial)
        xhat = (X.detach() - mean.view(view)) / (var.view(view) + EPS).sqrt()
        tag = f"step {step}: " if steps > 1 else ""
        problems += [tag + p for p in check_output(y, x, Y[own], sc)]
        checks = [("input grad", x.grad, X.grad[own], sc.dtype)]
        if sc.affine:
            checks += [
                ("weight grad", bn.weight.grad, (G * xhat)[own].sum(dims), wd),
                ("bias grad", bn.bias.grad, G[own].sum(dims), wd),
            ]
        for name, got, want, dtype in checks:
            problem = compare_tensors(name, got, want, dtype)
            problems += [tag + problem] if problem else []
        bn.zero_grad(set_to_none=True)
    if steps:
        for name, got, want in [
            ("running_mean", bn.running_mean, rm64),
            ("running_var", bn.running_var, rv64),
        ]:
            problem = compare_tensors(name, got, want, wd, statistics=True)
            problems += [problem] if problem else []
        if int(bn.num_batches_tracked) != steps:
            problems.append(f"num_batches_tracked: {int(bn.num_batches_tracked)}, want {steps}")
    if sc.mode.startswith("eval"):
        bn.eval()
        x64, _ = batch(sc, starts[-1], seed=999)
        x = as_input(x64[mine], sc)
        with counting_collectives() as calls, torch.no_grad():
            y = bn(x)
        local = sc.mode == "eval_no_stats"
        want = F.batch_norm(x64[mine], rm64, rv64, w64, b64, local, 0.0, EPS)
        problems += ["eval " + p for p in check_output(y, x, want, sc)]
        if calls:
            problems.append(f"eval: called collectives {calls} (eval must not communicate)")
    return problems


def check_output(y, x, want, sc: Scenario) -> list[str]:
    if not isinstance(y, torch.Tensor):
        return [f"output: a {type(y).__name__}"]
    problems = []
    if y.dtype != x.dtype:
        problems.append(f"output: dtype {y.dtype}, expected the input's {x.dtype}")
    if sc.channels_last and not y.is_contiguous(memory_format=_channels_last(x)):
        problems.append(f"output: strides {y.stride()}, expected channels_last")
    problem = compare_tensors("output", y, want, sc.dtype)
    return problems + ([problem] if problem else [])


def init(store, rank: int, ws: int, generation: int, timeout: float) -> None:
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"pg{generation}", store),
        rank=rank,
        world_size=ws,
        timeout=timedelta(seconds=timeout),
    )


def rank_main(rank, ws, port, classes, out, timeout):
    import dist_catalogue

    store = dist.TCPStore("127.0.0.1", port, ws, is_master=False, timeout=timedelta(seconds=120))
    generation, index, rows = 0, 0, []
    init(store, rank, ws, generation, timeout)
    for name in classes:
        for sc in SCENARIOS:
            if ws not in sc.splits:
                continue
            start = time.perf_counter()
            try:
                problems, failed = run_scenario(getattr(dist_catalogue, name), sc, rank, ws), False
            except Exception as exc:  # any failure is a finding
                problems, failed = [f"raised {type(exc).__name__}: {str(exc)[:200]}"], True
                dist.destroy_process_group()  # so that the others' collectives end early
            seconds = time.perf_counter() - start
            rows.append(dict(cls=name, scenario=sc.name, rank=rank, problems=problems, s=seconds))
            # the ranks agree whether the process group is still usable
            store.set(f"s{index}/{rank}", "1" if failed else "0")
            keys = [f"s{index}/{r}" for r in range(ws)]
            store.wait(keys)
            if any(store.get(k) == b"1" for k in keys):
                if not failed:
                    dist.destroy_process_group()
                generation += 1
                init(store, rank, ws, generation, timeout)
            index += 1
    dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(rows))


def run_world(ws: int, classes: list[str], timeout: float) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, ws, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(ws, store.port, classes, out, timeout), nprocs=ws)
        return [row for r in range(ws) for row in json.loads(Path(out, f"{r}.json").read_text())]


def main() -> int:
    import dist_catalogue

    parser = argparse.ArgumentParser()
    parser.add_argument(
        "classes", nargs="*", default=dist_catalogue.FAITHFUL + dist_catalogue.BROKEN
    )
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--timeout", type=float, default=6.0, help="gloo collective timeout, s")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    exposed: dict[str, list[str]] = {name: [] for name in args.classes}
    total = time.perf_counter()
    for ws in args.world_sizes:
        start = time.perf_counter()
        rows = run_world(ws, args.classes, args.timeout)
        print(f"== world size {ws}: {time.perf_counter() - start:.1f} s")
        for name in args.classes:
            differs: dict[str, list[str]] = {}
            for r in rows:
                if r["cls"] == name:
                    for p in r["problems"]:
                        differs.setdefault(r["scenario"], []).append(f"rank {r['rank']}: {p}")
            exposed[name] += [f"{ws}:{scenario}" for scenario in differs]
            print(f"{name}: differs in {sorted(differs) or 'nothing'}")
            for scenario, problems in differs.items():
                print(f"    {scenario}: {problems[0][:230]}")
    print(f"== summary ({time.perf_counter() - total:.0f} s)")
    ok = True
    for name, where in exposed.items():
        faithful = name in dist_catalogue.FAITHFUL
        good = bool(where) != faithful
        ok = ok and good
        kind = "faithful" if faithful else "broken"
        print(f"{'ok' if good else 'UNEXPECTED'} {name} ({kind}): differs in {where or 'nothing'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
