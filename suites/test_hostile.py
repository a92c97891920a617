"""Hostile implementations against the worker boundary and the outputs: an implementation that
exits, crashes or hangs while being imported, writes junk, a pickle or half a line to the
result pipe, forks, starts processes that outlive it, or is interrupted mid-case costs its own
rows, never the run and never a green exit; outputs that cannot be written are refused before
any work; an output directory has one writer at a time; a worker's numbers are validated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from bnbench import benchmark as bench
from bnbench import gate, isolation
from bnbench.benchmark import SMOKE, Row, bench_row, validate_result
from bnbench.registry import Implementation
from bnbench.results import OutputInUse, output_lock, write_all_atomic

from helpers import SUITES, bnbench, in_process

# Each class misbehaves only on float64 inputs, so default-rank2 (float32) shows that the rest
# of its cases still ran after the fault.
HOSTILE = textwrap.dedent("""
    import os, pickle, subprocess, sys, time
    import torch
    from catalogue import PlainBatchNorm

    MARK = os.environ["HOSTILE_MARK"]

    def pipe():
        return int(os.environ["BNBENCH_RESULT_FD"])

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {MARK}-pwned",))

    def misbehaves(x):
        return x.dtype == torch.float64

    class Junk(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):
                os.write(pipe(), b"\\x00\\xff not json at all\\n")
            return super().forward(x)

    class Pickles(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):
                os.write(pipe(), pickle.dumps(Evil()) + b"\\n")
            return super().forward(x)

    class Stalls(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):
                os.write(pipe(), b'{"done": "float64-rank2", "result": {"sta')
                time.sleep(3600)
            return super().forward(x)

    class Forges(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):  # a pass for a case it was not asked, then one for its own
                os.write(pipe(), b'{"done": "other", "result": {}}\\n')
            return super().forward(x)

    class Forks(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x) and os.fork() == 0:
                time.sleep(3600)  # the copy would otherwise run the worker's loop on
            return super().forward(x)

    class Spawns(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", MARK])
            return super().forward(x)

    class Escapes(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):  # a session of its own: out of the worker's process group
                subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(3600)", MARK],
                    start_new_session=True,
                )
            return super().forward(x)

    class Nests(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):  # valid-looking JSON nested past the parser's recursion limit
                os.write(pipe(), b'{"a":' * 100000 + b"1" + b"}" * 100000 + b"\\n")
            return super().forward(x)

    class Vanishes(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):  # no token, no group, nobody's child: only the subreaper sees it
                code = "import os, time; os.setsid(); os.fork() and os._exit(0); time.sleep(3600)"
                subprocess.run([sys.executable, "-c", code, MARK], env={})
            return super().forward(x)

    class Daemonizes(PlainBatchNorm):
        def forward(self, x):
            if misbehaves(x):  # a double fork: the survivor is nobody's child
                code = "import os, time; os.setsid(); os.fork() and os._exit(0); time.sleep(3600)"
                subprocess.run([sys.executable, "-c", code, MARK])
            return super().forward(x)
