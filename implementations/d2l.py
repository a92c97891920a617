"""The from-scratch BatchNorm of Dive into Deep Learning (chapter "Batch Normalization"), as the
book writes it.

The book's ``batch_norm`` and ``BatchNorm`` are copied verbatim below (comments included). An
adapter gives the class nn.BatchNorm's constructor; it changes nothing in the computation. The
gate then shows, case by case, where the textbook code departs from nn.BatchNorm: each departure
is a declared deviation with its reason, and each missing feature is "not supported".
"""

from __future__ import annotations

import torch
from torch import nn

from bnbench.registry import Implementation


# fmt: off
# ---- verbatim from the book -------------------------------------------------------------------
def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    # Use is_grad_enabled to determine whether we are in training mode
    if not torch.is_grad_enabled():
        # In prediction mode, use mean and variance obtained by moving average
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        assert len(X.shape) in (2, 4)
        if len(X.shape) == 2:
            # When using a fully connected layer, calculate the mean and
            # variance on the feature dimension
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            # When using a two-dimensional convolutional layer, calculate the
            # mean and variance on the channel dimension (axis=1). Here we
            # need to maintain the shape of X, so that the broadcasting
            # operation can be carried out later
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        # In training mode, the current mean and variance are used
        X_hat = (X - mean) / torch.sqrt(var + eps)
        # Update the mean and variance using moving average
        moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
        moving_var = (1.0 - momentum) * moving_var + momentum * var
    Y = gamma * X_hat + beta  # Scale and shift
    return Y, moving_mean.data, moving_var.data


class BatchNorm(nn.Module):
    # num_features: the number of outputs for a fully connected layer or the
    # number of output channels for a convolutional layer. num_dims: 2 for a
    # fully connected layer and 4 for a convolutional layer
    def __init__(self, num_features, num_dims):
        super().__init__()
        if num_dims == 2:
            shape = (1, num_features)
        else:
            shape = (1, num_features, 1, 1)
        # The scale parameter and the shift parameter (model parameters) are
        # initialized to 1 and 0, respectively
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        # The variables that are not model parameters are initialized to 0 and
        # 1
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, X):
        # If X is not on the main memory, copy moving_mean and moving_var to
        # the device where X is located
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        # Save the updated moving_mean and moving_var
        Y, self.moving_mean, self.moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean,
            self.moving_var, eps=1e-5, momentum=0.1)
        return Y
# fmt: on
# ---- end of the book's code -------------------------------------------------------------------


class D2LBatchNorm(BatchNorm):
    """The book's BatchNorm behind nn.BatchNorm's constructor (num_dims from the input rank).

    eps and momentum are fixed in the book's code (1e-5, 0.1); other values are not supported.
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
        *,
        num_dims,
    ):
        super().__init__(num_features, num_dims)
        if device is not None:
            self.to(device)


def _factory(rank, num_features, **kwargs):
    return D2LBatchNorm(num_features, num_dims=rank, **kwargs)


def _state(module):
    # The book's names and (1, C[, 1, 1]) shapes; the harness flattens them to compare values.
    return {
        "weight": module.gamma,
        "bias": module.beta,
        "running_mean": module.moving_mean,
        "running_var": module.moving_var,
        "num_batches_tracked": None,
    }


def _fixed_hyperparameters(config):
    if config.eps != 1e-5:
        return f"eps is fixed at 1e-5 in the book's code (asked for {config.eps})"
    if config.momentum is not None and config.momentum != 0.1:
        return f"momentum is fixed at 0.1 in the book's code (asked for {config.momentum})"
    return None


# The book's departures from nn.BatchNorm, each with the cases that show it.
BIASED = (
    "moving variance updated with the biased batch variance (nn.BatchNorm: unbiased), "
    "and no num_batches_tracked counter"
)
GRAD_MODE = (
    "mode from torch.is_grad_enabled(), not module.training: eval with grad enabled "
    "normalizes with batch statistics and updates the moving averages; training under "
    "no_grad uses the moving averages"
)
ZERO_BATCH = "a zero-size batch turns the moving averages into NaN (mean of an empty batch)"
PLAIN_TENSORS = (
    "gamma/beta of shape (1, C[, 1, 1]) instead of weight/bias of shape (C,); the "
    "moving averages are plain tensors, not buffers (absent from state_dict); no "
    "reset_running_stats / reset_parameters"
)
NO_CHECKS = (
    "no input validation: the book asserts the rank in grad mode only and raises no "
    "ValueError for one value per channel"
)
DEVIATIONS = {
    "default-*": BIASED,
    "default_constructor-*": BIASED,
    "non_contiguous-*": BIASED,
    "constant_channel-*": BIASED,
    "channels_last-*": BIASED,
    "batch_one_spatial-*": BIASED,
    "inference_cache-*": BIASED,
    "eval_fresh_module-*": BIASED,
    "eval_first-*": GRAD_MODE,
    "forward_ad-*": GRAD_MODE,
    "eval_batch_one-*": GRAD_MODE,
    "mode_from_training_flag-*": GRAD_MODE,
    "zero_batch-*": ZERO_BATCH,
    "defaults-*": PLAIN_TENSORS,
    "reset-*": PLAIN_TENSORS,
    "state_dict-*": PLAIN_TENSORS,
    # Sizes, numerics, lifecycle and autograd cases all train, so the moving variance shows it.
    "size_*": BIASED,
    "batch_65_*": BIASED,
    "batch_129_*": BIASED,
    "large_offset-*": BIASED,
    "variance_*_eps-*": BIASED,
    "momentum_assigned-*": BIASED,
    "eps_assigned-*": BIASED,
    "training_assigned-*": BIASED,
    "tracking_toggled-*": BIASED,
    "load_between_calls-*": BIASED,
    "reset_between_calls-*": BIASED,
    "weight_updated_in_place-*": BIASED,
    "varying_batch-*": BIASED,
    "buffers_set_to_none-*": BIASED,
    "counter_set_to_none-*": BIASED,
    "grad_params_only-*": BIASED,
    "frozen_affine-*": BIASED,
    "grad_output_*": BIASED,
    "legacy_state_dict-*": PLAIN_TENSORS,
    "module_dtype-*": PLAIN_TENSORS,
    "explore-*": PLAIN_TENSORS,
    "one_value_per_channel-*": NO_CHECKS,
    "wrong_rank-*": NO_CHECKS,
}

d2l = Implementation(
    name="d2l",
    factory=_factory,
    description="Dive into Deep Learning's from-scratch BatchNorm, verbatim",
    supports_ranks=frozenset({2, 4}),
    supports_dtypes=frozenset({torch.float32}),
    supports_momentum_none=False,
    supports_affine_false=False,
    supports_bias_false=False,
    supports_no_running_stats=False,
    state=_state,
    extra_unsupported=_fixed_hyperparameters,
    deviations=DEVIATIONS,
)
