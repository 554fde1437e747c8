"""The upstream connection of our own (upstream/http.py Connection): one object driven by
the event loop's readiness callbacks. What is new in it, driven over real sockets: a request
the kernel takes only in part, resets and EOF in the head and the body, backpressure that
stops reading the socket, an abort while connecting, descriptors really closed, and the
same receiver behind asyncio's TLS transport for https upstreams."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from llamacpp_proxy.errors import UpstreamError
from llamacpp_proxy.upstream import http as http_module
from llamacpp_proxy.upstream.http import (
    LOOKUP_TTL,
    SPARE_DELAY,
    BodyDecoder,
    Connection,
    ConnectionLost,
    ConnectionPool,
)
from llamacpp_proxy.upstream.llamacpp import ClientGone, UpstreamCall

from .conftest import UNLIMITED_KEY, Stack
from .fake_llamacpp import FakeLlamaCpp

EVENT = b'data: {"content":" fox","stop":false}\n\n'
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def reset(sock: socket.socket) -> None:
    """Close with an RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def turns(n: int = 5) -> None:
    """Let the event loop run n iterations: a registered reader with bytes waiting for it
    in the kernel runs in the first."""
    for _ in range(n):
        await asyncio.sleep(0)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, non-blocking; the peer's) over loopback TCP, so that a reset is a reset."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    ours.setblocking(False)
    return ours, peer


async def headed(head: bytes) -> tuple[Connection, socket.socket]:
    """A Connection over loopback TCP whose response head (`head`) was read."""
    ours, peer = tcp_pair()
    conn = Connection(asyncio.get_running_loop(), ours)
    peer.sendall(head)
    await asyncio.wait_for(conn.read_head(), 5)
    return conn, peer


def pump(
    head: bytes,
    steps: Callable[[socket.socket, list[bytes], list[asyncio.Future[None]]], Awaitable[None]],
) -> tuple[list[bytes], BaseException | None, Connection]:
    """Read a streamed body, every piece handed on with a client write left pending (the
    test settles it); `steps` plays the peer and the client."""

    async def scenario() -> tuple[list[bytes], BaseException | None, Connection]:
        loop = asyncio.get_running_loop()
        conn, peer = await headed(head)
        assert conn.head is not None
        got: list[bytes] = []
        writes: list[asyncio.Future[None]] = []

        def on_body(piece: bytes) -> asyncio.Future[None]:
            got.append(piece)
            writes.append(loop.create_future())
            return writes[-1]

        reading = asyncio.ensure_future(
            conn.read_body(BodyDecoder(conn.head, "POST"), on_body=on_body)
        )
        try:
            await steps(peer, got, writes)
            await asyncio.wait_for(reading, 5)
        except (ConnectionLost, UpstreamError) as exc:
            return got, exc, conn
        finally:
            conn.close()
            peer.close()
        return got, None, conn

    return asyncio.run(scenario())


def test_while_the_client_is_behind_the_socket_is_not_read_and_reading_resumes_after() -> None:
    async def steps(peer: socket.socket, got: list[bytes], writes: list[Any]) -> None:
        peer.sendall(CHUNK)
        await turns()
        assert got == [EVENT]  # the client's copy is pending...
        peer.sendall(CHUNK + b"0\r\n\r\n")
        await turns()
        assert got == [EVENT]  # ...so what llama.cpp sends next stays in the kernel
        writes[0].set_result(None)  # the client catches up
        await turns()
        assert got == [EVENT, EVENT]
        writes[1].set_result(None)

    got, error, _ = pump(CHUNKED_HEAD, steps)
    assert got == [EVENT, EVENT] and error is None


def test_a_drop_while_the_client_is_behind_ends_the_body_after_what_was_read() -> None:
    async def steps(peer: socket.socket, got: list[bytes], writes: list[Any]) -> None:
        peer.sendall(CHUNK)
        await turns()
        peer.close()  # llama.cpp goes away meanwhile
        await turns()
        writes[0].set_result(None)

    got, error, _ = pump(CHUNKED_HEAD, steps)
    assert got == [EVENT]
    assert isinstance(error, ConnectionLost)


