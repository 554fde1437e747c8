"""A hostile review of the wire: what clients send the proxy over HTTP/1.1 and what
llama.cpp's side sends back in its server-sent events, driven over raw sockets
(tests/evil_upstream.py) and kept-alive clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from .conftest import UNLIMITED_KEY, LoopThread, Stack
from .evil_upstream import EvilUpstream, Respond

FINAL = {
    "content": "",
    "stop": True,
    "stop_type": "eos",
    "tokens_predicted": 2,
    "tokens_evaluated": 1,
}
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def event(value: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


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


def kept_alive(stack: Stack) -> httpx.Client:
    return httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {UNLIMITED_KEY}"}, timeout=10
    )


def stream_texts(response: httpx.Response) -> tuple[list[str], list[str | None], list[str]]:
    """(texts, finish reasons, error codes) of a text-completion stream, in order; the
    last entry of texts is "[DONE]" when the stream ended with it."""
    texts: list[str] = []
    reasons: list[str | None] = []
    errors: list[str] = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[6:]
        if payload == "[DONE]":
            texts.append("[DONE]")
            continue
        data = json.loads(payload)
        if "error" in data:
            errors.append(data["error"]["code"])
            continue
        texts.append(data["choices"][0]["text"])
        reasons.append(data["choices"][0]["finish_reason"])
    return texts, reasons, errors


# -- llama.cpp's final event ends the stream -------------------------------------------------


AFTER_FINAL: dict[str, Callable[[asyncio.StreamWriter], Awaitable[None]]] = {}


def _after_final(name: str) -> Callable[[Any], Any]:
    def register(fn: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> Any:
        AFTER_FINAL[name] = fn
        return fn

    return register


@_after_final("more events, then the last chunk")
async def _more_events(w: asyncio.StreamWriter) -> None:
    w.write(chunk(event({"content": " AFTER THE END", "stop": False})) + b"0\r\n\r\n")


@_after_final("a close without the last chunk")
async def _no_last_chunk(w: asyncio.StreamWriter) -> None:
    pass  # respond returns False: the connection closes


@_after_final("pings, then a close")
async def _pings(w: asyncio.StreamWriter) -> None:
    # Pings are no progress: before, the client waited for --upstream-idle-timeout or this
    # close, whichever came first. They end as soon as the proxy hangs up.
    for _ in range(100):
        w.write(chunk(b": ping\n\n"))
        try:
            await w.drain()
        except ConnectionError:
            return
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("after", list(AFTER_FINAL))
def test_llamacpp_final_event_ends_the_stream_whatever_follows_it(
    evil_stack: Any, after: str
) -> None:
    """The stream's answer is whole once llama.cpp's `stop: true` event is in. Before, the
    proxy read on to the chunked framing's end: events after the final one reached the
    client after its finish_reason chunk, and an upstream that then closed without the
    terminating chunk, or went silent, turned the whole answer into an error event (after
    --upstream-idle-timeout, 60 s by default, of a client waiting for its [DONE])."""

    async def respond(
        evil: EvilUpstream, head: bytes, body: bytes, w: asyncio.StreamWriter
    ) -> bool:
        prompt = json.loads(body)["prompt"]
        w.write(STREAM_HEAD + chunk(event({"content": f"to {prompt}", "stop": False})))
        w.write(chunk(event(FINAL)))
        await w.drain()
        await AFTER_FINAL[after](w)
        return False

    evil, stack = evil_stack(respond)
    with kept_alive(stack) as client:
        for user in ["alice", "bob"]:
            body = {"model": "m", "prompt": user, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                texts, reasons, errors = stream_texts(r)
            assert (texts, reasons, errors) == ([f"to {user}", "", "[DONE]"], [None, "stop"], [])
    assert evil.posts == 2  # each sent once


# -- idle keep-alive connections at --max-connections ----------------------------------------


def test_idle_kept_alive_connections_make_room_for_new_clients_at_the_cap(
    make_stack: Any,
) -> None:
    """At --max-connections, connections that clients' pools keep open and idle after an
    answer held every place until --client-idle-timeout (75 s): a new client waited in the
    accept queue all that time. Now the one idle the longest is closed to make room (as
    nginx does), and the clients whose idle connection went reconnect on their next
    request, all served."""
    stack = make_stack(max_connections=3)
    body = {"model": "m", "prompt": "hi"}
    pools = [kept_alive(stack) for _ in range(5)]
    try:
        for _ in range(2):
            for pool in pools:  # 5 kept-alive clients on 3 places, round after round
                assert pool.post("/v1/completions", json=body).status_code == 200
        assert stack.runner.call(lambda: stack.server.open_connections) <= 3
    finally:
        for pool in pools:
            pool.close()
    assert stack.wait_for(lambda: stack.server.open_connections == 0)
