"""The queue discipline of requests waiting for a slot: fair between keys, bounded.

Start-time fair queueing (Goyal, Vin and Cheng's SFQ): each waiter gets a start tag, the
larger of the queue's virtual time and its key's previous finish tag, and finishes
`1 / weight` later; waiters are offered slots in order of start tag (arrival breaks ties).
So a key's 500 queued requests hold tags 0, 1, 2 ... and another key's one request, arriving
behind them, gets the current virtual time: it goes next, not 500th. A key of weight 2 gets
two turns to a weight-1 key's one. A key that was idle does not bank credit (its start is
never below the virtual time), and within one key the order stays first come first served.

The router only pushes, removes, and walks waiters in `in_order()`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Generic, TypeVar

W = TypeVar("W")

_PRUNE_SLACK = 1024
"""Idle keys' finish tags kept beyond the queued keys' before the stale ones are dropped."""


class FairQueue(Generic[W]):
    """Waiters served fairly between keys (weighted), at most `limit` of them."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("queue limit must be >= 0")
        self.limit = limit
        self._tags: dict[W, tuple[float, int, str | None]] = {}
        """Waiter -> (start tag, arrival number, key)."""
        self._by_key: dict[str | None, dict[W, None]] = {}
        """Each key's waiters in arrival (= start tag) order; a dict removes in O(1)."""
        self._finish: dict[str | None, float] = {}
        """Each key's last finish tag: where its next waiter starts, at the earliest."""
        self._vtime = 0.0
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._tags)

    @property
    def full(self) -> bool:
        """No room for one more waiter."""
        return len(self._tags) >= self.limit

    def push(self, waiter: W, key: str | None = None, weight: float = 1.0) -> bool:
        """Add a waiter of `key` (its share: `weight`, > 0); False when full."""
        if self.full:
            return False
        if not weight > 0:
            raise ValueError("queue weight must be > 0")
        finish = self._finish
        if len(finish) > len(self._by_key) + _PRUNE_SLACK:
            self._prune()
        start = max(self._vtime, finish.get(key, 0.0))
        finish[key] = start + 1.0 / weight
        self._tags[waiter] = (start, next(self._arrivals), key)
        self._by_key.setdefault(key, {})[waiter] = None
        return True

    def served(self, key: str | None = None, weight: float = 1.0) -> None:
        """A request of `key` took a slot without waiting: it counts as that key's turn.

        Without this a batch whose first request got the free slot would also have the
        queue's first tag, level with another key arriving later, and win the tie.
        """
        if not weight > 0:
            raise ValueError("queue weight must be > 0")
        start = max(self._vtime, self._finish.get(key, 0.0))
        self._finish[key] = start + 1.0 / weight
        # Virtual time follows what is served, but never past a waiter still queued.
        vtime = min(start, self._head_start()) if self._tags else start
        if vtime > self._vtime:
            self._vtime = vtime
        if len(self._finish) > len(self._by_key) + _PRUNE_SLACK:
            self._prune()

    def remove(self, waiter: W) -> None:
        """Take a waiter out (granted, timed out or cancelled); absent is fine."""
        tag = self._tags.pop(waiter, None)
        if tag is None:
            return
        start, _, key = tag
        mine = self._by_key[key]
        del mine[waiter]
        if not mine:
            del self._by_key[key]
        # Virtual time follows the head of the queue (the waiter being served). A waiter
        # leaving from further back (its client gave up) must not move it: that would
        # push a newly arriving key behind everyone still queued.
        if start > self._vtime and start <= self._head_start():
            self._vtime = start

    def in_order(self) -> Iterator[W]:
        """Waiters in the order they should be offered a slot (a snapshot: safe to remove)."""
        tags = self._tags
        return iter(sorted(tags, key=tags.__getitem__))

    def _head_start(self) -> float:
        """The smallest start tag queued (each key's first waiter has its key's smallest)."""
        tags = self._tags
        return min(
            (tags[next(iter(waiters))][0] for waiters in self._by_key.values()),
            default=float("inf"),
        )

    def _prune(self) -> None:
        # A finish tag at or below virtual time no longer changes where that key starts.
        vtime = self._vtime
        for key in [k for k, f in self._finish.items() if f <= vtime and k not in self._by_key]:
            del self._finish[key]
