"""The keep-alive HTTP/1.1 client to llama.cpp: framing, reuse, limits, stale connections.

The negative corpus follows h11's tests/test_io.py: every way a status line, a header, a
length or a chunk can be malformed is refused (ProtocolError, which the proxy answers with
a 502), never guessed at. The `evil` tests drive the proxy against a raw-socket upstream
that sends what Tornado's fake cannot (tests/evil_upstream.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from llamacpp_proxy.config import ConfigError, load_settings
from llamacpp_proxy.errors import ProxyError
from llamacpp_proxy.main import build_context
from llamacpp_proxy.upstream.http import (
    MAX_HEADERS,
    MAX_INTERIM,
    BodyDecoder,
    Connection,
    ConnectionPool,
    ProtocolError,
    ResponseHead,
    parse_head,
)
from llamacpp_proxy.upstream.llamacpp import LlamaCppClient

from .conftest import UNLIMITED_KEY, Stack, default_settings, kept_alive
from .evil_upstream import EvilUpstream, completion
from .test_api import CHAT, FULL_TEXT, post, sse_events

CHUNKED = b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: 1\r\n\r\n"


def head(**headers: str) -> ResponseHead:
    return ResponseHead(200, {k.replace("_", "-"): v for k, v in headers.items()}, True)


def test_parse_head() -> None:
    h = parse_head(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n"
        b"Set-Cookie: a\r\nSet-Cookie: b\r\nConnection: close"
    )
    assert h.status == 503 and h.headers["content-length"] == "5"
    assert h.headers["set-cookie"] == "a, b" and not h.keep_alive
    assert not parse_head(b"HTTP/1.0 200 OK").keep_alive
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive").keep_alive
    for bad in (b"SSH-2.0-OpenSSH", b"HTTP/1.1 abc", b"HTTP/1.1 200 OK\r\nno colon"):
        with pytest.raises(ProtocolError):
            parse_head(bad)


def test_chunked_body_split_at_every_byte() -> None:
    for cut in range(len(CHUNKED) + 1):
        decoder = BodyDecoder(head(transfer_encoding="chunked"), "POST")
        body = decoder.feed(CHUNKED[:cut]) + decoder.feed(CHUNKED[cut:])
        assert body == b"hello world!" and decoder.done, cut
    decoder = BodyDecoder(head(transfer_encoding="chunked"), "POST")
    assert (
        b"".join(decoder.feed(CHUNKED[i : i + 1]) for i in range(len(CHUNKED))) == b"hello world!"
    )
    assert decoder.done


BAD_CHUNKS = [
    b"zz\r\n",
    b"3\r\nabcX\r\n",  # data not followed by CRLF
    b"0x5\r\nhello\r\n0\r\n\r\n",  # int(_, 16) takes a 0x prefix: HTTP does not
    b"+5\r\nhello\r\n0\r\n\r\n",  # ... nor a sign
    b"-2\r\n",
    b"0_5\r\nhello\r\n0\r\n\r\n",  # ... nor digit-group underscores
    b" 5\r\nhello\r\n0\r\n\r\n",  # ... nor leading whitespace
    b"5 5\r\nhello\r\n",
    b"\r\n",  # no size at all
    b"1" * 16 + b"\r\n",  # beyond any body we would read
    b"\xd9\xa5\r\n",  # a non-ASCII digit
    b"5;" + b"x" * 2000,  # a chunk-size line without end
    b"0\r\nnot a trailer\r\n\r\n",
    b"0\r\n" + b"T: x\r\n" * 40 + b"\r\n",  # trailers without end
]


@pytest.mark.parametrize("raw", BAD_CHUNKS)
def test_broken_chunking_is_a_protocol_error(raw: bytes) -> None:
    decoder = BodyDecoder(head(transfer_encoding="chunked"), "POST")
    with pytest.raises(ProtocolError):
        decoder.feed(raw)


def test_bytes_after_a_complete_body_are_kept_apart_never_taken_as_body() -> None:
    chunked = BodyDecoder(head(transfer_encoding="chunked"), "POST")
    assert chunked.feed(b"1\r\na\r\n0\r\n\r\nHTTP/1.1 200 OK") == b"a"
    assert chunked.done and chunked.extra == b"HTTP/1.1 200 OK"
    length = BodyDecoder(head(content_length="2"), "POST")
    assert length.feed(b"abHTTP") == b"ab" and length.done and length.extra == b"HTTP"


def test_content_length_and_until_eof_bodies() -> None:
    decoder = BodyDecoder(head(content_length="5"), "POST")
    assert decoder.feed(b"he") == b"he" and not decoder.done
    assert decoder.feed(b"llo") == b"llo" and decoder.done
    assert BodyDecoder(head(content_length="0"), "POST").done
    assert BodyDecoder(head(content_length="7, 7"), "POST").declared_length == 7
    eof = BodyDecoder(head(), "POST")
    assert eof.until_eof and eof.feed(b"abc") == b"abc" and not eof.done


BAD_FRAMING = [
    {"content_length": "1_0"},  # int() reads these: HTTP does not
    {"content_length": "+10"},
    {"content_length": "-1"},
    {"content_length": "0x10"},
    {"content_length": " 1 0"},
    {"content_length": ""},
    {"content_length": "\u0661\u0660"},  # Arabic-Indic digits, also int()-able
    {"content_length": "10, 11"},  # conflicting repeated lengths
    {"content_length": "9" * 19},
    {"transfer_encoding": "gzip"},
    {"transfer_encoding": "chunked, gzip"},
    {"transfer_encoding": "chunked", "content_length": "5"},  # the smuggling ambiguity
]


@pytest.mark.parametrize("headers", BAD_FRAMING, ids=repr)
def test_malformed_or_conflicting_framing_is_a_protocol_error(headers: dict[str, str]) -> None:
    with pytest.raises(ProtocolError):
        BodyDecoder(head(**headers), "POST")


BAD_HEADS = [
    b"SSH-2.0-OpenSSH",
    b"HTTP/1.1 abc",
    b"HTTP/1.1 \xb2\xb2\xb2 OK",  # latin-1 superscript digits pass str.isdigit, not int()
    "HTTP/1.1 \u00b2\u00b2\u00b2 OK".encode(),
    "HTTP/1.1 \u0662\u0660\u0660 OK".encode(),
    b"HTTP/1.1 99 Low",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 200OK",
    b"HTTP/1.1 +20 OK",
    b"HTTP/1.1  200 OK",
    b" HTTP/1.1 200 OK",
    b"HTTP/2 200 OK",
    b"HTTP/1.2 200 OK",
    b"http/1.1 200 OK",
    b"HTTP/1.1 200 OK\x00",
    b"HTTP/1.1 200 OK\r\nno colon",
    b"HTTP/1.1 200 OK\r\nName : space before the colon",
    b"HTTP/1.1 200 OK\r\n folded: x",
    b"HTTP/1.1 200 OK\r\nA: b\r\n obs-fold continuation",
    b"HTTP/1.1 200 OK\r\nA: b\x00c",
    b"HTTP/1.1 200 OK\r\nA: b\nSmuggled: c",
    b"HTTP/1.1 200 OK\r\n: no name",
    b"HTTP/1.1 200 OK\r\nA\x7fB: c",
    b"HTTP/1.1 200 OK\r\n\r\nA: b",
    b"HTTP/1.1 200 OK" + b"\r\nA: b" * (MAX_HEADERS + 1),
]


@pytest.mark.parametrize("raw", BAD_HEADS)
def test_malformed_heads_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_head(raw)


def test_well_formed_heads_in_their_variants() -> None:
    h = parse_head(b"HTTP/1.1 200\r\nA:b\r\nB: \t two  words \t\r\nC:\r\nD: \xe9")
    assert h.status == 200 and h.keep_alive
    assert h.headers == {"a": "b", "b": "two  words", "c": "", "d": "\xe9"}


def read_heads(raw: bytes) -> ResponseHead:
    async def scenario() -> ResponseHead:
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        peer.sendall(raw)
        peer.close()
        conn = Connection(asyncio.get_running_loop(), ours)
        try:
            return await conn.read_head()
        finally:
            conn.close()

    return asyncio.run(scenario())


def test_every_interim_1xx_is_skipped_up_to_a_cap() -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert read_heads(b"HTTP/1.1 100 Continue\r\n\r\n" + hints + final).status == 200
    assert read_heads(hints * MAX_INTERIM + final).status == 200
    with pytest.raises(ProtocolError, match="interim"):
        read_heads(hints * (MAX_INTERIM + 1) + final)
    with pytest.raises(ProtocolError, match="101"):
        read_heads(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n" + final)


def test_connections_are_reused(make_stack: Any) -> None:
    stack = make_stack(upstream_spare_connections=0)  # counted below: none opened ahead
    pool = stack.ctx.upstream._pool
    for _ in range(10):
        r = post(stack, "/v1/chat/completions", {"messages": CHAT})
        assert r.status_code == 200
    assert pool.open_connections == 1  # one kept-alive connection served all 10
    for _ in range(3):
        r = post(stack, "/v1/chat/completions", {"messages": CHAT, "stream": True})
        assert r.status_code == 200
        # llama-server closes a stream's connection after it: the proxy never reuses one.
        assert pool.open_connections == 0


def test_streams_after_the_first_find_a_connection_opened_ahead(stack: Stack) -> None:
    """--upstream-spare-connections (1 by default): after a request takes a connection the
    pool opens a spare, so the next stream does not connect on its way to the first token.
    Counted by who connected: a request's task, or the pool's spare task."""
    pool = stack.ctx.upstream._pool
    connects: list[str] = []
    real = pool._connect

    async def counted() -> Any:
        task = asyncio.current_task()
        assert task is not None
        connects.append(task.get_coro().__qualname__)  # type: ignore[union-attr]
        return await real()

    pool._connect = counted  # type: ignore[method-assign]
    for _ in range(4):
        r = post(stack, "/v1/chat/completions", {"messages": CHAT, "stream": True})
        assert r.status_code == 200
        assert (
            "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(r)[:-1])
            == FULL_TEXT
        )
        # The stream's connection closed; the spare opens SPARE_DELAY after the stream took
        # its own (the fake's streams end sooner than a model's).
        deadline = time.monotonic() + 5
        while pool.open_connections != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert pool.open_connections == 1
    on_the_way = [name for name in connects if name != "ConnectionPool._spare"]
    assert len(on_the_way) == 1  # the first stream's
    assert connects.count("ConnectionPool._spare") == 4


def test_concurrency_is_bounded_by_upstream_max_connections(make_stack: Any) -> None:
    stack = make_stack(upstream_max_connections=2)
    stack.fake.script.token_delay = 0.01

    def one(_: int) -> str:
        events = sse_events(post(stack, "/v1/chat/completions", {"messages": CHAT, "stream": True}))
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])

    with ThreadPoolExecutor(8) as workers:
        texts = list(workers.map(one, range(8)))
    assert texts == [FULL_TEXT] * 8  # the ones that waited for a connection still answer
    # Measured where it matters: completions llama.cpp was answering at the same moment.
    assert stack.fake.peak_active == 2
    assert stack.ctx.upstream._pool.open_connections <= 2


def test_a_connection_the_server_closed_is_replaced_transparently(stack: Stack) -> None:
    assert post(stack, "/v1/completions", {"prompt": "x"}).status_code == 200

    async def drop_server_side() -> None:
        await stack.fake._server.close_all_connections()  # type: ignore[union-attr]

    stack.runner.run(drop_server_side())
    for _ in range(3):
        assert post(stack, "/v1/completions", {"prompt": "x"}).status_code == 200


def test_connection_close_from_upstream_is_respected(make_stack: Any) -> None:
    # No spare: it would stay open (idle, until swept) and hide the one counted here.
    stack = make_stack(upstream_spare_connections=0)
    stack.fake.script.fail_status = 200
    stack.fake.script.fail_body = '{"content": "ok", "stop": true, "stop_type": "eos"}'
    stack.fake.close_connections = True
    r = post(stack, "/v1/completions", {"prompt": "x"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    assert stack.wait_for(lambda: stack.ctx.upstream._pool.open_connections == 0)


def test_abort_does_not_return_the_connection_to_the_pool(make_stack: Any) -> None:
    # No spare: it would keep open_connections at 1 until swept (2.5-3.75 s, near the
    # wait's deadline), and the sweep would also close a wrongly pooled aborted connection.
    stack = make_stack(upstream_spare_connections=0)
    stack.fake.script.token_delay = 0.05
    stack.fake.script.tokens = [f" t{i}" for i in range(100)]
    with stack.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": CHAT, "stream": True},
        headers={"Authorization": f"Bearer {UNLIMITED_KEY}"},
    ) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1)
    assert stack.wait_for(lambda: stack.ctx.upstream._pool.open_connections == 0)
    stack.fake.reset()
    assert post(stack, "/v1/completions", {"prompt": "x"}).status_code == 200


def test_pool_close_is_safe_with_nothing_open() -> None:
    pool = ConnectionPool("http://127.0.0.1:9", 4, 1.0)
    pool.close()  # outside any event loop: nothing to close, nothing scheduled
    pool.close()
    assert pool.open_connections == 0 and not pool.waiting

    async def in_a_loop() -> None:
        pool.close()
        with pytest.raises(OSError):  # still usable: a request would try to connect
            await pool.acquire()
        assert pool.open_connections == 0 and not pool.waiting

    asyncio.run(in_a_loop())


def test_idle_connections_the_server_closed_do_not_linger(stack: Stack) -> None:
    from concurrent.futures import ThreadPoolExecutor as Pool

    pool = stack.ctx.upstream._pool
    stack.fake.script.stall_before = 0.05
    with Pool(6) as workers:  # a burst opens several connections
        list(workers.map(lambda _: post(stack, "/v1/completions", {"prompt": "x"}), range(6)))
    assert pool.open_connections > 1

    async def drop_server_side() -> None:
        await stack.fake._server.close_all_connections()  # type: ignore[union-attr]

    stack.runner.run(drop_server_side())
    # No request comes: the sweep alone closes our side of every dropped connection.
    assert stack.wait_for(lambda: pool.open_connections == 0, timeout=10)


def test_an_idle_connection_the_server_closed_is_replaced_before_use() -> None:
    async def scenario() -> None:
        accepted: list[asyncio.StreamWriter] = []
        arrived = asyncio.Event()

        def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)
            arrived.set()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool(f"http://127.0.0.1:{port}", 1, 1.0)
        conn = await pool.acquire()
        pool.release(conn, True)
        assert await pool.acquire() is conn  # quiet: reused
        pool.release(conn, True)
        # Our connect completes before the server's accept callback runs (it takes asyncio
        # a loop turn more): wait for it.
        await asyncio.wait_for(arrived.wait(), 2)
        accepted[0].close()  # the server drops it while it is idle
        await accepted[0].wait_closed()
        fresh = await asyncio.wait_for(pool.acquire(), 2)
        assert fresh is not conn and conn.closed and pool.open_connections == 1
        pool.release(fresh, False)
        pool.close()
        server.close()

    asyncio.run(scenario())


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        pool = ConnectionPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", 1, 1.0)
        conn = await pool.acquire()
        first = asyncio.ensure_future(pool.acquire())
        second = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)  # both are queued
        assert pool.waiting and not first.done()
        pool.release(conn, True)  # wakes `first`...
        first.cancel()  # ...which is cancelled before it runs: its turn must go to `second`
        got = await asyncio.wait_for(second, 2)
        assert got is conn and first.cancelled()
        pool.release(got, False)
        assert pool.open_connections == 0 and not pool.waiting
        server.close()

    asyncio.run(scenario())


def test_reads_of_event_loops_in_two_threads_never_mix() -> None:
    # Upstream reads land in one scratch buffer per thread (upstream/http.py, _Scratch;
    # every Connection reads into it): two loops reading at once get their own bytes.
    size = 2 * 1024 * 1024

    def pattern(fill: int) -> bytes:
        return bytes((fill + i) % 251 for i in range(4096))

    async def scenario(fill: int) -> bytes:
        piece = pattern(fill)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n")  # a body that ends with the connection
            for _ in range(size // len(piece)):
                writer.write(piece)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        pool = ConnectionPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", 1, 5)
        conn = await pool.acquire()
        conn.send(b"GET / HTTP/1.1\r\n\r\n")
        head = await asyncio.wait_for(conn.read_head(), 10)
        body, complete = await asyncio.wait_for(
            conn.read_body(BodyDecoder(head, "GET"), 2 * size), 10
        )
        assert complete
        pool.release(conn, False)
        server.close()
        return body

    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(lambda fill: asyncio.run(scenario(fill)), [0, 100]))
    assert results == [pattern(fill) * (size // 4096) for fill in (0, 100)]


# -- against a misbehaving upstream ------------------------------------------------------


def ask(client: httpx.Client, prompt: str) -> httpx.Response:
    # A model name spares the proxy a /props call: every upstream request is a completion.
    return client.post("/v1/completions", json={"model": "m", "prompt": prompt})


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_a_stray_second_response_never_reaches_the_next_user(evil_stack: Any) -> None:
    async def respond(
        evil: EvilUpstream, head: bytes, body: bytes, w: asyncio.StreamWriter
    ) -> bool:
        prompt = json.loads(body)["prompt"]
        w.write(completion(f"answer to {prompt}"))
        await w.drain()
        await asyncio.sleep(0.1)  # the scenario: a second answer in a later TCP segment
        w.write(completion(f"stray answer to {prompt}"))
        await w.drain()
        evil.strays += 1
        return True

    evil, stack = evil_stack(respond)
    with kept_alive(stack) as client:
        for n, user in enumerate(["alice", "bob", "carol"]):
            assert text_of(ask(client, user)) == f"answer to {user}"
            assert stack.wait_for(lambda n=n: evil.strays == n + 1)
    assert evil.connections == 3  # each connection that carried a stray was closed


def test_a_connection_that_carried_a_stream_is_never_reused(evil_stack: Any) -> None:
    """llama-server (b11434) closes the connection after every streamed answer, without
    saying Connection: close, a moment after the last chunk. A request sent on it in that
    moment was lost (502 "closed before the response was complete": about one stream in
    twenty on a busy machine). A stream's connection now goes, and the next one is new."""

    async def respond(
        evil: EvilUpstream, head: bytes, body: bytes, w: asyncio.StreamWriter
    ) -> bool:
        prompt = json.loads(body)["prompt"]
        events = [
            {"content": f"answer to {prompt}", "stop": False},
            {
                "content": "",
                "stop": True,
                "stop_type": "eos",
                "tokens_predicted": 1,
                "tokens_evaluated": 1,
            },
        ]
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
        )
        await w.drain()
        await asyncio.sleep(0.3)  # then close, as llama-server does, without a word
        return False

    evil, stack = evil_stack(respond)
    with kept_alive(stack) as client:
        for user in ["alice", "bob", "carol"]:
            r = client.post("/v1/completions", json={"model": "m", "prompt": user, "stream": True})
            assert r.status_code == 200
            assert f"answer to {user}" in r.text and "data: [DONE]" in r.text, r.text
    assert evil.connections == 3


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
)
def test_interim_1xx_responses_are_skipped(evil_stack: Any, interim: bytes) -> None:
    async def respond(
        evil: EvilUpstream, head: bytes, body: bytes, w: asyncio.StreamWriter
    ) -> bool:
        w.write(interim + completion("answer to " + json.loads(body)["prompt"]))
        return True

    evil, stack = evil_stack(respond)
    with kept_alive(stack) as client:
        for user in ["alice", "bob", "carol"]:  # the kept-alive connection stays in step
            assert text_of(ask(client, user)) == f"answer to {user}"
    assert evil.connections == 1


