"""A large grammar or JSON schema is checked off the event loop (frontdoor/constraint_check.py):
other clients are served while it is checked, the refusals are the same, and the checks
waiting at once are bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from llamacpp_proxy.frontdoor.constraint_check import (
    INLINE_GRAMMAR_BYTES,
    INLINE_SCHEMA_BYTES,
    ConstraintChecker,
)
from llamacpp_proxy.render import constraints

from .conftest import LIMITED_KEY, UNLIMITED_KEY, Stack

AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
LARGE_GRAMMAR = "root ::= " + " | ".join(f'"word{i}"' for i in range(200))
LARGE_SCHEMA = {
    "type": "object",
    "properties": {f"field{i}": {"type": "string", "maxLength": 20} for i in range(300)},
    "required": [f"field{i}" for i in range(300)],
}
assert len(LARGE_GRAMMAR) > INLINE_GRAMMAR_BYTES
assert len(json.dumps(LARGE_SCHEMA)) > INLINE_SCHEMA_BYTES


class HeldCheck:
    """Holds every grammar and schema check in the thread that runs it until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def wrap(self, check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
        def held(constraint: Any) -> str | None:
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            self.release.wait(10)
            return check(constraint)

        return held


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldCheck]:
    hold = HeldCheck()
    monkeypatch.setattr(constraints, "grammar_problem", hold.wrap(constraints.grammar_problem))
    monkeypatch.setattr(constraints, "schema_problem", hold.wrap(constraints.schema_problem))
    yield hold
    hold.release.set()


def post_in_background(
    pool: ThreadPoolExecutor, stack: Stack, body: dict[str, Any]
) -> Future[httpx.Response]:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"

    def post() -> httpx.Response:
        with httpx.Client(base_url=stack.url, headers=AUTH, timeout=20) as client:
            return client.post(path, json=body)

    return pool.submit(post)


def assert_checked_off_the_loop(stack: Stack, held: HeldCheck, body: dict[str, Any]) -> None:
    """Send `body` and, while its check is held in the worker thread, have another client
    on another connection answered (a check on the loop would stop it: the health check
    times out); then the request is answered."""
    with ThreadPoolExecutor(1) as pool:
        checked = post_in_background(pool, stack, body)
        assert held.entered.wait(10)
        other = httpx.get(stack.url + "/health", timeout=3)
        assert other.status_code == 200
        held.release.set()
        answer = checked.result(20)
    assert answer.status_code == 200, answer.text
    assert held.threads and all(name.startswith("constraint-check") for name in held.threads)


def assert_refused_then_served(
    stack: Stack, extra: dict[str, Any], param: str, code: str
) -> dict[str, Any]:
    """A text completion with `extra` gets a 400 naming `param` with `code`, never reaching
    llama.cpp, and the same kept-alive connection is served next; returns the error."""
    with httpx.Client(base_url=stack.url, headers=AUTH) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra})
        assert r.status_code == 400, r.text
        error: dict[str, Any] = r.json()["error"]
        assert (error["param"], error["code"]) == (param, code), error
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200  # the same connection goes on serving
    assert len(stack.fake.requests) == 1  # only the second request reached llama.cpp
    return error


@pytest.mark.parametrize(
    "constraint",
    [
        {"grammar": LARGE_GRAMMAR},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "big", "schema": LARGE_SCHEMA},
            }
        },
    ],
    ids=["grammar", "json_schema"],
)
def test_other_clients_are_served_while_a_large_constraint_is_checked(
    stack: Stack, held: HeldCheck, constraint: dict[str, Any]
) -> None:
    """Regression: the check ran on the event loop, so a 64 KiB grammar held every client
    for 27 ms (about 100 ms since the ambiguity count); here a check held until released
    would have stopped the gateway (the helper's health check timed out)."""
    body = {"prompt": "hi", "max_tokens": 2, **constraint}
    if "response_format" in constraint:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **constraint}
    assert_checked_off_the_loop(stack, held, body)


def test_a_small_constraint_is_checked_where_it_costs_least(stack: Stack) -> None:
    """A grammar under INLINE_GRAMMAR_BYTES is checked at once, on the loop (a thread's
    hand-off costs more): its refusal is the same 400."""
    with httpx.Client(base_url=stack.url, headers=AUTH) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "grammar": 'root ::= "a"{5,2}'})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "grammar"
        ok = client.post("/v1/completions", json={"prompt": "hi", "grammar": 'root ::= "a"{2,5}'})
        assert ok.status_code == 200, ok.text
    assert stack.ctx.constraint_checks._worker is None  # no thread was started


