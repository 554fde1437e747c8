"""What the metrics cost (issue 12): per request and per token, before (--no-metrics) and
after (metrics on), measured as the proxy process's CPU time.

  scripts/bench metrics-cost [--requests N] [--streams N] [--rounds N]

Starts the in-repo fake llama.cpp (tests/fake_llamacpp.py) and the proxy as subprocesses on
loopback, drives them with one kept-alive httpx client (non-streamed, then streamed), and
reads the proxy's utime+stime from /proc before and after. Rounds alternate off/on, and
the best (least disturbed) round of each is reported. Also times the metrics call alone
(`Metrics.request_finished`) and a scrape of 50 keys x 3 models in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import timeit
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-metrics-0123456789"
TOKENS_PER_STREAM = 10  # the fake's canned answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not become ready")


def run_proxy(fake_url: str, metrics: bool, requests: int, streams: int) -> dict[str, float]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "llamacpp_proxy.main",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--llamacpp-server",
        fake_url,
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    if not metrics:
        args.append("--no-metrics")
    env = {**os.environ, "UNLIMITED_API_KEY": KEY}
    proc = subprocess.Popen(args, env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, time.monotonic() + 20)
        headers = {"Authorization": f"Bearer {KEY}"}
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        stream_body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True})
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            for _ in range(50):  # warm: templates, connections, label children
                client.post("/v1/chat/completions", content=body).raise_for_status()
            start = cpu_seconds(proc.pid)
            for _ in range(requests):
                client.post("/v1/chat/completions", content=body).raise_for_status()
            per_request = (cpu_seconds(proc.pid) - start) / requests
            start = cpu_seconds(proc.pid)
            for _ in range(streams):
                with client.stream("POST", "/v1/chat/completions", content=stream_body) as r:
                    for _ in r.iter_bytes():
                        pass
            per_stream = (cpu_seconds(proc.pid) - start) / streams
        return {"request_us": per_request * 1e6, "stream_us": per_stream * 1e6}
    finally:
        proc.terminate()
        proc.wait(10)


def microbench() -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from llamacpp_proxy.observe.metrics import Metrics
    from llamacpp_proxy.observe.snapshot import ModelSnapshot, ServerSnapshot

    snapshot = [
        ModelSnapshot(f"model-{m}", (ServerSnapshot(f"10.0.0.{m}:8080", "ready", 1, 4),), 1, 0)
        for m in range(3)
    ]
    metrics = Metrics(lambda: snapshot)
    keys = [f"key-{k}" for k in range(50)]
    calls = 200_000
    i = 0

    def one() -> None:
        nonlocal i
        i += 1
        metrics.request_finished(
            keys[i % 50], f"model-{i % 3}", "/v1/chat/completions", 200, 40, 10, 5, 0.2, 0.05, None
        )

    per_call = min(timeit.repeat(one, number=calls, repeat=3)) / calls
    scrape = min(timeit.repeat(metrics.exposition, number=20, repeat=3)) / 20
    return {"request_finished_us": per_call * 1e6, "scrape_ms": scrape * 1e3}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench metrics-cost", description=__doc__)
    p.add_argument("--requests", type=int, default=2000, help="non-streamed requests per round")
    p.add_argument("--streams", type=int, default=500, help="streamed requests per round")
    p.add_argument("--rounds", type=int, default=3, help="off/on rounds (best of each kept)")
    args = p.parse_args(argv)
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_llamacpp", str(free_port())],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        fake_url = fake.stdout.readline().strip()
        results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                results[mode].append(run_proxy(fake_url, mode == "on", args.requests, args.streams))
    finally:
        fake.terminate()
        fake.wait(10)
    best = {
        mode: {k: min(r[k] for r in runs) for k in ("request_us", "stream_us")}
        for mode, runs in results.items()
    }
    micro = microbench()
    off, on = best["off"], best["on"]
    req_delta = on["request_us"] - off["request_us"]
    stream_delta = on["stream_us"] - off["stream_us"]
    print(
        f"| proxy CPU (best of {args.rounds} rounds) | --no-metrics (before) "
        "| metrics on (after) | cost |"
    )
    print("|---|---:|---:|---:|")
    print(
        f"| per non-streamed request | {off['request_us']:.0f} µs | {on['request_us']:.0f} µs "
        f"| {req_delta:+.0f} µs ({100 * req_delta / off['request_us']:+.1f}%) |"
    )
    print(
        f"| per streamed request ({TOKENS_PER_STREAM} tokens) | {off['stream_us']:.0f} µs | "
        f"{on['stream_us']:.0f} µs | {stream_delta:+.0f} µs "
        f"({100 * stream_delta / off['stream_us']:+.1f}%) |"
    )
    print(
        f"| per streamed token | {off['stream_us'] / TOKENS_PER_STREAM:.1f} µs | "
        f"{on['stream_us'] / TOKENS_PER_STREAM:.1f} µs | "
        f"{stream_delta / TOKENS_PER_STREAM:+.1f} µs |"
    )
    print()
    print(
        f"In-process: Metrics.request_finished {micro['request_finished_us']:.2f} µs per call "
        f"(50 keys x 3 models); a scrape of them {micro['scrape_ms']:.1f} ms."
    )
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / f"metrics-cost-{stamp}.json").write_text(
        json.dumps({"rounds": results, "best": best, "micro": micro, "args": vars(args)}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
