"""--workers N: processes sharing the listening socket, limits shared through Redis, signals
forwarded by the parent, and a worker that dies stops the proxy (llamacpp_proxy/workers.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import UNLIMITED_KEY
from .test_main import ProxyProcess, run_server
from .test_redis import RedisServer, redis_server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.redis

BOB = "sk-bob-worker-000002"
CAROL = "sk-carol-worker-0003"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def only(worker: int, others: list[int]) -> Iterator[None]:
    """Every new connection goes to `worker`: the others are stopped (SIGSTOP) meanwhile,
    so they cannot accept from the shared socket."""
    for pid in others:
        if pid != worker:
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            if pid != worker:
                os.kill(pid, signal.SIGCONT)


def status(client: httpx.Client, key: str) -> int:
    return client.post(
        "/v1/completions",
        json={"prompt": "x", "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
    ).status_code


@pytest.fixture
def two_workers(
    redis_server: RedisServer,  # noqa: F811
    runner: Any,
    fake: Any,
    tmp_path: Path,
) -> Iterator[tuple[ProxyProcess, list[int], Path]]:
    runner.call(fake.reset)
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[keys.admin]\nkey = "{UNLIMITED_KEY}"\n\n'
        f'[keys.bob]\nkey = "{BOB}"\nrequests = 3\nwindow = 600\n'
    )
    proxy = ProxyProcess(
        fake.url,
        ["--workers", "2", "--redis-url", redis_server.url, "--api-keys-file", str(keys)],
        env={},
    )
    try:
        proxy.read_until("listening on")
        proxy.read_until("listening on")  # both workers are serving
        workers = children(proxy.proc.pid)
        assert len(workers) == 2
        yield proxy, workers, keys
    finally:
        proxy.stop()


def test_more_than_one_worker_needs_redis() -> None:
    done = run_server(["--workers", "2"], {"UNLIMITED_API_KEY": UNLIMITED_KEY})
    assert done.returncode == 2
    assert "--workers above 1 needs --redis-url" in done.stderr


def test_two_workers_serve_share_limits_reload_on_sighup_and_stop_on_sigterm(
    two_workers: tuple[ProxyProcess, list[int], Path],
) -> None:
    proxy, workers, keys = two_workers
    a, b = workers
    # Each worker answers on its own (the other one stopped), and the key's 3 requests are
    # one quota across both: 2 through worker a, then 1 of 2 through worker b.
    with only(a, workers), httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert [status(client, BOB) for _ in range(2)] == [200, 200]
    with only(b, workers), httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert [status(client, BOB) for _ in range(2)] == [200, 429]
        assert status(client, CAROL) == 401

    # SIGHUP to the parent reaches both workers: each reloads the key file.
    keys.write_text(keys.read_text() + f'\n[keys.carol]\nkey = "{CAROL}"\n')
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.read_until("keys reloaded")
    proxy.read_until("keys reloaded")
    for worker in workers:
        with only(worker, workers), httpx.Client(base_url=proxy.url, timeout=10) as client:
            assert status(client, CAROL) == 200

    # SIGTERM to the parent stops both workers, and the parent exits 0.
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.read_until("stopped")
    proxy.read_until("stopped")
    assert proxy.proc.wait(timeout=15) == 0
    assert all(wait_gone(pid) for pid in workers)
    with pytest.raises(httpx.ConnectError):
        httpx.get(proxy.url + "/health", timeout=1)
    log = proxy.stop()
    assert BOB not in log and CAROL not in log


def test_a_worker_that_dies_is_logged_and_stops_the_proxy(
    two_workers: tuple[ProxyProcess, list[int], Path],
) -> None:
    proxy, workers, _ = two_workers
    os.kill(workers[0], signal.SIGKILL)
    log = proxy.read_until("exited unexpectedly")
    assert f"(pid {workers[0]}) exited unexpectedly (killed by SIGKILL)" in log
    assert proxy.proc.wait(timeout=15) == 1
    assert wait_gone(workers[1])


def test_a_worker_stopped_on_its_own_stops_the_others_and_the_proxy_exits_0(
    two_workers: tuple[ProxyProcess, list[int], Path],
) -> None:
    # systemd's default KillMode signals every process of the unit, workers included.
    proxy, workers, _ = two_workers
    os.kill(workers[1], signal.SIGTERM)
    log = proxy.read_until("stopping the others")
    assert f"(pid {workers[1]}) stopped; stopping the others" in log
    assert proxy.proc.wait(timeout=15) == 0
    assert wait_gone(workers[0])


def test_workers_stop_when_the_parent_is_killed(
    two_workers: tuple[ProxyProcess, list[int], Path],
) -> None:
    # No orphan goes on serving the port unsupervised after a kill -9 of the parent.
    proxy, workers, _ = two_workers
    proxy.proc.kill()
    proxy.proc.wait(timeout=10)
    assert all(wait_gone(pid) for pid in workers)
    with pytest.raises(httpx.ConnectError):
        httpx.get(proxy.url + "/health", timeout=1)
