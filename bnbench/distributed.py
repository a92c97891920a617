"""Synchronized BatchNorm, verified across processes: the distributed gate.

A synchronized BatchNorm (nn.SyncBatchNorm and anything with its constructor) normalizes every
rank's shard with the statistics of the global batch. The distributed gate runs ``world_size``
rank processes (gloo on 127.0.0.1 for CPU, NCCL with one GPU per rank for CUDA), splits a global
batch unevenly among them (ranks with one sample and with none included) and checks, on every
rank after every step, the output shard, the input gradient, the rank's own weight and bias
gradient contribution (nn.SyncBatchNorm leaves them for DDP to sum), running_mean, running_var
(unbiased with the global count) and num_batches_tracked against the float64 oracle run on the
concatenated batch. In eval it must not communicate: the collectives are counted.

Processes: the parent hosts the rendezvous store (a TCPStore on 127.0.0.1, port picked by the
system) and starts one bnbench worker per rank (bnbench.isolation: own process group, JSON on a
pipe, nothing unpickled). The ranks run the cases in lockstep; a case that a rank fails in a
way that can leave the others inside a collective (it raised, hung, died or broke the protocol)
ends that world: every rank is killed and a fresh world runs the remaining cases. Collectives
carry a timeout, so a rank waiting on a dead or hung peer is released.

Under ``torchrun`` (one machine or many, env:// rendezvous) the same cases run in-process on
every rank: ``torchrun ... -m bnbench.torchrun --impl sync``; rank 0 prints the verdict.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bnbench import isolation
from bnbench.checks import FAIL, PASS, UNSUPPORTED, Outcome
from bnbench.registry import RANK_TO_BUILTIN, Config, Implementation

CATEGORY = "distributed"
# How long a collective may wait for a peer before it raises (a dead or hung peer releases the
# others within this), as a share of the case timeout, and at least this.
MIN_COLLECTIVE_TIMEOUT_S = 5.0
# After one rank failed in a way that can leave the others in a collective, how long the others
# get to report before the world is torn down.
GRACE_S = 1.0

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The cases


def _uneven(world: int, step: int) -> list[int]:
    """Uneven shards that change from step to step; one rank with a single sample at step 1."""
    if step % 3 == 0:
        return [r + 2 for r in range(world)]  # as PyTorch's own test: rank r gets r + 2
    if step % 3 == 1:
        return [1] + [r + 3 for r in range(1, world)]
    return [5 if r == 0 else (1 if r == 1 else r + 1) for r in range(world)]


def _with_empty(world: int, step: int) -> list[int]:
    """A rank with no samples every step (not always the same one), and one with a single."""
    if world == 1:
        return [3]
    if step % 3 == 0:
        return [0] + [r + 1 for r in range(1, world)]
    if step % 3 == 1:
        return [1 if r == 0 else (0 if r == world - 1 else 3) for r in range(world)]
    return [4 if r == 0 else (0 if r == 1 else 1) for r in range(world)]


def _one_each(world: int, step: int) -> list[int]:
    return [1] * world if world > 1 else [2]


def _even(world: int, step: int) -> list[int]:
    return [3] * world


SPLITS: dict[str, Callable[[int, int], list[int]]] = {
    "uneven": _uneven,
    "empty-rank": _with_empty,
    "one-each": _one_each,
    "even": _even,
}


def subgroups(world: int) -> list[list[int]]:
    """The process groups of the subgroup cases: even ranks and odd ranks (non-contiguous
    ranks, so that a group's rank is not the global one); one rank each for a world of 2."""
    if world == 1:
        return [[0]]
    return [list(range(0, world, 2)), list(range(1, world, 2))]


TRAIN_EVAL = ("train", "train", "train", "eval")


@dataclass(frozen=True)
class DistCase:
    """One distributed check: the module, the global batch's shape, how it is split among the
    ranks at each step, and the train/eval schedule."""

    check: str
    rank: int  # input rank, 2 to 5
    shape: tuple[int, ...]  # (C, *spatial): each sample's shape
    description: str
    split: str = "uneven"
    steps: tuple[str, ...] = TRAIN_EVAL
    dtype: torch.dtype = torch.float32
    module_dtype: torch.dtype = torch.float32
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    memory_format: str = "contiguous"
    subgroup: bool = False
    offset: float = 0.0  # per-channel |mean| / std when large offsets are the point
    input_grad: bool = True  # False: the input does not require grad (a network's first layer)
    model: str = ""  # a zoo network trained with DDP instead of a single layer
    bias: bool = True  # False: torch's keyword-only bias=False (a weight, no bias)
    category: str = CATEGORY

    @property
    def id(self) -> str:
        return f"dist-{self.check}-rank{self.rank}"

    @property
    def num_features(self) -> int:
        return self.shape[0]

    def config(self, device: str, world_size: int) -> Config:
        return Config(
            rank=self.rank,
            device=device,
            dtype=self.dtype,
            module_dtype=self.module_dtype,
            memory_format=self.memory_format,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            bias=self.bias,
            tracking_switched_off="stop-tracking" in self.steps,
            needs_backward=True,
            world_size=world_size,
        )


def dist_cases() -> list[DistCase]:
    """The distributed case table."""
    cases = []
    shapes = {2: (5,), 3: (5, 3), 4: (5, 3, 2), 5: (5, 2, 2, 2)}
    for rank, shape in shapes.items():
        cases.append(
            DistCase("uneven", rank, shape, "uneven shards that change every step, then eval")
        )
    cases += [
        DistCase(
            "empty-rank",
            4,
            (5, 3, 2),
            "a rank with no samples and one with a single sample",
            split="empty-rank",
        ),
        DistCase(
            "empty-rank",
            3,
            (5, 4),
            "a rank with no samples and one with a single sample",
            split="empty-rank",
        ),
        DistCase("one-each", 4, (5, 3, 3), "one sample per rank", split="one-each"),
        DistCase(
            "one-each", 2, (6,), "one sample per rank (2-D: one value per rank)", split="one-each"
        ),
        DistCase(
            "momentum-none",
            4,
            (5, 3, 2),
            "momentum=None: cumulative average",
            momentum=None,
            steps=("train",) * 4 + ("eval",),
        ),
        DistCase("affine-false", 4, (5, 3, 2), "affine=False", affine=False),
        DistCase("bias-false", 4, (5, 3, 2), "bias=False: a weight and no bias", bias=False),
        DistCase("momentum-0", 4, (5, 3, 2), "momentum=0: running stats never move", momentum=0.0),
        DistCase(
            "momentum-1", 2, (5,), "momentum=1: running stats are the last batch's", momentum=1.0
        ),
        DistCase(
            "momentum-assigned",
            4,
            (5, 3, 2),
            "momentum assigned between steps (a schedule), to None and back",
            steps=(
                "train",
                "momentum:0.5",
                "train",
                "momentum:None",
                "train",
                "train",
                "momentum:0.9",
                "train",
                "eval",
            ),
        ),
        DistCase(
            "tracking-off",
            4,
            (5, 3, 2),
            "track_running_stats switched off after construction: batch statistics, "
            "buffers kept and no longer updated",
            steps=("train", "train", "stop-tracking", "train", "eval"),
        ),
        DistCase(
            "channels-last-c16",
            4,
            (16, 3, 3),
            "channels_last, 16 channels",
            memory_format="channels_last",
        ),
        DistCase(
            "float16-offset",
            4,
            (5, 3, 2),
            "float16 inputs with |mean| / std = 20",
            dtype=torch.float16,
            offset=20.0,
        ),
        DistCase(
            "bfloat16-offset",
            4,
            (5, 3, 2),
            "bfloat16 inputs with |mean| / std = 20",
            dtype=torch.bfloat16,
            offset=20.0,
        ),
        DistCase(
            "no-running-stats",
            4,
            (5, 3, 2),
            "track_running_stats=False: batch statistics in eval too, the shard's own",
            track_running_stats=False,
        ),
        DistCase(
            "no-running-stats-no-affine",
            2,
            (5,),
            "affine=False, track_running_stats=False",
            affine=False,
            track_running_stats=False,
        ),
        DistCase(
            "channels-last",
            4,
            (7, 3, 2),
            "channels_last shards, odd channel count",
            memory_format="channels_last",
        ),
        DistCase(
            "channels-last",
            5,
            (3, 2, 2, 2),
            "channels_last_3d shards",
            memory_format="channels_last",
        ),
        DistCase(
            "float16", 4, (5, 3, 2), "float16 inputs, float32 parameters", dtype=torch.float16
        ),
        DistCase(
            "bfloat16", 4, (5, 3, 2), "bfloat16 inputs, float32 parameters", dtype=torch.bfloat16
        ),
        DistCase(
            "float64",
            2,
            (5,),
            "float64 module and inputs",
            dtype=torch.float64,
            module_dtype=torch.float64,
        ),
        DistCase(
            "eval-train-eval",
            4,
            (5, 3, 2),
            "eval, train and eval again: eval is local",
            steps=("eval", "eval", "train", "eval", "train", "eval"),
        ),
        DistCase(
            "subgroup",
            4,
            (5, 3, 2),
            "process_group over some ranks (even ranks and odd ranks)",
            subgroup=True,
        ),
        DistCase("large-offset", 2, (4,), "channels with |mean| / std = 100", offset=100.0),
        DistCase("eps", 4, (5, 3, 2), "eps=0.1 (eps used inside the square root)", eps=0.1),
        DistCase(
            "input-no-grad",
            4,
            (5, 3, 2),
            "the input does not require grad: the parameters' gradients still do",
            input_grad=False,
        ),
        DistCase(
            "ddp-conv_bn",
            4,
            (1, 8, 8),
            "the zoo's conv_bn swapped to it, DDP training over the ranks = one process on "
            "the global batch",
            model="conv_bn",
            steps=("train",) * 3 + ("eval",),
        ),
        DistCase(
            "ddp-mlp_bn",
            2,
            (1, 8, 8),
            "the zoo's mlp_bn (BatchNorm1d) swapped to it, DDP training = one process",
            model="mlp_bn",
            steps=("train",) * 3 + ("eval",),
        ),
        DistCase(
            "tails",
            4,
            (37, 5, 7),
            "odd channel count and spatial size (tiling tails), larger shards",
        ),
    ]
    return cases


def case_by_id() -> dict[str, DistCase]:
    return {c.id: c for c in dist_cases()}


# ---------------------------------------------------------------------------------------------
# Inputs and the oracle


def _seed(case: DistCase, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case.id}/{salt}".encode()))


def _channel_stats(case: DistCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel std and mean of the generated data: a channel whose variance is below eps
    (where eps placement shows: clamping at eps instead of adding it), channels of other
    scales, and offsets (large ones when the case is about them)."""
    c = case.num_features
    g = _seed(case, "channels")
    std = torch.exp(torch.randn(c, generator=g, dtype=torch.float64) * 0.7)
    std[0] = 1e-3  # variance 1e-6 < eps: clamp(var, eps) and var + eps differ by 10%
    if case.offset:
        mean = case.offset * std * torch.where(torch.arange(c) % 2 == 0, 1.0, -1.0)
    else:
        mean = torch.randn(c, generator=g, dtype=torch.float64) * 2 * std
    return std, mean


def _global_batch(case: DistCase, step: int, n: int) -> torch.Tensor:
    """Step ``step``'s global batch of ``n`` samples, float64 values exact in the input dtype."""
    std, mean = _channel_stats(case)
    view = (1, case.num_features) + (1,) * (case.rank - 2)
    g = _seed(case, f"x{step}")
    x = torch.randn((n, *case.shape), generator=g, dtype=torch.float64) * std.view(view)
    x = x + mean.view(view)
    return x.to(case.dtype).to(torch.float64)


def _global_grad(case: DistCase, step: int, n: int) -> torch.Tensor:
    g = _seed(case, f"dy{step}")
    return torch.randn((n, *case.shape), generator=g, dtype=torch.float64).to(case.dtype).double()


def _params(case: DistCase) -> tuple[torch.Tensor, torch.Tensor]:
    g = _seed(case, "params")
    c = case.num_features
    weight = 1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    bias = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    return weight.to(case.module_dtype).double(), bias.to(case.module_dtype).double()


# ---------------------------------------------------------------------------------------------
# A rank's side


@dataclass
class World:
    """What a rank knows of the world it runs in."""

    rank: int
    world_size: int
    device: str
    group: Any = None  # the subgroup this rank belongs to (subgroup cases)
    members: list[int] = field(default_factory=list)  # that subgroup's ranks
    harness: Any = None  # bnbench's own group, for its barrier (never handed to the module)


class NotSupportedHere(Exception):
    """What the case needs is not there for this implementation (every rank alike)."""


class CaseFailed(Exception):
    def __init__(self, message: str, in_step: bool):
        super().__init__(message)
        self.in_step = in_step  # raised inside a step: the peers may be in a collective


_COUNTED = (
    "allreduce allreduce_coalesced allgather _allgather_base allgather_coalesced "
    "allgather_into_tensor_coalesced all_gather_single alltoall alltoall_base barrier broadcast "
    "gather reduce reduce_scatter _reduce_scatter_base reduce_scatter_single scatter send recv "
    "recv_anysource"
).split()


def _collective_ops_mode(calls: list[str]) -> Any:
    """A dispatch mode that records the c10d and functional-collective ops that pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith(("c10d.", "_c10d_functional.")) and "wait" not in name:
                calls.append(name.split(".")[1])
            return func(*args, **(kwargs or {}))

    return Mode()


class count_collectives:
    """Counts the collectives issued meanwhile: at the ProcessGroup methods every
    torch.distributed collective goes through (however it was imported) and, in a dispatch
    mode, the c10d and functional-collective ops (torch.distributed._functional_collectives
    never reaches those methods). A collective seen both ways counts once per way; any
    count above zero is what matters."""

    def __enter__(self) -> count_collectives:
        import torch.distributed as dist

        self.calls: list[str] = []
        self.ops: list[str] = []
        self._saved: dict[str, Any] = {}
        cls = dist.ProcessGroup
        for name in _COUNTED:
            if name not in cls.__dict__:
                continue
            original = cls.__dict__[name]  # the raw descriptor: restored as it was
            self._saved[name] = original

            def counting(pg, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original.__get__(pg)(*args, **kwargs)

            setattr(cls, name, counting)
        self._mode = _collective_ops_mode(self.ops)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(dist.ProcessGroup, name, original)

    @property
    def seen(self) -> list[str]:
        """The collectives seen, by whichever way saw more."""
        return self.calls if len(self.calls) >= len(self.ops) else self.ops


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:500]}"


def _layout(case: DistCase, x: torch.Tensor) -> torch.Tensor:
    if case.memory_format == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x.contiguous()


def _memory_format(case: DistCase, ndim: int):
    if case.memory_format != "channels_last" or ndim not in (4, 5):
        return None
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def build_module(impl: Implementation, case: DistCase, world: World) -> nn.Module:
    kwargs: dict[str, Any] = {} if case.bias else {"bias": False}
    kwargs.update(
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track_running_stats,
        process_group=world.group if case.subgroup else None,
        device=world.device,
        dtype=case.module_dtype,
    )
    return impl.factory(case.rank, case.num_features, **kwargs)


def run_rank_case(impl: Implementation, case: DistCase, world: World) -> dict:
    """This rank's part of ``case``: {"status", "message", "in_step"}; in_step: the module
    raised inside a step, where the other ranks may be waiting in a collective."""
    from bnbench.checks import _describe as describe_call

    reasons = impl.not_supported_reasons(case.config(world.device, world.world_size))
    if reasons:
        return {"status": UNSUPPORTED, "message": "; ".join(reasons), "in_step": False}
    try:
        problems = _run_ddp(impl, case, world) if case.model else _run_steps(impl, case, world)
    except CaseFailed as exc:
        return {"status": FAIL, "message": str(exc), "in_step": exc.in_step}
    except NotSupportedHere as exc:
        return {"status": UNSUPPORTED, "message": str(exc), "in_step": False}
    except Exception as exc:  # the implementation's constructor or state raised
        return {
            "status": FAIL,
            "message": f"raised {describe_call(exc)}",
            "in_step": True,
        }
    if problems:
        return {"status": FAIL, "message": "\n".join(problems), "in_step": False}
    return {"status": PASS, "message": "", "in_step": False}


def _run_steps(impl: Implementation, case: DistCase, world: World) -> list[str]:
    from bnbench.checks import (
        _check_state,
        _conditioning,
        _input_grad_conditioning,
    )
    from bnbench.reference import ReferenceBatchNorm
    from bnbench.tolerances import compare_tensors, working_dtype

    W, r = world.world_size, world.rank
    members = world.members if case.subgroup else list(range(W))
    device = world.device
    try:
        module = build_module(impl, case, world)
    except Exception as exc:
        raise CaseFailed(f"constructor raised {_describe(exc)}", in_step=False) from exc
    ref = ReferenceBatchNorm(
        case.num_features,
        case.eps,
        case.momentum,
        case.affine,
        case.track_running_stats,
        bias_term=case.bias,
    )
    state = impl.state(module)
    if case.affine:
        weight, bias = _params(case)
        with torch.no_grad():
            for name, value in (("weight", weight), ("bias", bias))[: 2 if case.bias else 1]:
                tensor = state.get(name)
                if tensor is None:
                    raise CaseFailed(f"{name}: the module has none (affine=True)", in_step=False)
                tensor.copy_(value.reshape(tensor.shape).to(tensor.dtype))
        ref.weight = weight.clone()
        ref.bias = bias.clone() if case.bias else None
    twin = RANK_TO_BUILTIN[case.rank](
        case.num_features,
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        dtype=case.module_dtype,
        **({} if case.bias else {"bias": False}),
    ).eval()  # interface facts only (dtype, memory format): any shard in eval
    problems: list[str] = []
    reported: list[str] = []
    held = {
        name: tensor
        for name in ("running_mean", "running_var", "num_batches_tracked")
        if isinstance(tensor := getattr(module, name, None), torch.Tensor)
    }
    fmt = _memory_format(case, case.rank)
    dims = [0] + list(range(2, case.rank))
    earlier: tuple[torch.Tensor, torch.Tensor] | None = None  # the last output, and its copy
    for i, mode in enumerate(case.steps):
        if _apply_action(mode, module, ref):
            continue
        training = mode == "train"
        sizes = SPLITS[case.split](W, i) if training else _even(W, i)
        total = sum(sizes)
        x_world = _global_batch(case, i, total)
        dy_world = _global_grad(case, i, total)
        starts = [sum(sizes[:k]) for k in range(W)]

        def rows(t: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
            return torch.cat([t[starts[k] : starts[k] + sizes[k]] for k in ranks])  # noqa: B023

        # the batch this rank's statistics come from: its group's shards, or its own in eval
        pool = members if training else [r]
        x_pool, dy_pool = rows(x_world, pool), rows(dy_world, pool)
        offset = sum(sizes[k] for k in pool[: pool.index(r)])
        mine = slice(offset, offset + sizes[r])
        x = _layout(case, x_world[starts[r] : starts[r] + sizes[r]].to(device, case.dtype))
        dy = _layout(case, dy_world[starts[r] : starts[r] + sizes[r]].to(device, case.dtype))
        x_before, dy_before = x.clone(), dy.clone()
        x_in = x.detach().requires_grad_(training and case.input_grad)
        module.train(training)
        module.zero_grad(set_to_none=True)
        where = f"step {i} ({mode}, shards {sizes})"
        counter = contextlib.nullcontext() if training else count_collectives()
        with counter as counted:
            try:
                y = module(x_in)
            except Exception as exc:
                raise CaseFailed(f"{where}: forward raised {_describe(exc)}", True) from exc
        if counted is not None and counted.seen:
            problems.append(
                f"{where}: called {len(counted.seen)} collective(s) in eval "
                f"({', '.join(sorted(set(counted.seen)))}); nn.SyncBatchNorm never "
                "synchronizes in eval"
            )
        if not isinstance(y, torch.Tensor):
            raise CaseFailed(f"{where}: forward returned {type(y).__name__}", True)

        running_var_before = None if ref.running_var is None else ref.running_var.clone()
        x64 = x_pool.clone().requires_grad_(training)
        ref_params = [p for p in (ref.weight, ref.bias) if p is not None]
        for p in ref_params:
            p.requires_grad_(training)
        with torch.set_grad_enabled(training):
            y_ref, used = ref.forward(x64, training)

        # the interface, as nn.BatchNorm gives it for this shard on this torch
        if x.shape[0]:
            with torch.no_grad():
                y_twin = twin(x.detach().clone())
            if y.dtype != y_twin.dtype:
                problems.append(f"{where}: output dtype {y.dtype}, expected {y_twin.dtype}")
            if fmt is not None and y_twin.is_contiguous(memory_format=fmt):
                if not y.is_contiguous(memory_format=fmt):
                    problems.append(f"{where}: output not in the input's memory format {fmt}")
        if tuple(y.shape) != tuple(x.shape):
            problems.append(f"{where}: output shape {tuple(y.shape)}, expected {tuple(x.shape)}")
        if training and (x_in.requires_grad or case.affine) and not y.requires_grad:
            problems.append(
                f"{where}: output does not require grad, though the input or the parameters do"
            )
        condition = _conditioning(x64.detach(), ref, training, running_var_before)[mine]
        problem = compare_tensors("output", y, y_ref[mine], case.dtype, condition=condition)
        if problem:
            problems.append(f"{where}: {problem}")

        if training and (x_in.requires_grad or case.affine):
            if not y.requires_grad:
                raise CaseFailed(f"{where}: cannot run the backward: " + problems[-1], True)
            try:
                y.backward(dy)
            except Exception as exc:
                raise CaseFailed(f"{where}: backward raised {_describe(exc)}", True) from exc
            dy64 = dy_pool
            expected_dx = torch.autograd.grad(y_ref, x64, dy64, retain_graph=True)[0][mine]
            grad_condition = _input_grad_conditioning(
                x64.detach(), dy64, ref, used["batch_stats"], running_var_before
            )[mine]
            if case.input_grad and (sizes[r] or x_in.grad is not None):
                problem = compare_tensors(
                    "input grad", x_in.grad, expected_dx, case.dtype, condition=grad_condition
                )
                if problem:
                    problems.append(f"{where}: {problem}")
            if ref_params:
                # this rank's own contribution: its shard's share of the sums
                own = (y_ref[mine] * dy64[mine]).sum()
                expected = torch.autograd.grad(own, ref_params, allow_unused=True)
                full_cond = _conditioning(x64.detach(), ref, True, running_var_before)[mine]
                summed = ((dy64[mine] * full_cond) ** 2).sum(dims).sqrt()
                names = ["weight", "bias"][: len(ref_params)]
                for name, exp in zip(names, expected):
                    if exp is None:
                        exp = torch.zeros(case.num_features, dtype=torch.float64)
                    param = state.get(name)
                    actual = None if param is None else param.grad
                    if actual is None and param is not None and not sizes[r]:
                        # nn.SyncBatchNorm's backward leaves them None on a rank with no
                        # samples (autograd reads None as zeros): the same contribution
                        actual = torch.zeros_like(param)
                    problem = compare_tensors(
                        f"{name} grad (this rank's contribution)",
                        actual,
                        exp,
                        working_dtype(case.dtype, case.module_dtype),
                        condition=summed if name == "weight" else None,
                    )
                    if problem:
                        problems.append(f"{where}: {problem}")
            for p in ref_params:
                p.requires_grad_(False)
            ref.weight = None if ref.weight is None else ref.weight.detach()
            ref.bias = None if ref.bias is None else ref.bias.detach()
        if not torch.equal(x, x_before):
            problems.append(f"{where}: input modified in place")
        if not torch.equal(dy, dy_before):
            problems.append(f"{where}: grad_output modified in place by the backward")
        if y.numel() and y.untyped_storage().data_ptr() == x_in.untyped_storage().data_ptr():
            problems.append(f"{where}: output shares memory with the input")
        if earlier is not None and not torch.equal(earlier[0], earlier[1]):
            problems.append(
                f"{where}: the previous step's output changed (an output buffer reused across "
                "calls)"
            )
        earlier = (y, y.detach().clone())
        state_problems: list[str] = []
        _check_state(impl, case, module, ref, state_problems)
        for name, tensor in held.items():
            if getattr(module, name, None) is not tensor:
                state_problems.append(
                    f"{name}: replaced by a new tensor; nn.SyncBatchNorm updates its buffers in "
                    "place (DDP broadcasts and optimizers hold them)"
                )
        problems += [f"{where}: {p}" for p in state_problems]
        if problems and not reported:
            reported = list(problems)
        problems.clear()
        # every step runs on every rank even after one went wrong here: the other ranks' steps
        # wait for this one's collectives; the first step that went wrong says it
    return reported


def _apply_action(step: str, module: nn.Module, ref) -> bool:
    """A step that changes the module between calls, as user code does (True), or a call
    (False): ``stop-tracking`` sets track_running_stats=False after construction (the buffers
    stay, and are no longer updated); ``momentum:X`` assigns momentum (None included)."""
    if step == "stop-tracking":
        setattr(module, "track_running_stats", False)  # noqa: B010 (nn.Module attribute)
        ref.stop_tracking()
        return True
    if step.startswith("momentum:"):
        value = step.partition(":")[2]
        momentum = None if value == "None" else float(value)
        setattr(module, "momentum", momentum)  # noqa: B010 (nn.Module attribute)
        ref.momentum = momentum
        return True
    return False


# Per-rank batch of the DDP cases (even shards: DDP averages the ranks' gradients, which equals
# the global batch's mean-loss gradient only when every rank holds as many samples).
DDP_SHARD = 4
DDP_LR = 0.1


def _run_ddp(impl: Implementation, case: DistCase, world: World) -> list[str]:
    """A zoo network whose BatchNorm layers are swapped to ``impl`` (bnbench.swap, as
    nn.SyncBatchNorm.convert_sync_batchnorm), trained with DistributedDataParallel over the
    ranks for a few SGD steps on even shards, against the same network with nn.BatchNorm
    trained in one process on the global batch, in float64: losses, parameters and running
    statistics after every step, then an eval forward (local: no collective)."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from bnbench import zoo
    from bnbench.swap import SwapError, swap
    from bnbench.tolerances import compare_tensors

    W, device = world.world_size, world.device
    seed = zlib.crc32(case.id.encode()) % 1000
    reference = zoo.build(case.model, seed, dtype=torch.float64)
    model = zoo.build(case.model, seed, device=device)
    try:
        model = swap(model, impl)
    except SwapError as exc:
        raise CaseFailed(f"swap(model, {impl.name!r}) failed: {exc}", in_step=False) from exc
    except Exception as exc:
        raise CaseFailed(f"swap(model, {impl.name!r}) raised {_describe(exc)}", False) from exc
    if device == "cpu" and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise NotSupportedHere(
            "DistributedDataParallel refuses nn.SyncBatchNorm layers (subclasses included) in "
            "a CPU module: a CPU synchronized BN for DDP must not subclass nn.SyncBatchNorm"
        )
    try:
        # broadcast_buffers=False: each rank keeps its own running statistics, so a rank whose
        # statistics went wrong is seen (the default would overwrite them with rank 0's)
        ddp = DistributedDataParallel(
            model, device_ids=None if device == "cpu" else [device], broadcast_buffers=False
        )
    except Exception as exc:
        raise CaseFailed(f"DistributedDataParallel(model) raised {_describe(exc)}", True) from exc
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=DDP_LR)
    g = _seed(case, "ddp")
    problems: list[str] = []
    mine = slice(world.rank * DDP_SHARD, (world.rank + 1) * DDP_SHARD)
    for i, mode in enumerate(case.steps):
        x = torch.rand((W * DDP_SHARD, *case.shape), generator=g, dtype=torch.float64)
        labels = torch.randint(0, 10, (W * DDP_SHARD,), generator=g)
        where = f"step {i} ({mode}, {DDP_SHARD} samples per rank)"
        training = mode == "train"
        ddp.train(training)
        reference.train(training)
        try:
            if training:
                opt.zero_grad(set_to_none=True)
                out = ddp(x[mine].to(device, torch.float32))
                loss = F.cross_entropy(out, labels[mine].to(device))
                loss.backward()
                opt.step()
            else:
                with count_collectives() as counted, torch.no_grad():
                    out = model(x[mine].to(device, torch.float32))
                if counted.seen:
                    problems.append(f"{where}: {len(counted.seen)} collective(s) in eval")
        except Exception as exc:
            raise CaseFailed(f"{where}: raised {_describe(exc)}", True) from exc
        if training:
            ref_opt.zero_grad(set_to_none=True)
            ref_out = reference(x)
            F.cross_entropy(ref_out, labels).backward()
            ref_opt.step()
            expected = ref_out.detach()[mine]
        else:
            with torch.no_grad():
                expected = reference(x[mine])
        problem = compare_tensors("logits", out.detach(), expected, torch.float32)
        if problem:
            problems.append(f"{where}: {problem}")
        ref_state = dict(reference.named_parameters()) | {
            k: v for k, v in reference.named_buffers() if v.is_floating_point()
        }
        ours = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, exp in ref_state.items():
            got = ours.get(name)
            stats = name.endswith(("running_mean", "running_var"))
            problem = compare_tensors(name, got, exp, torch.float32, statistics=stats)
            if problem:
                problems.append(f"{where}: after the SGD step: {problem}")
        if problems:
            return problems[:4] + (
                [f"... and {len(problems) - 4} more"] if len(problems) > 4 else []
            )
    return []


def init_world(
    device: str,
    world_size: int,
    rank: int,
    store: Any,
    timeout: float,
    local_rank: int | None = None,
) -> World:
    """Join the process group (gloo for CPU, NCCL for CUDA), make bnbench's own group and the
    subgroups of the subgroup cases (every rank creates every group, in the same order).
    ``store`` None: env:// rendezvous (torchrun's MASTER_ADDR, MASTER_PORT, RANK...)."""
    import torch.distributed as dist

    backend = "gloo" if device == "cpu" else "nccl"
    if device == "cuda":
        local = rank if local_rank is None else local_rank
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
        device = f"cuda:{torch.cuda.current_device()}"
    span = datetime.timedelta(seconds=timeout)
    if store is None:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=span)
    else:
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=span
        )
    # bnbench's own barrier and gathers outlast the module's collectives: a rank that raised
    # still meets the others there after their collective timed out
    harness = dist.new_group(backend="gloo", timeout=span * 3)
    group, members = None, list(range(world_size))
    for ranks in subgroups(world_size):
        made = dist.new_group(ranks=ranks, timeout=span)
        if rank in ranks:
            group, members = made, ranks
    return World(rank, world_size, device, group, members, harness)


