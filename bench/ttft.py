#!/usr/bin/env python3
"""Time to first token added by the proxy, against the real llama-server (stdlib only;
docs/benchmarks.md, "Time to first token against llama-server").

  scripts/bench ttft [--samples 200]

Starts llama-server with the e2e tests' ChatML model (SmolLM2-135M-Instruct, from
scripts/install-llama-server's cache; LLAMA_SERVER_BIN / LLAMACPP_PROXY_CACHE override) on a
free loopback port, 1 slot, and the proxy in front of it. Then, SAMPLES times, one streamed
request straight at llama-server's /completion and two through the proxy's /v1/completions
(one on a new connection, one on a kept-alive connection), with the same short prompt (so
llama-server's prompt cache serves them alike), in a random order each time so that the
machine's noise hits every side alike. Per request: the time from sending it (the
connection already open) to reading the first event that carries text. Reported: p50/p99
of each side, and the added time = proxy - direct per round, its median with a 95%
bootstrap confidence interval, for each way of connecting to the proxy.

Direct requests always use a new connection: llama-server closes the connection of every
streamed answer, so no client of it can do otherwise. Through the proxy, "new connection"
is like with like (the proxy then accepts a connection per request, as llama-server does);
"kept-alive" is how the OpenAI SDKs (httpx) and most clients talk to the proxy, whose client
connections stay open.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # bench/bench.py: processes, ports, the proxy

PROMPT = "The capital of France is"  # plain text: the proxy sends it as it is
TOKENS = 4  # short answers: what is measured ends at the first token


def llama_files() -> tuple[Path, Path]:
    cache = Path(
        os.environ.get("LLAMACPP_PROXY_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamacpp-proxy"
    )
    binary = Path(os.environ.get("LLAMA_SERVER_BIN") or cache / "bin" / "llama-server")
    model = cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return binary, model


def first_token_ms(port: int, path: str, body: bytes, key: str | None, field: str) -> float:
    """Send one streamed request on a new connection; ms until the first event whose
    `field` (a dotted path into the event's JSON) is a non-empty string. Reads to the end."""
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {b.HOST}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if key:
        head.append(f"Authorization: Bearer {key}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    first: float | None = None
    with socket.create_connection((b.HOST, port), timeout=60) as s:
        t0 = time.perf_counter()
        s.sendall(request)
        buf = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            if first is not None:
                continue
            found, buf = _first_text(buf + data, field)
            if found:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"no token in the stream from {path}: {buf[:300]!r}")
    return (first - t0) * 1000


def _first_text(buf: bytes, field: str) -> tuple[bool, bytes]:
    """(an event of buf whose `field` is a non-empty string was found, the unread rest)."""
    while b"\n\n" in buf:
        event, buf = buf.split(b"\n\n", 1)
        line = event[event.find(b"data: ") :]
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        value: Any = json.loads(line[6:].split(b"\r\n", 1)[0])
        for part in field.split("."):
            value = value[int(part)] if isinstance(value, list) else value.get(part)
        if isinstance(value, str) and value:
            return True, buf
    return False, buf


class KeptAlive:
    """One connection to the proxy for many requests, as the SDKs keep theirs."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key
        self.sock: socket.socket | None = None
        self.connects = 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def first_token_ms(self, path: str, body: bytes, field: str) -> float:
        """As first_token_ms, on the kept connection (opened before the clock starts if
        there is none); reads the chunked answer to its end, leaving the connection ready."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {b.HOST}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Authorization: Bearer {self.key}\r\n\r\n"
        )
        request = head.encode() + body
        if self.sock is None:
            self.sock = socket.create_connection((b.HOST, self.port), timeout=60)
            self.connects += 1
        s = self.sock
        first: float | None = None
        try:
            t0 = time.perf_counter()
            s.sendall(request)
            raw = b""
            while b"\r\n\r\n" not in raw:
                raw += self._recv()
            response_head, raw = raw.split(b"\r\n\r\n", 1)
            if b" 200 " not in response_head.split(b"\r\n", 1)[0] or (
                b"transfer-encoding: chunked" not in response_head.lower()
            ):
                raise RuntimeError(f"unexpected answer from {path}: {response_head[:300]!r}")
            events = b""
            while True:  # the chunked body, chunk by chunk, to its last (empty) chunk
                while b"\r\n" not in raw:
                    raw += self._recv()
                size_line, raw = raw.split(b"\r\n", 1)
                size = int(size_line.split(b";", 1)[0], 16)
                while len(raw) < size + 2:
                    raw += self._recv()
                if first is None:
                    events += raw[:size]
                    found, events = _first_text(events, field)
                    if found:
                        first = time.perf_counter()
                raw = raw[size + 2 :]
                if size == 0:
                    break
        except BaseException:
            self.close()
            raise
        if first is None:
            raise RuntimeError(f"no token in the stream from {path} (kept-alive)")
        return (first - t0) * 1000

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("the proxy closed a kept-alive connection")
        return data


