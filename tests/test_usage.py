"""The usage ledger, budgets and the report command (issue 12)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamacpp_proxy.config import ConfigError
from llamacpp_proxy.errors import BudgetExceeded
from llamacpp_proxy.guard.auth import Budget, KeyFileError, Principal, load_key_file
from llamacpp_proxy.guard.budgets import LocalBudgets, period_bounds
from llamacpp_proxy.main import build_context
from llamacpp_proxy.observe import usage_report
from llamacpp_proxy.observe.usage import UsageLedger, UsageRecord

from .conftest import (
    UNLIMITED_KEY,
    LoopThread,
    Stack,
    assert_schema,
    default_settings,
    start_stack,
    stop_stack,
)
from .fake_llamacpp import FakeLlamaCpp

TEAM_KEY = "sk-team-budgeted-0123456789"
OTHER_KEY = "sk-team-other-0123456789"


def ts(text: str) -> float:
    """An ISO time (UTC unless it says) as Unix seconds."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def ledger_rows(path: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY time")]


def write_keys(path: Path, **team: Any) -> Path:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in team.items())
    path.write_text(
        f'[keys.team]\nkey = "{TEAM_KEY}"\n{extra}\n[keys.other]\nkey = "{OTHER_KEY}"\n'
    )
    return path


@pytest.fixture
def stacks(runner: LoopThread, fake: FakeLlamaCpp) -> Iterator[Callable[..., Stack]]:
    """Gateways in front of the shared fake; each one's ledger is closed when it stops."""
    runner.call(fake.reset)
    made: list[Stack] = []

    def factory(**overrides: Any) -> Stack:
        stack = start_stack(runner, fake, **overrides)
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        shutdown(stack)


def shutdown(stack: Stack) -> None:
    """Stop a gateway as SIGTERM does: its ledger writes what it holds, then closes."""
    if stack.ctx.usage is not None and stack.ctx.usage._thread.is_alive():
        stop_stack(stack)
        stack.ctx.usage.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- the ledger ----------------------------------------------------------------------------


def test_the_ledger_totals_match_the_usage_the_responses_reported(
    stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    db = tmp_path / "usage.db"
    stack = stacks(usage_db=db, api_keys_file=write_keys(tmp_path / "keys.toml"))
    reported: dict[str, list[int]] = {"team": [0, 0, 0], "other": [0, 0, 0]}
    http = stack.http

    def add(name: str, usage: dict[str, int]) -> None:
        reported[name][0] += 1
        reported[name][1] += usage["prompt_tokens"]
        reported[name][2] += usage["completion_tokens"]

    for i in range(3):
        r = http.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}]},
            headers=auth(TEAM_KEY),
        )
        assert r.status_code == 200
        add("team", r.json()["usage"])
    r = http.post(
        "/v1/completions",
        json={"model": "m", "prompt": ["one", "two two"], "max_tokens": 3},
        headers=auth(OTHER_KEY),
    )
    assert r.status_code == 200
    add("other", r.json()["usage"])
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "m",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "stream it"}],
        },
        headers=auth(OTHER_KEY),
    ) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    add("other", chunks[-1]["usage"])
    refused = http.post("/v1/chat/completions", json={"model": "m"}, headers=auth(TEAM_KEY))
    assert refused.status_code == 400

    ledger = stack.ctx.usage
    assert ledger is not None
    # A request is recorded as its handler finishes, just after the client has its answer.
    assert stack.wait_for(lambda: ledger.recorded == 6)
    assert ledger.flush()
    rows = ledger_rows(db)
    for name, (requests, prompt, completion) in reported.items():
        ok = [r for r in rows if r["key"] == name and r["status"] == 200]
        assert len(ok) == requests
        assert sum(r["prompt_tokens"] for r in ok) == prompt
        assert sum(r["completion_tokens"] for r in ok) == completion
    assert {r["endpoint"] for r in rows} == {"/v1/chat/completions", "/v1/completions"}
    assert {r["model"] for r in rows if r["status"] == 200} == {"m"}
    assert {r["server"] for r in rows if r["status"] == 200} == {f"127.0.0.1:{stack.fake.port}"}
    assert [r["status"] for r in rows if r["key"] == "team"].count(400) == 1
    streamed = [r for r in rows if r["ttft"] is not None]
    assert len(streamed) == 1 and 0 <= streamed[0]["ttft"] <= streamed[0]["duration"]
    assert all(r["request_id"] for r in rows)
    # Today's figures, from memory, for the status page.
    today = ledger.today("team")
    assert (today.requests, today.prompt_tokens, today.completion_tokens) == (
        4,
        reported["team"][1],
        reported["team"][2],
    )


