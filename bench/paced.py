#!/usr/bin/env python3
"""Streaming at a GPU's pace, and several workers (stdlib only; docs/benchmarks.md).

  scripts/bench paced [--points 100x50,1000x20] [--search-top 8000] [--duration 10] [--profile]
      The proxy in front of bench/paced_upstream.py, which writes one event per chunked
      write every 1/rate s per stream, as llama.cpp does, each stamped with the time it was
      written. bench/stream_client.py keeps STREAMS streams running; per point: events/s
      delivered, proxy CPU per event and % of a core, p50/p99/max token delay through the
      proxy and straight at the fake (the floor; added = the difference), proxy RSS, the
      fake's and the client's CPU (a fake or client near a full core measures itself), and
      events per client read (1.0: the proxy forwarded each event on its own). Then the
      largest N at --rate (20) kept up with: doubling from the last point, then bisecting.
      (--streams 100,400 [--rate 20]: those points instead of --points.)
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
    args: argparse.Namespace,
    port: int,
    body: Path,
    streams: int,
    pids: list[int],
    path: str = "/v1/chat/completions",
    key: str | None = b.UNLIMITED_KEY,
    duration: float | None = None,
) -> dict[str, Any]:
    argv = [
        sys.executable, str(b.BENCH / "stream_client.py"), "pace", "--port", str(port),
        "--path", path, "--body-file", str(body),
        "--concurrency", str(streams), "--duration", str(duration or args.duration),
        "--ramp", str(args.ramp),
    ]  # fmt: skip
    if key:
        argv += ["--key", key]
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


def sustained(r: dict[str, Any], rate: float) -> bool:
    """Kept up: delivered at least 95% of the offered events, and the p99 delay of a token
    stays under one token interval (a longer one means tokens queue behind each other)."""
    p99 = r["delay_ms"]["p99"]
    return (
        r["events_per_s"] >= 0.95 * r["offered_events_per_s"]
        and p99 is not None
        and p99 <= 1000 / rate
        and not r["failed"]
    )


class PacedRig:
    """One paced fake at one rate, the proxy in front of it, and the points measured."""

    def __init__(self, args: argparse.Namespace, bench: b.Bench, procs: b.Processes, rate: float):
        self.args, self.rate = args, rate
        self.body = bench.body(
            "chat-stream-paced",
            {"model": "bench", "messages": b.MESSAGES, "max_tokens": args.tokens, "stream": True},
        )
        self.direct_body = bench.body(
            "llama-stream-paced", {"prompt": b.PROMPT, "n_predict": args.tokens, "stream": True}
        )
        self.procs = procs
        self.fake, self.fake_port = start_paced(procs, rate)
        self.proxy, self.port = bench.start_proxy(
            f"proxy-paced-{rate:g}", f"http://{b.HOST}:{self.fake_port}", []
        )
        b.check_chat(
            f"http://{b.HOST}:{self.port}/v1/chat/completions",
            self.body,
            b.UNLIMITED_KEY,
            "[DONE]",
        )

    def stop(self) -> None:
        self.procs.stop(self.proxy)
        self.procs.stop(self.fake)

    def point(
        self, streams: int, rep: int = 0, direct: bool = True, duration: float | None = None
    ) -> dict[str, Any]:
        args, rate, proxy, fake = self.args, self.rate, self.proxy, self.fake
        before = paced_stats(fake)
        r = pace_point(
            args, self.port, self.body, streams, [proxy.pid, fake.pid], duration=duration
        )
        after = paced_stats(fake)
        cpu = r["cpu_s"]
        r["rate_per_stream"] = rate
        r["offered_events_per_s"] = streams * rate
        r["proxy_cpu_us_per_event"] = (
            cpu[str(proxy.pid)] / r["events"] * 1e6 if r["events"] else None
        )
        r["proxy_cpu_pct"] = cpu[str(proxy.pid)] / r["wall_s"] * 100
        own = cpu[str(proxy.pid)]
        r["proxy_sys_share"] = r["sys_cpu_s"][str(proxy.pid)] / own if own else 0
        r["proxy_rss_mb"] = r["rss_kb"][str(proxy.pid)].get("VmRSS", 0) / 1024
        r["fake_cpu_pct"] = cpu[str(fake.pid)] / r["wall_s"] * 100
        r["client_cpu_pct"] = r["client_cpu_s"] / r["wall_s"] * 100
        r["fake_aborted_streams"] = after["aborted"] - before["aborted"]
        r["fake_streams"] = after["streams"] - before["streams"]
        r["upstream_connections_opened"] = after["connections"] - before["connections"]
        r["streams"] = streams
        r["rep"] = rep
        r["sustained"] = sustained(r, rate)
        # The machine's CPU not spent by the proxy, the fake or the client: other load.
        ours = r["proxy_cpu_pct"] + r["fake_cpu_pct"] + r["client_cpu_pct"]
        r["others_pct"] = max(0.0, r["machine_busy_pct"] - ours / (os.cpu_count() or 1))
        if direct:
            # The floor: the same client straight at the fake (no proxy), same N and rate.
            d = pace_point(
                args, self.fake_port, self.direct_body, streams, [fake.pid],
                path="/completion", key=None, duration=duration,
            )  # fmt: skip
            d["offered_events_per_s"] = streams * rate
            d["fake_cpu_pct"] = d["cpu_s"][str(fake.pid)] / d["wall_s"] * 100
            d["client_cpu_pct"] = d["client_cpu_s"] / d["wall_s"] * 100
            r["direct"] = d
            r["added_delay_ms"] = {
                k: (
                    r["delay_ms"][k] - d["delay_ms"][k]
                    if r["delay_ms"][k] is not None and d["delay_ms"][k] is not None
                    else None
                )
                for k in ("p50", "p99", "max")
            }
        dl = r["delay_ms"]
        dd = r.get("direct", {}).get("delay_ms") or {}
        b.log(
            f"paced {streams:5} streams x {rate:g}/s rep {rep + 1}: "
            f"{r['events_per_s']:9,.0f} events/s, proxy "
            f"{r['proxy_cpu_us_per_event'] or 0:6.1f} us/event "
            f"({r['proxy_cpu_pct']:.0f}% of a core, {r['proxy_sys_share']:.0%} kernel), "
            f"{r['events_per_read'] or 0:.2f} events/read, RSS {r['proxy_rss_mb']:.0f} MB; "
            f"token delay p50/p99/max {dl['p50'] or 0:.1f}/{dl['p99'] or 0:.1f}/"
            f"{dl['max'] or 0:.1f} ms ("
            + (
                f"direct {dd.get('p50') or 0:.1f}/{dd.get('p99') or 0:.1f}/{dd.get('max') or 0:.1f}"
                if dd
                else "no direct run"
            )
            + f"); fake {r['fake_cpu_pct']:.0f}%, client "
            f"{r['client_cpu_pct']:.0f}%, machine {r['machine_busy_pct']:.0f}% busy, failed "
            f"{r['failed']}; {'kept up' if r['sustained'] else 'FELL BEHIND'}"
        )
        return r


def search_largest(
    rig: PacedRig, start: dict[str, Any] | None, top: int, steps: int
) -> dict[str, Any]:
    """The largest N at rig.rate the proxy sustains: double from the last good N up to
    `top`, then bisect `steps` times between the last good and the first bad N."""
    tried: list[dict[str, Any]] = []
    good = start["streams"] if start and start["sustained"] else 0
    bad: int | None = None if good else (start["streams"] if start else None)
    duration = min(rig.args.duration, 5.0)
    n = good * 2 if good else max(50, (bad or 1000) // 4)
    while n <= top and (bad is None or n < bad):
        r = rig.point(n, direct=False, duration=duration)
        tried.append(r)
        if r["sustained"]:
            good, n = n, n * 2
        else:
            bad = n
    for _ in range(steps if bad else 0):
        mid = (good + bad) // 2  # type: ignore[operator]
        if mid in (good, bad) or bad - good < max(50, good // 10):  # type: ignore[operator]
            break
        r = rig.point(mid, direct=False, duration=duration)
        tried.append(r)
        if r["sustained"]:
            good = mid
        else:
            bad = mid
    text = (
        f"{good:,} streams"
        + (f" (fell behind at {bad:,})" if bad else f" (not tried above {top:,})")
        if good
        else f"none tried (fell behind at {bad:,})"
        if bad
        else "not measured"
    )
    b.log(f"largest N at {rig.rate:g} events/s kept up with: {text}")
    return {"rate_per_stream": rig.rate, "largest_sustained": good or None,
            "first_behind": bad, "top": top, "text": text, "tried": tried}  # fmt: skip


def add_paced_defaults(args: argparse.Namespace) -> None:
    args.search_rate = args.rate
    args.stream_list = []


def parse_points(spec: str) -> list[tuple[int, float]]:
    out = []
    for item in spec.split(","):
        if item:
            n, _, rate = item.partition("x")
            out.append((int(n), float(rate or 20)))
    return out


def run_series(args: argparse.Namespace, bench: b.Bench, procs: b.Processes) -> dict[str, Any]:
    """The issue's points (args.points: [(streams, rate)]), each with its direct floor, then
    the search for the largest N at args.search_rate (none when args.search_top is 0)."""
    results: dict[str, Any] = {"points": [], "search": None}
    rates = sorted(
        {rate for _, rate in args.points} | ({args.search_rate} if args.search_top else set())
    )
    for rate in rates:
        rig = PacedRig(args, bench, procs, rate)
        try:
            last = None
            for streams, r_ in args.points:
                if r_ != rate:
                    continue
                for rep in range(args.reps):
                    last = rig.point(streams, rep)
                    results["points"].append(last)
            if args.search_top and rate == args.search_rate:
                start = max(
                    (p for p in results["points"] if p["rate_per_stream"] == rate),
                    key=lambda p: p["streams"], default=None,
                )  # fmt: skip
                results["search"] = search_largest(rig, start, args.search_top, args.search_steps)
        finally:
            rig.stop()
    return results


def run_paced(args: argparse.Namespace, tmp: Path, procs: b.Processes) -> dict[str, Any]:
    bench = b.Bench(args, tmp, procs)
    results: dict[str, Any] = {"mode": "paced", **run_series(args, bench, procs)}
    results["goals"] = goals(results, None)
    if args.profile:
        rig = PacedRig(args, bench, procs, args.search_rate)
        try:
            results["profile"] = profile_paced(
                args, rig.port, rig.body, args.profile_streams, rig.proxy.pid
            )
        finally:
            rig.stop()
    return results


def goals(paced: dict[str, Any], ttft: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 13's goals, from the 1,000 x 20 point and the TTFT run (None: not measured)."""
    p = next(
        (x for x in paced.get("points", []) if x["streams"] == 1000 and x["rate_per_stream"] == 20),
        None,
    )
    rows = []

    def add(goal: str, value: float | None, limit: float, unit: str, spec: str = ".1f") -> None:
        rows.append({
            "goal": goal, "measured": value,
            "pass": None if value is None else value <= limit,
            "text": "n/a" if value is None else f"{value:{spec}} {unit}",
        })  # fmt: skip

    add(
        "1,000 x 20 events/s: proxy CPU per event ≤ 25 µs",
        p and p["proxy_cpu_us_per_event"],
        25,
        "µs",
    )
    add(
        "1,000 x 20 events/s: proxy CPU ≤ 50% of one core", p and p["proxy_cpu_pct"], 50, "%", ".0f"
    )
    added = p.get("added_delay_ms", {}).get("p99") if p else None
    add("1,000 x 20 events/s: p99 added inter-token delay ≤ 5 ms", added, 5, "ms", ".2f")
    add("1,000 streams: RSS ≤ 150 MB", p and p["proxy_rss_mb"], 150, "MB", ".0f")
    if p and not p["sustained"]:
        rows[0]["text"] += f" (delivered {p['events_per_s']:,.0f} of 20,000 events/s)"
    t = ttft.get("added_ms") if ttft and not ttft.get("error") else None
    add("added time to first token p50 ≤ 1 ms (real llama-server)", t and t["p50"], 1, "ms", ".2f")
    return rows


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


