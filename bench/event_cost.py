#!/usr/bin/env python3
"""Microseconds per streamed event spent in the proxy's pure per-event code, in-process:
the chunked-body decoder, the SSE decoder, the event's JSON parse and check, and the
OpenAI chunk encoding, each fed one whole event per call (as at a GPU's pace). Steadier
than the end-to-end figure on a shared machine (docs/benchmarks.md, "Paced").

Then the upstream read itself, on a socketpair (a send and a read of one event, so the
figure includes a send): asyncio's Protocol path (`recv(256 KiB)`) against the scratch
buffer the proxy reads into (`recv_into`, then the copy out), upstream/http.py `_Scratch`.

Then the client write path (`write_costs`): one streamed response on a real Tornado server
on loopback, a thread draining it; per event one chunk through Tornado's public path
(write, flush, the backpressure test: what the proxy did before chunk_writer.py) or through
`CompletionsHandler._push` (one frame, one send), each after one turn of the event loop, as
when a read brings it. The loop thread's CPU (user + kernel, `thread_time`) per event, less
the same loop with nothing written."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tornado.web
from paced_upstream import EVENTS
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from llamacpp_proxy import fastjson
from llamacpp_proxy.frontdoor.completions import CompletionsHandler
from llamacpp_proxy.frontdoor.openai_response import ChunkEncoder
from llamacpp_proxy.upstream.http import READ_SIZE, BodyDecoder, ResponseHead
from llamacpp_proxy.upstream.llamacpp import event_problem
from llamacpp_proxy.upstream.sse import SSEDecoder

N = 200_000


def per_call(fn: object, args: list[object], reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for a in args:
            fn(a)  # type: ignore[operator]
        best = min(best, (time.perf_counter() - t0) / len(args) * 1e6)
    return best


def main() -> None:
    # First, while the process is as fresh as the proxy's: once a large block has been
    # freed, glibc serves 256 KiB from the heap and recv(256 KiB) looks cheap.
    reads = read_costs(EVENTS[0])
    chunks = [EVENTS[i % len(EVENTS)] for i in range(N)]
    sse = [c.split(b"\r\n", 1)[1][:-2] for c in chunks]
    payloads = [s[6:-2] for s in sse]
    body = BodyDecoder(ResponseHead(200, {"transfer-encoding": "chunked"}, True), "POST")
    decoder = SSEDecoder()
    encoder = ChunkEncoder(True, "chatcmpl-0123456789", 1_700_000_000, "model")
    texts = [" fox"] * N
    rows = {
        "chunked body": per_call(body.feed, chunks),
        "SSE decode": per_call(decoder.feed, sse),
        "JSON parse + check": per_call(lambda p: event_problem(fastjson.loads(p)), payloads),
        "chunk encode": per_call(lambda t: encoder.content(0, t), texts),
    }
    rows["total"] = sum(rows.values())
    rows.update(reads)
    rows.update(write_costs(encoder.content(0, " fox")))
    for name, us in rows.items():
        print(f"{name:36} {us:6.2f} us/event")
    print(json.dumps({k: round(v, 3) for k, v in rows.items()}))


def read_costs(event: bytes, n: int = 50_000) -> dict[str, float]:
    """A send and a read of one event: the read as asyncio's Protocol path does it, and as
    the proxy's BufferedProtocols do. (In a fresh process, glibc serves each 256 KiB with
    mmap and gives it back with munmap: that is most of the difference.)"""
    a, b = socket.socketpair()
    view = memoryview(bytearray(READ_SIZE))

    def recv(_: object) -> None:
        a.send(event)
        b.recv(256 * 1024)  # asyncio's selector transport: max_size

    def recv_into(_: object) -> None:
        a.send(event)
        bytes(view[: b.recv_into(view)])

    try:
        return {
            "send + recv(256 KiB) (asyncio)": per_call(recv, [None] * n),
            "send + recv_into scratch (proxy)": per_call(recv_into, [None] * n),
        }
    finally:
        a.close()
        b.close()


class _WriteBench(tornado.web.RequestHandler):
    """Streams `n` copies of a frame, one per loop turn, by the path `mode` names."""

    _push: Any = CompletionsHandler._push  # its write path, on this handler
    _push_public: Any = CompletionsHandler._push_public

    def initialize(self, frame: bytes, results: dict[str, float]) -> None:
        self.frame = frame
        self.results = results
        self._direct = None
        self._direct_socket = None
        self._direct_asked = False

    async def get(self, mode: str, count: str) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self._push_public(b": head\n\n")  # the head, as the role chunk sends it
        send = {"public": self._push_public, "direct": self._push, "none": None}[mode]
        frame, n = self.frame, int(count)
        t0 = time.thread_time()
        for _ in range(n):
            await asyncio.sleep(0)  # the loop turn that brings a read
            if send is not None:
                waiting = send(frame)
                if waiting is not None:
                    await waiting
        self.results[mode] = (time.thread_time() - t0) / n * 1e6
        self.finish()


def write_costs(frame: bytes, n: int = 50_000, rounds: int = 3) -> dict[str, float]:
    """Loop-thread CPU per event of each write path (best of `rounds`), less a loop turn."""
    results: dict[str, float] = {}
    best: dict[str, float] = {}

    async def serve() -> tuple[HTTPServer, int]:
        app = tornado.web.Application(
            [(r"/(\w+)/(\d+)", _WriteBench, {"frame": frame, "results": results})]
        )
        server = HTTPServer(app)
        sockets = bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
        return server, sockets[0].getsockname()[1]

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result()
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            for _ in range(rounds):
                for mode in ("none", "public", "direct"):  # interleaved: same load for each
                    client.sendall(b"GET /%s/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (mode.encode(), n))
                    tail = b""
                    while not tail.endswith(b"\r\n0\r\n\r\n"):
                        data = client.recv(1 << 20)
                        if not data:
                            raise RuntimeError("the bench server closed the connection")
                        tail = (tail + data)[-16:]
                    best[mode] = min(best.get(mode, float("inf")), results[mode])
    finally:
        loop.call_soon_threadsafe(server.stop)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    return {
        "write: Tornado's public path": best["public"] - best["none"],
        "write: one frame, one send (proxy)": best["direct"] - best["none"],
        "write: the loop turn itself": best["none"],
    }


if __name__ == "__main__":
    main()