def join_world(
    device: str, world_size: int, rank: int, port: int, prefix: str, collective_timeout: float
) -> World:
    """A rank worker's way in: the parent's store at 127.0.0.1:port (keys under ``prefix``, one
    per world), gloo on the loopback interface, then :func:`init_world`."""
    import torch.distributed as dist

    _loopback_env()
    store = dist.PrefixStore(
        prefix,
        dist.TCPStore(
            "127.0.0.1",
            port,
            world_size,
            is_master=False,
            timeout=datetime.timedelta(seconds=collective_timeout * 4),
        ),
    )
    return init_world(device, world_size, rank, store, collective_timeout)


def _loopback_env() -> None:
    """gloo on 127.0.0.1 only: its sockets on the loopback interface."""
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def dist_gate_worker(
    specs: list[str],
    device: str,
    world_size: int,
    rank: int,
    port: int,
    prefix: str,
    threads: int,
    collective_timeout: float,
    *,
    items: list[str],
    channel,
) -> None:
    """One rank (bnbench.isolation's "dist-gate" job): join the world, run each item, "K|CASE"
    (the K-th implementation of ``specs`` on CASE). The implementations of one run share a
    world, so that it starts once: one that breaks it (raises inside a step, hangs, dies,
    patches the checks) costs its item and a fresh world runs the rest."""
    import torch.distributed as dist

    from bnbench.registry import resolve

    torch.set_num_threads(threads)
    world = join_world(device, world_size, rank, port, prefix, collective_timeout)
    cases = case_by_id()
    loaded: dict[int, Implementation] = {}
    for item in items:
        k, _, case_id = item.partition("|")
        channel.start(item)
        start = time.perf_counter()
        dist.barrier(group=world.harness)  # every rank is here: the case starts together
        index = int(k)
        if index not in loaded:  # imported first in a probe process already: it loads
            loaded[index] = resolve([specs[index]])[0]
        result = run_rank_case(loaded[index], cases[case_id], world)
        result["seconds"] = time.perf_counter() - start
        channel.done(item, result)


