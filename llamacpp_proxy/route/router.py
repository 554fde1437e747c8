"""The choice of server inside one pool: health, free slots, conversation affinity, and the
bounded wait when every server is full. `acquire` hands out a `Lease` on one slot.

Capacity. A server's free slots are `total_slots` (from /props; 1 until known) minus the
gateway's own generations on it (leases) minus the outside load last seen in /slots (slots
processing that are not ours). A generation goes to a server with a free slot, else waits
here, in the gateway, in a bounded queue, rather than in llama.cpp's unbounded one.

Choice, in order:
1. The warm server of a *continuation* (the prompt extends the whole of a prompt that
   server served; or the request's session key was last served there) when it has a free
   slot, even if others are less loaded: re-reading a long context costs far more.
2. When that warm server is full, wait for it at most `warm_wait_per_kib` seconds per KiB of
   matched prefix (capped by `warm_wait_max`); after that, any server (the context is
   re-read there, and the conversation now lives there).
3. Otherwise the least loaded ready server with a free slot (busy/total); ties go to the
   server holding a shared prefix (a common system prompt), else round-robin.
A waiter holding out for its warm server does not hold back others: a slot it declines is
offered to the next waiter. A freed slot goes first to a waiting continuation of that
server (even past its warm wait), then to the queue in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..errors import NoServerAvailable, ServerOverloaded, UpstreamLoading
from .affinity import DEFAULT_MAX_PREFIXES, DEFAULT_MAX_SESSIONS, PrefixMap, SessionMap
from .affinity import prefix_hashes as _prefix_hashes
from .affinity import prompt_bytes as _prompt_bytes
from .clock import Clock, LoopClock, Timer
from .health import Outcome, ProbePolicy, ServerHealth, ServerStatus, State
from .outliers import EjectionPolicy, Outlier, RequestResults
from .pools import Pool, Server
from .waitqueue import FairQueue

log = logging.getLogger("llamacpp_proxy.route")

UNKNOWN_SLOTS = 1
"""Slots assumed before /props said: one is never an overload, whatever the server has."""


@dataclass(frozen=True)
class RoutingPolicy:
    """The router's settings (the integrator maps CLI options onto them)."""

    mode: str = "affinity"
    """affinity (the above), least-busy (step 3 only: no prefix hashing) or round-robin
    (free slots taken in turn, whatever the load; for comparison in benchmarks). Every mode
    keeps to the slots and health, and queues in the gateway."""
    max_queue: int = 100
    """Requests waiting for a slot per pool (--max-queue); more: 503 server_overloaded."""
    queue_timeout: float = 30.0
    """Longest wait for a slot (--queue-timeout), unless the caller's deadline is sooner."""
    retry_after: int = 1
    """Seconds in Retry-After when overloaded."""
    warm_wait_per_kib: float = 0.1
    """Seconds worth waiting for a full warm server per KiB of cached prefix: about what
    re-reading 1 KiB (~250 tokens) costs a small model on CPU; a GPU re-reads faster, so
    GPU pools may lower it."""
    warm_wait_max: float = 5.0
    """Cap on that wait."""
    max_prefixes: int = DEFAULT_MAX_PREFIXES
    """Prefix-block entries kept for affinity (LRU)."""
    max_sessions: int = DEFAULT_MAX_SESSIONS
    """Session keys kept for affinity (LRU)."""
    probe: ProbePolicy = field(default_factory=ProbePolicy)
    ejection: EjectionPolicy = field(default_factory=EjectionPolicy)
    """When a server whose generations keep failing leaves rotation (route/outliers.py)."""


