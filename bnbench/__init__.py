"""bnbench: verify and benchmark BatchNorm implementations against torch.nn.BatchNorm.

``bnbench.verify(...)`` and ``bnbench.benchmark(...)`` do what the command line does and return
result objects (``.to_frame()`` gives a pandas DataFrame): see bnbench.api.
"""

from bnbench.api import BenchResult, VerifyResult, bench, verify
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
    "BenchResult",
    "Config",
    "Implementation",
    "SwapError",
    "UsageError",
    "VerifyResult",
    "bench",
    "from_classes",
    "from_module_class",
    "resolve",
    "swap",
    "swap_back",
    "verify",
]
__version__ = "0.1.0"