# ---------------------------------------------------------------------------------------------
# The parent's side: a world of rank workers run in lockstep


@dataclass
class RankReport:
    result: dict | None  # what the rank sent (unvalidated), or None
    problem: str | None  # why there is no usable result


def _host_store():
    import torch.distributed as dist

    return dist.TCPStore(
        "127.0.0.1", 0, None, is_master=True, wait_for_workers=False, use_libuv=True
    )


def run_world(
    kind: str,
    rank_args: Callable[[int, int, str], tuple],
    items: list[str],
    world_size: int,
    timeout: float,
    on_result: Callable[[str, list[RankReport], float], None],
    broken: Callable[[RankReport], bool] = lambda report: report.result is None,
    restart: Callable[[list[RankReport]], bool] | None = None,
) -> None:
    """Run the job ``kind`` over ``items`` on ``world_size`` rank workers in lockstep.

    ``rank_args(rank, port, prefix)``: the job's arguments for one rank (the rendezvous store
    is at 127.0.0.1:port, keys under prefix). ``on_result(item, reports, seconds)``: one report
    per rank. When a rank's report is ``broken`` (by default: no result: it hung, crashed or
    broke the protocol), the others get GRACE_S to report, then the world is killed and a
    fresh one runs the remaining items (``restart(reports)``, when given, decides instead
    whether the world must be replaced); a world that dies before its first item costs every
    remaining item. Raises isolation.Interrupted after isolation.interrupt()."""
    remaining = list(items)
    store = _host_store()
    while remaining:
        prefix = f"w{uuid.uuid4().hex[:12]}/"
        workers: list[isolation._Worker] = []
        try:
            for rank in range(world_size):
                workers.append(
                    isolation._Worker(kind, rank_args(rank, store.port, prefix), remaining)
                )
        except OSError as exc:
            for w in workers:
                w.close()
            for item in list(remaining):
                reports = [
                    RankReport(None, f"crashed: no rank process could be started ({exc})")
                ] * world_size
                on_result(item, reports, 0.0)
            return
        try:
            began_any = False
            while remaining:
                item = remaining[0]
                reports, seconds, began = _one_item(
                    workers, item, remaining, timeout, began_any, broken
                )
                began_any = began_any or began
                remaining.remove(item)
                if not began_any:
                    # the world never started (an implementation that cannot be loaded, a
                    # rendezvous that failed): restarting it would fail the same way
                    on_result(item, reports, seconds)
                    for other in list(remaining):
                        on_result(other, reports, 0.0)
                    remaining.clear()
                    break
                on_result(item, reports, seconds)
                if restart(reports) if restart else any(broken(rep) for rep in reports):
                    break  # a fresh world for the rest
        finally:
            for w in workers:
                w.kill()
            for w in workers:
                w.close()