def paced_markdown(paced: dict[str, Any], goal_rows: list[dict[str, Any]] | None) -> list[str]:
    lines = [
        "### Paced streams: one event per chunked write, as llama.cpp on a GPU (issue 13)",
        "",
        "| streams x events/s | offered | delivered: proxy / direct | proxy CPU/event | "
        "proxy CPU (kernel) | events/read | token delay p50/p99/max ms: proxy | direct | "
        "added p50/p99 ms | proxy RSS | fake / client CPU | machine busy (others) | kept up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def dl(d: dict[str, Any] | None) -> str:
        if not d or d.get("p50") is None:
            return ""
        return f"{d['p50']:.1f} / {d['p99']:.1f} / {d['max']:.0f}"

    rows = list(paced.get("points", []))
    rows += (paced.get("search") or {}).get("tried", [])
    for r in rows:
        d = r.get("direct")
        added = r.get("added_delay_ms")
        delivered = f"{r['events_per_s']:,.0f} / " + (
            f"{d['events_per_s']:,.0f}" if d else "(search: no direct run)"
        )
        lines.append(
            f"| {r['streams']:,} x {r['rate_per_stream']:g} | {r['offered_events_per_s']:,.0f} | "
            f"{delivered} | "
        )
        lines[-1] += (
            f"{r['proxy_cpu_us_per_event'] or 0:.1f} µs | "
            f"{r['proxy_cpu_pct']:.0f}% ({r['proxy_sys_share']:.0%}) | "
            f"{r['events_per_read'] or 0:.2f} | {dl(r['delay_ms'])} | "
            f"{dl(d['delay_ms']) if d else ''} | "
            + (
                f"{added['p50']:.1f} / {added['p99']:.1f} | "
                if added and added["p50"] is not None
                else " | "
            )
            + f"{r['proxy_rss_mb']:.0f} MB | {r['fake_cpu_pct']:.0f}% / "
            f"{r['client_cpu_pct']:.0f}% | {r['machine_busy_pct']:.0f}% "
            f"({r.get('others_pct', 0):.0f}%) | "
            f"{'yes' if r['sustained'] else '**no**'} |"
        )
    search = paced.get("search")
    if search:
        lines += ["", f"Largest N at {search['rate_per_stream']:g} events/s kept up with: "
                  f"{search['text']}."]  # fmt: skip
    lines += [
        "",
        "Token delay: from the fake's write of an event (its CLOCK_MONOTONIC stamp, in the "
        "token's text) to the client's read of it; direct: the same client straight at the "
        "fake; added = proxy - direct at the same percentile. Kept up: ≥ 95% of the offered "
        "events delivered and p99 delay under one token interval. Machine busy: all of the "
        "machine's cores; others: what the proxy, the fake and the client did not use.",
    ]
    if goal_rows:
        lines += ["", "| goal (issue 13) | measured | result |", "|---|---:|---|"]
        for g in goal_rows:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[g["pass"]]
            lines.append(f"| {g['goal']} | {g['text']} | {verdict} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if results["mode"] == "paced":
        lines += paced_markdown(results, results.get("goals"))
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
    p.add_argument(
        "--points",
        default="100x50,1000x20",
        help="paced: STREAMSxRATE points, each with its direct floor (issue 13's two)",
    )
    p.add_argument("--streams", help="paced: concurrent streams at --rate (instead of --points)")
    p.add_argument("--rate", type=float, default=20.0, help="paced: events/s per stream")
    p.add_argument(
        "--search-top",
        type=int,
        default=8000,
        help="paced: largest N tried when searching the N kept up with at --rate (0: no search)",
    )
    p.add_argument("--search-steps", type=int, default=2, help="paced: bisection steps")
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
    add_paced_defaults(args)
    if args.streams:
        args.points = [(int(x), args.rate) for x in args.streams.split(",") if x]
    else:
        args.points = parse_points(args.points)
    args.worker_list = [int(x) for x in args.workers.split(",") if x]
    args.conn_list = [int(x) for x in args.connections.split(",") if x]
    args.levers, args.wrk_threads, args.warmup, args.slow_rate = "", 1, 1.0, 200
    args.out_dir = Path(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    most = max([n for n, _ in args.points] + [args.search_top, args.profile_streams])
    b.raise_fd_limit(most * 4 + 512)
    tmp = Path(tempfile.mkdtemp(prefix="llamacpp-proxy-paced-"))
    os.chmod(tmp, 0o755)
    procs = b.Processes(tmp)
    b.stop_on_signals()
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
