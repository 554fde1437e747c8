"""What operators read: one access line per request, each failure logged once, no secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from llamacpp_proxy.observe.logs import (
    AccessLog,
    BackgroundWriter,
    JsonFormatter,
    PlainFormatter,
    configure_logging,
)

from .conftest import LIMITED_KEY, UNLIMITED_KEY
from .test_api import CHAT, post
from .test_main import free_port


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_access_line_per_request_without_the_key(
    make_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stack = make_stack(access_log=True)
    stream = io.StringIO()
    stack.ctx.access_log = AccessLog(stream, True, stack.runner.loop.call_soon)
    post(
        stack,
        "/v1/chat/completions",
        {"messages": CHAT},
        key=LIMITED_KEY,
        headers={"X-Request-Id": "log-1"},
    )
    post(stack, "/v1/completions", {"prompt": "x"}, key="sk-wrong-key-123")
    assert stack.wait_for(lambda: len(stream.getvalue().splitlines()) >= 2)
    ok, denied = json_lines(stream)[:2]
    assert ok["request_id"] == "log-1" and ok["key"] == "limited"
    assert ok["path"] == "/v1/chat/completions" and ok["status"] == 200
    assert ok["completion_tokens"] == 10 and ok["prompt_tokens"] > 0
    assert ok["latency_ms"] >= 0 and ok["logger"] == "llamacpp_proxy.access"
    assert denied["status"] == 401 and denied["key"] is None
    text = stream.getvalue() + caplog.text
    for secret in (LIMITED_KEY, UNLIMITED_KEY, "sk-wrong-key-123"):
        assert secret not in text


def test_access_lines_are_written_together_once_per_loop_iteration() -> None:
    scheduled: list[Any] = []
    stream = io.StringIO()
    log = AccessLog(stream, False, scheduled.append, now=lambda: 1_795_600_000.25)
    log.write({"request_id": "r1", "key": "alice", "status": 200, "error": None})
    log.write({"request_id": "r2", "key": None, "status": 401})
    assert stream.getvalue() == "" and len(scheduled) == 1  # one flush for both
    scheduled[0]()
    first, second = stream.getvalue().splitlines()
    assert first == (
        "2026-11-25T09:46:40.250Z INFO llamacpp_proxy.access: request_id=r1 key=alice status=200"
    )
    assert second.endswith("request_id=r2 status=401")


def test_no_access_log_writes_nothing(make_stack: Any) -> None:
    stack = make_stack(access_log=False)
    assert stack.ctx.access_log is None
    assert post(stack, "/v1/completions", {"prompt": "x"}).status_code == 200


def test_formatters_plain_and_json() -> None:
    record = logging.LogRecord(
        "llamacpp_proxy", logging.WARNING, __file__, 1, "boom %s", ("x",), None
    )
    assert PlainFormatter().format(record).endswith("WARNING llamacpp_proxy: boom x")
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "boom x" and line["level"] == "warning"


def test_mid_stream_failure_is_logged_once_with_the_request_id(
    stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stack.fake.script.drop_after_tokens = 2
    post(
        stack,
        "/v1/chat/completions",
        {"messages": CHAT, "stream": True},
        headers={"X-Request-Id": "drop-1"},
    )
    assert stack.wait_for(lambda: any("drop-1" in r.getMessage() for r in caplog.records))
    mentions = [r for r in caplog.records if "drop-1" in r.getMessage()]
    assert len(mentions) == 1 and mentions[0].levelno == logging.WARNING


def test_upstream_failure_before_the_stream_is_logged_once(
    stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stack.fake.script.fail_status = 500
    post(stack, "/v1/completions", {"prompt": "x"}, headers={"X-Request-Id": "fail-1"})
    assert stack.wait_for(lambda: any("fail-1" in r.getMessage() for r in caplog.records))
    assert len([r for r in caplog.records if "fail-1" in r.getMessage()]) == 1


def _raw_request(port: int, data: bytes) -> bytes:
    """Send raw bytes (a header no HTTP library would send) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize("json_lines", [False, True])
