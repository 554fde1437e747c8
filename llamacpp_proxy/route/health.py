"""Per-server health: a state machine fed by probe (and request) outcomes, the time of the
next probe (exponential backoff while down), and the /health/ready report.

Pure state: the prober asks `next_probe_at`, probes, and feeds the outcome to `observe`.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class State(enum.Enum):
    """Whether a server takes new work."""

    READY = "ready"
    """Answers /health 200: in rotation."""
    LOADING = "loading"
    """Answers 503 (model loading), or not probed yet: out of rotation, expected soon, so
    requests wait for it (bounded) rather than fail."""
    DOWN = "down"
    """Refuses connections, times out or answers nonsense: out of rotation, probed with
    backoff."""


class Outcome(enum.Enum):
    """What one probe (or one request's failure before llama.cpp began it) saw."""

    OK = "ok"
    """/health answered 200."""
    LOADING = "loading"
    """503: the model is still loading."""
    REFUSED = "refused"
    """Connection refused or reset before any answer: nothing listens there."""
    TIMEOUT = "timeout"
    """No answer in time."""
    ERROR = "error"
    """Another status, or an answer that is not llama.cpp's."""


@dataclass(frozen=True)
class ProbePolicy:
    """How often to probe, and when a server counts as down (all in seconds)."""

    ready_interval: float = 1.0
    """Between probes of a ready server (the same poll reads /slots for outside load)."""
    loading_interval: float = 1.0
    """Between probes of a loading server: loading ends at an unknown moment."""
    backoff_base: float = 0.5
    """First wait after a server went down; doubles per failed probe."""
    backoff_max: float = 30.0
    """Longest wait between probes of a down server."""
    jitter: float = 0.1
    """Fraction (+-) by which waits vary, so many gateways do not probe in step."""
    recheck_after: float = 0.05
    """Longest wait for the probe a request's failure asks for (`ServerHealth.recheck`):
    soon, yet at most about 20 probes a second for a server that fails every request."""
    failures_to_down: int = 2
    """Consecutive timeouts/errors that take a READY (or LOADING) server down. One slow
    answer is not a dead server; a refused connection is, and takes it down at once."""


class ServerHealth:
    """The health of one server."""

    def __init__(
        self,
        policy: ProbePolicy | None = None,
        now: float = 0.0,
        rand: Callable[[], float] = random.random,
        initial: State = State.LOADING,
    ) -> None:
        self.policy = policy or ProbePolicy()
        self._rand = rand
        self.state = initial
        self.since = now
        self.failures = 0
        """Consecutive failed probes (timeouts, errors, refusals)."""
        self.next_probe_at = now  # the first probe is due at once
        self._recheck_asked: float | None = None
        """When a request's failure last asked for a probe (`recheck`) that no probe begun
        since has answered."""

    def observe(self, outcome: Outcome, now: float, began: float | None = None) -> bool:
        """Apply a probe outcome (`began`: when that probe was sent; None: a request's
        failure, not a probe); True when the state changed."""
        p = self.policy
        before = self.state
        if outcome is Outcome.OK:
            self.failures = 0
            self._set(State.READY, now)
            self.next_probe_at = now + self._jittered(p.ready_interval)
        elif outcome is Outcome.LOADING:
            self.failures = 0
            self._set(State.LOADING, now)
            self.next_probe_at = now + self._jittered(p.loading_interval)
        else:
            self.failures += 1
            # One slow or odd answer is not a dead server, whether it was ready or loading
            # (not yet probed included: a gateway started beside a busy server).
            if (
                self.state is not State.DOWN
                and outcome is not Outcome.REFUSED
                and self.failures < p.failures_to_down
            ):
                interval = p.ready_interval if self.state is State.READY else p.loading_interval
                self.next_probe_at = now + self._jittered(interval)
            else:
                if self.state is not State.DOWN:
                    self.failures = 1  # the backoff counts from the fall
                self._set(State.DOWN, now)
                wait = min(p.backoff_max, p.backoff_base * 2.0 ** (self.failures - 1))
                self.next_probe_at = now + self._jittered(wait)
        asked = self._recheck_asked
        if asked is not None:
            if began is not None and began >= asked:
                self._recheck_asked = None  # this probe was sent after the failure: answered
            else:
                # A probe sent before the failure (in flight when it came), or a request's
                # own outcome, says nothing of it: the recheck's earlier time still holds.
                self.next_probe_at = min(self.next_probe_at, asked + p.recheck_after)
        return self.state is not before

    def recheck(self, now: float) -> None:
        """A request failed on this server in a way that says nothing certain about it:
        bring its next probe forward to within `recheck_after`, and let that decide (a
        probe already in flight, sent before, does not: its answer keeps this time)."""
        self.next_probe_at = min(self.next_probe_at, now + self.policy.recheck_after)
        self._recheck_asked = now

    def _set(self, state: State, now: float) -> None:
        if state is not self.state:
            self.state = state
            self.since = now

    def _jittered(self, wait: float) -> float:
        j = self.policy.jitter
        return wait * (1.0 + j * (2.0 * self._rand() - 1.0)) if j else wait


@dataclass(frozen=True)
class ServerStatus:
    """One server as /health/ready shows it: host:port only, never credentials."""

    display: str
    state: str
    """ready, loading, down, ejected (ready, but out of rotation for failing requests), or
    draining (removed by a reload, finishing its requests)."""
    slots_busy: int
    slots_total: int | None
    """From /props; None until known."""


def readiness(models: Mapping[str, Sequence[ServerStatus]]) -> tuple[bool, dict[str, Any]]:
    """(every model has a ready server, the /health/ready body)."""
    body: dict[str, Any] = {}
    ok = bool(models)
    for name, servers in models.items():
        model_ready = any(s.state == State.READY.value for s in servers)
        ok = ok and model_ready
        body[name] = {
            "status": "ready" if model_ready else "unavailable",
            "servers": [
                {
                    "server": s.display,
                    "status": s.state,
                    "slots_busy": s.slots_busy,
                    "slots_total": s.slots_total,
                }
                for s in servers
            ],
        }
    return ok, {"status": "ready" if ok else "unavailable", "models": body}
