"""What llama.cpp's answers to the gateway's polls mean: /health -> an Outcome, /props ->
total_slots, /slots -> how many slots are processing. Pure; bodies come from the prober."""

from __future__ import annotations

from .. import fastjson
from .health import Outcome

MAX_SLOTS = 4096
"""More slots than any real server has: a larger count is a bad answer, not capacity."""


def outcome_of_status(status: int) -> Outcome:
    """A /health answer's status as a probe outcome."""
    if status == 200:
        return Outcome.OK
    if status == 503:
        return Outcome.LOADING
    return Outcome.ERROR


def outcome_of_exception(exc: BaseException) -> Outcome:
    """A failed /health request as a probe outcome."""
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, OSError):  # refused, reset, unreachable, DNS: nothing answers there
        return Outcome.REFUSED
    return Outcome.ERROR


def parse_total_slots(body: bytes) -> int | None:
    """`total_slots` from a /props body, or None if absent or implausible."""
    try:
        props = fastjson.loads(body)
    except ValueError:
        return None
    n = props.get("total_slots") if isinstance(props, dict) else None
    if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_SLOTS:
        return n
    return None


def parse_processing(body: bytes) -> int | None:
    """How many slots a /slots body shows processing, or None if it is not a slot list
    (the server runs without --slots, or answered something else)."""
    try:
        slots = fastjson.loads(body)
    except ValueError:
        return None
    if not isinstance(slots, list) or len(slots) > MAX_SLOTS:
        return None
    busy = 0
    for slot in slots:
        if not isinstance(slot, dict) or not isinstance(slot.get("is_processing"), bool):
            return None
        busy += slot["is_processing"]
    return busy
