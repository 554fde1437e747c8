"""Token budgets under a hostile client: a burst of concurrent requests must not spend more
than the key was given, and no charge may be lost to load.

Each scenario is what one client holding one budgeted key can do: send many requests at
once (one kept-alive AsyncClient), and see how many are served and what they cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamacpp_proxy.errors import BudgetExceeded, RateLimiterUnavailable
from llamacpp_proxy.guard.auth import Budget, Principal
from llamacpp_proxy.guard.budgets import RedisBudgets

from .conftest import LoopThread, Stack, start_stack, stop_stack, wait_until_fake_is_idle
from .fake_llamacpp import FakeLlamaCpp

TEAM_KEY = "sk-team-hostile-0123456789"


@pytest.fixture
def ledger_stack(
    runner: LoopThread, fake: FakeLlamaCpp, tmp_path: Path
) -> Iterator[Callable[..., Stack]]:
    """A gateway with a usage ledger (so budgets are counted in memory) and a key file."""
    wait_until_fake_is_idle(runner, fake)
    runner.call(fake.reset)
    made: list[Stack] = []

    def factory(**key: Any) -> Stack:
        keys = tmp_path / "keys.toml"
        extra = "".join(f"{k} = {v}\n" for k, v in key.items())
        keys.write_text(f'[keys.team]\nkey = "{TEAM_KEY}"\n{extra}')
        fake.script.total_slots = 64  # a burst waits in llama.cpp, not in the gateway's queue
        stack = start_stack(runner, fake, usage_db=tmp_path / "usage.db", api_keys_file=keys)
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        stop_stack(stack)
        if stack.ctx.usage is not None:
            stack.ctx.usage.close()
    gate = fake.script.gate
    if gate is not None:  # a failed test leaves llama.cpp holding its requests
        runner.call(gate.set)
    wait_until_fake_is_idle(runner, fake)


def cost(response: httpx.Response) -> int:
    usage = response.json()["usage"]
    return int(usage["prompt_tokens"] + usage["completion_tokens"])


def test_a_burst_cannot_spend_a_daily_budget_many_times_over(
    ledger_stack: Callable[..., Stack],
) -> None:
    stack = ledger_stack(tokens_per_day=100)
    gate = asyncio.Event()
    stack.fake.script.gate = gate  # llama.cpp holds every generation until the burst is in
    body = {"prompt": "x", "max_tokens": 5}
    burst = 40

    async def scenario() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {TEAM_KEY}"}
        limits = httpx.Limits(max_connections=burst)
        async with httpx.AsyncClient(base_url=stack.url, timeout=20, limits=limits) as http:
            sent = [
                asyncio.ensure_future(http.post("/v1/completions", json=body, headers=headers))
                for _ in range(burst)
            ]
            # Every request either answered (refused) or waits in llama.cpp: the whole burst
            # was decided while none of it had been charged yet.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while sum(s.done() for s in sent) + stack.fake.active < burst:
                assert loop.time() < deadline, "the burst never reached a decision"
                await asyncio.sleep(0.01)
            stack.runner.call(gate.set)
            return list(await asyncio.gather(*sent))

    answers = asyncio.run(scenario())
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(served) + len(refused) == burst
    assert {r.json()["error"]["code"] for r in refused} == {"budget_exceeded"}
    costs = [cost(r) for r in served]
    # The request that crosses the line still finishes, so the day may end a little over
    # its 100 tokens, by at most one request: never by the burst's size.
    assert sum(costs) <= 100 + max(costs)
    # What was held for the burst is given back as it ends: the key spends the rest of its
    # day one request at a time, until its real count reaches the budget.
    http = stack.http
    headers = {"Authorization": f"Bearer {TEAM_KEY}"}
    total = sum(costs)
    for _ in range(100):
        r = http.post("/v1/completions", json=body, headers=headers)
        if r.status_code != 200:
            break
        total += cost(r)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    assert 100 <= total <= 100 + max(costs)


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_burst_on_shared_budgets_is_backpressure_and_every_charge_lands(
    mode: str,
) -> None:
    from .test_redis import RedisServer, require_redis_server

    require_redis_server()
    redis = RedisServer()
    redis.start()

    async def scenario() -> tuple[list[str], dict[str, int]]:
        budgets = RedisBudgets.from_url(redis.url, mode)
        spent = Principal("spent", budget=Budget(tokens_per_day=10))
        payer = Principal("payer", budget=Budget(tokens_per_day=10**9))
        await budgets.charge(spent, 10)

        async def check(p: Principal) -> str:
            try:
                await budgets.check(p)
            except BudgetExceeded:
                return "429"
            except RateLimiterUnavailable:
                return "503"
            return "200"

        outcomes = await asyncio.gather(*(check(spent) for _ in range(200)))
        await asyncio.gather(*(budgets.charge(payer, 3) for _ in range(200)))
        used = {s.period: s.used for s in await budgets.state(payer)}
        await budgets.close()
        return list(outcomes), used

    try:
        outcomes, used = asyncio.run(scenario())
    finally:
        redis.stop()
    # A spent budget refuses every request of a burst, in either failure mode: load is not
    # Redis being down ("open" would then admit the burst without its budget).
    assert outcomes == ["429"] * 200
    # Every charge of a burst is counted: none is dropped for want of a connection.
    assert used == {"day": 600}
