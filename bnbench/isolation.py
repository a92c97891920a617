"""Run untrusted work item by item in a worker process, surviving hangs and crashes.

The worker announces each item before it starts and sends a JSON result when it is done. The
parent waits for each item with a deadline: an item that hangs gets its worker killed, an item
that kills its worker is recorded as a crash, and a fresh worker carries on with the rest.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from typing import Callable

# A worker imports torch and the implementation before its first item: allow for that.
STARTUP_ALLOWANCE_S = 120.0


class Channel:
    """The worker's side: say which item starts, then send its result."""

    def __init__(self, conn):
        self._conn = conn

    def start(self, item: str) -> None:
        self._conn.send(json.dumps({"start": item}))

    def done(self, item: str, result: dict) -> None:
        self._conn.send(json.dumps({"done": item, "result": result}))


def _entry(target, args, items, conn) -> None:
    target(*args, items=items, channel=Channel(conn))
    conn.close()


def run_items(
    target: Callable[..., None],
    args: tuple,
    items: list[str],
    timeout: float,
    on_result: Callable[[str, dict | None, str | None, float], None],
) -> None:
    """Run ``target(*args, items=..., channel=...)`` in a spawned worker until every item has a
    result. ``on_result(item, result, problem, seconds)``: result is what the worker sent, or
    None with ``problem`` saying why (hung, crashed)."""
    ctx = multiprocessing.get_context("spawn")
    remaining = list(items)
    while remaining:
        receiver, sender = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_entry, args=(target, args, remaining, sender), daemon=True)
        process.start()
        sender.close()
        current: str | None = None
        started = time.perf_counter()
        try:
            while remaining:
                wait = timeout if current is not None else timeout + STARTUP_ALLOWANCE_S
                if not receiver.poll(wait):
                    victim = current or remaining[0]
                    process.kill()
                    on_result(
                        victim,
                        None,
                        f"hung: no result within {timeout:g} s (worker killed)",
                        time.perf_counter() - started,
                    )
                    remaining.remove(victim)
                    break
                try:
                    message = json.loads(receiver.recv())
                except (EOFError, OSError):
                    process.join(5)
                    victim = current or remaining[0]
                    problem = (
                        f"crashed: the worker process died (exit code {process.exitcode})"
                        " during this item"
                    )
                    on_result(victim, None, problem, time.perf_counter() - started)
                    remaining.remove(victim)
                    break
                if "start" in message:
                    current = message["start"]
                    started = time.perf_counter()
                else:
                    on_result(
                        message["done"], message["result"], None, time.perf_counter() - started
                    )
                    remaining.remove(message["done"])
                    current = None
        finally:
            receiver.close()
            if process.is_alive():
                process.join(2)
            if process.is_alive():
                process.kill()
                process.join()
