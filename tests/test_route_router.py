"""The router of one pool: capacity, the bounded FIFO wait, cancellation, affinity and its
warm-versus-cold rule, health, failover exclusion, draining. Fake clock, no sleeps."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from llamacpp_proxy.errors import NoServerAvailable, ServerOverloaded
from llamacpp_proxy.route.affinity import BLOCK_BYTES
from llamacpp_proxy.route.health import Outcome, ProbePolicy, readiness
from llamacpp_proxy.route.outliers import EjectionPolicy, RequestResults
from llamacpp_proxy.route.pools import Pool, parse_server_url
from llamacpp_proxy.route.router import Lease, Router, RoutingPolicy

T = TypeVar("T")


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time moves only when the test says; timers fire in order on advance()."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t
        self._timers: list[tuple[float, int, FakeTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._timers, (when, next(self._seq), timer, callback))
        return timer

    def advance(self, dt: float) -> None:
        self.t += dt
        while self._timers and self._timers[0][0] <= self.t:
            _, _, timer, callback = heapq.heappop(self._timers)
            if not timer.cancelled:
                callback()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def settle() -> None:
    """Let woken tasks run (they wake by callbacks, not by time)."""
    for _ in range(5):
        await asyncio.sleep(0)


SERVERS = ("http://a:1", "http://b:1", "http://c:1")


def make_router(
    n: int = 3, slots: int = 2, clock: FakeClock | None = None, **policy: Any
) -> tuple[Router, FakeClock]:
    clock = clock or FakeClock()
    pool = Pool("m", tuple(parse_server_url(u, "t") for u in SERVERS[:n]))
    policy.setdefault("probe", ProbePolicy(jitter=0.0))
    router = Router(pool, RoutingPolicy(**policy), clock)
    for server in pool.servers:
        router.observe_probe(server.key, Outcome.OK)
        router.set_total_slots(server.key, slots)
    return router, clock


def conversation(i: int, turns: int) -> list[str]:
    """Growing prompts: each turn's prompt extends the previous one (as a chat does)."""
    system = f"<|im_start|>system\nYou are assistant number {i}. " + "Be brief. " * 120
    prompts, text = [], system
    for t in range(turns):
        text += f"<|im_start|>user\nQuestion {t} of conversation {i}? " + "detail " * 40
        text += "<|im_start|>assistant\n"
        prompts.append(text)
        text += f"Answer {t}. " + "words " * 30 + "<|im_end|>\n"
    return prompts


def host(lease: Lease) -> str:
    return lease.server.display


# -- capacity and spreading ---------------------------------------------------------------


def test_distinct_requests_spread_over_every_server() -> None:
    async def main() -> list[str]:
        router, _ = make_router()
        leases = [await router.acquire(None) for _ in range(6)]
        return [host(lease) for lease in leases]

    used = Counter(run(main()))
    assert used == {"a:1": 2, "b:1": 2, "c:1": 2}


def test_least_loaded_wins_and_ties_rotate() -> None:
    async def main() -> list[str]:
        router, _ = make_router(slots=4)
        held = await router.acquire(None)
        assert host(held) == "a:1"
        # a is busier now: b and c share the next ones in turn.
        picks = [host(await router.acquire(None)) for _ in range(2)]
        held.release()
        return picks

    assert sorted(run(main())) == ["b:1", "c:1"]


def test_outside_load_seen_in_slots_takes_capacity() -> None:
    async def main() -> list[str]:
        router, _ = make_router(n=2, slots=2)
        router.observe_slots("http://a:1", processing=2)  # another gateway fills a
        return [host(await router.acquire(None)) for _ in range(2)]

    assert run(main()) == ["b:1", "b:1"]


def test_release_is_idempotent_and_frees_exactly_one_slot() -> None:
    async def main() -> None:
        router, _ = make_router(n=1, slots=1, max_queue=0)
        lease = await router.acquire(None)
        lease.release()
        lease.release()
        again = await router.acquire(None)
        with pytest.raises(ServerOverloaded):
            await router.acquire(None)  # a double release would have freed a second slot
        again.release()

    run(main())


