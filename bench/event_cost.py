#!/usr/bin/env python3
"""Microseconds per streamed event spent in the proxy's pure per-event code, in-process:
the chunked-body decoder, the SSE decoder, the event's JSON parse and check, and the
OpenAI chunk encoding, each fed one whole event per call (as at a GPU's pace). Steadier
than the end-to-end figure on a shared machine (docs/benchmarks.md, "Paced").

Then the upstream read itself, on a socketpair (a send and a read of one event, so the
figure includes a send): asyncio's Protocol path (`recv(256 KiB)`) against the scratch
buffer the proxy reads into (`recv_into`, then the copy out), upstream/http.py `_Scratch`."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paced_upstream import EVENTS

from llamacpp_proxy import fastjson
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


if __name__ == "__main__":
    main()
