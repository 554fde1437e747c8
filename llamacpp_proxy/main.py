"""Command-line entry: settings -> app -> listen; SIGTERM drains, SIGHUP reloads keys."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from tornado.httpserver import HTTPServer

from . import __version__
from .app import make_app
from .config import ConfigError, Settings, load_settings
from .context import AppContext
from .guard.auth import KeyFileError, KeyStore, Limits, build_key_store
from .guard.auth_throttle import AuthFailureThrottle
from .guard.ratelimit import InMemoryLimiter, Limiter
from .observe.logs import AccessLog, configure_logging
from .render.templates import TemplateLoadError, load_chat_template
from .upstream.llamacpp import LlamaCppClient

log = logging.getLogger("llamacpp_proxy")


def build_keys(settings: Settings) -> KeyStore:
    """The key store from the environment's keys and the key file."""
    return build_key_store(
        unlimited_key=settings.unlimited_api_key,
        limited_key=settings.limited_api_key,
        limited_limits=Limits(
            requests=settings.rate_limit_max_requests, window=settings.rate_limit_window
        ),
        key_file=settings.api_keys_file,
    )


def _call_soon(callback: Callable[[], None]) -> None:
    # Looked up per call: the context is built before the event loop runs.
    asyncio.get_running_loop().call_soon(callback)


def build_context(settings: Settings) -> AppContext:
    """Everything the handlers share; raises the start-up errors main reports."""
    keys = build_keys(settings)
    template = load_chat_template(settings.chat_template) if settings.chat_template else None
    limiter: Limiter
    if settings.redis_url:
        from .guard.ratelimit_redis import RedisLimiter  # needs the optional `redis` package

        limiter = RedisLimiter.from_url(settings.redis_url, settings.redis_failure_mode)
    else:
        limiter = InMemoryLimiter()
    return AppContext(
        settings=settings,
        keys=keys,
        limiter=limiter,
        access_log=(
            AccessLog(sys.stderr, settings.log_json, _call_soon) if settings.access_log else None
        ),
        auth_throttle=AuthFailureThrottle(
            settings.auth_failure_limit, settings.auth_failure_window
        ),
        upstream=LlamaCppClient(settings),
        template=template,
    )


async def serve(ctx: AppContext, ready: asyncio.Event | None = None) -> None:
    """Listen until SIGTERM/SIGINT, then drain in-flight requests and return."""
    settings = ctx.settings
    server = HTTPServer(
        make_app(ctx),
        idle_connection_timeout=settings.client_idle_timeout,
        body_timeout=settings.client_body_timeout,
        # Handlers answer 413 from Content-Length; this hard cap also covers chunked bodies.
        max_body_size=settings.max_body_size,
    )
    # A deep accept queue: Tornado's default of 128 overflowed in bursts of 256 clients,
    # and each overflowed client waited a second to retry its connection.
    server.listen(settings.port, settings.host, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_keys, ctx)
    ports = sorted({s.getsockname()[1] for s in server._sockets.values()})
    log.info(
        "llamacpp-proxy %s listening on %s:%s, llama.cpp at %s, chat template %s, keys: %s",
        __version__,
        settings.host,
        ",".join(map(str, ports)),
        settings.upstream_url,
        ctx.template.origin if ctx.template else "from llama.cpp /props",
        ", ".join(ctx.keys.names),
    )
    if ready is not None:
        ready.set()
    await stop.wait()

    log.info(
        "shutting down: no new connections; %d request(s) in flight get up to %gs",
        ctx.in_flight,
        settings.shutdown_timeout,
    )
    server.stop()
    ctx.draining = True
    deadline = loop.time() + settings.shutdown_timeout
    while ctx.in_flight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if ctx.in_flight:
        log.warning("shutdown timeout: closing %d request(s) still in flight", ctx.in_flight)
    await asyncio.wait_for(server.close_all_connections(), timeout=5)
    ctx.upstream.close()
    if ctx.access_log is not None:
        ctx.access_log.flush()
    close_limiter = getattr(ctx.limiter, "close", None)
    if close_limiter is not None:
        await close_limiter()
    log.info("stopped")


def reload_keys(ctx: AppContext) -> None:
    """SIGHUP: re-read the key file; on any error keep serving with the old keys."""
    try:
        ctx.keys = build_keys(ctx.settings)
    except KeyFileError as exc:
        log.error("key reload failed, keeping the previous keys: %s", exc)
        return
    log.info("keys reloaded: %s", ", ".join(ctx.keys.names))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the server; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    try:
        settings = load_settings(argv, environ)
        configure_logging(settings.log_level, settings.log_json)
        ctx = build_context(settings)
    except (ConfigError, KeyFileError, TemplateLoadError) as exc:
        print(f"llamacpp-proxy-server: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(ctx))
    except OSError as exc:  # typically the port is taken
        print(
            f"llamacpp-proxy-server: error: cannot listen on {settings.host}:{settings.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
