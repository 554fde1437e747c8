"""What the gateway's pools look like right now, read at scrape or page time (never on the
request path): per model its servers' state and slots, the generations the gateway has on
them, and the generations waiting for a slot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..upstreams import Routes


@dataclass(frozen=True)
class ServerSnapshot:
    """One server of a pool, host:port only (never credentials)."""

    display: str
    state: str
    """ready, loading, down, ejected (ready, but out of rotation for failing requests:
    route/outliers.py), or draining (removed by a reload, finishing its generations)."""
    busy: int
    """Slots processing: the gateway's generations plus outside load seen in /slots."""
    total: int | None
    """From /props; None until known."""


@dataclass(frozen=True)
class ModelSnapshot:
    """One model's pool."""

    name: str
    servers: tuple[ServerSnapshot, ...]
    in_flight: int
    """Generations the gateway has running on this model's servers (draining ones too)."""
    queued: int
    """Generations waiting in the gateway for a free slot."""


def model_snapshots(routes: Routes) -> list[ModelSnapshot]:
    """Every model's pool as it is now, in the configuration's order."""
    out: list[ModelSnapshot] = []
    for name, runtime in routes.pools.items():
        router = runtime.router
        statuses = router.statuses()
        in_flight = 0
        for key in runtime.clients:
            upstream = router.upstream(key)
            if upstream is not None:
                in_flight += upstream.inflight
        # A draining server's busy count is the gateway's own generations finishing there.
        in_flight += sum(s.slots_busy for s in statuses if s.state == "draining")
        servers = tuple(
            ServerSnapshot(s.display, s.state, s.slots_busy, s.slots_total) for s in statuses
        )
        out.append(ModelSnapshot(name, servers, in_flight, router.waiting))
    return out
