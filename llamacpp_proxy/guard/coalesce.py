"""One upstream fetch shared by every concurrent caller, its answer reused briefly.

`/health/ready` and `/v1/models` ask llama.cpp for the same small answer whoever calls; left
alone, a burst of callers (no key needed for the first) opens one upstream connection each.
Coalesced, a burst costs one upstream request at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalesced(Generic[T]):
    """The result of `fetch`, shared by concurrent callers and reused for `ttl` seconds."""

    def __init__(self, ttl: float, now: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._now = now
        self._pending: asyncio.Future[T] | None = None
        self._value: tuple[float, T] | None = None

    async def get(self, fetch: Callable[[], Awaitable[T]]) -> T:
        """The fresh cached value, the answer of the fetch in flight, or a new fetch's."""
        if self._value is not None and self._now() - self._value[0] < self._ttl:
            return self._value[1]
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._run(fetch))
        # shield: one caller leaving (client gone) must not cancel the others' fetch.
        return await asyncio.shield(self._pending)

    async def _run(self, fetch: Callable[[], Awaitable[T]]) -> T:
        try:
            value = await fetch()
            self._value = (self._now(), value)
            return value
        finally:
            self._pending = None
