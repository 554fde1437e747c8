"""A streamed answer's chunks bypass Tornado's public write path once the head is out
(frontdoor/chunk_writer.py): the bytes on the wire are what the public path sends, in the
same order, through every front door and every way a stream ends; backpressure and a client
that leaves behave as before; and what the bypass relies on in Tornado is pinned here.

Each comparison runs the same request twice on ONE kept-alive raw connection, first with
the bypass switched off (the public path, as before this change), then on, and parses
every chunk strictly (size line, data, CRLF, one terminating `0\\r\\n\\r\\n`)."""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from tornado.http1connection import HTTP1Connection
from tornado.iostream import BaseIOStream, IOStream

from llamacpp_proxy import ids
from llamacpp_proxy.frontdoor import chunk_writer, completions

from .conftest import UNLIMITED_KEY, Stack
from .fake_llamacpp import DEFAULT_TOKENS
from .test_queue_keepalive import OneSlot, one_slot  # noqa: F401 (a fixture)

ANSWER = "".join(DEFAULT_TOKENS)
CHAT = "/v1/chat/completions"


def raw_request(path: str, body: dict[str, Any], version: str = "1.1") -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST %s HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), version.encode(), UNLIMITED_KEY.encode(), len(data), data)
    )


class Wire:
    """One kept-alive client connection, read strictly."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> None:
        data = self.sock.recv(1 << 20)
        assert data, "the proxy closed the connection"
        self.buffer += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            assert len(self.buffer) < 100, self.buffer
            self._more()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._more()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers

    def chunk(self) -> bytes:
        """The next chunk's data (b"" for the terminating chunk), by the exact grammar."""
        size_line = self._line()
        assert re.fullmatch(rb"[0-9a-f]+", size_line), size_line
        size = int(size_line, 16)
        data = self._exactly(size)
        assert self._exactly(2) == b"\r\n", "a chunk's data is not followed by CRLF"
        return data

    def chunks(self) -> list[bytes]:
        """Every chunk up to and including the end (the empty terminating one left out)."""
        out = []
        while data := self.chunk():
            out.append(data)
        return out

    def exchange(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """A request, its head and its whole de-chunked body."""
        self.sock.sendall(raw_request(path, body))
        status, headers = self.head()
        if headers.get("transfer-encoding") == "chunked":
            return status, headers, b"".join(self.chunks())
        return status, headers, self._exactly(int(headers["content-length"]))


def normalized(body: bytes) -> bytes:
    """Ids and clocks differ between two answers; everything else must not."""
    body = re.sub(re.escape(ids._PREFIX.encode()) + rb"[0-9a-f]{8}", b"ID", body)
    return re.sub(rb'"(created|created_at|completed_at)":\s*\d+', rb'"\1":0', body)


def events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-80:]
    return body[:-2].split(b"\n\n")


def by_choice(body: bytes) -> tuple[dict[int, list[bytes]], list[bytes]]:
    """n > 1 choices interleave as their reads come: each choice's own events in order, and
    the events of no choice (usage, [DONE], errors) in order."""
    choices: dict[int, list[bytes]] = {}
    rest = []
    for event in events(normalized(body)):
        found = re.search(rb'"index":(\d+)', event)
        if found is None or b'"choices":[]' in event:
            rest.append(event)
        else:
            choices.setdefault(int(found.group(1)), []).append(event)
    return choices, rest


HEAD_VARIES = {"x-request-id", "date"}


