"""Which failures of a generation may be retried on another server of the pool.

The rule: a POST that may have reached llama.cpp is never sent again (it may be generating,
and a second copy would double the work and the bill). Only a failure that proves llama.cpp
did not begin the generation is retried elsewhere:
- connecting failed (refused, unreachable, connect timeout, TLS): no request byte left us;
- llama.cpp answered 503 (loading): it read the request and refused to start it.
Everything after the first request byte was written and before an answer arrived (a reset,
a read timeout) is ambiguous, so it is the client's error, not a retry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .health import Outcome
from .probe import outcome_of_exception


class Phase(enum.Enum):
    """How far a request to llama.cpp got before it failed."""

    CONNECT = "connect"
    """No byte of the request was written (connecting, or waiting for a connection)."""
    SENT = "sent"
    """Some or all of the request was written; no response head was read."""
    ANSWERED = "answered"
    """A response head was read (its status is known)."""


@dataclass(frozen=True)
class Verdict:
    """What to do after a failure."""

    retry_elsewhere: bool
    """Safe to send the same request to another server of the pool."""
    health: Outcome | None
    """What to tell the server's health (None: the failure says nothing about it)."""
    recheck: bool = False
    """Probe the server soon: the failure may be the server's, or this request's alone
    (one connection closed), and the prober, not one request, judges which."""


def after_failure(
    phase: Phase, *, status: int | None = None, error: BaseException | None = None
) -> Verdict:
    """The verdict for a generation that failed at `phase` (with the answer's status, or
    the exception raised)."""
    if phase is Phase.CONNECT:
        return Verdict(True, outcome_of_exception(error) if error is not None else Outcome.ERROR)
    if phase is Phase.ANSWERED:
        if status == 503:
            # llama.cpp refused to start it (loading): safe elsewhere. The server is
            # probed soon, and /health says whether it is loading: one refusal taking the
            # only server of a pool out held every request behind a probe's round trip,
            # and a burst of them past --max-queue.
            return Verdict(True, None, recheck=True)
        return Verdict(False, None)
    # SENT: llama.cpp may be working on it. A connection closed or reset before any answer
    # may be a dying server, or this one request's (a proxy between, a thread that
    # crashed): the server is probed soon and the probe decides (a dead one refuses it
    # and is down at once). Counted as a failure itself, two such requests in a row took
    # a server whose /health answered out of rotation. A slow first byte is a long
    # prompt, not a sick server.
    if error is not None and not isinstance(error, TimeoutError):
        return Verdict(False, None, recheck=True)
    return Verdict(False, None)
