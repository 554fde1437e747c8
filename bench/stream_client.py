#!/usr/bin/env python3
"""Raw-socket asyncio client for the benchmark's streamed measurements (stdlib only).

  ttfb: run COUNT streamed POSTs, CONCURRENCY at a time; per stream, the time to the first
        response byte, to the first SSE event (`data:`), and to the end of the stream.
        Prints one JSON object.
  hold: open COUNT streams at once and keep reading them slowly; once every stream has
        received its first event, print `OPEN n` (n = streams open), then wait for a line
        on stdin (or EOF), close them all, print `CLOSED` and exit.

Requests are HTTP/1.1 with `Connection: close`, so a stream ends when the server closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time


def build_request(host: str, port: int, path: str, body: bytes, key: str | None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def one_stream(host: str, port: int, request: bytes) -> dict[str, float | int | str]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        first_byte = first_event = None
        tail = b""
        events = 0
        size = 0
        status = ""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            now = time.perf_counter()
            size += len(data)
            if first_byte is None:
                first_byte = now
                status = data[:15].decode("latin-1", "replace")
            window = tail + data
            if first_event is None and b"data:" in window:
                first_event = now
            events += window.count(b"data:") - tail.count(b"data:")
            tail = window[-8:]
        end = time.perf_counter()
    finally:
        writer.close()
    return {
        "status": status.split(" ")[1] if " " in status else "none",
        "first_byte_ms": ((first_byte or end) - t0) * 1000,
        "first_event_ms": ((first_event or end) - t0) * 1000,
        "total_ms": (end - t0) * 1000,
        "events": events,
        "bytes": size,
    }


async def run_ttfb(args: argparse.Namespace, request: bytes) -> dict[str, object]:
    sem = asyncio.Semaphore(args.concurrency)
    results: list[dict[str, float | int | str]] = []
    failures: list[str] = []

    async def guarded() -> None:
        async with sem:
            try:
                results.append(await one_stream(args.host, args.port, request))
            except OSError as exc:
                failures.append(repr(exc))

    t0 = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(args.count)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == "200"]
    fe = [float(r["first_event_ms"]) for r in ok]
    fb = [float(r["first_byte_ms"]) for r in ok]
    tt = [float(r["total_ms"]) for r in ok]
    return {
        "count": args.count,
        "concurrency": args.concurrency,
        "ok": len(ok),
        "failed": len(results) - len(ok) + len(failures),
        "errors": (failures + [str(r["status"]) for r in results if r["status"] != "200"])[:5],
        "wall_s": wall,
        "events_per_stream_median": statistics.median([int(r["events"]) for r in ok]) if ok else 0,
        "bytes_per_stream_median": statistics.median([int(r["bytes"]) for r in ok]) if ok else 0,
        "first_event_ms": {
            "p50": pct(fe, 50),
            "p90": pct(fe, 90),
            "p99": pct(fe, 99),
            "min": min(fe, default=None),
        },
        "first_byte_ms": {"p50": pct(fb, 50), "p99": pct(fb, 99)},
        "total_ms": {"p50": pct(tt, 50), "p99": pct(tt, 99)},
    }


async def run_hold(args: argparse.Namespace, request: bytes) -> None:
    opened = 0
    failed: list[str] = []
    all_open = asyncio.Event()
    release = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    def settle() -> None:
        if opened + len(failed) >= args.count:
            all_open.set()

    async def hold_one() -> None:
        nonlocal opened
        try:
            reader, writer = await asyncio.open_connection(args.host, args.port)
        except OSError as exc:
            failed.append(repr(exc))
            settle()
            return
        writers.append(writer)
        writer.write(request)
        seen = b""
        counted = False
        try:
            while not release.is_set():
                data = await reader.read(4096)
                if not data:
                    if not counted:
                        failed.append(
                            "closed before the first event: "
                            + seen[:80].decode("latin-1", "replace")
                        )
                        settle()
                    return
                if not counted:
                    seen += data
                    if b"data:" in seen:
                        counted = True
                        opened += 1
                        settle()
                    elif not seen.startswith(b"HTTP/1.1 200") and len(seen) > 12:
                        failed.append("status " + seen[:40].decode("latin-1", "replace"))
                        settle()
                        return
        except (OSError, asyncio.CancelledError):
            return

    tasks = []
    for i in range(args.count):
        tasks.append(asyncio.ensure_future(hold_one()))
        if i % 100 == 99:
            await asyncio.sleep(0.05)  # spread the connects over the listen backlog
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_open.wait(), timeout=args.timeout)
    print(json.dumps({"open": opened, "failed": len(failed), "errors": failed[:5]}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    release.set()
    for writer in writers:
        writer.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print("CLOSED", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["ttfb", "hold"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--key")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read()
    request = build_request(args.host, args.port, args.path, body, args.key)
    if args.mode == "ttfb":
        print(json.dumps(asyncio.run(run_ttfb(args, request))), flush=True)
    else:
        asyncio.run(run_hold(args, request))


if __name__ == "__main__":
    main()