def _one_item(
    workers: list[isolation._Worker],
    item: str,
    remaining: list[str],
    timeout: float,
    began_any: bool,
    broken: Callable[[RankReport], bool],
) -> tuple[list[RankReport], float, bool]:
    """Read every rank's start and done of ``item``: (reports, seconds, whether any began)."""
    n = len(workers)
    reports: dict[int, RankReport] = {}
    current: dict[int, str | None] = {rank: None for rank in range(n)}
    started = time.perf_counter()
    began = False
    wait = timeout if began_any else timeout + isolation.STARTUP_ALLOWANCE_S
    deadline = time.monotonic() + wait
    first_broken: float | None = None
    while len(reports) < n:
        if isolation._STOP.is_set():
            raise isolation.Interrupted()
        for rank, worker in enumerate(workers):
            if rank in reports:
                continue
            try:
                message = worker.read(time.monotonic() + 0.02)
            except TimeoutError:
                continue
            except isolation._Violation as exc:
                reports[rank] = RankReport(
                    None, f"broke the worker protocol: its result pipe carried {exc}"
                )
                continue
            if message is None:
                code = worker.exit_code(0.5)
                what = isolation._exit_text(code)
                when = "during this case" if current[rank] else "before this case started"
                reports[rank] = RankReport(None, f"crashed: the rank process {what} {when}")
                continue
            problem = isolation._unexpected(message, current[rank], remaining)
            if problem is None and "start" in message and message["start"] != item:
                problem = f"a start of {message['start']!r:.80} while {item!r} was due"
            if problem:
                reports[rank] = RankReport(None, f"broke the worker protocol: {problem}")
            elif "start" in message:
                current[rank] = item
                if not began:  # it runs: the case's own timeout from now, not the startup's
                    deadline = min(deadline, time.monotonic() + timeout)
                began = True
            elif "done" in message:
                current[rank] = None
                problem = message.get("problem")
                if problem is not None:
                    reports[rank] = RankReport(None, str(problem)[:2000])
                else:
                    reports[rank] = RankReport(message["result"], None)
            else:
                reports[rank] = RankReport(None, "the rank ended without running this case")
        now = time.monotonic()
        if first_broken is None and any(broken(rep) for rep in reports.values()):
            first_broken = now
        if first_broken is not None and now - first_broken > GRACE_S:
            break
        if now > deadline:
            break
    for rank in range(n):
        if rank not in reports:
            if first_broken is not None:
                what = (
                    f"{_NO_RESULT}: hung, or waiting on a peer in a collective (killed with "
                    "the world)"
                )
            elif current[rank] is not None:
                what = f"hung: no result within {timeout:g} s"
            else:
                what = f"hung: did not start this case within {wait:g} s"
            reports[rank] = RankReport(None, what)
    return [reports[rank] for rank in range(n)], time.perf_counter() - started, began