def test_a_large_constraint_refused_off_the_loop_is_the_same_400(stack: Stack) -> None:
    bad = LARGE_GRAMMAR + ' | "a"{5,2}'
    assert_refused_then_served(stack, {"grammar": bad}, "grammar", "invalid_grammar")


def test_large_checks_past_the_bound_get_503_and_the_gateway_goes_on(
    stack: Stack, held: HeldCheck
) -> None:
    """At most max_waiting large checks wait at once: the next request is told to retry,
    so a flood of large grammars queues no unbounded work."""
    stack.ctx.constraint_checks = ConstraintChecker(max_waiting=1)
    body = {"prompt": "hi", "max_tokens": 2, "grammar": LARGE_GRAMMAR}
    with ThreadPoolExecutor(1) as pool:
        first = post_in_background(pool, stack, body)
        assert held.entered.wait(10)
        with httpx.Client(base_url=stack.url, headers=AUTH, timeout=10) as client:
            refused = client.post("/v1/completions", json=body)
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "server_overloaded"
            held.release.set()
            assert first.result(20).status_code == 200
            again = client.post("/v1/completions", json=body)  # the bound freed
            assert again.status_code == 200, again.text


def test_one_key_takes_at_most_its_share_of_the_waiting_places(
    stack: Stack, held: HeldCheck
) -> None:
    """A key's limits bound how many checks it asks for in a window, not at once: past its
    share of the places (max_waiting_per_key) its next large check is told to retry, and
    another key's still waits its turn. Regression: one key's burst took every place."""
    stack.ctx.constraint_checks = ConstraintChecker(max_waiting=4, max_waiting_per_key=1)
    body = {"prompt": "hi", "max_tokens": 2, "grammar": LARGE_GRAMMAR}
    with ThreadPoolExecutor(2) as pool:
        first = post_in_background(pool, stack, body)
        assert held.entered.wait(10)
        with httpx.Client(base_url=stack.url, headers=AUTH, timeout=10) as client:
            refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 503, refused.text
        assert "of this key's" in refused.json()["error"]["message"]

        def other_key() -> httpx.Response:
            limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
            with httpx.Client(base_url=stack.url, headers=limited, timeout=20) as client:
                return client.post("/v1/completions", json=body)

        second = pool.submit(other_key)
        assert stack.wait_for(lambda: stack.ctx.constraint_checks.waiting == 2)
        held.release.set()
        assert first.result(20).status_code == 200
        assert second.result(20).status_code == 200


def aliased_refs_schema() -> dict[str, Any]:
    """A schema whose JSON is small but whose check walks one large subtree once per
    `$ref`: schema_limits.py walks each reference's target on its own, keyed by the
    reference's text, and "#/$defs/l/0", "#/$defs/l/00", ... all name the same item."""
    refs = [{"$ref": "#/$defs/l/" + "0" * k} for k in range(1, 21)]
    return {"$defs": {"l": [{"type": "object", "examples": [0] * 60}]}, "allOf": refs}


def test_a_small_schema_with_many_references_is_checked_off_the_loop(
    stack: Stack, held: HeldCheck
) -> None:
    """Regression: the size estimate read only the schema's bytes, so a schema like this one
    (under INLINE_SCHEMA_BYTES) was checked on the event loop, though its check reads the
    list once per reference (47 ms for the worst one built under 8 KiB, the earlier
    threshold): the held check stopped the gateway and the health check timed out."""
    schema = aliased_refs_schema()
    assert len(json.dumps(schema, separators=(",", ":"))) < INLINE_SCHEMA_BYTES
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    assert_checked_off_the_loop(stack, held, body)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"grammar": 'root ::= "a"{' + "1" * 5000 + ",1}"}, "grammar", "invalid_grammar"),
        (
            {"json_schema": {"type": "string", "pattern": "^a{" + "1" * 5000 + ",1}$"}},
            "json_schema",
            "invalid_json_schema",
        ),
    ],
    ids=["grammar_quantifier", "pattern_quantifier"],
)
def test_a_number_too_long_to_read_is_the_clients_400(
    stack: Stack, body: dict[str, Any], param: str, code: str
) -> None:
    """Regression: a bound of more than 4300 digits made the check's int() raise ValueError,
    and the client got a 500 server_error for its own malformed constraint. (A `$ref`'s
    list index is read as llama.cpp reads it: tests/test_schema_limits.py.)"""
    error = assert_refused_then_served(stack, body, param, code)
    assert "too long to read" in error["message"]