""")

IMPORT_EXITS = "import sys\nsys.exit(0)\n"
IMPORT_OS_EXITS = "import os\nos._exit(0)\n"
IMPORT_BLOCKS = "import time\nwhile True:\n    time.sleep(1)\n"
IMPORT_SEGFAULTS = "import ctypes\nctypes.string_at(0)\n"


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if mark in (p.info["cmdline"] or []):
            found.append(p)
    return found


def test_hostile_imports_and_workers_cost_their_rows_not_the_run(tmp_path):
    mark = f"hostile-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "hostile.py").write_text(HOSTILE)
    for name, text in [
        ("exits", IMPORT_EXITS),
        ("osexits", IMPORT_OS_EXITS),
        ("blocks", IMPORT_BLOCKS),
        ("segfaults", IMPORT_SEGFAULTS),
    ]:
        (tmp_path / f"{name}.py").write_text(text)
    at_import = ["exits:X", "osexits:X", "blocks:X", "segfaults:X"]
    in_cases = [f"hostile:{c}" for c in ("Junk", "Pickles", "Stalls", "Forges", "Forks")]
    in_cases += ["hostile:Spawns", "hostile:Escapes", "hostile:Daemonizes", "hostile:Nests"]
    in_cases += ["hostile:Vanishes"]
    args = ["verify", "--case", "default-rank2", "--case", "float64-rank2", "--timeout", "8"]
    for spec in at_import + in_cases:
        args += ["--impl", spec]
    os.environ["HOSTILE_MARK"] = mark
    try:
        result = bnbench(*args, "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    finally:
        del os.environ["HOSTILE_MARK"]
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out
    assert "FAILED" in out and "bnbench verify: implementation x check" in out  # the matrix
    results = {
        (r["implementation"], r["case"]): r
        for r in json.loads((tmp_path / "r.json").read_text())["results"]
    }
    for spec in at_import:
        for case in ("default-rank2", "float64-rank2"):
            r = results[(spec, case)]
            assert r["verdict"] == "fail" and "could not be loaded" in r["message"], r
    assert "exit code 0" in results[("exits:X", "default-rank2")]["message"]
    assert "exit code 0" in results[("osexits:X", "default-rank2")]["message"]
    assert "hung" in results[("blocks:X", "default-rank2")]["message"]
    assert "SIGSEGV" in results[("segfaults:X", "default-rank2")]["message"]
    expected = {
        "hostile:Junk": "broke the worker protocol",
        "hostile:Pickles": "broke the worker protocol",
        "hostile:Stalls": "hung",
        "hostile:Forges": "broke the worker protocol",
        "hostile:Nests": "broke the worker protocol",
        "hostile:Forks": "called os.fork()",
        "hostile:Spawns": "process(es) running after it returned",
        "hostile:Escapes": "process(es) running after it returned",
    }
    for spec, words in expected.items():
        r = results[(spec, "float64-rank2")]
        assert r["verdict"] == "fail" and words in r["message"], r
        assert results[(spec, "default-rank2")]["verdict"] == "pass", spec
    # The pickle was never unpickled, and nothing any of them started is still running.
    assert not Path(f"{mark}-pwned").exists() and not (tmp_path / f"{mark}-pwned").exists()
    assert _marked(mark) == []


def test_a_run_that_verified_nothing_does_not_exit_0(tmp_path):
    (tmp_path / "cudaonly.py").write_text(
        "from catalogue import PlainBatchNorm, implementation\n"
        "impl = implementation(PlainBatchNorm, supports_devices=frozenset({'cuda'}))\n"
    )
    result = bnbench(
        "verify", "--impl", "cudaonly:impl", "--device", "cpu", "--case", "default-rank2",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing was verified" in result.stdout


def _start_verify(tmp_path, *extra):
    (tmp_path / "hangs.py").write_text(
        "import time\nfrom catalogue import PlainBatchNorm\n"
        "class Hangs(PlainBatchNorm):\n"
        "    def forward(self, x):\n"
        "        if x.dtype.is_floating_point and x.dim() == 3:\n"
        "            open('spinning', 'w').close()\n"
        "            while True:\n"
        "                pass\n"
        "        return super().forward(x)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SUITES), *sys.path]))
    return subprocess.Popen(
        [sys.executable, "-m", "bnbench.cli", "verify", "--impl", "hangs:Hangs"]
        + ["--case", "default-rank2", "--case", "default-rank3", "--timeout", "600"]
        + ["--json", str(tmp_path / "r.json"), *extra],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_spinning_worker(process, tmp_path, timeout=120):
    """The worker (a child of ``process``) once the hung case has started spinning."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (tmp_path / "spinning").exists():
        time.sleep(0.2)
    for child in psutil.Process(process.pid).children(recursive=True):
        if "bnbench._worker" in child.cmdline():
            return child
    raise AssertionError("the worker never started spinning")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_verify_stops_at_once_kills_its_workers_and_writes_what_finished(
    tmp_path, signum, code
):
    process = _start_verify(tmp_path)
    worker = _wait_for_spinning_worker(process, tmp_path)
    sent = time.monotonic()
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10, output
    assert process.returncode == code, output
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["interrupted"] is True and data["ok"] is False
    finished = {r["case"]: r["verdict"] for r in data["results"]}
    assert finished == {"default-rank2": "pass"}  # the hung case had not finished
    assert "INTERRUPTED" in output


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    good = tmp_path / "good.xml"
    for bad in (str(tmp_path / "file" / "r.json"), "/proc/bnbench.json", str(tmp_path)):
        result = in_process("verify", "--impl", "builtin", "--json", bad, "--junit", str(good))
        assert result.returncode == 2, result.stdout + result.stderr
        assert bad in result.stderr  # named, before any case ran
        assert not good.exists()  # never one output written and the other not
    for bad in (str(tmp_path / "file" / "out"), "/proc/bnbench-out"):
        result = in_process("bench", "--impl", "builtin", "--smoke", "--output", bad)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "cannot write the output directory" in result.stderr and bad in result.stderr


