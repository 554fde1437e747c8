"""Request handlers: BaseHandler (request id, auth, limits, OpenAI error bodies, access log)
and the small endpoints (models, health, unknown URLs). Completions are in completions.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from http.client import responses
from importlib import resources
from typing import Any

import tornado.web
from tornado import httputil

from .. import fastjson
from ..context import AppContext
from ..errors import (
    AuthenticationFailed,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    ProxyError,
    ServiceShuttingDown,
    drop_tracebacks,
)
from ..guard.auth import Principal
from ..guard.budgets import BudgetHold
from ..guard.ratelimit import Admission, InMemoryLimiter
from ..ids import unique_id
from ..model_names import model_display_name, model_object
from ..observe.usage import UsageRecord

log = logging.getLogger("llamacpp_proxy")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class _HttpDate:
    """The Date header's value, formatted once a second rather than per request."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.value = httputil.format_timestamp(second)
            cls.second = second
        return cls.value


def _json(value: Any) -> bytes:
    return fastjson.dumps(value)


# CORS (--cors-allow-origins): what a browser may send and read. The OpenAI SDKs add their
# x-stainless-* headers (and openai-* ones) to every request, so those pass too.
_CORS_HEADERS = frozenset({"authorization", "content-type", "x-request-id"})
_CORS_HEADER_PREFIXES = ("x-stainless-", "openai-")
_CORS_EXPOSE = (
    "X-Request-Id, Retry-After, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
    "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, "
    "x-ratelimit-reset-tokens"
)
_CORS_MAX_AGE = "600"  # browsers cache a preflight answer this many seconds


def _cors_header_allowed(name: str) -> bool:
    name = name.strip().lower()
    return name in _CORS_HEADERS or name.startswith(_CORS_HEADER_PREFIXES)


