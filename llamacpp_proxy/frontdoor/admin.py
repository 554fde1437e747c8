"""The operator's endpoints: GET /metrics (Prometheus) and GET /status (the status page).

Neither takes a client key: /metrics takes --metrics-key (open when unset), /status takes
--admin-key or a key-file key with `admin = true`. Both also accept the key as the password
of HTTP Basic auth, so a browser (which cannot send a bearer header) can open the page.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import time

from ..errors import AuthenticationFailed, NotFound, PermissionDenied
from ..guard.auth import Principal, key_digest
from ..guard.budgets import BudgetState
from ..observe.metrics import CONTENT_TYPE, KeyDay
from ..observe.snapshot import model_snapshots
from ..observe.status import BudgetLine, KeyRow, StatusPage, StatusView, limit_texts
from .handlers import BaseHandler


def presented_key(header: str) -> str:
    """The key in an Authorization header: `Bearer KEY`, or Basic with KEY as password."""
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer":
        return value
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2]
    return ""


def same_key(presented: str, expected: str) -> bool:
    """Constant-time comparison (of digests, so lengths leak nothing either)."""
    return hmac.compare_digest(key_digest(presented), key_digest(expected))


class MetricsHandler(BaseHandler):
    """GET /metrics: the Prometheus text format."""

    requires_key = False
    refused_while_draining = False  # a draining gateway is worth watching
    endpoint = "/metrics"

    def get(self) -> None:
        expected = self.ctx.settings.metrics_key
        if expected is not None:
            presented = presented_key(self.request.headers.get("Authorization", ""))
            if not presented or not same_key(presented, expected):
                self._refuse()
        metrics = self.ctx.metrics
        if metrics is None:
            raise NotFound("Metrics are off (--no-metrics).", code="metrics_disabled")
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(metrics.exposition())

    def _refuse(self) -> None:
        throttle = self.ctx.auth_throttle
        address = self.request.remote_ip or "unknown"
        if throttle is not None:
            throttle.check(address)
            throttle.record_failure(address)
        raise AuthenticationFailed(
            "GET /metrics needs the metrics key: 'Authorization: Bearer METRICS_KEY'."
        )


class StatusHandler(BaseHandler):
    """GET /status: the status page, for admin keys only (no key 401, other keys 403)."""

    requires_key = False
    refused_while_draining = False
    endpoint = "/status"

    async def get(self) -> None:
        header = self.request.headers.get("Authorization", "")
        admin_key = self.ctx.settings.admin_key
        presented = presented_key(header)
        if not (admin_key is not None and presented and same_key(presented, admin_key)):
            try:
                principal = self._authenticate_any(header, presented)
            except AuthenticationFailed as exc:
                # A browser asks its user for the key when told Basic works here.
                exc.headers["WWW-Authenticate"] = 'Basic realm="llamacpp-proxy status"'
                raise
            if not principal.admin:
                raise PermissionDenied(
                    f"Key '{principal.name}' may not see the status page; use the admin key "
                    "or a key with admin = true in the key file."
                )
            self.principal = principal
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        )
        self.set_header("Referrer-Policy", "no-referrer")
        self.finish(_page().render(await self._view()))

    def _authenticate_any(self, header: str, presented: str) -> Principal:
        if header[:6].lower() == "basic ":
            principal = self.ctx.keys.authenticate(presented) if presented else None
            if principal is not None:
                return principal
            return self._authenticate_failed()
        return self._authenticate()

    def _authenticate_failed(self) -> Principal:
        throttle = self.ctx.auth_throttle
        address = self.request.remote_ip or "unknown"
        if throttle is not None:
            throttle.check(address)
            throttle.record_failure(address)
        raise AuthenticationFailed("Incorrect API key provided.")

    async def _view(self) -> StatusView:
        ctx = self.ctx
        today = ctx.metrics.today() if ctx.metrics is not None else {}
        rows = []
        for p in sorted(ctx.keys.principals, key=lambda p: p.name):
            budgets: tuple[BudgetLine, ...] = ()
            if ctx.budgets is not None and p.budget is not None:
                budgets = tuple(budget_line(s) for s in await ctx.budgets.state(p))
            rows.append(
                KeyRow(
                    name=p.name,
                    limits=limit_texts(p.limits),
                    today=today.get(p.name) or KeyDay(),
                    budgets=budgets,
                    admin=p.admin,
                )
            )
        return StatusView(
            models=model_snapshots(ctx.routes), keys=rows, counting=ctx.metrics is not None
        )


def budget_line(state: BudgetState) -> BudgetLine:
    """A key's budget as the status page shows it."""
    label = "tokens today" if state.period == "day" else "tokens this month"
    resets = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(state.resets_at))
    return BudgetLine(label, state.used, state.limit, resets)


@functools.cache
def _page() -> StatusPage:
    """The compiled page, on first use (it holds no state, so one serves every app)."""
    return StatusPage()
