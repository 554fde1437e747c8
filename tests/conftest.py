"""Test fixtures: a fake llama.cpp and the proxy, both on free loopback ports.

They run on an event loop in a background thread, so tests drive the proxy exactly as a
user would: over HTTP, with the official (synchronous or async) `openai` client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jsonschema
import openai
import pytest
from tornado.netutil import bind_sockets

from llamacpp_proxy.config import Settings
from llamacpp_proxy.context import AppContext
from llamacpp_proxy.main import ProxyServer, build_context, make_server

from .evil_upstream import EvilUpstream, Respond
from .fake_llamacpp import FakeLlamaCpp

T = TypeVar("T")

UNLIMITED_KEY = "sk-test-unlimited-0123456789"
LIMITED_KEY = "sk-test-limited-0123456789"


# OpenAI's published schemas, carried by the repository (see openai_schemas/README.md).
SCHEMA_DIR = Path(__file__).parent / "openai_schemas"


def load_schema(name: str) -> dict[str, Any]:
    """One of OpenAI's published schemas (tests/openai_schemas)."""
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text())


_SCHEMAS: dict[str, dict[str, Any]] = {}


def assert_schema(obj: Any, name: str) -> None:
    """Fail unless obj validates against OpenAI's schema `name`."""
    schema = _SCHEMAS.get(name)
    if schema is None:
        schema = _SCHEMAS[name] = load_schema(name)
    jsonschema.validate(obj, schema)


class LoopThread:
    """An asyncio loop running in a daemon thread; run(coro) waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Stack:
    """A fake llama.cpp and a proxy in front of it."""

    def __init__(
        self,
        runner: LoopThread,
        fake: FakeLlamaCpp,
        ctx: AppContext,
        server: ProxyServer,
        port: int,
    ) -> None:
        self.runner = runner
        self.fake = fake
        self.ctx = ctx
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        """One kept-alive HTTP client for the whole test, as real clients behave: a fresh
        connection per call would hide connection bugs (an error that breaks keep-alive)."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.url, timeout=10)
        return self._http

    def client(self, key: str = UNLIMITED_KEY, **kwargs: Any) -> openai.OpenAI:
        """The official SDK pointed at the proxy."""
        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=key,
            max_retries=0,
            timeout=kwargs.pop("timeout", 20),
            **kwargs,
        )

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5) -> bool:
        """Poll `predicate` on the server loop until it holds (or the timeout passes)."""

        async def poll() -> bool:
            deadline = asyncio.get_running_loop().time() + timeout
            while not predicate():
                if asyncio.get_running_loop().time() > deadline:
                    return False
                await asyncio.sleep(0.01)
            return True

        return self.runner.run(poll(), timeout + 5)


def default_settings(**overrides: Any) -> Settings:
    base = Settings(
        host="127.0.0.1",
        port=0,
        unlimited_api_key=UNLIMITED_KEY,
        limited_api_key=LIMITED_KEY,
        rate_limit_max_requests=3,
        rate_limit_window=60.0,
        access_log=False,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def runner() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@pytest.fixture(scope="session")
def fake(runner: LoopThread) -> Iterator[FakeLlamaCpp]:
    async def start() -> FakeLlamaCpp:
        server = FakeLlamaCpp()
        server.start()
        return server

    server = runner.run(start())
    yield server
    runner.call(server.stop)


@pytest.fixture
def fakes(runner: LoopThread) -> Iterator[list[FakeLlamaCpp]]:
    """Four fresh fake llama.cpp servers, for gateways of several servers (tests use as
    many as they need)."""

    async def start() -> list[FakeLlamaCpp]:
        servers = [FakeLlamaCpp() for _ in range(4)]
        for server in servers:
            server.start()
        return servers

    servers = runner.run(start())
    yield servers
    for server in servers:
        runner.call(server.stop)


def start_stack(runner: LoopThread, fake: FakeLlamaCpp, **overrides: Any) -> Stack:
    """A proxy with Settings overrides in front of the fake, on a free loopback port."""
    overrides.setdefault("llamacpp_server", fake.url)
    settings = default_settings(**overrides)

    async def start() -> Stack:
        ctx = build_context(settings)
        ctx.routes.start()
        sockets = bind_sockets(0, "127.0.0.1")
        server = make_server(ctx)  # the production server: accept loop, connection cap
        server.serve(sockets)
        return Stack(runner, fake, ctx, server, server.ports[0])

    return runner.run(start())


def stop_stack(stack: Stack) -> None:
    """Stop the proxy and close its connections."""

    if stack._http is not None:
        stack._http.close()

    async def stop() -> None:
        stack.server.stop()
        await stack.server.close_all_connections()
        await stack.ctx.routes.close()

    stack.runner.run(stop())


FAKE_SETTLE_TIMEOUT = 15.0  # longer than any stall a test scripts into the fake


def wait_until_fake_is_idle(runner: LoopThread, fake: FakeLlamaCpp) -> None:
    """Wait until the fake answers nothing: a request a test abandoned (a stall the proxy
    hung up on, a stream it cancelled) must end before the next test, or it runs into that
    test's counters and shares its event loop. Fails if the work does not end."""

    async def settle() -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FAKE_SETTLE_TIMEOUT
        while fake.active or fake.health_active:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    if not runner.run(settle(), FAKE_SETTLE_TIMEOUT + 5):
        raise AssertionError(
            f"the fake llama.cpp is still answering {fake.active} completion and "
            f"{fake.health_active} health request(s) {FAKE_SETTLE_TIMEOUT:g}s after the test"
        )


@pytest.fixture
def make_stack(runner: LoopThread, fake: FakeLlamaCpp) -> Iterator[Callable[..., Stack]]:
    """Build a proxy with Settings overrides, in front of the (reset) fake llama.cpp.

    The fake is shared by the session, so each test starts only once the previous test's
    upstream work has ended, and waits for its own to end when it is done."""
    stacks: list[Stack] = []
    wait_until_fake_is_idle(runner, fake)
    runner.call(fake.reset)

    def factory(**overrides: Any) -> Stack:
        stack = start_stack(runner, fake, **overrides)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stop_stack(stack)
    wait_until_fake_is_idle(runner, fake)


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return stack.client()


def kept_alive(stack: Stack) -> httpx.Client:
    """One client for many requests, as real clients are."""
    return httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {UNLIMITED_KEY}"}, timeout=10
    )


@pytest.fixture
def evil_stack(
    runner: LoopThread, make_stack: Callable[..., Stack]
) -> Iterator[Callable[..., tuple[EvilUpstream, Stack]]]:
    """A proxy in front of an EvilUpstream answering with `respond`."""
    made: list[EvilUpstream] = []

    def build(respond: Respond, **overrides: Any) -> tuple[EvilUpstream, Stack]:
        evil = EvilUpstream(respond)
        runner.run(evil.start())
        made.append(evil)
        return evil, make_stack(llamacpp_server=evil.url, **overrides)

    yield build
    for evil in made:
        runner.run(evil.stop())


def forced_tool_call(parameters: dict[str, Any]) -> dict[str, Any]:
    """A chat body that forces a call of a tool with these `parameters`: the gateway turns
    them into llama.cpp's JSON schema (render/constraints.py)."""
    return {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
        "tool_choice": "required",
    }
