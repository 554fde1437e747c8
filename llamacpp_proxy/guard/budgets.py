"""Token budgets per calendar day and month (`tokens_per_day`, `tokens_per_month` in the key
file), in UTC or the key's `budget_timezone`.

A request is refused (429 `budget_exceeded`, with the reset time) once the key's tokens in
the current period reach its budget. Admission reserves the request's estimate (what the
limiter reserves: prompt + max_tokens per generation) and the request's end replaces it with
the tokens llama.cpp counted (prompt + completion), so requests running at once count against
the budget too: a burst cannot each see the same unspent budget. The request that crosses
the line still finishes, so a budget is overshot by at most one request's tokens.

Two stores: `LocalBudgets` counts in this process, seeded from the usage ledger (so a
restart does not reset anyone's budget); `RedisBudgets` keeps the counters in Redis, one per
key and period (expiring after it), so several gateway processes share them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from ..errors import BudgetExceeded, RateLimiterUnavailable
from .auth import Budget, Principal
from .redis_gate import POOL_WAIT, Gate, RedisBusy, connect

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
        f"{state.period} ({state.used} used or held by requests running, {zone} calendar); "
        f"it resets at {reset}."
    )
    error.headers = {"Retry-After": str(wait), "X-Budget-Reset": reset}
    raise error


@dataclass
class BudgetHold:
    """What `reserve` set aside for one request; `charge` settles it, once."""

    tokens: int
    counters: list[Any] = field(default_factory=list)
    """Where it was added: the local counters, or (redis key, expiry) pairs."""
    settled: bool = False


class Budgets(Protocol):
    """Checks a key's budgets before a request, charges its tokens after."""

    now: Callable[[], float]

    async def check(self, principal: Principal) -> None:
        """Raise BudgetExceeded (429) when a budget of the key is spent."""

    async def reserve(self, principal: Principal, tokens: int) -> BudgetHold | None:
        """check(), and hold `tokens` (the request's estimate) against the key's budgets
        until `charge` settles them, atomically; None when the key has no budget."""

    async def charge(
        self, principal: Principal, tokens: int, hold: BudgetHold | None = None
    ) -> None:
        """Add a finished request's tokens to the key's current periods (replacing what
        `hold` reserved for it, if given)."""

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

    async def reserve(self, principal: Principal, tokens: int) -> BudgetHold | None:
        """Refuse a spent budget, else hold `tokens` in each of the key's periods."""
        if principal.budget is None:
            return None
        now = self.now()
        refuse_if_exceeded(principal, self._states(principal, now), now)
        hold = BudgetHold(max(0, tokens))
        for period in PERIODS:
            if limit_of(principal.budget, period) is not None:
                counter = self._counter(principal, period, now)
                counter[2] += hold.tokens
                hold.counters.append(counter)
        return hold

    async def charge(
        self, principal: Principal, tokens: int, hold: BudgetHold | None = None
    ) -> None:
        """Give back what `hold` reserved and add tokens to the key's current periods."""
        budget = principal.budget
        if hold is not None and not hold.settled:
            hold.settled = True
            # The counters it was added to, even if a new period has begun since (then the
            # old one is no longer read, and the tokens go to the new one below).
            for counter in hold.counters:
                counter[2] -= hold.tokens
        if budget is None or tokens <= 0:
            return
        now = self.now()
        for period in PERIODS:
            if limit_of(budget, period) is not None:
                self._counter(principal, period, now)[2] += tokens

    async def state(self, principal: Principal) -> list[BudgetState]:
        """The key's budgets now."""
        return self._states(principal, self.now())


POOL_SIZE = 32  # Redis connections per process for budgets
CHARGE_ATTEMPTS = 6  # a charge that found no connection is retried (0.1 ... 3.2 s apart)

# KEYS: the key's period counters. ARGV: tokens to hold, then per counter its limit and the
# Unix second it expires. Returns: 1 if held (0: refused), then each counter's count before.
RESERVE = """
local tokens = tonumber(ARGV[1])
local used, spent = {}, false
for i = 1, #KEYS do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used[i] >= tonumber(ARGV[2 * i]) then spent = true end
end
if not spent and tokens > 0 then
  for i = 1, #KEYS do
    redis.call('INCRBY', KEYS[i], tokens)
    redis.call('EXPIREAT', KEYS[i], tonumber(ARGV[2 * i + 1]))
  end
end
table.insert(used, 1, spent and 0 or 1)
return used
"""


