"""Token budgets per calendar day and month (`tokens_per_day`, `tokens_per_month` in the key
file), in UTC or the key's `budget_timezone`.

A request is refused (429 `budget_exceeded`, with the reset time) once the key's tokens in
the current period reach its budget; the request that crosses the line still finishes, so
a budget can be overshot by at most what the requests running at that moment use. Tokens
are prompt + completion as llama.cpp counted them, charged when a request ends.

Two stores: `LocalBudgets` counts in this process, seeded from the usage ledger (so a
restart does not reset anyone's budget); `RedisBudgets` keeps the counters in Redis, one per
key and period (expiring after it), so several gateway processes share them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from ..errors import BudgetExceeded, RateLimiterUnavailable
from .auth import Budget, Principal

log = logging.getLogger("llamacpp_proxy.budgets")

PERIODS = ("day", "month")


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def period_bounds(now: float, timezone: str, period: str) -> tuple[float, float]:
    """Start and end (Unix seconds) of the calendar day or month holding `now` in `timezone`."""
    zone = _zone(timezone)
    local = datetime.fromtimestamp(now, zone).date()
    if period == "day":
        first, after = local, local + timedelta(days=1)
    elif period == "month":
        first = local.replace(day=1)
        after = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    else:
        raise ValueError(f"unknown budget period {period!r}")

    def midnight(day: date) -> float:
        return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()

    return midnight(first), midnight(after)


def limit_of(budget: Budget, period: str) -> int | None:
    """The budget's tokens for `period` (None: no budget for it)."""
    return budget.tokens_per_day if period == "day" else budget.tokens_per_month


@dataclass(frozen=True)
class BudgetState:
    """One budget of one key, now."""

    period: str
    """day or month."""
    used: int
    limit: int
    resets_at: float
    """Unix seconds when the next period starts."""

    @property
    def exceeded(self) -> bool:
        """No new request is admitted until `resets_at`."""
        return self.used >= self.limit


