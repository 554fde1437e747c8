#!/usr/bin/env python3
"""Microseconds per streamed event spent in the proxy's pure per-event code, in-process:
the chunked-body decoder, the SSE decoder, the event's JSON parse and check, and the
OpenAI chunk encoding, each fed one whole event per call (as at a GPU's pace). Steadier
than the end-to-end figure on a shared machine (docs/benchmarks.md, "Paced")."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paced_upstream import EVENTS

from llamacpp_proxy import fastjson
from llamacpp_proxy.frontdoor.openai_response import ChunkEncoder
from llamacpp_proxy.upstream.http import BodyDecoder, ResponseHead
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
    for name, us in rows.items():
        print(f"{name:20} {us:6.2f} us/event")
    print(json.dumps({k: round(v, 3) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
