"""Brute-force protection: client addresses that keep failing authentication are refused
for a while. Valid keys are never affected: the throttle only answers for failures.

Memory is bounded: at most `max_clients` addresses are tracked (the least recently failing
are forgotten first), and an address's record goes once its window is empty.

An IPv6 client is counted by its /64: a host is usually given a whole /64, and counted per
address a guesser could rotate its source address on every try and never be refused.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from ..errors import TooManyAuthFailures
from .ratelimit import SlidingWindow, retry_after_header


class AuthFailureThrottle:
    """Counts failed authentications per client address in a sliding window."""

    def __init__(
        self,
        limit: int,
        window: float,
        max_clients: int = 10_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._now = now
        self._failures: OrderedDict[str, SlidingWindow] = OrderedDict()

    def check(self, address: str) -> None:
        """Raise TooManyAuthFailures if this address is over its limit (call on failure)."""
        failures = self._failures.get(client_of(address))
        if failures is None:
            return
        now = self._now()
        failures.expire(now)
        if failures.total >= self.limit:
            wait = failures.wait_until_below(self.limit, now)
            raise TooManyAuthFailures(
                f"Too many requests with invalid API keys from this address; retry in {wait:.0f}s.",
                headers={"Retry-After": retry_after_header(wait)},
            )

    def record_failure(self, address: str) -> None:
        """Count one failed authentication."""
        address = client_of(address)
        now = self._now()
        self._drop_expired(now)
        failures = self._failures.get(address)
        if failures is None:
            failures = self._failures[address] = SlidingWindow(self.window)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(address)
            failures.expire(now)
        failures.add(now)

    def _drop_expired(self, now: float) -> None:
        # Records are ordered by their last failure (move_to_end), so the expired ones are at
        # the front: a failure drops them in amortised O(1), with no timer to run.
        failures = self._failures
        while failures:
            oldest = next(iter(failures.values()))
            if oldest.events and now - oldest.events[-1][0] <= self.window:
                return
            failures.popitem(last=False)

    def prune(self) -> None:
        """Forget addresses with no failure left in the window."""
        now = self._now()
        for address in list(self._failures):
            failures = self._failures[address]
            failures.expire(now)
            if not failures.events:
                del self._failures[address]

    @property
    def tracked_addresses(self) -> int:
        """How many addresses hold state."""
        return len(self._failures)


def client_of(address: str) -> str:
    """Whom a failure is counted against: an IPv4 address (also when written IPv4-mapped),
    or an IPv6 address's /64. Anything else (a Unix socket's "unknown") as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
