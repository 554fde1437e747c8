#!/usr/bin/env python3
"""Microseconds of this process's CPU per upstream connection opened and closed, in-process:
every stream opens one (llama-server closes a stream's connection, docs/resilience.md). A
listener in another process accepts and closes, so its CPU is not counted here.

    .venv/bin/python bench/connect_cost.py [N]

Paths: the bare system calls (socket, connect, close: the floor); the pool's connect as it
was (asyncio.wait_for around create_connection(host, port)); and the pool's `_connect` now
(create_connection under asyncio.timeout). Connecting a literal IP's socket by hand
(sock_connect, then create_connection(sock=...)) measured no better than the latter, so the
pool does not: what is left is asyncio's transport set-up and teardown, not the lookup.
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
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(1024)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""


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

    async def before() -> None:
        reader = asyncio.StreamReader(limit=http.MAX_HEAD, loop=loop)
        protocol = http._StreamReaderProtocol(reader, loop=loop)
        connect = loop.create_connection(lambda: protocol, *address)
        transport, _ = await asyncio.wait_for(connect, 5)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        http.Connection(reader, writer).close()

    pool = http.ConnectionPool(f"http://127.0.0.1:{port}", 64, 5.0)

    async def pool_now() -> None:
        (await pool._connect()).close()

    paths = {
        "system calls only": syscalls,
        "wait_for + create_connection (before)": before,
        "pool._connect now (asyncio.timeout)": pool_now,
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
