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
import errno
import os
import re
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from ..errors import drop_tracebacks

MAX_HEAD = 64 * 1024  # the status line and headers of one response
MAX_HEADERS = 100  # header fields in one head
MAX_INTERIM = 8  # 1xx responses skipped before the final one
MAX_CHUNK_LINE = 1024  # a chunk-size line, extensions included
MAX_TRAILERS = 32  # trailer fields after the last chunk
READ_SIZE = 64 * 1024
# llama.cpp's HTTP server drops idle keep-alive connections after 5 s; a wide margin, since a
# busy machine may delay a send by a second or more after the connection was picked.
IDLE_TTL = 2.5
SPARE_DELAY = 0.005
"""Seconds from a request taking a connection to the spare's connect. Opened at once (on the
next loop turn, right after the request was sent), the connect made llama-server's HTTP
threads accept it while they took the request: its response head came 0.11-0.13 ms later
(tcpdump, 2 cores). Five ms later llama.cpp is evaluating the prompt, on its own thread."""
LOOKUP_TTL = 10.0
"""Seconds a host name's addresses are reused (aiohttp's default, `ttl_dns_cache`): every
stream opens a connection, and `http://localhost:8080` would otherwise cost a getaddrinfo
in the executor's thread (a thread hand-off each way) per stream."""

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
    "recv"). At a GPU's pace every token is one read, so a Connection reads with
    `recv_into` this buffer; what a read brought is copied out before anything else runs,
    so the one buffer per thread is never read twice nor overwritten while in use.
    """

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))
        self.poll = select.poll()  # Connection.quiet's, registered only during one check


_SCRATCH = _Scratch()
_ORPHANED: set[asyncio.Future[None]] = set()
"""Client writes a read handed back after it ended its own call (_feed_body)."""

# Connection states: what the receiver does with the bytes a read brings.
IDLE = "idle"  # no response expected: a byte now is stray (the connection is not reused)
HEAD = "head"  # reading a response head (interim 1xx skipped)
HEADED = "headed"  # the head was handed over; what follows waits for read_body
BODY = "body"  # feeding the body decoder
FAILED = "failed"  # the response failed or was cut short: reading stopped, never reused

BodySink = Callable[[bytes], "Awaitable[None] | None"]
"""Receives a streamed body read by read; may return an awaitable that resolves once the
client has taken what was passed on (backpressure)."""


class Connection:
    """One plain TCP connection to the upstream: a non-blocking socket driven by the event
    loop's readiness callbacks, with ONE receiver for the head and then the body.

    asyncio's open_connection stacked a transport, a StreamReader, a StreamWriter and
    their futures on every connection, and every stream opens one (llama-server closes a
    stream's connection, docs/resilience.md): 87-111 µs of CPU per connect and close of
    which the system calls were 14-20 (bench/connect_cost.py). Here a read is `recv_into`
    the scratch buffer and goes straight to the head parser or the body decoder; the
    caller awaits one future for the head and, if the body is not already in, one for the
    body, never one per read. TLSConnection keeps this receiver and changes only the pipe.
    """

    __slots__ = (
        "_backlog",
        "_buffer",
        "_complete",
        "_decoder",
        "_eof",
        "_error",
        "_fd",
        "_interims",
        "_limit",
        "_loop",
        "_lost_with",
        "_on_body",
        "_out",
        "_pieces",
        "_progress",
        "_reading",
        "_size",
        "_sock",
        "_state",
        "_view",
        "_waiter",
        "closed",
        "head",
        "idle_since",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno() if sock is not None else -1
        self._view = _SCRATCH.view  # this thread's: a connection lives on one loop
        self.closed = False
        self.idle_since = 0.0
        self.head: ResponseHead | None = None
        self._state = IDLE
        self._buffer = b""  # a head in parts; body bytes not yet claimed; stray bytes
        self._eof = False  # the peer closed (or reset) its side
        self._lost_with: Exception | None = None  # the reset, if it was one
        self._error: BaseException | None = None  # why the response failed, once it did
        self._reading = False
        self._out: memoryview | None = None  # the part of a request the kernel has not taken
        self._waiter: asyncio.Future[None] | None = None
        self._interims = 0
        self._decoder: BodyDecoder | None = None
        self._on_body: BodySink | None = None
        self._progress: Callable[[], None] | None = None
        self._backlog: asyncio.Future[None] | None = None
        self._pieces: list[bytes] = []
        self._size = 0
        self._limit = 0
        self._complete = True
        if sock is not None:
            self._resume()

    # -- the pipe: a plain socket (TLSConnection overrides these) ----------------------

    def _resume(self) -> None:
        if not self._reading and not self._eof and not self.closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _read_ready(self) -> None:
        try:
            size = self._sock.recv_into(self._view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # a reset
            self._lost(exc)
            return
        if size:
            self._received(bytes(self._view[:size]))
        else:
            self._lost(None)

    def send(self, data: bytes) -> None:
        """Write a request: what the kernel takes now, the rest as the socket drains (a
        large prompt). Raises OSError if the connection is already broken."""
        if self.closed:
            raise ConnectionLost("the connection was closed")
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            self._out = memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._write_ready)

    def _write_ready(self) -> None:
        out = self._out
        if out is None:
            return
        try:
            sent = self._sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._stop_writing()
            self._lost(exc)
            return
        if sent == len(out):
            self._stop_writing()
        else:
            self._out = out[sent:]

    def _stop_writing(self) -> None:
        if self._out is not None:
            self._out = None
            self._loop.remove_writer(self._fd)

    @property
    def writing(self) -> bool:
        """Part of the request is still waiting for the kernel to take it."""
        return self._out is not None

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return -1 if self.closed else self._fd

    def _close_pipe(self) -> None:
        self._pause()
        self._stop_writing()
        self._sock.close()

    def quiet(self) -> bool:
        """Nothing arrived on this idle connection and the server has not closed it.

        A server owes us nothing between responses: any byte now (a second response, a
        stray "HTTP/1.1 408") would be read as the answer to the next request, and EOF
        means the request would be lost. Checked before each reuse, because a POST is
        never sent twice."""
        if not self.idle:
            return False
        # Bytes (or EOF, or a reset) may be in the kernel that the event loop has not read
        # yet: ask poll(2), which reports any of them as an event. (A MSG_PEEK recv on a
        # borrowed socket object answered the same, at 2.9 µs a check against 0.5 µs, with
        # a getsockname call and, when quiet, an exception; this runs on every reuse.)
        poll = _SCRATCH.poll
        fd = self._fd
        try:
            poll.register(fd, select.POLLIN | select.POLLPRI)
            try:
                return not poll.poll(0)
            finally:
                poll.unregister(fd)
        except (OSError, ValueError):
            return False

    # -- the receiver ------------------------------------------------------------------

    @property
    def held_back(self) -> bool:
        """Not reading because the client has not taken what was written to it yet."""
        return self._backlog is not None

    @property
    def idle(self) -> bool:
        """Between responses with nothing read, written or known wrong: reusable as far
        as this process knows (quiet() asks the kernel too)."""
        return (
            self._state is IDLE
            and not self.closed
            and not self._eof
            and not self._buffer
            and not self.writing
        )

    def buffered(self) -> int:
        """Bytes read from the socket that no response claimed."""
        return len(self._buffer)

    def forget_failure(self) -> None:
        """The exchange is over and its failure handled: drop the error's tracebacks (they
        hold the frames that held this connection: a reference cycle)."""
        drop_tracebacks(self._error)
        drop_tracebacks(self._lost_with)

    def close(self) -> None:
        """Close now: the peer sees it at once (llama.cpp stops generating); a response
        being read ends with ConnectionLost."""
        if self.closed:
            return
        self._close_pipe()
        self.closed = True
        backlog = self._backlog
        if backlog is not None:  # a client's write still pending runs its course alone
            self._backlog = None
            backlog.remove_done_callback(self._written)
        if self._state is not IDLE:
            self._fail(ConnectionLost("the connection was closed"))

    def _received(self, data: bytes) -> None:
        state = self._state
        if state is BODY:
            self._feed_body(data)
        elif state is HEAD:
            self._buffer += data
            self._parse_head()
        elif state is HEADED:
            self._buffer += data  # claimed by read_body, which the caller runs next
            if len(self._buffer) > MAX_HEAD:
                self._pause()
        elif state is IDLE:
            self._buffer += data  # stray: the connection will not be reused
            self._pause()
        else:
            self._pause()

    def _lost(self, exc: Exception | None) -> None:
        """The peer closed its side (exc None) or reset the connection."""
        if self._eof:
            return
        self._eof = True
        self._lost_with = exc
        self._pause()
        state = self._state
        if state is BODY:
            self._body_lost()
        elif state is HEAD:
            self._fail(exc or ConnectionLost("the connection closed before a response"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._state = FAILED
        self._pause()
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    async def read_head(self) -> ResponseHead:
        """The final response head to the request just sent (its body stays for
        read_body). Interim 1xx responses (100 Continue, 103 Early Hints, ...) are
        skipped, at most MAX_INTERIM."""
        if self._error is not None:
            raise self._error
        if self.closed:
            raise ConnectionLost("the connection was closed")
        self.head = None
        self._interims = 0
        self._state = HEAD
        if self._buffer:
            self._parse_head()
        if self._eof and self._state is HEAD:
            self._fail(self._lost_with or ConnectionLost("the connection closed before a response"))
        if self._state is HEAD:
            self._resume()
            await self._wait()
        elif self._error is not None:
            raise self._error
        assert self.head is not None
        return self.head

    def _parse_head(self) -> None:
        buffer = self._buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                if end > MAX_HEAD or len(buffer) > MAX_HEAD:
                    self._fail(ProtocolError("response head too large"))
                self._buffer = buffer
                return
            try:
                head = parse_head(buffer[:end])
                if head.status == 101:
                    raise ProtocolError("101 Switching Protocols to a request that asked for none")
                if head.status < 200:
                    self._interims += 1
                    if self._interims > MAX_INTERIM:
                        raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")
            except ProtocolError as exc:
                self._buffer = b""
                self._fail(exc)
                return
            buffer = buffer[end + 4 :]
            if head.status >= 200:
                self._buffer = buffer
                self.head = head
                self._state = HEADED
                self._wake()
                return

    async def read_body(
        self,
        decoder: BodyDecoder,
        limit: int = 0,
        on_body: BodySink | None = None,
        progress: Callable[[], None] | None = None,
    ) -> tuple[bytes, bool]:
        """The body after read_head's head, decoded by `decoder`: (body, complete).

        Without `on_body` it is collected, and cut (complete False, reading stopped) once
        more than `limit` bytes came. With `on_body` each read's body bytes go to it from
        the event loop's callback, and while the awaitable it may return (the client's
        backlog) is pending, the socket is not read (llama.cpp is held back instead of its
        output buffered without bound); `progress` runs when reading resumes. Raises
        ConnectionLost if the body does not end where its framing says (or a reset's
        OSError, a ProtocolError, on_body's exception)."""
        if self._error is not None:
            raise self._error
        if self._state is not HEADED:
            raise ConnectionLost("no response head was read")
        self._decoder = decoder
        self._on_body = on_body
        self._progress = progress
        self._pieces = []
        self._size = 0
        self._limit = limit
        self._complete = True
        self._state = BODY
        try:
            if decoder.state is DONE:
                self._body_done()
            elif self._buffer:
                buffered, self._buffer = self._buffer, b""
                self._feed_body(buffered)
            if self._state is BODY and self._backlog is None:
                if self._eof:
                    self._body_lost()
                else:
                    self._resume()
            if self._state is BODY:
                await self._wait()
            elif self._error is not None:
                raise self._error
            pieces = self._pieces
            return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), self._complete
        finally:
            self._pieces = []
            self._on_body = self._progress = None

    def _feed_body(self, data: bytes) -> None:
        decoder = self._decoder
        assert decoder is not None
        on_body = self._on_body
        backlog = None
        try:
            piece = decoder.feed(data)
            if on_body is not None:
                if piece:
                    backlog = on_body(piece)
            elif piece:
                self._pieces.append(piece)
                self._size += len(piece)
                if self._size > self._limit:
                    # Enough of it: the caller decides what a cut body means.
                    self._complete = False
                    self._state = FAILED
                    self._pause()
                    self._wake()
                    return
        except Exception as exc:
            self._fail(exc)
            return
        if self._state is not BODY:  # on_body ended the call (closed this connection)
            if backlog is not None:  # the client's write it handed back runs its course
                orphan = asyncio.ensure_future(backlog)
                _ORPHANED.add(orphan)  # held until done: the loop keeps only weak references
                orphan.add_done_callback(_ORPHANED.discard)
            return
        if backlog is not None:
            self._pause()
            self._backlog = future = asyncio.ensure_future(backlog)
            future.add_done_callback(self._written)
        elif decoder.state is DONE:
            self._body_done()

    def _body_done(self) -> None:
        # Reading goes on: a byte after the end is stray and keeps the connection from
        # reuse (release checks `idle`).
        self._state = IDLE
        self._wake()

    def _body_lost(self) -> None:
        if self._backlog is not None:
            return  # reported once the client's backlog is written (_written)
        decoder = self._decoder
        if decoder is not None and decoder.until_eof and self._lost_with is None:
            self._body_done()
        else:
            self._fail(self._lost_with or ConnectionLost("closed before the response was complete"))

    def _written(self, backlog: asyncio.Future[None]) -> None:
        self._backlog = None
        if self._state is not BODY:
            return
        error = None if backlog.cancelled() else backlog.exception()
        decoder = self._decoder
        if error is not None:
            self._fail(error)
        elif decoder is not None and decoder.state is DONE:
            self._body_done()
        elif self._eof:
            self._body_lost()
        else:
            if self._progress is not None:
                self._progress()
            self._resume()


