"""The objects every handler shares, built once in main/app and passed via initialize()."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .frontdoor.constraint_check import ConstraintChecker
from .guard.auth import KeyStore
from .guard.auth_throttle import AuthFailureThrottle
from .guard.budgets import Budgets
from .guard.ratelimit import Limiter
from .observe.logs import AccessLog
from .observe.metrics import Metrics
from .observe.usage import UsageLedger
from .upstream.llamacpp import LlamaCppClient
from .upstreams import Routes


@dataclass
class AppContext:
    """Shared state of one running proxy."""

    settings: Settings
    keys: KeyStore
    limiter: Limiter
    routes: Routes
    """Models -> pools of llama.cpp servers, their routers and clients."""
    access_log: AccessLog | None = None
    """One line per request (None: --no-access-log)."""
    auth_throttle: AuthFailureThrottle | None = None
    """Refuses addresses that keep presenting wrong keys."""
    usage: UsageLedger | None = None
    """The usage ledger (--usage-db), else None."""
    budgets: Budgets | None = None
    """Daily/monthly token budgets of the key file, else None."""
    metrics: Metrics | None = None
    """Request and token counters for /metrics and /status (None: --no-metrics)."""
    constraint_checks: ConstraintChecker = field(default_factory=ConstraintChecker)
    """Where output constraints are checked: inline, or off the loop when large."""
    draining: bool = False
    """Set on SIGTERM: new requests get 503 while in-flight ones finish."""
    in_flight: int = 0
    running: set[Any] = field(default_factory=set)
    """The requests in flight (their handlers): the shutdown timeout ends each with an
    answer of its own, not a cut connection."""
    started: int = field(default_factory=lambda: int(time.time()))
    """When this proxy started: the stable `created` of the models it lists."""
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def upstream(self) -> LlamaCppClient:
        """The first server's client: the whole upstream of a one-server gateway."""
        return self.routes.first_client()

    def run_in_background(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run bookkeeping that must not delay the response (kept referenced until done)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
