"""Synchronized BatchNorm implementations the distributed gate must judge correctly.

Every class has nn.SyncBatchNorm's constructor and state (it subclasses it) and takes inputs of
rank 2 to 5, contiguous or channels_last, float32/float64, or float16/bfloat16 with float32
parameters (computed in float32, returned in the input's dtype). In training with more than one
rank in its process group (None: the whole world) it normalizes with the global batch's
statistics; otherwise (eval, no process group, a group of one rank) it is plain local BatchNorm.

FAITHFUL (each must pass), written differently from implementations/sync.py:

- WelfordGatherSyncBN: all_gather of per-rank (count, mean, biased var), merged rank by rank
  with Chan's pairwise update; written step by step, so that each BROKEN class below replaces
  exactly one step of it;
- AllReduceSumsFloat64SyncBN: one all_reduce of (count, sum, sum of squares) in float64;
- AutogradSyncBN: no autograd.Function: differentiable all_reduces, autograd derives the rest.

BROKEN (each must fail): one realistic bug each, found in real synchronized BatchNorm code; the
docstring names the observable that catches it.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _view(x: torch.Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) for such an input (that is not also plainly contiguous)."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _check_total(total: float) -> None:
    if total <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{total:g} over the process group"
        )


class _SyncFunction(torch.autograd.Function):
    """Forward and backward of a synchronized BN; ``bn`` (the module) provides the steps."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn, running_mean, running_var, momentum, group):
        compute = _compute_dtype(x)
        xc = x.to(compute)
        mean, var, total = bn.global_stats(xc, group)  # float64, per channel
        if running_mean is not None:
            with torch.no_grad():
                bn.update_running(running_mean, running_var, mean, var, total, momentum)
        invstd = bn.invstd(var)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        y = xc * scale.to(compute).view(_view(x)) + shift.to(compute).view(_view(x))
        ctx.save_for_backward(x, weight, mean.to(compute), invstd.to(compute))
        ctx.bn, ctx.group, ctx.total, ctx.has_bias = bn, group, total, bias is not None
        return bn.finish(y, x)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        compute, dims, view = mean.dtype, _dims(x), _view(x)
        dy = grad_out.to(compute)
        xmu = x.to(compute) - mean.view(view)
        sum_dy = dy.sum(dims).double()  # zeros on a rank with no samples
        sum_dy_xmu = (dy * xmu).sum(dims).double()
        # every rank takes part, whatever it needs itself: the others wait for it
        g_dy, g_dy_xmu, own_dy, own_dy_xmu = ctx.bn.backward_sums(sum_dy, sum_dy_xmu, ctx.group)
        mean_dy = (g_dy / ctx.total).to(compute).view(view)
        mean_dy_xmu = (g_dy_xmu / ctx.total).to(compute)
        scale = invstd if weight is None else invstd * weight.to(compute)
        grad_x = (dy - mean_dy - xmu * (invstd * invstd * mean_dy_xmu).view(view)) * scale.view(
            view
        )
        grad_x = grad_x.to(x.dtype).contiguous(memory_format=_layout(x))
        grad_w = grad_b = None
        if weight is not None:  # this rank's own contribution: DDP sums them
            grad_w = (own_dy_xmu * invstd.double()).to(weight.dtype)
            grad_b = own_dy.to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


