"""A hostile review of the wire: what clients send the proxy over HTTP/1.1 and what
llama.cpp's side sends back in its server-sent events, driven over raw sockets
(tests/evil_upstream.py) and kept-alive clients."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from .conftest import UNLIMITED_KEY, Stack, kept_alive
from .evil_upstream import EvilUpstream

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


# -- HTTP/1.0 clients ------------------------------------------------------------------------


def raw(body: bytes, *headers: bytes, key: str = UNLIMITED_KEY, length: bool = True) -> bytes:
    """A POST /v1/completions as raw bytes (headers added as given)."""
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nContent-Type: application/json\r\n"
    )
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def http10_request(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {UNLIMITED_KEY}\r\n"
        f"Content-Type: application/json\r\nConnection: keep-alive\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def read_answer(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes, bytes]:
    """(head, body, what came after it) of one answer: by Content-Length if it has one,
    else to the end of the connection."""
    data = buffered
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    if length is None:
        while piece := sock.recv(65536):  # raises TimeoutError if the end never comes
            rest += piece
        return head, rest, b""
    size = int(length.group(1))
    while len(rest) < size:
        piece = sock.recv(65536)
        assert piece, rest
        rest += piece
    return head, rest[:size], rest[size:]


def test_an_http10_keep_alive_client_gets_a_stream_that_ends(stack: Stack) -> None:
    """An HTTP/1.0 client that asks `Connection: keep-alive` keeps its connection for
    answers with a length; a stream has none (chunking is HTTP/1.1), so it ends where the
    connection does. Tornado kept that connection open and said `Connection: Keep-Alive`:
    the client waited for the end of its stream until --client-idle-timeout (75 s)."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        sock.sendall(http10_request("/v1/chat/completions", plain))
        head, body, rest = read_answer(sock, b"")
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: Keep-Alive" in head
        assert json.loads(body)["choices"][0]["message"]["content"]
        # The same connection, kept alive, carries a stream: it ends, with the connection.
        sock.sendall(http10_request("/v1/chat/completions", {**plain, "stream": True}))
        head, body, _ = read_answer(sock, rest)
        assert head.startswith(b"HTTP/1.1 200") and b"Keep-Alive" not in head
        assert b"Transfer-Encoding" not in head and body.endswith(b"data: [DONE]\n\n")


# -- a client that never reads its answer ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_never_reads_its_answer_is_closed(make_stack: Any, stream: bool) -> None:
    """A client that sends a request and never reads the answer held its connection, and
    the unsent answer in the proxy's memory, for good: Tornado has no write deadline, and
    the stream's own (the client took nothing while llama.cpp's output waited) ends with
    llama.cpp's answer. Now a client that takes nothing of what waits for it for
    --client-idle-timeout is closed, and the proxy serves the next client."""
    stack = make_stack(client_idle_timeout=0.5)
    stack.fake.script.tokens = ["x" * 10_000] * 1000  # 10 MB: more than the kernel buffers
    stack.fake.script.mode = "merge"  # all of it at once: llama.cpp is done at once
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes nothing
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", stack.port))
        body = {"model": "m", "prompt": "hi", "max_tokens": 1000, "stream": stream}
        sock.sendall(raw(json.dumps(body).encode()))
        assert stack.wait_for(lambda: stack.fake.requests != [], 5)
        assert stack.wait_for(lambda: stack.server.open_connections == 0, 10)
    finally:
        sock.close()
    stack.fake.script.tokens = ["ok"]
    with kept_alive(stack) as client:
        answer = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "ok"


def test_clients_that_reset_mid_stream_leave_no_error_and_the_proxy_serves_on(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """A client killed mid-stream resets its connection while the proxy writes to it: the
    write that meets the reset closes the stream; nothing after it may touch what the
    close released (the send deadline's check did, a TypeError per reset, once)."""
    caplog.set_level(logging.WARNING)
    stack.fake.script.tokens = [f"token {i} " for i in range(1000)]
    stack.fake.script.token_delay = 0.001
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
            body = {"model": "m", "prompt": "hi", "max_tokens": 1000, "stream": True}
            sock.sendall(raw(json.dumps(body).encode()))
            assert sock.recv(3000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert stack.wait_for(lambda: stack.ctx.in_flight == 0)
    stack.fake.script.tokens, stack.fake.script.token_delay = ["ok"], 0.0
    with kept_alive(stack) as client:
        answer = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "ok"
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [r.getMessage() for r in problems]


# -- HTTP/1.1 framing from clients -----------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_none_mixed(stack: Stack) -> None:
    """Requests pipelined on one connection (refused, streamed, chunked, malformed, plain)
    get their answers in the order sent, each whole, the connection kept."""
    texts = [json.dumps({"model": "m", "prompt": p}).encode() for p in ("a", "b", "c", "d")]
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(texts[2]), texts[2])
    streamed = json.dumps({"model": "m", "prompt": "b", "stream": True}).encode()
    requests = [
        raw(texts[0], key="sk-wrong-key-0000000000"),
        raw(streamed),
        raw(chunked, b"Transfer-Encoding: chunked", length=False),
        raw(b"{not json"),
        raw(texts[3]),
    ]
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        data = b""
        while data.count(b"HTTP/1.1 ") < 5 or not data.endswith(b"}"):
            piece = sock.recv(65536)
            assert piece, data
            data += piece
    statuses = re.findall(rb"HTTP/1.1 (\d{3}) ", data)
    assert statuses == [b"401", b"200", b"200", b"400", b"200"]
    assert data.count(b"data: [DONE]") == 1 and b"invalid_json" in data


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([b"Transfer-Encoding: chunked"], True),  # beside Content-Length: request smuggling
        ([b"Content-Length: 5"], True),  # a second, different length
        ([b"Content-Length: -1"], False),
        ([b"Content-Length: +45"], False),
        ([b"X-Folded: a", b" b"], True),  # obs-fold
        ([b"Transfer-Encoding: gzip, chunked"], False),
    ],
)
def test_ambiguous_request_framing_is_refused_and_the_connection_closed(
    stack: Stack, headers: list[bytes], length: bool
) -> None:
    """Framing two readers could read two ways is refused with a 400 and the connection
    closed (what follows could be the body or the next request), and nothing reaches
    llama.cpp; the next connection is served."""
    body = json.dumps({"model": "m", "prompt": "smuggled"}).encode()
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(raw(body, *headers, length=length) + raw(body))
        data = b""
        while piece := sock.recv(65536):
            data += piece
    assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1 ") == 1
    assert stack.fake.requests == []
    with kept_alive(stack) as client:
        assert client.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 200
