"""The keep-alive HTTP/1.1 client to llama.cpp: framing, reuse, limits, stale connections."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from llamacpp_proxy.upstream.http import BodyDecoder, ProtocolError, ResponseHead, parse_head

from .conftest import Stack
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


@pytest.mark.parametrize("raw", [b"zz\r\n", b"3\r\nabcX\r\n", b"1\r\na\r\n0\r\n\r\nextra"])
def test_broken_chunking_is_a_protocol_error(raw: bytes) -> None:
    decoder = BodyDecoder(head(transfer_encoding="chunked"), "POST")
    with pytest.raises(ProtocolError):
        decoder.feed(raw)


def test_content_length_and_until_eof_bodies() -> None:
    decoder = BodyDecoder(head(content_length="5"), "POST")
    assert decoder.feed(b"he") == b"he" and not decoder.done
    assert decoder.feed(b"llo") == b"llo" and decoder.done
    with pytest.raises(ProtocolError):
        BodyDecoder(head(content_length="2"), "POST").feed(b"abc")
    assert BodyDecoder(head(content_length="0"), "POST").done
    eof = BodyDecoder(head(), "POST")
    assert eof.until_eof and eof.feed(b"abc") == b"abc" and not eof.done


def test_connections_are_reused(stack: Stack) -> None:
    pool = stack.ctx.upstream._pool
    for stream in (False, True, False, True):
        for _ in range(5):
            r = post(stack, "/v1/chat/completions", {"messages": CHAT, "stream": stream})
            assert r.status_code == 200
    assert pool.open_connections == 1  # one kept-alive connection served all 20


def test_concurrency_is_bounded_by_upstream_max_connections(make_stack: Any) -> None:
    stack = make_stack(upstream_max_connections=2)
    stack.fake.script.token_delay = 0.01
    pool = stack.ctx.upstream._pool
    peak = []

    def one(_: int) -> str:
        peak.append(pool.open_connections)
        events = sse_events(post(stack, "/v1/chat/completions", {"messages": CHAT, "stream": True}))
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])

    with ThreadPoolExecutor(8) as workers:
        texts = list(workers.map(one, range(8)))
    assert texts == [FULL_TEXT] * 8  # the ones that waited for a connection still answer
    assert max(peak) <= 2 and pool.open_connections <= 2


def test_a_connection_the_server_closed_is_replaced_transparently(stack: Stack) -> None:
    assert post(stack, "/v1/completions", {"prompt": "x"}).status_code == 200

    async def drop_server_side() -> None:
        await stack.fake._server.close_all_connections()  # type: ignore[union-attr]

    stack.runner.run(drop_server_side())
    for _ in range(3):
        assert post(stack, "/v1/completions", {"prompt": "x"}).status_code == 200


def test_connection_close_from_upstream_is_respected(stack: Stack) -> None:
    stack.fake.script.fail_status = 200
    stack.fake.script.fail_body = '{"content": "ok", "stop": true, "stop_type": "eos"}'
    stack.fake.close_connections = True
    r = post(stack, "/v1/completions", {"prompt": "x"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    assert stack.wait_for(lambda: stack.ctx.upstream._pool.open_connections == 0)


def test_abort_does_not_return_the_connection_to_the_pool(stack: Stack) -> None:
    stack.fake.script.token_delay = 0.05
    stack.fake.script.tokens = [f" t{i}" for i in range(100)]
    import httpx

    from .conftest import UNLIMITED_KEY

    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json={"messages": CHAT, "stream": True},
        timeout=10,
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
    from llamacpp_proxy.upstream.http import ConnectionPool

    pool = ConnectionPool("http://127.0.0.1:9", 4, 1.0)
    pool.close()
    assert pool.open_connections == 0
    asyncio.run(asyncio.sleep(0))


def test_idle_connections_the_server_closed_do_not_linger(stack: Stack) -> None:
    from concurrent.futures import ThreadPoolExecutor as Pool

    pool = stack.ctx.upstream._pool
    stack.fake.script.token_delay = 0.01
    with Pool(6) as workers:  # a burst opens several connections
        list(
            workers.map(
                lambda _: post(stack, "/v1/completions", {"prompt": "x", "stream": True}), range(6)
            )
        )
    assert pool.open_connections > 1

    async def drop_server_side() -> None:
        await stack.fake._server.close_all_connections()  # type: ignore[union-attr]

    stack.runner.run(drop_server_side())
    # No request comes: the sweep alone closes our side of every dropped connection.
    assert stack.wait_for(lambda: pool.open_connections == 0, timeout=10)


def test_a_fresh_connection_is_made_even_when_the_pool_is_full_of_idle_ones() -> None:
    from llamacpp_proxy.upstream.http import ConnectionPool

    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool(f"http://127.0.0.1:{port}", 1, 1.0)
        conn, reused = await pool.acquire()
        pool.release(conn, True)
        again, reused = await pool.acquire()
        assert again is conn and reused
        pool.release(again, True)
        fresh, reused = await asyncio.wait_for(pool.acquire(fresh=True), 2)
        assert fresh is not conn and not reused and conn.closed
        assert pool.open_connections == 1
        pool.release(fresh, False)
        pool.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
