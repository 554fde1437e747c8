#!/usr/bin/env python3
"""A fake llama.cpp that streams at a GPU's pace (stdlib only; docs/benchmarks.md, "Paced").

nginx sends a canned stream as fast as the socket takes it, so the proxy reads many events
per read. Real llama.cpp writes one event per token, each its own chunk of a chunked
response, every 1/rate seconds per slot. This server does that: each streamed /completion
gets `--rate` events per second (the first after `--first-ms`), one chunked write per event
on asyncio timers, `n_predict` tokens (default `--tokens`) and the final `stop: true` event.
Each event's text is `@` and the CLOCK_MONOTONIC microsecond it was written at (a token's
text passes through the proxy unchanged), so a client on this machine computes the delay
between the fake's write and its own read for every token (bench/stream_client.py pace).
It keeps connections alive as llama.cpp does, and answers /props, /v1/models, /health from
bench/canned/. One process: at 20,000 events/s it uses a fraction of a core (the bench
reports its CPU next to the proxy's, so a fake that cannot keep up shows).

  paced_upstream.py --port 0 --rate 20     # prints `PORT n` once listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

CANNED = Path(__file__).resolve().parent / "canned"
WORDS = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ","]


def _response(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Keep-Alive: timeout=5, max=100000\r\n\r\n"
    ).encode() + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# Pre-encoded event bodies: the fake must cost little per event.
EVENTS = [
    _chunk(
        b"data: "
        + json.dumps(
            {
                "index": 0,
                "content": word,
                "tokens": [1000 + i],
                "stop": False,
                "id_slot": 0,
                "tokens_predicted": 1,
                "tokens_evaluated": 31,
            },
            separators=(",", ":"),
        ).encode()
        + b"\n\n"
    )
    for i, word in enumerate(WORDS)
]


# An event whose content is `@<monotonic microseconds>`, filled in at write time. The
# client parses the stamp back (bench/stream_client.py); bytes `%` keeps it cheap.
STAMPED = (
    b'data: {"index":0,"content":"@%d","tokens":[1000],"stop":false,"id_slot":0,'
    b'"tokens_predicted":1,"tokens_evaluated":31}\n\n'
)


def stamped_event() -> bytes:
    data = STAMPED % (time.monotonic_ns() // 1000)
    return b"%x\r\n%s\r\n" % (len(data), data)


def _final(n: int) -> bytes:
    event = {
        "index": 0,
        "content": "",
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": "fake.gguf",
        "tokens_predicted": n,
        "tokens_evaluated": 31,
        "truncated": False,
        "stop_type": "limit",
        "stopping_word": "",
        "tokens_cached": 30,
        "timings": {"prompt_n": 31, "predicted_n": n},
    }
    return _chunk(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100000\r\n\r\n"
)


class Paced(asyncio.Protocol):
    """One upstream connection: requests one at a time (as the proxy's pool sends them)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()  # the proxy dropped the stream: stop "generating"
            self.timer = None
            self.server.aborted += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.busy:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            # A client straight at the fake (the bench's floor) asks to close after a stream.
            self.close_after = False
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    self.close_after = True
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.handle(head.split(" ")[1], body)

    def handle(self, path: str, body: bytes) -> None:
        assert self.transport is not None
        name = path.rsplit("/", 1)[-1]
        if name == "completion":
            request = json.loads(body)
            if request.get("stream"):
                n = int(request.get("n_predict") or self.server.tokens)
                self.busy = True
                self.transport.write(STREAM_HEAD)
                loop = asyncio.get_running_loop()
                self.timer = loop.call_later(self.server.first, self.tick, 0, n)
                return
            self.transport.write(_response("200 OK", self.server.canned["completion"]))
        elif name in ("props", "models", "tokenize"):
            self.transport.write(_response("200 OK", self.server.canned[name]))
        elif name == "health":
            self.transport.write(_response("200 OK", b'{"status":"ok"}'))
        else:
            self.transport.write(_response("404 Not Found", b'{"error":"not found"}'))

    def tick(self, i: int, n: int) -> None:
        assert self.transport is not None
        server = self.server
        if i < n:
            self.transport.write(stamped_event())
            server.events += 1
            self.timer = asyncio.get_running_loop().call_later(server.interval, self.tick, i + 1, n)
            return
        self.transport.write(_final(n) + b"0\r\n\r\n")
        server.streams += 1
        self.timer = None
        self.busy = False
        if self.close_after:
            self.transport.close()
            return
        if self.buffer:
            self.data_received(b"")


class Server:
    def __init__(self, rate: float, tokens: int, first_ms: float) -> None:
        self.interval = 1.0 / rate
        self.tokens = tokens
        self.first = first_ms / 1000
        self.events = 0
        self.streams = 0
        self.aborted = 0
        self.connections = 0
        self.canned = {
            "completion": (CANNED / "llamacpp-completion.json").read_bytes(),
            "props": (CANNED / "props.json").read_bytes(),
            "models": (CANNED / "models.json").read_bytes(),
            "tokenize": (CANNED / "tokenize.json").read_bytes(),
        }


async def serve(args: argparse.Namespace) -> None:
    # Stagger first events a little, as slots that started at different times would be.
    server = Server(args.rate, args.tokens, args.first_ms * (1 + random.random()))
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: Paced(server), "127.0.0.1", args.port, backlog=4096, reuse_address=True
    )
    port = listener.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    # `stats` on stdin prints what was sent so far (the bench checks the fake kept up).
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"stats":
            print(
                json.dumps(
                    {
                        "events": server.events,
                        "streams": server.streams,
                        "aborted": server.aborted,
                        "connections": server.connections,
                    }
                ),
                flush=True,
            )
    listener.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", type=float, default=20.0, help="events per second per stream")
    p.add_argument("--tokens", type=int, default=200, help="tokens when n_predict is absent")
    p.add_argument("--first-ms", type=float, default=20.0, help="delay before the first event")
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
