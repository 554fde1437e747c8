"""A small, strict HTTP/1.1 client for llama.cpp with keep-alive connections.

Tornado's SimpleAsyncHTTPClient opens a new TCP connection (and resolves the host in a
thread) for every request and closes it after; profiles of the proxy under load showed that
setup and teardown as the largest cost (docs/benchmarks.md). This client keeps connections
to the one upstream open and reuses them, hands body bytes to a callback as each read
brings them (for streaming), and can be aborted at any moment by closing the connection,
which is what makes llama.cpp stop generating and free its slot.

Only what talking to llama.cpp needs: requests with a Content-Length body; responses with
Content-Length, chunked, or close-delimited bodies; no redirects, no proxies.

Reusing a connection is only safe when both ends agree where every response ends, so the
reader is strict the way Tornado's `http1connection` (`parse_int`, `parse_hex_int`) and h11's
readers are: exact grammars for the status line, header fields, lengths and chunk sizes, caps
on every size, and any doubt about framing (conflicting lengths, bytes after the end of a
response, bytes arriving on an idle connection) means the connection is closed, never pooled.
A request is never sent twice: a POST that may have reached llama.cpp has started work there.
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # the status line and headers of one response
MAX_HEADERS = 100  # header fields in one head
MAX_INTERIM = 8  # 1xx responses skipped before the final one
MAX_CHUNK_LINE = 1024  # a chunk-size line, extensions included
MAX_TRAILERS = 32  # trailer fields after the last chunk
READ_SIZE = 64 * 1024
# llama.cpp's HTTP server drops idle keep-alive connections after 5 s; a wide margin, since a
# busy machine may delay a send by a second or more after the connection was picked.
IDLE_TTL = 2.5

# Exact grammars (RFC 9112), on bytes so that only ASCII digits are digits ("²²²" is not).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9]{2})(?: [\t \x21-\x7e\x80-\xff]*)?")
_VCHARS = rb"[\x21-\x7e\x80-\xff]+"  # visible characters and obs-text: no controls, no CR/LF
_FIELD = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*((?:"
    + _VCHARS
    + rb"(?:[ \t]+"
    + _VCHARS
    + rb")*)?)[ \t]*"
)
_DIGITS = re.compile(r"[0-9]{1,18}")  # a length, as Tornado's parse_int (int64-safe)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;[^\r\n]*)?[ \t]*")  # as parse_hex_int


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


def parse_length(text: str) -> int:
    """A Content-Length value: ASCII digits only (no sign, `_`, spaces or `0x`); a repeated
    header must repeat the same value (RFC 9110 8.6)."""
    values = {v.strip() for v in text.split(",")}
    if len(values) != 1:
        raise ProtocolError("conflicting Content-Length values")
    value = values.pop()
    if _DIGITS.fullmatch(value) is None:
        raise ProtocolError(f"malformed Content-Length {value[:20]!r}")
    return int(value)


def parse_head(raw: bytes) -> ResponseHead:
    """Parse `HTTP/1.1 200 OK\\r\\nName: value\\r\\n...` (without the blank line)."""
    lines = raw.split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise ProtocolError("too many header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:  # no colon, space before it, obs-fold, a control character, CR/LF
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        key = field.group(1).decode("ascii").lower()
        value = field.group(2).decode("latin-1")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    connection = headers.get("connection", "").lower()
    http10 = status.group(1) == b"0"
    keep_alive = "close" not in connection and (not http10 or "keep-alive" in connection)
    return ResponseHead(int(status.group(2)), headers, keep_alive)


# BodyDecoder states: one name per parser state.
LENGTH = "length"  # Content-Length bytes remain
UNTIL_EOF = "until-eof"  # the body ends when the connection does
CHUNK_SIZE = "chunk-size"  # expecting a chunk-size line
CHUNK_DATA = "chunk-data"  # inside a chunk
CHUNK_END = "chunk-end"  # expecting the CRLF after a chunk's data
TRAILERS = "trailers"  # after the last chunk, until the blank line
DONE = "done"  # the body ended exactly


class BodyDecoder:
    """Turns the bytes after the head into body bytes: Content-Length, chunked, or to EOF.

    Pure and incremental: `feed` takes whatever a read brought and returns the body bytes in
    it; `done` says the body ended exactly. Bytes that came after the end are kept in
    `extra`: they are no part of this response, so the connection must not be reused.
    """

    __slots__ = ("_buffer", "_chunk_left", "_remaining", "_trailers", "extra", "state")

    def __init__(self, head: ResponseHead, method: str) -> None:
        self.extra = b""
        self._buffer = b""
        self._chunk_left = 0
        self._trailers = 0
        self._remaining = 0
        headers = head.headers
        encoding = headers.get("transfer-encoding")
        if method == "HEAD" or head.status in (204, 304) or head.status < 200:
            self.state = DONE
        elif encoding is not None:
            # Only "chunked" frames a response we can reuse the connection after; a length
            # beside it is the classic request-smuggling ambiguity (RFC 9112 6.3).
            if encoding.strip().lower() != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {encoding[:40]!r}")
            if "content-length" in headers:
                raise ProtocolError("both Transfer-Encoding and Content-Length")
            self.state = CHUNK_SIZE
        elif "content-length" in headers:
            self._remaining = parse_length(headers["content-length"])
            self.state = LENGTH if self._remaining else DONE
        else:
            self.state = UNTIL_EOF

    @property
    def done(self) -> bool:
        """The body ended exactly where its framing says."""
        return self.state is DONE

    @property
    def until_eof(self) -> bool:
        """The body ends when the connection does (it cannot be reused)."""
        return self.state is UNTIL_EOF

    @property
    def declared_length(self) -> int | None:
        """The Content-Length still to come, when the response declared one."""
        return self._remaining if self.state is LENGTH else None

    def feed(self, data: bytes) -> bytes:
        """Body bytes contained in `data`."""
        state = self.state
        if state is UNTIL_EOF:
            return data
        if state is LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                return data
            self._remaining = 0
            self.state = DONE
            if len(data) > remaining:
                self.extra += data[remaining:]
                return data[:remaining]
            return data
        if state is DONE:
            self.extra += data
            return b""
        return self._feed_chunked(data)

    def _feed_chunked(self, data: bytes) -> bytes:
        if not self._buffer and self.state is CHUNK_SIZE:
            # Fast path for what llama.cpp sends at a GPU's pace: each read is exactly one
            # whole chunk (one SSE event). Anything else takes the general loop below.
            line_end = data.find(b"\r\n", 0, MAX_CHUNK_LINE + 2)
            if line_end > 0:
                size = _CHUNK_SIZE.fullmatch(data, 0, line_end)
                if size is not None:
                    start = line_end + 2
                    stop = start + int(size.group(1), 16)
                    if stop > start and len(data) == stop + 2 and data.endswith(b"\r\n"):
                        return data[start:stop]
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        pos = 0
        end = len(buffer)
        while pos < end:
            state = self.state
            if state is CHUNK_DATA:
                take = min(self._chunk_left, end - pos)
                out.append(buffer[pos : pos + take])
                pos += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self.state = CHUNK_END
                continue
            if state is CHUNK_END:
                if end - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                pos += 2
                self.state = CHUNK_SIZE
                continue
            if state is DONE:
                self.extra += buffer[pos:]
                pos = end
                break
            line_end = buffer.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
            if line_end < 0:
                if end - pos > MAX_CHUNK_LINE:
                    raise ProtocolError("chunk-size or trailer line too long")
                break
            line = buffer[pos:line_end]
            pos = line_end + 2
            if state is TRAILERS:
                if not line:
                    self.state = DONE
                    continue
                self._trailers += 1
                if self._trailers > MAX_TRAILERS or _FIELD.fullmatch(line) is None:
                    raise ProtocolError("malformed or too many trailer fields")
                continue
            size = _CHUNK_SIZE.fullmatch(line)
            if size is None:
                raise ProtocolError(f"bad chunk size {line[:20]!r}")
            self._chunk_left = int(size.group(1), 16)
            self.state = CHUNK_DATA if self._chunk_left else TRAILERS
        self._buffer = buffer[pos:]
        if len(out) == 1:
            return out[0]
        return b"".join(out)


class _Scratch(threading.local):
    """The buffer every upstream read of this thread lands in (one event loop per thread).

    asyncio's socket transport reads a plain Protocol with `recv(256 KiB)`: a 256 KiB
    allocation, returned and shrunk, per read, which costs about 8 µs a read on this
    machine against 0.2 µs for `recv_into` a buffer already there (bench/event_cost.py,
    "recv"). At a GPU's pace every token is one read, so the upstream is read through
    BufferedProtocols instead; what a read brought is copied out before anything else
    runs, so the one buffer per thread is never read twice nor overwritten while in use.
    """

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))
        self.poll = select.poll()  # Connection.quiet's, registered only during one check


_SCRATCH = _Scratch()


class ReadsIntoScratch(asyncio.BufferedProtocol):
    """A BufferedProtocol that hands each read to `data_received` as bytes (see _Scratch)."""

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport's next `recv_into` goes."""
        return _SCRATCH.view

    def buffer_updated(self, nbytes: int) -> None:
        """A read of `nbytes` arrived in the scratch buffer: copy it out, pass it on."""
        self.data_received(bytes(_SCRATCH.view[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """What one read brought (the subclass's)."""
        raise NotImplementedError


class _StreamReaderProtocol(asyncio.StreamReaderProtocol, ReadsIntoScratch):
    """asyncio.open_connection's protocol (its data_received feeds the StreamReader),
    reading through the scratch buffer."""


class Connection:
    """One TCP (or TLS) connection to the upstream."""

    __slots__ = ("closed", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.idle_since = 0.0

    def close(self) -> None:
        """Close now; a read in progress ends with EOF."""
        if not self.closed:
            self.closed = True
            self.writer.close()
            # The peer sees the close at once; the reader sees EOF.
            self.reader.feed_eof()

    def buffered(self) -> int:
        """Bytes the event loop read from the socket that no response claimed."""
        # StreamReader has no public way to ask; its buffer is a bytearray in CPython.
        return len(getattr(self.reader, "_buffer", b""))

    def quiet(self) -> bool:
        """Nothing arrived on this idle connection and the server has not closed it.

        A server owes us nothing between responses: any byte now (a second response, a
        stray "HTTP/1.1 408") would be read as the answer to the next request, and EOF
        means the request would be lost. Checked before each reuse, because a POST is
        never sent twice."""
        if self.closed or self.reader.at_eof() or self.buffered() or self.reader.exception():
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None or self.writer.get_extra_info("sslcontext") is not None:
            return True  # TLS records (session tickets) are no response bytes: trust the reader
        # Bytes (or EOF, or a reset) may be in the kernel that the event loop has not read
        # yet: ask poll(2), which reports any of them as an event. (A MSG_PEEK recv on a
        # borrowed socket object answered the same, at 2.9 µs a check against 0.5 µs, with
        # a getsockname call and, when quiet, an exception; this runs on every reuse.)
        poll = _SCRATCH.poll
        fd = sock.fileno()
        try:
            poll.register(fd, select.POLLIN | select.POLLPRI)
            try:
                return not poll.poll(0)
            finally:
                poll.unregister(fd)
        except (OSError, ValueError):
            return False


class ConnectionPool:
    """Keep-alive connections to one upstream, at most `max_connections` in use at once.

    Waiting for a connection follows asyncio.Semaphore's discipline: first come, first
    served, and a waiter cancelled after it was woken passes its turn to the next one. The
    caller bounds the wait by cancelling it (the request's deadline, or its client leaving).
    """

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
        bracketed = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = bracketed if default_port else f"{bracketed}:{self.port}"
        self.display = f"{bracketed}:{self.port}"
        """Host and port only: what error messages and unauthenticated callers may see (the
        URL may carry `user:password@`)."""
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._now = now
        self._idle: deque[Connection] = deque()  # oldest on the left
        self._open = 0
        self._slots = asyncio.Semaphore(max_connections)
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or busy."""
        return self._open

    @property
    def waiting(self) -> bool:
        """Every connection is in use: an acquire would wait."""
        return self._slots.locked()

    async def acquire(self) -> Connection:
        """A connection for one request: an idle one that is still quiet, or a new one."""
        await self._slots.acquire()
        try:
            now = self._now()
            idle = self._idle
            while idle:
                conn = idle.pop()  # the most recently used: least likely to be stale
                if now - conn.idle_since <= IDLE_TTL and conn.quiet():
                    return conn
                self._discard(conn)
            # Holding a slot, with no idle connection left: fewer than max are open.
            self._open += 1
            try:
                return await self._connect()
            except BaseException:
                self._open -= 1
                raise
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self) -> Connection:
        context = ssl.create_default_context() if self.tls else None
        # asyncio.open_connection, with a protocol that reads into the scratch buffer.
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
        protocol = _StreamReaderProtocol(reader, loop=loop)
        # asyncio.timeout, not wait_for: wait_for runs the connect in a task of its own, one
        # more task per stream (every stream opens a connection, docs/resilience.md).
        async with asyncio.timeout(self.connect_timeout):
            transport, _ = await loop.create_connection(
                lambda: protocol, self.host, self.port, ssl=context
            )
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Connection(reader, writer)

    def release(self, conn: Connection, reusable: bool) -> None:
        """Return a connection after its response was read (or abandoned). Only a response
        read exactly to its end, with nothing after it, leaves a connection reusable."""
        if reusable and not conn.closed and not conn.buffered():
            conn.idle_since = self._now()
            self._idle.append(conn)
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(IDLE_TTL, self._sweep)
        else:
            self._discard(conn)
        self._slots.release()

    def _sweep(self) -> None:
        """Close idle connections past their TTL, closed by the server or sent stray bytes,
        so they do not linger in CLOSE_WAIT holding descriptors when traffic stops."""
        self._sweeper = None
        now = self._now()
        idle = self._idle
        while idle and (now - idle[0].idle_since > IDLE_TTL):
            self._discard(idle.popleft())
        for conn in [c for c in idle if not c.quiet()]:
            idle.remove(conn)
            self._discard(conn)
        if idle:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_TTL / 2, self._sweep)

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._open -= 1

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
    """The final response head (the body stays in the connection's reader). Interim 1xx
    responses (100 Continue, 103 Early Hints, ...) are skipped, at most MAX_INTERIM."""
    for _ in range(MAX_INTERIM + 1):
        try:
            raw = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionLost("the connection closed before a response") from exc
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError("response head too large") from exc
        head = parse_head(raw[:-4])
        if head.status == 101:
            raise ProtocolError("101 Switching Protocols to a request that asked for none")
        if head.status >= 200:
            return head
    raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")
