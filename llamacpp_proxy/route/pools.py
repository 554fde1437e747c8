"""Models -> pools of llama.cpp servers: the `--upstreams-file` and `--llamacpp-server` flags
parsed into an immutable `Routing` snapshot.

A reload builds a new snapshot (the old one stays in use if the new file is broken) and
`diff` says which servers appeared and which went away, so the integrator can drain those.

Decisions, each checked here with a one-line error naming the file, table and field:
- A name or alias names one pool; names and aliases are unique across the whole file.
- A server belongs to ONE model. A llama-server process serves one model, and its slots are
  counted by one router; listing it under two names is what `aliases` is for.
- Server URLs are normalised (scheme and host lower-cased, port made explicit, trailing slash
  dropped) so two spellings of one server are caught as duplicates. Credentials in a URL are
  kept for the connection but never shown: `display` is host:port only.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidRequest, ModelNotFound

MAX_NAME_LENGTH = 256
"""Longest model name or alias (clients send it back in every request)."""
MAX_SERVERS_PER_MODEL = 256
MAX_MODELS = 1024
TOOLS_POLICIES = ("refuse", "drop", "describe")
"""A model's answer to tools its template cannot express (render/tools_policy.py)."""
KINDS = ("chat", "embedding")
"""What a model of the upstreams file serves: generations (/v1/chat/completions,
/v1/completions, /v1/messages) or vectors (/v1/embeddings)."""

_MODEL_FIELDS = frozenset({"servers", "aliases", "chat_template", "tools_policy", "kind"})
# Settings of how a chat is rendered: meaningless for a model that only embeds.
_CHAT_ONLY_FIELDS = ("chat_template", "tools_policy")


class UpstreamsFileError(ValueError):
    """The upstreams file (or the server flags) cannot be used; the message says where."""


@dataclass(frozen=True)
class Server:
    """One llama.cpp server: its base URL (credentials kept) and what may be shown of it."""

    url: str
    """Normalised base URL to connect to, with any user:password@ kept."""
    key: str
    """Identity for duplicates and diffs: the URL without credentials."""
    display: str
    """host:port, for logs and /health/ready; never credentials."""

    def __repr__(self) -> str:  # a repr must not leak credentials into a log either
        return f"Server({self.display!r})"


@dataclass(frozen=True)
class Pool:
    """The servers that serve one model, and the names clients may call it by."""

    name: str
    servers: tuple[Server, ...]
    aliases: tuple[str, ...] = ()
    chat_template: str | None = None
    """Built-in template name or file path; None uses the servers' own (/props)."""
    tools_policy: str | None = None
    """"refuse", "drop" or "describe" tools the template cannot express; None: --tools-policy."""
    kind: str | None = None
    """"chat" or "embedding" (the upstreams file's `kind`); None: either (the pool of
    --llamacpp-server, whose one server is asked and answers for itself)."""

    @property
    def names(self) -> tuple[str, ...]:
        """The name and then the aliases, as /v1/models lists them."""
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class RoutingDiff:
    """What changed between two snapshots, by server identity (`Server.key`)."""

    added: tuple[Server, ...]
    removed: tuple[Server, ...]
    moved: tuple[Server, ...] = ()
    """Servers still present but now under another model (drain there, add here)."""


@dataclass(frozen=True)
class Routing:
    """An immutable snapshot: model names and aliases -> pools."""

    pools: tuple[Pool, ...]
    _by_name: Mapping[str, Pool] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.pools:
            raise UpstreamsFileError("no model is configured")
        by_name: dict[str, Pool] = {}
        for pool in self.pools:
            for name in pool.names:
                if name in by_name:
                    raise UpstreamsFileError(f"model name '{name}' is used twice")
                by_name[name] = pool
        object.__setattr__(self, "_by_name", by_name)

    @property
    def single(self) -> Pool | None:
        """The one pool when only one is configured: it serves any or no model name."""
        return self.pools[0] if len(self.pools) == 1 else None

    def lookup(self, model: str | None, allowed: frozenset[str] | None = None) -> Pool:
        """The pool for a request's `model`, for a key allowed `allowed` names (None: all).

        Raises ModelNotFound (404) for an unknown or forbidden model, the same way for both;
        InvalidRequest (400) when several models are configured and none was named.
        """
        single = self.single
        if single is not None:
            pool = single
        elif model is None or model == "":
            raise InvalidRequest(
                "You must provide a model parameter; this server serves several models "
                "(GET /v1/models lists them).",
                param="model",
                code="missing_model",
            )
        else:
            found = self._by_name.get(model)
            if found is None:
                raise ModelNotFound(model)
            pool = found
        if allowed is not None and not _pool_allowed(pool, allowed):
            raise ModelNotFound(model or pool.name)
        return pool

    def model_ids(self, allowed: frozenset[str] | None = None) -> list[str]:
        """Every name and alias a client may send (for /v1/models), in file order."""
        return [
            name
            for pool in self.pools
            if allowed is None or _pool_allowed(pool, allowed)
            for name in pool.names
        ]

    def unknown_models(self, names: Iterable[str]) -> list[str]:
        """Names (from a key's `models`) that no pool answers to: worth a warning at load, not
        an error, since the next upstreams reload may add them."""
        return [n for n in names if n not in self._by_name]

    def servers(self) -> dict[str, tuple[Pool, Server]]:
        """Server key -> (its pool, the server)."""
        return {s.key: (p, s) for p in self.pools for s in p.servers}

    def diff(self, new: Routing) -> RoutingDiff:
        """Servers `new` adds, removes, or moves to another model, relative to this one."""
        old_servers, new_servers = self.servers(), new.servers()
        added = tuple(s for k, (_, s) in new_servers.items() if k not in old_servers)
        removed = tuple(s for k, (_, s) in old_servers.items() if k not in new_servers)
        moved = tuple(
            s
            for k, (p, s) in new_servers.items()
            if k in old_servers and old_servers[k][0].name != p.name
        )
        return RoutingDiff(added, removed, moved)