def test_a_close_delimited_body_ends_cleanly_at_eof_even_while_the_client_is_behind() -> None:
    async def steps(peer: socket.socket, got: list[bytes], writes: list[Any]) -> None:
        peer.sendall(EVENT)
        await turns()
        peer.close()
        await turns()
        writes[0].set_result(None)

    got, error, _ = pump(b"HTTP/1.1 200 OK\r\n\r\n", steps)
    assert got == [EVENT] and error is None


def test_a_failed_client_write_ends_the_body_with_its_error() -> None:
    async def steps(peer: socket.socket, got: list[bytes], writes: list[Any]) -> None:
        peer.sendall(CHUNK)
        await turns()
        writes[0].set_exception(UpstreamError("the client's write failed"))

    got, error, _ = pump(CHUNKED_HEAD, steps)
    assert got == [EVENT] and isinstance(error, UpstreamError)


def test_a_reset_during_the_head_is_an_error_not_a_hang() -> None:
    async def scenario() -> BaseException:
        ours, peer = tcp_pair()
        conn = Connection(asyncio.get_running_loop(), ours)
        conn.send(b"GET / HTTP/1.1\r\n\r\n")
        peer.recv(100)
        peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
        await turns()
        reset(peer)
        try:
            await asyncio.wait_for(conn.read_head(), 5)
        except OSError as exc:
            return exc
        finally:
            conn.close()
        raise AssertionError("a head cut by a reset was taken")

    assert isinstance(asyncio.run(scenario()), ConnectionResetError)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_eof_or_a_reset_mid_body_is_an_error(how: str) -> None:
    async def scenario() -> BaseException:
        conn, peer = await headed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
        assert conn.head is not None
        reading = asyncio.ensure_future(conn.read_body(BodyDecoder(conn.head, "POST"), 1000))
        await turns()
        assert not reading.done()
        if how == "close":
            peer.close()
        else:
            reset(peer)
        try:
            await asyncio.wait_for(reading, 5)
        except OSError as exc:  # ConnectionLost is a ConnectionError
            return exc
        finally:
            conn.close()
        raise AssertionError("half a body was taken for a whole one")

    error = asyncio.run(scenario())
    assert isinstance(error, ConnectionLost if how == "close" else ConnectionResetError)


def test_a_request_the_kernel_takes_only_in_part_is_sent_whole() -> None:
    prompt = b"y" * (2 * 1024 * 1024)
    request = b"POST /completion HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(prompt), prompt)

    async def scenario() -> tuple[bool, bytes, bytes, bool]:
        ours, peer = tcp_pair()
        # Small buffers, so that loopback cannot take 2 MB at once (it can, by default).
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        conn = Connection(asyncio.get_running_loop(), ours)
        conn.send(request)
        partial = conn.writing  # the peer reads nothing yet: the kernel took only a part
        loop = asyncio.get_running_loop()
        peer.setblocking(False)
        received = bytearray()
        while len(received) < len(request):  # a slow reader: at most 64 KiB a read
            received += await asyncio.wait_for(loop.sock_recv(peer, 65536), 5)
        peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        head = await asyncio.wait_for(conn.read_head(), 5)
        body, complete = await asyncio.wait_for(conn.read_body(BodyDecoder(head, "POST"), 10), 5)
        writing = conn.writing or not complete
        conn.close()
        peer.close()
        return partial, bytes(received), body, writing

    partial, received, body, writing = asyncio.run(scenario())
    assert partial, "the 2 MB request went into the kernel in one send: nothing was tested"
    assert received == request and body == b"ok" and not writing


