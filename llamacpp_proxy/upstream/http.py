"""A small HTTP/1.1 client for llama.cpp with keep-alive connections.

Tornado's SimpleAsyncHTTPClient opens a new TCP connection (and resolves the host in a
thread) for every request and closes it after; profiles of the proxy under load showed that
setup and teardown as the largest cost (docs/benchmarks.md). This client keeps connections
to the one upstream open and reuses them, hands body bytes to a callback as each read
brings them (for streaming), and can be aborted at any moment by closing the connection,
which is what makes llama.cpp stop generating and free its slot.

Only what talking to llama.cpp needs: requests with a Content-Length body; responses with
Content-Length, chunked, or close-delimited bodies; no redirects, no proxies.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
READ_SIZE = 64 * 1024
IDLE_TTL = 4.0  # llama.cpp's HTTP server drops idle keep-alive connections after 5 s


class ProtocolError(Exception):
    """The upstream's answer is not HTTP/1.1 we can read."""


class ConnectionLost(ConnectionError):
    """The connection closed before the response was complete."""


@dataclass
class ResponseHead:
    """Status line and headers of a response (header names lower-cased)."""

    status: int
    headers: dict[str, str]
    keep_alive: bool


def parse_head(raw: bytes) -> ResponseHead:
    """Parse `HTTP/1.1 200 OK\\r\\nName: value\\r\\n...` (without the blank line)."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and (
        parts[0] != "HTTP/1.0" or "keep-alive" in connection
    )
    return ResponseHead(int(parts[1]), headers, keep_alive)


class BodyDecoder:
    """Turns the bytes after the head into body bytes: Content-Length, chunked, or to EOF.

    Pure and incremental: `feed` takes whatever a read brought and returns the body bytes in
    it; `done` says the body ended exactly (the connection can then be reused).
    """

    __slots__ = ("_buffer", "_chunk_left", "_mode", "_remaining", "_trailers", "done")

    def __init__(self, head: ResponseHead, method: str) -> None:
        self.done = False
        self._buffer = b""
        self._chunk_left = 0
        self._trailers = False
        self._remaining = 0
        encoding = head.headers.get("transfer-encoding", "").lower()
        if method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
            self._mode = "length"
            self.done = True
        elif "chunked" in encoding:
            self._mode = "chunked"
        elif "content-length" in head.headers:
            self._mode = "length"
            try:
                self._remaining = int(head.headers["content-length"])
            except ValueError:
                raise ProtocolError("malformed Content-Length") from None
            if self._remaining < 0:
                raise ProtocolError("negative Content-Length")
            self.done = self._remaining == 0
        else:
            self._mode = "eof"

    @property
    def until_eof(self) -> bool:
        """The body ends when the connection does (it cannot be reused)."""
        return self._mode == "eof"

    def feed(self, data: bytes) -> bytes:
        """Body bytes contained in `data`."""
        if self._mode == "eof":
            return data
        if self._mode == "length":
            if len(data) > self._remaining:
                raise ProtocolError("more bytes than Content-Length")
            self._remaining -= len(data)
            self.done = self._remaining == 0
            return data
        return self._feed_chunked(data)

    def _feed_chunked(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        pos = 0
        end = len(buffer)
        while pos < end and not self.done:
            if self._chunk_left > 0:
                take = min(self._chunk_left, end - pos)
                out.append(buffer[pos : pos + take])
                pos += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._chunk_left = -2  # the CRLF after the chunk data
                continue
            if self._chunk_left == -2:
                if end - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                pos += 2
                self._chunk_left = 0
                continue
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > 1024:
                    raise ProtocolError("chunk size line too long")
                break
            line = buffer[pos:line_end]
            pos = line_end + 2
            if self._trailers:
                if not line:
                    self.done = True
                continue
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                self._trailers = True
            else:
                self._chunk_left = size
        self._buffer = buffer[pos:]
        if self.done and self._buffer:
            raise ProtocolError("bytes after the end of a chunked body")
        return b"".join(out) if len(out) != 1 else out[0]


class Connection:
    """One TCP (or TLS) connection to the upstream."""

    __slots__ = ("closed", "idle_since", "reader", "requests", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.idle_since = 0.0
        self.requests = 0

    def close(self) -> None:
        """Close now; a read in progress ends with EOF."""
        if not self.closed:
            self.closed = True
            self.writer.close()
            # The peer sees the close at once; the reader sees EOF.
            self.reader.feed_eof()


class ConnectionPool:
    """Keep-alive connections to one upstream, at most `max_connections` at once."""

    def __init__(
        self,
        base_url: str,
        max_connections: int,
        connect_timeout: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "localhost"
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.prefix = url.path.rstrip("/")
        default_port = (url.scheme, self.port) in (("http", 80), ("https", 443))
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):
            self.host_header = f"[{self.host}]" + ("" if default_port else f":{self.port}")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._now = now
        self._idle: deque[Connection] = deque()  # oldest on the left
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or busy."""
        return self._open

    async def acquire(self, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection and whether it was reused (a reused one may have been closed by the
        server meanwhile: a request that fails on it before any answer may be retried, on a
        `fresh` one, which is never an idle connection)."""
        while True:
            now = self._now()
            while self._idle and not fresh:
                conn = self._idle.pop()  # the most recently used: least likely to be stale
                if conn.closed or now - conn.idle_since > IDLE_TTL or conn.reader.at_eof():
                    self._discard(conn)
                    continue
                return conn, True
            if fresh and self._idle and self._open >= self.max_connections:
                self._discard(self._idle.popleft())  # make room rather than wait on idlers
            if self._open < self.max_connections:
                self._open += 1
                try:
                    return await self._connect(), False
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise

    async def _connect(self) -> Connection:
        context = ssl.create_default_context() if self.tls else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=context, limit=MAX_HEAD),
            self.connect_timeout,
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Connection(reader, writer)

    def release(self, conn: Connection, reusable: bool) -> None:
        """Return a connection after its response was read (or abandoned)."""
        if reusable and not conn.closed:
            conn.idle_since = self._now()
            self._idle.append(conn)
            self._wake()
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(IDLE_TTL, self._sweep)
        else:
            self._discard(conn)

    def _sweep(self) -> None:
        """Close idle connections past their TTL or closed by the server, oldest first, so
        they do not linger in CLOSE_WAIT holding descriptors when traffic stops."""
        self._sweeper = None
        now = self._now()
        idle = self._idle
        while idle and (
            idle[0].closed or now - idle[0].idle_since > IDLE_TTL or idle[0].reader.at_eof()
        ):
            self._discard(idle.popleft())
        for conn in [c for c in idle if c.reader.at_eof()]:
            idle.remove(conn)
            self._discard(conn)
        if idle:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_TTL / 2, self._sweep)

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close idle connections (busy ones close when their requests end)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._discard(self._idle.pop())


def encode_request(
    pool: ConnectionPool,
    method: str,
    path: str,
    body: bytes | None,
    content_type: str = "application/json",
) -> bytes:
    """The request bytes."""
    head = (
        f"{method} {pool.prefix}{path} HTTP/1.1\r\nHost: {pool.host_header}\r\n"
        "Accept: application/json, text/event-stream\r\n"
    )
    if body is None:
        return (head + "\r\n").encode("latin-1")
    head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


async def read_head(conn: Connection) -> ResponseHead:
    """The response head (the body stays in the connection's reader)."""
    while True:
        try:
            raw = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionLost("the connection closed before a response") from exc
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError("response head too large") from exc
        head = parse_head(raw[:-4])
        if head.status != 100:  # "100 Continue" precedes the real answer
            return head
