"""Command-line entry: settings -> app -> listen; SIGTERM drains, SIGHUP reloads keys."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import socket
import sqlite3
import ssl
import sys
from asyncio import Future
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, SSLIOStream
from tornado.netutil import bind_sockets, ssl_wrap_socket

from . import __version__, workers
from .app import make_app
from .config import ConfigError, Settings, build_parser, load_settings
from .context import AppContext
from .errors import ServiceShuttingDown, drop_tracebacks
from .frontdoor.client_deadlines import ClientDeadlines
from .guard.auth import KeyFileError, KeyStore, Limits, build_key_store
from .guard.auth_throttle import AuthFailureThrottle
from .guard.budgets import Budgets, LocalBudgets, RedisBudgets
from .guard.ratelimit import InMemoryLimiter, Limiter
from .observe.logs import AccessLog, BackgroundWriter, TextSink, configure_logging, redact
from .observe.metrics import Metrics
from .observe.snapshot import model_snapshots
from .observe.usage import UsageLedger
from .render.templates import TemplateLoadError, load_chat_template
from .route.pools import UpstreamsFileError
from .upstreams import Routes, describe, load_routing

log = logging.getLogger("llamacpp_proxy")


def build_keys(settings: Settings) -> KeyStore:
    """The key store from the environment's keys and the key file."""
    keys = build_key_store(
        unlimited_key=settings.unlimited_api_key,
        limited_key=settings.limited_api_key,
        limited_limits=Limits(
            requests=settings.rate_limit_max_requests, window=settings.rate_limit_window
        ),
        key_file=settings.api_keys_file,
    )
    check_budget_store(settings, keys)
    return keys


def check_budget_store(settings: Settings, keys: KeyStore) -> None:
    """Budgets need somewhere to survive a restart: the ledger or Redis."""
    if settings.usage_db is None and settings.redis_url is None:
        budgeted = [p.name for p in keys.principals if p.budget is not None]
        if budgeted:
            raise KeyFileError(
                f"keys {', '.join(budgeted)} have token budgets: pass --usage-db PATH (or "
                "--redis-url) so that a restart does not reset them"
            )


def build_usage(settings: Settings, keys: KeyStore) -> tuple[UsageLedger | None, Budgets | None]:
    """The usage ledger (--usage-db) and the budget counters (in Redis with --redis-url,
    else in memory, rebuilt from the ledger)."""
    ledger = None
    if settings.usage_db is not None:
        try:
            ledger = UsageLedger(settings.usage_db)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"--usage-db {settings.usage_db}: cannot open it: {exc}") from exc
    budgets: Budgets | None = None
    if settings.redis_url is not None:
        try:
            budgets = RedisBudgets.from_url(settings.redis_url, settings.redis_failure_mode)
        except ImportError as exc:
            raise ConfigError(f"--redis-url needs the redis package ({exc})") from exc
    elif ledger is not None:
        local = LocalBudgets(ledger)
        local.seed(keys.principals)  # so a restart does not reset a budget
        budgets = local
    return ledger, budgets


def warn_unknown_models(keys: KeyStore, routes: Routes) -> None:
    """Log key `models` entries no pool answers to: not an error (the next upstreams reload
    may add them), but likely a typo."""
    for principal in keys.principals:
        if principal.models is not None:
            unknown = routes.routing.unknown_models(sorted(principal.models))
            if unknown:
                log.warning(
                    "key %s may use models no pool serves: %s", principal.name, ", ".join(unknown)
                )


def _call_soon(callback: Callable[[], None]) -> None:
    # Looked up per call: the context is built before the event loop runs.
    asyncio.get_running_loop().call_soon(callback)


