"""Per-key limits: an exact sliding window of requests, a token budget, and concurrent slots.

Pure bookkeeping with an injected clock and no Tornado imports, so the arithmetic is tested
exactly without sleeps. The async `admit`/`finish` interface lets a shared (Redis) limiter
stand in for this one without changing the handlers.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ConcurrencyLimited, RateLimited
from .auth import Limits, Principal

TOKEN_WINDOW = 60.0  # token budgets are per minute, as OpenAI's TPM


def format_duration(seconds: float) -> str:
    """OpenAI's reset-header duration format (Go's): `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`."""
    if seconds <= 0:
        return "0s"
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after_header(seconds: float) -> str:
    """Whole seconds for `Retry-After`, rounded up and at least 1, so a retry is never early."""
    return str(max(1, math.ceil(seconds)))


class SlidingWindow:
    """Weighted events in the last `length` seconds, inclusive of both ends.

    An event at time t is counted while `now - t <= length`: a request admitted only when
    fewer than N are counted guarantees that no closed interval of that length holds more
    than N admitted requests.
    """

    __slots__ = ("events", "length", "total")

    def __init__(self, length: float) -> None:
        self.length = length
        # [time, weight] lists, not tuples: a token reservation is settled in place.
        self.events: deque[list[float]] = deque()
        self.total = 0

    def expire(self, now: float) -> None:
        """Forget events that fell out of the window."""
        events = self.events
        length = self.length
        # The same comparison as the rule (now - t <= length), not t < now - length: the
        # two round differently in floating point.
        while events and now - events[0][0] > length:
            self.total -= int(events.popleft()[1])

    def add(self, now: float, weight: int = 1) -> list[float]:
        """Record an event; the entry returned can be settled later (`settle`)."""
        entry = [now, weight]
        self.events.append(entry)
        self.total += weight
        return entry

    def settle(self, entry: list[float], now: float) -> None:
        """Take a reserved entry's weight back out, if the window still counts it."""
        self.expire(now)
        # After expire, an entry older than the window has been popped and its weight
        # already subtracted; one still counted is zeroed in place (O(1), no search).
        if now - entry[0] <= self.length:
            self.total -= int(entry[1])
        entry[1] = 0

    def wait_until_below(self, limit: int, now: float) -> float:
        """Seconds until the counted total drops below `limit` (0 if it already is)."""
        excess = self.total - limit
        if excess < 0:
            return 0.0
        for t, weight in self.events:
            excess -= int(weight)
            if excess < 0:
                # Counted while now - t <= length: gone just after t + length.
                return max(0.0, t + self.length - now) + 0.001
        return 0.0

    def reset_after(self, now: float) -> float:
        """Seconds until the window is empty again."""
        return self.events[-1][0] + self.length - now if self.events else 0.0


@dataclass(frozen=True)
class Cost:
    """What a request may cause upstream, known once its body is parsed."""

    generations: int = 1
    """llama.cpp generations (prompts x n): what a key's max_concurrent counts."""
    tokens: int = 0
    """Admission estimate: prompt tokens (bytes / 4) x n + max_tokens x generations."""


ONE_GENERATION = Cost()
"""The cost of a request whose body says nothing more (and the default)."""


@dataclass
class Admission:
    """What `admit` granted: headers to send, and what `finish` must charge and release."""

    principal: Principal
    headers: dict[str, str] = field(default_factory=dict)
    slots: int = 1
    """Generations of this request that may run at once (its share of the key's slots)."""
    held_slots: int = 0
    """Concurrent slots of the key this admission holds until `finish`."""
    reserved_tokens: int = 0
    """The estimate charged at admission; `finish` replaces it with the real count."""
    reservation: list[float] | None = None
    """The in-memory limiter's window entry for the reserved tokens."""
    finished: bool = False
    lease_id: str | None = None
    """The shared limiter's name for this admission's slots and token record."""


@dataclass
class KeyUsage:
    """What a limiter knows of one key just before deciding on a request (times in seconds)."""

    requests_used: int = 0
    requests_wait: float = 0.0
    """Until fewer than the limit are counted."""
    requests_reset: float = 0.0
    """Until the window is empty."""
    tokens_used: int = 0
    tokens_wait: float = 0.0
    """Until the window has room for this request's estimate."""
    tokens_reset: float = 0.0
    in_flight: int = 0
    """Generations of this key holding a concurrent slot."""


