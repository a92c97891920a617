"""compiled's fast path: a training step is one compiled call forward and one backward, with the
running statistics updated in place inside the forward graph; anything unusual falls back to the
vectorized forward. The gate vouches for the numbers; these tests pin the route the calls take,
which the gate cannot see. Most run the graphs' Python functions uncompiled (the route is the
same, and compiling costs seconds a graph on CPU); one compiles for real and counts graphs."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from bnbench.implementations import compiled as cm


@pytest.fixture
def calls(monkeypatch):
    """Counts of calls into each compiled entry point, each running its uncompiled function."""
    counts: collections.Counter[str] = collections.Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        cm,
        "compiled_train",
        lambda: (
            counted("train_step", cm.train_step),
            counted("train_backward", cm.train_backward),
        ),
    )
    monkeypatch.setattr(cm, "compiled_eval", lambda: counted("eval", cm._eval_kernel))
    monkeypatch.setattr(
        cm,
        "compiled_kernels",
        lambda: (counted("kernel_train", cm.train_kernel), counted("kernel_eval", cm.eval_kernel)),
    )
    return counts


def pair(rank_class, reference_class, channels, **kwargs):
    torch.manual_seed(0)
    ours, ref = rank_class(channels, **kwargs), reference_class(channels, **kwargs)
    with torch.no_grad():
        for module in (ours, ref):
            if module.weight is not None:
                module.weight.copy_(torch.linspace(0.5, 1.5, channels))
                module.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return ours, ref


def assert_same_state(ours, ref):
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, msg=name)


LAYOUTS = [
    ("2d", cm.CompiledBatchNorm1d, nn.BatchNorm1d, (16, 5), torch.contiguous_format),
    ("3d", cm.CompiledBatchNorm1d, nn.BatchNorm1d, (4, 5, 7), torch.contiguous_format),
    ("4d", cm.CompiledBatchNorm2d, nn.BatchNorm2d, (4, 5, 3, 6), torch.contiguous_format),
    ("4d-cl", cm.CompiledBatchNorm2d, nn.BatchNorm2d, (4, 5, 3, 6), torch.channels_last),
    ("5d-cl", cm.CompiledBatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 2, 4), torch.channels_last_3d),
]


@pytest.mark.parametrize("name,cls,ref_cls,shape,fmt", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_training_step_is_one_call_each_way(calls, name, cls, ref_cls, shape, fmt):
    ours, ref = pair(cls, ref_cls, shape[1], momentum=None)
    buffers = {name: buf for name, buf in ours.named_buffers()}
    x = torch.randn(shape, dtype=torch.float64).float().contiguous(memory_format=fmt)
    grad = torch.randn(shape).contiguous(memory_format=fmt)
    for _ in range(2):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        y, y_ref = ours(xs[0]), ref(xs[1])
        torch.testing.assert_close(y, y_ref)
        # nn.BatchNorm's output keeps the input's memory format.
        assert y.is_contiguous(memory_format=fmt) == y_ref.is_contiguous(memory_format=fmt)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
        assert_same_state(ours, ref)
    assert calls == {"train_step": 2, "train_backward": 2}
    # Buffers are updated in place: the tensors the module started with are its buffers still.
    assert all(buf is buffers[name] for name, buf in ours.named_buffers())


def test_no_grad_training_and_eval_take_one_call(calls):
    ours, ref = pair(cm.CompiledBatchNorm2d, nn.BatchNorm2d, 3)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x), ref(x))  # grad mode on, nothing requires grad
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert_same_state(ours, ref)
    assert calls == {"train_step": 2, "eval": 1}


def test_eval_under_autograd_takes_the_vectorized_forward(calls):
    ours, ref = pair(cm.CompiledBatchNorm2d, nn.BatchNorm2d, 3)
    ours.eval(), ref.eval()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    ours(x).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    ref(ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert calls == {"kernel_eval": 1}


@pytest.mark.parametrize(
    "change",
    [
        "weight_shape",
        "running_var_shape",
        "momentum_tensor",
        "eps_zero",
        "one_value_per_channel",
        "wrong_rank",
    ],
)
def test_unusual_state_falls_back_and_fails_like_nn(calls, change):
    """Whatever nn.BatchNorm raises on, compiled raises on the same way (through the vectorized
    forward), with no compiled training step run."""
    ours, ref = pair(cm.CompiledBatchNorm2d, nn.BatchNorm2d, 3)
    x = torch.randn(4, 3, 2, 2)
    for module in (ours, ref):
        if change == "weight_shape":
            module.weight = nn.Parameter(torch.ones(4))
        elif change == "running_var_shape":
            module.running_var = torch.ones(4)
        elif change == "momentum_tensor":
            module.momentum = torch.tensor(0.5)
        elif change == "eps_zero":
            module.eps = 0.0
    if change == "one_value_per_channel":
        x = torch.randn(1, 3, 1, 1)
    elif change == "wrong_rank":
        x = torch.randn(4, 3, 2)
    outcomes = []
    for module in (ours, ref):
        try:
            outcomes.append(("ok", module(x.clone())))
        except Exception as error:  # noqa: BLE001 - compared with nn's
            outcomes.append((type(error).__name__, None))
    assert outcomes[0][0] == outcomes[1][0]
    if outcomes[0][0] == "ok":
        torch.testing.assert_close(outcomes[0][1], outcomes[1][1])
        assert_same_state(ours, ref)
    assert calls["train_step"] == 0


def test_no_running_statistics_counts_batches_in_the_one_call(calls):
    ours, ref = pair(cm.CompiledBatchNorm2d, nn.BatchNorm2d, 3)
    for module in (ours, ref):
        module.running_mean = module.running_var = None
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert calls == {"train_step": 1}


def test_parametrized_weight_is_read_through_its_parametrization(calls):
    """A weight behind torch.nn.utils.parametrize is no entry of _parameters: it is read the
    ordinary way, so the parametrization applies and gradients reach the original."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    ours, ref = pair(cm.CompiledBatchNorm2d, nn.BatchNorm2d, 3)
    for module in (ours, ref):
        parametrize.register_parametrization(module, "weight", Double())
    x = torch.randn(4, 3, 2, 2)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(
        ours.parametrizations.weight.original.grad, ref.parametrizations.weight.original.grad
    )
    assert calls["train_step"] == 1


