"""bnbench: verify and benchmark BatchNorm implementations against torch.nn.BatchNorm."""

from bnbench.registry import (
    Implementation,
    UsageError,
    from_classes,
    from_module_class,
    resolve,
)

__all__ = ["Implementation", "UsageError", "from_classes", "from_module_class", "resolve"]
__version__ = "0.1.0"
