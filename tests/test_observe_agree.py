"""What the gateway reports agrees with itself: the usage ledger, /metrics, the status
page's day and the access log say the same about each request (hostile review hobs)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llamacpp_proxy.observe.logs import AccessLog

from .conftest import UNLIMITED_KEY, Stack

AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def observed(
    make_stack: Callable[..., Stack], db: Path, **overrides: Any
) -> tuple[Stack, io.StringIO]:
    """A gateway with a ledger, metrics and a JSON access log written to a string."""
    stack = make_stack(usage_db=db, access_log=True, **overrides)
    stream = io.StringIO()
    stack.ctx.access_log = AccessLog(stream, True, stack.runner.loop.call_soon)
    return stack, stream


def ledger_statuses(stack: Stack, db: Path, count: int) -> list[int]:
    ledger = stack.ctx.usage
    assert ledger is not None
    assert stack.wait_for(lambda: ledger.recorded >= count)
    assert ledger.flush()
    with contextlib.closing(sqlite3.connect(db)) as con:
        return [s for (s,) in con.execute("SELECT status FROM usage ORDER BY time")]


def metric_statuses(stack: Stack) -> dict[str, float]:
    """llamacpp_proxy_requests_total by status, for the unlimited key's chat requests."""
    text = stack.http.get("/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "llamacpp_proxy_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["key"] == "unlimited":
                    out[sample.labels["status"]] = sample.value
    return out


def test_a_client_that_leaves_is_499_in_the_ledger_the_metrics_and_the_access_log(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    # Before: the ledger said 499 (the client left), the metrics and the access log 200 for
    # the same request, so the dashboards' error rate and the bill disagreed.
    db = tmp_path / "u.db"
    stack, stream = observed(make_stack, db)
    gate = asyncio.Event()
    stack.fake.script.mid_gate = gate  # each stream stops after its first token
    with (
        httpx.Client(base_url=stack.url, timeout=10) as leaver,
        leaver.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH
        ) as s,
    ):
        for line in s.iter_lines():
            if line.startswith("data: {"):
                break  # leave with the stream half read
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1)
    stack.runner.call(gate.set)
    stack.fake.script.mid_gate = None
    # A non-streamed request the client gives up on while llama.cpp still works on it.
    slow = asyncio.Event()
    stack.fake.script.gate = slow
    body = json.dumps(CHAT).encode()
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as leaver:
        leaver.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {UNLIMITED_KEY}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert stack.wait_for(lambda: stack.fake.active >= 1)  # llama.cpp has it: leave
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 2)
    stack.runner.call(slow.set)
    stack.fake.script.gate = None
    ok = stack.http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert ok.status_code == 200

    assert ledger_statuses(stack, db, 3) == [499, 499, 200]
    assert stack.wait_for(lambda: len(stream.getvalue().splitlines()) >= 3)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["status"] for line in lines[:3]] == [499, 499, 200]
    assert metric_statuses(stack) == {"499": 2.0, "200": 1.0}