class BaseHandler(tornado.web.RequestHandler):
    """Shared behaviour of every endpoint."""

    requires_key = True
    rate_limited = False
    refused_while_draining = True
    endpoint = "other"
    """The endpoint's label in the metrics: the route, never the client's URL (bounded)."""
    records_usage = False
    """Whether a finished request of this endpoint is a row of the usage ledger."""

    # Per-request state starts from these class-level values: a request pays only for the
    # attributes it sets (a handler is built for every request, at cold-cache speed).
    principal: Principal | None = None
    admission: Admission | None = None
    budget_hold: BudgetHold | None = None
    """The key's budgets' reservation for this request, settled by settle_budget() or
    release(), once."""
    SETTLE_WAIT = 0.05
    """Seconds an answer's end waits for its budget charge (settle_budget)."""
    prompt_tokens = 0
    completion_tokens = 0
    unreported_tokens = 0
    """Work the key's limits count that the answer's usage does not show (a prompt
    evaluated again for each further choice of it)."""
    request_id = ""
    _counted = False
    model = ""
    """The configured model (pool) that served it, once chosen: the metrics' label."""
    # For the usage ledger, filled in by the endpoints that record usage.
    usage_model: str | None = None
    usage_server: str | None = None
    cached_tokens = 0
    ttft: float | None = None
    """Seconds from arrival to the first streamed token (None: not streamed, or none)."""
    error: ProxyError | None = None
    """The error answered, for the metrics (which limit refused a 429)."""
    _recorded = False
    _client_left = False

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def clear(self) -> None:
        """Tornado's, without its Server and text/html headers that every answer here
        replaced at once (set_default_headers sets the type), and with the Date of this
        second: it runs in every handler's construction (and again in send_error), so
        on every request's way."""
        headers = httputil.HTTPHeaders()
        headers["Date"] = _HttpDate.now()
        self._headers = headers
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = "OK"
        self.set_default_headers()

    def set_default_headers(self) -> None:
        # Also runs again when send_error clears a response: keep what every answer carries.
        self.set_header("Content-Type", "application/json")
        request_id = getattr(self, "request_id", "")
        if request_id:
            self.set_header("X-Request-Id", request_id)
        admission = getattr(self, "admission", None)
        if admission is not None:
            for name, value in admission.headers.items():
                self.set_header(name, value)
        cors_origin = getattr(self, "cors_origin", None)
        if cors_origin is not None:
            self.set_header("Access-Control-Allow-Origin", cors_origin)
            self.set_header("Access-Control-Expose-Headers", _CORS_EXPOSE)
            self.set_header("Vary", "Origin")

    def _cors(self) -> bool:
        """Let an allowed Origin read the answer; True for a preflight from it, which needs
        no key (browsers never send one with it) and is answered by options()."""
        origins = self.ctx.settings.cors_allow_origins
        origin = self.request.headers.get("Origin")
        allowed = origin is not None and ("*" in origins or origin in origins)
        if allowed:
            self.cors_origin = "*" if "*" in origins else origin
            self.set_default_headers()
        elif origin is not None:
            self.set_header("Vary", "Origin")  # a cache must not serve it to another origin
        if self.request.method != "OPTIONS" or (
            "Access-Control-Request-Method" not in self.request.headers
        ):
            return False
        if not allowed:
            raise PermissionDenied(
                f"The origin {origin!r} may not call this API.", code="cors_refused"
            )
        self.preflight = True
        return True

    def options(self, *args: str) -> None:
        """A CORS preflight's answer. Sent here, after the (empty) body is read, not from
        prepare(): a streamed-body handler that finishes early drops the kept-alive
        connection under the client's next request."""
        early: ProxyError | None = getattr(self, "_early_error", None)
        if early is not None:
            raise early
        if not getattr(self, "preflight", False):
            raise MethodNotAllowed(
                f"Method OPTIONS is not allowed on {self.request.path}.",
            )
        requested = self.request.headers.get("Access-Control-Request-Headers", "")
        headers = [h.strip() for h in requested.split(",") if _cors_header_allowed(h)]
        self.set_status(204)
        self.clear_header("Content-Type")
        self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        if headers:
            self.set_header("Access-Control-Allow-Headers", ", ".join(headers))
        self.set_header("Access-Control-Max-Age", _CORS_MAX_AGE)
        self.finish()

    async def prepare(self) -> None:
        incoming = self.request.headers.get("X-Request-Id", "")
        self.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else unique_id("req_")
        self.set_header("X-Request-Id", self.request_id)
        if self.ctx.settings.cors_allow_origins and self._cors():
            return
        if self.ctx.draining and self.refused_while_draining:
            raise ServiceShuttingDown(
                "The server is shutting down; retry on another instance.",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        self.ctx.in_flight += 1
        self.ctx.running.add(self)
        self._counted = True
        self.check_request()
        if self.requires_key:
            self.principal = self._authenticate()
            if self.rate_limited:
                self.admission = await self.ctx.limiter.admit(self.principal)
                self.set_default_headers()

    def check_request(self) -> None:
        """Checks on the request line and headers, before the key (subclasses add)."""

    def _authenticate(self) -> Principal:
        header = self.request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if not header and "x-api-key" in self.request.headers:
            # What Anthropic's SDKs (and Claude Code with ANTHROPIC_API_KEY) send.
            header = "x-api-key"
            scheme, key = "bearer", self.request.headers["x-api-key"].strip()
        principal = self.ctx.keys.authenticate(key) if scheme.lower() == "bearer" else None
        if principal is not None:
            return principal
        throttle = self.ctx.auth_throttle
        address = self.request.remote_ip or "unknown"
        if throttle is not None:
            throttle.check(address)
            throttle.record_failure(address)
        if not header:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it in the Authorization header: "
                "'Authorization: Bearer YOUR_KEY'."
            )
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("The Authorization header must be 'Bearer YOUR_KEY'.")
        raise AuthenticationFailed("Incorrect API key provided.")

    def write_json(self, value: Any, status: int = 200) -> None:
        """Send a JSON body."""
        self.set_status(status)
        self.finish(_json(value))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error, ours or Tornado's, as an OpenAI error body."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ProxyError):
            error = exc
        elif isinstance(exc, tornado.web.HTTPError):
            error = _from_http_error(exc, self.request.method or "", self.request.path)
        else:
            error = ProxyError(
                "The server had an error while processing your request. "
                f"Request id: {self.request_id}."
            )
        self.error = error
        for name, value in error.headers.items():
            self.set_header(name, value)
        status, body = self.render_error(error)
        self.set_status(status)
        self.finish(_json(body))

    def render_error(self, error: ProxyError) -> tuple[int, Any]:
        """The status and body of an error in this endpoint's protocol (OpenAI's here)."""
        return error.status, error.body()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ProxyError):
            if value.status >= 500:
                log.warning(
                    "request %s failed: %s %s", self.request_id, value.status, value.message
                )
            return
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("request %s: unexpected error", self.request_id, exc_info=(typ, value, tb))

    def on_connection_close(self) -> None:
        self._client_left = True
        self.release()

    async def settle_budget(self) -> None:
        """Replace the key's budget hold by the tokens counted, before the answer's last bytes
        go: the client's next request (to this process or another sharing Redis) must find
        this one's real spend, not its hold, or a budget near its end refuses it. Waits at
        most SETTLE_WAIT for the store; a slower charge lands in the background."""
        charge = self._charge_budget()
        if charge is not None:
            await asyncio.wait((charge,), timeout=self.SETTLE_WAIT)

    def _charge_budget(self) -> asyncio.Task[None] | None:
        """Start the charge that replaces the budget hold by the tokens counted (None: no
        hold, or settled already)."""
        hold = self.budget_hold
        budgets, principal = self.ctx.budgets, self.principal
        if hold is None or hold.settled or budgets is None or principal is None:
            return None
        return self.ctx.run_in_background(budgets.charge(principal, self.charged_tokens, hold))

    @property
    def charged_tokens(self) -> int:
        """What the key's limits count: the answer's usage and the unreported work."""
        return self.prompt_tokens + self.completion_tokens + self.unreported_tokens

    def end_for_shutdown(self, error: ProxyError) -> None:
        """The shutdown timeout: end now with `error`. Only a completion can run that long;
        anything else is left to finish (or be closed with its connection)."""

    def release(self) -> None:
        """Return the key's concurrent slot and charge its tokens; safe to call twice."""
        if self._counted:
            self._counted = False
            self.ctx.in_flight -= 1
            self.ctx.running.discard(self)
        admission = self.admission
        if admission is not None and not admission.finished:
            tokens = self.charged_tokens
            limiter = self.ctx.limiter
            if type(limiter) is InMemoryLimiter:
                limiter.finish_now(admission, tokens)  # no I/O: no task per request
            else:
                self.ctx.run_in_background(limiter.finish(admission, tokens))
        if self.budget_hold is not None:
            # Not settled at the answer's end (an error, the client gone); a hold made after
            # an early release() (the client left while it was made) is settled by the
            # later one, at on_finish.
            self._charge_budget()
        if self.records_usage and not self._recorded:
            self._recorded = True
            self._record_usage()

    def _record_usage(self) -> None:
        """Add the request to the ledger: once, at its end. (After its budget charge,
        release(): a budget seen for the first time is read from the ledger; a request that
        reserved had its key's periods read then.)"""
        principal = self.principal
        usage = self.ctx.usage
        if usage is None or principal is None:
            # No key, no row: whoever sends requests without a valid key cannot fill the disk.
            return
        request = self.request
        usage.record(
            UsageRecord(
                time=time.time(),
                key=principal.name,
                model=self.usage_model,
                server=self.usage_server,
                endpoint=self.endpoint,
                status=self.outcome_status(),
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cached_tokens=self.cached_tokens,
                duration=request.request_time(),
                ttft=self.ttft,
                request_id=self.request_id,
            )
        )

    def on_finish(self) -> None:
        self.release()
        # Answered and logged: the error's traceback holds frames that hold this handler.
        drop_tracebacks(self.error)

    def outcome_status(self) -> int:
        """The status the ledger, the metrics and the access log report: 499 (as nginx logs
        it) when the client left before the answer ended; the error's status when a stream
        that began with 200 ended with an error event (the client's SDK raised it); else
        the status sent. One rule for all three, so a dashboard's error rate and the bill
        count the same requests as failed."""
        if self._client_left and not self._finished:
            return 499
        status = self.get_status()
        error = self.error
        if status < 400 and error is not None:
            return error.status
        return status

    def access_fields(self) -> dict[str, Any]:
        """What the access log line says about this request."""
        return {
            "request_id": self.request_id,
            "key": self.principal.log_name if self.principal else None,
            "method": self.request.method,
            "path": self.request.path,
            "status": self.outcome_status(),
            "latency_ms": round(self.request.request_time() * 1000, 2),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "error": getattr(self, "stream_error", None),
        }