MALFORMED_RESPONSES = [
    b"HTTP/1.1 \xb2\xb2\xb2 OK\r\nContent-Length: 2\r\n\r\n{}",  # a 500 with a traceback before
    b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0_2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\n\r\n" * (MAX_INTERIM + 1),
]


@pytest.mark.parametrize("raw", MALFORMED_RESPONSES)
def test_a_malformed_response_is_a_502_and_the_proxy_keeps_serving(
    evil_stack: Any, raw: bytes
) -> None:
    async def respond(
        evil: EvilUpstream, head: bytes, body: bytes, w: asyncio.StreamWriter
    ) -> bool:
        prompt = json.loads(body)["prompt"]
        w.write(raw if prompt == "bad" else completion("fine"))
        await w.drain()
        return prompt != "bad"

    _evil, stack = evil_stack(respond)
    with kept_alive(stack) as client:
        r = ask(client, "bad")
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "upstream_error" and "malformed HTTP response" in error["message"]
        assert text_of(ask(client, "good")) == "fine"


def test_a_post_that_reached_llamacpp_is_never_sent_again(evil_stack: Any) -> None:
    async def respond(
        evil: EvilUpstream, head: bytes, body: bytes, w: asyncio.StreamWriter
    ) -> bool:
        if evil.posts == 1:
            w.write(completion("first"))
            return True
        return False  # read the request (llama.cpp would be working on it), then close

    evil, stack = evil_stack(respond)
    with kept_alive(stack) as client:
        assert text_of(ask(client, "one")) == "first"
        r = ask(client, "two")
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    assert evil.posts == 2  # two calls, two POSTs: the second was not re-sent


