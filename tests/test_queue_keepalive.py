"""A streamed request that waits in the fair queue keeps its connection alive (issue 12):
after --queue-keepalive seconds it commits to 200 + SSE and sends `: queued` comments until
it is admitted (then a normal answer) or refused (then the protocol's error event).

One slot on the fake llama.cpp, held by a first request the fake keeps waiting (its gate),
so the request under test queues; the keep-alive is 0.05 s so comments come at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import openai
import pytest

from llamacpp_proxy.route.health import Outcome

from .conftest import UNLIMITED_KEY, Stack, assert_schema
from .fake_llamacpp import DEFAULT_TOKENS, FakeLlamaCpp, prompt_text

ANSWER = "".join(DEFAULT_TOKENS)
AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
CHAT = "/v1/chat/completions"


class OneSlot:
    """A gateway in front of a one-slot fake whose answers wait for `release()`."""

    def __init__(self, stack: Stack, fake: FakeLlamaCpp, gate: asyncio.Event) -> None:
        self.stack = stack
        self.fake = fake
        self.gate = gate
        self.router = stack.ctx.routes.pools["default"].router
        self.threads = ThreadPoolExecutor(2)

    def hold_the_slot(self) -> Future[httpx.Response]:
        """A non-streamed request that takes the one slot and keeps it until release()."""
        body = {"messages": [{"role": "user", "content": "holder"}]}
        running = self.threads.submit(self.stack.http.post, CHAT, json=body, headers=AUTH)
        assert self.stack.wait_for(lambda: self.fake.active == 1)
        return running

    def release(self) -> None:
        self.stack.runner.call(self.gate.set)

    def queued(self, n: int = 1) -> bool:
        return self.stack.wait_for(lambda: self.router.waiting == n)


@pytest.fixture
def one_slot(
    make_stack: Callable[..., Stack], fake: FakeLlamaCpp
) -> Iterator[Callable[..., OneSlot]]:
    made: list[OneSlot] = []

    def factory(**overrides: Any) -> OneSlot:
        fake.script.total_slots = 1
        overrides.setdefault("queue_keepalive", 0.05)
        stack = make_stack(**overrides)
        router = stack.ctx.routes.pools["default"].router
        key = next(iter(router.pool.servers)).key
        assert stack.wait_for(lambda: getattr(router.upstream(key), "total_slots", None) == 1)
        gate = stack.runner.call(asyncio.Event)
        fake.script.gate = gate
        gateway = OneSlot(stack, fake, gate)
        made.append(gateway)
        return gateway

    yield factory
    for gateway in made:
        gateway.release()  # nothing the fake holds outlives the test
        gateway.threads.shutdown(wait=True)


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """The stream's lines, blank ones (event ends) left out."""
    for line in response.iter_lines():
        if line:
            yield line


def socket_port(response: httpx.Response) -> int:
    """The client side port of the connection that carried the response."""
    stream = response.extensions["network_stream"]
    return int(stream.get_extra_info("socket").getsockname()[1])


# -- admitted after a wait: comments, then the whole answer ---------------------------------


def test_a_queued_stream_gets_comments_then_a_complete_answer_raw(
    one_slot: Callable[..., OneSlot],
) -> None:
    gw = one_slot()
    holder = gw.hold_the_slot()
    body = {"messages": [{"role": "user", "content": "queued"}], "stream": True}
    with gw.stack.http.stream("POST", CHAT, json=body, headers=AUTH) as r:
        # Headers came while it still waits: the keep-alive committed the answer.
        assert gw.queued(1)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
        assert [next(lines), next(lines)] == [": queued", ": queued"]
        gw.release()
        rest = list(lines)
    assert holder.result(10).status_code == 200
    data = [line for line in rest if line != ": queued"]
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in data[:-1]]
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # The same kept-alive connection serves the next request.
    again = gw.stack.http.post(
        CHAT, json={"messages": [{"role": "user", "content": "x"}]}, headers=AUTH
    )
    assert again.status_code == 200