def _from_http_error(exc: tornado.web.HTTPError, method: str, path: str) -> ProxyError:
    if exc.status_code == 405:
        return MethodNotAllowed(f"Method {method} is not allowed on {path}.")
    if exc.status_code == 404:
        return NotFound(f"Unknown request URL: {method} {path}.", code="unknown_url")
    error = ProxyError(exc.log_message or responses.get(exc.status_code, "Error"))
    error.status = exc.status_code
    error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error


class NotFoundHandler(BaseHandler):
    """Unknown URLs: OpenAI's 404 body, whatever the method."""

    requires_key = False

    async def prepare(self) -> None:
        await super().prepare()
        if getattr(self, "preflight", False):
            return  # a CORS preflight: options() answers it
        raise NotFound(
            f"Unknown request URL: {self.request.method} {self.request.path}. "
            "Please check the URL for typos.",
            code="unknown_url",
        )


class ModelsHandler(BaseHandler):
    """GET /v1/models and /v1/models/{id}: the models this key may use, in OpenAI's shape.

    With an upstreams file: every model name and alias of the file the key may use. With
    only --llamacpp-server: what llama.cpp says it serves (the one model answers to any
    name, as it always did)."""

    endpoint = "/v1/models"

    async def get(self, model_id: str | None = None) -> None:
        assert self.principal is not None
        allowed = self.principal.models
        routes = self.ctx.routes
        if routes.from_file:
            models = [model_object(name, routes.created) for name in routes.model_ids(allowed)]
        else:
            try:
                pool = routes.lookup(None, allowed)
            except ModelNotFound:
                models = []
            else:
                props = await pool.meta_client().props()
                name = model_display_name(props, self.ctx.settings)
                models = [model_object(name, self.ctx.started)]
        if model_id is None:
            self.write_json({"object": "list", "data": models})
            return
        for model in models:
            if model["id"] == model_id:
                self.write_json(model)
                return
        raise ModelNotFound(model_id)