class RedisBudgets:
    """Budgets counted in Redis: one integer per key and period, shared by every process.

    Redis unreachable: `failure_mode` "closed" refuses budgeted keys with 503, "open" admits
    them; a charge that cannot be written is retried, then logged (once per outage) and lost.
    Connections are a bounded pool that callers wait their turn for (with a deadline): a
    burst is backpressure (503 "busy" in either mode), never taken for Redis being down,
    which in "open" mode would admit the burst without its budget, and lose its charges.
    """

    def __init__(
        self,
        client: Any,
        failure_mode: str = "closed",
        prefix: str = "llp",
        now: Callable[[], float] = time.time,
        *,
        pool_size: int = POOL_SIZE,
        pool_wait: float = POOL_WAIT,
    ) -> None:
        self._redis = client
        self._failure_mode = failure_mode
        self._prefix = prefix
        self.now = now
        self._healthy = True
        self._reserve = client.register_script(RESERVE)
        self._gate = Gate(pool_size, pool_wait)
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        failure_mode: str = "closed",
        timeout: float = 1.0,
        *,
        pool_size: int = POOL_SIZE,
    ) -> RedisBudgets:
        """Budgets on the Redis at `url`."""
        return cls(connect(url, timeout, pool_size), failure_mode, pool_size=pool_size)

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
        values = await self._gate.call(lambda: self._redis.mget([s[0] for s in slots]))
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
            self._unreachable(exc)
            return
        refuse_if_exceeded(principal, states, now)

    def _unreachable(self, exc: Exception) -> None:
        """A check that could not be made: 503 busy under load (either mode); Redis down:
        admitted in "open" mode, else 503."""
        if isinstance(exc, RedisBusy):
            raise RateLimiterUnavailable(
                "The budget store is busy; retry shortly.",
                code="rate_limiter_busy",
                headers={"Retry-After": "1"},
            ) from None
        self._failed(exc)
        if self._failure_mode == "open":
            return
        raise RateLimiterUnavailable(
            "The shared budget store is unreachable; retry later.",
            headers={"Retry-After": "1"},
        ) from None

    async def reserve(self, principal: Principal, tokens: int) -> BudgetHold | None:
        """Refuse a spent budget, else hold `tokens` in each period: one atomic script, so
        processes admitting at once each see the others' holds."""
        if principal.budget is None:
            return None
        now = self.now()
        slots = self._slots(principal, now)
        hold = BudgetHold(max(0, tokens))
        args: list[Any] = [hold.tokens]
        for name, _, limit, end in slots:
            # Kept a day past its period: the status page may still show it.
            args += [limit, int(end) + 86400]
            hold.counters.append((name, int(end) + 86400))
        keys = [s[0] for s in slots]
        try:
            result = await self._gate.call(lambda: self._reserve(keys=keys, args=args))
        except Exception as exc:  # redis-py's errors, OSError, timeouts, RedisBusy
            self._unreachable(exc)
            return BudgetHold(0)  # admitted ("open"): nothing held, the tokens still charged
        self._ok()
        held, *used = (int(v) for v in result)
        states = [
            BudgetState(period, count, limit, end)
            for (_, period, limit, end), count in zip(slots, used, strict=True)
        ]
        refuse_if_exceeded(principal, states, now)
        assert held
        return hold

    async def charge(
        self, principal: Principal, tokens: int, hold: BudgetHold | None = None
    ) -> None:
        """Give back what `hold` reserved and add tokens to the key's current periods,
        atomically for every process; retried a few times if Redis cannot take it."""
        give_back = []
        if hold is not None and not hold.settled:
            hold.settled = True
            if hold.tokens > 0:
                give_back = hold.counters
        tokens = max(0, tokens) if principal.budget is not None else 0
        if not give_back and not tokens:
            return
        slots = self._slots(principal, self.now()) if tokens else []

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for name, expires in give_back:
                    pipe.decrby(name, hold.tokens if hold is not None else 0)
                    pipe.expireat(name, expires)  # a DECRBY never leaves a key unexpiring
                for name, _, _, end in slots:
                    pipe.incrby(name, tokens)
                    pipe.expireat(name, int(end) + 86400)
                await pipe.execute()

        delay = 0.1
        for attempt in range(1, CHARGE_ATTEMPTS + 1):
            try:
                await self._gate.call(write)
            except Exception as exc:
                # Only "busy" is tried again: nothing was sent. A write that failed in
                # flight may have been applied, and applying it twice would count the
                # tokens twice (or give a hold back twice: a negative count).
                if not isinstance(exc, RedisBusy) or attempt == CHARGE_ATTEMPTS or self._closed:
                    if not isinstance(exc, RedisBusy):
                        self._failed(exc)
                    log.warning(
                        "could not record %d tokens of key '%s' in its Redis budgets after "
                        "%d attempts",
                        tokens,
                        principal.name,
                        attempt,
                    )
                    return
                await asyncio.sleep(delay)
                delay *= 2
            else:
                self._ok()
                return

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
        self._closed = True
        await self._redis.aclose()
