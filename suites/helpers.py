"""Helpers the suites share: the CLI in a subprocess or in this process, and the gate run in
this process over every case."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SUITES = Path(__file__).parent


def bnbench(*args, cwd=None, pythonpath=(), timeout=600):
    """``bnbench ARGS`` in a fresh interpreter that can import the suites' modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(p) for p in pythonpath] + [str(SUITES)] + [env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-m", "bnbench.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def in_process(*args):
    """The CLI in this process (no interpreter start-up): for commands that spawn no workers.
    Returns what ``bnbench`` returns: returncode, stdout, stderr."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from bnbench.cli import main

    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def gate_failures(impl, cases=None, device="cpu") -> dict[str, str]:
    """{case id: message} for every case with an unexpected verdict, run in this process."""
    from bnbench.cases import all_cases
    from bnbench.checks import run_case
    from bnbench.gate import verdict
    from bnbench.results import BAD_VERDICTS

    failures = {}
    for case in cases or all_cases():
        v, message = verdict(impl, case, run_case(impl, case, device))
        if v in BAD_VERDICTS:
            failures[case.id] = message
    return failures