def test_a_queued_stream_with_the_openai_sdk(one_slot: Callable[..., OneSlot]) -> None:
    gw = one_slot()
    holder = gw.hold_the_slot()
    with gw.stack.client(timeout=10) as client:
        # create() returns once the headers are in: here, while the request still waits.
        stream = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "queued"}], stream=True
        )
        assert gw.queued(1)
        gw.release()
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ANSWER
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert client.completions.create(model="any", prompt="next").choices[0].text == ANSWER
    assert holder.result(10).status_code == 200


def test_a_queued_stream_with_the_anthropic_sdk(one_slot: Callable[..., OneSlot]) -> None:
    gw = one_slot()
    holder = gw.hold_the_slot()
    with anthropic.Anthropic(
        base_url=gw.stack.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=10
    ) as client:
        with client.messages.stream(
            model="any", max_tokens=32, messages=[{"role": "user", "content": "queued"}]
        ) as stream:
            assert gw.queued(1)  # the stream opened while it waits
            gw.release()
            message = stream.get_final_message()
        assert message.content[0].type == "text" and message.content[0].text == ANSWER
        assert message.stop_reason == "end_turn"
    assert holder.result(10).status_code == 200


# -- refused after the keep-alive began: the protocol's error event --------------------------


def test_a_queued_stream_that_times_out_ends_with_the_error_event_raw(
    one_slot: Callable[..., OneSlot],
) -> None:
    gw = one_slot(queue_timeout=0.5)
    holder = gw.hold_the_slot()
    body = {"messages": [{"role": "user", "content": "queued"}], "stream": True}
    # Its own client: the next request must go on this very connection.
    with httpx.Client(base_url=gw.stack.url, headers=AUTH, timeout=10) as client:
        with client.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            port = socket_port(r)
            lines = list(sse_lines(r))
        assert lines[0] == ": queued"
        assert set(lines[:-1]) == {": queued"}
        error = json.loads(lines[-1].removeprefix("data: "))
        assert_schema(error, "ErrorResponse")
        assert error["error"]["code"] == "server_overloaded"
        assert "no slot became free in time" in error["error"]["message"]
        gw.release()
        assert holder.result(10).status_code == 200
        again = client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}]})
        assert again.status_code == 200
        assert socket_port(again) == port  # the connection stayed usable
    assert not any("queued" in prompt_text(b["prompt"]) for b in gw.fake.requests)


def test_a_queued_stream_that_times_out_with_the_openai_sdk(
    one_slot: Callable[..., OneSlot],
) -> None:
    gw = one_slot(queue_timeout=0.5)
    holder = gw.hold_the_slot()
    with gw.stack.client(timeout=10) as client:
        stream = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "queued"}], stream=True
        )
        with pytest.raises(openai.APIError, match="no slot became free in time") as raised:
            list(stream)
        assert raised.value.code == "server_overloaded"
        gw.release()
        assert client.completions.create(model="any", prompt="next").choices[0].text == ANSWER
    assert holder.result(10).status_code == 200


def test_a_queued_anthropic_stream_that_times_out(one_slot: Callable[..., OneSlot]) -> None:
    gw = one_slot(queue_timeout=0.5)
    holder = gw.hold_the_slot()
    body = {
        "model": "any",
        "max_tokens": 32,
        "stream": True,
        "messages": [{"role": "user", "content": "queued"}],
    }
    headers = {"x-api-key": UNLIMITED_KEY, "anthropic-version": "2023-06-01"}
    with gw.stack.http.stream("POST", "/v1/messages", json=body, headers=headers) as r:
        assert r.status_code == 200
        lines = list(sse_lines(r))
    assert set(lines[:-2]) == {": queued"}
    assert lines[-2] == "event: error"
    error = json.loads(lines[-1].removeprefix("data: "))
    assert error["type"] == "error"
    assert error["error"]["type"] == "overloaded_error"
    assert "no slot became free in time" in error["error"]["message"]
    # The SDK sees the same event as an error; the client goes on to its next request.
    with anthropic.Anthropic(
        base_url=gw.stack.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=10
    ) as client:
        messages = [{"role": "user", "content": "queued"}]
        with (
            pytest.raises(anthropic.APIError, match="no slot became free in time"),
            client.messages.stream(model="any", max_tokens=32, messages=messages) as stream,
        ):
            stream.get_final_message()
        gw.release()
        message = client.messages.create(
            model="any", max_tokens=32, messages=[{"role": "user", "content": "next"}]
        )
        assert message.content[0].type == "text" and message.content[0].text == ANSWER
    assert holder.result(10).status_code == 200


