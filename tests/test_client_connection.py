"""The client connection: errors on kept-alive connections, bursts, connection caps.

Every test here drives the proxy the way real clients do, over ONE kept-alive client for
many requests: a fresh connection per call is what hid these bugs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import http.client
import json
import logging
import socket
import struct
import time
from typing import Any

import httpx
import openai
import pytest

from llamacpp_proxy.guard.auth_throttle import AuthFailureThrottle
from llamacpp_proxy.main import ProxyServer, build_context, make_server

from .conftest import LIMITED_KEY, UNLIMITED_KEY, default_settings, wait_until_fake_is_idle

CHAT = [{"role": "user", "content": "Hi there"}]
BODY = json.dumps({"model": "m", "messages": CHAT, "max_tokens": 5})


@pytest.mark.parametrize("stream", [False, True])
def test_wrong_key_answers_keep_the_connection_usable(make_stack: Any, stream: bool) -> None:
    stack = make_stack(auth_failure_limit=10_000)
    body = json.dumps({"model": "m", "messages": CHAT, "stream": stream})
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        statuses: collections.Counter[int] = collections.Counter()
        for i in range(100):
            key = UNLIMITED_KEY if i % 10 == 9 else "sk-wrong-key-0123456789"
            # An error here (connection reset, server disconnected) is the bug itself.
            r = http.post(
                "/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {key}"}
            )
            statuses[r.status_code] += 1
            if r.status_code != 200:
                assert r.json()["error"]["code"] == "invalid_api_key"
    assert statuses == {401: 90, 200: 10}


def test_sdk_sees_authentication_and_rate_limit_errors_never_connection_errors(
    make_stack: Any,
) -> None:
    stack = make_stack(auth_failure_limit=10_000, rate_limit_max_requests=3)
    wrong = stack.client("sk-wrong-key-0123456789")
    for _ in range(40):
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="m", messages=CHAT)
    limited = stack.client(LIMITED_KEY)
    for _ in range(3):
        assert limited.chat.completions.create(model="m", messages=CHAT).choices
    for _ in range(40):
        with pytest.raises(openai.RateLimitError):
            limited.chat.completions.create(model="m", messages=CHAT)
    # The same kept-alive clients still work for what is allowed.
    assert stack.client(UNLIMITED_KEY).completions.create(model="m", prompt="x").choices


def test_errors_that_close_say_so(make_stack: Any) -> None:
    stack = make_stack(max_body_size=1000)
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        big = json.dumps({"model": "m", "prompt": "x" * 2000})
        r = http.post(
            "/v1/completions", content=big, headers={"Authorization": f"Bearer {UNLIMITED_KEY}"}
        )
        assert r.status_code == 413
        assert r.headers["connection"] == "close"
        r = http.post(
            "/v1/completions",
            content=json.dumps({"model": "m", "prompt": "x"}),
            headers={"Authorization": f"Bearer {UNLIMITED_KEY}"},
        )
        assert r.status_code == 200


def test_a_mixed_burst_of_admitted_and_refused_requests_is_all_answered(
    make_stack: Any,
) -> None:
    """Item 13b: 400 limited (3 admitted, 397 refused) and 60 unlimited, 200 at a time."""
    stack = make_stack(rate_limit_max_requests=3, auth_failure_limit=10_000)

    async def burst() -> collections.Counter[tuple[str, int | str]]:
        results: collections.Counter[tuple[str, int | str]] = collections.Counter()
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        # The deadline: every answer must come well within it (a hang shows as ReadTimeout).
        async with httpx.AsyncClient(base_url=stack.url, timeout=15, limits=limits) as http:
            gate = asyncio.Semaphore(200)

            async def one(name: str, key: str) -> None:
                async with gate:
                    try:
                        r = await http.post(
                            "/v1/chat/completions",
                            content=BODY,
                            headers={"Authorization": f"Bearer {key}"},
                        )
                        results[(name, r.status_code)] += 1
                    except httpx.HTTPError as exc:
                        results[(name, type(exc).__name__)] += 1

            jobs = [one("limited", LIMITED_KEY) for _ in range(400)]
            jobs += [one("unlimited", UNLIMITED_KEY) for _ in range(60)]
            await asyncio.gather(*jobs)
        return results

    results = asyncio.run(burst())
    assert results == {("limited", 200): 3, ("limited", 429): 397, ("unlimited", 200): 60}


# -- the auth-failure throttle forgets old addresses (item 25) ------------------------------


def test_auth_throttle_drops_expired_addresses_without_anyone_calling_prune() -> None:
    clock = {"t": 0.0}
    throttle = AuthFailureThrottle(limit=5, window=10, now=lambda: clock["t"])
    for i in range(50):
        throttle.record_failure(f"10.0.0.{i}")
    clock["t"] = 10.5
    throttle.record_failure("10.0.1.1")
    assert throttle.tracked_addresses == 1


# -- the connection cap (item 14) ------------------------------------------------------------


def test_connections_beyond_the_cap_wait_and_are_served_when_one_closes(
    make_stack: Any,
) -> None:
    stack = make_stack(max_connections=3)
    idle = [socket.create_connection(("127.0.0.1", stack.port)) for _ in range(10)]
    try:
        assert stack.wait_for(lambda: stack.server.open_connections == 3)
        # The other seven are queued in the kernel, not accepted: the cap holds.
        assert stack.runner.call(lambda: stack.server.open_connections) == 3
    finally:
        for sock in idle:
            sock.close()
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        assert http.get("/health").status_code == 200
    assert stack.wait_for(lambda: stack.server.open_connections <= 1)


def test_accept_errors_back_off_and_are_logged_once(
    runner: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 14: EMFILE on accept spun the loop writing a traceback per turn."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    calls = {"n": 0}

    class OutOfDescriptors:
        """A listening socket whose accept() fails as under LimitNOFILE exhaustion."""

        def fileno(self) -> int:
            return listener.fileno()

        def getsockname(self) -> Any:
            return listener.getsockname()

        def accept(self) -> Any:
            calls["n"] += 1
            raise OSError(errno.EMFILE, "Too many open files")

        def close(self) -> None:
            listener.close()

    server = runner.run(_server_on([OutOfDescriptors()]))  # type: ignore[list-item]
    client = socket.create_connection(listener.getsockname())  # makes the listener readable
    try:
        stack_wait = time.monotonic() + 10
        while calls["n"] < 4:  # backoff 0.05, 0.1, 0.2 s: four tries in about 0.4 s
            assert time.monotonic() < stack_wait, "accept was not retried"
            time.sleep(0.02)
    finally:
        runner.call(server.stop)
        client.close()
    failures = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(failures) == 1 and "Too many open files" in failures[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert calls["n"] < 20  # retried with backoff, not once per loop turn


@pytest.mark.parametrize("workers", [1, 2])
def test_with_several_workers_a_wakeup_accepts_one_connection(runner: Any, workers: int) -> None:
    """--workers N share one listening socket, and every worker wakes to a new connection.
    One that took every queued connection at its wake-up often took a whole burst (wrk's
    32 connections split 32/0, 31/1, 29/3 between two workers), leaving the other core idle:
    3,250-5,600 req/s at 32 clients against 5,700 with the burst shared (15/17,
    docs/benchmarks.md, "Several workers"). So with several workers a wake-up accepts one
    connection and the others take theirs; alone, a worker takes all it can at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    queued = [socket.create_connection(listener.getsockname()) for _ in range(5)]

    async def one_wakeup() -> int:
        server = make_server(build_context(default_settings(workers=workers)))
        server._accept(listener)  # what the loop runs when the socket is readable
        accepted = server.open_connections
        await server.close_all_connections()
        return accepted

    try:
        assert runner.run(one_wakeup()) == (1 if workers > 1 else 5)
    finally:
        for sock in queued:
            sock.close()
        listener.close()


