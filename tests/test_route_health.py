"""Per-server health state machine and probe backoff; what llama.cpp's probe answers mean;
the failover rule (retry elsewhere only what llama.cpp cannot have started)."""

from __future__ import annotations

import pytest

from llamacpp_proxy.route.failover import Phase, after_failure
from llamacpp_proxy.route.health import Outcome, ProbePolicy, ServerHealth, State
from llamacpp_proxy.route.probe import (
    outcome_of_exception,
    outcome_of_status,
    parse_processing,
    parse_total_slots,
)

POLICY = ProbePolicy(
    ready_interval=1.0, loading_interval=2.0, backoff_base=0.5, backoff_max=8.0, jitter=0.0
)


def test_a_new_server_is_loading_and_probed_at_once() -> None:
    h = ServerHealth(POLICY, now=10.0)
    assert h.state is State.LOADING and h.next_probe_at == 10.0


def test_ok_makes_ready_and_503_makes_loading() -> None:
    h = ServerHealth(POLICY, now=0.0)
    assert h.observe(Outcome.OK, 0.0)
    assert h.state is State.READY and h.next_probe_at == 1.0
    assert h.observe(Outcome.LOADING, 1.0)
    assert h.state is State.LOADING and h.next_probe_at == 3.0
    assert not h.observe(Outcome.LOADING, 3.0)


def test_refused_takes_a_ready_server_down_at_once() -> None:
    h = ServerHealth(POLICY, initial=State.READY)
    assert h.observe(Outcome.REFUSED, 5.0)
    assert h.state is State.DOWN and h.since == 5.0


def test_one_timeout_is_not_a_dead_server_two_are() -> None:
    h = ServerHealth(POLICY, initial=State.READY)
    assert not h.observe(Outcome.TIMEOUT, 1.0)
    assert h.state is State.READY
    assert h.observe(Outcome.ERROR, 2.0)
    assert h.state is State.DOWN


def test_one_timeout_does_not_take_a_loading_or_unprobed_server_down_either() -> None:
    """docs/routing.md: a timeout takes a server down after 2 in a row. Regression: a
    server not yet probed (or loading) went down on its first slow answer, so a gateway
    started beside a busy llama-server failed requests at once instead of waiting."""
    for outcome in (Outcome.TIMEOUT, Outcome.ERROR):
        h = ServerHealth(POLICY, now=0.0)  # not probed yet: loading
        assert not h.observe(outcome, 0.0)
        assert h.state is State.LOADING and h.next_probe_at == 2.0  # the loading interval
        assert h.observe(Outcome.TIMEOUT, 2.0)
        assert h.state is State.DOWN
    h = ServerHealth(POLICY, now=0.0)
    assert h.observe(Outcome.REFUSED, 0.0)  # nothing listens: down at once, as before
    assert h.state is State.DOWN


def test_an_ok_between_timeouts_resets_the_count() -> None:
    h = ServerHealth(POLICY, initial=State.READY)
    h.observe(Outcome.TIMEOUT, 1.0)
    h.observe(Outcome.OK, 2.0)
    h.observe(Outcome.TIMEOUT, 3.0)
    assert h.state is State.READY


def test_a_down_server_is_probed_with_exponential_backoff_up_to_the_cap() -> None:
    h = ServerHealth(POLICY, initial=State.READY)
    t = 0.0
    waits = []
    h.observe(Outcome.REFUSED, t)
    for _ in range(7):
        waits.append(h.next_probe_at - t)
        t = h.next_probe_at
        h.observe(Outcome.REFUSED, t)
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert h.observe(Outcome.OK, t)
    assert h.state is State.READY and h.next_probe_at == t + 1.0
    h.observe(Outcome.REFUSED, t + 1)
    assert h.next_probe_at == t + 1.5  # backoff starts over after a recovery


def test_jitter_spreads_probes_within_its_fraction() -> None:
    policy = ProbePolicy(ready_interval=1.0, jitter=0.1)
    low = ServerHealth(policy, rand=lambda: 0.0)
    high = ServerHealth(policy, rand=lambda: 1.0)
    low.observe(Outcome.OK, 0.0)
    high.observe(Outcome.OK, 0.0)
    assert low.next_probe_at == pytest.approx(0.9)
    assert high.next_probe_at == pytest.approx(1.1)


@pytest.mark.parametrize(
    "status, outcome",
    [(200, Outcome.OK), (503, Outcome.LOADING), (500, Outcome.ERROR), (404, Outcome.ERROR)],
)
def test_health_status_outcomes(status: int, outcome: Outcome) -> None:
    assert outcome_of_status(status) is outcome


