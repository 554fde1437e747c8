"""The limiter's arithmetic, exact, with an injected clock (no sleeps)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llamacpp_proxy.errors import ConcurrencyLimited, RateLimited
from llamacpp_proxy.guard.auth import Limits, Principal
from llamacpp_proxy.guard.ratelimit import (
    Cost,
    InMemoryLimiter,
    format_duration,
    retry_after_header,
)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def limited(requests: int = 3, window: float = 10.0, **kw: int) -> Principal:
    return Principal("k", Limits(requests=requests, window=window, **kw))


def try_admit(limiter: InMemoryLimiter, principal: Principal) -> bool:
    try:
        run(limiter.admit(principal))
    except RateLimited:
        return False
    return True


def test_window_admits_n_then_refuses_until_the_oldest_expires() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(now=clock)
    p = limited(requests=3, window=10)
    admitted = []
    for _ in range(3):
        admitted.append(try_admit(limiter, p))
        clock.t += 2
    assert admitted == [True, True, True]  # at 1000, 1002, 1004
    assert not try_admit(limiter, p)
    clock.t = 1010.0  # exactly one window after the first: still inside [t-10, t]
    assert not try_admit(limiter, p)
    clock.t = 1010.001
    assert try_admit(limiter, p)
    assert not try_admit(limiter, p)


def test_refusal_carries_retry_after_and_headers() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(now=clock)
    p = limited(requests=2, window=60)
    admission = run(limiter.admit(p))
    assert admission.headers["x-ratelimit-limit-requests"] == "2"
    assert admission.headers["x-ratelimit-remaining-requests"] == "1"
    assert admission.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.t += 20
    run(limiter.admit(p))
    clock.t += 10
    with pytest.raises(RateLimited) as caught:
        run(limiter.admit(p))
    err = caught.value
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert err.headers["Retry-After"] == "31"  # first admitted at +0, frees just after +60
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"] == "50s"


def test_unlimited_principal_is_never_limited_and_keeps_no_state() -> None:
    limiter = InMemoryLimiter(now=Clock())
    p = Principal("u", None)
    for _ in range(1000):
        assert run(limiter.admit(p)).headers == {}
    assert limiter.tracked_keys == 0


@settings(max_examples=300, deadline=None)
@example(limit=1, window=1.0, gaps=[0.05, 1.0])  # 1.05 - 1.0 > 0.05 in floating point
@given(
    limit=st.integers(min_value=1, max_value=6),
    window=st.floats(min_value=0.5, max_value=20, allow_nan=False),
    gaps=st.lists(st.floats(min_value=0, max_value=8, allow_nan=False), min_size=1, max_size=60),
)
def test_no_interval_of_window_length_admits_more_than_the_limit(
    limit: int, window: float, gaps: list[float]
) -> None:
    clock = Clock(0.0)
    limiter = InMemoryLimiter(now=clock)
    p = limited(requests=limit, window=window)
    admitted = []
    for gap in gaps:
        clock.t += gap
        if try_admit(limiter, p):
            admitted.append(clock.t)
    # Every closed interval [a, a + window] starting at an admission holds <= limit.
    for i, start in enumerate(admitted):
        inside = [t for t in admitted[i:] if t - start <= window]
        assert len(inside) <= limit
    # And it is not over-strict: a request is refused only when `limit` are in its window.
    clock.t += window * 2
    assert try_admit(limiter, p)


def test_token_budget_refuses_until_the_window_frees_enough() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(now=clock)
    p = Principal("t", Limits(tokens_per_minute=100))
    a = run(limiter.admit(p))
    assert a.headers["x-ratelimit-remaining-tokens"] == "100"
    run(limiter.finish(a, 70))
    clock.t += 30
    b = run(limiter.admit(p))  # 70 < 100: still admitted
    run(limiter.finish(b, 40))
    clock.t += 1
    with pytest.raises(RateLimited) as caught:
        run(limiter.admit(p))
    assert caught.value.code == "tokens_rate_limit_exceeded"
    assert caught.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert caught.value.headers["Retry-After"] == "30"  # the 70 expire 60 s after +0
    clock.t = 1000.0 + 60.002
    run(limiter.admit(p))


def test_concurrency_slots_are_released_exactly_once() -> None:
    limiter = InMemoryLimiter(now=Clock())
    p = Principal("c", Limits(max_concurrent=2))
    a, b = run(limiter.admit(p)), run(limiter.admit(p))
    with pytest.raises(ConcurrencyLimited) as caught:
        run(limiter.admit(p))
    assert caught.value.code == "concurrency_limit_exceeded"
    run(limiter.finish(a, 0))
    run(limiter.finish(a, 0))  # a second release must not free a slot it doesn't hold
    assert limiter.in_flight("c") == 1
    c = run(limiter.admit(p))
    with pytest.raises(ConcurrencyLimited):
        run(limiter.admit(p))
    run(limiter.finish(b, 0))
    run(limiter.finish(c, 0))
    assert limiter.in_flight("c") == 0
    assert limiter.tracked_keys == 0


def test_concurrency_refusal_does_not_use_up_the_request_window() -> None:
    limiter = InMemoryLimiter(now=Clock())
    p = Principal("c", Limits(requests=5, window=60, max_concurrent=1))
    a = run(limiter.admit(p))
    for _ in range(10):
        with pytest.raises(ConcurrencyLimited):
            run(limiter.admit(p))
    run(limiter.finish(a, 0))
    admitted = 1
    for _ in range(10):
        try:
            adm = run(limiter.admit(p))
        except RateLimited:
            break
        run(limiter.finish(adm, 0))
        admitted += 1
    assert admitted == 5


def test_idle_keys_are_pruned() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(now=clock)
    for i in range(50):
        run(limiter.admit(Principal(f"k{i}", Limits(requests=1, window=10))))
    assert limiter.tracked_keys == 50
    clock.t += 11
    limiter.prune()
    assert limiter.tracked_keys == 0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.9994, "1s"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.9, "59.9s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
        (3600, "1h0m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_retry_after_rounds_up_and_is_at_least_one() -> None:
    assert retry_after_header(0.0) == "1"
    assert retry_after_header(1.01) == "2"
    assert retry_after_header(30.0) == "30"


def test_limits_changed_by_a_reload_apply_to_the_existing_history() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(now=clock)
    loose = Principal("k", Limits(max_concurrent=5))
    run(limiter.finish(run(limiter.admit(loose)), 0))
    a = run(limiter.admit(loose))  # still in flight when the limits change
    strict = Principal("k", Limits(requests=1, window=30, max_concurrent=5))
    run(limiter.admit(strict))
    with pytest.raises(RateLimited):
        run(limiter.admit(strict))  # the new request limit holds at once
    run(limiter.finish(a, 0))
    assert limiter.in_flight("k") == 1
    longer = Principal("k", Limits(requests=1, window=60, max_concurrent=5))
    clock.t += 45
    with pytest.raises(RateLimited):
        run(limiter.admit(longer))  # the window grew: the admission at +0 still counts


def test_slots_count_generations_and_a_reservation_settles_to_the_real_count() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(now=clock)
    p = Principal("g", Limits(tokens_per_minute=100, max_concurrent=3))
    big = run(limiter.admit(p, Cost(generations=8, tokens=60)))
    assert big.slots == 3 and limiter.in_flight("g") == 3  # runs 3 at a time
    with pytest.raises(ConcurrencyLimited):
        run(limiter.admit(p, Cost(tokens=1)))
    run(limiter.finish(big, 20))  # the 60 reserved become the 20 really used
    small = run(limiter.admit(p, Cost(generations=1, tokens=80)))
    assert small.headers["x-ratelimit-remaining-tokens"] == "0"  # 20 + 80
    with pytest.raises(RateLimited) as caught:
        run(limiter.admit(p, Cost(tokens=101)))
    assert "Request too large" in caught.value.message
    assert "Retry-After" not in caught.value.headers  # no wait makes it fit
    clock.t += 61  # the reservation outlived its minute: settling it takes nothing twice
    run(limiter.finish(small, 5))
    assert run(limiter.admit(p, Cost(tokens=95))).headers["x-ratelimit-remaining-tokens"] == "0"


@pytest.mark.parametrize("direct", [False, True])
def test_finish_without_a_task_settles_exactly_as_finish(direct: bool) -> None:
    """The handler releases an in-memory admission with finish_now(), on the spot: a task
    per request only to run code that waits for nothing cost CPU on every request. Both
    ways must leave the same state: slots freed once, the reservation settled to the real
    count."""
    limiter = InMemoryLimiter(now=Clock())
    p = Principal("d", Limits(tokens_per_minute=100, max_concurrent=2))
    first = run(limiter.admit(p, Cost(generations=2, tokens=60)))
    assert limiter.in_flight("d") == 2

    def finish(admission: object, tokens: int) -> None:
        if direct:
            limiter.finish_now(admission, tokens)  # type: ignore[arg-type]
        else:
            run(limiter.finish(admission, tokens))  # type: ignore[arg-type]

    finish(first, 20)
    finish(first, 20)  # a second release neither frees nor charges anything
    assert limiter.in_flight("d") == 0
    second = run(limiter.admit(p, Cost(tokens=80)))
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"  # 20 + 80
    finish(second, 0)
    assert limiter.in_flight("d") == 0
