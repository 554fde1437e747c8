"""Outlier ejection: a server whose /health answers but whose generations fail, request after
request, leaves rotation for a while (what Envoy calls outlier detection).

The prober only sees /health. A llama-server can answer it and still fail every generation
(a broken GPU context, a model that errors on every prompt, a proxy in front that resets
each stream), and a failing server frees its slots fastest, so least-busy routing would
send it more work than any other. So the request path reports how its requests ended on
each server (one request counts once per server, whatever its `n`: `RequestResults`):

- a failure that is the server's (a 5xx answer other than 503, a malformed answer, a
  connection closed mid-answer, llama.cpp's own error event) counts; the client's errors
  (4xx), timeouts (a long prompt), 503 (loading: the prober's to judge) and refusals (down:
  the prober's) do not count either way;
- a request counts once toward a server's run, whatever its number of generations (`n`
  choices, several prompts): its failures there are one failure, and a success of any of
  its generations there is a success. Else one request with `n: 5` on a server that fails
  every generation would eject it by itself, and a client could take servers out of
  rotation with a handful of requests;
- `failures` such failed requests in a row, with no success between, eject the server for
  `base` seconds, doubled for each ejection that follows without a success between them,
  up to `max`; then it is back in rotation, and one more failure ejects it again;
- a success resets both counts.

Never more than half of a pool's servers are ejected at once, and never the last server
that takes work: ejection moves load off a sick server onto healthy ones, and with no
healthy one left it would only turn its 502s into 503s. (A client who can make llama.cpp
fail on purpose can thus take at most half of a pool out of rotation, for as long as its
requests are the only ones those servers see.)

Pure state: the router owns the timers and applies `usable`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EjectionPolicy:
    """When a server leaves rotation for failing requests (seconds)."""

    failures: int = 5
    """Failed requests in a row that eject a server (--eject-after-failures); 0: never."""
    base: float = 10.0
    """The first ejection's length."""
    max: float = 300.0
    """The longest ejection."""


class Outlier:
    """One server's run of failures and its ejections."""

    __slots__ = ("ejected", "ejections", "failures", "policy")

    def __init__(self, policy: EjectionPolicy) -> None:
        self.policy = policy
        self.failures = 0
        """Requests in a row that failed by the server's fault."""
        self.ejections = 0
        """Ejections since the last success (sets the next one's length)."""
        self.ejected = False

    def succeeded(self) -> None:
        """A request's generation on this server ended well."""
        self.failures = 0
        self.ejections = 0

    def failed(self) -> bool:
        """A request failed by the server's fault; True when that makes it worth ejecting
        (the router decides whether the pool can spare it)."""
        self.failures += 1
        limit = self.policy.failures
        if limit <= 0 or self.ejected:
            return False
        # Back from an ejection with no success since: one more failure sends it out again.
        return self.failures >= (1 if self.ejections else limit)

    def eject(self) -> float:
        """Out of rotation; returns for how long."""
        p = self.policy
        self.ejected = True
        length = min(p.max, p.base * 2.0**self.ejections)
        self.ejections += 1
        return length

    def readmit(self) -> None:
        """Back in rotation (the ejection ran out, or the pool needs it)."""
        self.ejected = False
        self.failures = 0


class RequestResults:
    """What one request's generations have reported so far, per server, so that the request
    counts once toward each server's run: its first failure there counts, its later ones do
    not; a success counts (and resets the run) unless one was counted already, and once it
    has, a failure of a later generation does not count. Made only for requests with more
    than one generation; it lives as long as the request."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[object, bool] = {}

    def news(self, server: object, ok: bool) -> bool:
        """Whether a generation's end on `server` (the router's object for it, not its key:
        a server removed and added again is another) counts toward its run."""
        prior = self._seen.get(server)
        if prior is True or prior is ok:
            return False
        self._seen[server] = ok
        return True
