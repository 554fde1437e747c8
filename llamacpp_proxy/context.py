"""The objects every handler shares, built once in main/app and passed via initialize()."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .errors import ServerMisconfigured
from .guard.auth import KeyStore
from .guard.auth_throttle import AuthFailureThrottle
from .guard.coalesce import Coalesced
from .guard.ratelimit import Limiter
from .observe.logs import AccessLog
from .render.templates import ChatTemplate, TemplateLoadError
from .upstream.llamacpp import LlamaCppClient


@dataclass
class AppContext:
    """Shared state of one running proxy."""

    settings: Settings
    keys: KeyStore
    limiter: Limiter
    upstream: LlamaCppClient
    access_log: AccessLog | None = None
    """One line per request (None: --no-access-log)."""
    auth_throttle: AuthFailureThrottle | None = None
    """Refuses addresses that keep presenting wrong keys."""
    template: ChatTemplate | None = None
    """The operator's template; None means the model's own, from /props."""
    draining: bool = False
    """Set on SIGTERM: new requests get 503 while in-flight ones finish."""
    in_flight: int = 0
    started: int = field(default_factory=lambda: int(time.time()))
    """When this proxy started: the stable `created` of the models it lists."""
    upstream_health: Coalesced[tuple[bool, str]] = field(default_factory=lambda: Coalesced(0.0))
    """/health/ready's upstream check, one at a time whatever the burst (never reused: a
    readiness answer must be current)."""
    upstream_models: Coalesced[list[dict[str, Any]]] = field(default_factory=lambda: Coalesced(5.0))
    """/v1/models's upstream answer, one at a time whatever the burst."""
    _model_templates: dict[str, ChatTemplate] = field(default_factory=dict)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def run_in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run bookkeeping that must not delay the response (kept referenced until done)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def model_template(self, props: dict[str, Any]) -> ChatTemplate:
        """The model's own chat template from /props, compiled once per distinct source."""
        source = props.get("chat_template")
        if not isinstance(source, str) or not source.strip():
            raise ServerMisconfigured(
                "llama.cpp reports no chat template for its model; start the proxy with "
                "--chat-template-jinja NAME_OR_PATH"
            )
        template = self._model_templates.get(source)
        if template is None:
            try:
                template = ChatTemplate(source, "from llama.cpp /props")
            except TemplateLoadError as exc:
                raise ServerMisconfigured(
                    f"{exc}; start the proxy with --chat-template-jinja NAME_OR_PATH"
                ) from exc
            self._model_templates = {source: template}  # the model changed: drop the old one
        return template