def test_a_ledger_that_cannot_be_written_is_logged_once_and_requests_keep_flowing(
    stacks: Callable[..., Stack], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "usage.db"
    stack = stacks(usage_db=db)
    ledger = stack.ctx.usage
    assert ledger is not None
    with contextlib.closing(sqlite3.connect(db)) as other:
        other.execute("DROP TABLE usage")  # the next insert fails
        other.commit()
    caplog.set_level(logging.WARNING, "llamacpp_proxy.usage")
    for i in range(3):
        r = stack.http.post(
            "/v1/completions", json={"prompt": f"p{i}"}, headers=auth(UNLIMITED_KEY)
        )
        assert r.status_code == 200
    assert stack.wait_for(lambda: ledger.recorded == 3)
    # The failed batch waits, the ledger reopens the file with its schema, and writes it.
    assert ledger.flush()
    assert ledger.failed_writes >= 1
    assert ledger.dropped_records == 0
    assert len(ledger_rows(db)) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "llamacpp_proxy.usage"]
    assert len(messages) == 2
    assert "cannot be written" in messages[0] and "written again" in messages[1]


def test_the_ledger_holds_at_most_max_pending_rows_while_its_writer_is_stuck(
    tmp_path: Path,
) -> None:
    # The writer wakes only every 60 s or at 500 rows: it takes nothing during the test.
    ledger = UsageLedger(tmp_path / "u.db", max_pending=5, flush_interval=60)
    try:
        for _ in range(8):
            ledger.record(UsageRecord(1.0, "k", "m", None, "/e", 200))
        assert ledger.dropped_records == 3
        assert len(ledger._pending) == 5
    finally:
        ledger.close()
    assert len(ledger_rows(tmp_path / "u.db")) == 5  # what was held is written at close


# -- budgets: the pure arithmetic ---------------------------------------------------------


def test_periods_are_calendar_days_and_months_in_the_keys_timezone() -> None:
    now = ts("2025-03-31T20:00:00")
    assert period_bounds(now, "UTC", "day") == (ts("2025-03-31"), ts("2025-04-01"))
    assert period_bounds(now, "UTC", "month") == (ts("2025-03-01"), ts("2025-04-01"))
    # In Tokyo (UTC+9) it is already April 1st, 05:00.
    assert period_bounds(now, "Asia/Tokyo", "day") == (
        ts("2025-04-01T00:00:00+09:00"),
        ts("2025-04-02T00:00:00+09:00"),
    )
    assert period_bounds(now, "Asia/Tokyo", "month")[1] == ts("2025-05-01T00:00:00+09:00")
    assert period_bounds(ts("2025-12-15"), "UTC", "month") == (ts("2025-12-01"), ts("2026-01-01"))


