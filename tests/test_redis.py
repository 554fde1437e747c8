"""Limits shared through a real redis-server: exact across processes, failure modes."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from llamacpp_proxy.errors import ConcurrencyLimited, RateLimited, RateLimiterUnavailable
from llamacpp_proxy.guard.auth import Limits, Principal
from llamacpp_proxy.guard.ratelimit import Cost
from llamacpp_proxy.guard.ratelimit_redis import RedisLimiter

from .conftest import LIMITED_KEY, UNLIMITED_KEY
from .test_main import ProxyProcess, free_port

pytestmark = pytest.mark.redis


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="llp-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def require_redis_server() -> None:
    """Skip without redis-server, or fail where the Redis tests are required (scripts/test)."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("LLAMACPP_PROXY_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    require_redis_server()
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def principal(name: str, **limits: Any) -> Principal:
    return Principal(name, Limits(**limits))


async def admitted(limiter: RedisLimiter, p: Principal) -> bool:
    try:
        await limiter.admit(p)
    except RateLimited:
        return False
    return True


def test_three_limiters_together_admit_exactly_the_limit(redis_server: RedisServer) -> None:
    async def scenario() -> list[bool]:
        limiters = [RedisLimiter.from_url(redis_server.url) for _ in range(3)]
        p = principal("shared-a", requests=7, window=60)
        results = await asyncio.gather(*(admitted(limiters[i % 3], p) for i in range(60)))
        for limiter in limiters:
            await limiter.close()
        return list(results)

    assert sum(asyncio.run(scenario())) == 7