class Upstream:
    """One server's routing state: health, slots, the gateway's generations on it."""

    def __init__(self, server: Server, health: ServerHealth, outlier: Outlier) -> None:
        self.server = server
        self.health = health
        self.outlier = outlier
        self.readmit_timer: Timer | None = None
        self.total_slots: int | None = None
        self.inflight = 0
        """The gateway's own generations on this server (open leases)."""
        self.external_busy = 0
        """Slots busy with work the gateway did not send, as last seen in /slots."""
        self.draining = False
        self._idle: list[asyncio.Future[None]] = []

    @property
    def key(self) -> str:
        """The server's identity."""
        return self.server.key

    @property
    def free(self) -> int:
        """Slots a new generation may take now."""
        return (self.total_slots or UNKNOWN_SLOTS) - self.inflight - self.external_busy

    @property
    def load(self) -> float:
        """Busy fraction of the slots (may exceed 1 when outside load overbooks it)."""
        return (self.inflight + self.external_busy) / (self.total_slots or UNKNOWN_SLOTS)

    @property
    def usable(self) -> bool:
        """Takes new work: ready, not draining, not ejected for failing requests."""
        return self.health.state is State.READY and not self.draining and not self.outlier.ejected

    @property
    def expected(self) -> bool:
        """Worth waiting for: ready or loading, not draining, not ejected. An ejected
        server is out for seconds to minutes, and while it is, another takes work (the
        router readmits it when none does): a failover that only it could take fails now,
        with the refusal it had, rather than wait out --queue-timeout for it."""
        return (
            self.health.state is not State.DOWN and not self.draining and not self.outlier.ejected
        )


class Lease:
    """One slot on one server, held from routing until the generation ends."""

    __slots__ = ("_router", "_upstream", "continuation", "matched_bytes", "released")

    def __init__(
        self, router: Router, upstream: Upstream, matched_bytes: int, continuation: bool
    ) -> None:
        self._router = router
        self._upstream = upstream
        self.matched_bytes = matched_bytes
        """Bytes of prompt prefix the chosen server was last seen holding (0: cold)."""
        self.continuation = continuation
        """Routed to the server that served this conversation's previous turn."""
        self.released = False

    @property
    def server(self) -> Server:
        """The server to send the generation to (`.url` to connect, `.display` to log)."""
        return self._upstream.server

    def report(self, ok: bool, why: str = "", results: RequestResults | None = None) -> None:
        """The generation ended well (`ok`), or failed by the server's fault (`why`;
        route/outliers.py says which failures count, and `results`, shared by a request's
        generations, makes the request count once). Reported to the server this lease was
        taken from: once a reload removed it (draining), to nobody, even when a later reload
        added its host:port again, as another server with a state of its own."""
        upstream = self._upstream
        if upstream.draining or (results is not None and not results.news(upstream, ok)):
            return
        self._router._result(upstream, ok, why)

    def observe(self, outcome: Outcome) -> None:
        """What the generation's failure says of the server's health (as a probe would),
        for the server it was taken from, not for one added later at the same address."""
        if not self._upstream.draining:
            self._router._observe(self._upstream, outcome)

    def recheck(self) -> bool:
        """Ask for a probe of the server soon (`ServerHealth.recheck`); False when it was
        removed since (not probed: nothing to ask)."""
        if self._upstream.draining:
            return False
        self._upstream.health.recheck(self._router._clock.now())
        return True

    def release(self) -> None:
        """Give the slot back (idempotent; works after the server was removed)."""
        if not self.released:
            self.released = True
            self._router._release(self._upstream)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(eq=False)
class _Want:
    """What a request would like: its warm server, and how long it may wait for it."""

    warm: str | None = None
    continuation: bool = False
    matched_bytes: int = 0
    warm_until: float = 0.0


@dataclass(eq=False)
class _Waiter:
    want: _Want
    exclude: frozenset[str]
    future: asyncio.Future[Upstream]


