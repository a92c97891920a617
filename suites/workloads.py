"""Workloads of known relative cost, to test the timer itself."""

from torch import nn

from bnbench.registry import from_classes


class TwiceBatchNorm2d(nn.BatchNorm2d):
    """Does nn.BatchNorm2d's forward work twice: its forward must time at 2x builtin's."""

    def forward(self, x):
        super().forward(x)
        return super().forward(x)


twice = from_classes("twice", {4: TwiceBatchNorm2d})
