"""The oracle: an independent float64 BatchNorm written from nn.BatchNorm's documented formulas.

It uses no torch normalization op (nn.BatchNorm and F.batch_norm are under test like everything
else): only sums and elementwise arithmetic, differentiated by autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANK_NAMES = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}
EXPECTED_RANKS = {2: "2D or 3D", 3: "2D or 3D", 4: "4D", 5: "5D"}


def one_value_per_channel_message(size: torch.Size) -> str:
    return f"Expected more than 1 value per channel when training, got input size {size}"


def wrong_rank_message(module_rank: int, input_rank: int) -> str:
    return f"expected {EXPECTED_RANKS[module_rank]} input (got {input_rank}D input)"


def eps_message(eps: float) -> str:
    return f"batch_norm eps must be positive during training, but got {eps}"


@dataclass
class ReferenceBatchNorm:
    """float64 model of nn.BatchNorm's forward and state, one step at a time."""

    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    bias_term: bool = True  # False: torch 2.13's bias=False (a weight, no bias)

    def __post_init__(self):
        c = self.num_features
        f64 = torch.float64
        self.weight = torch.ones(c, dtype=f64) if self.affine else None
        self.bias = torch.zeros(c, dtype=f64) if self.affine and self.bias_term else None
        if self.track_running_stats:
            self.running_mean = torch.zeros(c, dtype=f64)
            self.running_var = torch.ones(c, dtype=f64)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None

    def forward(self, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, dict]:
        """y for a float64 input (which may require grad), updating the running statistics.

        Returns y and what was used: ``{"batch_stats": bool}``. Raises the errors nn.BatchNorm
        raises, with its messages.
        """
        assert x.dtype == torch.float64
        if training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked += 1
        use_batch_stats = training or (self.running_mean is None and self.running_var is None)
        if use_batch_stats:
            n_per_channel = x.shape[0]
            for size in x.shape[2:]:
                n_per_channel *= size
            if n_per_channel == 1:
                raise ValueError(one_value_per_channel_message(x.size()))
        if use_batch_stats and self.eps <= 0:
            raise ValueError(eps_message(self.eps))

        c = x.shape[1]
        view = (1, c) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // c if c else 0
        if use_batch_stats:
            if n == 0:
                y = x * 0.0
            else:
                mean = x.sum(dim=dims) / n
                centered = x - mean.view(view)
                var = (centered * centered).sum(dim=dims) / n  # biased: used to normalize
                y = centered / torch.sqrt(var.view(view) + self.eps)
                # running buffers set to None on a tracking module: nothing to update
                if training and self.track_running_stats and self.running_mean is not None:
                    self._update(mean.detach(), var.detach(), n)
        else:
            std = torch.sqrt(self.running_var.view(view) + self.eps)
            y = (x - self.running_mean.view(view)) / std
        if self.weight is not None:
            y = y * self.weight.view(view)
        if self.bias is not None:
            y = y + self.bias.view(view)
        return y, {"batch_stats": use_batch_stats}

    def _update(self, mean: torch.Tensor, biased_var: torch.Tensor, n: int) -> None:
        if self.momentum is None:
            # the cumulative average; with no counter, nn's factor is 0.0 (nothing moves)
            factor = 0.0 if self.num_batches_tracked is None else 1.0 / self.num_batches_tracked
        else:
            factor = self.momentum
        unbiased = biased_var * n / (n - 1)  # n > 1: training with one value raised earlier
        self.running_mean = (1 - factor) * self.running_mean + factor * mean
        self.running_var = (1 - factor) * self.running_var + factor * unbiased

    def stop_tracking(self) -> None:
        """Like setting ``module.track_running_stats = False`` after construction."""
        self.track_running_stats = False
