"""A client's deadlines for a request head and body, as one timer per stage.

Tornado bounds both reads itself when its server is given `idle_connection_timeout` and
`body_timeout`: it wraps each read in `gen.with_timeout`, which costs about 12 µs a read
against 2 µs for a timer (a converted future, a chained future, a timeout handle), and
turns the body read into a task of its own, one more event-loop turn before the handler
sees the body. Two of those per request were about a tenth of the proxy's CPU per
non-streamed request. So the server gives Tornado no timeouts (ProxyServer) and this
delegate, wrapped around each request's, keeps the same promises with a timer:

- from the moment the connection waits for a request (its first, or the next on a kept-alive
  connection) until the head is in: `--client-idle-timeout`; then the connection is closed,
  as Tornado closes it;
- from the moment the head was taken (the handler's `prepare` done, for a handler that
  streams its body) until the body is in: `--client-body-timeout`; then the connection is
  closed and the timeout logged at INFO, as Tornado does.
"""

from __future__ import annotations

import asyncio
import logging
import select
import weakref
from collections.abc import Awaitable
from functools import partial
from typing import Any

from tornado import httputil
from tornado.http1connection import HTTP1Connection

log = logging.getLogger("tornado.general")  # where Tornado logs its own body timeout


class ClientDeadlines(httputil.HTTPMessageDelegate):
    """Wraps one request's delegate; closes the connection when a stage outlives its time."""

    __slots__ = ("_body_timeout", "_conn", "_idle", "_inner", "_key", "_timer")

    def __init__(
        self,
        inner: httputil.HTTPMessageDelegate,
        conn: httputil.HTTPConnection,
        head_timeout: float,
        body_timeout: float | None,
        idle: dict[object, ClientDeadlines] | None = None,
        key: object = None,
    ) -> None:
        self._inner = inner
        self._conn = conn
        self._body_timeout = body_timeout
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            head_timeout, self._head_expired
        )
        # Connections waiting for a head, oldest first: the server closes the oldest of
        # them that has sent nothing when a new client waits at its connection cap.
        self._idle = idle
        self._key = key
        if idle is not None:
            idle[key] = self

    def _busy(self) -> None:
        if self._idle is not None:
            self._idle.pop(self._key, None)
            self._idle = None

    @property
    def head_due(self) -> float | None:
        """When the head's deadline passes (loop time), while the head is awaited."""
        return None if self._timer is None or self._idle is None else self._timer.when()

    def reclaim(self) -> bool:
        """Close this connection if it is idle: waiting for a head of which nothing came,
        neither read nor waiting in the kernel (a request on its way is never cut).
        True if it was closed."""
        self._busy()
        stream: Any = getattr(self._conn, "stream", None)
        sock: Any = getattr(stream, "socket", None)
        # Read but not yet parsed (a Tornado without the name: taken as busy, never cut).
        buffered: Any = getattr(stream, "_read_buffer_size", 1)
        if sock is None or buffered:
            return False
        poll = select.poll()
        try:
            poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)
            if poll.poll(0):
                return False  # bytes (a request), EOF or a reset: its read will see to it
        except (OSError, ValueError):
            return False
        self._cancel()
        self._body_timeout = None
        self._conn.close()  # type: ignore[attr-defined]
        return True

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        """The head is in: its timer ends; the body's starts once the handler took it."""
        self._cancel()
        self._busy()
        if start_line.version == "HTTP/1.0" and isinstance(self._conn, HTTP1Connection):
            _close_after_an_unframed_answer(self._conn, start_line, headers)
        taken = self._inner.headers_received(start_line, headers)
        if self._body_timeout is not None:
            if asyncio.isfuture(taken):  # a handler that streams its body: its prepare()
                taken.add_done_callback(self._start_body_timer)
            else:
                self._start_body_timer()
        return taken

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        """A piece of the body (the handler's)."""
        return self._inner.data_received(chunk)

    def finish(self) -> None:
        """The body is in."""
        self._cancel()
        self._body_timeout = None  # a body timer not started yet must not start now
        self._inner.finish()

    def on_connection_close(self) -> None:
        """The connection closed before the request was in."""
        self._cancel()
        self._busy()
        self._body_timeout = None
        self._inner.on_connection_close()

    def connection_ended(self) -> None:
        """The connection ended with no request in progress (the client closed it while
        the head was awaited, or sent a malformed one): Tornado tells no request delegate
        then, and the head's timer would hold the connection for --client-idle-timeout."""
        self._cancel()
        self._busy()
        self._body_timeout = None

    def _start_body_timer(self, _: Any = None) -> None:
        if self._body_timeout is not None and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._body_timeout, self._body_expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        self._timer = None
        self._busy()
        self._conn.close()  # type: ignore[attr-defined]

    def _body_expired(self) -> None:
        self._timer = None
        log.info("Timeout reading body from %s", getattr(self._conn, "context", "a client"))
        self._conn.close()  # type: ignore[attr-defined]


def _close_after_an_unframed_answer(
    conn: HTTP1Connection,
    start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
    headers: httputil.HTTPHeaders,
) -> None:
    """An HTTP/1.0 request: an answer without Content-Length (a stream: chunking is HTTP/1.1)
    ends where the connection does, so the connection must close after it. Tornado (6.4-6.6)
    keeps it open when the client asked `Connection: keep-alive` (its keep-alive decision
    reads the request alone) and answers `Connection: Keep-Alive`: the client then waited
    for an end that never came, --client-idle-timeout long. Only such requests get this
    hook; the answer's head decides (an answer with a length keeps the connection)."""
    if headers.get("Connection", "").lower() != "keep-alive":
        return  # Tornado closes after the answer already
    method = getattr(start_line, "method", "")
    # A weak reference: a strong one in the connection's own attribute would be a cycle.
    conn.write_headers = partial(  # type: ignore[method-assign]
        _write_headers_closing_unframed, weakref.ref(conn), headers, method
    )


def _write_headers_closing_unframed(
    ref: weakref.ref[HTTP1Connection],
    request_headers: httputil.HTTPHeaders,
    method: str,
    start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
    headers: httputil.HTTPHeaders,
    chunk: bytes | None = None,
) -> Any:
    conn = ref()
    assert conn is not None  # it is calling this
    code = getattr(start_line, "code", 200)
    if (
        "Content-Length" not in headers
        and method != "HEAD"
        and code >= 200
        and code not in (204, 304)
    ):
        request_headers["Connection"] = "close"  # so Tornado does not answer Keep-Alive
        headers["Connection"] = "close"
        conn._disconnect_on_finish = True  # Tornado's own flag: close once it is written
    return HTTP1Connection.write_headers(conn, start_line, headers, chunk)
