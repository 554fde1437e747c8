"""The status page: one server-rendered HTML page (no JavaScript) that refreshes itself.

Per model its servers (ready/loading/down/ejected/draining, slots busy/total), the gateway's
generations in flight and waiting; per key today's requests and tokens against its limits
and budgets, with small bar charts. Pure: it renders the figures it is given (`StatusView`),
so it is tested without a server; frontdoor/admin.py gathers them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import jinja2

from .. import __version__
from ..guard.auth import Limits
from .metrics import KeyDay
from .snapshot import ModelSnapshot

REFRESH_SECONDS = 5


@dataclass(frozen=True)
class BudgetLine:
    """One budget of a key as the status page shows it (tokens_per_day, tokens_per_month)."""

    label: str
    """What it is, e.g. "tokens today" or "tokens this month"."""
    used: int
    limit: int
    resets: str
    """When it resets, as text (e.g. an ISO time in UTC)."""


@dataclass(frozen=True)
class KeyRow:
    """One key: its limits and today's figures."""

    name: str
    limits: Sequence[str]
    """The key's limits as short texts ("10 requests / 60s"); empty: unlimited."""
    today: KeyDay
    budgets: Sequence[BudgetLine] = ()
    admin: bool = False


@dataclass(frozen=True)
class StatusView:
    """Everything the page shows."""

    models: Sequence[ModelSnapshot]
    keys: Sequence[KeyRow]
    generated_at: float = field(default_factory=time.time)
    counting: bool = True
    """False with --no-metrics: the day's figures stay at zero."""


def _percent(part: int, whole: int | None) -> int:
    if not whole or whole <= 0:
        return 0
    return max(0, min(100, round(100 * part / whole)))


class StatusPage:
    """Renders the status page (the template is compiled once)."""

    def __init__(self) -> None:
        source = (
            resources.files("llamacpp_proxy")
            .joinpath("observe/templates/status.html")
            .read_text(encoding="utf-8")
        )
        # Autoescaped: key and model names come from operators' files, server names from
        # URLs; none of it may become markup.
        env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
        env.globals["percent"] = _percent
        self._template = env.from_string(source)

    def render(self, view: StatusView) -> str:
        """The page's HTML."""
        busiest = max((k.today.tokens for k in view.keys), default=0)
        return self._template.render(
            view=view,
            version=__version__,
            refresh=REFRESH_SECONDS,
            generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.generated_at)),
            busiest=busiest,
        )


def limit_texts(limits: Limits | None) -> list[str]:
    """A key's limits as short texts for the page (empty: unlimited)."""
    if limits is None:
        return []
    out: list[str] = []
    if limits.requests:
        out.append(f"{limits.requests} requests / {limits.window:g}s")
    if limits.tokens_per_minute:
        out.append(f"{limits.tokens_per_minute} tokens / min")
    if limits.max_concurrent:
        out.append(f"{limits.max_concurrent} concurrent")
    return out
