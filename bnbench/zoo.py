"""The seeds' networks, on real data that ships inside a package (scikit-learn's 8x8 handwritten
digits: nothing is downloaded), and a seeded trainer that records what the model gate compares.

Networks (input sizes adapted to 8x8 digits; LeNet gets the digits upsampled to 28x28):
  conv_bn        Conv-BN-ReLU classifier (seed 000)
  mlp_bn         MLP with BatchNorm1d (seed 002)
  fc_bn_fc       fc -> BatchNorm1d -> fc (seed 003)
  lenet_bn       LeNet with nn.BatchNorm (seed 004, nn version)
  lenet_bn_scratch  LeNet with the book's from-scratch BatchNorm (seed 004, scratch version)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn


@cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1437 / 360 images of 1x8x8 in [0, 1], fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return x[:split], y[:split], x[split:], y[split:]


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer2 = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.fully_connected = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.fully_connected(self.layer2(self.layer1(x)).flatten(1))


def mlp_bn() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def fc_bn_fc() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 10)
    )


def _lenet(bn2d, bn1d) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5),
        bn2d(6),
        nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5),
        bn2d(16),
        nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120),
        bn1d(120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        bn1d(84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def lenet_bn() -> nn.Module:
    return _lenet(nn.BatchNorm2d, nn.BatchNorm1d)


def lenet_bn_scratch() -> nn.Module:
    from bnbench.implementations.d2l import BatchNorm

    return _lenet(lambda c: BatchNorm(c, num_dims=4), lambda c: BatchNorm(c, num_dims=2))


MODELS = {
    "conv_bn": ConvBN,
    "mlp_bn": mlp_bn,
    "fc_bn_fc": fc_bn_fc,
    "lenet_bn": lenet_bn,
    "lenet_bn_scratch": lenet_bn_scratch,
}
UPSAMPLED = {"lenet_bn", "lenet_bn_scratch"}  # LeNet's 5x5 convolutions need 28x28 inputs


def build(name: str, seed: int, dtype=torch.float32, device="cpu") -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(device=device, dtype=dtype)


def prepare(name: str, x: torch.Tensor) -> torch.Tensor:
    return (
        F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        if name in UPSAMPLED
        else x
    )


@dataclass
class Trajectory:
    losses: list[float]
    parameters: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    eval_output: torch.Tensor
    test_accuracy: float


def train(
    model: nn.Module,
    name: str,
    steps: int = 10,
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
    dtype=torch.float32,
    device="cpu",
) -> Trajectory:
    """Seeded SGD on digits; the batches depend only on ``seed``."""
    x_train, y_train, x_test, y_test = digits()
    x_train, x_test = prepare(name, x_train), prepare(name, x_test)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(y_train), (batch_size,), generator=order)
        xb = x_train[index].to(device=device, dtype=dtype)
        loss = F.cross_entropy(model(xb), y_train[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        logits = model(x_test.to(device=device, dtype=dtype))
    accuracy = float((logits.argmax(1).cpu() == y_test).double().mean())
    return Trajectory(
        losses,
        {k: v.detach().clone() for k, v in model.named_parameters()},
        {k: v.detach().clone() for k, v in model.named_buffers()},
        logits.cpu(),
        accuracy,
    )