def comparable_head(status: int, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    return status, {k: v for k, v in headers.items() if k not in HEAD_VARIES}


class Recorder:
    """Counts the responses whose chunks took the bypass (and can switch it off)."""

    def __init__(self) -> None:
        self.enabled = True
        self.direct = 0
        self.handlers: list[Any] = []

    def __call__(self, handler: Any) -> Any:
        if not self.enabled:
            return None
        found = chunk_writer.direct_stream(handler)
        if found is not None:
            _, sock = found
            assert sock is not None, "a plain connection's frames are not sent directly"
            self.direct += 1
            self.handlers.append(handler)
        return found


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(completions, "direct_stream", rec)
    return rec


@pytest.fixture
def wire(stack: Stack) -> Iterator[Wire]:
    w = Wire(stack.port)
    yield w
    w.close()


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": (CHAT, {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    "chat n=2 + include_usage": (
        CHAT,
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "n": 2,
            "stream_options": {"include_usage": True},
        },
    ),
    "completions n=2 + logprobs": (
        "/v1/completions",
        {"prompt": "hi", "stream": True, "logprobs": 2, "n": 2},
    ),
    "messages": (
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        },
    ),
    "responses": ("/v1/responses", {"input": "hi", "stream": True}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("ending", ["normal", "error event"])
def test_the_bytes_on_the_wire_are_those_of_the_public_path(
    stack: Stack, wire: Wire, recorder: Recorder, case: str, ending: str
) -> None:
    path, body = CASES[case]
    if ending == "error event":
        stack.fake.script.stream_error_after_tokens = 4
    recorder.enabled = False
    before = wire.exchange(path, body)
    assert recorder.direct == 0
    recorder.enabled = True
    after = wire.exchange(path, body)  # the same kept-alive connection
    assert recorder.direct == 1, "the chunks did not take the bypass"
    assert comparable_head(before[0], before[1]) == comparable_head(after[0], after[1])
    assert before[1]["transfer-encoding"] == "chunked"
    if ending == "error event" and "n" in body:
        # The error aborts the other choice wherever it happened to be: each choice's
        # events are the same as far as both runs got.
        (old_choices, old_rest), (new_choices, new_rest) = by_choice(before[2]), by_choice(after[2])
        assert old_rest == new_rest
        for index in old_choices.keys() & new_choices.keys():
            old_events, new_events = old_choices[index], new_choices[index]
            common = min(len(old_events), len(new_events))
            assert old_events[:common] == new_events[:common]
    else:
        assert by_choice(before[2]) == by_choice(after[2])
    if "n" not in body:  # n > 1: the choices interleave as their reads happen to come
        assert normalized(before[2]) == normalized(after[2])
    if ending == "error event":
        assert b"fake stream error" in after[2].rsplit(b"\n\n", 2)[-2]
    else:
        assert b"fake stream error" not in after[2]
    # The connection still serves: a plain answer on it, after the stream.
    status, _, plain = wire.exchange(CHAT, {"messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and json.loads(plain)["choices"][0]["message"]["content"] == ANSWER


def test_a_stream_takes_one_send_per_read_not_tornados_write_path(
    stack: Stack, wire: Wire, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: HTTP1Connection.write (a future, IOStream.write's future, their callbacks)
    # once per upstream read. Now: only finish()'s empty flush goes that way.
    writes = 0
    original = HTTP1Connection.write

    def counting(self: HTTP1Connection, chunk: bytes) -> Any:
        nonlocal writes
        if self.stream.socket.getsockname()[1] == stack.port:  # the proxy's, not the fake's
            writes += 1
        return original(self, chunk)

    monkeypatch.setattr(HTTP1Connection, "write", counting)
    queued = 0  # bytes handed to the IOStream's queue instead of sent at once
    original_queue = BaseIOStream.write

    def counting_queue(self: BaseIOStream, data: Any) -> Any:
        nonlocal queued
        if isinstance(self, IOStream) and self.socket.getsockname()[1] == stack.port:
            queued += 1
        return original_queue(self, data)

    monkeypatch.setattr(BaseIOStream, "write", counting_queue)
    stack.fake.script.tokens = [f" t{i}" for i in range(30)]
    stack.fake.script.token_delay = 0.001  # one event per read, as from a GPU
    _, _, body = wire.exchange(CHAT, CASES["chat"][1])
    assert body.count(b'"content":" t') == 30
    assert writes <= 1, f"{writes} HTTP1Connection.write calls for one streamed answer"
    # The head, finish()'s empty flush and its terminating chunk: nothing per event.
    assert queued <= 3, f"{queued} IOStream.write calls for one streamed answer"


def test_tornado_names_the_bypass_relies_on_are_there(
    stack: Stack, wire: Wire, recorder: Recorder
) -> None:
    # If a Tornado upgrade renames any of these, the bypass quietly falls back to the public
    # path (direct_stream answers None): this test is what says so, loudly.
    wire.exchange(*CASES["chat"])
    assert recorder.direct == 1, "a plain HTTP/1.1 stream no longer takes the bypass"
    handler = recorder.handlers[0]
    objects = {
        "tornado.web.RequestHandler": handler,
        "tornado.http1connection.HTTP1Connection": handler.request.connection,
        "tornado.iostream.IOStream": handler.request.connection.stream,
    }
    for owner, names in chunk_writer.TORNADO_NAMES.items():
        for name in names:
            assert hasattr(objects[owner], name), f"{owner}.{name} is gone"
    assert type(handler._write_buffer) is list
    assert handler._transforms == []


@pytest.mark.parametrize(
    "missing",
    ["_headers_written", "_finished", "_write_buffer", "_chunking_output", "stream"],
)
def test_without_a_pinned_name_the_public_path_serves(missing: str) -> None:
    stream = SimpleNamespace(closed=lambda: False)
    connection = SimpleNamespace(_chunking_output=True, stream=stream)
    handler = SimpleNamespace(
        _headers_written=True,
        _finished=False,
        _transforms=[],
        _write_buffer=[],
        request=SimpleNamespace(method="POST", connection=connection),
    )
    target = connection if missing in ("_chunking_output", "stream") else handler
    delattr(target, missing)
    assert chunk_writer.direct_stream(handler) is None


def test_an_http10_client_gets_the_stream_unchunked(stack: Stack, recorder: Recorder) -> None:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(raw_request(CHAT, CASES["chat"][1], version="1.0"))
        data = b""
        while piece := sock.recv(1 << 16):
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b'"content":') >= len(DEFAULT_TOKENS)
    assert recorder.direct == 0


def test_a_slow_client_holds_back_both_choices_and_gets_every_byte_in_order(
    make_stack: Callable[..., Stack], recorder: Recorder
) -> None:
    # Frames larger than the socket takes: partial sends, the rest queued in the IOStream,
    # the upstream paused while it waits (n=2: both choices), then every byte in order.
    tokens = 4000  # 2 x 32 MB: far more than the socket buffers on the way hold
    stack = make_stack(max_tokens_limit=tokens, upstream_idle_timeout=5.0)
    stack.fake.script.tokens = [f"<{i:05d}" + "x" * 8000 + ">" for i in range(tokens)]
    body = {"prompt": "x", "stream": True, "n": 2, "max_tokens": tokens}
    wire = Wire(stack.port, rcvbuf=16384)
    try:
        wire.sock.sendall(raw_request("/v1/completions", body))
        last = -1
        while stack.fake.events_sent != last:  # until the buffers on the way are full
            last = stack.fake.events_sent
            stack.wait_for(lambda seen=last: stack.fake.events_sent > seen, timeout=0.5)
        assert stack.fake.events_sent < tokens, "not held back"
        status, _ = wire.head()
        assert status == 200
        choices, rest = by_choice(b"".join(wire.chunks()))
        assert recorder.direct == 1
        for index in (0, 1):
            texts = [json.loads(e[6:])["choices"][0]["text"] for e in choices[index]]
            assert texts[:-1] == [f"<{i:05d}" + "x" * 8000 + ">" for i in range(tokens)]
        assert rest == [b"data: [DONE]"]
        # The kept-alive connection serves the next request.
        status, _, plain = wire.exchange("/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 200 and json.loads(plain)["choices"][0]["text"]
    finally:
        wire.close()


def test_a_client_that_leaves_mid_stream_cancels_llama_cpp_and_nothing_escapes(
    stack: Stack, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    stack.fake.script.tokens = ["x" * 100] * 4000
    stack.fake.script.token_delay = 0.001
    caplog.set_level(logging.WARNING)
    wire = Wire(stack.port)
    wire.sock.sendall(raw_request(CHAT, CASES["chat"][1] | {"max_tokens": 4000}))
    wire.head()
    for _ in range(5):
        assert wire.chunk()
    assert recorder.direct == 1
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wire.close()  # a reset, as a client killed mid-stream
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1, timeout=5)
    assert stack.fake.events_sent < 4000, stack.fake.events_sent
    assert stack.wait_for(lambda: stack.ctx.in_flight == 0)
    stack.fake.script.tokens, stack.fake.script.token_delay = list(DEFAULT_TOKENS), 0.0
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        r = http.post(
            CHAT, json=CASES["chat"][1], headers={"Authorization": f"Bearer {UNLIMITED_KEY}"}
        )
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [r.getMessage() for r in problems]


def test_queued_comments_then_the_stream_in_order(
    one_slot: Callable[..., OneSlot],  # noqa: F811
    recorder: Recorder,
) -> None:
    gateway = one_slot()
    holder = gateway.hold_the_slot()
    wire = Wire(gateway.stack.port)
    try:
        wire.sock.sendall(raw_request(CHAT, CASES["chat"][1]))
        assert gateway.queued()
        status, headers = wire.head()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert wire.chunk() == b": queued\n\n"  # the head's flush, by Tornado's path
        assert wire.chunk() == b": queued\n\n"  # the next, by the bypass
        assert recorder.direct == 1
        gateway.release()
        rest = b"".join(wire.chunks())
        comments, _, answer = rest.rpartition(b": queued\n\n")
        assert comments.replace(b": queued\n\n", b"") == b""
        texts = [
            json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events(answer)[:-1]
        ]
        assert "".join(t or "" for t in texts) == ANSWER
        assert answer.endswith(b"data: [DONE]\n\n")
        assert holder.result(timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        status, _, plain = wire.exchange(CHAT, {"messages": [{"role": "user", "content": "x"}]})
        assert status == 200 and json.loads(plain)["choices"][0]["message"]["content"] == ANSWER
        assert time.monotonic() < deadline
    finally:
        wire.close()