# ---------------------------------------------------------------------------------------------
# The gate


def _rank_outcome(report: RankReport) -> tuple[str, str, bool]:
    """(status, message, world broken) from one rank's report, validated."""
    if report.result is None:
        return FAIL, report.problem or "no result", True
    result = dict(report.result)
    in_step = result.pop("in_step", None)
    if not isinstance(in_step, bool):
        return FAIL, "the rank sent an invalid outcome (in_step)", True
    from bnbench.gate import _invalid_outcome

    problem = _invalid_outcome(result)
    if problem:
        return FAIL, problem, True
    return result["status"], result["message"], in_step


def merge_reports(reports: list[RankReport]) -> Outcome:
    """One verdict from every rank's: it passes when every rank passed; otherwise each
    failing rank says why (the first few)."""
    outcomes = [_rank_outcome(rep) for rep in reports]
    statuses = {status for status, _, _ in outcomes}
    if statuses == {PASS}:
        return Outcome(PASS, "")
    if statuses == {UNSUPPORTED}:
        return Outcome(UNSUPPORTED, outcomes[0][1])
    failing = [
        (rank, message) for rank, (status, message, _) in enumerate(outcomes) if status != PASS
    ]
    # the rank that went wrong first, then those that only waited on it
    failing.sort(key=lambda rm: _waited_on_a_peer(rm[1]))
    lines = [f"rank {rank}: {message}" for rank, message in failing[:3]]
    if len(failing) > 3:
        lines.append(f"... and {len(failing) - 3} more rank(s)")
    return Outcome(FAIL, "\n".join(lines))


