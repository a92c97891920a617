"""BatchNorm in Triton kernels, faithful to nn.BatchNorm.

The module is VectorizedBatchNorm (its argument checks, error texts, empty inputs, state dicts
and the canonical views of ``to_canonical``) with every per-element pass replaced by a Triton
kernel.

Layouts. Every canonical view is described to the kernels as ``(N, C, L)`` with three strides,
so one kernel serves every layout: a contiguous input is ``(N, C, L)`` with ``L`` contiguous; a
channels-last or 2-D ``(M, C)`` input is ``(1, C, M)`` with the channels contiguous (a transposed
2-D input: ``L`` contiguous again); ``(N, C, 1)`` is ``(1, C, N)``. Triton specializes a stride
of 1 as a constant, so the loads coalesce (and vectorize) along whichever axis is contiguous. A
kernel works on ``[BLOCK_C, BLOCK_L]`` tiles, ``BLOCK_C`` channels by ``BLOCK_L`` consecutive
positions of one sample: one "chunk" of a channel block. Block sizes and splits come from the
shape by fixed heuristics (:func:`_blocks`, :func:`_split`), never from autotuning: the same
shape always runs the same kernels, compiled once. Outputs (y, dx) take x's strides, so they
keep its memory format; grad_output may have any strides.

Kernels and passes, with the bytes each moves per element of x (``b`` = its element size):

- ``_stats_partial_kernel`` (reads x once: ``b``): a 2-D grid of channel blocks x splits, each
  split a run of consecutive chunks of its channel block. There are enough splits for about
  four programs per SM even when C is small and N*L huge (ResNet-50's (256, 64, 112, 112): 576
  programs; channels-last, 526), and no split counts more than 2^23 values. A program shifts its
  values by K, the per-channel mean of its first tile, accumulates S1 = sum(x - K) and
  S2 = sum((x - K)^2) per lane, and writes its partial (count, mean = K + S1/n,
  M2 = S2 - S1^2/n) for each (channel, split).
- ``_stats_finalize_kernel`` (O(splits x C)): merges the partials with Chan's parallel formula
  (itself shifted by the first split's mean), writes mean, biased variance and
  invstd = 1/sqrt(var + eps), and, for a tracking module, updates running_mean and running_var
  (the unbiased variance, M2/(n-1)) in place with the momentum, or with 1/num_batches_tracked
  read from the counter on the device when momentum is None: no host synchronization.
- ``_normalize_kernel`` (reads x, writes y: ``2b``): y = (x - mean) * (invstd * weight) + bias,
  normalization and affine fused. In eval it takes the running statistics and forms invstd
  itself: eval is this one kernel.
- backward: ``_grad_partial_kernel`` (reads dy and x: ``2b``) sums dy and dy * (x - mean) per
  (channel, split); ``_grad_finalize_kernel`` adds the splits and writes grad_weight =
  sum(dy * (x - mean)) * invstd and grad_bias = sum(dy); ``_grad_input_kernel`` (reads dy and
  x, writes dx: ``3b``) computes dx = w * invstd * (dy - sum(dy)/n - (x - mean) * invstd^2 *
  sum(dy * (x - mean))/n). In eval dx = w * invstd * dy reads dy alone (``2b``), and the
  reduction runs only when the weight or bias needs a gradient. Only the gradients autograd
  asks for are computed.

A training step moves 3b per element forward and 5b backward; eval 2b forward and 2b backward
(4b with parameter gradients).

Numerics. Everything is computed in float32 for float16, bfloat16 and float32 inputs (float64 for
float64) and stored in the input's dtype. No raw sum of squares is ever formed: with the shift
inside the data's own spread, x - K is exact even at |mean|/std = 1e4, and the partials merge
without cancellation. Counts are exact integers. The square root is the IEEE-rounded one. Python
floats reach a kernel as float32 arguments, so eps and momentum travel as two float32 halves
(hi + lo) that a float64 kernel adds back to about 2^-48.

The running statistics are written by the finalize kernel, so the one path VectorizedBatchNorm
runs eagerly (training that updates them) is this module's own ``forward``; every other call
(errors, empty inputs, eval, batch statistics without tracking) goes through
VectorizedBatchNorm.forward, which calls the kernels through its hooks.

Left for tuning on the GPU: the tile sizes and warps, the programs per SM, and contiguous
inputs with a short odd L (ResNet's 7x7: runs of 49 in 64-wide tiles, scalar loads).

Triton is optional: without it this module imports, and the implementation is "not supported"
with the reason. Its kernels run on CUDA devices; on CPU only for tests, under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported) with BNBENCH_TRITON_ON_CPU=1.
The backward is not itself differentiable (no double backward) and there is no jvp, so
forward-mode AD raises.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwad
from torch.autograd.function import once_differentiable

from bnbench.implementations.vectorized import (
    VectorizedBatchNorm,
    rank_classes,
    to_canonical,
)
from bnbench.registry import Config, from_classes

try:
    import triton
    import triton.language as tl
except ImportError:  # CI has no triton: the implementation says so instead of failing to load
    triton = None
    tl = None


def _interpreting() -> bool:
    """Whether triton.jit makes interpreted functions in this process (decided at import)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