def test_upstream_credentials_are_never_shown() -> None:
    """Item 17: a user:password@ in an upstream URL is shown to nobody. Such URLs are refused
    at start (the proxy cannot send them), by a message that names host and port only; and
    the upstream client's own messages name host and port only."""
    settings = load_settings(
        ["--llamacpp-server", "http://admin:hunter2@127.0.0.1:9"],
        {"UNLIMITED_API_KEY": "sk-test-0123456789"},
    )
    with pytest.raises(ConfigError) as refused:
        build_context(settings)
    assert "hunter2" not in str(refused.value) and "admin" not in str(refused.value)
    assert "127.0.0.1:9" in str(refused.value)

    async def scenario() -> str:
        client = LlamaCppClient(default_settings(), base_url="http://admin:hunter2@127.0.0.1:9")
        try:
            ready, why = await client.health()
            assert not ready
            with pytest.raises(ProxyError) as failed:
                await client.complete({"prompt": "x"}, client.new_call())
            return why + " " + failed.value.message
        finally:
            client.close()

    text = asyncio.run(scenario())
    assert "hunter2" not in text and "admin" not in text
    assert "127.0.0.1:9" in text  # where it is, so the operator can still tell


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_that_comes_with_its_deadline_is_not_relayed(
    evil_stack: Any, stream: bool
) -> None:
    # The deadline and the answer's head become ready in the same turn of the event loop
    # (a loaded machine descheduled the proxy while the answer arrived): the deadline's
    # timer runs first and aborts the call. The head already buffered must not then be
    # relayed as if it had come in time; that made a 200 stream that went on to say
    # "did not start answering", and freed the connection under a stream that looked alive.
    event = b'data: {"content": "late", "stop": false}\n\n'

    async def respond(
        evil: EvilUpstream, head: bytes, body: bytes, w: asyncio.StreamWriter
    ) -> bool:
        time.sleep(0.5)  # the loop stands still past the 0.3 s deadline...
        if stream:  # ...while the answer arrives
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + event)
        else:
            w.write(completion("late"))
        return True

    _evil, stack = evil_stack(respond, upstream_first_byte_timeout=0.3)
    with kept_alive(stack) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": stream})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["message"] == "llama.cpp did not start answering within 0.3s"


