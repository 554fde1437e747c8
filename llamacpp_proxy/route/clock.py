"""The injected clock: the time now and timers, so waits are tested without sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A scheduled callback that can be cancelled (asyncio.TimerHandle is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds and callbacks at a given time."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """The running asyncio loop's clock (monotonic) and timers."""

    def now(self) -> float:
        """Seconds on the loop's monotonic clock."""
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` on the loop at `when` (loop time)."""
        return asyncio.get_running_loop().call_at(when, callback)