def test_in_place_change_of_the_input_fails_backward(calls):
    ours = cm.CompiledBatchNorm2d(3).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    leaf = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    inp = leaf * 1.0
    y = ours(inp)
    inp.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_in_training_matches_nn(calls):
    ours, ref = pair(cm.CompiledBatchNorm2d, nn.BatchNorm2d, 3)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    ours.double(), ref.double()
    grads = []
    for module in (ours, ref):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(module(leaf).square().sum(), leaf, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), leaf)
        grads.append(gg)
    torch.testing.assert_close(grads[0], grads[1])


def test_new_batch_sizes_reuse_the_compiled_graphs():
    """For real: after the first sizes compile, other batch, spatial and channel sizes and the
    other layouts' canonical views compile nothing (dynamic shapes, detached weight)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)

    def step(channels, shape, fmt=torch.contiguous_format):
        module = cm.CompiledBatchNorm2d(channels)
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        module(x).sum().backward()

    step(3, (4, 3, 5, 5))
    step(6, (5, 6, 3, 4))
    before = counters["stats"]["unique_graphs"]
    step(5, (7, 5, 6, 2))
    step(7, (3, 7, 4, 4))
    assert counters["stats"]["unique_graphs"] == before


def test_a_model_compiled_whole_traces_the_vectorized_forward():
    """torch.compile of a model holding compiled BatchNorm layers: dynamo traces the layer's
    forward into the model's graph (it cannot trace the one-call route's autograd.Function),
    with the same numbers and the running statistics updated."""
    torch.manual_seed(0)
    ours, ref = pair(cm.CompiledBatchNorm2d, nn.BatchNorm2d, 3)
    model = torch.compile(nn.Sequential(ours, nn.ReLU()))
    x = torch.randn(4, 3, 5, 5)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, y_ref = model(xs[0]), nn.Sequential(ref, nn.ReLU())(xs[1])
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert_same_state(ours, ref)