# -- the wait queue ---------------------------------------------------------------------------


def test_a_full_pool_queues_in_fifo_order_then_refuses_when_the_queue_is_full() -> None:
    async def main() -> None:
        router, _ = make_router(n=2, slots=1, max_queue=2)
        held = [await router.acquire(None), await router.acquire(None)]
        order: list[int] = []

        async def wait(i: int) -> Lease:
            lease = await router.acquire(None)
            order.append(i)
            return lease

        first = asyncio.create_task(wait(1))
        second = asyncio.create_task(wait(2))
        await settle()
        assert router.waiting == 2
        with pytest.raises(ServerOverloaded) as info:
            await router.acquire(None)
        assert info.value.status == 503
        assert info.value.body()["error"]["code"] == "server_overloaded"
        assert info.value.headers["Retry-After"] == "1"
        held[1].release()
        await settle()
        assert order == [1]
        held[0].release()
        await settle()
        assert order == [1, 2]
        (await first).release()
        (await second).release()

    run(main())


def test_a_waiter_gets_503_when_its_deadline_passes() -> None:
    async def main() -> None:
        router, clock = make_router(n=1, slots=1, queue_timeout=10.0)
        held = await router.acquire(None)
        waiter = asyncio.create_task(router.acquire(None))
        await settle()
        clock.advance(9.9)
        await settle()
        assert not waiter.done()
        clock.advance(0.2)
        with pytest.raises(ServerOverloaded, match="in time"):
            await waiter
        assert router.waiting == 0
        held.release()

    run(main())


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async def main() -> None:
        router, _ = make_router(n=1, slots=1)
        held = await router.acquire(None)
        cancelled = asyncio.create_task(router.acquire(None))
        patient = asyncio.create_task(router.acquire(None))
        await settle()
        cancelled.cancel()
        await settle()
        held.release()
        lease = await asyncio.wait_for(patient, 1)  # deadline: a hang fails, not blocks
        assert router.waiting == 0
        lease.release()

    run(main())


def test_a_slot_granted_to_a_waiter_cancelled_before_it_ran_goes_to_the_next() -> None:
    async def main() -> None:
        router, _ = make_router(n=1, slots=1)
        held = await router.acquire(None)
        first = asyncio.create_task(router.acquire(None))
        second = asyncio.create_task(router.acquire(None))
        await settle()
        held.release()  # grants the slot to `first`...
        first.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await first
        lease = await asyncio.wait_for(second, 1)
        assert lease.server.display == "a:1"
        lease.release()
        # Nothing leaked: the one slot is free again.
        (await router.acquire(None)).release()

    run(main())


# -- affinity ---------------------------------------------------------------------------------


def test_every_turn_of_a_conversation_lands_on_one_server_and_conversations_spread() -> None:
    async def main() -> dict[int, set[str]]:
        router, _ = make_router(n=3, slots=2)
        convs = {i: conversation(i, 6) for i in range(6)}
        seen: dict[int, set[str]] = {i: set() for i in convs}
        for turn in range(6):
            leases = []
            for i, prompts in convs.items():
                lease = await router.acquire(prompts[turn])
                seen[i].add(host(lease))
                if turn > 0:
                    assert lease.continuation and lease.matched_bytes > 0
                leases.append(lease)
            for lease in leases:
                lease.release()
        return seen

    seen = run(main())
    assert all(len(hosts) == 1 for hosts in seen.values())
    assert Counter(next(iter(h)) for h in seen.values()) == {"a:1": 2, "b:1": 2, "c:1": 2}


def test_conversations_sharing_a_system_prompt_still_spread() -> None:
    async def main() -> list[str]:
        router, _ = make_router(n=3, slots=4)
        system = "<|im_start|>system\nShared app prompt. " + "rule " * 400
        leases = [
            await router.acquire(system + f"<|im_start|>user\nhello from user {i}" + "x" * 300)
            for i in range(3)
        ]
        return [host(lease) for lease in leases]

    assert sorted(run(main())) == ["a:1", "b:1", "c:1"]


