"""Run untrusted work item by item in a worker process, surviving hangs, crashes and lies.

The parent starts ``python -m bnbench._worker`` in a session of its own (so that it is also a
process group of its own), hands it the job as JSON on stdin, and reads JSON lines from a
dedicated pipe: ``{"start": ITEM}`` before each item, ``{"done": ITEM, "result": {...}}`` after
it, ``{"end": true}`` at the end. Nothing that arrives is executed or unpickled: a line is
parsed as strict JSON (no NaN), at most MAX_MESSAGE_BYTES long, and read with a deadline, so a
worker that writes junk, floods the pipe or stalls mid-line costs the item it was on.

Every way a worker ends (its items done, a hang, a crash, a protocol violation, Ctrl-C or
SIGTERM in the parent) kills its whole process group, and then every process still carrying
the worker's token in its environment (children that started a session of their own): what an
implementation starts never outlives the run. An item that hangs gets its worker killed, an item
that kills its worker is recorded as a crash, and a fresh worker carries on with the rest; a
worker that dies before its first item (the implementation cannot even be loaded) costs every
remaining item at once instead of being restarted for each.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable

# A worker imports torch and the implementation before its first item: allow for that.
STARTUP_ALLOWANCE_S = 120.0
# The longest line a worker may send (a result with its samples is far below this).
MAX_MESSAGE_BYTES = 8 << 20
# How often a waiting parent looks up from the pipe (for Ctrl-C and SIGTERM).
POLL_S = 0.1

TOKEN_ENV = "BNBENCH_WORKER_TOKEN"
FD_ENV = "BNBENCH_RESULT_FD"

# The only code a worker runs: a job kind names one of these (module, function) pairs.
JOBS = {
    "gate": ("bnbench.gate", "gate_worker"),
    "bench": ("bnbench.benchmark", "bench_worker"),
    "probe": ("bnbench.registry", "probe_worker"),
    "dist-gate": ("bnbench.distributed", "dist_gate_worker"),
    "dist-bench": ("bnbench.dist_bench", "dist_bench_worker"),
    "ab": ("bnbench.ab", "ab_worker"),
}


class Interrupted(Exception):
    """The run was interrupted (Ctrl-C, SIGTERM): the workers are gone, stop waiting."""


class _Violation(Exception):
    """The worker sent something that is not a bnbench message."""


# ---------------------------------------------------------------------------------------------
# The worker's side


class Channel:
    """The worker's side: say which item starts, then send its result, as JSON lines."""

    def __init__(self, fd: int):
        self._fd = fd
        self._pid = os.getpid()
        self.forked_in: set[str] = set()
        self._current: str | None = None
        os.register_at_fork(after_in_parent=self._forked)
        self._harness = _harness_snapshot()
        # bound now: an implementation that rebinds the module's functions does not rebind these
        self._replaced = _replaced
        self._leftover_children = _leftover_children

    def _forked(self) -> None:
        if self._current is not None:
            self.forked_in.add(self._current)

    def _send(self, message: dict) -> None:
        if os.getpid() != self._pid:
            # A copy of the worker made by an implementation's os.fork(): it must not speak
            # for the worker; it ends here, and the parent kills what is left of it.
            os._exit(0)
        data = (json.dumps(_finite(message), allow_nan=False) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def start(self, item: str) -> None:
        self._current = item
        self._send({"start": item})

    def done(self, item: str, result: dict) -> None:
        """Send ``result``; an item during which the implementation forked, or after which
        processes it started are still running, fails instead (those processes are killed)."""
        self._current = None
        message: dict[str, Any] = {"done": item, "result": result}
        problems = []
        if item in self.forked_in:
            problems.append("called os.fork() (a BatchNorm must not start processes)")
        replaced = self._replaced(self._harness)
        if replaced:
            problems.append(
                f"replaced {', '.join(replaced[:6])}"
                + (" and more" if len(replaced) > 6 else "")
                + " (a BatchNorm must not patch the checks, their oracle or torch)"
            )
        leftovers = self._leftover_children()
        if leftovers:
            problems.append(
                f"left {len(leftovers)} process(es) running after it returned "
                f"(pids {', '.join(map(str, leftovers[:8]))}; killed; a BatchNorm must not "
                "start processes)"
            )
        if problems:
            message["problem"] = "the implementation " + "; and ".join(problems)
        self._send(message)

    def end(self) -> None:
        self._send({"end": True})


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# What the checks, their float64 oracle and the comparisons stand on, in the worker: an
# implementation runs in the same process, and one that replaced any of these could make a
# wrong result pass. Snapshot before the implementation is imported, compared after every item:
# bnbench's own modules whole (their callables; plain values may change as they work), and the
# torch functions and tensor methods the oracle and the comparisons call (not all of torch:
# torch.compile itself wraps torch.manual_seed, and other libraries patch other corners).
_HARNESS_MODULES = (
    "bnbench.checks",
    "bnbench.diagnose",
    "bnbench.reference",
    "bnbench.tolerances",
    "bnbench.cases",
    "bnbench.explore",
    "bnbench.gate",
    "bnbench.benchmark",
    "bnbench.timing",
    "bnbench.registry",
    "bnbench.results",
    "bnbench.isolation",
    "bnbench.distributed",
    "bnbench.dist_bench",
    "bnbench.ab",
)
_TORCH_FUNCTIONS = (
    "abs allclose as_tensor equal isclose isfinite isnan maximum ones rsqrt sqrt tensor "
    "var_mean where zeros"
).split()
_TENSOR_METHODS = (
    "__add__ __mul__ __sub__ __truediv__ abs allclose clone detach double eq float isclose "
    "item max mean min ne sqrt sub sum to tolist var"
).split()


def _harness() -> dict[str, dict]:
    import torch

    namespaces: dict[str, dict] = {
        name: vars(sys.modules[name]) for name in _HARNESS_MODULES if name in sys.modules
    }
    namespaces["torch"] = {n: getattr(torch, n, None) for n in _TORCH_FUNCTIONS}
    if "torch.distributed" in sys.modules and torch.distributed.is_available():
        # the methods every collective goes through (bnbench.distributed counts them in eval,
        # restoring them before the item ends)
        namespaces["ProcessGroup"] = dict(vars(torch.distributed.ProcessGroup))
    namespaces["torch.Tensor"] = {n: getattr(torch.Tensor, n, None) for n in _TENSOR_METHODS}
    return namespaces


def _harness_snapshot() -> dict[tuple[str, str], int]:
    for name in _HARNESS_MODULES:
        importlib.import_module(name)
    return {
        (name, attr): id(value)
        for name, namespace in _harness().items()
        for attr, value in list(namespace.items())
        if callable(value)
    }


def _replaced(snapshot: dict[tuple[str, str], int]) -> list[str]:
    """The snapshot's callables that are no longer what they were."""
    namespaces = _harness()
    return [
        f"{name}.{attr}"
        for (name, attr), ident in snapshot.items()
        if id(namespaces.get(name, {}).get(attr)) != ident
    ]


def _read_line(fd: int) -> bytes:
    """The job: the one line the parent writes before it falls silent."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _die_with_parent(lifeline: int) -> None:
    try:
        while os.read(lifeline, 1 << 16):
            pass
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL)


def _leftover_children() -> list[int]:
    """Kill this worker's live descendants, other than torch.compile's compile workers;
    returns their pids."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - a dependency
        return []
    killed = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "torch._inductor" in " ".join(child.cmdline()):
                continue
            child.kill()
            killed.append(child.pid)
        except psutil.Error:
            continue
    return killed


def worker_main() -> None:
    """The worker: read the job (one JSON line on stdin), run it, report on the result pipe."""
    fd = int(os.environ[FD_ENV])
    lifeline = os.dup(0)
    job = json.loads(_read_line(lifeline))
    # stdin stays open while the parent lives: when it dies (even by SIGKILL, which runs no
    # cleanup) the read ends, and the worker takes its whole process group with it. Read as a
    # raw descriptor: a daemon thread blocked in a buffered reader aborts the interpreter's exit.
    threading.Thread(target=_die_with_parent, args=(lifeline,), daemon=True).start()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the implementation's stdin is empty
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    module, function = JOBS[job["kind"]]
    target = getattr(importlib.import_module(module), function)
    channel = Channel(fd)
    target(*job["args"], items=job["items"], channel=channel)
    channel.end()
    os.close(fd)


# ---------------------------------------------------------------------------------------------
# The parent's side

_LIVE: set[_Worker] = set()
_LIVE_LOCK = threading.Lock()
_STOP = threading.Event()


def begin() -> None:
    """Start a run: clear an earlier interruption (a long-lived process runs again)."""
    _STOP.clear()


def interrupt() -> None:
    """Stop every run in this process now: kill every live worker's process group; the
    threads waiting on them raise Interrupted."""
    _STOP.set()
    with _LIVE_LOCK:
        workers = list(_LIVE)
    for worker in workers:
        worker.kill()


def _pythonpath() -> str:
    """The parent's import path for the worker (as multiprocessing's spawn hands it on), so
    that MODULE:ATTR resolves there as here."""
    paths = [os.getcwd() if p == "" else p for p in sys.path]
    return os.pathsep.join(dict.fromkeys(p for p in paths if p))


class _Worker:
    """One worker process, its result pipe and its process group."""

    def __init__(self, kind: str, args: tuple, items: list[str]):
        """Start it (OSError when it cannot be started: nothing is left behind)."""
        self.started = time.time()
        read_fd, write_fd = os.pipe()
        self.token = uuid.uuid4().hex
        env = dict(
            os.environ,
            PYTHONPATH=_pythonpath(),
            **{TOKEN_ENV: self.token, FD_ENV: str(write_fd)},
        )
        self.fd = read_fd
        self.buffer = b""
        self.killed = False
        try:
            # started and registered under the lock: another thread's orphan sweep must never
            # see this worker as a child that is not a live worker
            with _LIVE_LOCK:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "bnbench._worker"],
                    stdin=subprocess.PIPE,
                    pass_fds=(write_fd,),
                    env=env,
                    start_new_session=True,
                )
                _LIVE.add(self)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        job = json.dumps({"kind": kind, "args": list(args), "items": items}).encode() + b"\n"
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(job)
            self.process.stdin.flush()  # kept open: the worker's lifeline (see worker_main)
        except (BrokenPipeError, OSError):
            pass  # it died at once: the first read says so
        except BaseException:
            self.close()
            raise

    def read(self, deadline: float) -> dict | None:
        """The next message; None when the worker closed the pipe (it ended or died).
        TimeoutError past ``deadline``; _Violation for anything not a message."""
        while b"\n" not in self.buffer:
            if _STOP.is_set():
                raise Interrupted()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            ready, _, _ = select.select([self.fd], [], [], min(left, POLL_S))
            if not ready:
                if self.process.poll() is not None:
                    # The worker is gone but the pipe is not closed: a process it started
                    # holds the write end. Whatever was sent is in by now: read it as an end.
                    ready, _, _ = select.select([self.fd], [], [], POLL_S)
                    if not ready:
                        self._ended()
                        return None
                continue
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._ended()
                return None
            self.buffer += chunk
            if len(self.buffer) > MAX_MESSAGE_BYTES and b"\n" not in self.buffer:
                raise _Violation(f"a line over {MAX_MESSAGE_BYTES} bytes")
        line, self.buffer = self.buffer.split(b"\n", 1)
        if len(line) > MAX_MESSAGE_BYTES:
            raise _Violation(f"a line over {MAX_MESSAGE_BYTES} bytes")
        try:
            message = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _Violation(f"not JSON ({str(exc)[:100]}): {_preview(line)}") from None
        if not isinstance(message, dict):
            raise _Violation(f"not a JSON object: {_preview(line)}")
        return message

    def _ended(self) -> None:
        """The pipe ended (or its worker did): an interruption, an unfinished line, or EOF."""
        if _STOP.is_set():  # killed by interrupt(): not the implementation's doing
            raise Interrupted()
        if self.buffer:
            raise _Violation(f"an unfinished line: {_preview(self.buffer)}")
        return None

    def exit_code(self, wait: float = 5.0) -> int | None:
        try:
            return self.process.wait(wait)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Kill the worker's process group and anything else carrying its token; reap it.
        Idempotent."""
        if self.killed:
            return
        self.killed = True
        kill_group(self.process.pid)
        kill_token(self.token)
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
            pass
        with _LIVE_LOCK:
            _LIVE.discard(self)
        kill_orphans(self.started)

    def close(self) -> None:
        """Kill it (if not yet) and close the pipe: the owning thread's last word."""
        self.kill()
        try:
            os.close(self.fd)
        except OSError:
            pass


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _preview(data: bytes) -> str:
    return repr(data[:80])


