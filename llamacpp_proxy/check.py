"""llamacpp-proxy-server --check: everything a start would read and reach, checked without
serving, every problem listed; exit 0 when a start would work (systemctl reload runs it first).
A llama-server that is down or loading is a warning: the proxy starts and waits for it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from .config import ConfigError, Settings, build_parser, load_settings
from .config_file import exposed_secrets
from .errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from .guard.auth import KeyFileError
from .model_names import model_display_name
from .observe.logs import redact
from .render.templates import ChatTemplate, TemplateLoadError, load_chat_template
from .route.pools import UpstreamsFileError
from .upstream.llamacpp import LlamaCppClient

NOT_YET = "the proxy starts without it and sends it requests once it answers"
"""Why an unreachable or loading llama-server is a warning: a start (or a reload, which
runs this check first to rotate keys) must not wait for it."""

TLS_ADVICE = (
    "is it a plain-HTTP llama-server (then its URL is http://, not https://), and does "
    "the gateway trust its certificate?"
)

_T = TypeVar("_T")

UPSTREAM_CHECK_EXTRA = 10.0
"""Seconds an upstream may take to answer /health and /props, beyond the connect timeout."""

SAMPLE_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


class Report:
    """The lines --check prints: what is fine, and every problem."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.problems = 0
        self.warnings = 0

    def ok(self, what: str, detail: str) -> None:
        self._line("ok      ", what, detail)

    def warning(self, what: str, detail: str) -> None:
        self.warnings += 1
        self._line("WARNING ", what, detail)

    def problem(self, what: str, detail: str) -> None:
        self.problems += 1
        self._line("PROBLEM ", what, detail)

    def _line(self, status: str, what: str, detail: str) -> None:
        # Redacted as log lines are: a detail may quote a setting (a URL with a password),
        # and `systemctl reload` puts this report in the journal.
        print(redact(f"{status} {what}: {detail}"), file=self.out)


def _render(report: Report, what: str, template: ChatTemplate, props: Mapping[str, Any]) -> None:
    try:
        prompt = template.render(
            SAMPLE_CONVERSATION,
            bos_token=str(props.get("bos_token") or ""),
            eos_token=str(props.get("eos_token") or ""),
        )
    except ProxyError as exc:
        report.problem(what, f"{template.origin} cannot render a sample conversation: {exc}")
        return
    if "And of Italy?" not in prompt:
        report.problem(what, f"{template.origin} leaves the user's message out of the prompt")
        return
    report.ok(what, f"{template.origin} renders a sample conversation ({len(prompt)} chars)")


def upstream_servers(settings: Settings) -> list[tuple[str, str | None]]:
    """Every llama.cpp server the proxy would send requests to, with its model's own
    template (the upstreams file's chat_template), if any."""
    from .upstreams import load_routing  # it builds on modules main imports too

    routing = load_routing(settings)
    return [(server.url, pool.chat_template) for pool in routing.pools for server in pool.servers]


async def _check_upstream(
    report: Report,
    settings: Settings,
    url: str,
    template: ChatTemplate | None,
    operator_template: bool,
) -> None:
    what = f"upstream {url}"
    # The operator's template needs no llama-server to be rendered, so a server that is
    # down or loading does not leave it unchecked; the model's own comes from /props.
    later = (
        "its model is checked then, not now"
        if operator_template
        else "its model and its chat template are checked then, not now"
    )
    client = LlamaCppClient(settings, base_url=url)
    try:
        try:
            health = await client._get("/health", settings.upstream_connect_timeout)
        except (UpstreamUnavailable, UpstreamTimeout) as exc:
            tls = await _tls_failure(url, exc, settings.upstream_connect_timeout)
            if tls is not None:
                report.problem(what, tls)
                return
            report.warning(what, f"{exc.message}; {NOT_YET} ({later})")
            if operator_template and template is not None:
                _render(report, what, template, {})
            return
        if health.status == 503:
            report.warning(what, f"llama.cpp is loading the model; {NOT_YET} ({later})")
            if operator_template and template is not None:
                _render(report, what, template, {})
            return
        if health.status != 200:  # something answers there, and it is not a llama-server
            report.problem(what, f"/health answered HTTP {health.status}, not llama.cpp's 200")
            return
        props = await client.props()
    except ProxyError as exc:
        report.problem(what, exc.message)
        return
    finally:
        client.close()
    own = props.get("chat_template")
    report.ok(
        what,
        f"model {model_display_name(props, settings)!r}, "
        f"{props.get('total_slots', '?')} slot(s), "
        f"{'its own chat template' if own else 'no chat template of its own'}",
    )
    if operator_template:
        if template is not None:  # (else its load error is listed already)
            _render(report, what, template, props)
    elif isinstance(own, str) and own.strip():
        try:
            _render(report, what, ChatTemplate(own, "the model's template (/props)"), props)
        except TemplateLoadError as exc:
            report.problem(what, f"{exc}; give one with --chat-template-jinja")
    else:
        report.problem(what, "the model has no chat template; give one with --chat-template-jinja")