def refuse_if_exceeded(principal: Principal, states: Iterable[BudgetState], now: float) -> None:
    """Raise BudgetExceeded for the first budget spent (the one that resets last wins when
    both are: waiting for the day is no use when the month is spent)."""
    spent = [s for s in states if s.exceeded]
    if not spent:
        return
    state = max(spent, key=lambda s: s.resets_at)
    reset = datetime.fromtimestamp(state.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    wait = max(1, math.ceil(state.resets_at - now))
    zone = principal.budget.timezone if principal.budget else "UTC"
    error = BudgetExceeded(
        f"Key '{principal.name}' has used its budget of {state.limit} tokens per "
        f"{state.period} ({state.used} used, {zone} calendar); it resets at {reset}."
    )
    error.headers = {"Retry-After": str(wait), "X-Budget-Reset": reset}
    raise error


class Budgets(Protocol):
    """Checks a key's budgets before a request, charges its tokens after."""

    now: Callable[[], float]

    async def check(self, principal: Principal) -> None:
        """Raise BudgetExceeded (429) when a budget of the key is spent."""

    async def charge(self, principal: Principal, tokens: int) -> None:
        """Add a finished request's tokens to the key's current periods."""

    async def state(self, principal: Principal) -> list[BudgetState]:
        """The key's budgets now (empty: none), for the status page."""


class TokensSince(Protocol):
    """What LocalBudgets reads its starting counts from (the usage ledger)."""

    def tokens_since(self, key: str, since: float) -> int: ...


class LocalBudgets:
    """Budgets counted in this process, seeded from the ledger when a period is first seen."""

    def __init__(self, ledger: TokensSince | None, now: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.now = now
        # (key name, period, timezone) -> [period start, period end, tokens]
        self._counters: dict[tuple[str, str, str], list[float]] = {}

    def _counter(self, principal: Principal, period: str, now: float) -> list[float]:
        budget = principal.budget
        assert budget is not None
        slot = (principal.name, period, budget.timezone)
        counter = self._counters.get(slot)
        if counter is None or now >= counter[1]:
            start, end = period_bounds(now, budget.timezone, period)
            if counter is not None and counter[1] == start:
                used = 0  # the next period: everything in it was charged through us
            else:
                # First sight of this key and period (start-up, a key file reload): what
                # the ledger holds already counts.
                used = self.ledger.tokens_since(principal.name, start) if self.ledger else 0
            counter = self._counters[slot] = [start, end, used]
        return counter

    def seed(self, principals: Iterable[Principal]) -> None:
        """Read every budgeted key's current periods from the ledger (at start-up)."""
        now = self.now()
        for principal in principals:
            self._states(principal, now)

    def _states(self, principal: Principal, now: float) -> list[BudgetState]:
        budget = principal.budget
        if budget is None:
            return []
        out = []
        for period in PERIODS:
            limit = limit_of(budget, period)
            if limit is not None:
                counter = self._counter(principal, period, now)
                out.append(BudgetState(period, int(counter[2]), limit, counter[1]))
        return out

    async def check(self, principal: Principal) -> None:
        """Raise BudgetExceeded when a budget of the key is spent."""
        if principal.budget is not None:
            now = self.now()
            refuse_if_exceeded(principal, self._states(principal, now), now)

    async def charge(self, principal: Principal, tokens: int) -> None:
        """Add tokens to the key's current periods."""
        budget = principal.budget
        if budget is None or tokens <= 0:
            return
        now = self.now()
        for period in PERIODS:
            if limit_of(budget, period) is not None:
                self._counter(principal, period, now)[2] += tokens

    async def state(self, principal: Principal) -> list[BudgetState]:
        """The key's budgets now."""
        return self._states(principal, self.now())


class RedisBudgets:
    """Budgets counted in Redis: one integer per key and period, shared by every process.

    Redis unreachable: `failure_mode` "closed" refuses budgeted keys with 503, "open" admits
    them; a charge that cannot be written is logged (once per outage) and lost.
    """

    def __init__(
        self,
        client: Any,
        failure_mode: str = "closed",
        prefix: str = "llp",
        now: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._failure_mode = failure_mode
        self._prefix = prefix
        self.now = now
        self._healthy = True

    @classmethod
    def from_url(cls, url: str, failure_mode: str = "closed", timeout: float = 1.0) -> RedisBudgets:
        """Budgets on the Redis at `url`."""
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=32
        )
        return cls(client, failure_mode)

    def _slots(self, principal: Principal, now: float) -> list[tuple[str, str, int, float]]:
        """(redis key, period, limit, period end) of each budget of the key."""
        budget = principal.budget
        if budget is None:
            return []
        out = []
        for period in PERIODS:
            limit = limit_of(budget, period)
            if limit is not None:
                start, end = period_bounds(now, budget.timezone, period)
                # Keyed by the period's start instant, so a changed timezone starts afresh
                # rather than reading another calendar's count. {name}: one Cluster slot.
                name = f"{self._prefix}:{{{principal.name}}}:budget:{period}:{int(start)}"
                out.append((name, period, limit, end))
        return out

    async def _states(self, principal: Principal, now: float) -> list[BudgetState]:
        slots = self._slots(principal, now)
        if not slots:
            return []
        values = await self._redis.mget([s[0] for s in slots])
        self._ok()
        return [
            BudgetState(period, int(value or 0), limit, end)
            for (_, period, limit, end), value in zip(slots, values, strict=True)
        ]

    async def check(self, principal: Principal) -> None:
        """Raise BudgetExceeded when a budget of the key is spent (shared counts)."""
        if principal.budget is None:
            return
        now = self.now()
        try:
            states = await self._states(principal, now)
        except Exception as exc:  # redis-py's errors, OSError, timeouts
            self._failed(exc)
            if self._failure_mode == "open":
                return
            raise RateLimiterUnavailable(
                "The shared budget store is unreachable; retry later.",
                headers={"Retry-After": "1"},
            ) from None
        refuse_if_exceeded(principal, states, now)

    async def charge(self, principal: Principal, tokens: int) -> None:
        """Add tokens to the key's current periods, atomically for every process."""
        if principal.budget is None or tokens <= 0:
            return
        slots = self._slots(principal, self.now())
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for name, _, _, end in slots:
                    pipe.incrby(name, tokens)
                    # Kept a day past its period: the status page may still show it.
                    pipe.expireat(name, int(end) + 86400)
                await pipe.execute()
            self._ok()
        except Exception as exc:
            self._failed(exc)

    async def state(self, principal: Principal) -> list[BudgetState]:
        """The key's budgets now (empty while Redis is unreachable)."""
        try:
            return await self._states(principal, self.now())
        except Exception as exc:
            self._failed(exc)
            return []

    def _failed(self, exc: BaseException) -> None:
        if self._healthy:
            self._healthy = False
            log.error("Redis is unreachable for budgets (%s); failing %s", exc, self._failure_mode)

    def _ok(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.warning("Redis is reachable again; budgets are enforced")

    async def close(self) -> None:
        """Close the connections."""
        await self._redis.aclose()