def tokens_threshold(budget: int, cost: Cost) -> int:
    """Admit only while fewer tokens than this are counted (room for the estimate).

    `used + estimate <= budget`, and never at `used >= budget` (an estimate of 0 still
    needs the budget not to be spent).
    """
    return budget - max(cost.tokens, 1) + 1


def refusal_kind(limits: Limits, usage: KeyUsage, cost: Cost) -> str | None:
    """Which limit refuses the request (too_large, tokens, requests, concurrency), or None.

    The Redis limiter's Lua script applies the same rule, atomically, in the same order.
    """
    if limits.tokens_per_minute:
        if cost.tokens > limits.tokens_per_minute:
            return "too_large"
        if usage.tokens_used >= tokens_threshold(limits.tokens_per_minute, cost):
            return "tokens"
    if limits.requests and usage.requests_used >= limits.requests:
        return "requests"
    if limits.max_concurrent and usage.in_flight >= limits.max_concurrent:
        return "concurrency"
    return None


def granted_slots(limits: Limits, usage: KeyUsage, cost: Cost) -> int:
    """Slots an admitted request takes: its generations, at most the key's free slots
    (the rest of its generations wait for one of these)."""
    if not limits.max_concurrent:
        return 0
    return max(1, min(cost.generations, limits.max_concurrent - usage.in_flight))


def conclude(
    principal: Principal, refused: str | None, usage: KeyUsage, cost: Cost = ONE_GENERATION
) -> Admission:
    """The admission with its rate-limit headers; raises RateLimited when `refused`."""
    limits = principal.limits
    assert limits is not None
    admitted = refused is None
    headers: dict[str, str] = {}
    if limits.requests:
        used = usage.requests_used + (1 if admitted else 0)
        reset = limits.window if admitted else usage.requests_reset
        headers["x-ratelimit-limit-requests"] = str(limits.requests)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.requests - used))
        headers["x-ratelimit-reset-requests"] = format_duration(reset)
    if limits.tokens_per_minute:
        budget = limits.tokens_per_minute
        used = usage.tokens_used + (cost.tokens if admitted else 0)
        headers["x-ratelimit-limit-tokens"] = str(budget)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, budget - used))
        headers["x-ratelimit-reset-tokens"] = format_duration(
            TOKEN_WINDOW if admitted and cost.tokens else usage.tokens_reset
        )
    if admitted:
        return Admission(principal, headers)
    name = principal.name
    error: RateLimited
    if refused == "too_large":
        # No wait makes it fit: no Retry-After, the message says what to change.
        error = RateLimited(
            f"Request too large for key '{name}': it may use up to {cost.tokens} tokens "
            f"(its prompt for each of n choices, plus max_tokens for each of its "
            f"{cost.generations} generation(s)) and "
            f"the key's budget is {limits.tokens_per_minute} tokens per minute. Lower "
            "max_tokens, n or the number of prompts.",
            code="tokens_rate_limit_exceeded",
        )
        error.error_type = "tokens"
        error.headers = headers
        raise error
    if refused == "tokens":
        wait = usage.tokens_wait
        error = RateLimited(
            f"Rate limit reached for key '{name}': {limits.tokens_per_minute} tokens per "
            f"minute; this request may use up to {cost.tokens}. Retry in {wait:.1f}s.",
            code="tokens_rate_limit_exceeded",
        )
        error.error_type = "tokens"
    elif refused == "requests":
        wait = usage.requests_wait
        error = RateLimited(
            f"Rate limit reached for key '{name}': {limits.requests} requests per "
            f"{limits.window:g}s. Retry in {wait:.1f}s."
        )
    else:
        wait = 1.0
        error = ConcurrencyLimited(
            f"Key '{name}' already has {limits.max_concurrent} generations in progress "
            "(each prompt and each of n counts one); wait for one to finish."
        )
    error.headers = {**headers, "Retry-After": retry_after_header(wait)}
    raise error


class Limiter(Protocol):
    """Admits or refuses a request for a principal; charges it when it ends."""

    async def admit(self, principal: Principal, cost: Cost = ONE_GENERATION) -> Admission:
        """Admit the request (reserving its estimate and slots) or raise RateLimited."""

    async def finish(self, admission: Admission, tokens: int) -> None:
        """Settle the reservation with the tokens really used, release the slots; idempotent."""