class TLSConnection(Connection, asyncio.BufferedProtocol):
    """A TLS connection: Connection's receiver as the BufferedProtocol of asyncio's TLS
    transport (https upstreams are rare: llama.cpp runs on loopback or a LAN)."""

    __slots__ = ("_transport",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._transport: asyncio.Transport | None = None
        super().__init__(loop, cast(socket.socket, None))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The TLS handshake is done; the transport reads from now on."""
        self._transport = cast(asyncio.Transport, transport)
        self._reading = True

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport's next read goes (the scratch buffer)."""
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        """A read of `nbytes` arrived in the scratch buffer."""
        self._received(bytes(self._view[:nbytes]))

    def eof_received(self) -> bool | None:
        """The upstream closed its side."""
        self._lost(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport closed (by us, by the peer, or on an error)."""
        if not self.closed:
            self._lost(exc)

    def _resume(self) -> None:
        if not self._reading and not self._eof and not self.closed and self._transport:
            self._reading = True
            self._transport.resume_reading()

    def _pause(self) -> None:
        if self._reading and self._transport is not None:
            self._reading = False
            if not self._transport.is_closing():
                self._transport.pause_reading()

    def send(self, data: bytes) -> None:
        """Write a request (the transport buffers what the kernel does not take)."""
        if self.closed or self._transport is None or self._transport.is_closing():
            raise ConnectionLost("the connection was closed")
        self._transport.write(data)

    @property
    def writing(self) -> bool:
        """Part of the request is still waiting for the kernel to take it.

        The TLS transport's own count holds only what is not yet encrypted: the records
        wait in the TCP transport below it (asyncio's sslproto hands them all on at once),
        so that one is asked too, where this Python has it where 3.11-3.13 do."""
        transport = self._transport
        if transport is None:
            return False
        below = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
        return transport.get_write_buffer_size() > 0 or (
            below is not None and below.get_write_buffer_size() > 0
        )

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        sock = None if self._transport is None else self._transport.get_extra_info("socket")
        return -1 if self.closed or sock is None else int(sock.fileno())

    def _close_pipe(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def quiet(self) -> bool:
        """Nothing arrived on this idle connection (TLS records such as session tickets
        are no response bytes, so the receiver's word is taken, not the kernel's)."""
        return self.idle and not self._transport.is_closing()  # type: ignore[union-attr]


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
        ssl_context: ssl.SSLContext | None = None,
        spares: int = 0,
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
        self._ssl = ssl_context or (ssl.create_default_context() if self.tls else None)
        # A literal IP (llama.cpp on loopback or a LAN) needs no lookup per connection.
        self._addresses: list[tuple[int, tuple[Any, ...]]] | None = None
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(family, self.host)
            except OSError:
                continue
            self._addresses = [(family, (self.host, self.port))]
            break
        self._looked_up: tuple[float, list[tuple[int, tuple[Any, ...]]]] | None = None
        self._known: list[tuple[int, tuple[Any, ...]]] | None = None
        """The last lookup's addresses, kept when connects fail (`reachable`)."""
        self._now = now
        self._idle: deque[Connection] = deque()  # oldest on the left
        self._open = 0
        self._slots = asyncio.Semaphore(max_connections)
        self._sweeper: asyncio.TimerHandle | None = None
        self.spares = spares
        """Idle connections opened ahead of need after a stream took one (it never gives
        its connection back), so that the next request skips the connect."""
        self._sparing = 0  # spare connects scheduled or in flight
        self._spare_tasks: set[asyncio.Future[None]] = set()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or busy."""
        return self._open

    @property
    def waiting(self) -> bool:
        """Every connection is in use: an acquire would wait."""
        return self._slots.locked()

    async def acquire(
        self, spare: bool = False, connecting: Callable[[], None] | None = None
    ) -> Connection:
        """A connection for one request: an idle one that is still quiet, or a new one.
        `spare`: the request will not give it back (a stream: llama-server closes its
        connection), so the pool opens one for the next request (`_top_up`). A request
        that gives its connection back leaves that one for the next: it asks for none.
        `connecting` is called when the wait for a slot is over and a new connection is
        being opened (what a deadline that ends now was spent on)."""
        await self._slots.acquire()
        try:
            now = self._now()
            idle = self._idle
            while idle:
                conn = idle.pop()  # the most recently used: least likely to be stale
                if now - conn.idle_since <= IDLE_TTL and conn.quiet():
                    if spare:
                        self._top_up()
                    return conn
                self._discard(conn)
            # Holding a slot, with no idle connection left: fewer than max are open.
            self._open += 1
            if connecting is not None:
                connecting()
            try:
                conn = await self._connect()
            except BaseException:
                self._open -= 1
                raise
            if spare:
                self._top_up()
            return conn
        except BaseException:
            self._slots.release()
            raise

    def _top_up(self) -> None:
        """After a stream took a connection: one more spare, SPARE_DELAY later (so the
        connect is off the taker's way and off llama.cpp's while it takes the taker's
        request), if fewer than `spares` are idle or on their way. One per take: more than
        one builds up only while requests come faster than they end. A spare lives like
        any idle connection: IDLE_TTL, then closed, so none is held once requests stop."""
        if len(self._idle) + self._sparing < self.spares:
            self._sparing += 1
            asyncio.get_running_loop().call_later(SPARE_DELAY, self._open_spare)

    def _open_spare(self) -> None:
        task = asyncio.ensure_future(self._spare())
        self._spare_tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._spare_tasks.discard)

    async def _spare(self) -> None:
        try:
            # Never wait for a slot: a spare is for when one is free. Asked again now, not
            # when it was scheduled: a quick answer may have given its connection back
            # since (the idle one the spare was for), and idle connections hold no slot,
            # so a free slot alone would open one past max_connections.
            if (
                self._closed
                or self._slots.locked()
                or len(self._idle) >= self.spares
                or self._open >= self.max_connections
            ):
                return
            await self._slots.acquire()  # free now: takes it without waiting
            self._open += 1
            try:
                conn = await self._connect()
            except BaseException:
                # llama.cpp down or slow: the next request connects (and reports it) itself.
                self._open -= 1
                self._slots.release()
                return
            if self._closed:  # closed while connecting
                conn.close()
                self._open -= 1
                self._slots.release()
                return
            self.release(conn, True)
        finally:
            self._sparing -= 1

    async def reachable(self) -> bool:
        """False only when nothing takes a plain TCP connection at the server's address
        within the connect timeout (refused, or no answer): its machine or network is gone.
        No TLS handshake (a hung server's kernel still completes TCP's), and the addresses
        of the last lookup, not the resolver's word: a resolver that fails says nothing of
        a server this pool is connected to (never looked up and no resolver: True, since
        nothing says it is gone)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        addresses = self._addresses or self._known
        if not addresses:
            try:
                addresses = await self._lookup(deadline)
            except (OSError, TimeoutError):
                return True
        for family, address in addresses:
            try:
                conn = await _open(loop, family, address, deadline)
            except TimeoutError:
                return False
            except OSError:
                continue
            conn.close()
            return True
        return False

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        # One deadline for the lookup, the connect (and the TLS handshake).
        deadline = loop.time() + self.connect_timeout
        if self._ssl is not None:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: TLSConnection(loop), self.host, self.port, ssl=self._ssl
                )
            sock = conn._transport.get_extra_info("socket") if conn._transport else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        addresses = self._addresses or await self._lookup(deadline)
        errors: list[OSError] = []
        for i, (family, address) in enumerate(addresses):  # the resolver's order
            try:
                opened = await _open(loop, family, address, deadline)
            except TimeoutError:
                raise
            except OSError as exc:
                errors.append(exc)
                continue
            looked_up = self._looked_up
            if i and looked_up is not None and looked_up[1] is addresses:
                # `localhost` is ::1 first, and llama-server listens on 127.0.0.1 alone:
                # the next connections try the address that answered first. A new list,
                # never the old one reordered: other connects may be walking it now, and
                # would try a refused address twice and skip the one that answers.
                answered = [addresses[i], *addresses[:i], *addresses[i + 1 :]]
                self._looked_up = (looked_up[0], answered)
            return opened
        self._looked_up = None  # none of them answered: ask the resolver again next time
        raise errors[0] if errors else OSError(f"no address for {self.display}")

    async def _lookup(self, deadline: float) -> list[tuple[int, tuple[Any, ...]]]:
        """The host name's addresses, looked up at most once per LOOKUP_TTL."""
        now = self._now()
        if self._looked_up is not None and now - self._looked_up[0] < LOOKUP_TTL:
            return self._looked_up[1]
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            found = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        addresses: list[tuple[int, tuple[Any, ...]]] = [
            (family, address) for family, _, _, _, address in found
        ]
        if addresses:
            self._looked_up = (now, addresses)
            self._known = addresses
        return addresses

    def release(self, conn: Connection, reusable: bool) -> None:
        """Return a connection after its response was read (or abandoned). Only a response
        read exactly to its end, with nothing after it, leaves a connection reusable."""
        if reusable and conn.idle:
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
        self._closed = True
        for task in self._spare_tasks:
            if not task.done():
                task.cancel()
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


async def _open(
    loop: asyncio.AbstractEventLoop, family: int, address: tuple[Any, ...], deadline: float
) -> Connection:
    """A plain connection to `address`, connected by `deadline` (TimeoutError if not)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(address)
        if error in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
            # On loopback the handshake is over by the time connect returns: asked first,
            # that spares the writer's registration and a loop turn on every stream's way.
            if not _writable(sock):
                fd = sock.fileno()
                connected: asyncio.Future[None] = loop.create_future()
                loop.add_writer(fd, _settle, connected, None)
                timer = loop.call_at(deadline, _settle, connected, TimeoutError())
                try:
                    await connected
                finally:
                    timer.cancel()
                    loop.remove_writer(fd)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            # OSError(errno, ...) is ConnectionRefusedError and its kin, as connect raises.
            raise OSError(error, f"connect to {address[0]} port {address[1]}: {os.strerror(error)}")
        return Connection(loop, sock)
    except BaseException:
        sock.close()
        raise


def _writable(sock: socket.socket) -> bool:
    """The socket is writable now (a connect in progress has ended, one way or the other)."""
    poll = _SCRATCH.poll
    fd = sock.fileno()
    poll.register(fd, select.POLLOUT)
    try:
        return bool(poll.poll(0))
    finally:
        poll.unregister(fd)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