def test_an_output_directory_has_one_writer(tmp_path):
    out = tmp_path / "b"
    with output_lock(out):
        result = bnbench("bench", "--impl", "builtin", "--smoke", "--output", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "another bnbench run is writing there" in result.stderr
    with output_lock(out), output_lock(out):  # re-entrant in one process
        pass
    child = subprocess.Popen(
        [sys.executable, "-c", f"from bnbench.results import output_lock\n"
         f"import time\nwith output_lock({str(out)!r}):\n    print('held', flush=True)\n"
         "    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUse):
            with output_lock(out):
                pass
    finally:
        child.kill()
        child.wait()
    with output_lock(out):  # released when its holder died
        pass


def test_duplicate_implementations_are_a_usage_error():
    result = in_process("verify", "--impl", "builtin", "--impl", "builtin")
    assert result.returncode == 2 and "given more than once" in result.stderr


def test_write_all_atomic_changes_all_files_or_none(tmp_path):
    first = tmp_path / "a.json"
    first.write_text("old")
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(OSError):
        write_all_atomic({first: "new", tmp_path / "not-a-dir" / "b.xml": "new"})
    assert first.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "not-a-dir"]  # no temp left
    write_all_atomic({first: "new", tmp_path / "b.xml": b"new"})
    assert first.read_text() == "new" and (tmp_path / "b.xml").read_bytes() == b"new"


# ---------------------------------------------------------------------------------------------
# A worker's numbers and a forward's result are checked before they are used


def _ok(**changes):
    result = {
        "status": "ok",
        "verified": "pass",
        "median_s": 1e-3,
        "p20_s": 0.9e-3,
        "p80_s": 1.1e-3,
        "iqr_s": 1e-4,
        "repetitions": 9,
        "samples": [1e-3] * 9,
    }
    result.update(changes)
    return result


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"median_s": 0.0}, "median_s"),
        ({"median_s": None}, "median_s"),
        ({"median_s": "fast"}, "median_s"),
        ({"p20_s": -1.0}, "p20_s"),
        ({"samples": [1e-3, 0.0]}, "samples"),
        ({"repetitions": 0}, "repetitions"),
        ({"status": "great"}, "status"),
        ({"verified": "trust me"}, "verified"),
        ({"exec": "os.system('x')"}, "exec"),
        ({"median_s": 5.0}, "median_s is not between"),
    ],
)
def test_a_worker_result_that_is_not_a_measurement_is_refused(changes, field):
    with pytest.raises(ValueError, match=field):
        validate_result(_ok(**changes))
    columns, samples = validate_result(_ok())
    assert columns["median_s"] == 1e-3 and len(samples) == 9


@pytest.mark.parametrize(
    "result",
    [
        {"status": "pass", "message": "", "seconds": 1.0, "extra": 1},
        {"status": "PASS!", "message": "", "seconds": 1.0},
        {"status": "pass", "message": "", "seconds": -1.0},
        {"status": "pass", "message": "", "seconds": "1"},
        {"status": "pass", "message": 3, "seconds": 1.0},
        {"status": "pass", "message": "but it failed", "seconds": 1.0},
    ],
)
def test_a_worker_outcome_that_is_not_an_outcome_fails_the_case(result):
    assert gate._invalid_outcome(dict(result)) is not None
    assert gate._invalid_outcome({"status": "pass", "message": "", "seconds": 1.0}) is None


ZERO_TIMER = textwrap.dedent("""
    import bnbench.timing
    from catalogue import PlainBatchNorm, implementation

    # A worker whose timer says the median call took no time (a class attribute, which the
    # worker's check for replaced functions does not look into).
    bnbench.timing.Samples.median = property(lambda self: 0.0)
    # (forward rows of (N, C) inputs only: a few rows are enough)
    impl = implementation(PlainBatchNorm, supports_ranks=frozenset({2}), supports_backward=False)
""")