@dataclass
class _KeyState:
    requests: SlidingWindow | None
    tokens: SlidingWindow | None
    in_flight: int = 0

    def idle(self) -> bool:
        return (
            self.in_flight == 0
            and not (self.requests and self.requests.events)
            and not (self.tokens and self.tokens.events)
        )


class InMemoryLimiter:
    """The single-process limiter. State exists only for keys with limits that were used."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._keys: dict[str, _KeyState] = {}
        self._admissions = 0

    def _state(self, principal: Principal, now: float) -> _KeyState:
        limits = principal.limits
        state = self._keys.get(principal.name)
        if state is None:
            state = self._keys[principal.name] = _KeyState(None, None)
        # Limits can change under a key (SIGHUP reload): follow them, keeping the history.
        if limits and limits.requests:
            if state.requests is None:
                state.requests = SlidingWindow(limits.window)
            state.requests.length = limits.window
            state.requests.expire(now)
        else:
            state.requests = None
        if limits and limits.tokens_per_minute:
            if state.tokens is None:
                state.tokens = SlidingWindow(TOKEN_WINDOW)
            state.tokens.expire(now)
        else:
            state.tokens = None
        return state

    async def admit(self, principal: Principal, cost: Cost = ONE_GENERATION) -> Admission:
        """Admit the request or raise RateLimited; see the Limiter protocol."""
        limits = principal.limits
        if limits is None:
            return Admission(principal, slots=cost.generations)
        now = self._now()
        state = self._state(principal, now)
        requests, tokens = state.requests, state.tokens
        usage = KeyUsage(in_flight=state.in_flight)
        if requests is not None and limits.requests:
            usage.requests_used = requests.total
            usage.requests_wait = requests.wait_until_below(limits.requests, now)
            usage.requests_reset = requests.reset_after(now)
        if tokens is not None and limits.tokens_per_minute:
            usage.tokens_used = tokens.total
            usage.tokens_wait = tokens.wait_until_below(
                tokens_threshold(limits.tokens_per_minute, cost), now
            )
            usage.tokens_reset = tokens.reset_after(now)
        refused = refusal_kind(limits, usage, cost)
        if refused is not None:
            self._forget_if_idle(principal.name, state)
        admission = conclude(principal, refused, usage, cost)
        if requests is not None:
            requests.add(now)
        admission.held_slots = granted_slots(limits, usage, cost)
        admission.slots = admission.held_slots or cost.generations
        state.in_flight += admission.held_slots
        if tokens is not None and cost.tokens > 0:
            admission.reservation = tokens.add(now, cost.tokens)
            admission.reserved_tokens = cost.tokens
        self._admissions += 1
        if self._admissions % 1024 == 0:
            self.prune()
        return admission

    async def finish(self, admission: Admission, tokens: int) -> None:
        """Settle the estimate with the real tokens and release the slots, once per
        admission whatever the exit path."""
        self.finish_now(admission, tokens)

    def finish_now(self, admission: Admission, tokens: int) -> None:
        """finish(), which waits for nothing here: called directly, it saves the request a
        task (no I/O, so nothing to keep off the response's path)."""
        if admission.finished:
            return
        admission.finished = True
        limits = admission.principal.limits
        if limits is None:
            return
        name = admission.principal.name
        state = self._keys.get(name)
        if state is None:
            return
        state.in_flight -= admission.held_slots
        if state.tokens is not None:
            now = self._now()
            if admission.reservation is not None:
                state.tokens.settle(admission.reservation, now)
            if tokens > 0:
                state.tokens.add(now, tokens)
        self._forget_if_idle(name, state)

    def in_flight(self, name: str) -> int:
        """Generations of this key holding a concurrent slot now."""
        state = self._keys.get(name)
        return state.in_flight if state else 0

    def prune(self) -> None:
        """Drop the state of keys with nothing left in any window (bounds memory)."""
        now = self._now()
        for name in list(self._keys):
            state = self._keys[name]
            if state.requests:
                state.requests.expire(now)
            if state.tokens:
                state.tokens.expire(now)
            self._forget_if_idle(name, state)

    def _forget_if_idle(self, name: str, state: _KeyState) -> None:
        if state.idle():
            self._keys.pop(name, None)

    @property
    def tracked_keys(self) -> int:
        """How many keys hold state (for tests and metrics)."""
        return len(self._keys)
