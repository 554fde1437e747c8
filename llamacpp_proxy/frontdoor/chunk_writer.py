"""A streamed answer's chunks written straight to the client's IOStream, once its head is out.

At a GPU's pace every upstream read is one event and one flush, and Tornado's public write
path per flush (RequestHandler.flush -> HTTP1Connection.write -> IOStream.write) made three
futures and ran their callbacks: 15% of the proxy's CPU beyond the `send` itself
(docs/benchmarks.md, "Where the time went at one event per read"). Below it, a read's bytes
become one chunked frame, sent with one `socket.send` when the IOStream holds nothing unsent
(then nothing else is queued, so nothing can be overtaken); whatever the socket did not take
goes to `IOStream.write`, which queues it, keeps sending it and resolves a future when it is
gone (the only future, and only when the client is slower than llama.cpp).

What this relies on in Tornado is named in `TORNADO_NAMES` and checked here once per
response (`direct_stream`): if any of it is missing (a Tornado that changed its internals),
or the response is not one this can frame alike (not chunked: an HTTP/1.0 client; a
transform such as gzip; TLS, whose socket `send` has its own rules), the handler keeps
Tornado's public path, byte for byte what it always sent. The head (status, headers,
Transfer-Encoding), the terminating `0\\r\\n\\r\\n` (`finish()`), the access log and
keep-alive stay Tornado's: only the chunks between them are written here.
"""

from __future__ import annotations

import socket
from typing import Any

from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, SSLIOStream

TORNADO_NAMES: dict[str, tuple[str, ...]] = {
    # RequestHandler: the head is out; nothing buffered in the handler that must go first;
    # not finished; no output transforms (gzip) that would change the bytes.
    "tornado.web.RequestHandler": ("_headers_written", "_write_buffer", "_finished", "_transforms"),
    # HTTP1Connection: the response is chunked (HTTP/1.1, no Content-Length); its stream.
    "tornado.http1connection.HTTP1Connection": ("_chunking_output", "stream"),
    # IOStream: public API, plus the socket it writes to.
    "tornado.iostream.IOStream": ("socket", "writing", "closed", "write", "write_to_fd"),
}
"""The attribute names of Tornado this module touches (tests/test_chunk_writer.py pins them
on a live response, so a Tornado upgrade that renames one fails loudly there)."""


def direct_stream(handler: Any) -> tuple[IOStream, socket.socket | None] | None:
    """The client's IOStream, and its socket when frames may be sent on it directly (None:
    queue them with IOStream.write), if this response's chunks may bypass Tornado's public
    write path; None keeps the public path. Asked once per response, after its head."""
    if (
        getattr(handler, "_headers_written", None) is not True
        or getattr(handler, "_finished", None) is not False
        or getattr(handler, "_transforms", None)  # gzip, or an unknown Tornado
        or type(getattr(handler, "_write_buffer", None)) is not list
        or handler.request.method == "HEAD"
    ):
        return None
    connection = handler.request.connection
    if not isinstance(connection, HTTP1Connection):
        return None
    if getattr(connection, "_chunking_output", None) is not True:
        return None  # an HTTP/1.0 client: no chunked framing, Tornado writes it raw
    stream = getattr(connection, "stream", None)
    if not isinstance(stream, IOStream) or stream.closed():
        return None
    if isinstance(stream, SSLIOStream) or type(stream).write_to_fd is not IOStream.write_to_fd:
        # TLS (SSLIOStream): after a would-block, OpenSSL wants the same bytes again, which
        # only Tornado's own write loop guarantees; a stream that writes to its socket its
        # own way: let it. Frames are queued with IOStream.write there. (The proxy's own
        # _ClientStream only keeps TCP_NODELAY on: its bytes go out as IOStream's do.)
        return stream, None
    sock = getattr(stream, "socket", None)
    if not isinstance(sock, socket.socket):
        return stream, None
    return stream, sock