# The kernels run on CPU tensors only under Triton's interpreter, and only when asked to.
_INTERPRETED = triton is not None and _interpreting()
_ON_CPU = _INTERPRETED and os.environ.get("BNBENCH_TRITON_ON_CPU") == "1"


def _interpreter_numpy_fix() -> None:
    """Triton 3.6's interpreter turns a scalar into a loop bound with int() of a 1-element
    array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"): every loop with a runtime bound fails. Fixed upstream (triton-lang/triton#9171,
    #9172) by squeezing the array first; the same here, under the interpreter only and only
    while the installed versions need it."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_bnbench_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._bnbench_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


if _INTERPRETED:
    _interpreter_numpy_fix()

# Elements per tile: the reductions keep two accumulators of a tile in registers.
_REDUCTION_TILE = 2048
_ELEMENTWISE_TILE = 4096
# Programs per SM the split reductions aim at, and the most values one split counts (its count
# and its float32 accumulators stay exact and short).
_PROGRAMS_PER_SM = 4
_MAX_SPLIT_COUNT = 1 << 23
_MAX_GRID_Y = 65535
# Runs along a contiguous L are shortened (not below _MIN_RUN) while more than _MAX_PADDING of
# the tiles would be masked off.
_MIN_RUN = 256
_MAX_PADDING = 0.125


if triton is not None:

    @triton.jit
    def _tile(k, c0, LB, s_n, s_c, s_l, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        """Chunk ``k`` of the channel block starting at ``c0``: the int64 offset of its corner,
        the int32 offsets of its [BLOCK_C, BLOCK_L] elements from there, and its first
        position along L."""
        n = k // LB
        l0 = (k - n * LB) * BLOCK_L
        corner = n.to(tl.int64) * s_n + c0.to(tl.int64) * s_c + l0.to(tl.int64) * s_l
        offsets = tl.arange(0, BLOCK_C)[:, None] * s_c + tl.arange(0, BLOCK_L)[None, :] * s_l
        return corner, offsets, l0

    @triton.jit
    def _scalar(hi, lo, ACC: tl.constexpr):
        """A Python float passed as two float32 halves, in the compute precision."""
        return tl.cast(hi, ACC) + tl.cast(lo, ACC)

    @triton.jit
    def _rsqrt(v, ACC: tl.constexpr):
        """1/sqrt(v) with an IEEE-rounded square root (sqrt_rn is float32 only; float64's sqrt
        is the rounded one)."""
        if ACC == tl.float64:
            r = 1.0 / tl.sqrt(v)
        else:
            r = 1.0 / tl.sqrt_rn(v)
        return r

    @triton.jit
    def _invstd(ptr, c, c_ok, eps_hi, eps_lo, FROM_VAR: tl.constexpr, ACC: tl.constexpr):
        """Per channel 1/sqrt(var + eps) from a variance (FROM_VAR) or as stored."""
        v = tl.load(ptr + c, mask=c_ok, other=1.0).to(ACC)
        if FROM_VAR:
            v = _rsqrt(v + _scalar(eps_hi, eps_lo, ACC), ACC)
        return v

    @triton.jit
    def _stats_partial_kernel(
        x_ptr,
        part_ptr,
        C,
        L,
        LB,
        chunks,
        per_split,
        s_n,
        s_c,
        s_l,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """Per (channel, split): count, mean and M2 of the split's chunks, from sums shifted by
        the mean of its first tile. part is (3, splits, C): counts, means, M2s."""
        c0 = tl.program_id(0) * BLOCK_C
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        dl = tl.arange(0, BLOCK_L)
        k0 = split * per_split
        k1 = tl.minimum(k0 + per_split, chunks)

        corner, offsets, l0 = _tile(k0, c0, LB, s_n, s_c, s_l, BLOCK_C, BLOCK_L)
        mask = c_ok[:, None] & (l0 + dl < L)[None, :]
        v = tl.load(x_ptr + corner + offsets, mask=mask, other=0.0).to(ACC)
        count = tl.minimum(L - l0, BLOCK_L)
        shift = tl.sum(v, axis=1) / count.to(ACC)
        d = tl.where(mask, v - shift[:, None], 0.0)
        s1 = d
        s2 = d * d
        for k in range(k0 + 1, k1):
            corner, offsets, l0 = _tile(k, c0, LB, s_n, s_c, s_l, BLOCK_C, BLOCK_L)
            mask = c_ok[:, None] & (l0 + dl < L)[None, :]
            v = tl.load(x_ptr + corner + offsets, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, v - shift[:, None], 0.0)
            s1 += d
            s2 += d * d
            count += tl.minimum(L - l0, BLOCK_L)

        t1 = tl.sum(s1, axis=1)
        t2 = tl.sum(s2, axis=1)
        n = tl.zeros([BLOCK_C], dtype=ACC) + count.to(ACC)
        out = part_ptr + split * C + c
        tl.store(out, n, mask=c_ok)
        tl.store(out + splits * C, shift + t1 / n, mask=c_ok)
        tl.store(out + 2 * splits * C, tl.maximum(t2 - t1 * (t1 / n), 0.0), mask=c_ok)

    @triton.jit
    def _stats_finalize_kernel(
        part_ptr,
        stats_ptr,
        rm_ptr,
        rv_ptr,
        nbt_ptr,
        C,
        splits,
        n_total,
        eps_hi,
        eps_lo,
        mom_hi,
        mom_lo,
        UPDATE: tl.constexpr,
        CUMULATIVE: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """Chan's merge of the splits' partials into mean, biased variance and invstd
        (stats is (3, C)), and the running statistics' update when UPDATE."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        shift = tl.load(part_ptr + splits * C + c, mask=c_ok, other=0.0)  # split 0's mean
        a = tl.zeros([BLOCK_C], dtype=ACC)  # sum of count * (mean - shift)
        b = tl.zeros([BLOCK_C], dtype=ACC)  # sum of count * (mean - shift)^2
        m2 = tl.zeros([BLOCK_C], dtype=ACC)  # sum of M2
        for s0 in range(0, splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < splits)[:, None] & c_ok[None, :]
            offsets = s[:, None] * C + c[None, :]
            cnt = tl.load(part_ptr + offsets, mask=mask, other=0.0)
            mean = tl.load(part_ptr + splits * C + offsets, mask=mask, other=0.0)
            d = tl.where(mask, mean - shift[None, :], 0.0)
            a += tl.sum(cnt * d, axis=0)
            b += tl.sum(cnt * d * d, axis=0)
            m2 += tl.sum(tl.load(part_ptr + 2 * splits * C + offsets, mask=mask, other=0.0), 0)
        n = tl.zeros([BLOCK_C], dtype=ACC) + n_total
        mean = shift + a / n
        m2 = m2 + tl.maximum(b - a * (a / n), 0.0)
        var = m2 / n
        invstd = _rsqrt(var + _scalar(eps_hi, eps_lo, ACC), ACC)
        tl.store(stats_ptr + c, mean, mask=c_ok)
        tl.store(stats_ptr + C + c, var, mask=c_ok)
        tl.store(stats_ptr + 2 * C + c, invstd, mask=c_ok)
        if UPDATE:
            if CUMULATIVE:  # momentum=None: 1 / num_batches_tracked, already incremented
                factor = 1.0 / tl.load(nbt_ptr).to(ACC)
            else:
                factor = _scalar(mom_hi, mom_lo, ACC)
            rm = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(ACC)
            rv = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(ACC)
            rm = factor * mean + (1.0 - factor) * rm
            rv = factor * (m2 / (n - 1.0)) + (1.0 - factor) * rv
            tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty), mask=c_ok)
            tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty), mask=c_ok)

    @triton.jit
    def _normalize_kernel(
        x_ptr,
        y_ptr,
        mean_ptr,
        sd_ptr,
        w_ptr,
        b_ptr,
        C,
        L,
        LB,
        CB,
        s_n,
        s_c,
        s_l,
        eps_hi,
        eps_lo,
        FROM_VAR: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """One tile of y = (x - mean) * invstd * weight + bias (y has x's strides): program
        k * CB + b is chunk k of channel block b. sd is the invstd (training) or the running
        variance (FROM_VAR, eval)."""
        k = tl.program_id(0) // CB
        c0 = (tl.program_id(0) - k * CB) * BLOCK_C
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
        scale = _invstd(sd_ptr, c, c_ok, eps_hi, eps_lo, FROM_VAR, ACC)
        if HAS_W:
            scale = scale * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
        corner, offsets, l0 = _tile(k, c0, LB, s_n, s_c, s_l, BLOCK_C, BLOCK_L)
        mask = c_ok[:, None] & (l0 + tl.arange(0, BLOCK_L) < L)[None, :]
        x = tl.load(x_ptr + corner + offsets, mask=mask, other=0.0).to(ACC)
        y = (x - mean[:, None]) * scale[:, None]
        if HAS_B:
            y += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)[:, None]
        tl.store(y_ptr + corner + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_partial_kernel(
        dy_ptr,
        x_ptr,
        mean_ptr,
        part_ptr,
        C,
        L,
        LB,
        chunks,
        per_split,
        sx_n,
        sx_c,
        sx_l,
        sd_n,
        sd_c,
        sd_l,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """Per (channel, split): sum(dy) and sum(dy * (x - mean)). part is (2, splits, C)."""
        c0 = tl.program_id(0) * BLOCK_C
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        dl = tl.arange(0, BLOCK_L)
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
        k0 = split * per_split
        k1 = tl.minimum(k0 + per_split, chunks)
        sum_dy = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        sum_dy_xmu = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        for k in range(k0, k1):
            cx, ox, l0 = _tile(k, c0, LB, sx_n, sx_c, sx_l, BLOCK_C, BLOCK_L)
            cd, od, _ = _tile(k, c0, LB, sd_n, sd_c, sd_l, BLOCK_C, BLOCK_L)
            mask = c_ok[:, None] & (l0 + dl < L)[None, :]
            dy = tl.load(dy_ptr + cd + od, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + cx + ox, mask=mask, other=0.0).to(ACC)
            sum_dy += dy
            sum_dy_xmu += dy * (x - mean[:, None])
        out = part_ptr + split * C + c
        tl.store(out, tl.sum(sum_dy, axis=1), mask=c_ok)
        tl.store(out + splits * C, tl.sum(sum_dy_xmu, axis=1), mask=c_ok)

    @triton.jit
    def _grad_finalize_kernel(
        part_ptr,
        sums_ptr,
        sd_ptr,
        gw_ptr,
        gb_ptr,
        C,
        splits,
        eps_hi,
        eps_lo,
        FROM_VAR: tl.constexpr,
        WRITE_W: tl.constexpr,
        WRITE_B: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """The splits' sums added (sums is (2, C)); grad_weight = sum(dy * (x - mean)) *
        invstd and grad_bias = sum(dy) in the parameters' dtype."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        t1 = tl.zeros([BLOCK_C], dtype=ACC)
        t2 = tl.zeros([BLOCK_C], dtype=ACC)
        for s0 in range(0, splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < splits)[:, None] & c_ok[None, :]
            offsets = s[:, None] * C + c[None, :]
            t1 += tl.sum(tl.load(part_ptr + offsets, mask=mask, other=0.0), axis=0)
            t2 += tl.sum(tl.load(part_ptr + splits * C + offsets, mask=mask, other=0.0), axis=0)
        tl.store(sums_ptr + c, t1, mask=c_ok)
        tl.store(sums_ptr + C + c, t2, mask=c_ok)
        if WRITE_W:
            invstd = _invstd(sd_ptr, c, c_ok, eps_hi, eps_lo, FROM_VAR, ACC)
            tl.store(gw_ptr + c, (t2 * invstd).to(gw_ptr.dtype.element_ty), mask=c_ok)
        if WRITE_B:
            tl.store(gb_ptr + c, t1.to(gb_ptr.dtype.element_ty), mask=c_ok)

    @triton.jit
    def _grad_input_kernel(
        dy_ptr,
        x_ptr,
        dx_ptr,
        mean_ptr,
        sd_ptr,
        w_ptr,
        sums_ptr,
        C,
        L,
        LB,
        CB,
        n_total,
        sx_n,
        sx_c,
        sx_l,
        sd_n,
        sd_c,
        sd_l,
        eps_hi,
        eps_lo,
        TRAIN: tl.constexpr,
        FROM_VAR: tl.constexpr,
        HAS_W: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """One tile of dx (dx has x's strides). Training: the batch statistics' terms from
        the reduced sums; eval (not TRAIN): dx = w * invstd * dy."""
        k = tl.program_id(0) // CB
        c0 = (tl.program_id(0) - k * CB) * BLOCK_C
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        invstd = _invstd(sd_ptr, c, c_ok, eps_hi, eps_lo, FROM_VAR, ACC)
        scale = invstd
        if HAS_W:
            scale = scale * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
        cx, ox, l0 = _tile(k, c0, LB, sx_n, sx_c, sx_l, BLOCK_C, BLOCK_L)
        cd, od, _ = _tile(k, c0, LB, sd_n, sd_c, sd_l, BLOCK_C, BLOCK_L)
        mask = c_ok[:, None] & (l0 + tl.arange(0, BLOCK_L) < L)[None, :]
        dy = tl.load(dy_ptr + cd + od, mask=mask, other=0.0).to(ACC)
        if TRAIN:
            n = tl.zeros([BLOCK_C], dtype=ACC) + n_total
            mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
            mean_dy = tl.load(sums_ptr + c, mask=c_ok, other=0.0) / n
            proj = invstd * invstd * tl.load(sums_ptr + C + c, mask=c_ok, other=0.0) / n
            x = tl.load(x_ptr + cx + ox, mask=mask, other=0.0).to(ACC)
            dx = (dy - mean_dy[:, None] - (x - mean[:, None]) * proj[:, None]) * scale[:, None]
        else:
            dx = dy * scale[:, None]
        tl.store(dx_ptr + cx + ox, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch plans


def _launch(kernel, grid, *args, **meta) -> None:
    """Every launch goes through here (the sm_90 compile test records them)."""
    kernel[grid](*args, **meta)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Geometry(NamedTuple):
    """A canonical view as the kernels see it: (N, C, L) and its strides."""

    n: int
    c: int
    l: int  # noqa: E741
    strides: tuple[int, int, int]

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.n * self.l


def _geometry(t: torch.Tensor) -> _Geometry:
    """(N, C, L) of a canonical (N, C, L) or (M, C) view. Decided by the shape alone, so x and
    a grad of its shape get the same geometry whatever their strides."""
    if t.dim() == 2:
        return _Geometry(1, t.shape[1], t.shape[0], (0, t.stride(1), t.stride(0)))
    n, c, l = t.shape  # noqa: E741
    s_n, s_c, s_l = t.stride()
    if l == 1 and n > 1:
        return _Geometry(1, c, n, (0, s_c, s_n))
    return _Geometry(n, c, l, (s_n, s_c, s_l))


class _Blocks(NamedTuple):
    block_c: int
    block_l: int
    num_warps: int


def _blocks(g: _Geometry, tile: int) -> _Blocks:
    """Tile shape for a geometry: a run along whichever of C and L is contiguous."""
    _, s_c, s_l = g.strides
    if s_c == 1 and s_l != 1:  # channels contiguous: a row of channels per position
        block_c = min(_pow2(g.c), 128)
        block_l = max(1, min(_pow2(g.l), tile // block_c))
    else:  # positions contiguous: long runs along L, channels to fill the tile
        block_l = min(_pow2(g.l), tile)
        # A shorter run when L's last block would leave much of the tile masked (L = 12544:
        # 1024 wastes 6% where 4096 wastes 23%), as long as the channels still fill the tile.
        while (
            block_l > _MIN_RUN
            and _padding(g.l, block_l) > _MAX_PADDING
            and _pow2(g.c) * (block_l // 2) >= tile
        ):
            block_l //= 2
        block_c = max(1, min(_pow2(g.c), tile // block_l))
    num_warps = max(1, min(8, block_c * block_l // 512))
    return _Blocks(block_c, block_l, num_warps)


def _padding(length: int, block: int) -> float:
    """The fraction of ``_cdiv(length, block)`` blocks that lies past ``length``."""
    padded = _cdiv(length, block) * block
    return (padded - length) / padded


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # Triton's interpreter: few programs, each costs host time


class _Split(NamedTuple):
    c_blocks: int
    chunks: int  # chunks per channel block: N * ceil(L / BLOCK_L)
    splits: int
    per_split: int


def _split(g: _Geometry, blocks: _Blocks, device: torch.device) -> _Split:
    """How a reduction divides each channel block's chunks among programs: enough splits for
    about _PROGRAMS_PER_SM programs per SM, at most _MAX_SPLIT_COUNT values per split, and
    every split non-empty."""
    c_blocks = _cdiv(g.c, blocks.block_c)
    chunks = g.n * _cdiv(g.l, blocks.block_l)
    wanted = _cdiv(_PROGRAMS_PER_SM * _sm_count(device), c_blocks)
    per_split = _cdiv(chunks, max(1, min(chunks, wanted)))
    per_split = max(1, min(per_split, _MAX_SPLIT_COUNT // blocks.block_l))
    per_split = max(per_split, _cdiv(chunks, _MAX_GRID_Y))
    return _Split(c_blocks, chunks, _cdiv(chunks, per_split), per_split)


def _finalize_blocks(c: int, splits: int) -> tuple[int, int]:
    block_c = min(_pow2(c), 128)
    return block_c, max(1, min(_pow2(splits), _REDUCTION_TILE // block_c, 64))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Compute precision: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _halves(value: float) -> tuple[float, float]:
    """A float as two float32 values whose sum is it to about 2^-48."""
    hi = _float32(value)
    return hi, _float32(value - hi)


def _float32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: what a float32 argument would hold
        return float(torch.tensor(value, dtype=torch.float32))


def _device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _dense(x: torch.Tensor) -> torch.Tensor:
    """A canonical view the outputs can share strides with (empty_like keeps them): canonical
    3-D views are contiguous; a 2-D input may be transposed, anything else is copied."""
    if x.dim() == 2 and (x.is_contiguous() or x.t().is_contiguous()):
        return x
    return x.contiguous()


def _check_channels(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """nn.BatchNorm's error for per-channel tensors that do not match the input's channels
    (the kernels would read past them), and for tensors on another device."""
    channels = x.shape[1]
    for name, t in tensors.items():
        if t is None:
            continue
        if t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if t.device != x.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                f"devices, {x.device} and {t.device}! ({name})"
            )


def _wants_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether the call must go through an autograd.Function: a gradient will be asked for, or
    forward-mode AD is active (the Function then raises instead of dropping the tangent)."""
    if getattr(fwad, "_current_level", -1) >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _bump(*tensors: torch.Tensor) -> None:
    """Tell autograd that the kernels wrote ``tensors`` in place (as in-place torch ops do)."""
    tracked = [t for t in tensors if not t.is_inference()]
    if tracked:
        torch.autograd.graph.increment_version(tracked)


class _Running(NamedTuple):
    mean: torch.Tensor
    var: torch.Tensor
    num_batches_tracked: torch.Tensor
    momentum: float | None


# ---------------------------------------------------------------------------------------------
# Passes


def _train_forward(x, weight, bias, eps: float, running: _Running | None):
    """Batch statistics (and the running update) then the normalization of a canonical view.
    Returns y, mean, biased var and invstd (the last three in the compute precision)."""
    if running is not None:
        _check_channels(x, running_mean=running.mean, running_var=running.var)
    _check_channels(x, weight=weight, bias=bias)
    x = _dense(x)
    g = _geometry(x)
    acc = _acc_dtype(x)
    eps_hi, eps_lo = _halves(eps)
    stats = torch.empty((3, g.c), dtype=acc, device=x.device)
    y = torch.empty_like(x)
    with _device_guard(x):
        red = _blocks(g, _REDUCTION_TILE)
        sp = _split(g, red, x.device)
        partials = torch.empty((3, sp.splits, g.c), dtype=acc, device=x.device)
        _launch(
            _stats_partial_kernel,
            (sp.c_blocks, sp.splits),
            x,
            partials,
            g.c,
            g.l,
            _cdiv(g.l, red.block_l),
            sp.chunks,
            sp.per_split,
            *g.strides,
            ACC=_tl_dtype(acc),
            BLOCK_C=red.block_c,
            BLOCK_L=red.block_l,
            num_warps=red.num_warps,
        )
        update = running is not None
        cumulative = update and running.momentum is None
        mom_hi, mom_lo = _halves(0.0 if not update or cumulative else float(running.momentum))
        fin_c, fin_s = _finalize_blocks(g.c, sp.splits)
        _launch(
            _stats_finalize_kernel,
            (_cdiv(g.c, fin_c),),
            partials,
            stats,
            running.mean if update else stats,
            running.var if update else stats,
            running.num_batches_tracked if update else stats,
            g.c,
            sp.splits,
            g.count,
            eps_hi,
            eps_lo,
            mom_hi,
            mom_lo,
            UPDATE=update,
            CUMULATIVE=cumulative,
            ACC=_tl_dtype(acc),
            BLOCK_C=fin_c,
            BLOCK_S=fin_s,
            num_warps=4,
        )
        if update:
            _bump(running.mean, running.var)
        _normalize(x, y, g, stats[0], stats[2], weight, bias, eps_hi, eps_lo, from_var=False)
    return y, stats[0], stats[1], stats[2]


def _normalize(x, y, g: _Geometry, mean, sd, weight, bias, eps_hi, eps_lo, from_var: bool):
    blocks = _blocks(g, _ELEMENTWISE_TILE)
    c_blocks = _cdiv(g.c, blocks.block_c)
    _launch(
        _normalize_kernel,
        (g.n * _cdiv(g.l, blocks.block_l) * c_blocks,),
        x,
        y,
        mean,
        sd,
        weight if weight is not None else mean,
        bias if bias is not None else mean,
        g.c,
        g.l,
        _cdiv(g.l, blocks.block_l),
        c_blocks,
        *g.strides,
        eps_hi,
        eps_lo,
        FROM_VAR=from_var,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        ACC=_tl_dtype(_acc_dtype(x)),
        BLOCK_C=blocks.block_c,
        BLOCK_L=blocks.block_l,
        num_warps=blocks.num_warps,
    )


def _eval_forward(x, running_mean, running_var, weight, bias, eps: float) -> torch.Tensor:
    _check_channels(x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    x = _dense(x)
    y = torch.empty_like(x)
    with _device_guard(x):
        _normalize(x, y, _geometry(x), running_mean, running_var, weight, bias, *_halves(eps), True)
    return y


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    sd: torch.Tensor,
    eps: float,
    *,
    train: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    param_dtype: torch.dtype,
):
    """dx, grad_weight, grad_bias (None where not asked for). ``mean``/``sd``: the batch mean
    and invstd (train) or the running mean and variance (eval)."""
    g, gd = _geometry(x), _geometry(dy)
    acc = _acc_dtype(x)
    eps_hi, eps_lo = _halves(eps)
    dx = grad_w = grad_b = None
    sums = mean  # a placeholder pointer when no reduction runs
    with _device_guard(x):
        if need_dw or need_db or (train and need_dx):
            red = _blocks(g, _REDUCTION_TILE)
            sp = _split(g, red, x.device)
            partials = torch.empty((2, sp.splits, g.c), dtype=acc, device=x.device)
            _launch(
                _grad_partial_kernel,
                (sp.c_blocks, sp.splits),
                dy,
                x,
                mean,
                partials,
                g.c,
                g.l,
                _cdiv(g.l, red.block_l),
                sp.chunks,
                sp.per_split,
                *g.strides,
                *gd.strides,
                ACC=_tl_dtype(acc),
                BLOCK_C=red.block_c,
                BLOCK_L=red.block_l,
                num_warps=red.num_warps,
            )
            sums = torch.empty((2, g.c), dtype=acc, device=x.device)
            if need_dw:
                grad_w = torch.empty(g.c, dtype=param_dtype, device=x.device)
            if need_db:
                grad_b = torch.empty(g.c, dtype=param_dtype, device=x.device)
            fin_c, fin_s = _finalize_blocks(g.c, sp.splits)
            _launch(
                _grad_finalize_kernel,
                (_cdiv(g.c, fin_c),),
                partials,
                sums,
                sd,
                grad_w if grad_w is not None else sums,
                grad_b if grad_b is not None else sums,
                g.c,
                sp.splits,
                eps_hi,
                eps_lo,
                FROM_VAR=not train,
                WRITE_W=need_dw,
                WRITE_B=need_db,
                ACC=_tl_dtype(acc),
                BLOCK_C=fin_c,
                BLOCK_S=fin_s,
                num_warps=4,
            )
        if need_dx:
            dx = torch.empty_like(x)
            blocks = _blocks(g, _ELEMENTWISE_TILE)
            c_blocks = _cdiv(g.c, blocks.block_c)
            _launch(
                _grad_input_kernel,
                (g.n * _cdiv(g.l, blocks.block_l) * c_blocks,),
                dy,
                x,
                dx,
                mean,
                sd,
                weight if weight is not None else mean,
                sums,
                g.c,
                g.l,
                _cdiv(g.l, blocks.block_l),
                c_blocks,
                g.count,
                *g.strides,
                *gd.strides,
                eps_hi,
                eps_lo,
                TRAIN=train,
                FROM_VAR=not train,
                HAS_W=weight is not None,
                ACC=_tl_dtype(acc),
                BLOCK_C=blocks.block_c,
                BLOCK_L=blocks.block_l,
                num_warps=blocks.num_warps,
            )
    return dx, grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# Autograd


class _TrainFunction(torch.autograd.Function):
    """Training forward (batch statistics) with the fused backward. Outputs y, mean and the
    biased variance (the last two not differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running):
        y, mean, var, invstd = _train_forward(x, weight, bias, eps, running)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.param_dtype = weight.dtype if weight is not None else x.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, grad_w, grad_b = _backward(
            grad_y,
            x,
            weight,
            mean,
            invstd,
            ctx.eps,
            train=True,
            need_dx=ctx.needs_input_grad[0],
            need_dw=weight is not None and ctx.needs_input_grad[1],
            need_db=ctx.has_bias and ctx.needs_input_grad[2],
            param_dtype=ctx.param_dtype,
        )
        return dx, grad_w, grad_b, None, None


class _EvalFunction(torch.autograd.Function):
    """Eval forward (running statistics) with its backward: dx = w * invstd * dy, and the
    weight and bias gradients from one reduction when asked for."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        y = _eval_forward(x, running_mean, running_var, weight, bias, eps)
        ctx.save_for_backward(x, running_mean, running_var, weight)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.param_dtype = weight.dtype if weight is not None else x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, running_mean, running_var, weight = ctx.saved_tensors
        dx, grad_w, grad_b = _backward(
            grad_y,
            x,
            weight,
            running_mean,
            running_var,
            ctx.eps,
            train=False,
            need_dx=ctx.needs_input_grad[0],
            need_dw=weight is not None and ctx.needs_input_grad[3],
            need_db=ctx.has_bias and ctx.needs_input_grad[4],
            param_dtype=ctx.param_dtype,
        )
        return dx, None, None, grad_w, grad_b, None


def train_call(x, weight, bias, eps: float, running: _Running | None = None):
    """Normalize a canonical view with its batch statistics (updating ``running`` in the
    finalize kernel when given). Returns y, the batch mean and the biased variance."""
    x = _dense(x)
    if _wants_autograd(x, weight, bias):
        return _TrainFunction.apply(x, weight, bias, float(eps), running)
    return _train_forward(x, weight, bias, float(eps), running)[:3]


def train_kernel(x, weight, bias, eps: float):
    """VectorizedBatchNorm's training hook: batch statistics, no running update (the module
    does not track, or its buffers were set to None)."""
    return train_call(x, weight, bias, eps)


def eval_kernel(x, running_mean, running_var, weight, bias, eps: float) -> torch.Tensor:
    """VectorizedBatchNorm's eval hook: one kernel over a canonical view."""
    x = _dense(x)
    if _wants_autograd(x, weight, bias):
        return _EvalFunction.apply(x, running_mean, running_var, weight, bias, float(eps))
    return _eval_forward(x, running_mean, running_var, weight, bias, float(eps))


class TritonBatchNorm(VectorizedBatchNorm):
    """VectorizedBatchNorm whose passes are Triton kernels, the running statistics updated in
    the statistics' finalize kernel."""

    train_kernel = staticmethod(train_kernel)
    eval_kernel = staticmethod(eval_kernel)

    def _updates_in_kernel(self, x: torch.Tensor) -> bool:
        """A training call that updates the running statistics, on an input every check of
        VectorizedBatchNorm.forward accepts: the one path this class runs itself."""
        return (
            self.training
            and self.track_running_stats
            and self.num_batches_tracked is not None
            and self.running_mean is not None
            and self.running_var is not None
            and x.dim() in self._expected_dims
            and x.numel() > 0
            and x.numel() // x.shape[1] != 1
            and self.eps > 0.0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._updates_in_kernel(x):
            # errors (with VectorizedBatchNorm's messages), empty inputs, eval, batch statistics
            # without tracking: VectorizedBatchNorm.forward, through the kernel hooks above
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        canonical, restore = to_canonical(x)
        running = _Running(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            None if self.momentum is None else float(self.momentum),
        )
        return restore(train_call(canonical, self.weight, self.bias, self.eps, running)[0])


_classes = rank_classes(TritonBatchNorm, "Triton")
# Importable by name, so modules pickle.
TritonBatchNorm1d, TritonBatchNorm2d, TritonBatchNorm3d = (
    _classes[2],
    _classes[4],
    _classes[5],
)


def unsupported_reason(config: Config) -> str | None:
    """Why the Triton kernels cannot run ``config`` here (None when they can)."""
    reasons = []
    if torch.device(config.device).type != "cuda" and not _ON_CPU:
        reasons.append("Triton kernels run on CUDA devices only")
    if triton is None:
        reasons.append("needs the triton package (not installed)")
    return "; ".join(reasons) or None


triton_impl = from_classes(
    "triton",
    _classes,
    description="Triton kernels (CUDA): split shifted-sum statistics merged by Chan's formula, "
    "fused normalize+affine, running stats updated in-kernel, fused backward",
    # CUDA; CPU only for the tests, under Triton's interpreter (see the module docstring)
    supports_devices=frozenset({"cuda", "cpu"} if _ON_CPU else {"cuda"}),
    supports_double_backward=False,
    deviations={
        "forward_ad-*": "the autograd.Functions around the Triton kernels define backward "
        "only, no jvp: forward-mode AD (torch.func.jvp) raises",
    },
    extra_unsupported=unsupported_reason,
)