def bootstrap_median(values: list[float], reps: int = 2000, seed: int = 13) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(reps))
    return meds[int(0.025 * reps)], meds[int(0.975 * reps) - 1]


def added(diffs: list[float]) -> dict[str, Any]:
    """The time the proxy added, per round (proxy - direct): median, its 95% bootstrap
    confidence interval, mean and p90."""
    return {
        "p50": statistics.median(diffs),
        "ci95": list(bootstrap_median(diffs)),
        "mean": statistics.fmean(diffs),
        "p90": b_pct(diffs, 90),
    }


def run_ttft(args: argparse.Namespace, bench: b.Bench, procs: b.Processes) -> dict[str, Any]:
    binary, model = llama_files()
    if not binary.exists() or not model.exists():
        return {"error": f"llama-server or the model is missing ({binary}, {model}): "
                "run scripts/install-llama-server"}  # fmt: skip
    port = b.free_port()
    server = procs.start(
        "llama-server",
        [str(binary), "--host", b.HOST, "--port", str(port), "-m", str(model),
         "-c", "2048", "-np", "1", "--no-webui"]
        + (["-t", str(args.llama_threads)] if args.llama_threads else []),
    )  # fmt: skip
    try:
        b.wait_ready(f"http://{b.HOST}:{port}/health", server, 180)
    except RuntimeError as exc:
        procs.stop(server)
        return {"error": f"llama-server did not start: {exc}: {procs.log_tail('llama-server')}"}
    proxy, proxy_port = bench.start_proxy("proxy-ttft", f"http://{b.HOST}:{port}", [])
    direct_body = json.dumps(
        {"prompt": PROMPT, "n_predict": TOKENS, "stream": True, "cache_prompt": True}
    ).encode()
    proxy_body = json.dumps(
        {"model": "bench", "prompt": PROMPT, "max_tokens": TOKENS, "stream": True}
    ).encode()

    def direct() -> float:
        return first_token_ms(port, "/completion", direct_body, None, "content")

    def via_proxy() -> float:
        return first_token_ms(
            proxy_port, "/v1/completions", proxy_body, b.UNLIMITED_KEY, "choices.0.text"
        )

    kept = KeptAlive(proxy_port, b.UNLIMITED_KEY)

    def via_proxy_kept() -> float:
        return kept.first_token_ms("/v1/completions", proxy_body, "choices.0.text")

    sides = [direct, via_proxy, via_proxy_kept]
    try:
        for _ in range(10):  # warm every path (and llama-server's prompt cache)
            for side in sides:
                side()
        rng = random.Random(7)
        rounds: list[tuple[float, float, float]] = []
        busy0, t0 = b.machine_busy(), time.monotonic()
        load0 = Path("/proc/loadavg").read_text().split()[:3]
        failures: list[str] = []
        while len(rounds) < args.samples:
            order = list(range(len(sides)))
            rng.shuffle(order)
            got = [0.0] * len(sides)
            try:
                for i in order:
                    got[i] = sides[i]()
            except (OSError, RuntimeError) as exc:  # counted and reported, the round dropped
                failures.append(str(exc)[:200])
                if len(failures) > max(10, args.samples // 10):
                    raise RuntimeError(f"too many failed requests: {failures[:3]}") from None
                continue
            rounds.append((got[0], got[1], got[2]))
        wall = time.monotonic() - t0
        busy = (b.machine_busy() - busy0) / wall / (os.cpu_count() or 1) * 100
    finally:
        kept.close()
        procs.stop(proxy)
        procs.stop(server)
    pairs = [(d, p) for d, p, _ in rounds]
    kept_ms = [k for _, _, k in rounds]
    kept_diffs = [k - d for d, _, k in rounds]
    ds = [d for d, _ in pairs]
    ps = [p for _, p in pairs]
    diffs = [p - d for d, p in pairs]
    new, kept_alive = added(diffs), added(kept_diffs)
    result: dict[str, Any] = {
        "samples": len(pairs),
        "model": model.name,
        "direct_ms": {"p50": statistics.median(ds), "p99": b_pct(ds, 99)},
        "proxy_ms": {"p50": statistics.median(ps), "p99": b_pct(ps, 99)},
        "added_ms": new,
        "proxy_kept_alive_ms": {"p50": statistics.median(kept_ms), "p99": b_pct(kept_ms, 99)},
        "added_kept_alive_ms": kept_alive,
        "kept_alive_connects": kept.connects,
        "failed_requests": len(failures),
        "failures": failures[:5],
        "machine_busy_pct": busy,
        "loadavg_start": load0,
    }
    b.log(
        f"ttft vs llama-server, {len(rounds)} rounds: direct p50"
        f" {result['direct_ms']['p50']:.2f} ms, proxy p50 {result['proxy_ms']['p50']:.2f} ms;"
        f" added p50 {new['p50']:.2f} ms (95% CI {new['ci95'][0]:.2f} to"
        f" {new['ci95'][1]:.2f}); kept-alive to the proxy: added p50 {kept_alive['p50']:.2f}"
        f" ms (95% CI {kept_alive['ci95'][0]:.2f} to {kept_alive['ci95'][1]:.2f});"
        f" machine {busy:.0f}% busy"
    )
    return result


def b_pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def markdown(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return []
    lines = ["### Time to first token against llama-server (issue 13)", ""]
    if t.get("error"):
        return [*lines, f"Not measured: {t['error']}"]
    a = t["added_ms"]
    lines += [
        f"{t['samples']} rounds, {t['model']}, short prompt, {TOKENS} tokens, one request at a "
        f"time, direct and proxy in random order per round; machine "
        f"{t['machine_busy_pct']:.0f}% busy (load average {' '.join(t['loadavg_start'])} at "
        "start).",
        "",
        "| | p50 ms | p99 ms |",
        "|---|---:|---:|",
        f"| llama-server direct (/completion) | {t['direct_ms']['p50']:.2f} | "
        f"{t['direct_ms']['p99']:.2f} |",
        f"| through the proxy (/v1/completions), new connection | {t['proxy_ms']['p50']:.2f} | "
        f"{t['proxy_ms']['p99']:.2f} |",
    ]
    k = t.get("added_kept_alive_ms")
    if k:
        lines.append(
            f"| through the proxy, kept-alive connection | {t['proxy_kept_alive_ms']['p50']:.2f} "
            f"| {t['proxy_kept_alive_ms']['p99']:.2f} |"
        )
    lines += [
        "",
        f"Added by the proxy (median of the paired differences), new connection: "
        f"**{a['p50']:.2f} ms**, 95% bootstrap CI {a['ci95'][0]:.2f} to {a['ci95'][1]:.2f} ms "
        f"(mean {a['mean']:.2f}, p90 {a['p90']:.2f}).",
    ]
    if k:
        lines.append(
            f"Kept-alive connection: **{k['p50']:.2f} ms**, 95% CI {k['ci95'][0]:.2f} to "
            f"{k['ci95'][1]:.2f} ms (mean {k['mean']:.2f}, p90 {k['p90']:.2f}; "
            f"{t['kept_alive_connects']} connection(s) opened)."
        )
    if t.get("failed_requests"):
        lines.append(
            f"{t['failed_requests']} requests failed (their rounds dropped), e.g. "
            f"`{t['failures'][0][:160]}`"
        )
    return lines


def main(argv: list[str]) -> int:
    import shutil
    import tempfile
    from datetime import UTC, datetime

    p = argparse.ArgumentParser(prog="scripts/bench ttft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("mode", choices=["ttft"])
    p.add_argument("--samples", type=int, default=200, help="rounds (direct and both proxy sides)")
    p.add_argument(
        "--llama-threads",
        type=int,
        default=0,
        help="llama-server's -t (compute threads; 0: its default, one per core). On a GPU "
        "they wait for the GPU; on this CPU-only box they take every core the proxy needs",
    )
    p.add_argument("--out-dir", default=str(b.ROOT / "bench-results"))
    args = p.parse_args(argv)
    args.levers = ""
    tmp = Path(tempfile.mkdtemp(prefix="llamacpp-proxy-ttft-"))
    os.chmod(tmp, 0o755)
    procs = b.Processes(tmp)
    b.stop_on_signals()
    try:
        result = run_ttft(args, b.Bench(args, tmp, procs), procs)
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    result["git"] = b.git_state()
    result["command"] = "scripts/bench " + " ".join(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-ttft.json"
    out.write_text(json.dumps(result, indent=2))
    text = "\n".join(markdown(result)) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    b.log(f"results in {out}")
    return 1 if result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
