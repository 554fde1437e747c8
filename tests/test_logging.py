"""What operators read: one access line per request, each failure logged once, no secrets."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from llamacpp_proxy.logs import JsonFormatter, PlainFormatter

from .conftest import LIMITED_KEY, UNLIMITED_KEY
from .test_api import CHAT, post


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.access for r in caplog.records if r.name == "llamacpp_proxy.access"]  # type: ignore[attr-defined]


def test_one_access_line_per_request_without_the_key(
    make_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stack = make_stack(access_log=True)
    post(
        stack,
        "/v1/chat/completions",
        {"messages": CHAT},
        key=LIMITED_KEY,
        headers={"X-Request-Id": "log-1"},
    )
    post(stack, "/v1/completions", {"prompt": "x"}, key="sk-wrong-key-123")
    assert stack.wait_for(lambda: len(access_records(caplog)) >= 2)
    ok, denied = access_records(caplog)[:2]
    assert ok["request_id"] == "log-1" and ok["key"] == "limited"
    assert ok["path"] == "/v1/chat/completions" and ok["status"] == 200
    assert ok["completion_tokens"] == 10 and ok["prompt_tokens"] > 0
    assert ok["latency_ms"] >= 0
    assert denied["status"] == 401 and denied["key"] is None
    text = caplog.text + "".join(PlainFormatter().format(r) for r in caplog.records)
    for secret in (LIMITED_KEY, UNLIMITED_KEY, "sk-wrong-key-123"):
        assert secret not in text


def test_formatters_plain_and_json() -> None:
    record = logging.LogRecord(
        "llamacpp_proxy.access", logging.INFO, __file__, 1, "%s", (200,), None
    )
    record.access = {"request_id": "r1", "key": "alice", "status": 200, "error": None}
    assert "request_id=r1 key=alice status=200" in PlainFormatter().format(record)
    assert "error" not in PlainFormatter().format(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "r1" and line["level"] == "info"


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
