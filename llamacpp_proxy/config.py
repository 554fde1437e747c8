"""Settings: the command line and environment, parsed and checked once at start-up."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import __version__


class ConfigError(ValueError):
    """The configuration cannot work; the message says what to change."""


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to run, read once at start-up."""

    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = 8000
    """Port to listen on (0 picks a free one)."""
    llamacpp_server: tuple[str, ...] = ("http://localhost:8080",)
    """Base URLs of llama.cpp servers: one pool of identical servers of one model (a single
    string is taken as a one-server tuple)."""
    upstreams_file: Path | None = None
    """TOML file of models -> pools of servers (instead of --llamacpp-server); reloaded on
    SIGHUP."""
    routing: str = "affinity"
    """How a pool's server is chosen: affinity (the server that holds the conversation's
    prompt cache, else the least busy), least-busy, or round-robin (for comparison)."""
    max_queue: int = 100
    """Generations per pool that may wait in the gateway for a free slot; more: 503."""
    queue_timeout: float = 30.0
    """Seconds a generation may wait for a free slot before a 503 server_overloaded."""
    eject_after_failures: int = 5
    """Requests in a row that fail on a server whose /health answers before it leaves
    rotation for a while (one request counts once, whatever its `n`: route/outliers.py);
    0: never."""
    queue_keepalive: float = 10.0
    """Seconds a streamed request waits in the queue before its answer commits to 200 + SSE
    and sends an SSE comment (`: queued`), again every as many seconds; 0: never. A
    refusal after that is the stream's error event, not a 503 status an SDK would retry."""
    chat_template: str | None = None
    """Built-in template name or template file path; None uses the model's own (/props)."""
    tools_policy: str = "refuse"
    """What a request with tools gets when the model's template cannot express them:
    "refuse" (400 tools_not_supported) or "drop" (answered without them, X-Tools-Dropped);
    a model in the upstreams file may set its own."""
    allow_content_control_tokens: bool = False
    """Let control tokens written in message content reach the model as control tokens
    (then a user can forge turns); by default content is always plain text to the model."""
    rate_limit_window: float = 60.0
    """Length of the limited key's sliding window, in seconds."""
    rate_limit_max_requests: int = 10
    """Requests the limited key may make in any window."""
    unlimited_api_key: str | None = field(default=None, repr=False)
    """UNLIMITED_API_KEY: never rate limited."""
    limited_api_key: str | None = field(default=None, repr=False)
    """LIMITED_API_KEY: limited by the sliding window."""
    api_keys_file: Path | None = None
    """TOML file of named keys with their own limits; reloaded on SIGHUP."""
    redis_url: str | None = field(default=None, repr=False)
    """Share limits between proxy processes through this Redis (may hold a password)."""
    redis_failure_mode: str = "closed"
    """When Redis is unreachable: "closed" answers 503, "open" admits without limits."""
    usage_db: Path | None = None
    """SQLite file of the usage ledger (one row per finished request); None: no ledger."""
    auth_failure_limit: int = 20
    """Failed authentications one client address may make per auth_failure_window."""
    auth_failure_window: float = 60.0
    """Seconds over which failed authentications are counted."""
    max_body_size: int = 4 * 1024 * 1024
    """Largest request body accepted, in bytes (413 beyond)."""
    upstream_connect_timeout: float = 5.0
    """Seconds to connect to llama.cpp."""
    upstream_first_byte_timeout: float = 600.0
    """Seconds until llama.cpp starts answering (covers prompt processing)."""
    upstream_idle_timeout: float = 60.0
    """Seconds a stream may go without a token before it is ended with an error."""
    upstream_max_connections: int = 1024
    """Requests to llama.cpp in flight at once; more wait in a queue."""
    upstream_spare_connections: int = 1
    """Idle connections to each llama.cpp server opened ahead of need while requests come
    (each holds one of llama-server's HTTP threads, for at most 2.5 s after the last)."""
    max_tokens_limit: int = 4096
    """max_tokens when a request sends none, and the most one may ask for (400 beyond)."""
    max_parallel_generations: int = 4
    """Generations of one request (prompts x n) run at once; the rest wait their turn."""
    max_connections: int = 4096
    """Client connections open at once; more wait in the kernel's accept queue. Lowered at
    start if the open-file limit (LimitNOFILE) cannot hold it."""
    client_idle_timeout: float = 75.0
    """Seconds an idle keep-alive client connection is kept open."""
    client_body_timeout: float = 30.0
    """Seconds a client may take to send its request body."""
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM/SIGINT."""
    workers: int = 1
    """Processes serving the listening socket (more than one needs redis_url, so that
    limits hold across them)."""
    access_log: bool = True
    """One log line per request."""
    log_json: bool = False
    """Access log lines as JSON objects."""
    log_level: str = "info"
    """Logging level."""
    metrics: bool = True
    """Count requests and tokens for GET /metrics and the status page."""
    metrics_key: str | None = field(default=None, repr=False)
    """Bearer key GET /metrics requires (METRICS_API_KEY); None: /metrics is open."""
    admin_key: str | None = field(default=None, repr=False)
    """Bearer key for GET /status (ADMIN_API_KEY), besides key-file keys with admin = true."""

    model_name: str | None = None
    """The model id clients see in /v1/models; None: llama.cpp's alias, else the GGUF stem."""
    tls_cert: Path | None = None
    """PEM certificate chain: the proxy serves HTTPS itself (re-read on SIGHUP)."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    cors_allow_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API ("*" for any); empty: no CORS headers."""

    def __post_init__(self) -> None:
        if isinstance(self.llamacpp_server, str):  # the one-server spelling, as before
            object.__setattr__(self, "llamacpp_server", (self.llamacpp_server,))

    @property
    def upstream_url(self) -> str:
        """The first llama.cpp server's base URL without a trailing slash."""
        return self.llamacpp_server[0].rstrip("/")


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive whole number, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, not {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (shared by `--help`, main and the systemd unit check)."""
    d = Settings()
    p = argparse.ArgumentParser(
        prog="llamacpp-proxy-server",
        description=(
            "OpenAI-compatible API gateway for llama.cpp's server. API keys come from the "
            "environment: UNLIMITED_API_KEY (never rate limited) and LIMITED_API_KEY (rate "
            "limited); set at least one, or name a key file with --api-keys-file."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=_port, default=d.port, help="port to listen on")
    p.add_argument(
        "--llamacpp-server",
        action="append",
        metavar="URL",
        help="base URL of a llama.cpp server; give it several times for a pool of identical "
        f"servers of one model (default: {d.llamacpp_server[0]})",
    )
    p.add_argument(
        "--upstreams-file",
        type=Path,
        metavar="PATH",
        help="TOML file of models and their servers (see docs/routing.md), reloaded on "
        "SIGHUP; instead of --llamacpp-server",
    )
    p.add_argument(
        "--routing",
        choices=["affinity", "least-busy", "round-robin"],
        default=d.routing,
        help="how a model's server is chosen: 'affinity' keeps a conversation on the server "
        "that holds its prompt cache; 'least-busy' and 'round-robin' ignore caches",
    )
    p.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=d.max_queue,
        metavar="N",
        help="generations per model that may wait in the gateway when every server's slots "
        "are busy; more get 503 server_overloaded",
    )
    p.add_argument(
        "--queue-timeout",
        type=_positive_float,
        default=d.queue_timeout,
        metavar="SECONDS",
        help="longest wait for a free slot before 503 server_overloaded (in all, failover "
        "to another server included)",
    )
    p.add_argument(
        "--queue-keepalive",
        type=_non_negative_float,
        default=d.queue_keepalive,
        metavar="SECONDS",
        help="a streamed request still queued after this long gets 200 and an SSE comment "
        "(': queued') every as many seconds, so the connection stays alive; a refusal after "
        "that is the stream's error event instead of a 503 status; 0: off",
    )
    p.add_argument(
        "--eject-after-failures",
        type=_non_negative_int,
        default=d.eject_after_failures,
        metavar="N",
        help="a server whose /health answers but where this many requests in a row "
        "failed (5xx, cut or malformed answers; a request counts once, whatever its n) "
        "leaves rotation for 10 s, doubled each "
        "time it fails again, up to 5 min; never the last server of a model, never more "
        "than half of them; 0: off",
    )
    p.add_argument(
        "--chat-template-jinja",
        dest="chat_template",
        metavar="NAME_OR_PATH",
        help="chat template: a built-in name (gemma3, chatml, llama3, mistral, "
        "qwen2.5) or a Jinja file; default: the model's own from llama.cpp",
    )
    p.add_argument(
        "--tools-policy",
        choices=("refuse", "drop", "describe"),
        default=d.tools_policy,
        help="when the chat template cannot express tools: refuse the request (400 "
        "tools_not_supported), drop the tools and answer without them (header "
        "X-Tools-Dropped), or describe them in the system prompt and parse the model's "
        "<tool_call> blocks back into tool calls (header X-Tools-Described); an "
        "upstreams file model may set its own tools_policy",
    )
    p.add_argument(
        "--allow-content-control-tokens",
        action="store_true",
        help="let control tokens written in message content (<|im_end|>, <start_of_turn>) "
        "reach the model as control tokens, as llama.cpp's own chat endpoint does; by "
        "default they reach it as plain text, so no user can forge a turn",
    )
    p.add_argument(
        "--rate-limit-window",
        type=_positive_float,
        default=d.rate_limit_window,
        metavar="SECONDS",
        help="sliding window length for LIMITED_API_KEY",
    )
    p.add_argument(
        "--rate-limit-max-requests",
        type=_positive_int,
        default=d.rate_limit_max_requests,
        metavar="N",
        help="requests LIMITED_API_KEY may make in any window",
    )
    p.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="PATH",
        help="TOML file of named keys with their own limits (reloaded on SIGHUP)",
    )
    p.add_argument(
        "--redis-url",
        metavar="URL",
        help="share rate limits between proxy processes through Redis "
        "(redis://host:6379/0); default: limits in this process's memory",
    )
    p.add_argument(
        "--redis-failure-mode",
        choices=["closed", "open"],
        default=d.redis_failure_mode,
        help="when Redis is unreachable: 'closed' refuses limited keys with 503, "
        "'open' admits them unlimited",
    )
    p.add_argument(
        "--usage-db",
        type=Path,
        metavar="PATH",
        help="SQLite file of the usage ledger: one row per finished request, read by "
        "llamacpp-proxy-usage; needed for budgets without --redis-url (default: no ledger)",
    )
    p.add_argument(
        "--auth-failure-limit",
        type=_positive_int,
        default=d.auth_failure_limit,
        metavar="N",
        help=(
            "failed key checks a client address (an IPv6 /64) may make per window before its "
            "failures get 429"
        ),
    )
    p.add_argument(
        "--auth-failure-window",
        type=_positive_float,
        default=d.auth_failure_window,
        metavar="SECONDS",
        help="window for --auth-failure-limit",
    )
    p.add_argument(
        "--max-body-size",
        type=_positive_int,
        default=d.max_body_size,
        metavar="BYTES",
        help="largest request body accepted",
    )
    p.add_argument(
        "--upstream-connect-timeout",
        type=_positive_float,
        default=d.upstream_connect_timeout,
        metavar="SECONDS",
        help="time to connect to llama.cpp (one TCP/TLS connect; 504 after)",
    )
    p.add_argument(
        "--upstream-first-byte-timeout",
        type=_positive_float,
        default=d.upstream_first_byte_timeout,
        metavar="SECONDS",
        help=(
            "deadline from the request's start, waiting for a free upstream connection "
            "included: for the whole answer when not streamed, until the response head "
            "when streamed (504 after)"
        ),
    )
    p.add_argument(
        "--upstream-idle-timeout",
        type=_positive_float,
        default=d.upstream_idle_timeout,
        metavar="SECONDS",
        help=(
            "longest pause between two streamed events once a stream started (comments and "
            "pings do not count; the stream ends with an error event after); also how long "
            "a streaming client may take nothing while llama.cpp's output waits for it "
            "(its connection is closed after)"
        ),
    )
    p.add_argument(
        "--upstream-max-connections",
        type=_positive_int,
        default=d.upstream_max_connections,
        metavar="N",
        help=(
            "completion requests to llama.cpp in flight at once; more wait, within their "
            "deadline (health and metadata probes use 2 connections of their own)"
        ),
    )
    p.add_argument(
        "--upstream-spare-connections",
        type=_non_negative_int,
        default=d.upstream_spare_connections,
        metavar="N",
        help=(
            "connections to each llama.cpp server opened ahead of need while requests come, "
            "so that a stream skips the connect (about 0.2 ms of its time to first token); "
            "each holds one of llama-server's HTTP threads (--threads-http) until used or "
            "closed 2.5 s after the last request; 0 opens none"
        ),
    )
    p.add_argument(
        "--max-tokens-limit",
        type=_positive_int,
        default=d.max_tokens_limit,
        metavar="N",
        help="max_tokens of a request that sends none, and the largest one may send (400 "
        "beyond); token budgets reserve it for each generation",
    )
    p.add_argument(
        "--max-parallel-generations",
        type=_positive_int,
        default=d.max_parallel_generations,
        metavar="N",
        help="generations of one request (prompts x n) run at once; the rest wait their turn",
    )
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        default=d.max_connections,
        metavar="N",
        help="client connections open at once; more wait to be accepted (kept below the "
        "open-file limit)",
    )
    p.add_argument(
        "--client-idle-timeout",
        type=_positive_float,
        default=d.client_idle_timeout,
        metavar="SECONDS",
        help="idle keep-alive client connections are closed after",
    )
    p.add_argument(
        "--client-body-timeout",
        type=_positive_float,
        default=d.client_body_timeout,
        metavar="SECONDS",
        help="time a client may take to send its request body",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_positive_float,
        default=d.shutdown_timeout,
        metavar="SECONDS",
        help="time in-flight requests get after SIGTERM/SIGINT",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=d.workers,
        metavar="N",
        help="processes serving the port, to use more than one core (more than 1 needs "
        "--redis-url; a worker that dies stops the proxy: docs/deployment.md)",
    )
    p.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="do not log one line per request",
    )
    p.add_argument("--log-json", action="store_true", help="access log lines as JSON")
    p.add_argument(
        "--log-level",
        default=d.log_level,
        choices=["debug", "info", "warning", "error"],
        help="logging level",
    )
    p.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="count nothing: GET /metrics answers 404 and the status page shows no figures "
        "for today",
    )
    p.add_argument(
        "--metrics-key",
        metavar="KEY",
        help="bearer key GET /metrics requires (or METRICS_API_KEY in the environment); "
        "unset, /metrics is open: bind the proxy to a private address",
    )
    p.add_argument(
        "--admin-key",
        metavar="KEY",
        help="bearer key for the status page GET /status (or ADMIN_API_KEY in the "
        "environment); key-file keys with admin = true may see it too",
    )
    p.add_argument(
        "--model-name",
        metavar="NAME",
        help="the model id clients see in /v1/models; default: llama.cpp's alias, else the "
        "GGUF file's name without .gguf (never a path)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PATH",
        help="PEM certificate chain: serve HTTPS (with --tls-key); re-read on SIGHUP",
    )
    p.add_argument("--tls-key", type=Path, metavar="PATH", help="PEM private key of --tls-cert")
    p.add_argument(
        "--cors-allow-origins",
        nargs="+",
        default=list(d.cors_allow_origins),
        metavar="ORIGIN",
        help="browser origins (https://app.example) allowed to call the API, or '*'; "
        "default: none (no CORS headers)",
    )
    # Modes, not settings: the config file cannot hold them.
    p.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML file of these options (names without --); flags given here override it",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check the configuration, key file, templates and every upstream, then exit "
        "(0: all good; 1: the problems are listed)",
    )
    return p


NOT_SETTINGS = frozenset({"help", "version", "config", "check"})
"""Parser destinations that are modes of the command, not settings a config file may hold."""

PLACEHOLDER_KEY_PREFIX = "replace-me"
"""How the example environment file's keys begin (deploy/systemd/keys.env.example)."""


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Parse argv and the environment; argparse exits on bad flags, ConfigError on the rest."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.config is not None:
        from .config_file import config_file_argv

        flags = args
        # The file's options first: argparse keeps the last value, so flags override it.
        args = parser.parse_args([*config_file_argv(args.config, parser), *argv])
        if flags.llamacpp_server is not None or flags.upstreams_file is not None:
            # Servers given as flags replace the file's: argparse would append them to the
            # file's list (one server twice in a pool), or refuse --upstreams-file beside the
            # file's llamacpp-server, where a drop-in means "these servers instead".
            args.llamacpp_server = flags.llamacpp_server
            args.upstreams_file = flags.upstreams_file
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if args.upstreams_file is not None and args.llamacpp_server:
        # Two lists of servers would leave it unclear which one a reload changes.
        raise ConfigError("--upstreams-file lists the servers: do not also give --llamacpp-server")
    servers = tuple(args.llamacpp_server or Settings.llamacpp_server)
    for server in servers:
        url = urlsplit(server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"--llamacpp-server must be an http:// or https:// URL, not {server!r}"
            )
    if args.redis_url is not None and not args.redis_url.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        raise ConfigError("--redis-url must start with redis://, rediss:// or unix://")
    if args.workers > 1 and args.redis_url is None:
        # Each worker would count limits on its own: a key would get N times its quota.
        raise ConfigError("--workers above 1 needs --redis-url, so that limits hold across them")
    unlimited = environ.get("UNLIMITED_API_KEY") or None
    limited = environ.get("LIMITED_API_KEY") or None
    for name, value in (("UNLIMITED_API_KEY", unlimited), ("LIMITED_API_KEY", limited)):
        if value is not None and value.startswith(PLACEHOLDER_KEY_PREFIX):
            # deploy/systemd/keys.env.example's values are public: installed unedited, they
            # would open the gateway to anyone who has read this repository.
            raise ConfigError(
                f"{name} is still the placeholder of keys.env.example: put a key made by "
                "`llamacpp-proxy-keys new NAME` in its place (or remove the line)"
            )
    if not unlimited and not limited and args.api_keys_file is None:
        raise ConfigError(
            "no API key is configured: set UNLIMITED_API_KEY and/or LIMITED_API_KEY in the "
            "environment (or pass --api-keys-file); refusing to start an open proxy"
        )
    return Settings(
        host=args.host,
        port=args.port,
        llamacpp_server=servers,
        upstreams_file=args.upstreams_file,
        routing=args.routing,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        queue_keepalive=args.queue_keepalive,
        eject_after_failures=args.eject_after_failures,
        chat_template=args.chat_template,
        tools_policy=args.tools_policy,
        allow_content_control_tokens=args.allow_content_control_tokens,
        rate_limit_window=args.rate_limit_window,
        rate_limit_max_requests=args.rate_limit_max_requests,
        unlimited_api_key=unlimited,
        limited_api_key=limited,
        api_keys_file=args.api_keys_file,
        redis_url=args.redis_url,
        redis_failure_mode=args.redis_failure_mode,
        usage_db=args.usage_db,
        auth_failure_limit=args.auth_failure_limit,
        auth_failure_window=args.auth_failure_window,
        max_body_size=args.max_body_size,
        upstream_connect_timeout=args.upstream_connect_timeout,
        upstream_first_byte_timeout=args.upstream_first_byte_timeout,
        upstream_idle_timeout=args.upstream_idle_timeout,
        upstream_max_connections=args.upstream_max_connections,
        upstream_spare_connections=args.upstream_spare_connections,
        max_tokens_limit=args.max_tokens_limit,
        max_parallel_generations=args.max_parallel_generations,
        max_connections=args.max_connections,
        client_idle_timeout=args.client_idle_timeout,
        client_body_timeout=args.client_body_timeout,
        shutdown_timeout=args.shutdown_timeout,
        workers=args.workers,
        access_log=args.access_log,
        log_json=args.log_json,
        log_level=args.log_level,
        metrics=args.metrics,
        metrics_key=args.metrics_key or environ.get("METRICS_API_KEY") or None,
        admin_key=args.admin_key or environ.get("ADMIN_API_KEY") or None,
        model_name=args.model_name,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        cors_allow_origins=tuple(args.cors_allow_origins),
    )