def test_window_slides_with_redis_time(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        limiter = RedisLimiter.from_url(redis_server.url)
        p = principal("shared-b", requests=2, window=0.4)
        assert await admitted(limiter, p) and await admitted(limiter, p)
        with pytest.raises(RateLimited) as caught:
            await limiter.admit(p)
        assert caught.value.headers["x-ratelimit-remaining-requests"] == "0"
        assert caught.value.headers["Retry-After"] == "1"
        deadline = time.monotonic() + 3
        while not await admitted(limiter, p):  # poll until the window frees a slot
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await limiter.close()

    asyncio.run(scenario())


def test_tokens_and_concurrency_through_redis(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        a, b = RedisLimiter.from_url(redis_server.url), RedisLimiter.from_url(redis_server.url)
        p = principal("shared-c", tokens_per_minute=100, max_concurrent=1)
        first = await a.admit(p)
        with pytest.raises(ConcurrencyLimited):
            await b.admit(p)  # the other process sees the slot taken
        await a.finish(first, 150)
        await a.finish(first, 150)  # released and charged once
        with pytest.raises(RateLimited) as caught:
            await b.admit(p)
        assert caught.value.code == "tokens_rate_limit_exceeded"
        assert caught.value.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 59 <= int(caught.value.headers["Retry-After"]) <= 61
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_failure_modes_and_recovery() -> None:
    require_redis_server()
    server = RedisServer()
    server.start()

    async def scenario() -> None:
        closed = RedisLimiter.from_url(server.url, "closed", timeout=0.3)
        opened = RedisLimiter.from_url(server.url, "open", timeout=0.3)
        p = principal("shared-d", requests=1, window=60)
        assert await admitted(closed, p)
        server.stop()
        with pytest.raises(RateLimiterUnavailable) as caught:
            await closed.admit(p)
        assert caught.value.status == 503
        assert (await opened.admit(p)).headers == {}  # open: admitted, unlimited
        server.start()  # same port, empty data: limits apply again
        deadline = time.monotonic() + 5
        while True:
            try:
                await closed.admit(p)
                break
            except RateLimiterUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        with pytest.raises(RateLimited):
            await closed.admit(p)
        await closed.close()
        await opened.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_three_proxy_processes_admit_exactly_one_quota(
    redis_server: RedisServer, runner: Any, fake: Any
) -> None:
    runner.call(fake.reset)
    args = [
        "--redis-url",
        redis_server.url,
        "--rate-limit-max-requests",
        "5",
        "--rate-limit-window",
        "60",
    ]
    env = {"UNLIMITED_API_KEY": UNLIMITED_KEY, "LIMITED_API_KEY": LIMITED_KEY}
    proxies = [ProxyProcess(fake.url, args, env=env) for _ in range(3)]
    try:

        def call(i: int) -> int:
            r = httpx.post(
                proxies[i % 3].url + "/v1/completions",
                json={"prompt": "x"},
                headers={"Authorization": f"Bearer {LIMITED_KEY}"},
                timeout=10,
            )
            return r.status_code

        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(call, range(30)))
        assert codes.count(200) == 5
        assert codes.count(429) == 25
        assert len(fake.requests) == 5
        # The unlimited key is not limited by any of them.
        for proxy in proxies:
            assert (
                httpx.post(
                    proxy.url + "/v1/completions",
                    json={"prompt": "x"},
                    timeout=10,
                    headers={"Authorization": f"Bearer {UNLIMITED_KEY}"},
                ).status_code
                == 200
            )
    finally:
        for proxy in proxies:
            proxy.stop()


# -- bursts, leases and settlement (Hardening I, item 3) ------------------------------------


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_burst_of_300_is_backpressure_not_a_redis_failure(
    redis_server: RedisServer, mode: str
) -> None:
    async def scenario() -> tuple[list[str], int, int]:
        limiter = RedisLimiter.from_url(redis_server.url, mode)
        burst = principal(f"burst-{mode}", requests=3, window=60)
        slots = principal(f"slots-{mode}", max_concurrent=5)
        other = principal(f"other-{mode}", requests=1000, window=60)

        async def one(p: Principal) -> str:
            try:
                admission = await limiter.admit(p)
            except RateLimiterUnavailable:
                return "503"
            except RateLimited:
                return "429"
            await limiter.finish(admission, 0)
            return "200"

        outcomes = await asyncio.gather(
            *(one(burst) for _ in range(300)),
            *(one(slots) for _ in range(300)),
            *(one(other) for _ in range(30)),
        )
        raw = limiter._redis
        held = await raw.zcard(f"llp:{{slots-{mode}}}:slots")
        await limiter.close()
        return list(outcomes), held, getattr(limiter, "live_leases", 0)

    outcomes, held, live = asyncio.run(scenario())
    burst, slots, other = outcomes[:300], outcomes[300:600], outcomes[600:]
    assert burst.count("200") == 3 and burst.count("429") == 297  # never admitted unlimited
    assert "503" not in slots and slots.count("200") >= 5
    assert other == ["200"] * 30  # other keys are not refused for a burst they did not send
    assert held == 0 and live == 0  # every finished request released its slots


def test_a_dead_process_frees_its_slots_within_the_lease(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        lease = 1.0
        a = RedisLimiter.from_url(redis_server.url, lease=lease)
        b = RedisLimiter.from_url(redis_server.url, lease=lease)
        p = principal("lease-a", max_concurrent=1)
        held = await a.admit(p)
        assert held.held_slots == 1
        # The heartbeat keeps a running request's slot across several leases.
        loop = asyncio.get_running_loop()
        until = loop.time() + 3 * lease
        while loop.time() < until:
            with pytest.raises(ConcurrencyLimited):
                await b.admit(p)
            await asyncio.sleep(0.2)
        # Process A dies (no release, no more heartbeats): its slot frees within a lease.
        assert a._heartbeat is not None
        a._heartbeat.cancel()
        died = loop.time()
        while not await admitted(b, p):
            assert loop.time() - died < 2 * lease
            await asyncio.sleep(0.05)
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_token_reservation_is_settled_through_redis(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        limiter = RedisLimiter.from_url(redis_server.url)
        p = principal("settle-a", tokens_per_minute=100)
        first = await limiter.admit(p, Cost(generations=2, tokens=80))
        assert first.headers["x-ratelimit-remaining-tokens"] == "20"
        with pytest.raises(RateLimited):
            await limiter.admit(p, Cost(tokens=30))  # 80 reserved: 30 more does not fit
        await limiter.finish(first, 25)  # llama.cpp used 25: the other 55 come back
        second = await limiter.admit(p, Cost(tokens=30))
        assert second.headers["x-ratelimit-remaining-tokens"] == str(100 - 25 - 30)
        with pytest.raises(RateLimited) as caught:
            await limiter.admit(p, Cost(tokens=101))
        assert "Request too large" in caught.value.message
        await limiter.close()

    asyncio.run(scenario())
