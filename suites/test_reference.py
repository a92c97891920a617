"""The oracle against hand-computed values: if it were wrong, every verdict would be."""

import math

import pytest
import torch

from bnbench.reference import ReferenceBatchNorm


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_training_output_uses_biased_variance():
    ref = ReferenceBatchNorm(1, eps=0.0 + 1e-5)
    y, info = ref.forward(f64([[1.0], [3.0]]), training=True)
    # mean 2, biased var 1
    expected = 1 / math.sqrt(1 + 1e-5)
    assert info["batch_stats"]
    assert torch.allclose(y, f64([[-expected], [expected]]), rtol=0, atol=1e-15)


def test_running_var_update_is_unbiased_and_momentum_weighted():
    ref = ReferenceBatchNorm(1, momentum=0.1)
    ref.forward(f64([[1.0], [3.0]]), training=True)
    # unbiased var of {1, 3} is 2: 0.9 * 1 + 0.1 * 2 = 1.1; mean: 0.9 * 0 + 0.1 * 2 = 0.2
    assert ref.running_var.item() == pytest.approx(1.1, abs=1e-15)
    assert ref.running_mean.item() == pytest.approx(0.2, abs=1e-15)
    assert ref.num_batches_tracked == 1


def test_momentum_none_is_a_cumulative_average():
    ref = ReferenceBatchNorm(1, momentum=None)
    for batch in ([[0.0], [2.0]], [[4.0], [6.0]], [[8.0], [10.0]]):
        ref.forward(f64(batch), training=True)
    assert ref.running_mean.item() == pytest.approx((1 + 5 + 9) / 3)
    assert ref.running_var.item() == pytest.approx(2.0)  # each batch: unbiased var 2
    assert ref.num_batches_tracked == 3


def test_spatial_dims_are_reduced_with_the_batch():
    ref = ReferenceBatchNorm(2, momentum=1.0)
    x = f64([[[1.0, 2.0], [10.0, 10.0]], [[3.0, 4.0], [10.0, 14.0]]])  # (N=2, C=2, L=2)
    ref.forward(x, training=True)
    assert ref.running_mean.tolist() == pytest.approx([2.5, 11.0])
    assert ref.running_var.tolist() == pytest.approx([5 / 3, 12 / 3])


def test_eval_uses_running_statistics_and_affine():
    ref = ReferenceBatchNorm(1, eps=0.0)
    ref.running_mean, ref.running_var = f64([1.0]), f64([4.0])
    ref.weight, ref.bias = f64([3.0]), f64([0.5])
    y, info = ref.forward(f64([[5.0]]), training=False)
    assert not info["batch_stats"]
    assert y.item() == pytest.approx((5 - 1) / 2 * 3 + 0.5)
    assert ref.num_batches_tracked == 0


def test_no_running_stats_means_batch_statistics_in_eval():
    ref = ReferenceBatchNorm(1, track_running_stats=False)
    y, info = ref.forward(f64([[1.0], [3.0]]), training=False)
    assert info["batch_stats"] and ref.running_mean is None
    assert y[1].item() == pytest.approx(1 / math.sqrt(1 + 1e-5))


def test_stopped_tracking_trains_without_updates_and_evaluates_with_buffers():
    ref = ReferenceBatchNorm(1)
    ref.stop_tracking()
    ref.forward(f64([[1.0], [3.0]]), training=True)
    assert ref.running_mean.item() == 0 and ref.running_var.item() == 1
    assert ref.num_batches_tracked == 0
    assert not ref.forward(f64([[1.0]]), training=False)[1]["batch_stats"]


def test_zero_batch_counts_but_keeps_statistics():
    ref = ReferenceBatchNorm(3)
    y, _ = ref.forward(torch.zeros(0, 3, 2, dtype=torch.float64), training=True)
    assert y.shape == (0, 3, 2)
    assert ref.num_batches_tracked == 1
    assert ref.running_mean.tolist() == [0, 0, 0] and ref.running_var.tolist() == [1, 1, 1]


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1)])
def test_one_value_per_channel_raises_the_exact_message(shape):
    ref = ReferenceBatchNorm(4)
    with pytest.raises(ValueError) as info:
        ref.forward(torch.zeros(shape, dtype=torch.float64), training=True)
    assert str(info.value) == (
        "Expected more than 1 value per channel when training, got input "
        f"size torch.Size({list(shape)})"
    )


def test_gradients_follow_the_closed_form():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ref = ReferenceBatchNorm(3, eps=1e-3)
    ref.weight = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    ref.bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    y, _ = ref.forward(x, training=True)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [x], g)
    n = 5
    mean, var = x.mean(0), x.var(0, unbiased=False)
    invstd = 1 / torch.sqrt(var + 1e-3)
    xhat = (x - mean) * invstd
    expected = ref.weight * invstd / n * (n * g - g.sum(0) - xhat * (g * xhat).sum(0))
    assert torch.allclose(dx, expected.detach(), atol=1e-12)
