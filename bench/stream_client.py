#!/usr/bin/env python3
"""Raw-socket asyncio client for the benchmark's streamed measurements (stdlib only).

  ttfb: run COUNT streamed POSTs, CONCURRENCY at a time; per stream, the time to the first
        response byte, to the first SSE event (`data:`), and to the end of the stream.
        Prints one JSON object.
  hold: open COUNT streams at once and keep reading them slowly; once every stream has
        received its first event, print `OPEN n` (n = streams open), then wait for a line
        on stdin (or EOF), close them all, print `CLOSED` and exit.

  pace: keep CONCURRENCY streams running (each ends, the next starts) for --ramp then
        --duration seconds; count the SSE events and reads within the --duration window and
        the CPU time of --cpu-pid processes over it (from /proc), and their RSS at its end.
        With bench/paced_upstream.py behind, every event's text is `@<CLOCK_MONOTONIC µs
        it was written at>`: per event, the delay from that write to this client's read
        (p50/p99/max, in ms), the proxy's added delay once the direct figure is subtracted.
        Prints one JSON object.

Requests are HTTP/1.1 with `Connection: close`, so a stream ends when the server closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
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


def _cpu(pids: list[int], sys_only: bool = False) -> float:
    """utime + stime (or stime alone) of these processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[12]) + (0 if sys_only else int(fields[11]))
    return total / os.sysconf("SC_CLK_TCK")


STAMP = re.compile(rb'"@(\d+)"')


def _rss_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


async def run_pace(args: argparse.Namespace, request: bytes) -> dict[str, object]:
    counting = False
    stop = False
    events = reads = streams = failed = 0
    delays: list[int] = []  # µs from the fake's write of an event to our read of it
    loop = asyncio.get_running_loop()

    async def worker(delay: float) -> None:
        nonlocal events, reads, streams, failed
        await asyncio.sleep(delay)  # spread the streams' phases, as slots start apart
        while not stop:
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port)
            except OSError:
                failed += 1
                await asyncio.sleep(0.1)
                continue
            try:
                writer.write(request)
                tail = b""
                pending = b""  # an event cut by a read boundary waits for its end
                first = True
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    if counting:
                        now = time.monotonic_ns() // 1000
                        pending += data
                        cut = pending.rfind(b"\n\n")
                        if cut >= 0:
                            delays.extend(now - int(m) for m in STAMP.findall(pending, 0, cut))
                            pending = pending[cut + 2 :]
                        pending = pending[-65536:]  # bounded whatever the server sends
                    if first:
                        first = False
                        if not data.startswith(b"HTTP/1.1 200"):
                            failed += 1
                            break
                    if counting:
                        window = tail + data
                        events += window.count(b"data:") - tail.count(b"data:")
                        reads += 1
                        tail = window[-8:]
                if counting:
                    streams += 1
            except OSError:
                failed += 1
            finally:
                writer.close()

    tasks = [
        asyncio.ensure_future(worker(args.ramp * i / args.concurrency))
        for i in range(args.concurrency)
    ]
    await asyncio.sleep(args.ramp + 1.0)
    pids = [int(p) for p in args.cpu_pid]
    own = os.getpid()
    cpu0 = [_cpu([p]) for p in pids]
    sys0 = [_cpu([p], sys_only=True) for p in pids]
    self0 = _cpu([own])
    t0 = loop.time()
    counting = True
    await asyncio.sleep(args.duration)
    counting = False
    wall = loop.time() - t0
    cpu1 = [_cpu([p]) for p in pids]
    sys1 = [_cpu([p], sys_only=True) for p in pids]
    self1 = _cpu([own])
    rss = {str(p): _rss_kb(p) for p in pids}
    stop = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "concurrency": args.concurrency,
        "wall_s": wall,
        "events": events,
        "events_per_s": events / wall,
        "reads": reads,
        "events_per_read": events / reads if reads else None,
        "streams_completed": streams,
        "failed": failed,
        "cpu_s": {str(p): b - a for p, a, b in zip(pids, cpu0, cpu1, strict=True)},
        "sys_cpu_s": {str(p): b - a for p, a, b in zip(pids, sys0, sys1, strict=True)},
        "client_cpu_s": self1 - self0,
        "rss_kb": rss,
        "stamped_events": len(delays),
        "delay_ms": {
            "p50": _ms(pct(delays, 50)),
            "p99": _ms(pct(delays, 99)),
            "max": _ms(max(delays, default=None)),
        },
    }


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["ttfb", "hold", "pace"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--key")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--duration", type=float, default=10.0, help="pace: counted seconds")
    parser.add_argument("--ramp", type=float, default=2.0, help="pace: seconds to start streams")
    parser.add_argument("--cpu-pid", action="append", default=[], help="pace: measure its CPU")
    args = parser.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read()
    request = build_request(args.host, args.port, args.path, body, args.key)
    if args.mode == "ttfb":
        print(json.dumps(asyncio.run(run_ttfb(args, request))), flush=True)
    elif args.mode == "pace":
        print(json.dumps(asyncio.run(run_pace(args, request))), flush=True)
    else:
        asyncio.run(run_hold(args, request))


if __name__ == "__main__":
    main()
