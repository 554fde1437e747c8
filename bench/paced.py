#!/usr/bin/env python3
"""Streaming at a GPU's pace, and several workers (stdlib only; docs/benchmarks.md).

  scripts/bench paced [--streams 100,400,1000] [--rate 20] [--duration 10] [--profile]
      The proxy in front of bench/paced_upstream.py, which writes one event per chunked
      write every 1/rate s per stream, as llama.cpp does. bench/stream_client.py keeps
      STREAMS streams running; per point: events/s delivered, proxy CPU per event, the
      fake's and the client's CPU (a fake or client near a full core measures itself), and
      events per client read (1.0: the proxy forwarded each event on its own).
  scripts/bench workers [--workers 1,2] [--connections 32]
      Non-streamed chat at 32 clients (wrk, nginx's canned answer) with --workers N and a
      redis-server (started on a free loopback port, stopped after) for --redis-url.

Results: bench-results/<UTC timestamp>-<mode>.json, and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # bench/bench.py: processes, /proc, wrk


def start_paced(procs: b.Processes, rate: float) -> tuple[subprocess.Popen[bytes], int]:
    proc = procs.start(
        "paced-upstream",
        [sys.executable, str(b.BENCH / "paced_upstream.py"), "--rate", str(rate)],
        pipes=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        raise RuntimeError(f"paced upstream did not start: {procs.log_tail('paced-upstream')}")
    return proc, int(line.split()[1])


def paced_stats(proc: subprocess.Popen[bytes]) -> dict[str, int]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"stats\n")
    proc.stdin.flush()
    stats: dict[str, int] = json.loads(proc.stdout.readline())
    return stats


def pace_point(
    args: argparse.Namespace, port: int, body: Path, streams: int, pids: list[int]
) -> dict[str, Any]:
    argv = [
        sys.executable, str(b.BENCH / "stream_client.py"), "pace", "--port", str(port),
        "--path", "/v1/chat/completions", "--body-file", str(body), "--key", b.UNLIMITED_KEY,
        "--concurrency", str(streams), "--duration", str(args.duration),
        "--ramp", str(args.ramp),
    ]  # fmt: skip
    for pid in pids:
        argv += ["--cpu-pid", str(pid)]
    busy0 = b.machine_busy()
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 300)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"stream_client pace failed: {done.stderr.strip()[-500:]}")
    r: dict[str, Any] = json.loads(done.stdout)
    r["machine_busy_pct"] = (b.machine_busy() - busy0) / wall / (os.cpu_count() or 1) * 100
    return r


def run_paced(args: argparse.Namespace, tmp: Path, procs: b.Processes) -> dict[str, Any]:
    bench = b.Bench(args, tmp, procs)
    results: dict[str, Any] = {"mode": "paced", "rate_per_stream": args.rate, "points": []}
    body = bench.body(
        "chat-stream",
        {"model": "bench", "messages": b.MESSAGES, "max_tokens": args.tokens, "stream": True},
    )
    fake, fake_port = start_paced(procs, args.rate)
    proxy, port = bench.start_proxy("proxy-paced", f"http://{b.HOST}:{fake_port}", [])
    try:
        b.check_chat(f"http://{b.HOST}:{port}/v1/chat/completions", body, b.UNLIMITED_KEY, "[DONE]")
        for streams in args.stream_list:
            for rep in range(args.reps):
                before = paced_stats(fake)
                r = pace_point(args, port, body, streams, [proxy.pid, fake.pid])
                after = paced_stats(fake)
                cpu = r["cpu_s"]
                r["offered_events_per_s"] = streams * args.rate
                r["proxy_cpu_us_per_event"] = (
                    cpu[str(proxy.pid)] / r["events"] * 1e6 if r["events"] else None
                )
                r["proxy_cpu_pct"] = cpu[str(proxy.pid)] / r["wall_s"] * 100
                own = cpu[str(proxy.pid)]
                r["proxy_sys_share"] = r["sys_cpu_s"][str(proxy.pid)] / own if own else 0
                r["fake_cpu_pct"] = cpu[str(fake.pid)] / r["wall_s"] * 100
                r["client_cpu_pct"] = r["client_cpu_s"] / r["wall_s"] * 100
                r["fake_aborted_streams"] = after["aborted"] - before["aborted"]
                r["fake_streams"] = after["streams"] - before["streams"]
                r["upstream_connections_opened"] = after["connections"] - before["connections"]
                b.log(
                    f"paced {streams:5} streams x {args.rate:g}/s rep {rep + 1}: "
                    f"{r['events_per_s']:9,.0f} events/s, proxy "
                    f"{r['proxy_cpu_us_per_event'] or 0:6.1f} us/event "
                    f"({r['proxy_cpu_pct']:.0f}% of a core, {r['proxy_sys_share']:.0%} kernel), "
                    f"{r['events_per_read'] or 0:.2f} events/read; fake "
                    f"{r['fake_cpu_pct']:.0f}%, client {r['client_cpu_pct']:.0f}%, machine "
                    f"{r['machine_busy_pct']:.0f}% busy, failed {r['failed']}; upstream: "
                    f"{r['fake_streams']} streams, {r['upstream_connections_opened']} connections"
                )
                r["streams"] = streams
                r["rep"] = rep
                results["points"].append(r)
            if args.profile and streams == args.profile_streams:
                results["profile"] = profile_paced(args, port, body, streams, proxy.pid)
    finally:
        procs.stop(proxy)
        procs.stop(fake)
    return results


def profile_paced(
    args: argparse.Namespace, port: int, body: Path, streams: int, pid: int
) -> dict[str, Any]:
    """py-spy on the proxy during one extra (uncounted) point."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    raw = args.out_dir / f"{args.stamp}-paced-{streams}.collapsed"
    seconds = int(args.duration)
    spy = subprocess.Popen(
        [pyspy, "record", "--pid", str(pid), "--rate", "200", "--duration",
         str(seconds + int(args.ramp) + 1), "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    pace_point(args, port, body, streams, [pid])
    _, err = spy.communicate(timeout=seconds + 120)
    if spy.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}"}
    summary = b.summarize_profile(raw)
    text = summary.pop("text")
    (args.out_dir / f"{args.stamp}-paced-{streams}.txt").write_text(text)
    b.log(f"profile at {streams} streams:\n{text}")
    return summary


def start_redis(procs: b.Processes, tmp: Path) -> int:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = b.free_port()
    proc = procs.start(
        "redis",
        [exe, "--port", str(port), "--bind", b.HOST, "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), b.socket.create_connection((b.HOST, port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return port
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"redis-server did not start: {procs.log_tail('redis')}")


def run_workers(args: argparse.Namespace, tmp: Path, procs: b.Processes) -> dict[str, Any]:
    bench = b.Bench(args, tmp, procs)
    results: dict[str, Any] = {"mode": "workers", "points": []}
    chat = bench.body("chat", {"model": "bench", "messages": b.MESSAGES, "max_tokens": b.TOKENS})
    nginx = f"http://{b.HOST}:{bench.start_nginx()}"
    redis = start_redis(procs, tmp)
    for n in args.worker_list:
        extra = ["--workers", str(n), "--redis-url", f"redis://{b.HOST}:{redis}/0"]
        proc, port = bench.start_proxy(f"proxy-workers-{n}", f"{nginx}/plain", extra)
        base = f"http://{b.HOST}:{port}"
        try:
            b.check_chat(f"{base}/v1/chat/completions", chat, b.UNLIMITED_KEY, "chat.completion")
            pids = b.tree(proc.pid)
            bench.warm(base, "/v1/chat/completions", chat, b.UNLIMITED_KEY, pids)
            for c in args.conn_list:
                entry = bench.point(
                    "proxy", "chat", c, base, "/v1/chat/completions", chat, b.UNLIMITED_KEY,
                    pids, label=f"--workers {n}",
                )  # fmt: skip
                entry["workers"] = n
                entry["processes"] = len(pids)
        finally:
            procs.stop(proc)
    results["points"] = bench.results["points"]
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = []
    if results["mode"] == "paced":
        lines += [
            f"### Paced streams ({results['rate_per_stream']:g} events/s per stream)",
            "",
            "| streams | offered events/s | delivered events/s | proxy CPU/event "
            "| proxy CPU (kernel) | events/read | fake CPU | client CPU | machine busy |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["points"]:
            lines.append(
                f"| {r['streams']} | {r['offered_events_per_s']:,.0f} | "
                f"{r['events_per_s']:,.0f} | {r['proxy_cpu_us_per_event'] or 0:.1f} µs | "
                f"{r['proxy_cpu_pct']:.0f}% ({r['proxy_sys_share']:.0%}) | "
                f"{r['events_per_read'] or 0:.2f} | "
                f"{r['fake_cpu_pct']:.0f}% | {r['client_cpu_pct']:.0f}% | "
                f"{r['machine_busy_pct']:.0f}% |"
            )
    else:
        lines += [
            "### Non-streamed chat, several workers (with --redis-url)",
            "",
            "| workers | clients | req/s | p50 / p99 ms | CPU/req (all processes) | others |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for p in results["points"]:
            r = p["best"]
            lines.append(
                f"| {p['workers']} | {p['connections']} | {r['rps']:,.0f} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {p['min_cpu_per_request_us']:,.0f} µs |"
                f" {r['other_cpu_pct_of_machine']:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/bench paced|workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", choices=["paced", "workers"])
    p.add_argument("--streams", default="100,400,1000", help="paced: concurrent streams")
    p.add_argument("--rate", type=float, default=20.0, help="paced: events/s per stream")
    p.add_argument("--tokens", type=int, default=200, help="paced: tokens per stream")
    p.add_argument("--ramp", type=float, default=3.0, help="paced: seconds to start streams")
    p.add_argument("--profile", action="store_true", help="paced: py-spy at --profile-streams")
    p.add_argument("--profile-streams", type=int, default=1000)
    p.add_argument("--workers", default="1,2", help="workers: process counts")
    p.add_argument("--connections", default="32", help="workers: client counts")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out-dir", default=str(b.ROOT / "bench-results"))
    args = p.parse_args(argv)
    args.stream_list = [int(x) for x in args.streams.split(",") if x]
    args.worker_list = [int(x) for x in args.workers.split(",") if x]
    args.conn_list = [int(x) for x in args.connections.split(",") if x]
    args.levers, args.wrk_threads, args.warmup, args.slow_rate = "", 1, 1.0, 200
    args.out_dir = Path(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    b.raise_fd_limit(max(args.stream_list, default=0) * 4 + 512)
    tmp = Path(tempfile.mkdtemp(prefix="llamacpp-proxy-paced-"))
    os.chmod(tmp, 0o755)
    procs = b.Processes(tmp)
    try:
        run = run_paced if args.mode == "paced" else run_workers
        results = run(args, tmp, procs)
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    results["git"] = b.git_state()
    results["machine"] = b.machine_info(sys.executable)
    results["command"] = "scripts/bench " + " ".join(argv)
    out = args.out_dir / f"{args.stamp}-{args.mode}.json"
    out.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    b.log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