def test_a_2mb_prompt_through_the_proxy_reaches_llamacpp_whole(
    stack: Stack, fake: FakeLlamaCpp
) -> None:
    prompt = "word " * (2 * 1024 * 1024 // 5)
    fake.script.n_ctx = 10**7
    with httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {UNLIMITED_KEY}"}, timeout=30
    ) as client:
        for _ in range(2):
            r = client.post("/v1/completions", json={"model": "m", "prompt": prompt})
            assert r.status_code == 200, r.text
            assert fake.requests[-1]["prompt"] == prompt


def hanging_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its queue full: a connect to it hangs (loopback)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    return listener, fillers


def test_an_abort_while_connecting_stops_the_connect_and_closes_its_socket() -> None:
    listener, fillers = hanging_listener()

    async def scenario() -> tuple[BaseException | None, int, int, int]:
        pool = ConnectionPool(f"http://127.0.0.1:{listener.getsockname()[1]}", 4, 30.0)
        before = fd_count()
        outcomes: list[BaseException | None] = []
        for _ in range(20):
            call = UpstreamCall(60, 60)
            connecting = asyncio.ensure_future(call.acquire(pool))
            await turns()
            assert not connecting.done()  # the connect hangs
            call.abort(ClientGone())  # the client leaves
            try:
                await asyncio.wait_for(connecting, 5)
                outcomes.append(None)
            except BaseException as exc:
                outcomes.append(exc)
            call.done()
        assert all(isinstance(o, ClientGone) for o in outcomes), outcomes
        return outcomes[0], before, fd_count(), pool.open_connections

    try:
        _, before, after, still_open = asyncio.run(scenario())
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert after == before and still_open == 0


def test_streams_leave_no_descriptor_open(stack: Stack, fake: FakeLlamaCpp) -> None:
    body = {"model": "m", "prompt": "hi", "stream": True}
    with httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {UNLIMITED_KEY}"}, timeout=10
    ) as client:

        def stream() -> None:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                assert "[DONE]" in r.read().decode()

        stream()  # the client's connection, the pools, the log: open once
        baseline = fd_count()
        for _ in range(40):
            stream()
        # The fake closes its side when it sees ours close: a loop turn or two later.
        assert stack.wait_for(lambda: fd_count() <= baseline), (baseline, fd_count())


# -- https upstreams: the same receiver behind asyncio's TLS transport -----------------