class Router:
    """Routes the generations of one pool over its servers."""

    def __init__(
        self,
        pool: Pool,
        policy: RoutingPolicy | None = None,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.policy = policy or RoutingPolicy()
        self._clock: Clock = clock or LoopClock()
        self._rand = rand
        self._servers: dict[str, Upstream] = {}
        self._draining: dict[Upstream, None] = {}
        """Removed servers with leases left, by identity (in order of removal): a host:port
        removed, added back and removed again drains twice, as two servers."""
        self._prefixes = PrefixMap(self.policy.max_prefixes)
        self._sessions = SessionMap(self.policy.max_sessions)
        self._queue: FairQueue[_Waiter] = FairQueue(self.policy.max_queue)
        self._turn = itertools.count()
        self._affinity = self.policy.mode == "affinity"
        self._round_robin = self.policy.mode == "round-robin"
        self.on_outside_wait: Callable[[], None] | None = None
        """Called when a request starts to wait while outside load (`external_busy`, as last
        seen in /slots) holds slots of a usable server: the owner re-reads /slots sooner than
        the probe interval, so work that ended outside the gateway does not hold requests
        until the next probe (up to a second; another client of the same llama-server, or
        another gateway process, is outside load)."""
        self._add_servers(pool.servers)

    # -- the request path ------------------------------------------------------------------

    async def acquire(
        self,
        prompt: str | bytes | None,
        session_key: str | None = None,
        deadline: float | None = None,
        exclude: frozenset[str] = frozenset(),
        queue_key: str | None = None,
        queue_weight: float = 1.0,
    ) -> Lease:
        """A lease on a slot of the best server for this prompt.

        `prompt` is the rendered prompt (None: no affinity); `deadline` is on the router's
        clock (default: now + queue_timeout); `exclude` holds server keys that already
        failed this request (failover). Raises ServerOverloaded when the queue is full or
        the deadline passes, NoServerAvailable when no server of the pool is ready or
        loading. While it waits, waiters are served fairly between `queue_key`s, in
        proportion to their `queue_weight` (see waitqueue.py). Cancelling the caller while it waits
        passes its turn (and any slot just handed to it) to the next waiter.
        """
        now = self._clock.now()
        if deadline is None:
            deadline = now + self.policy.queue_timeout
        if self._affinity:
            data = _prompt_bytes(prompt) if prompt else b""
            hashes = _prefix_hashes(data) if data else []
            want = self._want(hashes, data, session_key, now)
        else:
            data, hashes, want, session_key = b"", [], _Want(), None
        self._check_expected(exclude)
        upstream = self._choose(want, exclude, now)
        if upstream is None and (self._queue.full or now >= deadline):
            # No waiting possible: a free cold slot beats a 503.
            upstream = self._choose(want, exclude, now, hold_for_warm=False)
            if upstream is None:
                raise self._overloaded("the wait queue is full" if self._queue.full else None)
        if upstream is None:
            upstream = await self._wait(want, exclude, deadline, now, queue_key, queue_weight)
        else:
            upstream.inflight += 1
            self._queue.served(queue_key, queue_weight)
        return self._lease(upstream, want, hashes, data, session_key)

    def queue_deadline(self) -> float:
        """The end of a wait for a slot that starts now, on the router's clock: what
        `acquire` waits until unless given a deadline. A request that fails over keeps the
        one it began with, so --queue-timeout bounds its whole wait, not each server's."""
        return self._clock.now() + self.policy.queue_timeout

    def acquire_nowait(
        self,
        prompt: str | bytes | None,
        session_key: str | None = None,
        exclude: frozenset[str] = frozenset(),
        queue_key: str | None = None,
        queue_weight: float = 1.0,
    ) -> Lease | None:
        """`acquire`'s answer when it needs no wait, else None (then call `acquire`, which the
        caller can cancel). Lets the request path skip a task when a slot is free."""
        now = self._clock.now()
        if self._affinity:
            data = _prompt_bytes(prompt) if prompt else b""
            hashes = _prefix_hashes(data) if data else []
            want = self._want(hashes, data, session_key, now)
        else:
            data, hashes, want, session_key = b"", [], _Want(), None
        self._check_expected(exclude)
        upstream = self._choose(want, exclude, now)
        if upstream is None:
            return None
        upstream.inflight += 1
        self._queue.served(queue_key, queue_weight)  # the key's turn, for the fair queue
        return self._lease(upstream, want, hashes, data, session_key)

    def can_retry(self, exclude: frozenset[str]) -> bool:
        """Some server not in `exclude` is ready or loading (failover has somewhere to go)."""
        return self._any_expected(exclude)

    def _lease(
        self,
        upstream: Upstream,
        want: _Want,
        hashes: list[int],
        data: bytes,
        session_key: str | None,
    ) -> Lease:
        # Record now, not when the answer ends: the next turn may arrive while this one
        # streams, and it should find this server.
        self._prefixes.record(hashes, upstream.key, data)
        if session_key:
            self._sessions.record(session_key, upstream.key)
        warm = upstream.key == want.warm
        return Lease(self, upstream, want.matched_bytes if warm else 0, warm and want.continuation)

    async def _wait(
        self,
        want: _Want,
        exclude: frozenset[str],
        deadline: float,
        now: float,
        queue_key: str | None,
        queue_weight: float = 1.0,
    ) -> Upstream:
        future: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(want, exclude, future)
        self._queue.push(waiter, queue_key, queue_weight)
        if self.on_outside_wait is not None and self.held_by_outside():
            self.on_outside_wait()
        timers: list[Timer] = [self._clock.call_at(deadline, lambda: self._expire(waiter))]
        if want.warm is not None and now < want.warm_until < deadline:
            # When the warm wait ends, the waiter may take a cold slot free at that moment.
            timers.append(self._clock.call_at(want.warm_until, self._dispatch))
        try:
            return await future
        except asyncio.CancelledError:
            self._queue.remove(waiter)
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())  # granted as we were cancelled: pass it on
            raise
        finally:
            for timer in timers:
                timer.cancel()

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._queue.remove(waiter)
            exclude = waiter.exclude
            if any(u.usable and u.key not in exclude for u in self._servers.values()):
                waiter.future.set_exception(self._overloaded("no slot became free in time"))
            else:  # it waited on servers loading their model, not on busy ones
                waiter.future.set_exception(self._loading())

    def _release(self, upstream: Upstream) -> None:
        upstream.inflight -= 1
        if upstream.draining:
            if upstream.inflight <= 0:
                self._draining.pop(upstream, None)
                for fut in upstream._idle:
                    if not fut.done():
                        fut.set_result(None)
                upstream._idle.clear()
        else:
            self._dispatch()

    def _dispatch(self) -> None:
        """Offer free slots to waiters: first to continuations waiting for that very server,
        then in the queue's fair order (route/waitqueue.py).

        Without the first pass a saturated pool (more conversations than slots) loses every
        cache: the slot a turn frees goes to the head of the queue, often another server's
        conversation whose warm wait ran out, which re-reads its context here while its own
        server's next free slot goes to yet another stranger (scripts/bench-routing, 9
        conversations on 6 slots, measured affinity evaluating 86% of the prompt tokens
        round-robin did). With it, a server
        that frees a slot serves its own waiting conversations first; any slot still free
        after that has nobody warm waiting for it, so taking it cold uses idle capacity and
        displaces no one.
        """
        if not len(self._queue):
            return
        now = self._clock.now()
        if self._affinity:
            for waiter in self._queue.in_order():
                want = waiter.want
                if not want.continuation or want.warm is None or want.warm in waiter.exclude:
                    continue
                warm = self._servers.get(want.warm)
                if warm is None or not warm.usable or warm.free <= 0 or waiter.future.done():
                    continue
                self._queue.remove(waiter)
                warm.inflight += 1
                waiter.future.set_result(warm)
        for waiter in self._queue.in_order():
            if not any(u.free > 0 and u.usable for u in self._servers.values()):
                break
            upstream = self._choose(waiter.want, waiter.exclude, now)
            if upstream is not None and not waiter.future.done():
                self._queue.remove(waiter)
                upstream.inflight += 1
                waiter.future.set_result(upstream)

    def _fail_unservable(self) -> None:
        """Waiters whose every server went down or away fail now rather than at deadline."""
        for waiter in self._queue.in_order():
            if not self._any_expected(waiter.exclude) and not waiter.future.done():
                self._queue.remove(waiter)
                waiter.future.set_exception(self._unavailable())

    # -- the choice --------------------------------------------------------------------------

    def _want(self, hashes: list[int], data: bytes, session_key: str | None, now: float) -> _Want:
        present = frozenset(self._servers)
        match = self._prefixes.longest(hashes, present, data) if hashes else None
        want = _Want()
        if match is not None:
            want = _Want(match.server, match.continuation, match.matched_bytes)
        if session_key:
            server = self._sessions.get(session_key)
            if server is not None and server in present and server != want.warm:
                # The client says this is the same conversation: trust it, but only a
                # prefix the map saw on that server is worth waiting for.
                matched = 0
                if hashes:
                    on_it = self._prefixes.longest(hashes, frozenset((server,)))
                    matched = on_it.matched_bytes if on_it is not None else 0
                want = _Want(server, True, matched)
            elif server is not None and server == want.warm:
                want.continuation = True
        if want.continuation:
            p = self.policy
            wait = min(p.warm_wait_max, p.warm_wait_per_kib * want.matched_bytes / 1024)
            want.warm_until = now + wait
        return want

    def _choose(
        self, want: _Want, exclude: frozenset[str], now: float, hold_for_warm: bool = True
    ) -> Upstream | None:
        """The server to take now, or None to keep waiting."""
        if self._round_robin:
            free = [
                u
                for u in self._servers.values()
                if u.free > 0 and u.usable and u.key not in exclude
            ]
            return free[next(self._turn) % len(free)] if free else None
        if want.warm is not None and want.warm not in exclude:
            warm = self._servers.get(want.warm)
            if warm is not None and warm.usable and want.continuation:
                if warm.free > 0:
                    return warm
                if hold_for_warm and now < want.warm_until:
                    return None
        best: list[Upstream] = []
        best_load = 0.0
        for u in self._servers.values():
            if u.free <= 0 or not u.usable or u.key in exclude:
                continue
            load = u.load
            if not best or load < best_load:
                best, best_load = [u], load
            elif load == best_load:
                best.append(u)
        if not best:
            return None
        for u in best:
            if u.key == want.warm:
                return u  # a shared prefix breaks the tie
        return best[next(self._turn) % len(best)]

    def _any_expected(self, exclude: frozenset[str]) -> bool:
        return any(u.expected and u.key not in exclude for u in self._servers.values())

    def _check_expected(self, exclude: frozenset[str]) -> None:
        if not self._any_expected(exclude):
            raise self._unavailable()

    def _overloaded(self, why: str | None) -> ServerOverloaded:
        n = len(self._servers)
        return ServerOverloaded(
            f"All {n} server{'s' if n != 1 else ''} of model '{self.pool.name}' are busy"
            + (f" and {why}" if why else "")
            + "; retry later.",
            self.policy.retry_after,
        )

    def _loading(self) -> UpstreamLoading:
        return UpstreamLoading(
            f"No server of model '{self.pool.name}' finished loading its model in time; "
            "retry later.",
            headers={"Retry-After": str(self.policy.retry_after)},
        )

    def _unavailable(self) -> NoServerAvailable:
        return NoServerAvailable(
            f"No server of model '{self.pool.name}' is up; retry later.",
            self.policy.retry_after,
        )

    # -- inputs from the prober and the reloader -------------------------------------------

    def now(self) -> float:
        """The router's clock: a probe's `began` for `observe_probe`."""
        return self._clock.now()

    def observe_probe(self, key: str, outcome: Outcome, began: float | None = None) -> bool:
        """Feed a probe's outcome (`began`: when the probe was sent, on `now()`), or a
        failed request's (None); True when the state changed."""
        upstream = self._servers.get(key)
        if upstream is None:
            return False
        return self._observe(upstream, outcome, began)

    def _observe(self, upstream: Upstream, outcome: Outcome, began: float | None = None) -> bool:
        key = upstream.key
        changed = upstream.health.observe(outcome, self._clock.now(), began)
        if changed:
            if upstream.health.state is State.DOWN:
                # It may come back as a new process with an empty cache.
                self._prefixes.forget_server(key)
                self._sessions.forget_server(key)
            self._readmit_if_none_usable()
            self._dispatch()
            self._fail_unservable()
        return changed

    def observe_result(self, key: str, ok: bool, why: str = "") -> None:
        """A generation on this server ended well (`ok`), or failed by the server's fault
        (`why`; route/outliers.py says which failures count), which may eject it."""
        upstream = self._servers.get(key)
        if upstream is not None:
            self._result(upstream, ok, why)

    def _result(self, upstream: Upstream, ok: bool, why: str) -> None:
        outlier = upstream.outlier
        if ok:
            if outlier.failures or outlier.ejections:
                outlier.succeeded()
            return
        if not outlier.failed() or not self._can_eject(upstream):
            return
        length = outlier.eject()
        upstream.readmit_timer = self._clock.call_at(
            self._clock.now() + length, lambda: self._readmit(upstream)
        )
        self._fail_unservable()  # failovers that were waiting for this server alone
        log.warning(
            "model %s: server %s is out of rotation for %gs: %d request(s) in a row failed "
            "there while its /health answers (last: %s)",
            self.pool.name,
            upstream.server.display,
            length,
            outlier.failures,
            why,
        )

    def _can_eject(self, upstream: Upstream) -> bool:
        """At most half of the pool's servers out at once, and never the last that takes
        work."""
        servers = self._servers.values()
        ejected = sum(1 for u in servers if u.outlier.ejected)
        others = any(u.usable for u in servers if u is not upstream)
        return others and ejected + 1 <= len(self._servers) // 2

    def _readmit(self, upstream: Upstream) -> None:
        if upstream.readmit_timer is not None:
            upstream.readmit_timer.cancel()
            upstream.readmit_timer = None
        if upstream.outlier.ejected:
            upstream.outlier.readmit()
            if upstream.key in self._servers:
                log.info(
                    "model %s: server %s is back in rotation after failing requests",
                    self.pool.name,
                    upstream.server.display,
                )
            self._dispatch()

    def _readmit_if_none_usable(self) -> None:
        """Every server that was taking work went down or away: the ejected ones come back
        now (failing now and then beats refusing every request)."""
        servers = list(self._servers.values())
        if not any(u.usable for u in servers):
            for u in servers:
                if u.outlier.ejected:
                    self._readmit(u)

    def ejected(self) -> list[str]:
        """Keys of the servers out of rotation for failing requests."""
        return [u.key for u in self._servers.values() if u.outlier.ejected]

    def recheck(self, key: str) -> None:
        """A request's failure asks for a probe of this server soon (the prober's loop must
        then be woken: `Routes.recheck`)."""
        upstream = self._servers.get(key)
        if upstream is not None:
            upstream.health.recheck(self._clock.now())

    def set_total_slots(self, key: str, total: int) -> None:
        """Record /props `total_slots`."""
        upstream = self._servers.get(key)
        if upstream is not None and total >= 1:
            upstream.total_slots = total
            self._dispatch()

    def observe_slots(self, key: str, processing: int) -> None:
        """Record how many slots /slots shows processing: those beyond the gateway's own
        generations are outside load. (Approximate: a lease that began or ended while the
        poll was in flight shifts the count by one until the next poll.)"""
        upstream = self._servers.get(key)
        if upstream is not None:
            upstream.external_busy = max(0, processing - upstream.inflight)
            self._dispatch()

    def forget_outside_load(self, key: str) -> None:
        """/slots could not say how busy the server is: count no outside load on it."""
        upstream = self._servers.get(key)
        if upstream is not None and upstream.external_busy:
            upstream.external_busy = 0
            self._dispatch()

    def held_by_outside(self) -> list[str]:
        """Usable servers that outside load (as last seen in /slots) holds slots of, while
        requests wait: worth re-reading their /slots now (`on_outside_wait`)."""
        if not len(self._queue):
            return []
        return [u.key for u in self._servers.values() if u.external_busy and u.usable]

    def probes_due(self) -> list[Upstream]:
        """Servers whose next probe is due now (draining ones are not probed)."""
        now = self._clock.now()
        return [u for u in self._servers.values() if u.health.next_probe_at <= now]

    def next_probe_at(self) -> float | None:
        """When the next probe falls due (None: no server)."""
        return min((u.health.next_probe_at for u in self._servers.values()), default=None)

    def reconcile(self, pool: Pool) -> list[Upstream]:
        """Apply a reloaded pool: new servers join (loading until probed), removed ones
        drain (no new work; their leases finish and release). Returns the removed ones."""
        self.pool = pool
        keep = {s.key: s for s in pool.servers}
        removed: list[Upstream] = []
        for key in [k for k in self._servers if k not in keep]:
            upstream = self._servers.pop(key)
            upstream.draining = True
            self._prefixes.forget_server(key)
            self._sessions.forget_server(key)
            if upstream.inflight > 0:
                self._draining[upstream] = None
            removed.append(upstream)
        for key, server in keep.items():
            if key in self._servers:
                self._servers[key].server = server  # its credentials may have changed
        self._add_servers(s for s in pool.servers if s.key not in self._servers)
        for upstream in removed:
            self._readmit(upstream)  # its timer must not outlive it
        self._readmit_if_none_usable()
        self._fail_unservable()
        self._dispatch()
        return removed

    async def wait_drained(self, upstream: Upstream, deadline: float) -> bool:
        """Wait until a removed server has no lease left, or `deadline`; True if drained."""
        if upstream.inflight <= 0:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        upstream._idle.append(future)

        def expire() -> None:
            if not future.done():
                future.set_exception(TimeoutError())

        timer = self._clock.call_at(deadline, expire)
        try:
            await future
            return True
        except TimeoutError:
            return False
        finally:
            timer.cancel()
            if future in upstream._idle:
                upstream._idle.remove(future)

    def _add_servers(self, servers: Iterable[Server]) -> None:
        now = self._clock_now_or_zero()
        for server in servers:
            self._servers[server.key] = Upstream(
                server,
                ServerHealth(self.policy.probe, now, self._rand),
                Outlier(self.policy.ejection),
            )

    def _clock_now_or_zero(self) -> float:
        try:
            return self._clock.now()
        except RuntimeError:  # built before the loop runs: probe at once when it does
            return 0.0

    # -- reporting ---------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests in the wait queue."""
        return len(self._queue)

    def upstream(self, key: str) -> Upstream | None:
        """A server of the pool by key (not a draining one)."""
        return self._servers.get(key)

    def statuses(self) -> list[ServerStatus]:
        """Per server, for /health/ready (draining servers last)."""
        out = [
            ServerStatus(
                u.server.display,
                "ejected"
                if u.outlier.ejected and u.health.state is State.READY
                else u.health.state.value,
                u.inflight + u.external_busy,
                u.total_slots,
            )
            for u in self._servers.values()
        ]
        out += [
            ServerStatus(u.server.display, "draining", u.inflight, u.total_slots)
            for u in self._draining
        ]
        return out
