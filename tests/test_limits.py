"""Limits that hold under amplification and bursts (Hardening I, items 1, 2 and 4).

Each test drives the proxy over kept-alive HTTP clients and checks what a user (or the
operator, looking at llama.cpp) would see.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import LIMITED_KEY, UNLIMITED_KEY, Stack

KEYS = """
[keys.pair]
key = "sk-pair-secret-0001"
max_concurrent = 2

[keys.budget]
key = "sk-budget-secret-0002"
tokens_per_minute = 200
max_concurrent = 2
"""
PAIR, BUDGET = "sk-pair-secret-0001", "sk-budget-secret-0002"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return path


def client_for(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=20)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def estimate(body: dict[str, Any], generations: int = 1) -> int:
    """The proxy's admission estimate: body bytes / 4 + max_tokens x generations."""
    return -(-len(json.dumps(body).encode()) // 4) + body["max_tokens"] * generations


# -- item 1: generations, not requests ------------------------------------------------------


def test_max_concurrent_counts_generations_and_runs_the_rest_in_turn(
    make_stack: Any, key_file: Path
) -> None:
    stack = make_stack(api_keys_file=key_file)
    stack.fake.script.stall_before = 0.05  # each generation takes a while: overlaps show
    with client_for(stack) as http:
        r = http.post(
            "/v1/completions",
            json={"prompt": ["a", "b", "c", "d"], "n": 4, "max_tokens": 3},
            headers=auth(PAIR),
        )
        assert r.status_code == 200
        assert sorted(c["index"] for c in r.json()["choices"]) == list(range(16))
        assert len(stack.fake.requests) == 16
        assert stack.fake.peak_active <= 2  # the key's two slots, never more
        assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("pair") == 0)
        # Streamed, the same: every choice arrives, two generations at a time.
        stack.fake.peak_active = 0
        body = {"prompt": ["a", "b"], "n": 3, "max_tokens": 2, "stream": True}
        r = http.post("/v1/completions", json=body, headers=auth(PAIR))
        assert r.status_code == 200
        finished = [
            json.loads(line[6:])["choices"][0]["index"]
            for line in r.text.split("\n\n")
            if line.startswith("data: {") and '"finish_reason":"' in line.replace(" ", "")
        ]
        assert sorted(finished) == list(range(6))
        assert stack.fake.peak_active <= 2


def test_one_request_holds_a_bounded_share_of_the_upstream(make_stack: Any) -> None:
    stack = make_stack(max_parallel_generations=3)
    stack.fake.script.stall_before = 0.02
    with client_for(stack) as http:
        body = {"prompt": [f"p{i}" for i in range(16)], "n": 4, "max_tokens": 1}
        r = http.post("/v1/completions", json=body, headers=auth(UNLIMITED_KEY))
        assert r.status_code == 200
        assert len(r.json()["choices"]) == 64
        assert stack.fake.peak_active <= 3  # not 64 connections at once


def test_token_budget_is_checked_at_admission_against_the_estimate(
    make_stack: Any, key_file: Path
) -> None:
    stack = make_stack(api_keys_file=key_file)
    with client_for(stack) as http:
        # The request: 64 prompts x n 16, no max_tokens, against 200 tokens a minute.
        big = {"prompt": ["x"] * 64, "n": 16}
        r = http.post("/v1/completions", json=big, headers=auth(BUDGET))
        assert r.status_code == 429
        error = r.json()["error"]
        assert error["code"] == "tokens_rate_limit_exceeded"
        assert "Request too large" in error["message"] and "max_tokens" in error["message"]
        assert stack.fake.requests == []  # nothing reached llama.cpp
        # One that fits but not next to what is already reserved waits its turn (429 with
        # Retry-After), and its estimate is what the headers count.
        fits = {"prompt": "x", "max_tokens": 150}
        stack.fake.script.stall_before = 0.5
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                http.post, "/v1/completions", content=json.dumps(fits), headers=auth(BUDGET)
            )
            assert stack.wait_for(lambda: len(stack.fake.requests) == 1)
            second = http.post("/v1/completions", json=fits, headers=auth(BUDGET))
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "tokens_rate_limit_exceeded"
            assert int(second.headers["retry-after"]) >= 1
            assert first.result().status_code == 200
            assert first.result().headers["x-ratelimit-remaining-tokens"] == str(
                200 - estimate(fits)
            )


