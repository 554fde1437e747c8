"""The queue discipline of requests waiting for a slot: FIFO, bounded.

The router only pushes, removes, and walks waiters in `in_order()`; fairness between keys
(a later issue) replaces this class behind the same four methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

W = TypeVar("W")


class FifoQueue(Generic[W]):
    """Waiters in arrival order, at most `limit` of them."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("queue limit must be >= 0")
        self.limit = limit
        # A dict keeps insertion order and removes a cancelled waiter in O(1).
        self._items: dict[W, None] = {}

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        """No room for one more waiter."""
        return len(self._items) >= self.limit

    def push(self, waiter: W, key: str | None = None) -> bool:
        """Add a waiter (`key`: whose it is, for a fair queue); False when full."""
        if self.full:
            return False
        self._items[waiter] = None
        return True

    def remove(self, waiter: W) -> None:
        """Take a waiter out (granted, timed out or cancelled); absent is fine."""
        self._items.pop(waiter, None)

    def in_order(self) -> Iterator[W]:
        """Waiters in the order they should be offered a slot (a snapshot: safe to remove)."""
        return iter(list(self._items))
