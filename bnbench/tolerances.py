"""Tolerances (one table) and tensor comparisons that explain themselves.

A comparison failure names the tensor, the largest absolute and relative difference and where
each is, with the values on both sides, so a report reads like a diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# Against the float64 oracle, computed from the very values the implementation received.
# |actual - expected| <= atol * scale + rtol * |expected|, where scale is the largest |expected|
# of the tensor (at least 1): gradients through the batch statistics cancel, so an element near
# zero carries the rounding error of the largest term. float32: the worst faithful kernel seen
# (native CUDA, weight grad of the channel whose |mean|/std is 100, where rounding the mean
# costs 6e-6 of every normalized value) reaches 2.6e-5 x scale; a one-off semantic slip costs
# far more (eps outside the square root on that channel: 5e-2 relative).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-7, atol=1e-7),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-4),
    torch.float16: Tolerance(rtol=4e-3, atol=2e-3),
    torch.bfloat16: Tolerance(rtol=3e-2, atol=1.6e-2),
}


# Running statistics: per-channel values with no cancellation, so atol is absolute (not scaled
# by the largest channel) and a 10% slip on a channel of variance 1e-4 is still caught. Faithful
# float32 kernels show at most about 5e-7 absolute here.
STATISTICS_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-9, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-4, atol=2e-6),
    torch.float16: Tolerance(rtol=4e-3, atol=1e-4),
    torch.bfloat16: Tolerance(rtol=3e-2, atol=1e-3),
}


# Rounding a faithful kernel makes when it folds the normalization into x * scale + shift (as
# ATen does): a few machine epsilons of |x * scale| per element. ATen's CPU kernel measured 1.7
# eps at |mean|/std = 1000; a one-pass variance there is off by thousands.
ROUNDING_ALLOWANCE = 8.0


def tolerance_for(dtype: torch.dtype, statistics: bool = False) -> Tolerance:
    return (STATISTICS_TOLERANCES if statistics else TOLERANCES)[dtype]


def working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise of the dtypes a quantity was computed from: a float32 weight grad or
    running mean computed from float16 data may round like float16 (cuDNN does)."""
    return max(dtypes, key=lambda d: TOLERANCES[d].rtol)


def _fmt_index(flat_index: int, shape: torch.Size) -> str:
    idx = []
    for size in reversed(shape):
        idx.append(flat_index % size if size else 0)
        flat_index //= size if size else 1
    return "(" + ", ".join(str(i) for i in reversed(idx)) + ")"


def _allowed(
    expected: torch.Tensor,
    finite: torch.Tensor,
    dtype: torch.dtype,
    statistics: bool,
    condition: torch.Tensor | None,
) -> tuple[torch.Tensor, Tolerance, float]:
    """Per element, how far from ``expected`` (float64, non-finite elements zeroed) a value may
    be: the table's tolerance for ``dtype``, plus the rounding ``condition`` says a faithful
    kernel makes. Returns (allowed, the tolerance, the scale atol was multiplied by)."""
    tol = tolerance_for(dtype, statistics)
    scale = 1.0 if statistics else max(1.0, float(expected.abs().max()))
    allowed = tol.atol * scale + tol.rtol * expected.abs()
    if condition is not None:
        # faithful kernels compute half inputs in float32: that precision's rounding
        compute = torch.promote_types(dtype, torch.float32)
        allowed = allowed + ROUNDING_ALLOWANCE * torch.finfo(compute).eps * torch.where(
            finite, condition.detach().to("cpu", torch.float64), 0.0
        )
    return allowed, tol, scale


def outside_tolerance(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    statistics: bool = False,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per element (a bool tensor of ``expected``'s shape): where ``actual`` is outside the
    tolerance :func:`compare_tensors` applies, a non-finite value on one side only included.
    ``actual`` must have ``expected``'s shape. What bnbench.diagnose asks of a candidate
    explanation: does it match where the truth did not?"""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    finite_a, finite_e = torch.isfinite(a), torch.isfinite(e)
    a = torch.where(finite_e, a, 0.0)
    e = torch.where(finite_e, e, 0.0)
    allowed, _, _ = _allowed(e, finite_e, dtype, statistics, condition)
    inside = finite_a & finite_e & ((a - e).abs() <= allowed)
    return ~(inside | (~finite_a & ~finite_e))


def compare_tensors(
    name: str,
    actual,
    expected: torch.Tensor,
    dtype: torch.dtype,
    statistics: bool = False,
    condition: torch.Tensor | None = None,
) -> str | None:
    """None when ``actual`` matches ``expected`` (float64) within the tolerance of ``dtype``
    (the statistics table, with an unscaled atol, when ``statistics``). ``condition``: per
    element, how much rounding a faithful kernel is bound to make there in units of its compute
    precision's machine epsilon (ROUNDING_ALLOWANCE of them are allowed on top)."""
    if actual is None:
        return f"{name}: is None, expected a tensor of shape {tuple(expected.shape)}"
    if not isinstance(actual, torch.Tensor):
        return f"{name}: is a {type(actual).__name__}, expected a tensor"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.numel() == 0:
        return None
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    bad_a = ~torch.isfinite(a)
    bad_e = ~torch.isfinite(e)
    mismatch_nonfinite = bad_a != bad_e
    if mismatch_nonfinite.any():
        flat = int(mismatch_nonfinite.flatten().nonzero()[0])
        count = int(mismatch_nonfinite.sum())
        return (
            f"{name}: {count} non-finite mismatch(es), first at {_fmt_index(flat, a.shape)}: "
            f"got {a.flatten()[flat].item():.6g}, expected {e.flatten()[flat].item():.6g}"
        )
    finite = ~bad_e
    a = torch.where(finite, a, 0.0)
    e = torch.where(finite, e, 0.0)
    diff = (a - e).abs()
    allowed, tol, scale = _allowed(e, finite, dtype, statistics, condition)
    if bool((diff <= allowed).all()):
        return None
    abs_i = int(diff.flatten().argmax())
    rel = diff / e.abs().clamp_min(1e-30)
    rel_i = int(torch.where(diff > allowed, rel, 0.0).flatten().argmax())
    n_bad = int((diff > allowed).sum())
    return (
        f"{name}: {n_bad}/{diff.numel()} elements outside rtol={tol.rtol:g} atol={tol.atol:g}"
        f"x{scale:.3g}; max abs diff {diff.flatten()[abs_i].item():.3g} at "
        f"{_fmt_index(abs_i, a.shape)} (got {a.flatten()[abs_i].item():.6g}, expected "
        f"{e.flatten()[abs_i].item():.6g}); max rel diff {rel.flatten()[rel_i].item():.3g} at "
        f"{_fmt_index(rel_i, a.shape)} (got {a.flatten()[rel_i].item():.6g}, expected "
        f"{e.flatten()[rel_i].item():.6g})"
    )