def build_context(settings: Settings, log_stream: TextSink | None = None) -> AppContext:
    """Everything the handlers share; raises the start-up errors main reports. The access
    log goes to `log_stream` (default: stderr)."""
    keys = build_keys(settings)
    template = load_chat_template(settings.chat_template) if settings.chat_template else None
    try:
        routes = Routes(settings, load_routing(settings), template)
    except UpstreamsFileError as exc:
        raise ConfigError(str(exc)) from exc
    warn_unknown_models(keys, routes)
    limiter: Limiter
    if settings.redis_url:
        from .guard.ratelimit_redis import RedisLimiter

        try:  # RedisLimiter imports the optional `redis` package when it connects
            limiter = RedisLimiter.from_url(settings.redis_url, settings.redis_failure_mode)
        except ImportError as exc:
            raise ConfigError(
                f"--redis-url needs the redis package ({exc}); install it with "
                "pip install 'llamacpp-proxy[redis]'"
            ) from exc
    else:
        limiter = InMemoryLimiter()
    usage, budgets = build_usage(settings, keys)
    return AppContext(
        settings=settings,
        keys=keys,
        limiter=limiter,
        usage=usage,
        budgets=budgets,
        metrics=(
            Metrics(partial(model_snapshots, routes), usage=usage) if settings.metrics else None
        ),
        access_log=(
            AccessLog(log_stream or sys.stderr, settings.log_json, _call_soon)
            if settings.access_log
            else None
        ),
        auth_throttle=AuthFailureThrottle(
            settings.auth_failure_limit, settings.auth_failure_window
        ),
        routes=routes,
    )


# Accept errors that mean "no resources now" (descriptors, buffers): retrying at once only
# fails again, so accepting pauses, doubling up to a second, and the streak is logged once.
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_BACKOFF_MIN = 0.05
_ACCEPT_BACKOFF_MAX = 1.0
_ACCEPTS_PER_WAKEUP = 128  # as Tornado: other work gets its turn during a connection flood
RECLAIM_AFTER = 1.0
"""Seconds a connection must have waited for a request head, with nothing of it come, before
it may be closed to make room at the connection cap: a client sends its request within a
round trip of connecting (or of its last answer), so a younger one may be on its way."""