@pytest.mark.parametrize(
    "exc, outcome",
    [
        (ConnectionRefusedError(), Outcome.REFUSED),
        (ConnectionResetError(), Outcome.REFUSED),
        (OSError(113, "No route to host"), Outcome.REFUSED),
        (TimeoutError(), Outcome.TIMEOUT),
        (ValueError("junk"), Outcome.ERROR),
    ],
)
def test_probe_exceptions(exc: BaseException, outcome: Outcome) -> None:
    assert outcome_of_exception(exc) is outcome


@pytest.mark.parametrize(
    "body, total",
    [
        (b'{"total_slots": 4, "chat_template": "x"}', 4),
        (b'{"total_slots": 0}', None),
        (b'{"total_slots": true}', None),
        (b'{"total_slots": 100000}', None),
        (b'{"total_slots": "2"}', None),
        (b"[]", None),
        (b"not json", None),
    ],
)
def test_total_slots_from_props(body: bytes, total: int | None) -> None:
    assert parse_total_slots(body) == total


@pytest.mark.parametrize(
    "body, busy",
    [
        (b'[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]', 1),
        (b"[]", 0),
        (b'{"error": {"code": 501}}', None),
        (b'[{"id":0}]', None),
        (b'[{"id":0,"is_processing":1}]', None),
        (b"garbage", None),
        (b"[" + b",".join([b'{"is_processing":true}'] * 5000) + b"]", None),
    ],
)
def test_processing_count_from_slots(body: bytes, busy: int | None) -> None:
    assert parse_processing(body) == busy


def test_failures_before_any_request_byte_are_retried_elsewhere() -> None:
    refused = after_failure(Phase.CONNECT, error=ConnectionRefusedError())
    assert refused.retry_elsewhere and refused.health is Outcome.REFUSED
    timeout = after_failure(Phase.CONNECT, error=TimeoutError())
    assert timeout.retry_elsewhere and timeout.health is Outcome.TIMEOUT


def test_503_loading_is_retried_elsewhere_and_has_the_server_probed() -> None:
    verdict = after_failure(Phase.ANSWERED, status=503)
    assert verdict.retry_elsewhere and verdict.health is None
    assert verdict.recheck  # probed soon: /health says whether it is loading


@pytest.mark.parametrize("status", [400, 404, 500, 502])
def test_other_answers_are_the_clients_error_not_a_retry(status: int) -> None:
    verdict = after_failure(Phase.ANSWERED, status=status)
    assert not verdict.retry_elsewhere and verdict.health is None


@pytest.mark.parametrize(
    "error, recheck",
    [(ConnectionResetError(), True), (TimeoutError(), False), (None, False)],
)
def test_a_request_that_may_have_reached_llamacpp_is_never_resent(
    error: BaseException | None, recheck: bool
) -> None:
    """Nor does its failure judge the server: a closed connection asks for a probe."""
    verdict = after_failure(Phase.SENT, error=error)
    assert not verdict.retry_elsewhere and verdict.health is None
    assert verdict.recheck is recheck


def test_a_recheck_brings_the_next_probe_forward_and_never_back() -> None:
    health = ServerHealth(ProbePolicy(jitter=0.0), now=0.0)
    health.observe(Outcome.OK, 10.0)
    assert health.next_probe_at == 11.0
    health.recheck(10.2)
    assert health.next_probe_at == pytest.approx(10.25)
    health.recheck(10.21)  # a second failure meanwhile: no later, no probe more
    assert health.next_probe_at == pytest.approx(10.25)
    assert health.state is State.READY and health.failures == 0


def test_a_probe_in_flight_keeps_a_recheck_asked_meanwhile() -> None:
    """Regression: a request's failure asked for a probe within recheck_after while the
    regular probe was in flight; that probe's answer then set the next probe a whole
    interval later, dropping the recheck (the probe was sent before the failure, so it
    says nothing of it). The earlier time wins; a probe sent after the failure answers it."""
    health = ServerHealth(ProbePolicy(jitter=0.0), now=0.0)
    health.observe(Outcome.OK, 10.0, began=10.0)
    assert health.next_probe_at == 11.0
    health.recheck(11.01)  # the probe sent at 11.0 is in flight
    health.observe(Outcome.OK, 11.03, began=11.0)
    assert health.next_probe_at == pytest.approx(11.06)
    health.observe(Outcome.TIMEOUT, 11.04)  # a request's own outcome: not a probe, kept
    assert health.next_probe_at == pytest.approx(11.06)
    health.observe(Outcome.OK, 11.08, began=11.06)  # sent after the failure: answered
    assert health.next_probe_at == pytest.approx(12.08)
    health.observe(Outcome.OK, 12.1, began=12.08)
    assert health.next_probe_at == pytest.approx(13.1)  # and not asked again