async def _server_on(sockets: list[socket.socket]) -> ProxyServer:
    server = make_server(build_context(default_settings()))
    server.serve(sockets)
    return server


# -- bounds on one chat request (item 15) ----------------------------------------------------


def _chat(n: int, content: str = "hi") -> list[dict[str, Any]]:
    """n messages alternating user/assistant, ending with the user."""
    return [{"role": "user" if (n - i) % 2 else "assistant", "content": content} for i in range(n)]


def _post(http: httpx.Client, body: dict[str, Any], key: str = UNLIMITED_KEY) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {key}"},
    )


def _assert_still_serving(http: httpx.Client, stack: Any) -> None:
    """The same kept-alive connection and another client are both served after a refusal."""
    assert _post(http, {"model": "m", "messages": CHAT, "max_tokens": 5}).status_code == 200
    other = stack.client().chat.completions.create(model="m", messages=CHAT, max_tokens=5)
    assert other.choices[0].message.content


def test_a_chat_over_the_message_bound_is_refused_naming_messages(make_stack: Any) -> None:
    """Item 15: the filed 95,001-message chat (3.5 MB) was parsed and rendered in full."""
    stack = make_stack()
    stack.fake.script.n_ctx = 10**9  # the fake's context check is not what this tests
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        r = _post(http, {"model": "m", "messages": _chat(95_001), "max_tokens": 5})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == "messages"
        assert error["code"] == "array_above_max_length"
        assert "maximum length 4096" in error["message"] and "95001" in error["message"]
        _assert_still_serving(http, stack)
        # At the bound the chat is served.
        r = _post(http, {"model": "m", "messages": _chat(4096), "max_tokens": 5})
        assert r.status_code == 200, r.text
        r = _post(http, {"model": "m", "messages": _chat(4097), "max_tokens": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_too_many_tools_or_tool_calls_are_refused_naming_the_param(make_stack: Any) -> None:
    stack = make_stack(chat_template="llama3")
    stack.fake.script.n_ctx = 10**9
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        r = _post(http, {"model": "m", "messages": CHAT, "tools": [tool] * 129})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "tools"
        assert r.json()["error"]["code"] == "array_above_max_length"
        r = _post(http, {"model": "m", "messages": CHAT, "tools": [tool] * 128})
        assert r.status_code == 200, r.text

        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages = [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": None, "tool_calls": [call] * 3000},
            {"role": "tool", "tool_call_id": "c", "content": "ok"},
            {"role": "assistant", "content": None, "tool_calls": [call] * 1097},
            {"role": "user", "content": "go on"},
        ]
        r = _post(http, {"model": "m", "messages": messages})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages[3].tool_calls"
        assert r.json()["error"]["code"] == "array_above_max_length"
        _assert_still_serving(http, stack)


def test_a_rendered_prompt_over_twice_the_body_cap_is_refused(make_stack: Any) -> None:
    """A body within --max-body-size whose template output is far larger (llama3 writes
    tool schemas with tojson(indent=4): a compact array of zeros grows about tenfold)."""
    stack = make_stack(chat_template="llama3", max_body_size=20_000)
    stack.fake.script.n_ctx = 10**9
    schema = {"type": "object", "enum": [0] * 3000}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    body = {"model": "m", "messages": CHAT, "tools": [tool]}
    assert len(json.dumps(body)) < 20_000
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        r = _post(http, body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "messages" and error["code"] == "prompt_too_large"
        assert "limit is 40000" in error["message"]
        _assert_still_serving(http, stack)
    assert all(len(b["prompt"]) < 40_000 for b in stack.fake.requests)  # nothing huge went up


def test_a_large_chat_is_rendered_whole(make_stack: Any) -> None:
    """Above 64 KiB the template renders in a thread: the prompt is the same as on the loop."""
    stack = make_stack()
    stack.fake.script.n_ctx = 10**9
    small, large = _chat(3, "a" * 10), _chat(3, "b" * 100_000)
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        for messages in (small, large):
            assert _post(http, {"model": "m", "messages": messages}).status_code == 200
    prompts = [b["prompt"] for b in stack.fake.requests]
    assert prompts[-1] == prompts[-2].replace("a" * 10, "b" * 100_000)


def test_client_connections_keep_tcp_nodelay_between_and_during_responses(
    make_stack: Any,
) -> None:
    """Tornado turned Nagle's algorithm back on after every response (and wrote each
    response with it on until its end, so an SSE event could wait for the client's ACK of
    the previous one), at two setsockopt calls per request. Client connections now have
    TCP_NODELAY on from accept to close."""
    stack = make_stack()
    body = {"model": "m", "messages": CHAT, "max_tokens": 5}
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        for stream in (False, True, False):
            r = _post(http, {**body, "stream": stream})
            assert r.status_code == 200
            connections = list(stack.server._connections)
            assert len(connections) == 1  # the one kept-alive connection
            sock = connections[0].stream.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """The proxy closed this connection (EOF) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_client_deadlines_close_a_silent_head_or_an_idle_kept_alive_connection(
    make_stack: Any,
) -> None:
    """--client-idle-timeout bounds the wait for a request's head: a client that connects
    and sends half a head, and a kept-alive connection after its answer, are closed; one
    that is slow to send its body is closed by --client-body-timeout. (Timers of the
    proxy's own since Tornado's with_timeout around every read was dropped for its cost:
    frontdoor/client_deadlines.py.)"""
    stack = make_stack(client_idle_timeout=0.3, client_body_timeout=0.3)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never ends
        assert closed_within(sock, 5)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + UNLIMITED_KEY.encode() + b"\r\n\r\n{"
        )
        assert closed_within(sock, 5)
    kept = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
        for _ in range(2):  # the deadline starts anew for each request on the connection
            kept.request("POST", "/v1/chat/completions", body=BODY, headers=headers)
            answer = kept.getresponse()
            assert answer.status == 200 and json.loads(answer.read())["choices"]
        assert kept.sock is not None
        assert closed_within(kept.sock, 5)  # idle after its answers: closed
    finally:
        kept.close()


def test_a_request_longer_than_the_client_deadlines_is_not_cut(make_stack: Any) -> None:
    """The head and body deadlines end once the request is in: a stream that takes longer
    than both is answered whole, and the same kept-alive connection serves the next."""
    stack = make_stack(client_idle_timeout=0.3, client_body_timeout=0.3)
    stack.fake.script.token_delay = 0.15  # about a second for the whole answer
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        headers = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
        body = json.dumps({"model": "m", "messages": CHAT, "stream": True})
        with http.stream("POST", "/v1/chat/completions", content=body, headers=headers) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        stack.fake.script.token_delay = 0.0
        again = http.post("/v1/chat/completions", content=BODY, headers=headers)
        assert again.status_code == 200


def test_a_connection_closed_while_its_next_head_is_awaited_leaves_no_deadline_behind(
    make_stack: Any,
) -> None:
    """A client that closes its kept-alive connection after an answer (curl, most scripts)
    or sends a malformed head: nothing of that connection stays alive for the idle timeout
    in the head deadline's timer (75 s by default: at a thousand such connections a second,
    75,000 connections' objects)."""
    import gc
    import weakref

    from llamacpp_proxy.frontdoor.client_deadlines import ClientDeadlines

    stack = make_stack(client_idle_timeout=3600.0)
    for head in (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + UNLIMITED_KEY.encode()
        + b"\r\nContent-Length: "
        + str(len(BODY)).encode()
        + b"\r\n\r\n"
        + BODY.encode(),
        b"NOT HTTP AT ALL\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
            sock.sendall(head)
            assert sock.recv(65536)  # an answer (200, or 400 for the malformed head)
    assert stack.wait_for(lambda: stack.server.open_connections == 0, 5)

    def alive() -> list[weakref.ref[Any]]:
        gc.collect()
        return [weakref.ref(o) for o in gc.get_objects() if isinstance(o, ClientDeadlines)]

    assert stack.runner.call(alive) == []


@pytest.mark.parametrize(
    "ending",
    [
        "client leaves",
        "llama.cpp drops it",
        "llama.cpp drops a whole answer",
        "llama.cpp drops the streams of n=2 choices",
    ],
)
def test_a_request_that_fails_leaves_no_cyclic_garbage(
    make_stack: Any, fake: Any, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that ends in a failure (a client that leaves mid-stream: a stop button, a
    crashed agent; llama.cpp closing the connection) must not leave a reference cycle
    behind: each one used to keep 90-140 objects (the exceptions that ended it, their
    tracebacks and the frames of every coroutine they went through) that only a full
    collection frees; a thousand streams cut at once made a 40 ms pause."""
    import gc

    fake.script.token_delay = 0.05
    if ending.startswith("llama.cpp drops the stream") or ending == "llama.cpp drops it":
        fake.script.drop_after_tokens = 2
    if ending == "llama.cpp drops a whole answer":
        fake.script.drop_body_after = 10
    stack = make_stack()
    streamed = ending != "llama.cpp drops a whole answer"
    choices = 2 if "n=2" in ending else 1  # n > 1: each choice its own task (a cycle once)
    body = json.dumps(
        {"model": "m", "messages": CHAT, "max_tokens": 50, "stream": streamed, "n": choices}
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {UNLIMITED_KEY}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()

    def fail_requests(count: int) -> None:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
                sock.sendall(head)
                answer = sock.recv(65536)
                if not streamed:
                    assert answer.startswith(b"HTTP/1.1 502"), answer
                    continue
                assert answer.startswith(b"HTTP/1.1 200")
                if ending == "client leaves":
                    time.sleep(0.12)  # a few tokens in, then gone with a reset
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    continue
                while not answer.endswith(b"0\r\n\r\n"):  # to the stream's error event
                    more = sock.recv(65536)
                    assert more
                    answer += more
                assert b"llama.cpp" in answer and b"data: [DONE]" not in answer
        assert stack.wait_for(lambda: stack.server.open_connections == 0, 5)
        wait_until_fake_is_idle(stack.runner, fake)

    fail_requests(1)  # first use: whatever is created once
    stack.runner.call(gc.collect)
    gc.disable()  # nothing freed behind the count's back
    try:
        fail_requests(5)
        garbage = stack.runner.call(gc.collect)
    finally:
        gc.enable()
    assert garbage < 5  # five requests, no cycle each (450-700 objects in all before)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_client_that_stops_reading_is_closed_and_llamacpp_not_blamed(
    make_stack: Any, fake: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A streaming client that stops reading (a hung agent, a paused process) holds
    llama.cpp back through backpressure. After the idle timeout the proxy closes that
    client's connection (as nginx's send_timeout does: an error event could never reach a
    full socket), frees llama.cpp's slot, and says the client stalled. Before, it blamed
    llama.cpp ("sent nothing for 0.5s in mid-response", a 504 in the log) and
    left the client's connection open behind its unsent bytes."""
    fake.script.tokens = ["x" * 65536] * 200  # 13 MB: far more than both sockets hold
    stack = make_stack(upstream_idle_timeout=0.5)
    with _unread_stream(stack, fake) as sock:
        time.sleep(1.5)  # reads nothing for three idle timeouts
        started = time.monotonic()
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):  # now drains: the proxy must have closed it
                received += chunk
        assert time.monotonic() - started < 5
    assert received.startswith(b"HTTP/1.1 200")
    assert not received.endswith(b"0\r\n\r\n")  # cut: no final chunk, the client knows
    wait_until_fake_is_idle(stack.runner, fake)
    messages = [r.getMessage() for r in caplog.records]
    assert any("the client took nothing for 0.5s; closing its connection" in m for m in messages)
    assert not any("llama.cpp sent nothing" in m for m in messages)


def test_a_stream_closed_for_a_stalled_client_is_not_recorded_as_a_whole_answer(
    make_stack: Any, fake: Any, tmp_path: Any
) -> None:
    """The stream a stalled client was cut from (no final chunk, no [DONE]) is not a whole
    answer: the usage ledger records it as the client's failure (499, as a client that
    leaves) and the access log line names why it ended. Before, both said a plain 200 with
    no error, the same as a stream that ended well, so an operator could not tell them
    apart."""
    import io
    import sqlite3

    from llamacpp_proxy.observe.logs import AccessLog

    fake.script.tokens = ["x" * 65536] * 200  # 13 MB: far more than both sockets hold
    stack = make_stack(upstream_idle_timeout=0.5, usage_db=tmp_path / "usage.db")
    access = io.StringIO()
    stack.ctx.access_log = AccessLog(access, True, stack.runner.loop.call_soon)
    with _unread_stream(stack, fake):
        # Reads nothing until the proxy has given up on it (its connection closed).
        assert stack.wait_for(lambda: stack.server.open_connections == 0, 5)
    wait_until_fake_is_idle(stack.runner, fake)
    assert stack.wait_for(lambda: access.getvalue() != "")
    (line,) = [json.loads(text) for text in access.getvalue().splitlines()]
    assert line["error"] == "client_stalled"
    assert stack.ctx.usage is not None and stack.ctx.usage.flush()
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as db:
        ((status, completion),) = db.execute("SELECT status, completion_tokens FROM usage")
    assert status == 499 and completion > 0  # charged what llama.cpp generated


def _unread_stream(stack: Any, fake: Any) -> socket.socket:
    """A streamed chat whose client reads nothing (a tiny receive buffer), once llama.cpp's
    answer is under way."""
    body = json.dumps({"model": "m", "messages": CHAT, "max_tokens": 200, "stream": True})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", stack.port))
    sock.sendall(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            f"{UNLIMITED_KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
    )
    assert stack.wait_for(lambda: fake.events_sent > 0, 5)  # streaming, unread
    return sock
