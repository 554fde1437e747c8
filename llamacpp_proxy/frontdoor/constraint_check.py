"""Where a request's output constraint is checked: on the event loop when small, in a worker
thread when large.

The checks (render/grammar_guard.py: what would crash or hang llama.cpp's grammar builder)
are pure Python: about 1-1.5 ms per KiB of a GBNF grammar checked for the first time (a
grammar seen again comes from a cache: tens of µs) and 0.1-0.5 ms per KiB of a JSON schema
(its `pattern`s cost the most) on this project's benchmark machine. A 64 KiB grammar (the
largest accepted) took about 100 ms, and on the loop that was 100 ms in which no other
client got a byte. A check that large now runs in one worker thread, so the loop gets its
turn back at least every switch interval of the GIL (5 ms), whatever the check costs. Small
constraints, the common case (a tool's parameters, a response format), are checked inline:
under INLINE_* bytes the worst check built costs about 1 ms, less than the loop could wait
for the worker (the hand-off itself is ~40 µs). A schema's size counts once more per `$ref`
in it: each reference's target is walked again.

At most `max_waiting` large checks run or wait at once; beyond that a request gets
503 server_overloaded with Retry-After, so a flood of large grammars cannot queue work
without bound. A check whose request is cancelled before the check started is dropped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .. import fastjson
from ..errors import ServerOverloaded, ServiceShuttingDown
from ..render.constraints import Constraint

INLINE_GRAMMAR_BYTES = 512
"""A raw grammar up to this size is checked on the loop (at most about 1 ms the first time;
llama.cpp's JSON grammar, 601 bytes, took 0.8 ms)."""
INLINE_SCHEMA_BYTES = 1024
"""A JSON schema up to this size, as compact JSON, is checked on the loop (the worst built:
a `pattern` of groups `(a)`, about 0.8 ms; at 2 KiB it took 1.6 ms, at 8 KiB 3.6 ms before
the ambiguity count). Patterns cost about 4 times as much a byte as the rest."""
MAX_WAITING = 32
"""Large checks running or waiting for the worker at once (about 3 s of work at most)."""
MAX_WAITING_PER_KEY = 8
"""Of those, one key's: a key's limits bound how many checks it can ask for in a window,
not how many at once, and one key's burst would otherwise take every place."""


class ConstraintChecker:
    """Runs Constraint.check inline or in its one worker thread (one: the checks hold the
    GIL, so a second thread would add no throughput, only contention with the loop)."""

    def __init__(
        self, max_waiting: int = MAX_WAITING, max_waiting_per_key: int = MAX_WAITING_PER_KEY
    ) -> None:
        self.max_waiting = max_waiting
        self.max_waiting_per_key = max_waiting_per_key
        self.waiting = 0
        """Large checks running or queued now."""
        self._by_key: dict[str, int] = {}
        self._worker: _Worker | None = None  # started on the first large check
        self._closed = False

    async def check(self, constraint: Constraint, key: str) -> None:
        """Raise what Constraint.check raises (InvalidRequest), or ServerOverloaded when too
        many large checks are already waiting, in all or for this `key` (its name)."""
        if not _large(constraint.found):
            constraint.check()
            return
        if self._closed:
            raise _shutting_down()
        mine = self._by_key.get(key, 0)
        if self.waiting >= self.max_waiting:
            raise _busy(f"{self.waiting} other large grammars or JSON schemas")
        if mine >= self.max_waiting_per_key:
            raise _busy(f"{mine} other large grammars or JSON schemas of this key's")
        if self._worker is None:
            self._worker = _Worker("constraint-check")
        self.waiting += 1
        self._by_key[key] = mine + 1
        try:
            # Cancelled (the request ended) before it started: the worker drops it.
            await asyncio.wrap_future(self._worker.submit(constraint.check))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise _shutting_down() from None  # dropped by close(), not this request's end
            raise
        finally:
            self.waiting -= 1
            left = self._by_key.pop(key) - 1
            if left:
                self._by_key[key] = left

    def close(self) -> None:
        """Drop the checks not started (at shutdown: their requests get 503 shutting_down);
        a running one is left to end, or to end with the process: nothing waits for it."""
        self._closed = True
        if self._worker is not None:
            self._worker.close()


def _busy(what: str) -> ServerOverloaded:
    return ServerOverloaded(f"The gateway is checking {what}; retry shortly.", retry_after=1)


def _shutting_down() -> ServiceShuttingDown:
    return ServiceShuttingDown(
        "The server is shutting down; retry on another instance.",
        headers={"Retry-After": "1", "Connection": "close"},
    )


class _Worker:
    """One daemon thread that runs the checks in turn. Not a ThreadPoolExecutor: the
    interpreter joins those threads at exit, and a check cannot be stopped once it runs,
    so a check slower than its bounds assume (one took 5.8 s before schema_limits.py
    bounded the values it reads) would keep a gateway told to stop from exiting."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[None], Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, job: Callable[[], None]) -> Future[None]:
        future: Future[None] = Future()
        if self._closed:
            future.set_exception(RuntimeError("the constraint checker is closed"))
        else:
            self._jobs.put((future, job))
        return future

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._jobs.put(None)  # the thread ends once its check (if any) does

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited: the request ended
            try:
                job()
            except BaseException as exc:  # the request's to raise (InvalidRequest, ...)
                future.set_exception(exc)
            else:
                future.set_result(None)


def _large(found: dict[str, Any]) -> bool:
    for source, constraint in found.items():
        if source == "grammar":
            return isinstance(constraint, str) and len(constraint) > INLINE_GRAMMAR_BYTES
        try:  # orjson: ~1 µs per KB, a small fraction of the check
            encoded = fastjson.dumps(constraint)
        except (TypeError, ValueError, RecursionError):
            return True  # cannot size it cheaply: not on the loop
        # The check walks each `$ref` target on its own (schema_limits.py), and targets may
        # overlap or name one subtree many ways ("#/a/0", "#/a/00"): its work grows with
        # the size times the references (a 7 KB schema of 80 took 47 ms), not the size.
        return len(encoded) * (1 + encoded.count(b'"$ref"')) > INLINE_SCHEMA_BYTES
    return False
