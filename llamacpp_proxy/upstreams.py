"""The route stage wired to the network, beside context.py since it joins stages (route's
pools and routers, render's templates, upstream's clients): per model pool, its Router and
one LlamaCppClient per server (each its own kept-alive connections), the prober that feeds
their health, reloads, and the answers /v1/models and /health/ready give.

The pure parts (which server, when it is down, what may be retried) are in route/router.py,
route/health.py and route/failover.py; this module only wires them to the network and the
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from .config import Settings
from .errors import (
    ProxyError,
    ServerMisconfigured,
    UpstreamError,
    UpstreamLoading,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .render.templates import ChatTemplate, TemplateLoadError, load_chat_template
from .route.failover import Phase, Verdict, after_failure
from .route.health import Outcome, ProbePolicy, ServerStatus, State, readiness
from .route.outliers import EjectionPolicy
from .route.pools import (
    Pool,
    Routing,
    Server,
    UpstreamsFileError,
    load_upstreams_file,
    routing_from_servers,
)
from .route.probe import (
    outcome_of_exception,
    outcome_of_status,
    parse_processing,
    parse_total_slots,
)
from .route.router import Lease, Router, RoutingPolicy, Upstream
from .upstream.llamacpp import LlamaCppClient, UpstreamCall

log = logging.getLogger("llamacpp_proxy.route")

PROBE_TICK_MIN = 0.05
"""Shortest sleep of the probe loop (a probe still in flight stays due)."""
PROBE_TICK_MAX = 1.0
"""Longest: a reload or a new server is noticed within it."""
OUTSIDE_POLL_INTERVAL = 0.05
"""Seconds between re-reads of /slots while requests wait on outside load (Router
.on_outside_wait): short next to the probe interval, long next to one /slots answer."""
OUTSIDE_POLL_MIN_GAP = 0.01
"""A request that starts to wait on outside load has /slots re-read at once, not at the next
OUTSIDE_POLL_INTERVAL tick, but never sooner than this after the last re-read began: however
many requests arrive, a server held by outside load is asked at most 100 times a second."""
NO_SLOTS_STATUSES = frozenset((404, 501))
"""/slots statuses of a llama-server without the endpoint (501 with --no-slots; 404 before
it existed): not asked again. Anything else that is not a slot list is asked again."""
PROBE_BODY_LIMIT = 4 * 1024 * 1024
"""Bytes of a /health, /props or /slots answer the prober reads (a /slots of 4096 slots at
1 KiB each; llama.cpp's are smaller): more is a bad answer, not read on every probe."""
DEMAND_PROBE_INTERVAL = 1.0
"""Seconds between probes a request asks for when every server is down."""
DRAIN_LIMIT = 24 * 3600.0
"""A removed server's connections are closed once its last generation ended, or after this."""


def routing_policy(settings: Settings) -> RoutingPolicy:
    """The router's settings from the command line."""
    return RoutingPolicy(
        mode=settings.routing,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
        probe=ProbePolicy(),
        ejection=EjectionPolicy(failures=settings.eject_after_failures),
    )


def load_routing(settings: Settings) -> Routing:
    """The configured pools: the upstreams file, else the --llamacpp-server flags."""
    routing = (
        load_upstreams_file(settings.upstreams_file)
        if settings.upstreams_file is not None
        else routing_from_servers(settings.llamacpp_server)
    )
    for pool in routing.pools:
        for server in pool.servers:
            if server.url != server.key:
                # The upstream client has no way to send them yet; connecting without them
                # would fail every request with a 401 that looks like llama.cpp's fault.
                raise UpstreamsFileError(
                    f"{server.display}: credentials in server URLs are not supported yet"
                )
    return routing


def failure_verdict(exc: ProxyError, call: UpstreamCall, opened: bool) -> Verdict:
    """How far a failed generation got (from the call's phase marker) and so what to do."""
    if not call.sent:
        return after_failure(Phase.CONNECT, error=_as_exception(exc))
    # Only a 503 head: an error object (code 503) in a 200 answer came after llama.cpp
    # took the request, streamed (`opened`) or not.
    if isinstance(exc, UpstreamLoading) and call.status == 503 and not opened:
        return after_failure(Phase.ANSWERED, status=503)
    if call.got_first_byte:
        return after_failure(Phase.ANSWERED)
    return after_failure(Phase.SENT, error=_as_exception(exc))


def counts_against_server(exc: ProxyError) -> bool:
    """Whether a generation's failure counts toward ejecting its server (route/outliers.py):
    llama.cpp's own failures (a 5xx other than 503, a malformed or cut answer, its error
    event), not the client's (4xx), not a timeout (a long prompt, a busy server), not a 503
    or a refusal (loading, down: the prober judges those)."""
    return type(exc) is UpstreamError


def _as_exception(exc: ProxyError) -> BaseException:
    """The network failure behind an upstream error, for the health verdict."""
    if isinstance(exc, UpstreamTimeout):
        return TimeoutError()
    return exc.__cause__ or exc


def _probe_outcome(exc: ProxyError) -> Outcome:
    if isinstance(exc, UpstreamTimeout):
        return Outcome.TIMEOUT
    if isinstance(exc, UpstreamUnavailable):
        return Outcome.REFUSED
    cause = exc.__cause__
    return outcome_of_exception(cause) if cause is not None else Outcome.ERROR


class PoolRuntime:
    """One model's pool at run time: its router, its servers' clients, its template."""

    def __init__(
        self,
        pool: Pool,
        router: Router,
        clients: dict[str, LlamaCppClient],
        template: ChatTemplate | None,
    ) -> None:
        self.pool = pool
        self.router = router
        self.clients = clients
        self.template = template
        """The operator's template for this model; None: the servers' own (/props)."""
        self.probe_clients: dict[str, LlamaCppClient] = {}
        """Per server, the prober's own client: a probe must not queue for a connection
        behind long generations (it would time out and take a busy server for a dead one)."""
        self.draining_clients: dict[str, LlamaCppClient] = {}
        """Clients of removed servers, until their last generation ended."""
        self.no_slots: set[str] = set()
        """Servers that answered /slots 404 or 501 (llama-server without --slots): not asked
        again until they are ready again after being down or loading (restarted)."""
        self._model_templates: dict[str, ChatTemplate] = {}
        self.asked_down_at = -DEMAND_PROBE_INTERVAL
        """When a request last had every server probed at once (`Routes.probe_down_now`)."""
        self.asked_down: asyncio.Future[list[Any]] | None = None
        """Those probes (joined by requests that find every server down meanwhile)."""
        self.outside_poll: asyncio.Task[None] | None = None
        """Re-reads /slots while requests wait on outside load (`Routes._watch_outside`)."""
        self.outside_wake: asyncio.Event | None = None
        """Set when another request starts to wait while that poll sleeps: re-read now."""

    def client_for(self, key: str) -> LlamaCppClient:
        """The client of a leased server (it may have been removed since: draining)."""
        client = self.clients.get(key)
        return client if client is not None else self.draining_clients[key]

    def meta_client(self) -> LlamaCppClient:
        """A client for the model's metadata (/props, /tokenize): any server of the pool
        serves the same model, so a ready one, else one expected soon, else the first."""
        router = self.router
        fallback: LlamaCppClient | None = None
        for key, client in self.clients.items():
            upstream = router.upstream(key)
            if upstream is None:
                continue
            if upstream.usable:
                return client
            if fallback is None or upstream.expected:
                fallback = client
        return fallback or next(iter(self.clients.values()))

    def model_template(self, props: dict[str, Any]) -> ChatTemplate:
        """The model's own chat template from /props, compiled once per distinct source."""
        source = props.get("chat_template")
        if not isinstance(source, str) or not source.strip():
            raise ServerMisconfigured(
                "llama.cpp reports no chat template for its model; start the proxy with "
                "--chat-template-jinja NAME_OR_PATH (or set chat_template in the upstreams file)"
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


class Routes:
    """Every pool of the gateway, the probe task that watches their servers, and reloads."""

    def __init__(
        self,
        settings: Settings,
        routing: Routing,
        template: ChatTemplate | None = None,
        client_factory: Callable[[str], LlamaCppClient] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = routing_policy(settings)
        self.template = template
        """--chat-template-jinja: every pool's template unless the upstreams file names one."""
        self._client_factory = client_factory or (
            lambda url: LlamaCppClient(settings, base_url=url)
        )
        self.routing = routing
        self.from_file = settings.upstreams_file is not None
        self.created = int(time.time())
        """`created` of the models /v1/models lists (the gateway's start)."""
        self.pools: dict[str, PoolRuntime] = {}
        self._by_name: dict[str, PoolRuntime] = {}
        self._probing: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._reading: dict[tuple[int, str], asyncio.Task[None]] = {}
        """Per server, the /props and /slots read a ready probe started (one at a time)."""
        self._ending: dict[tuple[int, str], asyncio.Task[None]] = {}
        """Per server, the end of the requests waiting on it once it is unreachable."""
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closing: set[asyncio.Task[None]] = set()
        for pool in routing.pools:
            self.pools[pool.name] = self._new_pool(pool, self._pool_template(pool))
        self._index()

    # -- lookups on the request path --------------------------------------------------------

    def lookup(self, model: str | None, allowed: frozenset[str] | None) -> PoolRuntime:
        """The pool for a request's `model` and key (404 model_not_found, 400 no model)."""
        if self._task is None:
            self.start()  # an app served without main.serve (embedded, tests) probes too
        pool = self.routing.lookup(model, allowed)
        return self._by_name[pool.name]

    def first_client(self) -> LlamaCppClient:
        """The first server's client (the one-server gateway's `upstream`)."""
        return next(iter(next(iter(self.pools.values())).clients.values()))

    def model_ids(self, allowed: frozenset[str] | None) -> list[str]:
        """Names and aliases a key may use, in file order."""
        return self.routing.model_ids(allowed)

    # -- probing ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start probing (on the running loop; idempotent)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._probe_loop())

    async def close(self) -> None:
        """Stop probing and close every server's connections."""
        polls = [r.outside_poll for r in self.pools.values()]
        tasks = [
            t
            for t in (
                self._task,
                *self._probing.values(),
                *self._reading.values(),
                *self._ending.values(),
                *self._closing,
                *polls,
            )
            if t
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._task = None
        self.close_now()

    def close_now(self) -> None:
        """Close every server's idle connections (no loop needed)."""
        for runtime in self.pools.values():
            for client in (
                *runtime.clients.values(),
                *runtime.probe_clients.values(),
                *runtime.draining_clients.values(),
            ):
                client.close()

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            for runtime in list(self.pools.values()):
                for upstream in runtime.router.probes_due():
                    self._probe(runtime, upstream.key)
            now = loop.time()
            due = [at for r in self.pools.values() if (at := r.router.next_probe_at()) is not None]
            wait = min(due, default=now + PROBE_TICK_MAX) - now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), max(PROBE_TICK_MIN, min(PROBE_TICK_MAX, wait))
                )

    def _probe(self, runtime: PoolRuntime, key: str) -> asyncio.Task[None]:
        """The probe of one server: the one in flight, or a new one. One at a time per
        server, whoever asks (the loop, /health/ready)."""
        ident = (id(runtime), key)
        task = self._probing.get(ident)
        if task is None:
            task = asyncio.ensure_future(self._probe_once(runtime, key))
            self._probing[ident] = task
            task.add_done_callback(lambda _: self._probing.pop(ident, None))
        return task

    async def _probe_once(self, runtime: PoolRuntime, key: str) -> None:
        if key not in runtime.clients:
            return
        client = runtime.probe_clients.get(key)
        if client is None:
            client = runtime.probe_clients[key] = self._client_factory(key)
        timeout = self.settings.upstream_connect_timeout
        router = runtime.router
        # A request's failure that asks for a probe while this one is in flight is not
        # answered by it: the health keeps that recheck's time (ServerHealth.observe).
        began = router.now()
        try:
            response = await client._get("/health", timeout, PROBE_BODY_LIMIT)
            outcome = outcome_of_status(response.status)
        except ProxyError as exc:
            outcome = _probe_outcome(exc)
        upstream = router.upstream(key)
        was = upstream.health.state.value if upstream is not None else None
        changed = router.observe_probe(key, outcome, began)
        if (
            outcome in (Outcome.REFUSED, Outcome.TIMEOUT)
            and upstream is not None
            and upstream.health.state is State.DOWN
        ):
            # Apart from the probe: whoever waits for it (a request that found every
            # server down) must not wait for the TCP connect this may try too.
            ident = (id(runtime), key)
            if ident not in self._ending:
                task = asyncio.ensure_future(self._end_silent_requests(runtime, key, upstream))
                self._ending[ident] = task
                task.add_done_callback(lambda _: self._ending.pop(ident, None))
        if changed and upstream is not None:
            now = upstream.health.state.value
            if now == "ready":
                # Back from down or loading, maybe as a new process started with other
                # flags: a server that had no /slots may have it now.
                runtime.no_slots.discard(key)
            level = logging.INFO if now == "ready" else logging.WARNING
            log.log(
                level,
                "model %s: server %s is %s (was %s)",
                runtime.pool.name,
                upstream.server.display,
                now,
                was,
            )
        if outcome is not Outcome.OK or upstream is None:
            return
        # /props and /slots are read apart: whoever waits for this probe (/health/ready, a
        # request that found every server down) needs only /health, and a /slots that
        # hangs must not hold their answer for the prober's timeout.
        ident = (id(runtime), key)
        if ident not in self._reading:
            task = asyncio.ensure_future(self._read_capacity(runtime, client, key, upstream))
            self._reading[ident] = task
            task.add_done_callback(lambda _: self._reading.pop(ident, None))

    async def _end_silent_requests(
        self, runtime: PoolRuntime, key: str, upstream: Upstream
    ) -> None:
        """The server is down, and nothing takes connections there: its probe failed, and
        so does a plain TCP connect to the address it had (LlamaCppClient.reachable: a busy
        or hung llama-server still completes the handshake, its kernel does, so this never
        ends a long prompt's wait; a resolver that fails proves nothing). A machine that
        lost power or its network sends no reset, so the requests waiting on it would hear
        nothing until --upstream-first-byte-timeout (10 minutes by default): end those
        that have heard nothing from it for --upstream-connect-timeout."""
        client = runtime.clients.get(key)
        if client is None or not client.in_flight or await client.reachable():
            return
        display = upstream.server.display

        def reason() -> ProxyError:
            return UpstreamUnavailable(
                f"llama.cpp at {display} stopped answering (nothing takes connections there)"
            )

        ended = client.abort_silent(self.settings.upstream_connect_timeout, reason)
        if ended:
            log.warning(
                "model %s: server %s is unreachable: ended %d request(s) waiting on it",
                runtime.pool.name,
                display,
                ended,
            )

    async def _read_capacity(
        self, runtime: PoolRuntime, client: LlamaCppClient, key: str, upstream: Upstream
    ) -> None:
        """A ready server's slot count (/props) and outside load (/slots)."""
        try:
            if upstream.total_slots is None or key not in runtime.no_slots:
                timeout = self.settings.upstream_connect_timeout
                props = await client._get("/props", timeout, PROBE_BODY_LIMIT)
                total = parse_total_slots(props.body) if props.status == 200 else None
                if total is not None:
                    runtime.router.set_total_slots(key, total)
            if key not in runtime.no_slots:
                await self._read_slots(runtime, client, key)
        except ProxyError:
            pass  # /health decides the state; the next probe asks again

    async def _read_slots(self, runtime: PoolRuntime, client: LlamaCppClient, key: str) -> None:
        """Record how many of a server's slots /slots shows processing. An answer that is
        no slot list, or none in time, leaves the outside load unknown: none."""
        try:
            timeout = self.settings.upstream_connect_timeout
            slots = await client._get("/slots", timeout, PROBE_BODY_LIMIT)
        except ProxyError:
            # /health (the probe) decides the server's state; the outside load a stale
            # reading shows would hold its slots until /slots answers again, maybe never.
            runtime.router.forget_outside_load(key)
            return
        busy = parse_processing(slots.body) if slots.status == 200 else None
        if busy is not None:
            runtime.router.observe_slots(key, busy)
            return
        if slots.status in NO_SLOTS_STATUSES:
            runtime.no_slots.add(key)  # started without --slots: not asked again
        # Outside load it cannot show is unknown, so none: the last reading would otherwise
        # hold its slots for good. Any other answer (malformed, a 5xx) is asked again at the
        # next probe, which re-reads /slots once a second at most.
        runtime.router.forget_outside_load(key)

    def _watch_outside(self, runtime: PoolRuntime) -> None:
        """Router.on_outside_wait: a request waits while outside load holds slots."""
        if runtime.outside_poll is None or runtime.outside_poll.done():
            runtime.outside_wake = asyncio.Event()
            runtime.outside_poll = asyncio.ensure_future(self._poll_outside(runtime))
        elif runtime.outside_wake is not None:
            runtime.outside_wake.set()

    async def _poll_outside(self, runtime: PoolRuntime) -> None:
        """Re-read /slots of the servers outside load holds, every OUTSIDE_POLL_INTERVAL, for
        as long as requests wait on them: a slot that outside work freed is seen within that
        interval, not at the next probe. A request that starts to wait meanwhile has them
        re-read at once (OUTSIDE_POLL_MIN_GAP apart at the closest): the reading it waits on
        may be older than the outside work's end (the prober read /slots while another client
        of the server was generating; that client has finished since), and one /slots answer
        is far shorter than the rest of the interval. Ends when nobody waits or no outside
        load is seen."""
        router = runtime.router
        wake = runtime.outside_wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        while keys := [k for k in router.held_by_outside() if k not in runtime.no_slots]:
            wake.clear()
            began = loop.time()
            polls = []
            for key in keys:
                client = runtime.probe_clients.get(key)
                if client is None:
                    client = runtime.probe_clients[key] = self._client_factory(key)
                polls.append(self._read_slots(runtime, client, key))
            await asyncio.gather(*polls, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), began + OUTSIDE_POLL_INTERVAL - loop.time())
            gap = began + OUTSIDE_POLL_MIN_GAP - loop.time()
            if gap > 0:
                await asyncio.sleep(gap)

    async def probe_all(self) -> None:
        """Probe every server now (joining probes in flight): /health/ready's answer must be
        current."""
        if self._task is None:
            self.start()
        tasks = [
            self._probe(runtime, key)
            for runtime in self.pools.values()
            for key in runtime.clients
            if runtime.router.upstream(key) is not None
        ]
        if tasks:
            # shield: a readiness caller that leaves must not cancel the shared probes.
            await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))

    def recheck(self, lease: Lease) -> None:
        """Probe the lease's server soon: a request's failure could not tell whether it is
        the server's (route/failover.py, `Verdict.recheck`). Not a server a reload removed
        since, nor one added back at its address: that is another server."""
        if lease.recheck() and self._wake is not None:
            self._wake.set()

    async def probe_down_now(self, runtime: PoolRuntime) -> bool:
        """Every server of this pool looked down at its last probe: probe them all now,
        rather than refuse requests until the prober's backoff (up to 30 s) comes round, so
        a llama-server that came back is used at once. At most once per
        DEMAND_PROBE_INTERVAL per pool, whatever the request rate (requests meanwhile join
        the probes in flight); False when that interval has not passed and no such probe is
        in flight (nothing was probed)."""
        asked = runtime.asked_down
        if asked is None or asked.done():
            now = asyncio.get_running_loop().time()
            if now - runtime.asked_down_at < DEMAND_PROBE_INTERVAL:
                return False
            runtime.asked_down_at = now
            tasks = [self._probe(runtime, key) for key in runtime.clients]
            asked = runtime.asked_down = asyncio.gather(*tasks, return_exceptions=True)
        # A request that arrives while those probes are in flight waits for their answer
        # too (it costs no probe more): refused at once, it would get a 503 for a server
        # the probe is about to find back. Shielded: one caller leaving cancels nobody's.
        await asyncio.shield(asked)
        return True

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(every model has a ready server, the /health/ready body)."""
        statuses: dict[str, list[ServerStatus]] = {
            name: runtime.router.statuses() for name, runtime in self.pools.items()
        }
        return readiness(statuses)

    # -- reload ---------------------------------------------------------------------------------

    def reload(self) -> Routing:
        """Re-read the upstreams file and apply it; raises UpstreamsFileError (or a template
        error) and keeps the old pools when it cannot be used."""
        routing = load_routing(self.settings)
        templates = {pool.name: self._pool_template(pool) for pool in routing.pools}
        self.apply(routing, templates)
        return routing

    def apply(self, routing: Routing, templates: dict[str, ChatTemplate | None]) -> None:
        """Switch to a new snapshot: new servers join (loading until probed), removed ones
        drain (their generations finish on them), then their connections close."""
        diff = self.routing.diff(routing)
        old = self.pools
        pools: dict[str, PoolRuntime] = {}
        for pool in routing.pools:
            runtime = old.get(pool.name)
            if runtime is None:
                pools[pool.name] = self._new_pool(pool, templates[pool.name])
                continue
            removed = runtime.router.reconcile(pool)
            for server in pool.servers:
                if server.key not in runtime.clients:
                    runtime.clients[server.key] = self._client_factory(server.key)
            for upstream in removed:
                self._drain(runtime, upstream)
            runtime.pool = pool
            if runtime.template is not templates[pool.name]:
                runtime.template = templates[pool.name]
            pools[pool.name] = runtime
        for name, runtime in old.items():
            if name not in pools:
                for upstream in runtime.router.reconcile(Pool(name, ())):
                    self._drain(runtime, upstream)
        self.routing = routing
        self.pools = pools
        self._index()
        if self._wake is not None:
            self._wake.set()  # probe the new servers now
        for server in diff.added:
            log.info("server %s added", server.display)
        for server in diff.removed:
            log.info("server %s removed: draining", server.display)

    def _drain(self, runtime: PoolRuntime, upstream: Upstream) -> None:
        """A removed server: its client stays with its leases (the generations on it hold
        it), and its connections close once the last one ended."""
        client = runtime.clients.pop(upstream.key, None)
        probe_client = runtime.probe_clients.pop(upstream.key, None)
        if probe_client is not None:
            probe_client.close()
        if client is None:
            return
        runtime.draining_clients[upstream.key] = client
        task = asyncio.ensure_future(self._close_when_drained(runtime, upstream, client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_drained(
        self, runtime: PoolRuntime, upstream: Upstream, client: LlamaCppClient
    ) -> None:
        try:
            loop = asyncio.get_running_loop()
            await runtime.router.wait_drained(upstream, loop.time() + DRAIN_LIMIT)
        finally:
            if runtime.draining_clients.get(upstream.key) is client:
                del runtime.draining_clients[upstream.key]
            client.close()

    # -- construction ---------------------------------------------------------------------------

    def _pool_template(self, pool: Pool) -> ChatTemplate | None:
        if pool.chat_template:
            return load_chat_template(pool.chat_template)
        return self.template

    def _new_pool(self, pool: Pool, template: ChatTemplate | None) -> PoolRuntime:
        # Safe outside the loop: the router reads the clock only when it can (probes fall
        # due at once) and sets timers only inside acquire, which runs on the loop.
        router = Router(pool, self.policy)
        clients = {s.key: self._client_factory(s.key) for s in pool.servers}
        runtime = PoolRuntime(pool, router, clients, template)
        router.on_outside_wait = lambda: self._watch_outside(runtime)
        return runtime

    def _index(self) -> None:
        self._by_name = {pool.name: self.pools[pool.name] for pool in self.routing.pools}


def describe(servers: tuple[Server, ...]) -> str:
    """Servers for a log line: host:port only."""
    return ", ".join(s.display for s in servers)