def test_tornados_own_message_for_a_malformed_header_never_shows_the_key(
    stack: Any, json_lines: bool
) -> None:
    """Item 16: Tornado logs 'Invalid header value ...' (tornado.general) with the header."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("debug", json_lines, stream)
    try:
        secret = UNLIMITED_KEY
        answer = _raw_request(
            stack.port,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Authorization: Bearer " + secret.encode() + b"\x0c\r\n\r\n{}",
        )
        assert answer.startswith(b"HTTP/1.1 400")
        assert stack.wait_for(lambda: "tornado.general" in stream.getvalue())
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    text = stream.getvalue()
    assert "Bearer [redacted]" in text
    assert secret not in text and secret[3:] not in text


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        ("connect to redis://app:hunter2-pw@10.0.0.5:6379/0 failed", "hunter2-pw"),
        ("header was 'Bearer abc.def-ghi'", "abc.def-ghi"),
        ("got Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("GET /v1/models?api_key=topsecret1", "topsecret1"),
        ("key sk-live-0123456789abcdef pasted in a prompt", "sk-live-0123456789abcdef"),
    ],
)
def test_every_log_line_is_redacted_whatever_logger_writes_it(message: str, secret: str) -> None:
    for formatter in (PlainFormatter(), JsonFormatter()):
        record = logging.LogRecord("some.library", logging.ERROR, __file__, 1, message, (), None)
        line = formatter.format(record)
        assert secret not in line and "[redacted]" in line


class BlockedStream(io.StringIO):
    """A stderr whose reader stalled: every write waits until `unblock` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.unblock = threading.Event()

    def write(self, text: str) -> int:
        self.unblock.wait(30)
        return super().write(text)


def test_a_stalled_log_reader_never_blocks_the_writer_and_drops_are_reported() -> None:
    stream = BlockedStream()
    writer = BackgroundWriter(stream, max_chars=1000)
    wrote = threading.Event()

    def log_a_lot() -> None:  # as the event loop would: it must never wait on the stream
        for i in range(200):
            writer.write(f"line {i:03d} " + "x" * 40 + "\n")
        wrote.set()

    threading.Thread(target=log_a_lot, daemon=True).start()
    assert wrote.wait(10), "a write waited for the stalled reader"
    stream.unblock.set()
    assert writer.drain(10)
    writer.close()
    text = stream.getvalue()
    assert text.startswith("line 000 ")
    assert "log line(s) dropped: the log reader did not keep up" in text
    written = [line for line in text.splitlines() if line.startswith("line ")]
    dropped = int(text.split(" log line(s) dropped")[0].rsplit(" ", 1)[-1])
    assert dropped > 0  # 200 lines of 50 characters cannot wait in 1,000
    assert len(written) + dropped == 200


class CountingStream(io.StringIO):
    """A stderr that counts the writes it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_the_log_writer_gathers_lines_and_drain_cuts_its_wait_short() -> None:
    """Woken for every write (each event-loop iteration's access log lines), the writer
    thread cost the loop a thread switch and the GIL each time. It now gathers what comes
    within its linger into one write; drain() (and close) write at once, not after it."""
    stream = CountingStream()
    writer = BackgroundWriter(stream, linger=60)
    for i in range(100):
        writer.write(f"line {i:03d}\n")
    assert writer.drain(10)  # long before the 60 s linger
    assert stream.getvalue() == "".join(f"line {i:03d}\n" for i in range(100))
    assert stream.writes == 1
    writer.write("last\n")
    writer.close()
    assert stream.getvalue().endswith("line 099\nlast\n")


def test_a_flushed_log_record_is_written_without_waiting_for_the_linger() -> None:
    """What `logging` writes (a warning, an error) is flushed, and goes out at once: a
    process killed right after it still leaves it in the log."""
    written = threading.Event()

    class Signalling(io.StringIO):
        def write(self, text: str) -> int:
            n = super().write(text)
            written.set()
            return n

    stream = Signalling()
    writer = BackgroundWriter(stream, linger=60)
    handler = logging.StreamHandler(writer)
    logger = logging.getLogger("test_logging.flushed")
    logger.addHandler(handler)
    try:
        logger.warning("key reload failed")
        assert written.wait(10)  # long before the 60 s linger
        assert stream.getvalue() == "key reload failed\n"
    finally:
        logger.removeHandler(handler)
        writer.close()


def test_a_proxy_whose_stderr_nobody_reads_keeps_answering(tmp_path: Any) -> None:
    """Item 13b: the access log's lines filled an unread stderr pipe (64 KiB), the write
    blocked the event loop, and every request after that waited for a read timeout."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["UNLIMITED_API_KEY"] = UNLIMITED_KEY
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamacpp_proxy.main", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,  # never read while the requests run
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=10) as client:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.get(url + "/health")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the proxy did not start"
                    time.sleep(0.05)
            # About 150 bytes of access log each: 1,500 requests are several pipes' worth.
            headers = {"X-Request-Id": "r" * 100}
            for _ in range(1500):
                assert client.get(url + "/health", headers=headers).status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