class _SendDeadline:
    """A deadline on a client that takes nothing of what is written to it: when written
    bytes wait unsent and none of them left for `send_timeout` seconds, the connection is
    closed (nginx's `send_timeout`). Tornado has no write deadline: a client that sent a
    request and never read its answer held the connection, and the unsent answer in
    memory (64 MiB at most), for good. A stream's client is also bounded while llama.cpp's
    output waits for it (ClientStalled); this covers every answer, whole. Checked only
    when a write leaves bytes unsent, so a client that keeps up costs one length test."""

    _send_timeout: float | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _send_mark = -1

    def _watch_sends(self, timeout: float | None) -> None:
        # Tornado's names for what is unsent and how much has been sent; without them (a
        # Tornado that renamed them) there is no deadline, as before.
        if hasattr(self, "_write_buffer") and hasattr(self, "_total_write_done_index"):
            self._send_timeout = timeout

    def _written(self) -> None:
        stream: Any = self
        # The buffer is None once the stream closed (a reset during this very write).
        if self._send_timeout is not None and self._send_timer is None and stream._write_buffer:
            self._send_mark = stream._total_write_done_index
            loop = asyncio.get_running_loop()
            self._send_timer = loop.call_later(self._send_timeout, self._send_due)

    def _send_due(self) -> None:
        self._send_timer = None
        stream: Any = self
        if stream.closed() or not stream._write_buffer:
            return
        if stream._total_write_done_index != self._send_mark:
            self._written()  # it took something: a new period starts
            return
        log.info(
            "the client took nothing of its answer for %gs; closing its connection",
            self._send_timeout,
        )
        stream.close()

    def _unwatch_sends(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None


class _ClientStream(_SendDeadline, IOStream):
    """A client connection with TCP_NODELAY on for its whole life (set once at accept),
    and a deadline on a client that takes nothing of its answer (_SendDeadline).

    Tornado turns Nagle's algorithm off when a response finishes and back on after it: two
    setsockopt calls per request (IOStream.set_nodelay was 5.6% of the event loop's samples
    at 32 streams), and every response, SSE events included, written with Nagle on until
    its end, so an event could wait for the client's ACK of the previous one."""

    def __init__(self, *args: Any, send_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch_sends(send_timeout)

    def set_nodelay(self, value: bool) -> None:
        """Kept on: see the class."""

    def write(self, data: bytes | memoryview) -> Future[None]:
        future = super().write(data)
        if self._send_timer is None:  # else a check is due already
            self._written()
        return future

    def close(self, exc_info: Any = False) -> None:
        self._unwatch_sends()
        super().close(exc_info)
        # The socket error that closed it (a client's reset) holds, by its traceback, the
        # frames of the read that held this stream: a cycle per connection lost that way.
        drop_tracebacks(self.error)


class _ClientSSLStream(_SendDeadline, SSLIOStream):
    """_ClientStream for TLS connections."""

    def __init__(self, *args: Any, send_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch_sends(send_timeout)

    def set_nodelay(self, value: bool) -> None:
        """Kept on: see _ClientStream."""

    def write(self, data: bytes | memoryview) -> Future[None]:
        future = super().write(data)
        if self._send_timer is None:  # else a check is due already
            self._written()
        return future

    def close(self, exc_info: Any = False) -> None:
        self._unwatch_sends()
        super().close(exc_info)
        drop_tracebacks(self.error)  # see _ClientStream.close


def _no_delay(connection: socket.socket) -> None:
    if connection.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # a connection reset already: its read will say
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ProxyServer(HTTPServer):
    """Tornado's HTTPServer with its own accept loop: a cap on open client connections
    (beyond it, clients wait in the kernel's accept queue) and backoff on accept errors."""

    def initialize(  # type: ignore[override]
        self,
        *args: Any,
        max_connections: int,
        idle_connection_timeout: float | None = None,
        body_timeout: float | None = None,
        accepts_per_wakeup: int = _ACCEPTS_PER_WAKEUP,
        **kwargs: Any,
    ) -> None:
        super().initialize(*args, **kwargs)
        # The client's head and body deadlines are timers of ours (ClientDeadlines), not
        # Tornado's with_timeout around every read: see frontdoor/client_deadlines.py.
        self.conn_params.header_timeout = None
        self.conn_params.body_timeout = None
        self.head_timeout = idle_connection_timeout or 3600.0  # Tornado's default
        self.body_timeout = body_timeout
        self._deadlines: dict[object, ClientDeadlines] = {}  # each connection's current
        # Connections waiting for a request head, oldest first, and those closed to make
        # room whose on_close has not come yet (they no longer count as open).
        self._idle: dict[object, ClientDeadlines] = {}
        self._reclaimed: set[object] = set()
        self.max_connections = max_connections
        self.accepts_per_wakeup = accepts_per_wakeup
        self.open_connections = 0
        self._listening: list[socket.socket] = []
        self._accepting = False
        self._backoff = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ports(self) -> list[int]:
        """The bound ports (for --port 0)."""
        return sorted({int(s.getsockname()[1]) for s in self._listening})

    def serve(self, sockets: list[socket.socket]) -> None:
        """Start accepting on sockets bound by tornado.netutil.bind_sockets."""
        self._loop = asyncio.get_running_loop()
        self._listening.extend(sockets)
        self._resume()

    def stop(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay)."""
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self._listening:
            sock.close()
        self._listening.clear()

    def _resume(self) -> None:
        if self._accepting or not self._listening or self._loop is None:
            return
        self._accepting = True
        for sock in self._listening:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause(self) -> None:
        if not self._accepting or self._loop is None:
            return
        self._accepting = False
        for sock in self._listening:
            self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self.accepts_per_wakeup):
            if self.open_connections >= self.max_connections and not self._reclaim_idle():
                self._pause()  # resumed when a connection ends or waits idle (start_request)
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                self._accept_failed(exc)
                return
            if self._backoff:
                log.info("accepting connections again")
                self._backoff = 0.0
            # ssl_options is read per connection: a SIGHUP swaps in a new certificate, which
            # new connections get while open ones keep theirs. The handshake runs on the
            # stream's first read, in the loop, never blocking it.
            _no_delay(connection)
            tls = self.ssl_options
            stream: IOStream
            if tls is not None:
                try:
                    connection = ssl_wrap_socket(
                        connection, tls, server_side=True, do_handshake_on_connect=False
                    )
                except (ssl.SSLError, OSError):
                    connection.close()
                    continue
                stream = _ClientSSLStream(
                    connection,
                    max_buffer_size=self.max_buffer_size,
                    read_chunk_size=self.read_chunk_size,
                    send_timeout=self.head_timeout,
                )
            else:
                stream = _ClientStream(
                    connection,
                    max_buffer_size=self.max_buffer_size,
                    read_chunk_size=self.read_chunk_size,
                    send_timeout=self.head_timeout,
                )
            self.handle_stream(stream, address)

    def _reclaim_idle(self) -> bool:
        """At the cap, with a client waiting to be accepted: close the connection idle the
        longest (kept alive after its answer, or never used), as nginx reuses its idle
        keep-alive connections when it runs short. Without this, connections that clients'
        pools keep open and idle held every place until --client-idle-timeout (75 s) while
        new clients waited in the accept queue. True if one was closed."""
        assert self._loop is not None
        idle = self._idle
        while idle:
            server_conn, deadlines = next(iter(idle.items()))
            due = deadlines.head_due
            if due is None:
                idle.pop(server_conn, None)
                continue
            wait = due - self.head_timeout + RECLAIM_AFTER - self._loop.time()
            if wait > 0:  # the oldest is too young: ask again once it is not
                if self._retry is None:
                    self._retry = self._loop.call_later(wait, self._retry_accept)
                return False
            if deadlines.reclaim():  # leaves self._idle either way
                self._reclaimed.add(server_conn)
                self.open_connections -= 1
                return True
            idle.pop(server_conn, None)
        return False

    def _accept_failed(self, exc: OSError) -> None:
        assert self._loop is not None
        self._pause()
        if not self._backoff:
            hint = (
                " (lower --max-connections or raise LimitNOFILE)"
                if exc.errno in _ACCEPT_RESOURCE_ERRORS
                else ""
            )
            log.error(
                "cannot accept connections: %s%s; retrying with backoff",
                exc.strerror or exc,
                hint,
            )
        self._backoff = min(_ACCEPT_BACKOFF_MAX, max(_ACCEPT_BACKOFF_MIN, self._backoff * 2))
        self._retry = self._loop.call_later(self._backoff, self._retry_accept)

    def _retry_accept(self) -> None:
        self._retry = None
        self._resume()

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        self.open_connections += 1
        super().handle_stream(stream, address)

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        """Each request (the connection starts to wait for its head) runs under the
        client's deadlines."""
        deadlines = ClientDeadlines(
            super().start_request(server_conn, request_conn),
            request_conn,
            self.head_timeout,
            self.body_timeout,
            self._idle,
            server_conn,
        )
        self._deadlines[server_conn] = deadlines
        if not self._accepting and self._retry is None:
            # Paused at the cap: a client waiting to be accepted may now take this idle
            # connection's place (_accept closes it), so listen again.
            self._resume()
        return deadlines

    def on_close(self, server_conn: object) -> None:
        deadlines = self._deadlines.pop(server_conn, None)
        if deadlines is not None:
            deadlines.connection_ended()
        super().on_close(server_conn)
        if server_conn in self._reclaimed:
            self._reclaimed.discard(server_conn)  # uncounted when it was closed
        else:
            self.open_connections -= 1
        if self._retry is None and self.open_connections < self.max_connections:
            self._resume()


def connection_cap(settings: Settings) -> int:
    """--max-connections, lowered if the descriptor limit (raised to its hard limit first)
    cannot hold it: each client connection may need an upstream one too, plus files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    room = max(1, (soft - 64) // 2)
    if settings.max_connections > room:
        log.warning(
            "--max-connections %d does not fit the open-file limit %d; using %d "
            "(raise LimitNOFILE to allow more)",
            settings.max_connections,
            soft,
            room,
        )
        return room
    return settings.max_connections


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context from --tls-cert/--tls-key (None: plain HTTP); ConfigError
    says what is wrong with the pair."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"--tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from exc
    return context


def reload_tls(ctx: AppContext, server: HTTPServer) -> None:
    """SIGHUP: re-read the certificate and key for new connections; on any error keep the
    previous pair (an expired certificate is better than a server that cannot answer)."""
    if ctx.settings.tls_cert is None:
        return
    try:
        context = tls_context(ctx.settings)
    except ConfigError as exc:
        log.error("TLS reload failed, keeping the previous certificate: %s", exc)
        return
    server.ssl_options = context
    log.info("TLS certificate reloaded from %s", ctx.settings.tls_cert)


def make_server(ctx: AppContext, max_connections: int | None = None) -> ProxyServer:
    """The HTTP server for the app, with the client-side timeouts and caps."""
    settings = ctx.settings
    return ProxyServer(
        make_app(ctx),
        max_connections=max_connections or settings.max_connections,
        idle_connection_timeout=settings.client_idle_timeout,
        body_timeout=settings.client_body_timeout,
        # Handlers answer 413 from Content-Length; this hard cap also covers chunked bodies.
        max_body_size=settings.max_body_size,
        ssl_options=tls_context(settings),
        # Workers share one listening socket and all wake to a new connection: one that
        # took every queued connection at its wake-up often took a whole burst (32/0,
        # 31/1 of wrk's 32), leaving the other core idle. Taking one per wake-up lets the
        # others take theirs (15/17): docs/benchmarks.md, "Several workers".
        accepts_per_wakeup=1 if settings.workers > 1 else _ACCEPTS_PER_WAKEUP,
    )


def listen_sockets(settings: Settings) -> list[socket.socket]:
    """Bind the listening sockets (raises OSError: port taken, address unknown)."""
    # A deep accept queue: Tornado's default of 128 overflowed in bursts of 256 clients,
    # and each overflowed client waited a second to retry its connection.
    return bind_sockets(settings.port, settings.host, backlog=1024)


async def serve(
    ctx: AppContext,
    sockets: list[socket.socket],
    ready: asyncio.Event | None = None,
    max_connections: int | None = None,
) -> None:
    """Serve on the bound sockets until SIGTERM/SIGINT, then drain and close everything."""
    settings = ctx.settings
    server = make_server(ctx, max_connections)
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second stop signal: the drain is cut short
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        # As uvicorn and gunicorn do: the first signal drains, a second (Ctrl-C pressed again
        # by an operator who will not wait --shutdown-timeout) closes what is left now.
        if not stop.is_set():
            stop.set()
        elif not hurry.is_set():
            log.warning("second stop signal: closing %d request(s) in flight now", ctx.in_flight)
            hurry.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, reload_on_signal, ctx, server)
    ctx.routes.start()
    server.serve(sockets)
    template = ctx.routes.template
    log.info(
        "llamacpp-proxy %s listening on %s://%s:%s (up to %d connections), routing %s, "
        "chat template %s, keys: %s",
        __version__,
        "https" if server.ssl_options is not None else "http",
        settings.host,
        ",".join(map(str, server.ports)),
        server.max_connections,
        settings.routing,
        template.origin if template else "from llama.cpp /props",
        ", ".join(ctx.keys.names),
    )
    for pool in ctx.routes.routing.pools:
        log.info("model %s: %s", pool.name, describe(pool.servers))
    if ready is not None:
        ready.set()
    await stop.wait()
    await shutdown(ctx, server, hurry)


async def shutdown(ctx: AppContext, server: HTTPServer, hurry: asyncio.Event | None = None) -> None:
    """Refuse new work, give in-flight requests the shutdown timeout (or until `hurry` is
    set), then close it all."""
    settings = ctx.settings
    loop = asyncio.get_running_loop()
    log.info(
        "shutting down: no new connections; %d request(s) in flight get up to %gs",
        ctx.in_flight,
        settings.shutdown_timeout,
    )
    try:
        server.stop()
        ctx.draining = True
        deadline = loop.time() + settings.shutdown_timeout
        hurry = hurry or asyncio.Event()
        while ctx.in_flight > 0 and loop.time() < deadline and not hurry.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), 0.05)
        if ctx.in_flight and not hurry.is_set():
            log.warning("shutdown timeout: closing %d request(s) still in flight", ctx.in_flight)
        await end_running(ctx)
        close_timeout = min(5.0, settings.shutdown_timeout)
        try:
            await asyncio.wait_for(server.close_all_connections(), timeout=close_timeout)
        except TimeoutError:
            # Not an error to report as "cannot listen" (TimeoutError is an OSError): the
            # process is exiting anyway; what is left is closed with the loop.
            log.warning("connections still closing after %gs; exiting anyway", close_timeout)
    finally:
        ctx.constraint_checks.close()
        await ctx.routes.close()
        if ctx.access_log is not None:
            ctx.access_log.flush()
        close_limiter = getattr(ctx.limiter, "close", None)
        if close_limiter is not None:
            try:
                await asyncio.wait_for(close_limiter(), timeout=5)
            except Exception as exc:
                log.warning("closing the rate limiter failed: %s", exc)
        await close_usage(ctx)
    log.info("stopped")


ENDING_GRACE = 1.0
"""Seconds the requests ended at shutdown get to write their last answer (an error event
or a 503: a loop turn or two) before their connections are closed."""


async def end_running(ctx: AppContext) -> None:
    """End what is still in flight with an answer of its own: a stream's final error event
    or a 503 says "shutting down" where a cut connection would look like a network fault."""
    if not ctx.running:
        return
    for handler in list(ctx.running):
        # One error each: raised in every request's task, a shared one would carry their
        # tracebacks into each other.
        handler.end_for_shutdown(
            ServiceShuttingDown(
                "The server shut down before this request finished; retry it.",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ENDING_GRACE
    while ctx.in_flight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.01)


async def close_usage(ctx: AppContext) -> None:
    """Write the ledger's last rows (off the loop) and close the budget store."""
    if ctx.usage is not None:
        await asyncio.get_running_loop().run_in_executor(None, ctx.usage.close)
    close_budgets = getattr(ctx.budgets, "close", None)
    if close_budgets is not None:
        try:
            await asyncio.wait_for(close_budgets(), timeout=5)
        except Exception as exc:
            log.warning("closing the budget store failed: %s", exc)


def reload_on_signal(ctx: AppContext, server: HTTPServer | None) -> None:
    """SIGHUP in the server process: reload (below), then let the collector reach what the
    reload replaced."""
    reload(ctx, server)
    # What start-up built is frozen (freeze_startup_heap), and what the reload replaced (a
    # pool's clients once drained, keys) would stay for good where it sits in a cycle. So
    # it all goes back to the collector. Freezing again here would freeze what a drain still
    # holds; the price is that full collections walk start-up's objects again, as they did
    # before the freeze, until the next restart.
    gc.unfreeze()


def reload(ctx: AppContext, server: HTTPServer | None = None) -> None:
    """SIGHUP: re-read the upstreams file (if any), the key file and the TLS certificate
    (if any), each kept as it was when its new version cannot be used."""
    if ctx.settings.upstreams_file is not None:
        reload_upstreams(ctx)
    reload_keys(ctx)
    if server is not None:
        reload_tls(ctx, server)


def reload_upstreams(ctx: AppContext) -> None:
    """Re-read the upstreams file; on any error keep serving with the old pools."""
    try:
        routing = ctx.routes.reload()
    except (UpstreamsFileError, TemplateLoadError) as exc:
        log.error("upstreams reload failed, keeping the previous pools: %s", exc)
        return
    log.info("upstreams reloaded: %s", ", ".join(p.name for p in routing.pools))


def reload_keys(ctx: AppContext) -> None:
    """SIGHUP: re-read the key file; on any error keep serving with the old keys."""
    try:
        ctx.keys = build_keys(ctx.settings)
    except (KeyFileError, OSError, ValueError) as exc:
        log.error("key reload failed, keeping the previous keys: %s", exc)
        return
    warn_unknown_models(ctx.keys, ctx.routes)
    log.info("keys reloaded: %s", ", ".join(ctx.keys.names))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the server; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    if build_parser().parse_args(argv).check:
        from .check import run_check

        return run_check(argv, environ, sys.stdout)
    log_stream: BackgroundWriter | None = None
    try:
        settings = load_settings(argv, environ)
        # Log lines leave through a thread: a stalled reader of stderr must not block the loop.
        log_stream = BackgroundWriter(sys.stderr)
        configure_logging(settings.log_level, settings.log_json, log_stream)
        warn_exposed_secrets(argv)
        ctx = build_context(settings, log_stream)
        tls_context(settings)  # a bad certificate or key stops the start, said plainly
    except (ConfigError, KeyFileError, TemplateLoadError) as exc:
        if log_stream is not None:
            log_stream.close()
        # Redacted as log lines are: the error may quote a setting (a URL with a password).
        print(f"llamacpp-proxy-server: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    try:
        sockets = listen_sockets(settings)
    except OSError as exc:  # typically the port is taken
        print(
            f"llamacpp-proxy-server: error: cannot listen on {settings.host}:{settings.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    if settings.workers > 1:
        # The parent only supervises (workers.py); its log writer thread would not survive
        # the fork, so it logs directly, and each worker builds everything anew.
        log_stream.close()
        configure_logging(settings.log_level, settings.log_json)
        return workers.run(settings.workers, sockets, lambda _: serve_worker(settings, sockets))
    freeze_startup_heap()
    try:
        asyncio.run(serve(ctx, sockets, max_connections=connection_cap(settings)))
    finally:
        log_stream.close()  # writes what is queued, for at most 2 s
    return 0


def warn_exposed_secrets(argv: Sequence[str]) -> None:
    """Log each credential the --config file shows to other users (a warning, not a refusal:
    an upgrade must not stop a proxy that started yesterday)."""
    config = build_parser().parse_args(argv).config
    if config is not None:
        from .config_file import exposed_secrets

        for warning in exposed_secrets(config):
            log.warning("%s", warning)


def freeze_startup_heap() -> None:
    """Put what start-up built (modules, classes, templates, settings: about 35,000
    objects) out of the cyclic collector's reach. A full collection then walks only what
    requests made: at 1,000 open streams its pause, the longest delay a token sees, went
    from 70-75 ms to 14-16 ms (docs/benchmarks.md, "Paced streams"). A reload (SIGHUP)
    undoes it: see reload_on_signal."""
    gc.collect()
    gc.freeze()


def serve_worker(settings: Settings, sockets: list[socket.socket]) -> int:
    """One process of --workers: its own log writer, context and event loop."""
    log_stream = BackgroundWriter(sys.stderr)
    configure_logging(settings.log_level, settings.log_json, log_stream)
    try:
        ctx = build_context(settings, log_stream)
        freeze_startup_heap()
        asyncio.run(serve(ctx, sockets, max_connections=connection_cap(settings)))
    finally:
        log_stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
