"""Prometheus metrics (prometheus-client): what finished requests did, and the pools' state.

Cost on the request path: one call per finished request (`request_finished`, from the access
log's hook), plus one per generation that had to wait for a slot. Nothing per token. Label
children are cached in plain dicts keyed by their label tuple, which skips prometheus-client's
label validation and lock on every request after a series' first.

Cardinality is bounded by configuration: `key` is a configured key's name ("" when the
request had no valid key), `model` a configured pool's name ("" before one was chosen),
`endpoint` one of the gateway's routes ("other" for unknown URLs), `status` an HTTP status.
Nothing a client sends (an unknown key, a made-up model, a random URL) creates a series.

The gauges (queue depth, servers up, slots, in flight) are read from the pools when scraped,
so they cost the request path nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..errors import ConcurrencyLimited, ProxyError, RateLimited
from .snapshot import ModelSnapshot
from .usage import UsageLedger

CONTENT_TYPE = CONTENT_TYPE_LATEST

DURATION_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
"""Whole requests: from a cached short answer to a long generation (an agent's 4,096
tokens at 10 tokens/s take about 400 s)."""
TTFT_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
"""Time to first token: prompt processing (plus any wait for a slot), up to
--upstream-first-byte-timeout's default 600 s (a long prompt on a CPU takes minutes)."""
QUEUE_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Waits for a free slot, up to --queue-timeout."""

SECONDS_PER_DAY = 86400


def limit_kind(error: ProxyError | None) -> str | None:
    """Which limit a refusal was (requests, tokens, concurrency, budget), or None."""
    if not isinstance(error, RateLimited):
        return None
    if error.code == "budget_exceeded":
        return "budget"
    if isinstance(error, ConcurrencyLimited):
        return "concurrency"
    if error.error_type == "tokens":
        return "tokens"
    return "requests"


@dataclass
class KeyDay:
    """One key's figures for the current UTC day (for the status page)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    rate_limited: int = 0

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class _PoolCollector:
    """The gauges, read from the pools at scrape time."""

    def __init__(self, snapshot: Callable[[], list[ModelSnapshot]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        depth, up, slots, in_flight = families
        for model in self._snapshot():
            depth.add_metric([model.name], model.queued)
            in_flight.add_metric([model.name], model.in_flight)
            for server in model.servers:
                up.add_metric(
                    [model.name, server.display], 1 if server.state in ("ready", "draining") else 0
                )
                slots.add_metric([model.name, server.display, "busy"], server.busy)
                if server.total is not None:
                    slots.add_metric([model.name, server.display, "total"], server.total)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "llamacpp_proxy_queue_depth",
                "Generations waiting in the gateway for a free slot of the model's servers.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "llamacpp_proxy_upstream_up",
                "1 while the server takes work (ready, or draining after a reload), else 0 "
                "(loading, down, or ejected for failing requests).",
                labels=["model", "server"],
            ),
            GaugeMetricFamily(
                "llamacpp_proxy_upstream_slots",
                "The server's slots: busy (the gateway's generations plus outside load seen "
                "in /slots) and total (from /props, once known).",
                labels=["model", "server", "state"],
            ),
            GaugeMetricFamily(
                "llamacpp_proxy_in_flight",
                "Generations the gateway has running on the model's servers.",
                labels=["model"],
            ),
        ]


class _LedgerCollector:
    """The usage ledger's own health, read from its counters at scrape time: rows the
    ledger lost, or could not write yet, are otherwise only a log line, and operators
    bill from it."""

    def __init__(self, ledger: UsageLedger) -> None:
        self._ledger = ledger

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        ledger = self._ledger
        rows, pending, failures = self._families()
        rows.add_metric(["recorded"], ledger.recorded)
        rows.add_metric(["written"], ledger.written_records)
        rows.add_metric(["dropped"], ledger.dropped_records)
        pending.add_metric([], ledger.pending)
        failures.add_metric([], ledger.failed_writes)
        return [rows, pending, failures]

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "llamacpp_proxy_usage_rows",
                "Usage ledger rows: recorded (requests that ended), written to the file, and "
                "dropped (beyond the in-memory cap while the file could not be written, or "
                "unwritten at shutdown).",
                labels=["state"],
            ),
            GaugeMetricFamily(
                "llamacpp_proxy_usage_pending_rows",
                "Usage ledger rows waiting in memory to be written.",
            ),
            CounterMetricFamily(
                "llamacpp_proxy_usage_write_failures",
                "Tries to write usage ledger rows that the database refused (locked, full, "
                "read-only); the rows wait and are tried again.",
            ),
        )