def test_a_zero_median_from_a_worker_costs_its_row_not_the_sweep(tmp_path):
    (tmp_path / "zero.py").write_text(ZERO_TIMER)
    out = tmp_path / "b"
    result = bnbench(
        "bench", "--impl", "zero:impl", "--smoke", "--no-verify", "--output", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [r for r in (out / "results.csv").read_text().splitlines()[1:] if "not-supp" not in r]
    assert rows and all(",error," in row and "invalid result" in row for row in rows), rows[:2]


class _Returns(torch.nn.Module):
    def __init__(self, what):
        super().__init__()
        self.what = what
        self.weight = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.what(x * self.weight[0])


@pytest.mark.parametrize(
    "what, words",
    [
        (lambda y: None, "returned NoneType"),
        (lambda y: (y,), "returned tuple"),
        (lambda y: y.detach().numpy(), "returned ndarray"),
        (lambda y: y[:1], "of shape (1, 4)"),
        (lambda y: y.double(), "torch.float64 tensor"),
    ],
)
def test_bench_does_not_time_a_forward_that_returns_something_else(what, words):
    impl = Implementation("returns", lambda rank, c, **kw: _Returns(what))
    for mode in ("forward_train", "forward_eval"):
        result = bench_row(impl, "cpu", Row((8, 4), "float32", "contiguous", mode), SMOKE)
        assert result["status"] == "error" and words in result["message"], result


def test_a_run_clears_what_an_earlier_run_left_and_ties_its_files_together(tmp_path):
    import hashlib

    out = tmp_path / "b"
    out.mkdir()
    (out / "verify.json").write_text('{"schema": "bnbench.verify/1", "stale": true}')
    (out / "study.json").write_text('{"stale": true}')
    (out / "mine.txt").write_text("kept")
    from bnbench.registry import resolve

    sweep = bench.Sweep("one", (bench.LayerGroup((8,), (4,), ((),), modes=("forward_eval",)),))
    bench.SWEEPS["one"] = sweep
    try:
        bench.run_sweep(resolve(["builtin"]), ["builtin"], ["cpu"], sweep, out, verify=False)
    finally:
        del bench.SWEEPS["one"]
    assert not (out / "verify.json").exists() and not (out / "study.json").exists()
    assert (out / "mine.txt").read_text() == "kept"
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and ",ok," in rows[1], rows  # a sweep the worker cannot look up
    env = json.loads((out / "environment.json").read_text())
    assert len(env["run_id"]) == 32
    for name in ("results.csv", "samples.csv"):
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert env["files"][name]["sha256"] == digest


def test_interrupt_kills_every_live_worker_group(tmp_path):
    """isolation.interrupt() (what Ctrl-C and SIGTERM call) kills a worker's process group."""
    isolation.begin()
    worker = isolation._Worker("probe", (), ["hangs:Nothing"])
    try:
        group = os.getpgid(worker.process.pid)
        assert group == worker.process.pid != os.getpgid(0)  # a group of its own
        isolation.interrupt()
        assert worker.process.poll() is not None
        with pytest.raises(isolation.Interrupted):
            worker.read(time.monotonic() + 5)
    finally:
        worker.close()
        isolation.begin()


def test_bench_summary_gives_no_speed_up_for_rows_that_failed_verification():
    def row(impl, median, verified):
        return {
            "implementation": impl, "device": "cpu", "dtype": "float32", "mode": "forward_eval",
            "shape": "8x4", "memory_format": "contiguous", "model": "", "status": "ok",
            "median_s": median, "ratio_to_floor": 2.0, "verified": verified,
        }  # fmt: skip

    lines = bench.summary_lines(
        [row("builtin", 1e-3, "pass"), row("identity", 1e-6, "fail"), row("ok", 5e-4, "pass")]
    )
    assert any(line.startswith("ok@cpu: 1 rows") and "0.50x" in line for line in lines), lines
    assert not any(line.startswith("identity@cpu") and "x," in line for line in lines), lines
    assert any("identity@cpu: 1 rows FAILED VERIFICATION" in line for line in lines), lines


HOLDS_THE_PIPE = textwrap.dedent("""
    import os, subprocess, sys
    import torch
    from catalogue import PlainBatchNorm

    class DiesHoldingThePipe(PlainBatchNorm):
        def forward(self, x):
            if x.dtype == torch.float64:
                fd = int(os.environ["BNBENCH_RESULT_FD"])
                code = "import os, time; os.setsid(); time.sleep(3600)"
                subprocess.Popen([sys.executable, "-c", code, os.environ["HOSTILE_MARK"]],
                                 pass_fds=(fd,))
                os._exit(9)
            return super().forward(x)
""")


def test_a_worker_that_dies_while_a_child_holds_its_pipe_is_a_crash_not_a_hang(tmp_path):
    mark = f"holder-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "holder.py").write_text(HOLDS_THE_PIPE)
    os.environ["HOSTILE_MARK"] = mark
    try:
        result = bnbench(
            "verify", "--impl", "holder:DiesHoldingThePipe", "--case", "float64-rank2",
            "--case", "default-rank2", "--timeout", "300", "--json", str(tmp_path / "r.json"),
            cwd=tmp_path, timeout=120,
        )  # fmt: skip
    finally:
        del os.environ["HOSTILE_MARK"]
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = {
        r["case"]: (r["verdict"], r["message"])
        for r in json.loads((tmp_path / "r.json").read_text())["results"]
    }
    assert verdicts["float64-rank2"][0] == "fail" and "exit code 9" in verdicts["float64-rank2"][1]
    assert verdicts["default-rank2"] == ("pass", "")
    assert _marked(mark) == []


LIES = textwrap.dedent("""
    import bnbench.gate
    from bnbench.checks import PASS, Outcome
    from catalogue import PlainBatchNorm

    # Wrong, and it says so to nobody: every case the worker runs is reported as a pass.
    bnbench.gate.run_case = lambda impl, case, device: Outcome(PASS)

    class Doubles(PlainBatchNorm):
        def forward(self, x):
            return 2 * super().forward(x)
""")


def test_an_implementation_that_patches_the_checks_fails_instead_of_passing(tmp_path):
    (tmp_path / "lies.py").write_text(LIES)
    result = bnbench(
        "verify", "--impl", "lies:Doubles", "--case", "default-rank2", "--case", "float64-rank2",
        "--json", str(tmp_path / "r.json"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = {
        r["case"]: (r["verdict"], r["message"])
        for r in json.loads((tmp_path / "r.json").read_text())["results"]
    }
    for case in ("default-rank2", "float64-rank2"):  # the worker is not trusted again
        assert verdicts[case][0] == "fail"
        assert "replaced bnbench.gate.run_case" in verdicts[case][1]


def test_report_and_study_refuse_an_unwritable_output_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "out")
    for args in (["report", str(tmp_path), "--output", bad], ["study", "--smoke", "--output", bad]):
        result = in_process(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "cannot write the output directory" in result.stderr and bad in result.stderr


def test_a_run_leaves_a_directory_that_is_not_bnbenchs_alone(tmp_path):
    from bnbench.results import clear_run_files

    (tmp_path / "results.csv").write_text("someone else's")
    clear_run_files(tmp_path)
    assert (tmp_path / "results.csv").read_text() == "someone else's"


@pytest.mark.parametrize(
    "outcome",
    [
        {"status": "pass", "message": "", "seconds": float("inf")},
        {"status": "pass", "message": "", "seconds": 10**400},
        {"status": "fail", "message": "x", "seconds": 1e9},
    ],
)
def test_a_worker_outcome_with_an_invented_duration_fails_the_case(outcome):
    assert "seconds" in gate._invalid_outcome(dict(outcome))


def test_worker_messages_are_made_printable_before_they_reach_a_terminal_or_a_file():
    outcome = {"status": "fail", "message": "bad \udcff \x1b[2J\x1b[31mred\nnext", "seconds": 1.0}
    assert gate._invalid_outcome(outcome) is None
    assert outcome["message"] == "bad \\udcff \\x1b[2J\\x1b[31mred\nnext"
    outcome["message"].encode("utf-8")  # JSON and JUnit can be written


def test_a_run_of_declared_deviations_only_verified_nothing(tmp_path):
    (tmp_path / "alldev.py").write_text(
        "from catalogue import BiasedRunningVar, implementation\n"
        "impl = implementation(BiasedRunningVar, deviations={'default-rank2': 'known'})\n"
    )
    result = bnbench(
        "verify", "--impl", "alldev:impl", "--case", "default-rank2", cwd=tmp_path
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing was verified" in result.stdout


def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL runs no cleanup in bnbench: the worker notices its lifeline close and takes its
    process group with it, instead of spinning on a hung case forever."""
    process = _start_verify(tmp_path)
    worker = _wait_for_spinning_worker(process, tmp_path)
    process.kill()
    process.wait(30)
    try:
        worker.wait(20)
    except psutil.TimeoutExpired:
        worker.kill()
        raise AssertionError("the worker outlived its killed parent") from None