def check_kind(pool: Pool, kind: str, model: str | None) -> None:
    """Refuse (400) a request for `kind` ("chat" or "embedding") to a model of the other
    kind; a pool of unknown kind (--llamacpp-server) takes both and llama.cpp decides."""
    if pool.kind is None or pool.kind == kind:
        return
    name = model or pool.name
    if pool.kind == "embedding":
        message = (
            f"The model '{name}' is an embedding model: it answers POST /v1/embeddings "
            "only, not chat or text completions."
        )
    else:
        message = (
            f"The model '{name}' is not an embedding model: POST /v1/embeddings needs a "
            'model whose upstreams file entry says kind = "embedding".'
        )
    raise InvalidRequest(message, param="model", code="model_kind_mismatch")


def _pool_allowed(pool: Pool, allowed: frozenset[str]) -> bool:
    # A key's `models` grants a pool by any of its names: an alias is the same model.
    return any(name in allowed for name in pool.names)


def parse_server_url(text: object, where: str) -> Server:
    """A server URL, checked and normalised; `where` prefixes any error."""
    if not isinstance(text, str) or not text:
        raise UpstreamsFileError(f"{where}: a server must be a URL string")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise UpstreamsFileError(f"{where}: server URL has spaces or control characters")
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise UpstreamsFileError(f"{where}: bad server URL: {exc}") from None
    scheme = url.scheme.lower()
    host = url.hostname
    display_hint = _safe_hint(url.netloc)
    if scheme not in ("http", "https"):
        raise UpstreamsFileError(
            f"{where}: server URL must start with http:// or https:// ({display_hint})"
        )
    if not host:
        raise UpstreamsFileError(f"{where}: server URL has no host ({display_hint})")
    if url.query or url.fragment:
        raise UpstreamsFileError(
            f"{where}: server URL must not have a ?query or #fragment ({display_hint})"
        )
    if port is None:
        port = 443 if scheme == "https" else 80
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path = url.path.rstrip("/")
    creds = ""
    if url.username is not None or url.password is not None:
        creds = url.netloc.rpartition("@")[0] + "@"
    key = f"{scheme}://{hostport}{path}"
    return Server(url=f"{scheme}://{creds}{hostport}{path}", key=key, display=hostport)