class Metrics:
    """The gateway's metrics registry (one per process) and the per-key day tally."""

    def __init__(
        self,
        snapshot: Callable[[], list[ModelSnapshot]],
        now: Callable[[], float] = time.time,
        usage: UsageLedger | None = None,
    ) -> None:
        self._now = now
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llamacpp_proxy_requests",
            "Finished requests by key name, model, endpoint and HTTP status.",
            ["key", "model", "endpoint", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "llamacpp_proxy_tokens",
            "Tokens by key name, model and kind: prompt and completion as llama.cpp counted "
            "them; cached is the part of the prompt llama.cpp reused from its cache (cache_n).",
            ["key", "model", "kind"],
            registry=r,
        )
        self.duration = Histogram(
            "llamacpp_proxy_request_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            ["model", "endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llamacpp_proxy_time_to_first_token_seconds",
            "Streamed requests: time from arrival to the first token llama.cpp sent.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "llamacpp_proxy_rate_limited",
            "Requests refused with 429, by key name and the limit that refused them.",
            ["key", "limit"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "llamacpp_proxy_queue_wait_seconds",
            "How long generations that found every slot busy waited in the gateway (granted "
            "or not).",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        r.register(_PoolCollector(snapshot))
        if usage is not None:
            r.register(_LedgerCollector(usage))
        # Label children by label tuple: the dict lookup is what a request pays.
        self._request_children: dict[tuple[str, str, str, int], Counter] = {}
        self._token_children: dict[tuple[str, str], tuple[Counter, Counter, Counter]] = {}
        self._duration_children: dict[tuple[str, str], Histogram] = {}
        self._ttft_children: dict[str, Histogram] = {}
        self._queue_children: dict[str, Histogram] = {}
        self._day = -1
        self._today: dict[str, KeyDay] = {}

    # -- the request path (once per finished request) ---------------------------------------

    def request_finished(
        self,
        key: str,
        model: str,
        endpoint: str,
        status: int,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        duration: float,
        ttft: float | None,
        error: ProxyError | None,
    ) -> None:
        """Count one finished request (called once, when its access log line is written)."""
        ident = (key, model, endpoint, status)
        counter = self._request_children.get(ident)
        if counter is None:
            counter = self._request_children[ident] = self.requests.labels(
                key, model, endpoint, str(status)
            )
        counter.inc()
        span = (model, endpoint)
        histogram = self._duration_children.get(span)
        if histogram is None:
            histogram = self._duration_children[span] = self.duration.labels(model, endpoint)
        histogram.observe(duration)
        if ttft is not None:
            first = self._ttft_children.get(model)
            if first is None:
                first = self._ttft_children[model] = self.ttft.labels(model)
            first.observe(ttft)
        if prompt_tokens or completion_tokens or cached_tokens:
            pair = (key, model)
            kinds = self._token_children.get(pair)
            if kinds is None:
                kinds = self._token_children[pair] = (
                    self.tokens.labels(key, model, "prompt"),
                    self.tokens.labels(key, model, "completion"),
                    self.tokens.labels(key, model, "cached"),
                )
            if prompt_tokens:
                kinds[0].inc(prompt_tokens)
            if completion_tokens:
                kinds[1].inc(completion_tokens)
            if cached_tokens:
                kinds[2].inc(cached_tokens)
        limit = limit_kind(error) if status == 429 else None
        if limit is not None and key:
            self.rate_limited.labels(key, limit).inc()
        if key:
            day = self._key_day(key)
            day.requests += 1
            day.prompt_tokens += prompt_tokens
            day.completion_tokens += completion_tokens
            day.cached_tokens += cached_tokens
            if limit is not None:
                day.rate_limited += 1

    def queue_waited(self, model: str, seconds: float) -> None:
        """A generation waited `seconds` for a slot (granted, timed out or left)."""
        histogram = self._queue_children.get(model)
        if histogram is None:
            histogram = self._queue_children[model] = self.queue_wait.labels(model)
        histogram.observe(seconds)

    def _key_day(self, key: str) -> KeyDay:
        day = int(self._now() // SECONDS_PER_DAY)
        if day != self._day:
            self._day = day
            self._today = {}
        figures = self._today.get(key)
        if figures is None:
            figures = self._today[key] = KeyDay()
        return figures

    # -- readers ------------------------------------------------------------------------------

    def today(self) -> dict[str, KeyDay]:
        """Per key name, its figures since 00:00 UTC (in this process)."""
        if int(self._now() // SECONDS_PER_DAY) != self._day:
            return {}
        return dict(self._today)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)