def test_new_conversations_with_one_long_system_prompt_and_short_questions_spread() -> None:
    """Their prompts differ only after the last full block: each looked like the previous
    conversation's next turn, went to its server and queued there while another idled."""

    async def main() -> None:
        router, _ = make_router(n=2, slots=1)
        system = "<|im_start|>system\nShared app prompt. " + "rule " * 400
        first = await router.acquire(system + "<|im_start|>user\nhi<|im_end|>\n")
        second = asyncio.create_task(router.acquire(system + "<|im_start|>user\nbye<|im_end|>\n"))
        await settle()
        assert second.done(), "a new conversation queued for a busy server; another was idle"
        lease = second.result()
        assert host(lease) != host(first) and not lease.continuation
        first.release()
        lease.release()
        # The same prompt again, and the real next turn, are still continuations.
        bye = system + "<|im_start|>user\nbye<|im_end|>\n"
        again = await router.acquire(bye)
        assert host(again) == host(lease) and again.continuation
        again.release()
        nxt = await router.acquire(bye + "<|im_start|>assistant\nok" + "more " * 60)
        assert host(nxt) == host(lease) and nxt.continuation
        nxt.release()

    run(main())


def test_a_shared_prefix_breaks_a_tie_toward_its_server() -> None:
    async def main() -> str:
        router, _ = make_router(n=3, slots=4)
        system = "shared " * 200
        first = await router.acquire(system + "conversation one " * 20)
        first.release()  # all idle again: a three-way tie
        other = await router.acquire("unrelated " * 10)  # moves the round-robin on
        other.release()
        lease = await router.acquire(system + "conversation two " * 20)
        assert lease.matched_bytes > 0 and not lease.continuation
        assert host(lease) == host(first)
        return host(lease)

    run(main())


def test_an_explicit_session_key_keeps_the_conversation_together() -> None:
    async def main() -> None:
        router, _ = make_router(n=3, slots=2)
        first = await router.acquire("short", session_key="s-1")
        first.release()
        for i in range(4):  # prompts too short for prefix matching
            lease = await router.acquire(f"other {i}", session_key="s-1")
            assert host(lease) == host(first) and lease.continuation
            lease.release()

    run(main())


