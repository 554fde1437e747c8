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

from .auth import Principal
from .errors import ProxyError, RateLimited

TOKEN_WINDOW = 60.0  # token budgets are per minute, as OpenAI's TPM


class ConcurrencyLimited(RateLimited):
    """Every concurrent slot of the key is busy."""

    code = "concurrency_limit_exceeded"


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
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def expire(self, now: float) -> None:
        """Forget events that fell out of the window."""
        events = self.events
        horizon = now - self.length
        while events and events[0][0] < horizon:
            self.total -= events.popleft()[1]

    def add(self, now: float, weight: int = 1) -> None:
        """Record an event."""
        self.events.append((now, weight))
        self.total += weight

    def wait_until_below(self, limit: int, now: float) -> float:
        """Seconds until the counted total drops below `limit` (0 if it already is)."""
        excess = self.total - limit
        if excess < 0:
            return 0.0
        for t, weight in self.events:
            excess -= weight
            if excess < 0:
                # Counted while now - t <= length: gone just after t + length.
                return max(0.0, t + self.length - now) + 0.001
        return 0.0

    def reset_after(self, now: float) -> float:
        """Seconds until the window is empty again."""
        return self.events[-1][0] + self.length - now if self.events else 0.0


@dataclass
class Admission:
    """What `admit` granted: headers to send, and what `finish` must charge and release."""

    principal: Principal
    headers: dict[str, str] = field(default_factory=dict)
    holds_slot: bool = False
    finished: bool = False


class Limiter(Protocol):
    """Admits or refuses a request for a principal; charges it when it ends."""

    async def admit(self, principal: Principal) -> Admission:
        """Admit the request or raise RateLimited (with its headers)."""

    async def finish(self, admission: Admission, tokens: int) -> None:
        """Charge the tokens the request used and release its concurrent slot; idempotent."""


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
        state = self._keys.get(principal.name)
        if state is None:
            limits = principal.limits
            state = _KeyState(
                requests=SlidingWindow(limits.window) if limits and limits.requests else None,
                tokens=SlidingWindow(TOKEN_WINDOW) if limits and limits.tokens_per_minute else None,
            )
            self._keys[principal.name] = state
        if state.requests:
            state.requests.expire(now)
        if state.tokens:
            state.tokens.expire(now)
        return state

    async def admit(self, principal: Principal) -> Admission:
        """Admit the request or raise RateLimited; see the Limiter protocol."""
        limits = principal.limits
        if limits is None:
            return Admission(principal)
        now = self._now()
        state = self._state(principal, now)
        headers: dict[str, str] = {}
        refusal: ProxyError | None = None
        wait = 0.0

        if limits.tokens_per_minute and state.tokens is not None:
            tokens = state.tokens
            budget = limits.tokens_per_minute
            headers["x-ratelimit-limit-tokens"] = str(budget)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, budget - tokens.total))
            headers["x-ratelimit-reset-tokens"] = format_duration(tokens.reset_after(now))
            if tokens.total >= budget:
                wait = tokens.wait_until_below(budget, now)
                refusal = RateLimited(
                    f"Rate limit reached for key '{principal.name}': {budget} tokens per "
                    f"minute. Retry in {wait:.1f}s.",
                    code="tokens_rate_limit_exceeded",
                )
                refusal.error_type = "tokens"

        if limits.requests and state.requests is not None:
            window = state.requests
            admit = refusal is None and window.total < limits.requests
            if admit:
                window.add(now)
            headers["x-ratelimit-limit-requests"] = str(limits.requests)
            headers["x-ratelimit-remaining-requests"] = str(max(0, limits.requests - window.total))
            headers["x-ratelimit-reset-requests"] = format_duration(window.reset_after(now))
            if refusal is None and not admit:
                wait = window.wait_until_below(limits.requests, now)
                refusal = RateLimited(
                    f"Rate limit reached for key '{principal.name}': {limits.requests} requests "
                    f"per {limits.window:g}s. Retry in {wait:.1f}s."
                )

        if refusal is None and limits.max_concurrent and state.in_flight >= limits.max_concurrent:
            if state.requests is not None:  # the refused request must not use up the window
                state.requests.events.pop()
                state.requests.total -= 1
                headers["x-ratelimit-remaining-requests"] = str(
                    max(0, (limits.requests or 0) - state.requests.total)
                )
            wait = 1.0
            refusal = ConcurrencyLimited(
                f"Key '{principal.name}' already has {limits.max_concurrent} requests in "
                "progress; wait for one to finish."
            )

        if refusal is not None:
            self._forget_if_idle(principal.name, state)
            refusal.headers = {**headers, "Retry-After": retry_after_header(wait)}
            raise refusal

        admission = Admission(principal, headers)
        if limits.max_concurrent:
            state.in_flight += 1
            admission.holds_slot = True
        self._admissions += 1
        if self._admissions % 1024 == 0:
            self.prune()
        return admission

    async def finish(self, admission: Admission, tokens: int) -> None:
        """Charge tokens and release the slot, once per admission whatever the exit path."""
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
        if admission.holds_slot:
            state.in_flight -= 1
        if state.tokens is not None and tokens > 0:
            state.tokens.add(self._now(), tokens)
        self._forget_if_idle(name, state)

    def in_flight(self, name: str) -> int:
        """Requests of this key holding a concurrent slot now."""
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