def test_a_queued_stream_whose_servers_all_go_down_ends_with_upstream_unavailable(
    one_slot: Callable[..., OneSlot],
) -> None:
    gw = one_slot()
    holder = gw.hold_the_slot()
    key = next(iter(gw.router.pool.servers)).key
    body = {"prompt": "queued", "stream": True}
    with gw.stack.http.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
        lines = sse_lines(r)
        assert next(lines) == ": queued"
        # What a failed probe or a refused connection reports: the pool's one server is down.
        gw.stack.runner.call(lambda: gw.router.observe_probe(key, Outcome.REFUSED))
        rest = [line for line in lines if line != ": queued"]
    [event] = rest
    error = json.loads(event.removeprefix("data: "))
    assert_schema(error, "ErrorResponse")
    assert error["error"]["code"] == "upstream_unavailable"
    assert "No server of model 'default' is up" in error["error"]["message"]
    gw.release()
    assert holder.result(10).status_code == 200


# -- what does not change ---------------------------------------------------------------------


def test_zero_turns_it_off_a_queued_stream_is_refused_with_a_plain_503(
    one_slot: Callable[..., OneSlot],
) -> None:
    gw = one_slot(queue_keepalive=0, queue_timeout=0.3)
    holder = gw.hold_the_slot()
    body = {"messages": [{"role": "user", "content": "queued"}], "stream": True}
    r = gw.stack.http.post(CHAT, json=body, headers=AUTH)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "server_overloaded"
    gw.release()
    assert holder.result(10).status_code == 200


def test_a_refusal_before_the_keepalive_delay_is_a_plain_status(
    one_slot: Callable[..., OneSlot],
) -> None:
    # The queue holds one: the third request is refused at once, with the keep-alive on.
    gw = one_slot(max_queue=1)
    holder = gw.hold_the_slot()
    body = {"messages": [{"role": "user", "content": "queued"}], "stream": True}
    with gw.stack.client(timeout=10) as client:
        waiting = gw.threads.submit(
            lambda: "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model="any", messages=[{"role": "user", "content": "waits"}], stream=True
                )
                if c.choices
            )
        )
        assert gw.queued(1)
        r = gw.stack.http.post(CHAT, json=body, headers=AUTH)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_overloaded"
        gw.release()
        assert waiting.result(10) == ANSWER
    assert holder.result(10).status_code == 200


def test_a_non_streamed_request_is_unchanged(one_slot: Callable[..., OneSlot]) -> None:
    gw = one_slot(queue_timeout=0.5)
    holder = gw.hold_the_slot()
    body = {"messages": [{"role": "user", "content": "queued"}]}
    r = gw.stack.http.post(CHAT, json=body, headers=AUTH)
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "server_overloaded"
    gw.release()
    assert holder.result(10).status_code == 200


def test_a_client_leaving_while_kept_alive_frees_its_place(
    one_slot: Callable[..., OneSlot],
) -> None:
    gw = one_slot()
    holder = gw.hold_the_slot()
    body = {"prompt": "leaves", "stream": True}
    with (
        httpx.Client(base_url=gw.stack.url, timeout=10) as leaving,
        leaving.stream("POST", "/v1/completions", json=body, headers=AUTH) as r,
    ):
        # Held in a name: a line iterator dropped mid-stream would close the connection now.
        lines = sse_lines(r)
        assert next(lines) == ": queued"  # the keep-alive runs
        assert gw.queued(1)
    # Closed before its end: httpx drops the connection, and the gateway its place.
    assert gw.stack.wait_for(lambda: gw.router.waiting == 0)
    gw.release()
    assert holder.result(10).status_code == 200
    with gw.stack.client(timeout=10) as client:
        assert client.completions.create(model="any", prompt="next").choices[0].text == ANSWER
    assert not any("leaves" in prompt_text(b["prompt"]) for b in gw.fake.requests)
