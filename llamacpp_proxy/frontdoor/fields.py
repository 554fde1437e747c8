"""Field validators the Anthropic and Responses front doors share (pure: no I/O).

The checks are the same in both; the 400 is each front door's own (Anthropic's
`param: message`, OpenAI's `Invalid 'param': message`), so each validator takes the front
door's error factory, `bad(param, message) -> InvalidRequest`, and words only the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import InvalidRequest

MAX_INT32 = 2**31 - 1  # llama.cpp reads integer parameters as 32-bit

BadField = Callable[[str, str], InvalidRequest]
"""A front door's factory for the 400 naming a field: (param, message) -> the error."""


def is_int(value: Any) -> bool:
    """An integer, and not a boolean (JSON's true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def huge_int(value: Any) -> int | None:
    """A JSON integer beyond 64 bits, which orjson reads as a float: as an int (its float's
    value), so that a check says it is out of range, not that it is no integer. None for
    anything else (a float a client wrote as one, like 5.0 or 1e3, stays a float)."""
    if type(value) is float and value.is_integer() and abs(value) >= 2**63:
        return int(value)
    return None


def number(body: dict[str, Any], name: str, lo: float, hi: float, bad: BadField) -> float | None:
    """`body[name]` as a float in [lo, hi]; None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise bad(name, f"must be a number, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise bad(name, f"must be between {lo:g} and {hi:g}, not {value}")
    return float(value)


def typed(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, bad: BadField
) -> Any:
    """`body[name]` when absent or of `kind`; else the 400 saying it `must be {what}`."""
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise bad(name, f"must be {what}")
    return value
