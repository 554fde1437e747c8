"""GET /metrics: the names and labels issue 12 lists, their values against what the tests
sent (the exposition parsed with prometheus_client.parser), the metrics key, and bounded
label cardinality."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llamacpp_proxy.errors import (
    ConcurrencyLimited,
    InvalidRequest,
    RateLimited,
    TooManyAuthFailures,
)
from llamacpp_proxy.observe.metrics import Metrics, limit_kind
from llamacpp_proxy.observe.snapshot import ModelSnapshot, ServerSnapshot
from llamacpp_proxy.observe.usage import UsageLedger

from .conftest import LIMITED_KEY, UNLIMITED_KEY, Stack

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(stack: Stack, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of GET /metrics, by (name, sorted labels)."""
    response = stack.http.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(stack: Stack, key: str, **body: Any) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": "hello there"}])
    return stack.http.post(
        "/v1/chat/completions",
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {key}"},
    )


def test_metrics_count_what_the_requests_did(stack: Stack) -> None:
    fake = stack.fake
    fake.script.cache_n = 5
    usage = {"prompt": 0, "completion": 0}
    for _ in range(2):
        answer = chat(stack, UNLIMITED_KEY)
        assert answer.status_code == 200
        usage["prompt"] += answer.json()["usage"]["prompt_tokens"]
        usage["completion"] += answer.json()["usage"]["completion_tokens"]
    # A streamed request of the limited key: counted, with a time to first token.
    limited = {"prompt": 0, "completion": 0}
    with stack.http.stream(
        "POST",
        "/v1/chat/completions",
        content=json.dumps(
            {
                "messages": [{"role": "user", "content": "stream it"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ),
        headers={"Authorization": f"Bearer {LIMITED_KEY}"},
    ) as streamed:
        assert streamed.status_code == 200
        for line in streamed.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    limited["prompt"] += chunk["usage"]["prompt_tokens"]
                    limited["completion"] += chunk["usage"]["completion_tokens"]
    assert limited["completion"] > 0
    text = stack.http.post(
        "/v1/completions",
        json={"prompt": "once upon", "model": "a-model-nobody-configured"},
        headers={"Authorization": f"Bearer {LIMITED_KEY}"},
    )
    assert text.status_code == 200
    limited["prompt"] += text.json()["usage"]["prompt_tokens"]
    limited["completion"] += text.json()["usage"]["completion_tokens"]
    # The limited key allows 3 requests a minute (conftest): the next two are refused.
    fourth = chat(stack, LIMITED_KEY)
    assert fourth.status_code == 200
    limited["prompt"] += fourth.json()["usage"]["prompt_tokens"]
    limited["completion"] += fourth.json()["usage"]["completion_tokens"]
    assert chat(stack, LIMITED_KEY).status_code == 429
    # Neither an unknown key nor a made-up URL creates a series.
    assert chat(stack, "sk-not-a-key-0123456789").status_code == 401
    assert stack.http.get("/v1/made-up-path-12345").status_code == 404

    samples = scrape(stack)

    requests = "llamacpp_proxy_requests_total"
    chat_ep, text_ep = "/v1/chat/completions", "/v1/completions"
    assert (
        value(samples, requests, key="unlimited", model="default", endpoint=chat_ep, status="200")
        == 2
    )
    assert (
        value(samples, requests, key="limited", model="default", endpoint=chat_ep, status="200")
        == 2
    )
    assert (
        value(samples, requests, key="limited", model="default", endpoint=text_ep, status="200")
        == 1
    )
    assert (
        value(samples, requests, key="limited", model="default", endpoint=chat_ep, status="429")
        == 1
    )
    assert value(samples, requests, key="", model="", endpoint=chat_ep, status="401") == 1
    assert value(samples, requests, key="", model="", endpoint="other", status="404") == 1

    tokens = "llamacpp_proxy_tokens_total"
    assert (
        value(samples, tokens, key="unlimited", model="default", kind="prompt") == usage["prompt"]
    )
    assert (
        value(samples, tokens, key="unlimited", model="default", kind="completion")
        == usage["completion"]
    )
    assert value(samples, tokens, key="unlimited", model="default", kind="cached") == 2 * 5
    # The 429 cost nothing.
    assert (
        value(samples, tokens, key="limited", model="default", kind="prompt") == limited["prompt"]
    )
    assert (
        value(samples, tokens, key="limited", model="default", kind="completion")
        == limited["completion"]
    )
    assert value(samples, tokens, key="limited", model="default", kind="cached") == 3 * 5

    duration = "llamacpp_proxy_request_duration_seconds_count"
    assert value(samples, duration, model="default", endpoint=chat_ep) == 5
    assert value(samples, duration, model="default", endpoint=text_ep) == 1
    ttft = "llamacpp_proxy_time_to_first_token_seconds_count"
    assert value(samples, ttft, model="default") == 1  # only the streamed request

    assert value(samples, "llamacpp_proxy_rate_limited_total", key="limited", limit="requests") == 1

    server = fake.url.removeprefix("http://")
    assert value(samples, "llamacpp_proxy_queue_depth", model="default") == 0
    assert value(samples, "llamacpp_proxy_in_flight", model="default") == 0
    assert value(samples, "llamacpp_proxy_upstream_up", model="default", server=server) == 1
    assert (
        value(
            samples, "llamacpp_proxy_upstream_slots", model="default", server=server, state="total"
        )
        == 4
    )
    assert (
        value(
            samples, "llamacpp_proxy_upstream_slots", model="default", server=server, state="busy"
        )
        == 0
    )
    assert ("llamacpp_proxy_queue_wait_seconds_count", (("model", "default"),)) not in samples

    every_label = {v for _, labels in samples for _, v in labels}
    assert "a-model-nobody-configured" not in every_label
    assert "/v1/made-up-path-12345" not in every_label
    assert not any("sk-" in v for v in every_label)  # names, never secrets


def test_metrics_queue_depth_and_wait(make_stack: Callable[..., Stack], fake: Any) -> None:
    fake.script.total_slots = 1  # before the gateway's first probe reads /props
    stack = make_stack()
    router = stack.ctx.routes.pools["default"].router
    assert stack.wait_for(
        lambda: all(
            u is not None and u.total_slots == 1
            for u in (router.upstream(s.key) for s in router.pool.servers)
        )
    )
    gate = stack.runner.call(asyncio.Event)
    fake.script.gate = gate
    with ThreadPoolExecutor(2) as threads:
        running = threads.submit(chat, stack, UNLIMITED_KEY)
        assert stack.wait_for(lambda: fake.active == 1)
        queued = threads.submit(chat, stack, UNLIMITED_KEY)
        assert stack.wait_for(lambda: router.waiting == 1)
        with httpx.Client(base_url=stack.url, timeout=10) as scraper:
            text = scraper.get("/metrics").text
        during: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                during[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        assert value(during, "llamacpp_proxy_queue_depth", model="default") == 1
        assert value(during, "llamacpp_proxy_in_flight", model="default") == 1
        server = fake.url.removeprefix("http://")
        assert (
            value(
                during,
                "llamacpp_proxy_upstream_slots",
                model="default",
                server=server,
                state="busy",
            )
            == 1
        )
        stack.runner.call(gate.set)
        assert running.result(10).status_code == 200
        assert queued.result(10).status_code == 200
    after = scrape(stack)
    assert value(after, "llamacpp_proxy_queue_wait_seconds_count", model="default") == 1
    assert value(after, "llamacpp_proxy_queue_depth", model="default") == 0


def test_metrics_key_guards_the_endpoint(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(metrics_key="metrics-secret-123")
    assert stack.http.get("/metrics").status_code == 401
    wrong = stack.http.get("/metrics", headers={"Authorization": "Bearer nope-nope-nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    # A client key is not the metrics key.
    client_key = stack.http.get("/metrics", headers={"Authorization": f"Bearer {UNLIMITED_KEY}"})
    assert client_key.status_code == 401
    samples = scrape(stack, {"Authorization": "Bearer metrics-secret-123"})
    assert (
        value(
            samples,
            "llamacpp_proxy_requests_total",
            key="",
            model="",
            endpoint="/metrics",
            status="401",
        )
        == 3
    )


def test_metrics_can_be_turned_off(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(metrics=False)
    assert chat(stack, UNLIMITED_KEY).status_code == 200
    off = stack.http.get("/metrics")
    assert off.status_code == 404
    assert off.json()["error"]["code"] == "metrics_disabled"


def test_limit_kind_names_the_refusing_limit() -> None:
    tokens = RateLimited("x", code="tokens_rate_limit_exceeded")
    tokens.error_type = "tokens"
    assert limit_kind(tokens) == "tokens"
    assert limit_kind(RateLimited("x")) == "requests"
    assert limit_kind(ConcurrencyLimited("x")) == "concurrency"
    assert limit_kind(RateLimited("x", code="budget_exceeded")) == "budget"
    assert limit_kind(TooManyAuthFailures("x")) == "requests"  # keyless: never labelled
    assert limit_kind(InvalidRequest("x")) is None
    assert limit_kind(None) is None


def test_day_tally_resets_at_utc_midnight() -> None:
    clock = [86400.0 * 20000 + 86399.0]
    snapshot = [ModelSnapshot("m", (ServerSnapshot("h:1", "ready", 0, 2),), 0, 0)]
    metrics = Metrics(lambda: snapshot, now=lambda: clock[0])
    metrics.request_finished("alice", "m", "/v1/chat/completions", 200, 10, 5, 2, 0.1, None, None)
    assert metrics.today()["alice"].tokens == 15
    clock[0] += 1.0  # 00:00 UTC
    assert metrics.today() == {}
    metrics.request_finished("alice", "m", "/v1/chat/completions", 200, 1, 1, 0, 0.1, None, None)
    assert metrics.today()["alice"].requests == 1
    # The Prometheus counters are cumulative: they do not reset.
    text = metrics.exposition().decode()
    assert 'llamacpp_proxy_tokens_total{key="alice",kind="prompt",model="m"} 11.0' in text


def test_grafana_dashboard_uses_only_series_the_gateway_exposes(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    dashboard = json.loads((root / "deploy/grafana/llamacpp-proxy.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"llamacpp_proxy_[a-z_]+", e)}
    snapshot = [ModelSnapshot("m", (ServerSnapshot("h:1", "ready", 1, 2),), 1, 1)]
    ledger = UsageLedger(tmp_path / "usage.db")  # its series exist with --usage-db
    metrics = Metrics(lambda: snapshot, usage=ledger)
    ledger.close()
    metrics.request_finished(
        "k", "m", "/v1/chat/completions", 429, 3, 2, 1, 0.5, 0.1, RateLimited("x")
    )
    metrics.queue_waited("m", 0.2)
    exposed = {
        sample.name
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }
    assert used, "the dashboard has no queries"
    assert used <= exposed, used - exposed
    # Every series the issue lists is on the dashboard.
    listed = {
        "llamacpp_proxy_requests_total",
        "llamacpp_proxy_tokens_total",
        "llamacpp_proxy_request_duration_seconds_bucket",
        "llamacpp_proxy_time_to_first_token_seconds_bucket",
        "llamacpp_proxy_rate_limited_total",
        "llamacpp_proxy_queue_depth",
        "llamacpp_proxy_queue_wait_seconds_bucket",
        "llamacpp_proxy_upstream_up",
        "llamacpp_proxy_upstream_slots",
        "llamacpp_proxy_in_flight",
        # The ledger's health: lost rows are a bill that misses requests.
        "llamacpp_proxy_usage_pending_rows",
        "llamacpp_proxy_usage_rows_total",
        "llamacpp_proxy_usage_write_failures_total",
    }
    assert listed <= used, listed - used


def test_long_generations_and_slow_first_tokens_land_in_a_finite_bucket() -> None:
    """A long agent stream (4,096 tokens at 10 tokens/s: about 400 s) and a long prompt's
    first token on a CPU (minutes, within --upstream-first-byte-timeout's 600 s) must be
    told apart from each other, not all lumped into +Inf. Regression: the buckets stopped
    at 300 s (duration) and 60 s (first token)."""
    metrics = Metrics(list)
    metrics.request_finished("k", "m", "chat", 200, 10, 4096, 0, 450.0, 240.0, None)
    text = metrics.exposition().decode()

    def bucket(name: str, le: str) -> float:
        prefix = f"{name}_bucket{{"
        for line in text.splitlines():
            if line.startswith(prefix) and f'le="{le}"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} bucket le={le}")

    duration = "llamacpp_proxy_request_duration_seconds"
    ttft = "llamacpp_proxy_time_to_first_token_seconds"
    assert bucket(duration, "300.0") == 0 and bucket(duration, "600.0") == 1
    assert bucket(ttft, "120.0") == 0 and bucket(ttft, "300.0") == 1