def _safe_hint(netloc: str) -> str:
    """The host part of a rejected URL, without credentials, for the error message."""
    return netloc.rpartition("@")[2][:100] or "empty host"


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UpstreamsFileError(f"{where}: a model name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise UpstreamsFileError(f"{where}: model name longer than {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UpstreamsFileError(f"{where}: model name has control characters")
    return name


def parse_upstreams(data: Mapping[str, Any], source: str) -> Routing:
    """A parsed TOML document -> Routing; `source` (the file name) starts every error."""
    unknown = set(data) - {"models"}
    if unknown:
        raise UpstreamsFileError(
            f"{source}: unknown top-level keys: {', '.join(sorted(unknown))} "
            '(expected [models."NAME"] tables)'
        )
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise UpstreamsFileError(f'{source}: expected one or more [models."NAME"] tables')
    if len(models) > MAX_MODELS:
        raise UpstreamsFileError(f"{source}: more than {MAX_MODELS} models")
    pools: list[Pool] = []
    names: dict[str, str] = {}  # name or alias -> the table that claimed it
    servers: dict[str, str] = {}  # server key -> the table that listed it
    for name, spec in models.items():
        table = f'[models."{name}"]'
        where = f"{source}: {table}"
        _check_name(name, where)
        if not isinstance(spec, dict):
            raise UpstreamsFileError(f"{where} must be a table")
        bad = set(spec) - _MODEL_FIELDS
        if bad:
            raise UpstreamsFileError(
                f"{where}: unknown fields: {', '.join(sorted(bad))} "
                f"(known: {', '.join(sorted(_MODEL_FIELDS))})"
            )
        if name in names:
            raise UpstreamsFileError(f"{where}: name '{name}' is already an alias in {names[name]}")
        names[name] = table
        pool_servers = _parse_servers(spec.get("servers"), f"{where} servers", servers, table)
        aliases = _parse_aliases(spec.get("aliases", []), f"{where} aliases", names, table)
        template = spec.get("chat_template")
        if template is not None and (not isinstance(template, str) or not template.strip()):
            raise UpstreamsFileError(
                f"{where} chat_template: must be a built-in template name or a file path"
            )
        policy = spec.get("tools_policy")
        if policy is not None and policy not in TOOLS_POLICIES:
            raise UpstreamsFileError(
                f"{where} tools_policy: must be one of {', '.join(TOOLS_POLICIES)}"
            )
        kind = spec.get("kind", "chat")
        if kind not in KINDS:
            raise UpstreamsFileError(f"{where} kind: must be one of {', '.join(KINDS)}")
        if kind == "embedding":
            for chat_only in _CHAT_ONLY_FIELDS:
                if chat_only in spec:
                    raise UpstreamsFileError(
                        f"{where} {chat_only}: an embedding model renders no chat (remove it, "
                        'or drop kind = "embedding")'
                    )
        pools.append(Pool(name, pool_servers, aliases, template, policy, kind))
    return Routing(tuple(pools))


def _parse_servers(
    value: object, where: str, seen: dict[str, str], table: str
) -> tuple[Server, ...]:
    if value is None:
        raise UpstreamsFileError(f"{where}: missing (a list of server URLs)")
    if not isinstance(value, list) or not value:
        raise UpstreamsFileError(f"{where}: must be a non-empty list of server URLs")
    if len(value) > MAX_SERVERS_PER_MODEL:
        raise UpstreamsFileError(f"{where}: more than {MAX_SERVERS_PER_MODEL} servers")
    result: list[Server] = []
    for i, text in enumerate(value):
        server = parse_server_url(text, f"{where}[{i}]")
        if server.key in seen:
            other = seen[server.key]
            raise UpstreamsFileError(
                f"{where}[{i}]: {server.display} is already listed"
                + (" in this model" if other == table else f" in {other}")
                + (
                    ""
                    if other == table
                    else " (a llama-server serves one model: use aliases for other names)"
                )
            )
        seen[server.key] = table
        result.append(server)
    return tuple(result)


def _parse_aliases(value: object, where: str, names: dict[str, str], table: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise UpstreamsFileError(f"{where}: must be a list of names")
    result: list[str] = []
    for i, alias in enumerate(value):
        alias = _check_name(alias, f"{where}[{i}]")
        if alias in names:
            raise UpstreamsFileError(f"{where}[{i}]: '{alias}' is already a name in {names[alias]}")
        names[alias] = table
        result.append(alias)
    return tuple(result)


def load_upstreams_file(path: Path) -> Routing:
    """Read and check an upstreams file; UpstreamsFileError (one line) on any mistake."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise UpstreamsFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UpstreamsFileError(f"{path}: not valid TOML: {exc}") from exc
    return parse_upstreams(data, str(path))


def routing_from_servers(
    urls: Sequence[str], model: str = "default", chat_template: str | None = None
) -> Routing:
    """The pool of `--llamacpp-server` flags (given once or several times): one model that,
    being the only one, serves any or no model name, as the one-server gateway always has."""
    if not urls:
        raise UpstreamsFileError("--llamacpp-server: at least one server URL is needed")
    seen: dict[str, str] = {}
    servers = _parse_servers(list(urls), "--llamacpp-server", seen, "--llamacpp-server")
    return Routing((Pool(model, servers, (), chat_template),))


def parse_key_models(value: object, where: str) -> frozenset[str] | None:
    """A key file entry's `models` field (absent: None, meaning every model); ValueError
    with `where` (file and table) on a mistake."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} models: must be a non-empty list of model names")
    try:
        return frozenset(_check_name(v, f"{where} models[{i}]") for i, v in enumerate(value))
    except UpstreamsFileError as exc:  # the key file's loader wraps ValueError in its own
        raise ValueError(str(exc)) from None