async def _tls_failure(url: str, exc: ProxyError, timeout: float) -> str | None:
    """Why an https:// upstream that could not be reached is misconfigured, not down (None:
    it may just be down, or its name unknown). A failed handshake, or one that got no
    answer from something that accepts connections (a plain-HTTP llama-server waits for a
    request line), will fail the same way after any restart of llama.cpp."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        return None
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return f"the TLS handshake failed ({cause}); {TLS_ADVICE}"
    if not isinstance(exc, UpstreamTimeout) or not await _accepts_connections(
        parts.hostname or "", parts.port or 443, timeout
    ):
        return None  # (its name does not resolve, or nothing accepts connections: down)
    return (
        f"it accepts connections, but its TLS handshake got no answer in {timeout:g}s; "
        + TLS_ADVICE
    )


async def _accepts_connections(host: str, port: int, timeout: float) -> bool:
    """Whether something at host:port completes a TCP handshake within `timeout`, its
    name's lookup included. False when the name does not resolve or the resolver does not
    answer in time: the timeout may have been the lookup's, and an unknown server is not a
    TLS problem. (Not LlamaCppClient.reachable: for a server the gateway was connected to,
    a resolver that fails says nothing, so it answers True, and a DNS timeout would read as
    a handshake that got no answer.)"""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            for family, kind, proto, _, address in found:
                with socket.socket(family, kind, proto) as sock:
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, address)
                    except OSError:
                        continue  # refused there: the next address
                return True
    except (OSError, TimeoutError):
        pass
    return False


def run_check(argv: Sequence[str], environ: Mapping[str, str], out: TextIO) -> int:
    """Check the configuration as a start with these arguments would read it; 0 if all is
    well, 1 with every problem listed."""
    from .main import build_keys, tls_context  # main imports this module's caller

    report = Report(out)
    try:
        settings = load_settings(argv, environ)
    except ConfigError as exc:
        report.problem("configuration", str(exc))
        return 1
    report.ok("configuration", "read")
    config = build_parser().parse_args(list(argv)).config
    if config is not None:
        for warning in exposed_secrets(config):
            report.warning("configuration", warning)
    try:
        keys = build_keys(settings)
        report.ok("keys", ", ".join(keys.names))
    except (KeyFileError, OSError) as exc:
        report.problem("keys", str(exc))
    template: ChatTemplate | None = None
    if settings.chat_template:
        try:
            template = load_chat_template(settings.chat_template)
        except TemplateLoadError as exc:
            report.problem("chat template", str(exc))
    try:
        if tls_context(settings) is not None:
            report.ok("TLS", f"{settings.tls_cert} and {settings.tls_key}")
    except ConfigError as exc:
        report.problem("TLS", str(exc))

    try:
        servers = upstream_servers(settings)
    except (UpstreamsFileError, OSError) as exc:
        report.problem("upstreams", str(exc))
        servers = []
    pool_templates: dict[str, ChatTemplate | None] = {}
    for spec in {spec for _, spec in servers if spec}:
        try:
            pool_templates[spec] = load_chat_template(spec)
        except TemplateLoadError as exc:
            report.problem("chat template", str(exc))
            pool_templates[spec] = None

    async def one(url: str, spec: str | None) -> None:
        # /props may take the first-byte timeout (10 minutes by default): a check is quicker.
        own = pool_templates.get(spec) if spec else template
        try:
            await asyncio.wait_for(
                _check_upstream(report, settings, url, own, bool(spec or settings.chat_template)),
                settings.upstream_connect_timeout + UPSTREAM_CHECK_EXTRA,
            )
        except TimeoutError:
            report.warning(f"upstream {url}", f"no answer in time; {NOT_YET}")

    async def upstreams() -> None:
        await asyncio.gather(*(one(url, spec) for url, spec in servers))

    with asyncio.Runner() as runner:
        runner.get_loop().set_default_executor(_DaemonThreads())
        runner.run(upstreams())
    warned = f", {report.warnings} warning(s)" if report.warnings else ""
    if report.problems:
        print(f"{report.problems} problem(s){warned}", file=out)
        return 1
    print(f"no problems{warned}" if warned else "all good", file=out)
    return 0


class _DaemonThreads(ThreadPoolExecutor):
    """The check's default executor: one daemon thread per call, which nothing waits for.
    asyncio asks the system resolver in the default executor, and a deadline cannot stop
    that thread: with a resolver that does not answer (a nameserver gone: glibc tries for
    up to 30 s), asyncio.run would wait for it once the check was done, and the
    interpreter again at exit, holding --check (and `systemctl reload`) past its deadline."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to the caller, as the executor does
                    future.set_exception(exc)

        threading.Thread(target=run, name="check-resolver", daemon=True).start()
        return future