def test_max_tokens_limit_is_the_default_and_the_bound(make_stack: Any) -> None:
    stack = make_stack(max_tokens_limit=64)
    with client_for(stack) as http:
        r = http.post("/v1/completions", json={"prompt": "x"}, headers=auth(UNLIMITED_KEY))
        assert r.status_code == 200
        assert stack.fake.requests[-1]["n_predict"] == 64  # no run to the end of the context
        r = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65},
            headers=auth(UNLIMITED_KEY),
        )
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "max_tokens"
        assert r.json()["error"]["code"] == "max_tokens_above_limit"
        assert "64" in r.json()["error"]["message"]
        assert len(stack.fake.requests) == 1


def test_n_cmpl_is_refused(stack: Stack) -> None:
    with client_for(stack) as http:
        r = http.post(
            "/v1/completions", json={"prompt": "x", "n_cmpl": 16}, headers=auth(UNLIMITED_KEY)
        )
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "n_cmpl"
        assert stack.fake.requests == []


# -- item 2: every token llama.cpp generated is charged -------------------------------------


def remaining_after(http: httpx.Client, stack: Stack) -> int:
    """Tokens the budget key has left, read from a tiny request's headers."""
    assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("budget") == 0)
    stack.fake.reset()
    probe = {"prompt": "x", "max_tokens": 1}
    r = http.post("/v1/completions", content=json.dumps(probe), headers=auth(BUDGET))
    assert r.status_code == 200
    return int(r.headers["x-ratelimit-remaining-tokens"]) + estimate(probe)


def test_a_prompt_list_whose_last_generation_fails_is_charged_the_others(
    make_stack: Any, key_file: Path
) -> None:
    stack = make_stack(api_keys_file=key_file, max_parallel_generations=1)
    stack.fake.script.fail_status, stack.fake.script.fail_prompt = 500, "FAIL"
    with client_for(stack) as http:
        body = {"prompt": ["a", "b", "c", "FAIL"], "max_tokens": 10}
        r = http.post("/v1/completions", json=body, headers=auth(BUDGET))
        assert r.status_code == 502
        # Three generations of 10 tokens and a 2-token prompt each ran before the failure.
        assert remaining_after(http, stack) == 200 - 3 * 12


def test_an_abandoned_plain_request_is_charged_its_estimate(
    make_stack: Any, key_file: Path
) -> None:
    stack = make_stack(api_keys_file=key_file)
    stack.fake.script.stall_before = 2  # llama.cpp is generating when the client leaves
    body = {"prompt": "x", "max_tokens": 60}
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {BUDGET}\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        assert stack.wait_for(lambda: len(stack.fake.requests) == 1)
    with client_for(stack) as http:
        # Its answer never came: it is charged what it may have used (prompt + max_tokens).
        assert remaining_after(http, stack) == 200 - (1 + 60)


# -- item 4: what counts, and bursts on the keyless endpoints --------------------------------


def test_invalid_bodies_do_not_use_the_window(stack: Stack) -> None:
    with client_for(stack) as http:
        for _ in range(5):
            bad = http.post("/v1/completions", json={"prompt": 5}, headers=auth(LIMITED_KEY))
            assert bad.status_code == 400
        codes = [
            http.post(
                "/v1/completions", json={"prompt": "x"}, headers=auth(LIMITED_KEY)
            ).status_code
            for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]  # the window of 3 is all there for valid ones


def test_a_burst_on_ready_and_models_costs_one_upstream_request_at_a_time(stack: Stack) -> None:
    stack.fake.script.health_delay = 0.3

    def ready(_: int) -> int:
        return http.get("/health/ready").status_code

    def models(_: int) -> int:
        return http.get("/v1/models", headers=auth(LIMITED_KEY)).status_code

    with client_for(stack) as http, ThreadPoolExecutor(32) as pool:
        assert set(pool.map(ready, range(64))) == {200}
        assert set(pool.map(models, range(64))) == {200}
    assert stack.fake.max_health_active == 1  # one upstream check at a time, not 64
    assert stack.fake.props_requests <= 2  # and the model's /props is reused