class WelfordGatherSyncBN(nn.SyncBatchNorm):
    """FAITHFUL. Forward: each rank's (count, mean, biased var) of its shard, all_gathered in
    float64 and merged rank by rank with Chan's pairwise (Welford) update, skipping ranks with
    no samples; running_var takes the unbiased variance with the global count. Backward:
    sum(dy) and sum(dy * (x - mean)) all-reduced in float64 for the input grad; weight/bias
    grads are the rank's own contribution. Each method below is one step a BROKEN subclass
    replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        factor = self.step_factor()
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        rm = self.running_mean if track else None
        rv = self.running_var if track else None
        group = self.sync_group()
        if not self.wants_sync(bn_training, group):
            return F.batch_norm(x, rm, rv, self.weight, self.bias, bn_training, factor, self.eps)
        if self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, got {self.eps}")
        return self.sync_forward(x, rm, rv, factor, group)

    # -- module-level steps ------------------------------------------------------------------
    def step_factor(self) -> float:
        """Counts the batch; the running statistics' update factor."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def sync_group(self):
        return self.process_group  # None: the whole world

    def wants_sync(self, bn_training: bool, group) -> bool:
        return (
            bn_training
            and self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )

    def sync_forward(self, x, running_mean, running_var, factor, group):
        return _SyncFunction.apply(
            x, self.weight, self.bias, self, running_mean, running_var, factor, group
        )

    # -- forward steps (float64 statistics) --------------------------------------------------
    def shard_stats(self, xc: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, mean, biased var) of this rank's shard."""
        c = xc.shape[1]
        count = xc.numel() // c
        if count == 0:
            zeros = torch.zeros(c, dtype=torch.float64, device=xc.device)
            return 0, zeros, zeros
        var, mean = torch.var_mean(xc, _dims(xc), correction=0)
        return count, mean.double(), var.double()

    def global_stats(self, xc: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mean, biased var, count) of the group's whole batch."""
        count, mean, var = self.shard_stats(xc)
        row = torch.cat([mean.new_tensor([float(count)]), mean, var])
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, row, group=group)
        table = torch.stack(rows)
        c = xc.shape[1]
        return self.merge(table[:, 0], table[:, 1 : 1 + c], table[:, 1 + c :])

    def merge(self, counts, means, variances) -> tuple[torch.Tensor, torch.Tensor, float]:
        n, mean, m2 = 0.0, torch.zeros_like(means[0]), torch.zeros_like(means[0])
        for nb, mb, vb in zip(counts.tolist(), means, variances):
            if nb == 0:
                continue
            total = n + nb
            delta = mb - mean
            mean = mean + delta * (nb / total)
            m2 = m2 + vb * nb + delta * delta * (n * nb / total)
            n = total
        _check_total(n)
        return mean, m2 / n, n

    def update_running(self, running_mean, running_var, mean, var, total, momentum) -> None:
        unbiased = var * (total / (total - 1))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

    def invstd(self, var: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(var + self.eps)

    def finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output in the input's dtype and memory format."""
        return y.to(x.dtype).contiguous(memory_format=_layout(x))

    # -- backward step -----------------------------------------------------------------------
    def backward_sums(self, sum_dy, sum_dy_xmu, group):
        """(global sum_dy, global sum_dy_xmu, this rank's sum_dy, this rank's sum_dy_xmu)."""
        both = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(both, group=group)
        c = sum_dy.numel()
        return both[:c], both[c:], sum_dy, sum_dy_xmu


class AllReduceSumsFloat64SyncBN(WelfordGatherSyncBN):
    """FAITHFUL. Forward: one all_reduce of (count, sum x, sum x^2) per channel in float64; the
    one-pass variance E[x^2] - E[x]^2 is accurate enough in float64 (relative error about
    1e-16 * (mean/std)^2). Backward: all_reduce of sum_dy and sum_dy_xmu (as the base)."""

    sums_dtype = torch.float64

    def global_stats(self, xc, group):
        c = xc.shape[1]
        xs = xc.to(self.sums_dtype)
        dims = _dims(xc)
        count = xs.new_tensor([float(xc.numel() // c)])
        sums = torch.cat([count, xs.sum(dims), (xs * xs).sum(dims)])
        dist.all_reduce(sums, group=group)
        total = float(sums[0])
        _check_total(total)
        mean = sums[1 : 1 + c] / total
        var = (sums[1 + c :] / total - mean * mean).clamp_min(0)
        return mean.double(), var.double(), total


def _differentiable_all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a private module, still works
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t, op=dist.ReduceOp.SUM, group=group or dist.group.WORLD)


class AutogradSyncBN(WelfordGatherSyncBN):
    """FAITHFUL. No autograd.Function: torch.distributed.nn.functional.all_reduce (whose backward
    all-reduces the incoming gradient) of (count, sum x), then of sum (x - mean)^2, in float64;
    autograd derives the backward (two all_reduces there too, on every rank, a rank with no
    samples included: its empty output still depends on the global statistics)."""

    def sync_forward(self, x, running_mean, running_var, factor, group):
        compute = _compute_dtype(x)
        c, dims, view = x.shape[1], _dims(x), _view(x)
        x64 = x.to(torch.float64)
        count = x64.new_tensor([float(x.numel() // c)])
        first = _differentiable_all_reduce(torch.cat([count, x64.sum(dims)]), group)
        total = float(first[0].detach())
        _check_total(total)
        mean = first[1:] / total
        var = _differentiable_all_reduce(((x64 - mean.view(view)) ** 2).sum(dims), group) / total
        if running_mean is not None:
            with torch.no_grad():
                self.update_running(
                    running_mean, running_var, mean.detach(), var.detach(), total, factor
                )
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        y = (x.to(compute) - mean.to(compute).view(view)) * scale.to(compute).view(view)
        if self.bias is not None:
            y = y + self.bias.to(compute).view(view)
        return self.finish(y, x)


# ---------------------------------------------------------------------------------------------
# BROKEN: one bug each


class EqualWeightSyncBN(WelfordGatherSyncBN):
    """BROKEN (detectron2 NaiveSyncBatchNorm style): the global mean and variance average the
    per-rank means and E[x^2] with equal weights, ignoring the counts. Exact for even shards;
    caught on an uneven split (a 1-sample rank weighs as much as a 5-sample one, a 0-sample rank
    drags toward 0): output, input grad, running stats."""

    def merge(self, counts, means, variances):
        mean = means.mean(0)
        var = (variances + means * means).mean(0) - mean * mean
        total = float(counts.sum())
        _check_total(total)
        return mean, var, total


class LocalCountSyncBN(WelfordGatherSyncBN):
    """BROKEN (Apex / early nn.SyncBatchNorm): the global count is taken as the local count times
    the world size (counts are not exchanged), so the backward's mean of sum_dy and the unbiased
    running_var are wrong for uneven shards (the forward merge is right). Caught on an uneven
    split: input grad, running_var."""

    def global_stats(self, xc, group):
        mean, var, _ = super().global_stats(xc, group)
        return mean, var, float(xc.numel() // xc.shape[1] * dist.get_world_size(group))


class BiasedRunningVarSyncBN(WelfordGatherSyncBN):
    """BROKEN: running_var is updated with the biased (population) variance. Caught: running_var
    in training (most visible with a small global batch)."""

    def update_running(self, running_mean, running_var, mean, var, total, momentum):
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


class ClampEpsSyncBN(WelfordGatherSyncBN):
    """BROKEN (vacancy/Synchronized-BatchNorm-PyTorch): ``var.clamp(min=eps).rsqrt()`` instead of
    ``(var + eps).rsqrt()``. Off by only about eps/var relative, so it is caught only on a
    channel whose variance is around eps or below (the gate includes such a low-variance
    channel): output and input grad there."""

    def invstd(self, var):
        return var.clamp(min=self.eps).rsqrt()


class SyncInEvalSyncBN(WelfordGatherSyncBN):
    """BROKEN: in eval without running statistics (track_running_stats=False) it normalizes
    with the GLOBAL batch statistics (syncs) instead of the shard's own. Caught: eval output
    with track_running_stats=False (and a collective in eval)."""

    def wants_sync(self, bn_training, group):
        return (
            bn_training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )


class WastefulEvalSyncBN(WelfordGatherSyncBN):
    """BROKEN (wasteful): in eval it all-reduces (averages) the running statistics "to keep the
    ranks consistent" before normalizing. They are equal on every rank already, so the output
    is right: only a count of the collectives called in eval catches it."""

    def forward(self, x):
        if not self.training and self.running_mean is not None and dist.is_initialized():
            group = self.sync_group()
            n = dist.get_world_size(group)
            with torch.no_grad():
                for stat in (self.running_mean, self.running_var):
                    dist.all_reduce(stat, group=group)
                    stat.div_(n)
        return super().forward(x)


class LocalBackwardSyncBN(WelfordGatherSyncBN):
    """BROKEN: the backward uses the local sum_dy and sum_dy_xmu (not all-reduced) over the
    global count. Caught: input grad whenever there is more than one rank."""

    def backward_sums(self, sum_dy, sum_dy_xmu, group):
        return sum_dy, sum_dy_xmu, sum_dy, sum_dy_xmu


class ZeroRankSyncBN(WelfordGatherSyncBN):
    """BROKEN: the shard's count is ``max(count, 1)`` "to avoid dividing by zero", so a rank with
    0 samples contributes one phantom sample with mean 0 and variance 0. Caught: everything on
    a split with a 0-sample rank (global mean and var pulled toward 0)."""

    def shard_stats(self, xc):
        c = xc.shape[1]
        count = max(xc.numel() // c, 1)
        mean = xc.sum(_dims(xc)) / count
        var = ((xc - mean.view(_view(xc))) ** 2).sum(_dims(xc)) / count
        return count, mean.double(), var.double()


class ZeroRankSkipsCollectiveSyncBN(WelfordGatherSyncBN):
    """BROKEN (hangs): a rank with 0 samples returns an empty output at once and skips the
    collectives (forward and backward), so the other ranks wait in all_gather until the
    collective timeout. Caught: a split with a 0-sample rank (the others time out or the gate's
    deadline ends them)."""

    def sync_forward(self, x, running_mean, running_var, factor, group):
        if x.shape[0] == 0:
            y = x.to(_compute_dtype(x))
            if self.weight is not None:
                y = y * self.weight.view(_view(x)) + self.bias.view(_view(x))
            return y.to(x.dtype)
        return super().sync_forward(x, running_mean, running_var, factor, group)


class SummedWeightGradSyncBN(WelfordGatherSyncBN):
    """BROKEN: the weight and bias grads are all-reduced too, so every rank holds the global sum
    (DDP, which sums them again, would count them world-size times). Caught: weight/bias grad
    of every rank."""

    def backward_sums(self, sum_dy, sum_dy_xmu, group):
        g_dy, g_dy_xmu, _, _ = super().backward_sums(sum_dy, sum_dy_xmu, group)
        return g_dy, g_dy_xmu, g_dy, g_dy_xmu


class IgnoresProcessGroupSyncBN(WelfordGatherSyncBN):
    """BROKEN: always syncs over the whole world (WORLD), ignoring process_group. Caught: any
    subgroup case, e.g. groups [[0, 2], [1]] at world size 3 (every rank gets the statistics
    of all three shards)."""

    def sync_group(self):
        return None


class NoMomentumNoneSyncBN(WelfordGatherSyncBN):
    """BROKEN: momentum=None is taken as a factor of 0 instead of the cumulative average
    1/num_batches_tracked, so the running statistics never move. Caught: running stats with
    momentum=None."""

    def step_factor(self):
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return 0.0 if self.momentum is None else self.momentum


class Float32SumSqSyncBN(AllReduceSumsFloat64SyncBN):
    """BROKEN: sum and sum of squares accumulated and all-reduced in float32 (one-pass variance
    E[x^2] - E[x]^2 in float32): catastrophic cancellation when |mean| >> std. Caught: output,
    grads and running_var at a large offset (per-channel mean 100, std 1), or a channel of tiny
    variance."""

    sums_dtype = torch.float32


class NoNumBatchesTrackedSyncBN(WelfordGatherSyncBN):
    """BROKEN: forgets to increment num_batches_tracked. Caught: num_batches_tracked after a
    training step; with momentum=None, 1/num_batches_tracked divides by zero."""

    def step_factor(self):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        return factor


class RaisingRankSyncBN(WelfordGatherSyncBN):
    """BROKEN: raises ValueError on rank 1 only, before the forward's collective (the other
    ranks then wait in it). Caught: any synced training case with a rank 1; the gate must fail
    it, release the other ranks and go on."""

    def sync_forward(self, x, running_mean, running_var, factor, group):
        if dist.get_rank() == 1:
            raise ValueError("RaisingRankSyncBN: rank 1 refuses")
        return super().sync_forward(x, running_mean, running_var, factor, group)


class GlobalRankIndexSyncBN(WelfordGatherSyncBN):
    """BROKEN: the backward all_gathers the per-rank sums (summed in rank order on every rank)
    and takes its own weight/bias grad from the gathered list at ``dist.get_rank()``, the GLOBAL
    rank, not ``dist.get_rank(group)``. Right over the whole world; in a subgroup such as
    [0, 2] rank 2 indexes past the group's two rows (IndexError in backward, after the
    collective, so nobody hangs). Caught: subgroup [[0, 2], [1]] at world size 3."""

    def backward_sums(self, sum_dy, sum_dy_xmu, group):
        row = torch.cat([sum_dy, sum_dy_xmu])
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, row, group=group)
        total, own = torch.stack(rows).sum(0), rows[dist.get_rank()]
        c = sum_dy.numel()
        return total[:c], total[c:], own[:c], own[c:]


class WorldSizeGatherSyncBN(WelfordGatherSyncBN):
    """BROKEN: sizes the all_gather's output list with ``dist.get_world_size()`` (the world)
    instead of the group's size. Right over the whole world; in subgroup [0, 2] of a world of
    3 the collective is refused (both members raise in the forward). Caught: subgroup case."""

    def global_stats(self, xc, group):
        count, mean, var = self.shard_stats(xc)
        row = torch.cat([mean.new_tensor([float(count)]), mean, var])
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, row, group=group)
        table = torch.stack(rows)
        c = xc.shape[1]
        return self.merge(table[:, 0], table[:, 1 : 1 + c], table[:, 1 + c :])


class HalfOutputDtypeSyncBN(WelfordGatherSyncBN):
    """BROKEN: computes half inputs in float32 and forgets to cast the output back (returns
    float32 for float16/bfloat16 inputs). Caught: output dtype on a float16/bfloat16 case."""

    def finish(self, y, x):
        return y.contiguous(memory_format=_layout(x))


class ContiguousOutputSyncBN(WelfordGatherSyncBN):
    """BROKEN: returns a plainly contiguous (NCHW) output for a channels_last input (as code that
    calls ``input.contiguous()`` first does); the values are right. Caught: output memory
    format on a channels_last case (only if the gate checks the layout)."""

    def finish(self, y, x):
        return y.to(x.dtype).contiguous()


FAITHFUL = ["WelfordGatherSyncBN", "AllReduceSumsFloat64SyncBN", "AutogradSyncBN"]
BROKEN = [
    "EqualWeightSyncBN",
    "LocalCountSyncBN",
    "BiasedRunningVarSyncBN",
    "ClampEpsSyncBN",
    "SyncInEvalSyncBN",
    "WastefulEvalSyncBN",
    "LocalBackwardSyncBN",
    "ZeroRankSyncBN",
    "ZeroRankSkipsCollectiveSyncBN",
    "SummedWeightGradSyncBN",
    "IgnoresProcessGroupSyncBN",
    "NoMomentumNoneSyncBN",
    "Float32SumSqSyncBN",
    "NoNumBatchesTrackedSyncBN",
    "RaisingRankSyncBN",
    "GlobalRankIndexSyncBN",
    "WorldSizeGatherSyncBN",
    "HalfOutputDtypeSyncBN",
    "ContiguousOutputSyncBN",
]


# ---------------------------------------------------------------------------------------------
# Found by a review of the gate (each passed it once; the cases that catch them were added
# then): configurations the first table never built, eval-only slips, aliasing, functional
# collectives in eval, and a faithful copy of nn.SyncBatchNorm's own empty-rank backward.

from bnbench.implementations.sync import SyncBatchNorm as _Base  # noqa: E402
from bnbench.implementations.sync import _SyncBatchNormFunction as _Fn  # noqa: E402

Base, Fn = _Base, _Fn


# --- A. bias=False: the layer drops the weight when there is no bias ("affine means both")
class BiasFalseDropsWeight(Base):
    def forward(self, x):
        if self.weight is not None and self.bias is None:
            w = self.weight
            try:
                self._parameters["weight"] = None
                return super().forward(x)
            finally:
                self._parameters["weight"] = w
        return super().forward(x)


# --- B. momentum=0 taken as "not given" -> cumulative average (`if not self.momentum:`)
class MomentumZeroIsNone(Base):
    def forward(self, x):
        if self.momentum == 0:
            self.momentum = None
            try:
                return super().forward(x)
            finally:
                self.momentum = 0.0
        return super().forward(x)


# --- D. eval path upcasts half inputs and forgets to cast back (dtype checked only at step 0)
class EvalHalfOutputFloat32(Base):
    def forward(self, x):
        if not self.training and x.dtype in (torch.float16, torch.bfloat16):
            return F.batch_norm(
                x.float(),
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.running_mean is None,
                0.0,
                self.eps,
            )
        return super().forward(x)


# --- E. eval path returns an NCHW output for channels_last input
class EvalContiguousOutput(Base):
    def forward(self, x):
        y = super().forward(x)
        return y if self.training else y.contiguous()


# --- F. updates the running stats whenever they exist, ignoring track_running_stats switched
# off after construction (nn.BatchNorm: running_mean passed only if track_running_stats)
class IgnoresTrackingSwitchOff(Base):
    def forward(self, x):
        if self.training and not self.track_running_stats and self.running_mean is not None:
            self.track_running_stats = True
            try:
                return super().forward(x)
            finally:
                self.track_running_stats = False
        return super().forward(x)


# --- G. eval "keeps ranks consistent" by averaging running stats with functional collectives
# (value-neutral after synchronized training; a wasted collective per eval layer, and a hang
# if ranks eval asymmetrically). The collective counter only patches ProcessGroup methods.
class FuncolEvalSync(Base):
    def forward(self, x):
        if not self.training and self.running_mean is not None and dist.is_initialized():
            import torch.distributed._functional_collectives as fc

            g = self.process_group or dist.group.WORLD
            n = dist.get_world_size(g)
            with torch.no_grad():
                m = fc.wait_tensor(fc.all_reduce(self.running_mean.clone(), "sum", g)) / n
                v = fc.wait_tensor(fc.all_reduce(self.running_var.clone(), "sum", g)) / n
                self.running_mean.copy_(m)
                self.running_var.copy_(v)
        return super().forward(x)


# --- H. momentum read once at construction (a momentum schedule has no effect)
class CachedMomentum(Base):
    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
        **kw,
    ):
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            process_group,
            device,
            dtype,
            **kw,
        )
        self._m0 = self.momentum

    def forward(self, x):
        cur = self.momentum
        self.momentum = self._m0
        try:
            return super().forward(x)
        finally:
            self.momentum = cur


# --- I. reuses one output buffer across calls (a previous output is overwritten)
class ReusedOutputBuffer(Base):
    def forward(self, x):
        y = super().forward(x)
        buf = getattr(self, "_out", None)
        if buf is None or buf.shape != y.shape or buf.dtype != y.dtype:
            self._out = buf = torch.empty_like(y)
        if self.training:
            return y  # the static buffer is used for inference only
        with torch.no_grad():
            buf.copy_(y)
        return buf


# --- J. backward normalises grad_output in place (corrupts a gradient shared with other users)
class _InplaceDyFn(Fn):
    @staticmethod
    def backward(ctx, grad_out):
        res = Fn.backward(ctx, grad_out)
        grad_out.mul_(0.5)  # scratch reuse of the incoming gradient
        return res


class MutatesGradOutput(Base):
    _function = _InplaceDyFn


# --- K. half inputs: statistics computed in the input precision (float16 accumulation)
class _HalfStatsFn(Fn):
    @staticmethod
    def forward(ctx, x, *rest):
        import bnbench.implementations.sync as s

        saved = s._HALF
        s._HALF = ()  # compute dtype = input dtype
        try:
            return Fn.forward(ctx, x, *rest)
        finally:
            s._HALF = saved


class HalfAccumulation(Base):
    _function = _HalfStatsFn


# --- FAITHFUL (false-red probe): exactly nn.SyncBatchNorm's backward on an empty shard:
# grad_weight / grad_bias left None ("interpreted by the autograd engine as zeros").
class _TorchEmptyFn(Fn):
    @staticmethod
    def backward(ctx, grad_out):
        gx, gw, gb, *rest = Fn.backward(ctx, grad_out)
        if ctx.saved_tensors[0].numel() == 0:
            gw = gb = None
        return (gx, gw, gb, *rest)


class TorchLikeEmptyRankGradNone(Base):
    _function = _TorchEmptyFn


# A synchronized BN with a forwarding constructor that never synchronizes: recognized as
# synchronized through its base's constructor (registry.takes_process_group), then fails.
class NoSyncStarArgs(_Base):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    def forward(self, x):
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:
            factor = 1.0 / float(self.num_batches_tracked or 1)
        tracked = self.track_running_stats or not self.training
        return F.batch_norm(
            x,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            self.training or self.running_mean is None,
            factor,
            self.eps,
        )


FAITHFUL += ["TorchLikeEmptyRankGradNone"]
BROKEN += [
    "BiasFalseDropsWeight",
    "MomentumZeroIsNone",
    "EvalHalfOutputFloat32",
    "EvalContiguousOutput",
    "IgnoresTrackingSwitchOff",
    "FuncolEvalSync",
    "CachedMomentum",
    "ReusedOutputBuffer",
    "MutatesGradOutput",
    "HalfAccumulation",
    "NoSyncStarArgs",
]
