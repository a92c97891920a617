"""The CI gate under pytest: every registered implementation x device x case.

Not supported -> skipped with the reason; declared deviation -> xfail with the reason; a
declared deviation that passes -> failure (strict), like the `bnbench verify` matrix.
"""

import pytest
import torch

from bnbench.checks import run_case
from bnbench.gate import V_DEVIATION, V_FAIL, V_UNEXPECTED_PASS, V_UNSUPPORTED, verdict


def test_gate(gate_item):
    impl, device, case = gate_item
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    v, message = verdict(impl, case, run_case(impl, case, device))
    if v == V_UNSUPPORTED:
        pytest.skip(f"{impl.name}: {message}")
    if v == V_DEVIATION:
        pytest.xfail(f"{impl.name}: declared deviation: {message.splitlines()[0]}")
    if v in (V_FAIL, V_UNEXPECTED_PASS):
        pytest.fail(f"{impl.name} on {device}, {case.id} ({case.description}):\n{message}",
                    pytrace=False)