class OpenAPIHandler(BaseHandler):
    """GET /openapi.json: the OpenAPI description of this proxy's endpoints (no key needed)."""

    requires_key = False
    endpoint = "/openapi.json"

    def get(self) -> None:
        spec = resources.files("llamacpp_proxy").joinpath("openapi.json").read_bytes()
        self.finish(spec)


class HealthHandler(BaseHandler):
    """GET /health: liveness of the proxy itself (no key needed)."""

    requires_key = False
    refused_while_draining = False  # draining is not dead: no restart for a clean shutdown
    endpoint = "/health"

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """GET /health/ready: 200 while every model has a ready server, else 503; per model and
    server (host:port only): ready/loading/down/draining and slots busy/total."""

    requires_key = False
    refused_while_draining = False  # answers its own 503 "draining"
    endpoint = "/health/ready"

    async def get(self) -> None:
        if self.ctx.draining:
            self.write_json({"status": "draining"}, 503)
            return
        await self.ctx.routes.probe_all()  # current, not the last second's
        ready, body = self.ctx.routes.readiness()
        self.write_json(body, 200 if ready else 503)


def make_log_function(ctx: AppContext) -> Callable[[tornado.web.RequestHandler], None]:
    """The Application's log_function: one access log line per request, if enabled, and
    the request's metrics (counted here, once, when it has ended)."""

    def log_request(handler: tornado.web.RequestHandler) -> None:
        metrics = ctx.metrics
        if metrics is not None and isinstance(handler, BaseHandler):
            principal = handler.principal
            metrics.request_finished(
                principal.name if principal is not None else "",
                handler.model,
                handler.endpoint,
                handler.outcome_status(),
                handler.prompt_tokens,
                handler.completion_tokens,
                handler.cached_tokens,
                handler.request.request_time(),
                handler.ttft,
                handler.error,
            )
        access = ctx.access_log
        if access is None:
            return
        if isinstance(handler, BaseHandler):
            access.write(handler.access_fields())
        else:
            access.write(
                {
                    "method": handler.request.method,
                    "path": handler.request.path,
                    "status": handler.get_status(),
                    "latency_ms": round(handler.request.request_time() * 1000, 2),
                }
            )

    return log_request
