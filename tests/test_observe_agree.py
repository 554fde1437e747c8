"""What the gateway reports agrees with itself: the usage ledger, /metrics, the status
page's day and the access log say the same about each request (hostile review hobs)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamacpp_proxy.observe import usage_report
from llamacpp_proxy.observe.logs import AccessLog
from llamacpp_proxy.observe.metrics import Metrics
from llamacpp_proxy.observe.usage import UsageLedger, UsageRecord

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
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(
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


def test_a_stream_that_ends_with_an_error_event_is_a_failed_request_everywhere(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    # Before: a stream llama.cpp broke off (the client's SDK raised the final error event)
    # was a 200 in the ledger and the metrics: the report's `errors` column and the
    # dashboard's error rate did not see it; only the access log's error= field did.
    db = tmp_path / "u.db"
    stack, stream = observed(make_stack, db)
    stack.fake.script.stream_error_after_tokens = 3
    client = stack.client()
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
    stack.fake.script.stream_error_after_tokens = None
    ok = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert ok.usage is not None

    assert ledger_statuses(stack, db, 2) == [502, 200]
    assert stack.wait_for(lambda: len(stream.getvalue().splitlines()) >= 2)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["status"], line["error"]) for line in lines[:2]] == [
        (502, "upstream_error"),
        (200, None),
    ]
    assert lines[0]["completion_tokens"] == 3  # what llama.cpp generated is still charged
    assert metric_statuses(stack) == {"502": 1.0, "200": 1.0}
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        assert usage_report.main(["--usage-db", str(db), "--format", "json"]) == 0
    (row,) = json.loads(report.getvalue())
    assert (row["requests"], row["errors"]) == (2, 1)


# -- the ledger under trouble ----------------------------------------------------------------


def ledger_file_rows(path: Path) -> list[str | None]:
    with contextlib.closing(sqlite3.connect(path)) as con:
        return [k for (k,) in con.execute("SELECT request_id FROM usage ORDER BY time")]


def rec(request_id: str) -> UsageRecord:
    return UsageRecord(1.0, "k", "m", None, "/v1/completions", 200, 3, 4, request_id=request_id)


def test_a_ledger_file_deleted_while_running_is_made_again_and_no_row_is_lost(
    tmp_path: Path,
) -> None:
    # Before: the writer kept its connection to the unlinked file, so every later row was
    # "written" (written_records went up) into a file nobody could open: a bill silently
    # empty from then on. Now each batch checks the path still names the file it opened.
    db = tmp_path / "usage.db"
    ledger = UsageLedger(db)
    try:
        ledger.record(rec("before"))
        assert ledger.flush()
        for leftover in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            leftover.unlink(missing_ok=True)  # an operator's rm, a cleanup job
        ledger.record(rec("after"))
        assert ledger.flush()
        assert ledger_file_rows(db) == ["after"]
        # And a file replaced under it (restored from a backup, moved aside and recreated).
        db.rename(tmp_path / "aside.db")
        ledger.record(rec("replaced"))
        assert ledger.flush()
        assert ledger_file_rows(db) == ["replaced"]
        assert ledger.dropped_records == 0
    finally:
        ledger.close()


def test_rows_wait_while_another_process_holds_the_database_locked_and_are_written_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: a write lock held past the busy timeout (a backup, an operator's sqlite3 shell
    # in a transaction, a VACUUM) dropped the whole batch: billed requests lost for a lock
    # that was gone a moment later. Now the rows wait (at most max_pending of them) and are
    # written once the lock is released; the failure is still logged once.
    db = tmp_path / "usage.db"
    caplog.set_level(logging.WARNING, "llamacpp_proxy.usage")
    ledger = UsageLedger(db, busy_timeout=0.01, flush_interval=0.01)
    try:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # the write lock, held
            for i in range(3):
                ledger.record(rec(f"r{i}"))
            assert wait_until(lambda: ledger.failed_writes >= 2)
            assert not ledger.flush(timeout=0.05)  # cannot be written yet
            other.execute("COMMIT")
        assert ledger.flush()
        assert ledger_file_rows(db) == ["r0", "r1", "r2"]
        assert ledger.dropped_records == 0
        messages = [r.getMessage() for r in caplog.records if r.name == "llamacpp_proxy.usage"]
        assert len(messages) == 2
        assert "cannot be written" in messages[0] and "written again" in messages[1]
    finally:
        ledger.close()


def test_rows_a_closing_ledger_cannot_write_are_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Shutdown while the database is locked: the rows are lost, but not silently.
    db = tmp_path / "usage.db"
    caplog.set_level(logging.WARNING, "llamacpp_proxy.usage")
    ledger = UsageLedger(db, busy_timeout=0.01, flush_interval=0.01)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        ledger.record(rec("r0"))
        ledger.record(rec("r1"))
        ledger.close(timeout=5)
        other.execute("COMMIT")
    assert ledger.dropped_records == 2
    assert not ledger._thread.is_alive()
    assert any("2 row(s) not written" in r.getMessage() for r in caplog.records)
    assert ledger_file_rows(db) == []


def test_a_failing_ledger_is_tried_again_on_its_interval_not_at_the_request_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: past batch_size, every record() woke the writer, which reopened the file and
    # failed again at once (a full disk fails without waiting): retries at the request
    # rate, each taking the GIL from the event loop. Now a failing ledger's writer waits
    # for its flush_interval (or a flush()), however many rows arrive.
    db = tmp_path / "usage.db"
    ledger = UsageLedger(db, batch_size=2, flush_interval=60, busy_timeout=0)
    try:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            ledger.record(rec("r0"))
            ledger.record(rec("r1"))  # batch_size: wakes the writer, which fails
            assert wait_until(lambda: ledger.failed_writes == 1 and ledger.pending == 2)
            wakes: list[int] = []
            monkeypatch.setattr(ledger._wake, "notify", lambda n=1: wakes.append(n))
            for i in range(2, 50):
                ledger.record(rec(f"r{i}"))
            assert wakes == []
            monkeypatch.undo()
            other.execute("COMMIT")
        assert ledger.flush()  # a flush still asks for a try now
        assert len(ledger_file_rows(db)) == 50
    finally:
        ledger.close()


def test_rows_being_written_count_once_in_tokens_since(tmp_path: Path) -> None:
    # tokens_since seeds a key's budget from the ledger (start-up, a reload). Before: rows
    # the writer had taken out of the queue but not yet committed were in neither place,
    # and the budget read them as unspent.
    db = tmp_path / "usage.db"
    ledger = UsageLedger(db, busy_timeout=0.3, flush_interval=60)
    try:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # the writer's insert waits on this lock
            ledger.record(rec("r0"))  # 7 tokens
            assert ledger.flush(timeout=0) is False  # wakes the writer, which takes the row
            assert wait_until(lambda: ledger._writing)
            assert ledger.tokens_since("k", 0.0) == 7
            other.execute("COMMIT")
        assert ledger.flush()
        assert ledger.tokens_since("k", 0.0) == 7
    finally:
        ledger.close()


def test_tokens_since_does_not_wait_out_a_write_on_a_locked_file(tmp_path: Path) -> None:
    # tokens_since runs on the event loop (a budget period's first request). A write stuck
    # on another process's lock holds the writer's commit lock for its whole busy timeout:
    # waiting for it stalled every request for that long. It now counts the batch being
    # written instead, while that write is still waiting.
    db = tmp_path / "usage.db"
    ledger = UsageLedger(db, busy_timeout=30, flush_interval=60)
    try:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # the writer's insert waits on this lock
            ledger.record(rec("r0"))  # 7 tokens
            assert ledger.flush(timeout=0) is False  # wakes the writer, which takes the row
            assert wait_until(lambda: ledger._writing)
            assert ledger.tokens_since("k", 0.0) == 7
            assert ledger._writing  # answered while the write still waits on the lock
            other.execute("COMMIT")
        assert ledger.flush()
        assert ledger.tokens_since("k", 0.0) == 7
    finally:
        ledger.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition another thread makes true, with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- the report ------------------------------------------------------------------------------


def test_the_report_refuses_a_period_that_ends_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: exit 0 and "(no requests in this period)", which reads as a quiet period,
    # for swapped dates or a --since in the future.
    db = tmp_path / "usage.db"
    UsageLedger(db).close()
    for argv in (
        ["--since", "2026-02-01", "--until", "2026-01-01"],
        ["--since", "2026-01-01", "--until", "2026-01-01"],
        ["--since", "9999-01-01"],
    ):
        with pytest.raises(SystemExit) as exit_:
            usage_report.main(["--usage-db", str(db), *argv])
        assert exit_.value.code == 2
        assert "--since must be before --until" in capsys.readouterr().err


# -- the ledger's health in /metrics ---------------------------------------------------------


def samples(text: str, prefix: str) -> dict[str, float]:
    """Samples whose name starts with `prefix`, by name and labels, from an exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix) and not s.name.endswith("_created"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_metrics_show_the_ledgers_rows_written_waiting_and_lost(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    # Before: rows the ledger could not write were only a log line and a Python attribute;
    # nothing a Prometheus alert could watch, while operators bill from the ledger.
    stack = make_stack(usage_db=tmp_path / "gw.db")
    assert stack.http.post("/v1/completions", json={"prompt": "x"}, headers=AUTH).is_success
    ledger = stack.ctx.usage
    assert ledger is not None
    assert stack.wait_for(lambda: ledger.recorded == 1)
    assert ledger.flush()
    assert samples(stack.http.get("/metrics").text, "llamacpp_proxy_usage") == {
        "llamacpp_proxy_usage_rows_total{state=recorded}": 1.0,
        "llamacpp_proxy_usage_rows_total{state=written}": 1.0,
        "llamacpp_proxy_usage_rows_total{state=dropped}": 0.0,
        "llamacpp_proxy_usage_pending_rows{}": 0.0,
        "llamacpp_proxy_usage_write_failures_total{}": 0.0,
    }

    # A ledger whose file is locked: its rows wait, and the failures show.
    db = tmp_path / "locked.db"
    locked = UsageLedger(db, busy_timeout=0.01, flush_interval=0.01, max_pending=2)
    metrics = Metrics(list, usage=locked)
    try:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            for i in range(3):
                locked.record(rec(f"r{i}"))
            assert wait_until(lambda: locked.failed_writes >= 1)
            seen = samples(metrics.exposition().decode(), "llamacpp_proxy_usage")
            other.execute("COMMIT")
        assert seen["llamacpp_proxy_usage_rows_total{state=recorded}"] == 3
        assert seen["llamacpp_proxy_usage_rows_total{state=written}"] == 0
        assert seen["llamacpp_proxy_usage_rows_total{state=dropped}"] == 1  # over max_pending
        assert seen["llamacpp_proxy_usage_pending_rows{}"] == 2
        assert seen["llamacpp_proxy_usage_write_failures_total{}"] >= 1
    finally:
        locked.close()


def test_the_report_reads_a_stopped_gateways_ledger_without_write_access(
    tmp_path: Path,
) -> None:
    # Before: once the gateway had stopped (its -wal and -shm files gone), a user who may
    # read the ledger but not write its directory got "attempt to write a readonly
    # database" (exit 2): SQLite's read-only WAL reader wants to create the -shm file.
    # docs/deployment.md promises reports "as root or any user who can read the file".
    shared = Path(tempfile.mkdtemp(prefix="hobs-ledger-"))
    try:
        shared.chmod(0o755)
        db = shared / "usage.db"
        ledger = UsageLedger(db)
        ledger.record(rec("r0"))
        ledger.close()
        assert sorted(p.name for p in shared.iterdir()) == ["usage.db"]
        db.chmod(0o644)
        program = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r}); "
            "from llamacpp_proxy.observe import usage_report; "
            f"sys.exit(usage_report.main(['--usage-db', {str(db)!r}, '--since', '1970-01-01', "
            "'--format', 'json']))"
        )
        if os.geteuid() == 0:  # root writes anywhere: read as nobody instead
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        else:
            shared.chmod(0o555)  # this user may read, not write, the directory
            argv = []
        done = subprocess.run(
            [*argv, sys.executable, "-c", program], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        (row,) = json.loads(done.stdout)
        assert (row["key"], row["requests"], row["total_tokens"]) == ("k", 1, 7)
        assert sorted(p.name for p in shared.iterdir()) == ["usage.db"]  # nothing created
    finally:
        shared.chmod(0o755)
        shutil.rmtree(shared)