def _peek_quiet(fd: int) -> bool:
    """The check as it was: a MSG_PEEK recv on a borrowed socket object (the reference)."""
    import socket

    peek = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    finally:
        peek.detach()
    return False


def test_an_idle_connection_is_quiet_exactly_when_the_kernel_holds_nothing_for_it() -> None:
    """Connection.quiet() asks poll(2) whether anything (bytes, EOF, a reset) arrived that
    the event loop has not read yet; it must answer as the MSG_PEEK check it replaced, on
    every state an idle pooled connection can be in. (No await between the server's action
    and the check: the loop must not read the bytes first, the kernel path is the one
    tested.)"""
    import socket
    import struct

    async def scenario() -> list[tuple[str, bool, bool]]:
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        pool = ConnectionPool(f"http://127.0.0.1:{port}", 4, 2.0)
        seen = []
        for action in ("nothing", "bytes", "close", "reset"):
            conn = await pool.acquire()
            peer, _ = server.accept()
            if action == "bytes":
                peer.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            elif action == "close":
                peer.close()
            elif action == "reset":
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()
            fd = conn.fileno()
            reference = _peek_quiet(fd)
            seen.append((action, conn.quiet(), reference))
            pool.release(conn, False)
            if action in ("nothing", "bytes"):
                peer.close()
        pool.close()
        server.close()
        return seen

    assert asyncio.run(scenario()) == [
        ("nothing", True, True),
        ("bytes", False, False),
        ("close", False, False),
        ("reset", False, False),
    ]