def test_a_schema_whose_check_costs_more_than_a_millisecond_is_checked_off_the_loop(
    stack: Stack, held: HeldCheck
) -> None:
    """Regression: schemas up to 8 KiB were checked on the loop, on the word that such a
    check costs about 1 ms; a pattern of 2600 groups (7.8 KB) took 3.6 ms, and lists of
    empty objects or arrays about 2 ms, every other client waiting. Here the held check
    stopped the gateway and the health check below timed out."""
    schema = {"type": "string", "pattern": "^" + "(a)" * 2600 + "$"}
    assert len(json.dumps(schema, separators=(",", ":"))) < 8192
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    assert_checked_off_the_loop(stack, held, body)


STUCK_CHECK = """
import asyncio, threading
from llamacpp_proxy.frontdoor.constraint_check import INLINE_GRAMMAR_BYTES, ConstraintChecker
from llamacpp_proxy.render import constraints
from llamacpp_proxy.render.constraints import Constraint

started, never = threading.Event(), threading.Event()

def stuck(grammar):
    started.set()
    never.wait()  # a check that does not end

constraints.grammar_problem = stuck

async def main():
    checker = ConstraintChecker()
    grammar = "x" * (INLINE_GRAMMAR_BYTES + 1)
    task = asyncio.ensure_future(checker.check(Constraint({"grammar": grammar}, False), "k"))
    assert await asyncio.to_thread(started.wait, 10)
    checker.close()  # what shutdown does
    task.cancel()
    print("closed", flush=True)

asyncio.run(main())
"""


def test_a_check_still_running_does_not_hold_the_process_at_exit() -> None:
    """A check cannot be stopped once it runs, and one may run longer than its bounds
    assume (before schema_limits.py bounded the values it reads, an 89 KiB schema took
    6 s). Regression: the worker was a ThreadPoolExecutor's, which the interpreter joins at
    exit, so a gateway told to stop did not exit until the check ended; here it never does."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", STUCK_CHECK], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the process did not exit: {exc.stdout!r}") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "closed"


def test_a_key_past_its_limits_causes_no_check(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check runs after admission, so a key's limits bound the checking it can cause
    (and its share of the worker). Regression: it ran before, so a limited key's requests
    past its limit were each checked (filling the worker's queue) before their 429."""
    checked: list[str] = []
    real = constraints.grammar_problem

    def counting(grammar: str) -> str | None:
        checked.append(grammar)
        return real(grammar)

    monkeypatch.setattr(constraints, "grammar_problem", counting)
    body = {"prompt": "hi", "max_tokens": 2, "grammar": LARGE_GRAMMAR}
    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    with httpx.Client(base_url=stack.url, headers=limited, timeout=10) as client:
        answers = [client.post("/v1/completions", json=body).status_code for _ in range(5)]
    assert answers == [200, 200, 200, 429, 429]  # the limited key: 3 requests a minute
    assert len(checked) == 3


def test_checks_dropped_at_shutdown_get_a_503_of_their_own(stack: Stack, held: HeldCheck) -> None:
    """Regression: a check still waiting for the worker when the shutdown closed it ended
    its request with a cancellation (no answer before the connection was closed), and a
    large constraint that came after got a 500."""
    body = {"prompt": "hi", "max_tokens": 2, "grammar": LARGE_GRAMMAR}
    with ThreadPoolExecutor(2) as pool:
        running = post_in_background(pool, stack, body)
        assert held.entered.wait(10)
        waiting = post_in_background(pool, stack, body)
        assert stack.wait_for(lambda: stack.ctx.constraint_checks.waiting == 2)
        stack.runner.call(stack.ctx.constraint_checks.close)
        dropped = waiting.result(20)
        assert dropped.status_code == 503, dropped.text
        assert dropped.json()["error"]["code"] == "shutting_down"
        held.release.set()
        assert running.result(20).status_code == 200  # the running check ended on its own
    with httpx.Client(base_url=stack.url, headers=AUTH, timeout=10) as client:
        after = client.post("/v1/completions", json=body)
        assert after.status_code == 503, after.text
        assert after.json()["error"]["code"] == "shutting_down"
