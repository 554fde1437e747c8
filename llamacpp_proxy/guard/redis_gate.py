"""Redis connections for the rate limiter and the budgets: a bounded pool that callers wait
their turn for, with a deadline. A caller that cannot get a connection in time is told
"busy" (RedisBusy): redis-py itself would raise a ConnectionError ("Too many connections")
indistinguishable from Redis being down, which in `open` failure mode would admit a burst
unlimited and lose its charges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

POOL_WAIT = 5.0
"""Seconds a caller waits for a connection before it is told busy."""

T = TypeVar("T")


class RedisBusy(Exception):
    """No Redis connection came free within POOL_WAIT: load, not a Redis failure."""


def connect(url: str, timeout: float, pool_size: int) -> Any:
    """A redis.asyncio client on `url` with at most `pool_size` connections; a caller past
    them waits (behind the Gate, which should never let it come to that) instead of failing."""
    import redis.asyncio  # the optional `redis` extra: imported only when configured

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=POOL_WAIT,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    return redis.asyncio.Redis.from_pool(pool)


class Gate:
    """Our own turn-taking in front of the connection pool (see the module)."""

    def __init__(self, size: int, wait: float = POOL_WAIT) -> None:
        self._turns = asyncio.Semaphore(size)
        self._wait = wait

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis exchange once a connection is ours; RedisBusy if none frees in
        time."""
        try:
            await asyncio.wait_for(self._turns.acquire(), self._wait)
        except TimeoutError:
            raise RedisBusy from None
        try:
            return await make()
        finally:
            self._turns.release()