_NO_RESULT = "no result when another rank failed"
# What a rank says when a peer, not itself, went wrong: a collective timed out or lost its peer.
_PEER_SIGNS = (
    "Timed out waiting",
    "Connection reset by peer",
    "Connection closed by peer",
    "Socket closed",
    "NCCL communicator was aborted",
    "timed out",
)


def _waited_on_a_peer(message: str) -> int:
    """0: the rank went wrong itself; 1: it gave no result (hung, or waiting on a peer);
    2: it reported a collective that timed out or lost its peer."""
    if message.startswith(_NO_RESULT):
        return 1
    return 2 if any(sign in message for sign in _PEER_SIGNS) else 0


def _is_broken(report: RankReport) -> bool:
    return _rank_outcome(report)[2]


def _needs_a_fresh_world(reports: list[RankReport]) -> bool:
    """Whether the ranks may be out of step after this case. Not when every rank raised the
    same error at the same point (each raised on its own, none is left inside a collective:
    a collective that one rank entered cannot complete without the others, so it would be
    waiting, not raising), nor when nothing was broken."""
    outcomes = [_rank_outcome(rep) for rep in reports]
    if not any(broken for _, _, broken in outcomes):
        return False
    if all(rep.result is not None for rep in reports):
        messages = {message for _, message, _ in outcomes}
        if len(messages) == 1 and not _waited_on_a_peer(next(iter(messages))):
            return False
    return True


