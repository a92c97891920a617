"""The CI gate under pytest: every registered implementation x device x case, through bnbench's
pytest plugin (the same route a user's project takes).

Not supported -> skipped with the reason; declared deviation -> xfail with the reason; a
declared deviation that passes -> failure, like the `bnbench verify` matrix.
`pytest --bnbench-impl mymodule:MyBN suites/test_gate.py` gates one implementation.
"""

from bnbench.pytest_plugin import check_gate_case


def test_gate(bnbench_gate_case):
    check_gate_case(bnbench_gate_case)
