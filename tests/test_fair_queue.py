"""A queue that is fair between keys (issue 12): the discipline alone, the router with it,
and the measurement the issue asks for, through the gateway into the fake llama.cpp."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from llamacpp_proxy.guard.auth import KeyFileError, load_key_file
from llamacpp_proxy.route.router import Lease
from llamacpp_proxy.route.waitqueue import FairQueue

from .conftest import LoopThread, Stack, start_stack, stop_stack
from .fake_llamacpp import FakeLlamaCpp, prompt_text
from .test_route_router import make_router, run, settle

HEAVY_KEY = "sk-heavy-batch-0123456789"
LIGHT_KEY = "sk-light-human-0123456789"


def drain(queue: FairQueue[str]) -> list[str]:
    """Serve the queue to the end, one waiter at a time, as the router does."""
    served = []
    while len(queue):
        head = next(queue.in_order())
        queue.remove(head)
        served.append(head)
    return served


def test_a_late_light_key_goes_next_not_behind_a_batch() -> None:
    queue: FairQueue[str] = FairQueue(100)
    for i in range(50):
        assert queue.push(f"heavy{i}", "heavy")
    queue.remove(next(queue.in_order()))  # heavy0 is being served
    queue.push("light", "light")
    assert drain(queue)[:2] == ["light", "heavy1"]


def test_keys_alternate_and_each_key_keeps_its_own_order() -> None:
    queue: FairQueue[str] = FairQueue(100)
    for i in range(3):
        queue.push(f"a{i}", "a")
    for i in range(3):
        queue.push(f"b{i}", "b")
    queue.push("none0")  # no key (anonymous) is a key of its own
    assert drain(queue) == ["a0", "b0", "none0", "a1", "b1", "a2", "b2"]


def test_weights_share_turns_in_proportion() -> None:
    queue: FairQueue[str] = FairQueue(100)
    for i in range(8):
        queue.push(f"a{i}", "a", weight=3.0)
        queue.push(f"b{i}", "b", weight=1.0)
    first_eight = drain(queue)[:8]
    assert sum(w.startswith("a") for w in first_eight) == 6


def test_an_idle_key_banks_no_credit() -> None:
    queue: FairQueue[str] = FairQueue(100)
    for i in range(4):
        queue.push(f"a{i}", "a")
    queue.remove(next(queue.in_order()))
    queue.remove(next(queue.in_order()))  # a0 and a1 served: b was idle all along
    for i in range(3):
        queue.push(f"b{i}", "b")
    # b arrives now: it alternates with a from here, it does not get three turns in a row
    # for the two it did not use
    assert drain(queue) == ["b0", "a2", "b1", "a3", "b2"]


def test_a_waiter_leaving_from_the_back_does_not_push_newcomers_back() -> None:
    queue: FairQueue[str] = FairQueue(100)
    for i in range(10):
        queue.push(f"a{i}", "a")
    queue.remove("a9")  # its client gave up
    queue.push("b0", "b")
    assert drain(queue)[:2] == ["a0", "b0"]


def test_a_request_that_took_a_free_slot_counts_as_its_keys_turn() -> None:
    queue: FairQueue[str] = FairQueue(100)
    queue.served("heavy")  # took the free slot: heavy0
    for i in range(1, 50):
        queue.push(f"heavy{i}", "heavy")
    queue.push("light", "light")
    assert drain(queue)[:2] == ["light", "heavy1"]


def test_the_queue_stays_bounded() -> None:
    queue: FairQueue[str] = FairQueue(2)
    assert queue.push("a", "x") and queue.push("b", "y")
    assert queue.full and not queue.push("c", "z")
    queue.remove("a")
    queue.remove("a")  # absent is fine
    assert len(queue) == 1 and not queue.full
    with pytest.raises(ValueError):
        queue.push("d", "x", weight=0)


def test_the_router_serves_waiting_keys_in_turn() -> None:
    async def main() -> None:
        router, _ = make_router(n=1, slots=1)
        held = await router.acquire(None, queue_key="heavy")
        order: list[str] = []

        async def wait(name: str, key: str) -> None:
            lease: Lease = await router.acquire(None, queue_key=key)
            order.append(name)
            lease.release()

        tasks = [asyncio.create_task(wait(f"heavy{i}", "heavy")) for i in range(1, 6)]
        await settle()
        tasks.append(asyncio.create_task(wait("light", "light")))
        await settle()
        assert router.waiting == 6  # heavy0 holds the slot
        held.release()
        await asyncio.gather(*tasks)
        assert order == ["light", "heavy1", "heavy2", "heavy3", "heavy4", "heavy5"]

    run(main())


def test_weight_in_the_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        '[keys.a]\nkey = "sk-aaaaaaaaaaaa"\nweight = 4\n[keys.b]\nkey = "sk-bbbbbbbbbbbb"\n'
    )
    weights = {p.name: p.weight for p in load_key_file(path).values()}
    assert weights == {"a": 4.0, "b": 1.0}
    path.write_text('[keys.a]\nkey = "sk-aaaaaaaaaaaa"\nweight = 0\n')
    with pytest.raises(KeyFileError, match="'weight' must be a number"):
        load_key_file(path)


# -- the measurement, through the gateway ------------------------------------------------


@pytest.fixture
def one_slot(runner: LoopThread, tmp_path: Path) -> Iterator[tuple[Stack, FakeLlamaCpp]]:
    async def start() -> FakeLlamaCpp:
        server = FakeLlamaCpp()
        server.script.total_slots = 1
        server.start()
        return server

    fake = runner.run(start())
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.batch]\nkey = "{HEAVY_KEY}"\n\n[keys.human]\nkey = "{LIGHT_KEY}"\n')
    stack = start_stack(runner, fake, llamacpp_server=(fake.url,), api_keys_file=keys)
    yield stack, fake
    stop_stack(stack)
    runner.call(fake.stop)


def test_one_slot_a_batch_of_50_and_one_other_request_that_goes_next(
    one_slot: tuple[Stack, FakeLlamaCpp],
) -> None:
    stack, fake = one_slot
    router = stack.ctx.routes.pools["default"].router
    assert stack.wait_for(
        lambda: all(router.upstream(s.key).total_slots == 1 for s in router.pool.servers)  # type: ignore[union-attr]
    )
    gate = stack.runner.call(asyncio.Event)
    fake.script.gate = gate  # every generation waits until the test lets them run

    def complete(client: httpx.Client, key: str, prompt: str) -> int:
        r = client.post(
            "/v1/completions",
            json={"prompt": prompt, "max_tokens": 4},
            headers={"Authorization": f"Bearer {key}"},
        )
        return r.status_code

    limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
    with (
        httpx.Client(base_url=stack.url, timeout=20, limits=limits) as client,
        ThreadPoolExecutor(51) as threads,
    ):
        batch = [threads.submit(complete, client, HEAVY_KEY, f"batch-{i}") for i in range(50)]
        # One generation holds the slot, 49 wait in the gateway's queue.
        assert stack.wait_for(lambda: fake.active == 1 and router.waiting == 49)
        other = threads.submit(complete, client, LIGHT_KEY, "human-question")
        assert stack.wait_for(lambda: router.waiting == 50)
        stack.runner.call(gate.set)
        assert other.result(20) == 200
        assert [f.result(20) for f in batch] == [200] * 50
    order = [prompt_text(body["prompt"]) for body in fake.requests]
    assert len(order) == 51
    assert order[0].startswith("batch-")
    # The other key's request is the very next generation: it waited for the one that was
    # running when it arrived, and for none of the 49 queued before it.
    assert order[1] == "human-question"