def test_a_budget_refuses_once_spent_and_resets_with_the_next_period() -> None:
    clock = [ts("2025-06-10T23:00:00")]
    budgets = LocalBudgets(None, now=lambda: clock[0])
    team = Principal("team", budget=Budget(tokens_per_day=100, tokens_per_month=250))
    other = Principal("other")

    async def scenario() -> None:
        await budgets.check(team)
        await budgets.charge(team, 99)
        await budgets.check(team)  # 99 < 100: admitted
        await budgets.charge(team, 5)  # the request that crosses the line finishes
        with pytest.raises(BudgetExceeded) as info:
            await budgets.check(team)
        error = info.value
        assert error.status == 429 and error.body()["error"]["code"] == "budget_exceeded"
        assert "2025-06-11T00:00:00Z" in error.message
        assert error.headers["Retry-After"] == "3600"
        assert error.headers["X-Budget-Reset"] == "2025-06-11T00:00:00Z"
        await budgets.check(other)  # no budget, never refused
        clock[0] = ts("2025-06-11T00:00:00")  # midnight UTC: a new day
        await budgets.check(team)
        await budgets.charge(team, 100)
        with pytest.raises(BudgetExceeded):
            await budgets.check(team)
        clock[0] = ts("2025-06-12T08:00:00")
        await budgets.charge(team, 50)  # month: 104 + 100 + 50 = 254 >= 250
        with pytest.raises(BudgetExceeded) as info:
            await budgets.check(team)
        assert "per month" in info.value.message
        assert info.value.headers["X-Budget-Reset"] == "2025-07-01T00:00:00Z"
        states = {s.period: (s.used, s.limit) for s in await budgets.state(team)}
        assert states == {"day": (50, 100), "month": (254, 250)}
        clock[0] = ts("2025-07-01T00:00:00")
        await budgets.check(team)

    import asyncio

    asyncio.run(scenario())


def test_budgets_in_the_key_file(tmp_path: Path) -> None:
    path = write_keys(
        tmp_path / "k.toml",
        tokens_per_day=1000,
        tokens_per_month=20000,
        budget_timezone="Asia/Tokyo",
    )
    by_name = {p.name: p for p in load_key_file(path).values()}
    assert by_name["team"].budget == Budget(1000, 20000, "Asia/Tokyo")
    assert by_name["other"].budget is None
    for bad, message in [
        ({"tokens_per_day": 0}, "'tokens_per_day' must be a positive integer"),
        ({"tokens_per_month": "lots"}, "'tokens_per_month' must be a positive integer"),
        ({"tokens_per_day": 5, "budget_timezone": "Mars/Olympus"}, "IANA time zone"),
        ({"budget_timezone": "UTC"}, "needs 'tokens_per_day'"),
    ]:
        write_keys(path, **bad)
        with pytest.raises(KeyFileError, match=message):
            load_key_file(path)


def test_budgets_without_a_ledger_or_redis_refuse_to_start(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "k.toml", tokens_per_day=1000)
    with pytest.raises(KeyFileError, match="--usage-db"):
        build_context(default_settings(api_keys_file=keys))
    with pytest.raises(ConfigError, match="cannot open"):
        build_context(default_settings(usage_db=tmp_path / "no" / "such" / "dir" / "u.db"))


# -- budgets through the gateway -----------------------------------------------------------


def spend_until_refused(http: httpx.Client, key: str, limit: int = 30) -> httpx.Response:
    for i in range(limit):
        r = http.post("/v1/completions", json={"prompt": f"spend {i}"}, headers=auth(key))
        if r.status_code != 200:
            return r
    raise AssertionError("never refused")