def test_reachable_asks_the_addresses_it_knows_not_the_resolver() -> None:
    """`reachable` decides whether requests waiting on a server are ended (its machine is
    gone): a resolver that fails says nothing about a server the gateway is connected to,
    so the addresses of the last lookup are tried, and a lookup that fails is "cannot
    tell" (True), never "gone". Only a connect refused or timed out is False."""

    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clock = [100.0]
        pool = ConnectionPool(f"http://localhost:{port}", 2, 1.0, now=lambda: clock[0])
        loop = asyncio.get_running_loop()
        real_lookup = loop.getaddrinfo

        async def broken_lookup(*args: Any, **kwargs: Any) -> Any:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

        loop.getaddrinfo = broken_lookup  # type: ignore[method-assign]
        assert await pool.reachable()  # never looked up, no resolver: cannot tell
        loop.getaddrinfo = real_lookup  # type: ignore[method-assign]
        conn = await pool.acquire()  # looked up and connected
        pool.release(conn, False)
        clock[0] += 3600.0  # the lookup is long stale
        loop.getaddrinfo = broken_lookup  # type: ignore[method-assign]
        assert await pool.reachable()  # the known address still takes connections
        server.close()
        await server.wait_closed()
        assert not await pool.reachable()  # refused: gone
        pool.close()

    asyncio.run(scenario())