_SUBREAPER = False


def become_subreaper() -> None:
    """Linux: make this process the reaper of its orphaned descendants, so that a process an
    implementation started and detached (a double fork, setsid, a scrubbed environment) is
    reparented here, where :func:`kill_orphans` finds it, instead of to init. The command line
    calls it; a library caller (pytest, a notebook) may, knowing that its own orphans created
    while a worker runs are then killed with the worker's."""
    global _SUBREAPER
    if _SUBREAPER or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        _SUBREAPER = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def kill_orphans(since: float) -> None:
    """SIGKILL (and reap) the orphans reparented to this process (a subreaper, see
    :func:`become_subreaper`): children that are not a live worker and were created after
    ``since`` (a worker's start, as time.time()), whose parent was a worker now gone. Repeated
    until none is found, for orphans forked during the sweep."""
    if not _SUBREAPER:
        return
    try:
        import psutil
    except ImportError:  # pragma: no cover - a dependency
        return
    for _ in range(5):
        # under the lock: a worker another thread is starting is registered before it is seen
        with _LIVE_LOCK:
            workers = {w.process.pid for w in _LIVE}
            orphans = []
            for child in psutil.Process().children():
                try:
                    if child.pid not in workers and child.create_time() >= since - 1.0:
                        orphans.append(child)
                except psutil.Error:
                    continue
            for child in orphans:
                try:
                    child.kill()
                except psutil.Error:
                    pass
        if not orphans:
            return
        for child in orphans:
            try:
                child.wait(5)
            except psutil.Error:
                pass


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_token(token: str) -> None:
    """SIGKILL every process of ours whose environment carries ``token``: the worker's
    descendants, including those that left its process group (setsid, double fork)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - a dependency; the group kill still ran
        return
    me = os.getpid()
    needle = f"{TOKEN_ENV}={token}"
    for process in psutil.process_iter(["pid", "uids"]):
        if process.pid == me:
            continue
        try:
            if process.uids().real != os.getuid():
                continue
            with open(f"/proc/{process.pid}/environ", "rb") as f:
                environ = f.read()
        except (OSError, psutil.Error):
            continue
        if needle.encode() in environ.split(b"\0"):
            try:
                process.kill()
            except psutil.Error:
                pass


def run_items(
    kind: str,
    args: tuple,
    items: list[str],
    timeout: float,
    on_result: Callable[[str, dict | None, str | None, float], None],
) -> None:
    """Run the job ``kind`` (see JOBS) with ``args`` over ``items`` in worker processes until
    every item has a result. ``on_result(item, result, problem, seconds)``: result is the dict
    the worker sent (unvalidated: the caller checks it), or None with ``problem`` saying why
    (hung, crashed, broke the protocol, forked). Raises Interrupted after :func:`interrupt`."""
    remaining = list(items)
    while remaining:
        try:
            worker = _Worker(kind, args, remaining)
        except OSError as exc:  # no process could be started (EAGAIN, EMFILE...)
            for victim in list(remaining):
                on_result(victim, None, f"crashed: no worker process could be started ({exc})", 0)
            return
        current: str | None = None
        started = time.perf_counter()
        began_any = False

        def fail(victims: list[str], problem: str) -> None:
            for victim in victims:
                on_result(victim, None, problem, time.perf_counter() - started)  # noqa: B023
                remaining.remove(victim)

        try:
            while remaining:
                wait = timeout if began_any else timeout + STARTUP_ALLOWANCE_S
                try:
                    message = worker.read(time.monotonic() + wait)
                except TimeoutError:
                    worker.kill()
                    if began_any:
                        fail(
                            [current or remaining[0]],
                            f"hung: no result within {timeout:g} s (worker killed)",
                        )
                    else:  # stuck loading the implementation: it would be, once per item
                        fail(
                            list(remaining),
                            f"hung: the worker did not start its first case within "
                            f"{wait:g} s while loading the implementation (worker killed)",
                        )
                    break
                except _Violation as exc:
                    worker.kill()
                    fail(
                        [current or remaining[0]],
                        f"broke the worker protocol: bnbench's result pipe carried {exc} "
                        "(the implementation wrote to it, or a process it started did); "
                        "worker killed",
                    )
                    break
                if message is None:
                    code = worker.exit_code()
                    worker.kill()
                    what = _exit_text(code)
                    if not began_any:
                        # It died loading the implementation: restarting it for every item
                        # would die the same way, once per item.
                        fail(
                            list(remaining),
                            f"crashed: the worker {what} while loading the implementation, "
                            "before its first case",
                        )
                    else:
                        fail(
                            [current or remaining[0]],
                            f"crashed: the worker process {what} during this item",
                        )
                    break
                problem = _unexpected(message, current, remaining)
                if problem:
                    worker.kill()
                    fail([current or remaining[0]], f"broke the worker protocol: {problem}")
                    break
                if "start" in message:
                    current = message["start"]
                    began_any = True
                    started = time.perf_counter()
                elif "done" in message:
                    item = message["done"]
                    current = None
                    remaining.remove(item)
                    seconds = time.perf_counter() - started
                    if "problem" in message:
                        on_result(item, None, str(message["problem"])[:2000], seconds)
                    else:
                        on_result(item, message["result"], None, seconds)
                else:  # "end" with items left: it skipped some
                    worker.kill()
                    fail([remaining[0]], "the worker ended without running this item")
                    break
        finally:
            worker.close()  # its normal end too: whatever it started dies with it


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"died (exit code {code}, {name})"
    return f"exited (exit code {code})"


def _unexpected(message: dict, current: str | None, remaining: list[str]) -> str | None:
    """Why ``message`` is not the message that may come now (None when it is)."""
    keys = set(message)
    if keys == {"start"}:
        item = message["start"]
        if current is not None:
            return f"a start of {item!r} while {current!r} had not finished"
        if not isinstance(item, str) or item not in remaining:
            return f"a start of an item it was not given: {item!r:.80}"
        return None
    if keys in ({"done", "result"}, {"done", "result", "problem"}):
        if message["done"] != current or current is None:
            return f"a result for {message['done']!r:.80} while {current!r} was running"
        if not isinstance(message["result"], dict):
            return "a result that is not a JSON object"
        return None
    if keys == {"end"} and current is None:
        return None
    return f"an unknown message with keys {sorted(keys)!r:.120}"
