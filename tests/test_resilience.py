"""Failing well: upstream faults, client disconnects, oversized and slow input."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from .conftest import UNLIMITED_KEY, Stack, assert_schema, kept_alive
from .fake_llamacpp import count_prompt_tokens
from .test_api import CHAT, post, sse_events

STREAM_BODY = {"model": "m", "messages": CHAT, "stream": True}
AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}


def raw_completion_request(body: dict[str, Any]) -> bytes:
    """A POST /v1/completions as bytes, for tests that drive a raw socket."""
    data = json.dumps(body).encode()
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (UNLIMITED_KEY.encode(), len(data), data)
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert_schema(body, "ErrorResponse")
    return dict(body["error"])


def stream_error(events: list[Any]) -> dict[str, Any]:
    """The final SSE error event of a stream that failed after it started."""
    assert events and events[-1] != "[DONE]", "a failed stream must not end with [DONE]"
    last = events[-1]
    assert_schema(last, "ErrorResponse")
    return dict(last["error"])


@pytest.mark.parametrize(
    ("status", "expected", "code"),
    [
        (503, 503, "upstream_loading"),
        (500, 502, "upstream_error"),
        (502, 502, "upstream_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_error_statuses(
    stack: Stack, status: int, expected: int, code: str, stream: bool
) -> None:
    stack.fake.script.fail_status = status
    r = post(stack, "/v1/chat/completions", {"messages": CHAT, "stream": stream})
    assert r.status_code == expected
    assert error_of(r)["code"] == code
    if status == 503:
        assert r.headers["retry-after"] == "5"


def test_upstream_error_body_that_is_not_json(stack: Stack) -> None:
    stack.fake.script.fail_status = 500
    stack.fake.script.fail_body = "<html>oops</html>"
    r = post(stack, "/v1/completions", {"prompt": "x"})
    assert r.status_code == 502
    assert "oops" in error_of(r)["message"]


def test_context_overflow_is_400_context_length_exceeded(stack: Stack) -> None:
    stack.fake.script.n_ctx = 50
    r = post(
        stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 100}]}
    )
    assert r.status_code == 400
    error = error_of(r)
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 50 tokens" in error["message"]
    prompt = stack.fake.requests[-1]["prompt"]
    assert f"resulted in {count_prompt_tokens(prompt)} tokens" in error["message"]


def test_first_byte_timeout_is_504(make_stack: Any) -> None:
    stack = make_stack(upstream_first_byte_timeout=0.3)
    stack.fake.script.stall_before = 1.0
    for stream in (False, True):
        r = post(stack, "/v1/completions", {"prompt": "x", "stream": stream})
        assert r.status_code == 504
        assert error_of(r)["code"] == "upstream_timeout"
        assert "did not start answering within 0.3s" in error_of(r)["message"]


def test_a_failed_request_never_closes_a_connection_it_gave_back(make_stack: Any) -> None:
    """A generation's connection goes back to the pool as soon as its answer is read. A
    sibling that fails after that (or the client leaving) aborts the request's calls, and
    must not close that connection: another request may be using it by then. Regression
    (found by scripts/soak): request B, sent on the connection A's first choice gave back,
    got 502 "llama.cpp closed the connection" when A's second choice failed. (A's second
    choice fails with a 500, not a timeout: with a first-byte timeout, B's own deadline
    ran out too whenever the test thread was slow to release it, on a loaded host.)"""
    stack = make_stack()
    fake = stack.fake
    hang, hold_b = stack.runner.call(asyncio.Event), stack.runner.call(asyncio.Event)
    fake.script.seed_gates[101] = hang  # A's choice 1: held, then refused with a 500
    fake.script.seed_gates[200] = hold_b  # B: answers once A has failed
    try:
        with ThreadPoolExecutor(2) as threads:
            a = threads.submit(post, stack, "/v1/completions", {"prompt": "a", "n": 2, "seed": 100})
            assert stack.wait_for(lambda: len(fake.requests) == 2 and fake.active == 1)
            b = threads.submit(post, stack, "/v1/completions", {"prompt": "b", "seed": 200})
            assert stack.wait_for(lambda: len(fake.requests) == 3)
            fake.script.fail_status, fake.script.fail_prompt = 500, "a"
            stack.runner.call(hang.set)
            assert a.result(10).status_code == 502
            stack.runner.call(hold_b.set)
            answer = b.result(10)
    finally:
        stack.runner.call(hang.set)
        stack.runner.call(hold_b.set)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"]


def test_idle_timeout_mid_stream_ends_with_an_error_event(make_stack: Any) -> None:
    stack = make_stack(upstream_idle_timeout=0.3)
    stack.fake.script.stall_after_tokens = 3
    stack.fake.script.stall_seconds = 1.5
    r = post(stack, "/v1/chat/completions", STREAM_BODY)
    assert r.status_code == 200
    events = sse_events(r)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "Hello, world"
    error = stream_error(events)
    assert error["code"] == "upstream_timeout"
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1)  # upstream was cancelled


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("drop_after_tokens", "upstream_error"),
        ("malformed_after_tokens", "upstream_error"),
        ("stream_error_after_tokens", "upstream_error"),
    ],
)
def test_mid_stream_faults_end_with_one_error_event(stack: Stack, fault: str, code: str) -> None:
    setattr(stack.fake.script, fault, 2)
    r = post(stack, "/v1/chat/completions", STREAM_BODY)
    assert r.status_code == 200
    events = sse_events(r)
    for chunk in events[:-1]:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    assert stream_error(events)["code"] == code
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "Hello,"  # everything llama.cpp sent before the fault was relayed
    assert sum(1 for e in events if isinstance(e, dict) and "error" in e) == 1
    # The proxy keeps serving.
    stack.fake.reset()
    assert post(stack, "/v1/chat/completions", {"messages": CHAT}).status_code == 200


def test_mid_stream_fault_with_the_sdk_raises(stack: Stack) -> None:
    import openai

    stack.fake.script.drop_after_tokens = 2
    stream = stack.client().chat.completions.create(model="m", messages=CHAT, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_non_streamed_dropped_connection_is_502(stack: Stack) -> None:
    stack.fake.script.drop_body_after = 20  # of a body whose Content-Length says more
    with kept_alive(stack) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 502
        error = error_of(r)
        assert error["code"] == "upstream_error" and "closed the connection" in error["message"]
        stack.fake.reset()
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 200


def test_client_disconnect_mid_stream_cancels_the_upstream_request(stack: Stack) -> None:
    stack.fake.script.token_delay = 0.05
    stack.fake.script.tokens = [f" t{i}" for i in range(200)]
    with stack.http.stream("POST", "/v1/chat/completions", json=STREAM_BODY, headers=AUTH) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any("t1" in line for line in seen)
    # The fake sees its connection closed long before its 10 s of tokens are done.
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1, timeout=2)
    assert stack.wait_for(lambda: stack.ctx.in_flight == 0, timeout=2)


def test_body_over_the_limit_is_413(make_stack: Any) -> None:
    stack = make_stack(max_body_size=1000)
    r = post(stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]})
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"
    assert stack.fake.requests == []
    assert post(stack, "/v1/chat/completions", {"messages": CHAT}).status_code == 200


def test_slow_body_times_out_and_the_server_keeps_serving(make_stack: Any) -> None:
    stack = make_stack(client_body_timeout=0.3)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + UNLIMITED_KEY.encode() + b"\r\n\r\n{"
        )
        sock.settimeout(3)
        assert sock.recv(100) == b""  # closed by the proxy, not left hanging
    assert post(stack, "/v1/completions", {"prompt": "x"}).status_code == 200


def test_shutdown_draining_refuses_new_requests(stack: Stack) -> None:
    stack.ctx.draining = True
    r = post(stack, "/v1/completions", {"prompt": "x"})
    assert r.status_code == 503
    assert error_of(r)["code"] == "shutting_down"
    assert stack.http.get("/health/ready").status_code == 503
    stack.ctx.draining = False


def test_in_flight_returns_to_zero_after_every_kind_of_exit(stack: Stack) -> None:
    post(stack, "/v1/completions", {"prompt": "x"})
    post(stack, "/v1/completions", {"prompt": "x", "stream": True})
    post(stack, "/v1/completions", {"nope": 1})
    post(stack, "/v1/completions", {"prompt": "x"}, key="bad")
    stack.fake.script.fail_status = 500
    post(stack, "/v1/completions", {"prompt": "x", "stream": True})
    assert stack.wait_for(lambda: stack.ctx.in_flight == 0)


def test_no_upstream_call_outlives_its_request(stack: Stack) -> None:
    """Each server's client keeps its calls in flight (to end them if the machine vanishes:
    LlamaCppClient.abort_silent); every kind of exit must take its call out, or the set
    grows for ever."""
    script = stack.fake.script
    post(stack, "/v1/completions", {"prompt": "x"})
    post(stack, "/v1/chat/completions", {"messages": CHAT, "stream": True, "n": 2})
    script.fail_status = 500
    post(stack, "/v1/completions", {"prompt": "x", "stream": True})
    post(stack, "/v1/completions", {"prompt": "x", "n": 3})
    script.fail_status = None
    script.drop_after_tokens = 2
    post(stack, "/v1/completions", {"prompt": "x", "stream": True})
    script.drop_after_tokens = None
    with socket.create_connection(("127.0.0.1", stack.port)) as sock:  # leaves mid-stream
        sock.sendall(raw_completion_request({"prompt": "x", "stream": True}))
        assert sock.recv(65536)
    clients = [c for r in stack.ctx.routes.pools.values() for c in r.clients.values()]
    assert stack.wait_for(lambda: stack.ctx.in_flight == 0)
    assert stack.wait_for(lambda: all(c.in_flight == 0 for c in clients))


def test_upstream_json_that_is_malformed_is_502(stack: Stack) -> None:
    stack.fake.script.fail_status = 200
    stack.fake.script.fail_body = "{not json"
    with kept_alive(stack) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 502
        error = error_of(r)
        assert error["code"] == "upstream_error"
        assert error["message"] == "llama.cpp answered /completion with malformed JSON"
        stack.fake.reset()  # the proxy keeps serving on the same client connection
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 200


def test_client_disconnect_while_waiting_for_a_plain_answer(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stack.fake.script.stall_before = 3  # llama.cpp "thinks" for 3 s
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(raw_completion_request({"prompt": "x"}))
        assert stack.wait_for(lambda: len(stack.fake.requests) == 1)
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1, timeout=2)
    assert stack.wait_for(lambda: stack.ctx.in_flight == 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_client_that_stops_reading_holds_llamacpp_back(make_stack: Any) -> None:
    # 40 MB of stream: far more than the socket buffers between llama.cpp, the proxy and
    # the client can hold (a few MB each way on loopback).
    total = 20_000
    stack = make_stack(max_tokens_limit=total)  # the default cap would end it at 4096
    stack.fake.script.tokens = ["x" * 2000] * total
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(raw_completion_request({"prompt": "x", "stream": True}))
        # Read nothing. The stream advances only until the socket buffers on the way fill up.
        last = -1
        while stack.fake.events_sent != last:
            last = stack.fake.events_sent
            stack.wait_for(lambda seen=last: stack.fake.events_sent > seen, timeout=0.5)
        held_at = stack.fake.events_sent
        assert held_at < total / 2, held_at
        received, tail = 0, b""
        sock.settimeout(10)
        while b"data: [DONE]" not in tail:  # now read everything: the rest flows
            data = sock.recv(1 << 20)
            assert data, "the stream ended without [DONE]"
            received += len(data)
            tail = (tail + data)[-64:]
    assert stack.fake.events_sent == total + 1
    assert received > total * 2000


def test_a_client_that_stops_reading_holds_back_both_choices_then_gets_both(
    make_stack: Any,
) -> None:
    # n=2: both choices write into the one client connection. While the client reads
    # nothing both wait for it, and once it reads both must go on. (The wait was on
    # Tornado's flush future, which the other choice's next write replaces: left
    # unresolved, its choice stalled until the idle timeout and the stream ended in an
    # error event.)
    tokens = 10_000  # 2 x 20 MB: far more than the socket buffers on the way hold
    stack = make_stack(max_tokens_limit=tokens, upstream_idle_timeout=5.0)
    stack.fake.script.tokens = ["x" * 2000] * tokens
    body = {"prompt": "x", "stream": True, "n": 2, "max_tokens": tokens}
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(raw_completion_request(body))
        last = -1
        while stack.fake.events_sent != last:  # until the buffers on the way are full
            last = stack.fake.events_sent
            stack.wait_for(lambda seen=last: stack.fake.events_sent > seen, timeout=0.5)
        assert stack.fake.events_sent < tokens  # held back: under half of the 2 x tokens
        data, sock_deadline = b"", time.monotonic() + 30
        sock.settimeout(10)
        while b"data: [DONE]" not in data[-64:] and time.monotonic() < sock_deadline:
            piece = sock.recv(1 << 20)
            assert piece, "the stream ended without [DONE]"
            data += piece
    assert b'"error"' not in data[-4096:]
    assert data.count(b'"finish_reason":"') == 2  # both choices ran to their end


def test_connect_timeout_is_504(make_stack: Any) -> None:
    # A listener that never accepts, its queue full: connecting to it hangs (loopback only).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        stack = make_stack(llamacpp_server=f"http://127.0.0.1:{port}", upstream_connect_timeout=0.3)
        r = post(stack, "/v1/completions", {"prompt": "x"})
        assert r.status_code == 504
        assert error_of(r)["code"] == "upstream_timeout"
        assert "connecting" in error_of(r)["message"]
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_unresolvable_host_maps_to_502() -> None:
    from llamacpp_proxy.upstream.llamacpp import _connection_error

    error = _connection_error(socket.gaierror(-2, "Name or service not known"), "http://x")
    assert error.status == 502 and error.code == "upstream_unavailable"
    assert "resolve" in error.message


def test_health_stays_up_while_draining(stack: Stack) -> None:
    stack.ctx.draining = True
    assert stack.http.get("/health").status_code == 200
    ready = stack.http.get("/health/ready")
    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    stack.ctx.draining = False


# -- the upstream connection (docs/resilience.md, "The upstream connection") ------------


def hold_the_only_connection(stack: Stack, client: httpx.Client) -> Iterator[str]:
    """Open a stream that holds the pool's only upstream connection (once its first token
    came, it holds it until it ends); yields its text, token by token."""
    total = 1000
    stack.fake.script.tokens = [f" t{i}" for i in range(total)]
    stack.fake.script.token_delay = 0.05  # 50 s of stream: far longer than any test here
    with client.stream(
        "POST", "/v1/completions", json={"prompt": "hold", "stream": True}
    ) as holder:
        assert holder.status_code == 200, holder.read()
        for event in sse_lines(holder.iter_lines()):
            yield event["choices"][0]["text"]


def sse_lines(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON events of an SSE stream, as they arrive."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def shorten_deadline(stack: Stack, seconds: float) -> None:
    """--upstream-first-byte-timeout for the upstream calls made from now on."""
    upstream = stack.ctx.upstream

    def swap() -> None:
        upstream._settings = dataclasses.replace(
            upstream._settings, upstream_first_byte_timeout=seconds
        )

    stack.runner.call(swap)


def test_a_full_pool_does_not_outlast_the_deadline(make_stack: Any) -> None:
    # The stream that fills the pool is opened under a generous deadline, shortened only
    # once it streams: under the short one it raced the deadline under test (on a loaded
    # machine its answer could start after 0.3 s, fail with a 504 and free the connection,
    # and the queued request then rightly got a 200).
    stack = make_stack(upstream_max_connections=1, upstream_first_byte_timeout=60)
    with kept_alive(stack) as client:
        holder = hold_the_only_connection(stack, client)
        assert next(holder) == " t0"
        shorten_deadline(stack, 0.3)
        with kept_alive(stack) as other:
            r = other.post("/v1/completions", json={"model": "m", "prompt": "queued"})
            assert r.status_code == 504, r.text
            assert "stayed busy for 0.3s" in error_of(r)["message"]
            ready = other.get("/health/ready")  # probes have their own connections
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert next(holder) == " t1"  # the stream holding the connection was not disturbed
        holder.close()
    assert [body["prompt"] for body in stack.fake.requests] == ["hold"]  # never sent


def test_a_client_that_leaves_while_waiting_for_a_connection_stops_waiting(
    make_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = make_stack(upstream_max_connections=1)  # the default deadline: 600 s
    pool = stack.ctx.upstream._pool
    acquire = pool.acquire
    queued = 0  # requests waiting for a connection now

    async def watched_acquire(*args: Any) -> Any:
        # Who waits in the pool is not visible over HTTP: count them at its door.
        nonlocal queued
        queued += 1
        try:
            return await acquire(*args)
        finally:
            queued -= 1

    monkeypatch.setattr(pool, "acquire", watched_acquire)
    with kept_alive(stack) as client:
        holder = hold_the_only_connection(stack, client)
        assert next(holder) == " t0"
        assert queued == 0
        # A second client asks, and waits for the connection the stream holds; then leaves.
        with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
            sock.sendall(raw_completion_request({"prompt": "abandoned"}))
            assert stack.wait_for(lambda: queued == 1)
        # It left: it stops waiting now, while the stream still holds the connection.
        assert stack.wait_for(lambda: queued == 0)
        assert next(holder) == " t1"
        holder.close()
        # The connection is free again: the next client gets it, and llama.cpp never saw
        # the request whose client left.
        r = client.post("/v1/completions", json={"prompt": "third"})
        assert r.status_code == 200, r.text
    assert [body["prompt"] for body in stack.fake.requests] == ["hold", "third"]


def test_a_trickling_non_streamed_answer_is_bounded_by_the_deadline(make_stack: Any) -> None:
    stack = make_stack(upstream_first_byte_timeout=0.5, upstream_idle_timeout=1.0)
    stack.fake.script.drip_seconds = 0.1  # 10 bytes every 0.1 s: never idle, never done
    with kept_alive(stack) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 504
    assert "did not finish answering within 0.5s" in error_of(r)["message"]
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1)  # llama.cpp let go


def test_pings_on_a_stream_are_not_progress(make_stack: Any) -> None:
    stack = make_stack(upstream_idle_timeout=0.3)
    stack.fake.script.pings = 40
    stack.fake.script.ping_interval = 0.05  # two seconds of `: ping` before any token
    with kept_alive(stack) as client:
        r = client.post("/v1/chat/completions", json=STREAM_BODY)
    assert r.status_code == 200
    assert stream_error(sse_events(r))["code"] == "upstream_timeout"


@pytest.mark.parametrize(
    ("result", "words"),
    [
        ({"content": "a", "stop": True, "tokens_predicted": "lots"}, "tokens_predicted"),
        ({"content": "a", "stop": True, "tokens_evaluated": -3}, "tokens_evaluated"),
        ({"content": "a", "stop": True, "stop_type": ["x"]}, "stop_type"),
        ({"content": {"a": 1}, "stop": True}, "content"),
        ({"content": "a", "stop": True, "completion_probabilities": [1]}, "probabilities"),
        ({"error": {"code": "abc", "message": "upstream says no"}}, "upstream says no"),
        ({"error": {"message": "out of memory"}}, "out of memory"),
        ({"error": {"code": 500, "message": {"nested": 1}}}, "reported an error"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_upstream_results_are_502(
    stack: Stack, result: dict[str, Any], words: str, stream: bool
) -> None:
    if stream:
        stack.fake.script.raw_events = [{"content": "Hi", "stop": False}, result]
    else:
        stack.fake.script.fail_status = 200  # an HTTP 200 with this body
        stack.fake.script.fail_body = result
    with kept_alive(stack) as client:
        r = client.post("/v1/completions", json={"prompt": "x", "stream": stream})
        if stream:
            assert r.status_code == 200
            error = stream_error(sse_events(r))
        else:
            assert r.status_code == 502
            error = error_of(r)
        assert error["code"] == "upstream_error" and words in error["message"]
        stack.fake.reset()
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 200


def test_an_error_body_is_read_only_as_far_as_it_is_reported(stack: Stack) -> None:
    stack.fake.script.fail_status = 500
    stack.fake.script.huge_body = 100 * 1024 * 1024
    with kept_alive(stack) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 502 and len(r.content) < 4096
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1)
    # The proxy hung up after the first kilobytes; socket buffers hold a few MB at most.
    assert stack.fake.body_bytes_sent < 20 * 1024 * 1024


def test_a_huge_answer_is_refused_as_it_is_read(stack: Stack) -> None:
    stack.fake.script.fail_status = 200
    stack.fake.script.huge_body = 400 * 1024 * 1024
    with kept_alive(stack) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 502 and "too large" in error_of(r)["message"]
    assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1)
    assert stack.fake.body_bytes_sent < 100 * 1024 * 1024


def test_an_endless_sse_line_ends_the_stream_with_an_error(stack: Stack) -> None:
    stack.fake.script.raw_events = [{"content": "x" * (8 * 1024 * 1024), "stop": True}]
    with kept_alive(stack) as client:
        r = client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 200
    error = stream_error(sse_events(r))
    assert error["code"] == "upstream_error" and "SSE line over" in error["message"]


def test_a_flood_of_probes_costs_llamacpp_little(stack: Stack) -> None:
    def probe(path: str) -> int:
        return httpx.get(stack.url + path, headers=AUTH, timeout=10).status_code

    stack.fake.script.health_delay = 0.2  # each probe is in flight long enough to be shared
    with ThreadPoolExecutor(16) as workers:
        ready = list(workers.map(probe, ["/health/ready"] * 64))
        models = list(workers.map(probe, ["/v1/models"] * 64))
    assert ready == [200] * 64 and models == [200] * 64
    # One readiness probe in flight at a time, shared by every caller meanwhile; the model
    # list is made from llama.cpp's /props, which is reused (the prober asks for it once
    # too). Probes have two connections of their own.
    assert 1 <= stack.fake.health_requests <= 16
    assert 1 <= stack.fake.props_requests <= 3
    assert stack.ctx.upstream._probe_pool.open_connections <= 2
