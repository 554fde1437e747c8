#!/usr/bin/env python3
"""Microseconds of this process's CPU per upstream connection opened and closed, in-process:
every stream opens one (llama-server closes a stream's connection, docs/resilience.md). A
listener in another process accepts and closes (or, for the request paths, reads a request
and answers it), so its CPU is not counted here.

    .venv/bin/python bench/connect_cost.py [N]

Paths: the bare system calls (socket, connect, close: the floor); asyncio's open_connection
as the pool used it up to `5c5dbff` (create_connection with a StreamReaderProtocol under
asyncio.timeout, a StreamWriter, TCP_NODELAY, close); the pool's `_connect` now (a socket of
our own, upstream/http.py Connection) and close; then a whole request on a new connection
(connect, send, head, a small Content-Length body, close), asyncio's way (StreamReader
readuntil + read) against the Connection's (read_head + read_body).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamacpp_proxy.upstream import http

LISTENER = """
import socket, threading
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(1024)
print(s.getsockname()[1], flush=True)
def serve(c):
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        got = c.recv(65536)
        if not got:
            break
        data += got
    if data:
        c.sendall(ANSWER)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
_VIEW = memoryview(bytearray(http.READ_SIZE))


class _StreamReaderProtocol(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """The protocol the pool used up to 5c5dbff: a StreamReader's, reading with recv_into
    one scratch buffer."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_VIEW[:nbytes]))


async def main(n: int) -> None:
    listener = subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE)
    assert listener.stdout is not None
    port = int(listener.stdout.readline())
    address = ("127.0.0.1", port)
    loop = asyncio.get_running_loop()

    async def syscalls() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(BlockingIOError):
            sock.connect(address)
        sock.close()

    async def open_asyncio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader(limit=http.MAX_HEAD, loop=loop)
        protocol = _StreamReaderProtocol(reader, loop=loop)
        async with asyncio.timeout(5):
            transport, _ = await loop.create_connection(lambda: protocol, *address)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    def close_asyncio(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        reader.feed_eof()

    async def asyncio_connect() -> None:
        close_asyncio(*await open_asyncio())

    async def asyncio_request() -> None:
        reader, writer = await open_asyncio()
        writer.write(REQUEST)
        raw = await reader.readuntil(b"\r\n\r\n")
        head = http.parse_head(raw[:-4])
        decoder = http.BodyDecoder(head, "GET")
        while not decoder.done:
            data = await reader.read(http.READ_SIZE)
            if not data:
                break
            decoder.feed(data)
        close_asyncio(reader, writer)

    pool = http.ConnectionPool(f"http://127.0.0.1:{port}", 64, 5.0)

    async def pool_now() -> None:
        (await pool._connect()).close()

    async def pool_request() -> None:
        conn = await pool._connect()
        conn.send(REQUEST)
        head = await conn.read_head()
        await conn.read_body(http.BodyDecoder(head, "GET"), 1024)
        conn.close()

    paths = {
        "system calls only": syscalls,
        "connect + close, asyncio open_connection (5c5dbff)": asyncio_connect,
        "connect + close, Connection (now)": pool_now,
        "connect + request + close, asyncio (5c5dbff)": asyncio_request,
        "connect + request + close, Connection (now)": pool_request,
    }
    try:
        for _ in range(2):  # the second round is the one to read
            for name, path in paths.items():
                start = time.process_time()
                for _ in range(n):
                    await path()
                    await asyncio.sleep(0)  # the close completes on the next iteration
                await asyncio.sleep(0.05)
                print(f"{(time.process_time() - start) / n * 1e6:7.1f} µs  {name}")
            print()
    finally:
        listener.kill()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000))
