"""The paced benchmark's instruments (issue 13): the fake stamps every token with the moment
it wrote it, honours `Connection: close` (so a client can measure it directly, the floor),
and `stream_client.py pace` turns the stamps into per-token delays. Correctness only: the
figures themselves belong to scripts/bench."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def paced_fake() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "paced_upstream.py"), "--rate", "200", "--first-ms", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), line
        yield int(line.split()[1])
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_every_token_carries_its_write_time_and_the_stream_can_close(paced_fake: int) -> None:
    body = {"prompt": "hi", "n_predict": 5, "stream": True}
    with httpx.Client(base_url=f"http://127.0.0.1:{paced_fake}", timeout=30) as client:
        before = time.monotonic_ns() // 1000
        # Kept alive first: two streams on one connection, as the proxy's pool sends them.
        texts = []
        for _ in range(2):
            with client.stream("POST", "/completion", json=body) as response:
                assert response.status_code == 200
                events = [
                    json.loads(line[6:])
                    for line in response.iter_lines()
                    if line.startswith("data: ")
                ]
            assert [e["stop"] for e in events] == [False] * 5 + [True]
            texts += [e["content"] for e in events[:-1]]
        after = time.monotonic_ns() // 1000
        for text in texts:
            assert text.startswith("@")
            assert before <= int(text[1:]) <= after


def test_pace_client_reports_a_delay_for_every_token(paced_fake: int, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompt": "hi", "n_predict": 20, "stream": True}))
    done = subprocess.run(
        [sys.executable, str(BENCH / "stream_client.py"), "pace", "--port", str(paced_fake),
         "--path", "/completion", "--body-file", str(body), "--concurrency", "4",
         "--duration", "1", "--ramp", "0.2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["failed"] == 0
    # Streams ended and new ones started: the fake closed each (Connection: close).
    assert result["streams_completed"] >= 1
    assert result["events"] > 0
    # Every counted event but a final `stop` one carries a stamp (a read can straddle the
    # window's edges, hence the slack of one event per stream).
    assert result["stamped_events"] >= result["events"] - 2 * (result["streams_completed"] + 4)
    delay = result["delay_ms"]
    assert 0 <= delay["p50"] <= delay["p99"] <= delay["max"]


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_sigterm_stops_a_paced_run_and_everything_it_started(tmp_path: Path) -> None:
    """`timeout scripts/bench paced ...` or a `kill`: the run stops the paced fake, the proxy
    and the stream client it started, as Ctrl-C does (before, only SIGINT did, and a
    SIGTERM left them running)."""
    import os
    import signal

    run = subprocess.Popen(
        [
            sys.executable,
            str(BENCH / "bench.py"),
            "paced",
            "--points",
            "20x5",
            "--search-top",
            "0",
            "--duration",
            "60",
            "--out-dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        started: set[int] = set()
        while len(started) < 2 and time.monotonic() < deadline:  # the fake and the proxy
            started |= _children(run.pid)
            time.sleep(0.1)
        assert len(started) >= 2, "the run did not start its processes"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 130
        still = [pid for pid in started if Path(f"/proc/{pid}").exists()]
        for pid in still:  # leave nothing behind, whatever the outcome
            os.kill(pid, signal.SIGKILL)
        assert still == []
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=10)