def test_a_spent_budget_is_refused_across_a_restart_and_resets_next_day(
    stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    db = tmp_path / "usage.db"
    keys = write_keys(tmp_path / "keys.toml", tokens_per_day=60)
    stack = stacks(usage_db=db, api_keys_file=keys)
    refused = spend_until_refused(stack.http, TEAM_KEY)
    assert refused.status_code == 429
    assert_schema(refused.json(), "ErrorResponse")
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert "60 tokens per day" in refused.json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    reset = refused.headers["X-Budget-Reset"]
    # Another key is not affected.
    ok = stack.http.post("/v1/completions", json={"prompt": "x"}, headers=auth(OTHER_KEY))
    assert ok.status_code == 200
    shutdown(stack)

    again = stacks(usage_db=db, api_keys_file=keys)  # a restart: the ledger rebuilds it
    still = again.http.post("/v1/completions", json={"prompt": "x"}, headers=auth(TEAM_KEY))
    assert still.status_code == 429
    assert still.json()["error"]["code"] == "budget_exceeded"
    assert still.headers["X-Budget-Reset"] == reset
    budgets = again.ctx.budgets
    assert budgets is not None
    budgets.now = lambda: ts(reset.replace("Z", "")) + 1  # the next UTC day
    fresh = again.http.post("/v1/completions", json={"prompt": "x"}, headers=auth(TEAM_KEY))
    assert fresh.status_code == 200


def test_a_request_sent_right_after_an_answer_finds_its_spend_not_its_hold(
    stacks: Callable[..., Stack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Admission holds a request's estimate (max_tokens defaults to --max-tokens-limit: 4096)
    # until its charge replaces it. A charge that lands after the answer (Redis, or another
    # process) left the client's next request facing the hold: 429 budget_exceeded with 980
    # of 1,000 tokens unspent (seen as a flaky two-gateway Redis test).
    from llamacpp_proxy.frontdoor.handlers import BaseHandler

    monkeypatch.setattr(BaseHandler, "SETTLE_WAIT", 5.0)  # the store below takes 0.3 s
    keys = write_keys(tmp_path / "keys.toml", tokens_per_day=1000)
    stack = stacks(usage_db=tmp_path / "usage.db", api_keys_file=keys)
    budgets = stack.ctx.budgets
    assert isinstance(budgets, LocalBudgets)
    charge = budgets.charge

    async def slow_charge(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.3)  # a store's round trip, exaggerated
        await charge(*args, **kwargs)

    budgets.charge = slow_charge  # type: ignore[method-assign]
    for i in range(3):
        for stream in (False, True):
            r = stack.http.post(
                "/v1/completions",
                json={"prompt": f"turn {i}", "stream": stream},
                headers=auth(TEAM_KEY),
            )
            assert r.status_code == 200, r.text
            assert "budget_exceeded" not in r.text
    [team] = [p for p in stack.ctx.keys.principals if p.name == "team"]
    states = stack.runner.run(budgets.state(team))
    [day] = [s for s in states if s.period == "day"]
    assert 0 < day.used < 1000  # every hold was replaced by what the requests used


# -- the report command ----------------------------------------------------------------------


@pytest.fixture
def filled_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "usage.db"
    ledger = UsageLedger(path)
    rows = [
        ("2025-06-01T10:00:00", "alice", "llama", 200, 10, 5, 2),
        ("2025-06-01T11:00:00", "alice", "qwen", 200, 20, 10, 0),
        ("2025-06-02T09:00:00", "alice", "llama", 429, 0, 0, 0),
        ("2025-06-02T12:00:00", "bob", "llama", 200, 7, 3, 1),
        ("2025-05-20T12:00:00", "bob", "llama", 200, 1000, 1000, 0),  # before the period
    ]
    for when, key, model, status, prompt, completion, cached in rows:
        ledger.record(
            UsageRecord(
                ts(when),
                key,
                model,
                "h:1",
                "/v1/chat/completions",
                status,
                prompt,
                completion,
                cached,
                0.5,
            )
        )
    ledger.close()
    return path


def report(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert usage_report.main(list(argv)) == 0
    return capsys.readouterr().out


def test_the_report_per_key_as_a_table(
    filled_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = report(
        capsys, "--usage-db", str(filled_ledger), "--since", "2025-06-01", "--until", "2025-06-03"
    )
    assert out.splitlines() == [
        "key    requests  errors  prompt_tokens  completion_tokens  cached_tokens  total_tokens",
        "alice         3       1             30                 15              2            45",
        "bob           1       0              7                  3              1            10",
    ]


def test_the_report_per_key_model_and_day_as_csv_and_json(
    filled_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--usage-db", str(filled_ledger), "--since", "2025-06-01", "--until", "2025-06-03"]
    out = report(capsys, *args, "--by", "day,key,model", "--format", "csv")
    assert list(csv.reader(io.StringIO(out))) == [
        [
            "key",
            "model",
            "day",
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "total_tokens",
        ],
        ["alice", "llama", "2025-06-01", "1", "0", "10", "5", "2", "15"],
        ["alice", "llama", "2025-06-02", "1", "1", "0", "0", "0", "0"],
        ["alice", "qwen", "2025-06-01", "1", "0", "20", "10", "0", "30"],
        ["bob", "llama", "2025-06-02", "1", "0", "7", "3", "1", "10"],
    ]
    data = json.loads(report(capsys, *args, "--by", "model", "--format", "json", "--key", "bob"))
    assert data == [
        {
            "model": "llama",
            "requests": 1,
            "errors": 0,
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "cached_tokens": 1,
            "total_tokens": 10,
        }
    ]


def test_the_report_refuses_a_missing_ledger_and_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert usage_report.main(["--usage-db", str(tmp_path / "none.db")]) == 2
    assert "no ledger" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(SystemExit):
        usage_report.main(["--usage-db", "x", "--by", "colour"])


# -- budgets shared through Redis ------------------------------------------------------------


@pytest.mark.redis
def test_two_gateways_share_budgets_through_redis(
    runner: LoopThread, fake: FakeLlamaCpp, tmp_path: Path
) -> None:
    from .test_main import ProxyProcess
    from .test_redis import RedisServer, require_redis_server

    require_redis_server()
    runner.call(fake.reset)
    redis = RedisServer()
    redis.start()
    keys = write_keys(tmp_path / "keys.toml", tokens_per_day=120)
    args = ["--redis-url", redis.url, "--api-keys-file", str(keys)]
    proxies = [ProxyProcess(fake.url, args) for _ in range(2)]
    try:
        first, second = (httpx.Client(base_url=p.url, timeout=10) for p in proxies)
        with first, second:
            # Alternate between the two gateways: each sees the other's charges.
            costs = []
            for i in range(60):
                r = (first, second)[i % 2].post(
                    "/v1/completions", json={"prompt": f"spend {i}"}, headers=auth(TEAM_KEY)
                )
                if r.status_code != 200:
                    break
                usage = r.json()["usage"]
                costs.append(usage["prompt_tokens"] + usage["completion_tokens"])
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "budget_exceeded"
            # Refused once the two together had spent the day's 120 tokens; each process
            # counting alone would have let about twice that through. (A charge lands just
            # after its answer: the next request, on the other process, may beat it by one.)
            assert 120 <= sum(costs) < 120 + 2 * max(costs)
            for client in (first, second):
                again = client.post("/v1/completions", json={"prompt": "x"}, headers=auth(TEAM_KEY))
                assert again.status_code == 429
                assert again.json()["error"]["code"] == "budget_exceeded"
                other = client.post(
                    "/v1/completions", json={"prompt": "x"}, headers=auth(OTHER_KEY)
                )
                assert other.status_code == 200
        # The counter lives in Redis: a third process started now refuses as well.
        third = ProxyProcess(fake.url, args)
        proxies.append(third)
        with httpx.Client(base_url=third.url, timeout=10) as client:
            r = client.post("/v1/completions", json={"prompt": "x"}, headers=auth(TEAM_KEY))
            assert r.json()["error"]["code"] == "budget_exceeded"
    finally:
        for proxy in proxies:
            proxy.stop()
        redis.stop()


def test_requests_without_a_valid_key_leave_no_row(
    stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    db = tmp_path / "usage.db"
    stack = stacks(usage_db=db)
    ledger = stack.ctx.usage
    assert ledger is not None
    for _ in range(3):
        r = stack.http.post(
            "/v1/completions", json={"prompt": "x"}, headers=auth("sk-wrong-000000")
        )
        assert r.status_code == 401
    ok = stack.http.post("/v1/completions", json={"prompt": "x"}, headers=auth(UNLIMITED_KEY))
    assert ok.status_code == 200
    assert stack.wait_for(lambda: ledger.recorded == 1)
    assert ledger.flush()
    assert [r["key"] for r in ledger_rows(db)] == ["unlimited"]