@pytest.fixture
def tls_server(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for 127.0.0.1."""
    from .test_tls import self_signed

    cert, key = self_signed(tmp_path, "upstream")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def test_an_https_upstream_answers_plain_and_streamed_on_a_kept_alive_connection(
    tls_server: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls_server

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if request.startswith(b"GET /stream"):
                writer.write(CHUNKED_HEAD + CHUNK * 3 + b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    async def scenario() -> tuple[list[bytes], list[bytes], int]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool(f"https://127.0.0.1:{port}", 1, 5.0, ssl_context=client_context)
        plain = []
        for _ in range(3):
            conn = await pool.acquire()
            conn.send(b"GET / HTTP/1.1\r\n\r\n")
            head = await asyncio.wait_for(conn.read_head(), 5)
            body, complete = await asyncio.wait_for(
                conn.read_body(BodyDecoder(head, "GET"), 100), 5
            )
            plain.append(body)
            pool.release(conn, complete and conn.idle)
        opened = pool.open_connections
        conn = await pool.acquire()
        conn.send(b"GET /stream HTTP/1.1\r\n\r\n")
        head = await asyncio.wait_for(conn.read_head(), 5)
        pieces: list[bytes] = []
        await asyncio.wait_for(conn.read_body(BodyDecoder(head, "GET"), on_body=pieces.append), 5)
        pool.release(conn, False)
        pool.close()
        server.close()
        return plain, pieces, opened

    plain, pieces, opened = asyncio.run(scenario())
    assert plain == [b"hello"] * 3 and opened == 1  # one kept-alive connection
    assert b"".join(pieces) == EVENT * 3


def test_a_plain_response_in_the_same_read_as_its_head_needs_no_second_wait() -> None:
    # The common non-streamed case: head and body in one read. read_body returns what is
    # already in, so a request costs the caller one future, not one per read.
    async def scenario() -> tuple[bytes, bool, bool]:
        conn, peer = await headed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert conn.head is not None
        reading = asyncio.ensure_future(conn.read_body(BodyDecoder(conn.head, "POST"), 10))
        await asyncio.sleep(0)  # one step of the task: enough only if nothing is awaited
        done = reading.done()
        body, complete = await reading
        idle = conn.idle
        conn.close()
        peer.close()
        return body, complete and done, idle

    body, complete_at_once, idle = asyncio.run(scenario())
    assert body == b"ok" and complete_at_once and idle


def test_bytes_after_the_end_keep_the_connection_from_reuse() -> None:
    async def scenario() -> bool:
        conn, peer = await headed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert conn.head is not None
        await conn.read_body(BodyDecoder(conn.head, "POST"), 10)
        peer.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        await turns()
        idle = conn.idle or conn.quiet()
        conn.close()
        peer.close()
        return idle

    assert asyncio.run(scenario()) is False


def test_a_host_name_is_looked_up_once_per_lookup_ttl_and_again_after_a_failure() -> None:
    """`http://localhost:PORT` (the usual llama.cpp URL) would cost a getaddrinfo in the
    executor's thread for every stream's connection; its addresses are reused for LOOKUP_TTL
    seconds, and looked up again as soon as none of them answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    clock = [100.0]

    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        lookups = []
        real = loop.getaddrinfo

        async def counted(*args: Any, **kwargs: Any) -> Any:
            lookups.append(args[0])
            return await real(*args, **kwargs)

        loop.getaddrinfo = counted  # type: ignore[method-assign]
        pool = ConnectionPool(f"http://localhost:{port}", 4, 5.0, now=lambda: clock[0])
        seen = []
        for step in range(3):
            conn = await pool.acquire()
            pool.release(conn, reusable=False)
            seen.append(len(lookups))
            if step == 1:
                clock[0] += LOOKUP_TTL + 1
        listener.close()  # nothing answers at that address any more
        with pytest.raises(OSError):
            await pool.acquire()
        seen.append(len(lookups))
        with pytest.raises(OSError):
            await pool.acquire()
        seen.append(len(lookups))
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        listener.close()
    # one lookup for two connections, one more after the TTL; a connect where no address
    # answered drops them, so the one after it looks up again
    assert seen == [1, 1, 2, 2, 3]


def test_the_address_that_answered_is_tried_first_next_time() -> None:
    """`localhost` resolves to ::1 first, and llama-server listens on 127.0.0.1 by
    default: a refused ::1 before every stream's connection is paid once, not per stream."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: a connect to it is refused
    dead = refused.getsockname()

    async def scenario() -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()

        async def resolver(*args: Any, **kwargs: Any) -> Any:
            info = (socket.AF_INET, socket.SOCK_STREAM, 6, "")
            return [(*info, dead), (*info, ("127.0.0.1", port))]

        loop.getaddrinfo = resolver  # type: ignore[method-assign]
        pool = ConnectionPool(f"http://llama.internal:{port}", 4, 5.0)
        for _ in range(3):
            conn = await pool.acquire()
            pool.release(conn, reusable=False)
        assert pool._looked_up is not None
        return [address for _, address in pool._looked_up[1]]

    try:
        order = asyncio.run(scenario())
    finally:
        listener.close()
        refused.close()
    assert order == [("127.0.0.1", port), dead]


def test_connects_racing_through_the_looked_up_addresses_each_try_every_address() -> None:
    """Two streams connecting at once share the looked-up list: when one of them moves the
    address that answered to the front, the other, still waiting on the first address,
    must go on to the one that answers, not try the refused one again (a 503 for a
    llama.cpp that was there)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    dead = ("127.0.0.2", port)  # refused: nothing listens there (the fake _open says so)

    async def scenario() -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        real_open = http_module._open
        refusals: list[asyncio.Event] = []
        tried: list[tuple[str, int]] = []

        async def resolver(*args: Any, **kwargs: Any) -> Any:
            info = (socket.AF_INET, socket.SOCK_STREAM, 6, "")
            return [(*info, dead), (*info, ("127.0.0.1", port))]

        async def opened(
            loop: asyncio.AbstractEventLoop, family: int, address: Any, deadline: float
        ) -> Connection:
            tried.append(address)
            if address == dead:
                # The first refusal waits for the test's word; the others come at once.
                gate = asyncio.Event()
                refusals.append(gate)
                if len(refusals) == 1:
                    await gate.wait()
                raise ConnectionRefusedError(111, "refused")
            return await real_open(loop, family, address, deadline)

        loop.getaddrinfo = resolver  # type: ignore[method-assign]
        pool = ConnectionPool(f"http://llama.internal:{port}", 4, 5.0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(http_module, "_open", opened)
            slow = asyncio.ensure_future(pool.acquire())  # refused later, on the first
            while not refusals:
                await asyncio.sleep(0)
            fast = await asyncio.wait_for(pool.acquire(), 5)  # refused at once, then answered
            refusals[0].set()
            second = await asyncio.wait_for(slow, 5)
        for conn in (fast, second):
            pool.release(conn, reusable=False)
        return tried

    try:
        tried = asyncio.run(scenario())
    finally:
        listener.close()
    assert tried.count(("127.0.0.1", port)) == 2, tried


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_answer_before_the_request_is_sent_whole_keeps_the_connection_from_reuse(
    scheme: str, tls_server: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """An upstream that answers before it has read a large request (an early 413, or a
    broken server): the rest of the request is still on its way, so the connection is not
    pooled. The next request would go out behind it, and whatever the server makes of those
    bytes would be read as that request's answer. Plain and TLS alike."""
    server_context, client_context = tls_server
    body = b"x" * (8 << 20)  # more than the socket buffers on both sides hold

    async def scenario() -> tuple[bool, int]:
        done = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\nno")
            await writer.drain()
            await done.wait()  # reads no more of the body, keeps the connection open
            writer.close()

        ssl_context = server_context if scheme == "https" else None
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl_context)
        port = server.sockets[0].getsockname()[1]
        tls = client_context if scheme == "https" else None
        pool = ConnectionPool(f"{scheme}://127.0.0.1:{port}", 1, 5.0, ssl_context=tls)
        conn = await pool.acquire()
        conn.send(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        head = await asyncio.wait_for(conn.read_head(), 5)
        decoder = BodyDecoder(head, "POST")
        answer, complete = await asyncio.wait_for(conn.read_body(decoder, 100), 5)
        assert answer == b"no" and complete and decoder.done and head.keep_alive
        writing = conn.writing
        pool.release(conn, reusable=True)  # as _read_body says for a whole answer
        kept = pool.open_connections
        pool.close()
        done.set()
        server.close()
        return writing, kept

    still_writing, kept = asyncio.run(scenario())
    assert still_writing  # the premise: the request was not all sent
    assert kept == 0


def test_a_client_write_pending_when_the_read_ended_the_call_still_runs_its_course() -> None:
    """A read that hands the client a write still pending AND ends the call (events, then a
    malformed one, in the same read, while the client is behind): the wait it handed back
    (the front door's coroutine) still runs once the client takes the bytes, instead of
    being dropped unawaited ("coroutine was never awaited")."""

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        conn, peer = await headed(CHUNKED_HEAD)
        assert conn.head is not None
        client_write = loop.create_future()
        settled = []

        async def wait_for_client() -> None:
            await client_write
            settled.append(True)

        def on_body(piece: bytes) -> Awaitable[None]:
            conn.close()  # what call.abort does for the malformed event
            return wait_for_client()

        reading = asyncio.ensure_future(
            conn.read_body(BodyDecoder(conn.head, "POST"), on_body=on_body)
        )
        peer.sendall(CHUNK)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(reading, 5)
        client_write.set_result(None)
        await turns()
        peer.close()
        return bool(settled)

    assert asyncio.run(scenario())


T = TypeVar("T")


def against_a_listener(
    scenario: Callable[[str, Callable[[], int], socket.socket], Awaitable[T]],
) -> T:
    """Run `scenario(url, accepted, listener)` on a new event loop against a loopback
    listener that nobody serves; `accepted()` takes every connection the kernel completed
    for it so far and says how many there have been."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    peers: list[socket.socket] = []

    def accepted() -> int:
        while True:
            try:
                peers.append(listener.accept()[0])
            except (BlockingIOError, OSError):
                return len(peers)

    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        return asyncio.run(scenario(url, accepted, listener))
    finally:
        listener.close()
        for peer in peers:
            peer.close()


async def spares_settled(pool: ConnectionPool) -> None:
    """Until every spare scheduled has run its course (opened, given up or failed)."""
    deadline = asyncio.get_running_loop().time() + 5
    while pool._sparing or pool._spare_tasks:
        assert asyncio.get_running_loop().time() < deadline, "a spare never settled"
        await asyncio.sleep(0.001)


def test_a_spare_connection_is_opened_after_each_take_and_the_next_request_uses_it() -> None:
    """A stream never gets its connection back (llama-server closes it), so each one paid
    a connect on its way to the first token. With spares, the pool opens one SPARE_DELAY
    after a request took a connection, and the next request takes it: two streams, one
    connect on their way (the first), each followed by a spare."""

    async def scenario(
        url: str, accepted: Callable[[], int], _: socket.socket
    ) -> list[tuple[int, int]]:
        pool = ConnectionPool(url, 4, 5.0, spares=1)
        seen = []
        first = await pool.acquire(spare=True)
        seen.append((accepted(), pool.open_connections))  # no spare yet
        await spares_settled(pool)
        seen.append((accepted(), pool.open_connections))  # the spare
        pool.release(first, reusable=False)  # a stream's: closed
        second = await pool.acquire(spare=True)
        seen.append((accepted(), pool.open_connections))  # took the spare
        await spares_settled(pool)
        seen.append((accepted(), pool.open_connections))  # and a new spare
        pool.release(second, reusable=False)
        pool.close()
        seen.append((accepted(), pool.open_connections))
        return seen

    assert against_a_listener(scenario) == [(1, 1), (2, 2), (2, 1), (3, 2), (3, 0)]


def test_without_spares_every_stream_connects_on_its_way() -> None:
    async def scenario(url: str, accepted: Callable[[], int], _: socket.socket) -> list[int]:
        pool = ConnectionPool(url, 4, 5.0, spares=0)
        seen = []
        for _ in range(3):
            conn = await pool.acquire(spare=True)
            await asyncio.sleep(SPARE_DELAY * 4)  # when a spare would have come
            seen.append(accepted())
            pool.release(conn, reusable=False)
        return seen

    assert against_a_listener(scenario) == [1, 2, 3]


def test_a_spare_never_takes_the_last_free_connection_nor_waits_for_one() -> None:
    """`--upstream-max-connections` bounds what llama.cpp sees: a spare is opened only
    into a free slot, and one that finds none gives up instead of queueing with requests."""

    async def scenario(
        url: str, accepted: Callable[[], int], _: socket.socket
    ) -> tuple[int, int, bool]:
        pool = ConnectionPool(url, 1, 5.0, spares=1)
        conn = await pool.acquire(spare=True)
        await spares_settled(pool)
        seen = (accepted(), pool.open_connections, pool.waiting)
        pool.release(conn, reusable=False)
        return seen

    assert against_a_listener(scenario) == (1, 1, True)


def test_a_spare_that_cannot_connect_gives_its_slot_back_and_the_request_reports_it() -> None:
    """llama.cpp gone after a request took its connection: the spare's failed connect is
    nobody's error (no request waits on it), leaves no slot taken and no count wrong, and
    the next request connects, fails and reports it itself."""

    async def scenario(
        url: str, accepted: Callable[[], int], listener: socket.socket
    ) -> tuple[int, bool, int]:
        pool = ConnectionPool(url, 2, 5.0, spares=1)
        conn = await pool.acquire(spare=True)
        listener.close()  # before the spare's connect runs: it is refused
        await spares_settled(pool)
        after = (pool.open_connections, pool.waiting)
        pool.release(conn, reusable=False)
        with pytest.raises(ConnectionRefusedError):
            await pool.acquire(spare=True)
        return (*after, pool.open_connections)

    assert against_a_listener(scenario) == (1, False, 0)


def test_a_spare_due_when_the_pool_closes_is_not_opened_nor_left_open() -> None:
    async def scenario(url: str, accepted: Callable[[], int], _: socket.socket) -> tuple[int, int]:
        pool = ConnectionPool(url, 4, 5.0, spares=1)
        conn = await pool.acquire(spare=True)
        pool.release(conn, reusable=False)
        pool.close()  # the spare was due SPARE_DELAY later
        await spares_settled(pool)
        return accepted(), pool.open_connections

    assert against_a_listener(scenario) == (1, 0)


@pytest.mark.parametrize("max_connections", [1, 2])
def test_a_spare_due_after_its_taker_gave_the_connection_back_opens_none(
    max_connections: int,
) -> None:
    """A stream answered with an error (read whole, kept alive) gives its connection back
    before the spare it caused is due: that connection is the idle one the spare was for.
    Opening
    another anyway held one more of llama-server's HTTP threads, and beyond
    `--upstream-max-connections` (1 of 1 in use, then 2 open)."""

    async def scenario(url: str, accepted: Callable[[], int], _: socket.socket) -> tuple[int, int]:
        pool = ConnectionPool(url, max_connections, 5.0, spares=1)
        conn = await pool.acquire(spare=True)
        pool.release(conn, reusable=True)  # answered and read to its end: kept alive
        await spares_settled(pool)
        seen = accepted(), pool.open_connections
        pool.close()
        return seen

    assert against_a_listener(scenario) == (1, 1)


def test_open_connections_never_exceed_the_maximum_with_a_spare_due() -> None:
    """Two of two taken (the second while the first's spare was due), the second given
    back kept alive: the spare found a free slot, but the idle connection fills it."""

    async def scenario(url: str, accepted: Callable[[], int], _: socket.socket) -> tuple[int, int]:
        pool = ConnectionPool(url, 2, 5.0, spares=1)
        first = await pool.acquire(spare=True)  # a stream: its spare is due SPARE_DELAY later
        second = await pool.acquire()  # a quick one, before the spare
        pool.release(second, reusable=True)
        await spares_settled(pool)
        seen = accepted(), pool.open_connections
        pool.release(first, reusable=False)
        pool.close()
        return seen

    assert against_a_listener(scenario) == (2, 2)


def test_a_request_that_gives_its_connection_back_opens_no_spare() -> None:
    """A non-streamed answer's connection goes back to the pool kept alive: it is the next
    request's, so taking it schedules no spare (no timer, no task on its way)."""

    async def scenario(
        url: str, accepted: Callable[[], int], _: socket.socket
    ) -> tuple[int, int, int]:
        pool = ConnectionPool(url, 4, 5.0, spares=1)
        conn = await pool.acquire()
        scheduled = pool._sparing
        await asyncio.sleep(SPARE_DELAY * 4)  # when a spare would have come
        seen = scheduled, accepted(), pool.open_connections
        pool.release(conn, reusable=True)
        pool.close()
        return seen

    assert against_a_listener(scenario) == (0, 1, 1)
