"""bnbench: verify and benchmark BatchNorm implementations against torch.nn.BatchNorm."""

from bnbench.registry import (
    Config,
    Implementation,
    UsageError,
    from_classes,
    from_module_class,
    resolve,
)
from bnbench.swap import SwapError, swap, swap_back

__all__ = [
    "Config",
    "Implementation",
    "SwapError",
    "UsageError",
    "from_classes",
    "from_module_class",
    "resolve",
    "swap",
    "swap_back",
]
__version__ = "0.1.0"