def world_device_problem(device: str, world_size: int) -> str | None:
    """Why a world of ``world_size`` ranks cannot run on ``device`` here (None: it can)."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if device == "cuda":
        if not dist.is_nccl_available():
            return "NCCL is not available in this build of torch"
        have = torch.cuda.device_count()
        if have < world_size:
            return f"needs one GPU per rank: {world_size} ranks, {have} GPU(s) here"
    elif not dist.is_gloo_available():
        return "gloo is not available in this build of torch"
    return None


def collective_timeout(timeout: float) -> float:
    return max(MIN_COLLECTIVE_TIMEOUT_S, timeout / 4)


def device_label(device: str, world_size: int) -> str:
    """The column a world's results go under: ``cpu-ws2``."""
    return f"{device}-ws{world_size}"


def run_dist_gate(
    impls: list[Implementation],
    specs: list[str],
    devices: list[str],
    world_sizes: list[int],
    cases: list[DistCase],
    *,
    timeout: float = 120.0,
    progress: Callable[[Any], None] | None = None,
    waivers: Sequence[Any] = (),
) -> list:
    """Every case for every (implementation, device, world size); gate.Result objects whose
    device is ``cpu-ws2``. Worlds run one after the other (each uses world_size processes)."""
    from bnbench import gate
    from bnbench.gate import Result

    results: list[Result] = []
    threads = max(1, (os.cpu_count() or 1) // max(world_sizes))

    def record(impl: Implementation, label: str, case: DistCase, outcome: Outcome, secs: float):
        result = gate.judged(impl, label, case, outcome, secs, waivers)
        results.append(result)
        if progress:
            progress(result)

    isolation.begin()
    by_id = {c.id: c for c in cases}
    try:
        for device in devices:
            for world_size in world_sizes:
                label = device_label(device, world_size)
                blocked = world_device_problem(device, world_size)
                runnable: list[str] = []  # "K|CASE": the K-th implementation on CASE
                for k, impl in enumerate(impls):
                    for case in cases:
                        reasons = impl.not_supported_reasons(case.config(device, world_size))
                        if blocked:
                            reasons.append(blocked)
                        if reasons:
                            outcome = Outcome(UNSUPPORTED, "; ".join(reasons))
                            record(impl, label, case, outcome, 0.0)
                        elif impl.load_error:
                            record(impl, label, case, Outcome(FAIL, impl.load_error), 0.0)
                        else:
                            runnable.append(f"{k}|{case.id}")
                if not runnable:
                    continue
                ct = collective_timeout(timeout)

                def args(rank, port, prefix, _d=device, _w=world_size, _ct=ct):
                    return (list(specs), _d, _w, rank, port, prefix, threads, _ct)

                def received(item, reports, secs, _label=label):
                    k, _, case_id = item.partition("|")
                    outcome = merge_reports(reports)
                    record(impls[int(k)], _label, by_id[case_id], outcome, secs)

                try:
                    run_world(
                        "dist-gate",
                        args,
                        runnable,
                        world_size,
                        timeout,
                        received,
                        _is_broken,
                        _needs_a_fresh_world,
                    )
                except isolation.Interrupted:
                    raise
                except Exception as exc:  # bnbench's own fault: this world's rows
                    problem = f"bnbench failed running this world: {_describe(exc)}"
                    done = {(r.implementation, r.device, r.case) for r in results}
                    for item in runnable:
                        index, _, case_id = item.partition("|")
                        impl = impls[int(index)]
                        if (impl.name, label, case_id) not in done:
                            record(impl, label, by_id[case_id], Outcome(FAIL, problem), 0.0)
    except (KeyboardInterrupt, isolation.Interrupted):
        with gate._signals_held():
            isolation.interrupt()
        raise gate.Interrupted(_ordered(results, impls, cases)) from None
    return _ordered(results, impls, cases)


def _ordered(results: list, impls: list[Implementation], cases: list[DistCase]) -> list:
    """By implementation, then world (as run), then case."""
    impl_order = {impl.name: i for i, impl in enumerate(impls)}
    case_order = {c.id: i for i, c in enumerate(cases)}
    worlds = list(dict.fromkeys(r.device for r in results))
    return sorted(
        results,
        key=lambda r: (impl_order[r.implementation], worlds.index(r.device), case_order[r.case]),
    )


def select_dist_cases(patterns: Sequence[str] = ()) -> list[DistCase]:
    import fnmatch

    cases = dist_cases()
    if not patterns:
        return cases
    return [
        c
        for c in cases
        if any(fnmatch.fnmatchcase(c.id, p) or fnmatch.fnmatchcase(c.check, p) for p in patterns)
    ]


# ---------------------------------------------------------------------------------------------
# Under torchrun: every rank runs the cases in-process; rank 0 reports


def _gather_json(value: Any, group) -> list[Any]:
    """Every rank's ``value`` (JSON-able), by way of byte tensors: what comes from another rank
    is parsed as strict JSON, never unpickled (all_gather_object would unpickle it)."""
    import json

    import torch.distributed as dist

    data = json.dumps(value, allow_nan=False).encode()
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rows = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    return [
        json.loads(bytes(row[: int(n)].tolist()).decode(), parse_constant=isolation._no_constant)
        for row, n in zip(rows, sizes)
    ]


def torchrun_main(argv: Sequence[str] | None = None) -> int:
    """``torchrun [--nnodes M] --nproc-per-node N -m bnbench.torchrun --impl SPEC``: the
    distributed gate with env:// rendezvous, on one machine or many. Every rank runs every
    case; the outcomes travel as JSON over bnbench's own gloo group; rank 0 prints the matrix
    (and writes --json/--junit); every rank exits 0 when everything passed, 1 otherwise.
    torchrun, not bnbench, supervises these processes: a rank that dies ends the job (torchrun
    tears it down), one that hangs releases the others through the collective timeout."""
    import argparse

    import torch.distributed as dist

    from bnbench import gate
    from bnbench.registry import UsageError, resolve
    from bnbench.results import environment, write_all_atomic

    parser = argparse.ArgumentParser(prog="torchrun ... -m bnbench.torchrun")
    parser.add_argument("--impl", action="append", required=True, metavar="NAME|MODULE:ATTR")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--case", action="append", default=[], metavar="GLOB")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--junit", dest="junit_path")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "-1"))
    world_size = int(os.environ.get("WORLD_SIZE", "0"))
    if rank < 0 or world_size < 1:
        parser.error("RANK and WORLD_SIZE are not set: run this under torchrun")
    try:
        impls = resolve(args.impl)
    except UsageError as exc:
        parser.error(str(exc))
    cases = select_dist_cases(args.case)
    if not cases:
        parser.error(f"--case {' '.join(args.case)}: no distributed case matches")
    if args.device == "cpu" and os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):
        _loopback_env()  # one machine: gloo on the loopback interface
    world = init_world(
        args.device,
        world_size,
        rank,
        None,
        collective_timeout(args.timeout),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    label = device_label(args.device, world_size)
    results: list[gate.Result] = []
    # Under torchrun no fresh world can be started: after a case that may have left the
    # module's collectives out of step (a rank raised inside a step), the rest is not run.
    stopped = ""
    for impl in impls:
        for case in cases:
            start = time.perf_counter()
            if stopped:
                outcome = Outcome(FAIL, stopped)
                reports = []
            else:
                reasons = impl.not_supported_reasons(case.config(args.device, world_size))
                if reasons:
                    mine: dict = {"status": UNSUPPORTED, "message": "; ".join(reasons)}
                    mine["in_step"] = False
                else:
                    mine = run_rank_case(impl, case, world)
                mine["seconds"] = time.perf_counter() - start
                try:
                    dist.barrier(group=world.harness)
                    reports = [RankReport(r, None) for r in _gather_json(mine, world.harness)]
                except Exception as exc:  # a rank is gone or stuck: nothing more can run
                    reports = [RankReport(mine, None)]
                    stopped = (
                        f"not run: the ranks could not meet after {case.id} ({_describe(exc)}); "
                        "bnbench verify --world-size N restarts a world instead"
                    )
                outcome = merge_reports(reports)
                if any(_is_broken(rep) for rep in reports) and not stopped:
                    stopped = (
                        f"not run: {impl.name} failed inside a step of {case.id}, which can "
                        "leave the process group's collectives out of step (under torchrun no "
                        "fresh world can be started; bnbench verify --world-size N does)"
                    )
            seconds = max([float(r.result["seconds"]) for r in reports if r.result] or [0.0])
            results.append(gate.judged(impl, label, case, outcome, seconds))
    ok = gate.passed(results)
    if rank == 0:
        from bnbench.cli import _console, print_details, print_matrix, print_summary

        console = _console()
        print_matrix(console, results, False)
        print_details(console, results, False)
        print_summary(console, results, sum(r.seconds for r in results))
        outputs: dict[str | os.PathLike, str | bytes] = {}
        if args.json_path:
            outputs[args.json_path] = gate.to_json(results, environment())
        if args.junit_path:
            outputs[args.junit_path] = gate.to_junit(results)
        if rank == 0:
            write_all_atomic(outputs)
    if not stopped:
        dist.barrier(group=world.harness)
        dist.destroy_process_group()
    return 0 if ok else 1