def test_a_full_warm_server_is_waited_for_a_bounded_time_that_grows_with_the_prefix() -> None:
    async def main() -> None:
        router, clock = make_router(n=2, slots=1, warm_wait_per_kib=1.0, warm_wait_max=100.0)
        prompts = conversation(0, 2)
        first = await router.acquire(prompts[0])
        first.release()
        warm = host(first)
        blocker = await router.acquire(None)  # least loaded tie: round robin
        if host(blocker) != warm:  # make sure the warm one is the full one
            other = await router.acquire(None)
            blocker.release()
            blocker = other
        assert host(blocker) == warm
        matched_kib = (len(prompts[0].encode()) // BLOCK_BYTES) * BLOCK_BYTES / 1024
        waiter = asyncio.create_task(router.acquire(prompts[1]))
        await settle()
        assert not waiter.done()  # a cold server is free, but the warm one is worth a wait
        clock.advance(matched_kib * 0.9)
        await settle()
        assert not waiter.done()
        clock.advance(matched_kib * 0.2)
        lease = await asyncio.wait_for(waiter, 1)
        assert host(lease) != warm and not lease.continuation
        blocker.release()
        lease.release()
        # The conversation now lives on the cold server it moved to.
        moved = await router.acquire(prompts[1] + "next turn " * 10)
        assert host(moved) == host(lease)

    run(main())


def test_a_warm_server_that_frees_within_the_wait_gets_the_turn() -> None:
    async def main() -> None:
        router, _ = make_router(n=2, slots=1)
        prompts = conversation(1, 2)
        first = await router.acquire(prompts[0])
        waiter = asyncio.create_task(router.acquire(prompts[1]))
        await settle()
        assert not waiter.done()
        first.release()
        lease = await asyncio.wait_for(waiter, 1)
        assert host(lease) == host(first) and lease.continuation
        lease.release()

    run(main())


def test_a_waiter_holding_for_its_warm_server_does_not_hold_back_others() -> None:
    async def main() -> None:
        router, _ = make_router(n=2, slots=1, warm_wait_max=100.0, warm_wait_per_kib=10.0)
        prompts = conversation(2, 2)
        first = await router.acquire(prompts[0])
        holder = asyncio.create_task(router.acquire(prompts[1]))
        await settle()
        cold = await asyncio.wait_for(router.acquire("fresh conversation " * 30), 1)
        assert host(cold) != host(first)
        assert not holder.done()
        first.release()
        (await asyncio.wait_for(holder, 1)).release()
        cold.release()

    run(main())


def test_a_saturated_pool_gives_a_freed_slot_to_the_conversation_waiting_for_that_server() -> None:
    """scripts/bench-routing (9 conversations on 6 slots): the freed slot went to the head
    of the queue, a stranger, and the conversation warm there went cold elsewhere."""

    async def main() -> None:
        router, clock = make_router(n=2, slots=1)
        a = conversation(3, 2)
        first = await router.acquire(a[0])
        home = host(first)
        first.release()
        # Both servers busy with other conversations.
        busy = [await router.acquire(f"other conversation {i} " * 40) for i in range(2)]
        assert {host(lease) for lease in busy} == {"a:1", "b:1"}
        stranger = asyncio.create_task(router.acquire("a new conversation " * 40))
        await settle()
        turn = asyncio.create_task(router.acquire(a[1]))  # behind the stranger
        await settle()
        clock.advance(10.0)  # past the warm wait: everything is full anyway
        await settle()
        assert not stranger.done() and not turn.done()
        (home_busy,) = [lease for lease in busy if host(lease) == home]
        home_busy.release()
        await settle()
        assert turn.done(), "the slot freed on its server went to the head of the queue"
        lease = turn.result()
        assert host(lease) == home and lease.continuation
        assert not stranger.done()  # it takes the next slot, wherever it frees
        (elsewhere,) = [b for b in busy if b is not home_busy]
        elsewhere.release()
        cold = await asyncio.wait_for(stranger, 1)
        assert host(cold) != home
        lease.release()
        cold.release()

    run(main())


def test_a_full_queue_takes_a_cold_slot_rather_than_refuse() -> None:
    async def main() -> None:
        router, _ = make_router(n=2, slots=1, max_queue=0)
        prompts = conversation(3, 2)
        first = await router.acquire(prompts[0])
        lease = await router.acquire(prompts[1])
        assert host(lease) != host(first)

    run(main())


# -- health, failover, draining -----------------------------------------------------------


def test_down_servers_are_skipped_and_used_again_when_back() -> None:
    async def main() -> None:
        router, _ = make_router(n=2, slots=4)
        assert router.observe_probe("http://a:1", Outcome.REFUSED)
        picks = {host(await router.acquire(None)) for _ in range(3)}
        assert picks == {"b:1"}
        router.observe_probe("http://a:1", Outcome.OK)
        assert host(await router.acquire(None)) == "a:1"

    run(main())


def test_a_server_that_goes_down_loses_its_conversations() -> None:
    async def main() -> None:
        router, _ = make_router(n=2, slots=4)
        prompts = conversation(4, 2)
        first = await router.acquire(prompts[0])
        first.release()
        busy = await router.acquire(None, exclude=frozenset({"http://b:1"}))
        assert host(busy) == host(first)  # the warm server is now the busier one
        router.observe_probe(first.server.key, Outcome.REFUSED)
        router.observe_probe(first.server.key, Outcome.OK)
        # Back up, but it may be a new process with an empty cache: no continuation, so
        # the next turn goes to the least loaded server.
        lease = await router.acquire(prompts[1])
        assert host(lease) != host(first) and not lease.continuation
        busy.release()

    run(main())


def test_all_servers_down_fails_fast_but_loading_ones_are_waited_for() -> None:
    async def main() -> None:
        router, _ = make_router(n=2, slots=1)
        router.observe_probe("http://a:1", Outcome.REFUSED)
        router.observe_probe("http://b:1", Outcome.LOADING)
        waiter = asyncio.create_task(router.acquire(None))
        await settle()
        assert not waiter.done()
        router.observe_probe("http://b:1", Outcome.OK)
        (await asyncio.wait_for(waiter, 1)).release()
        router.observe_probe("http://b:1", Outcome.REFUSED)
        with pytest.raises(NoServerAvailable) as info:
            await router.acquire(None)
        assert info.value.status == 503 and "Retry-After" in info.value.headers

    run(main())


def test_waiters_fail_at_once_when_the_last_server_goes_down() -> None:
    async def main() -> None:
        router, _ = make_router(n=1, slots=1)
        held = await router.acquire(None)
        waiter = asyncio.create_task(router.acquire(None))
        await settle()
        router.observe_probe("http://a:1", Outcome.REFUSED)
        with pytest.raises(NoServerAvailable):
            await asyncio.wait_for(waiter, 1)
        held.release()

    run(main())


def test_failover_excludes_the_server_that_failed() -> None:
    async def main() -> None:
        router, _ = make_router(n=2, slots=4)
        prompts = conversation(5, 1)
        first = await router.acquire(prompts[0])
        first.release()
        retry = await router.acquire(prompts[0], exclude=frozenset({first.server.key}))
        assert host(retry) != host(first)
        with pytest.raises(NoServerAvailable):
            await router.acquire(None, exclude=frozenset({"http://a:1", "http://b:1"}))

    run(main())


def test_a_reload_adds_servers_and_drains_removed_ones_without_dropping_leases() -> None:
    async def main() -> None:
        router, clock = make_router(n=2, slots=1)
        on_a = await router.acquire(None)
        assert host(on_a) == "a:1"
        new_pool = Pool(
            "m", (parse_server_url("http://b:1", "t"), parse_server_url("http://c:1", "t"))
        )
        removed = router.reconcile(new_pool)
        assert [u.server.display for u in removed] == ["a:1"]
        statuses = {s.display: s.state for s in router.statuses()}
        assert statuses == {"b:1": "ready", "c:1": "loading", "a:1": "draining"}
        drained = asyncio.create_task(router.wait_drained(removed[0], clock.now() + 30))
        await settle()
        assert not drained.done()
        router.observe_probe("http://c:1", Outcome.OK)
        picks = {host(await router.acquire(None)) for _ in range(2)}
        assert picks == {"b:1", "c:1"}  # never the draining a
        on_a.release()  # the stream on a finishes normally
        assert await asyncio.wait_for(drained, 1)
        assert "a:1" not in {s.display for s in router.statuses()}

    run(main())


def test_a_server_removed_added_back_and_removed_again_drains_as_two() -> None:
    """Regression: draining servers were kept by host:port, so a server removed, added back
    and removed again while both had leases left lost the first one's entry (and the
    first's last lease, released, dropped the second's from /health/ready)."""

    async def main() -> None:
        router, _ = make_router(n=2, slots=1)
        a, b = (parse_server_url(u, "t") for u in SERVERS[:2])
        only = frozenset({"http://b:1"})
        first = await router.acquire(None, exclude=only)
        router.reconcile(Pool("m", (b,)))
        router.reconcile(Pool("m", (a, b)))
        router.observe_probe(a.key, Outcome.OK)
        second = await router.acquire(None, exclude=only)
        router.reconcile(Pool("m", (b,)))
        states = [(s.display, s.state, s.slots_busy) for s in router.statuses()]
        assert states == [("b:1", "ready", 0), ("a:1", "draining", 1), ("a:1", "draining", 1)]
        first.release()
        states = [(s.display, s.state, s.slots_busy) for s in router.statuses()]
        assert states == [("b:1", "ready", 0), ("a:1", "draining", 1)]
        second.release()
        assert [s.display for s in router.statuses()] == ["b:1"]

    run(main())


def test_a_draining_lease_reports_to_its_own_server_not_one_added_back() -> None:
    """Its result, its failure's word on health and its recheck go to the server it was
    taken from; a host:port added back is a new server with a state of its own."""

    async def main() -> None:
        router, clock = make_router(n=3, ejection=EjectionPolicy(failures=1))
        a_url = "http://a:1"
        a, b, c = (parse_server_url(u, "t") for u in SERVERS)
        lease = await router.acquire(None, exclude=frozenset({"http://b:1", "http://c:1"}))
        router.reconcile(Pool("m", (b, c)))
        router.reconcile(Pool("m", (a, b, c)))
        router.observe_probe(a_url, Outcome.OK)
        added = router.upstream(a_url)
        assert added is not None
        due = added.health.next_probe_at
        lease.report(False, "HTTP 500")
        lease.observe(Outcome.REFUSED)
        assert not lease.recheck()
        lease.release()
        assert router.ejected() == [] and added.usable
        assert added.inflight == 0 and added.health.next_probe_at == due
        # A lease on the server added back reports to it.
        fresh = await router.acquire(None, exclude=frozenset({"http://b:1", "http://c:1"}))
        assert fresh.recheck()
        assert added.health.next_probe_at == pytest.approx(clock.now() + 0.05)
        fresh.report(False, "HTTP 500")
        fresh.release()
        assert router.ejected() == [a_url]

    run(main())


def test_waiting_for_a_drain_has_a_deadline() -> None:
    async def main() -> None:
        router, clock = make_router(n=2, slots=1)
        lease = await router.acquire(None)
        (removed,) = router.reconcile(Pool("m", (parse_server_url("http://b:1", "t"),)))
        drained = asyncio.create_task(router.wait_drained(removed, clock.now() + 5))
        await settle()
        clock.advance(5)
        assert await asyncio.wait_for(drained, 1) is False
        lease.release()

    run(main())


def test_health_ready_reports_per_model_and_server_without_credentials() -> None:
    async def main() -> None:
        clock = FakeClock()
        pool = Pool(
            "m",
            (parse_server_url("http://u:pw@a:1", "t"), parse_server_url("http://b:1", "t")),
        )
        router = Router(pool, RoutingPolicy(probe=ProbePolicy(jitter=0.0)), clock)
        router.observe_probe("http://a:1", Outcome.OK)
        router.set_total_slots("http://a:1", 2)
        lease = await router.acquire(None)
        ok, body = readiness({"m": router.statuses()})
        assert ok
        assert body["models"]["m"]["servers"] == [
            {"server": "a:1", "status": "ready", "slots_busy": 1, "slots_total": 2},
            {"server": "b:1", "status": "loading", "slots_busy": 0, "slots_total": None},
        ]
        assert "pw" not in repr(body)
        router.observe_probe("http://a:1", Outcome.REFUSED)
        ok, body = readiness({"m": router.statuses()})
        assert not ok and body["models"]["m"]["status"] == "unavailable"
        lease.release()

    run(main())


def test_probes_fall_due_by_the_health_schedule() -> None:
    async def main() -> None:
        router, clock = make_router(n=2)
        assert router.probes_due() == []
        clock.advance(1.0)
        assert {u.server.display for u in router.probes_due()} == {"a:1", "b:1"}
        assert router.next_probe_at() == pytest.approx(clock.now())

    run(main())


def test_a_recheck_asked_while_a_probe_is_in_flight_is_not_dropped() -> None:
    """Regression: the regular probe in flight when a request's failure asked for a probe
    within 50 ms (recheck) set the next probe a full interval later when it completed."""

    async def main() -> None:
        router, clock = make_router(n=1)
        a = "http://a:1"
        clock.advance(1.0)
        (due,) = router.probes_due()
        began = router.now()  # the prober sends the probe
        clock.advance(0.01)
        lease = await router.acquire(None)
        assert lease.recheck()  # the request fails meanwhile
        lease.release()
        clock.advance(0.02)
        router.observe_probe(a, Outcome.OK, began)  # the probe sent before answers
        assert router.next_probe_at() == pytest.approx(began + 0.01 + 0.05)
        clock.advance(0.03)
        assert router.probes_due() == [due]

    run(main())


# -- outlier ejection (route/outliers.py) ---------------------------------------------------


def servers_taken(router: Router, n: int) -> Counter[str]:
    """Which servers n generations in a row go to (each released at once)."""

    async def go() -> Counter[str]:
        taken: Counter[str] = Counter()
        for _ in range(n):
            lease = await router.acquire(None)
            taken[lease.server.key] += 1
            lease.release()
        return taken

    return run(go())


def fail(router: Router, key: str, times: int) -> None:
    for _ in range(times):
        router.observe_result(key, False, "HTTP 500")


def test_a_server_whose_generations_keep_failing_leaves_rotation_then_returns() -> None:
    router, clock = make_router(3, ejection=EjectionPolicy(failures=3, base=10.0, max=25.0))
    a = "http://a:1"
    fail(router, a, 2)
    router.observe_result(a, True)  # a success between: the run starts again
    fail(router, a, 2)
    assert router.ejected() == []
    fail(router, a, 1)  # three in a row
    assert router.ejected() == [a]
    assert "a:1" not in {k.split("/")[-1] for k in servers_taken(router, 6)}
    status = {s.display: s.state for s in router.statuses()}
    assert status == {"a:1": "ejected", "b:1": "ready", "c:1": "ready"}
    assert readiness({"m": router.statuses()})[0]
    clock.advance(10.0)  # the first ejection: 10 s
    assert router.ejected() == []
    assert servers_taken(router, 6)[a] == 2
    fail(router, a, 1)  # back, and failing again at once: out for twice as long
    assert router.ejected() == [a]
    clock.advance(19.9)
    assert router.ejected() == [a]
    clock.advance(0.1)
    fail(router, a, 1)
    clock.advance(24.9)  # capped at max (25), not 40
    assert router.ejected() == [a]
    clock.advance(0.1)
    assert router.ejected() == []
    router.observe_result(a, True)  # a success forgives: the next run needs 3 again
    fail(router, a, 2)
    assert router.ejected() == []


def test_a_request_counts_once_per_server_toward_ejection() -> None:
    """--eject-after-failures counts requests: the generations of one (`n`, several
    prompts) that fail on a server are one failure, and a success of any of them there is
    a success, whichever ends first (route/outliers.py, RequestResults)."""

    async def main() -> None:
        router, _ = make_router(3, slots=8, ejection=EjectionPolicy(failures=2))
        a = "http://a:1"
        on_a = frozenset({"http://b:1", "http://c:1"})

        async def request(*oks: bool) -> None:
            results = RequestResults()
            leases = [await router.acquire(None, exclude=on_a) for _ in oks]
            for lease, ok in zip(leases, oks, strict=True):
                lease.report(ok, "" if ok else "HTTP 500", results)
                lease.release()

        await request(False, False, False, False, False)
        assert router.ejected() == []  # one request with n=5: one failure
        await request(True, False)  # a success: the run restarts, and its failure is none
        await request(False, True, False)  # a failure (1 of 2), then a success: 0 again
        await request(False)
        assert router.ejected() == []  # 1 of 2
        await request(False, False)
        assert router.ejected() == [a]  # two requests in a row failed there

    run(main())


def test_ejection_never_takes_the_last_server_nor_more_than_half() -> None:
    alone, _ = make_router(1, ejection=EjectionPolicy(failures=1))
    fail(alone, "http://a:1", 5)
    assert alone.ejected() == []  # its 502s would only become 503s
    router, _ = make_router(3, ejection=EjectionPolicy(failures=1))
    for key in SERVERS:
        fail(router, key, 2)
    assert router.ejected() == ["http://a:1"]  # 1 of 3: at most half
    four, _ = make_router(3, ejection=EjectionPolicy(failures=0))
    fail(four, "http://a:1", 50)
    assert four.ejected() == []  # 0: off


def test_ejected_servers_come_back_at_once_when_no_other_takes_work() -> None:
    router, _ = make_router(2, ejection=EjectionPolicy(failures=1))
    fail(router, "http://a:1", 1)
    assert router.ejected() == ["http://a:1"]
    router.observe_probe("http://b:1", Outcome.REFUSED)  # the healthy one goes down
    assert router.ejected() == []
    assert servers_taken(router, 2) == {"http://a:1": 2}
