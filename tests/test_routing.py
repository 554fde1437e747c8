"""Several llama.cpp servers behind one gateway (issue 11): pools, spreading, conversation
affinity, failover, the wait queue, models and keys, reloads. Each fake llama.cpp records
what it received, so a test sees which server served which request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llamacpp_proxy.main import reload

from .conftest import UNLIMITED_KEY, LoopThread, Stack, assert_schema, start_stack, stop_stack
from .evil_upstream import EvilUpstream, completion
from .fake_llamacpp import DEFAULT_TOKENS, FakeLlamaCpp, prompt_text

FULL_TEXT = "".join(DEFAULT_TOKENS)
INTERN_KEY = "sk-test-intern-0123456789"


@pytest.fixture
def make_gateway(runner: LoopThread, fakes: list[FakeLlamaCpp]) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def factory(**overrides: Any) -> Stack:
        stack = start_stack(runner, fakes[0], **overrides)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stop_stack(stack)


def ready_servers(stack: Stack) -> dict[str, str]:
    """host:port -> status, from /health/ready, over every model."""
    body = stack.http.get("/health/ready").json()
    return {s["server"]: s["status"] for m in body.get("models", {}).values() for s in m["servers"]}


def wait_ready(stack: Stack, fakes: list[FakeLlamaCpp], timeout: float = 10) -> None:
    want = {f"127.0.0.1:{f.port}" for f in fakes}

    def all_ready() -> bool:
        statuses = {
            s.display: s.state for r in stack.ctx.routes.pools.values() for s in r.router.statuses()
        }
        return all(statuses.get(w) == "ready" for w in want)

    assert stack.wait_for(all_ready, timeout)


def chat(stack: Stack, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {extra.pop('key', UNLIMITED_KEY)}"}
    headers.update(extra.pop("headers", {}))
    body = {"messages": messages, **extra}
    return stack.http.post("/v1/chat/completions", content=json.dumps(body), headers=headers)


def served_by(fakes: list[FakeLlamaCpp], marker: str) -> set[int]:
    """Indexes of the fakes that received a prompt containing `marker`."""
    return {
        i
        for i, fake in enumerate(fakes)
        for body in fake.requests
        if marker in prompt_text(body["prompt"])
    }


# -- one pool -----------------------------------------------------------------------------


def test_requests_spread_over_a_pool(make_gateway: Callable[..., Stack], fakes: Any) -> None:
    pool = fakes[:3]
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool))
    wait_ready(stack, pool)
    client = stack.client()
    for i in range(9):
        answer = client.completions.create(model="any", prompt=f"question {i}")
        assert answer.choices[0].text == FULL_TEXT
    assert [len(f.requests) for f in pool] == [3, 3, 3]


def test_conversation_turns_stay_on_one_server_while_conversations_use_all(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    pool = fakes[:3]
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool))
    wait_ready(stack, pool)
    client = stack.client()
    conversations: list[list[dict[str, Any]]] = [
        [{"role": "system", "content": f"conv-{c} " + "You are a careful assistant. " * 40}]
        for c in range(6)
    ]
    for turn in range(4):  # turns interleaved, as concurrent users send them
        for c, messages in enumerate(conversations):
            messages.append({"role": "user", "content": f"conv-{c} turn {turn}"})
            answer = client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
            messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    homes = [served_by(pool, f"conv-{c} ") for c in range(6)]
    assert all(len(home) == 1 for home in homes), homes  # every turn on one server
    assert set().union(*homes) == {0, 1, 2}  # and the conversations use every server


def test_a_server_killed_mid_run_costs_no_request_that_had_not_started_on_it(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    pool = fakes[:2]
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool))
    wait_ready(stack, pool)
    client = stack.client()
    first = client.completions.create(
        model="m", prompt="p", extra_headers={"X-Session-Id": "conversation-1"}
    )
    assert first.choices[0].text == FULL_TEXT
    (home,) = [i for i, f in enumerate(pool) if f.requests]
    other = 1 - home
    stack.runner.run(pool[home].kill())
    # The session points at the dead server, which the gateway has not probed since: the
    # request goes there, is refused before a byte was sent, and runs on the other server.
    again = client.completions.create(
        model="m", prompt="p", extra_headers={"X-Session-Id": "conversation-1"}
    )
    assert again.choices[0].text == FULL_TEXT
    for i in range(6):
        assert client.completions.create(model="m", prompt=f"after {i}").choices
    assert len(pool[other].requests) == 7
    assert ready_servers(stack)[f"127.0.0.1:{pool[home].port}"] == "down"


def test_a_503_loading_answer_is_retried_on_another_server(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    pool = fakes[:2]
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool))
    wait_ready(stack, pool)
    pool[0].script.fail_status = 503  # /completion says loading; /health still 200
    client = stack.client()
    for i in range(4):
        assert client.completions.create(model="m", prompt=f"q{i}").choices[0].text == FULL_TEXT
    assert pool[0].requests  # it was tried...
    assert len(pool[1].requests) == 4  # ...and every request was answered by the other


def test_failover_waits_within_one_queue_timeout_not_one_per_server(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """--queue-timeout bounds a request's whole wait for a slot. A request that waited,
    was refused by the server it got (503 loading) and waits again for the other server
    gets only what is left of it. Regression: each server tried started a fresh
    --queue-timeout, so a request could wait servers x timeout (here 1.2 + 2.0 s)."""
    pool = fakes[:2]
    for fake in pool:
        fake.script.total_slots = 1
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool), queue_timeout=2.0)
    wait_ready(stack, pool)
    router = stack.ctx.routes.pools["default"].router
    keys = [server.key for server in router.pool.servers]
    assert stack.wait_for(
        lambda: all(getattr(router.upstream(k), "total_slots", None) == 1 for k in keys)
    )
    for fake in pool:
        fake.script.gate = stack.runner.call(asyncio.Event)
    with ThreadPoolExecutor(3) as threads:
        holders = [
            threads.submit(chat, stack, [{"role": "user", "content": f"holder {i}"}])
            for i in range(2)
        ]
        assert stack.wait_for(lambda: pool[0].active == 1 and pool[1].active == 1)
        started = time.monotonic()
        victim = threads.submit(chat, stack, [{"role": "user", "content": "victim"}])
        time.sleep(1.2)  # the victim waits for a slot...
        first = pool[0]
        first.script.fail_status, first.script.fail_prompt = 503, "victim"
        stack.runner.call(first.script.gate.set)  # ...gets this one, which says loading
        refused = victim.result(10)
        waited = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert waited < 2.8, waited  # 2.0 s in all; 3.2 s with a fresh timeout
        assert any("victim" in prompt_text(b["prompt"]) for b in first.requests)
        stack.runner.call(pool[1].script.gate.set)
        assert all(h.result(10).status_code == 200 for h in holders)


def test_requests_whose_connection_llamacpp_closed_do_not_take_its_server_out(
    evil_stack: Callable[..., tuple[EvilUpstream, Stack]],
) -> None:
    """A connection closed before any answer fails that request (502: it may have started,
    so it is never sent again), but the server's health is the prober's to judge: the
    failure asks for a probe at once, and a server whose /health answers stays in
    rotation. Regression (scripts/soak, docs/resilience.md): two such requests in a row
    took the one server of the pool down, and every request for up to a second after
    (the demand probe's interval) got 503 upstream_unavailable."""

    async def respond(evil: EvilUpstream, head: bytes, body: bytes, writer: Any) -> bool:
        if b"drop" in body:
            return False  # close without an answer
        writer.write(completion("fine"))
        return True

    evil, stack = evil_stack(respond)
    client = stack.client()
    for round_ in range(3):
        for i in range(2):
            with pytest.raises(openai.APIStatusError) as caught:
                client.completions.create(model="m", prompt=f"drop {round_} {i}")
            assert caught.value.status_code == 502
        answer = client.completions.create(model="m", prompt=f"after {round_}")
        assert answer.choices[0].text == "fine"
    assert evil.posts == 9  # none of the dropped ones was sent twice
    router = stack.ctx.routes.pools["default"].router
    assert [s.state for s in router.statuses()] == ["ready"]


def test_one_503_head_does_not_take_the_only_server_out_before_its_probe_says(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """A 503 head is retried elsewhere and has the server probed soon, but /health says
    whether it is loading. Regression (scripts/soak at 200 clients): the 503 marked the
    pool's only server loading until the probe's answer, so every request meanwhile
    queued behind it (here: for the whole --queue-timeout, as the probe is held) and
    bursts went past --max-queue (503 server_overloaded)."""
    fake = fakes[0]
    stack = make_gateway(llamacpp_server=(fake.url,), queue_timeout=0.5)
    wait_ready(stack, [fake])
    fake.script.fail_status, fake.script.fail_prompt = 503, "refuse"
    fake.script.health_gate = stack.runner.call(asyncio.Event)  # probes get no answer yet
    client = stack.client()
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="m", prompt="refuse me")
        assert caught.value.status_code == 503 and caught.value.code == "upstream_loading"
        answer = client.completions.create(model="m", prompt="and me?")
        assert answer.choices[0].text == FULL_TEXT
        assert ready_servers_on_loop(stack) == {f"127.0.0.1:{fake.port}": "ready"}
    finally:
        stack.runner.call(fake.script.health_gate.set)


def test_a_server_whose_generations_fail_while_its_health_answers_leaves_rotation(
    make_gateway: Callable[..., Stack], fakes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A llama-server that answers /health but fails every generation frees its slots
    fastest, so least-busy routing fed it more than its share. After
    --eject-after-failures such failures in a row it is out of rotation for a while
    (route/outliers.py), shown as "ejected"; the other server takes the work."""
    pool = fakes[:2]
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool), eject_after_failures=2)
    wait_ready(stack, pool)
    pool[0].script.fail_status = 500
    client = stack.client()
    answers = []
    for i in range(10):
        try:
            answers.append(client.completions.create(model="m", prompt=f"q{i}").choices[0].text)
        except openai.APIStatusError as error:
            assert error.status_code == 502
            answers.append("502")
    assert len(pool[0].requests) == 2  # two failures in a row, then out
    assert answers.count("502") == 2 and answers.count(FULL_TEXT) == 8
    sick = f"127.0.0.1:{pool[0].port}"
    assert ready_servers(stack)[sick] == "ejected"
    assert stack.http.get("/health/ready").status_code == 200
    assert any("out of rotation for 10s" in r.getMessage() for r in caplog.records)
    metrics = stack.http.get("/metrics").text
    assert f'llamacpp_proxy_upstream_up{{model="default",server="{sick}"}} 0.0' in metrics


def test_one_request_with_several_choices_counts_once_toward_ejection(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """--eject-after-failures counts requests, not generations (route/outliers.py).
    Regression: one request with `n: 8` whose four generations on a failing server failed
    together counted four failures, and ejected the server by itself."""
    pool = fakes[:2]
    stack = make_gateway(
        llamacpp_server=tuple(f.url for f in pool),
        eject_after_failures=2,
        max_parallel_generations=8,
    )
    wait_ready(stack, pool)
    sick, healthy = pool
    sick.script.fail_status = 500
    gate = stack.runner.call(asyncio.Event)
    sick.script.gate = gate  # its failures arrive together, as from a broken server
    sick_at = f"127.0.0.1:{sick.port}"
    with ThreadPoolExecutor(1) as threads:
        asking = threads.submit(
            lambda: stack.http.post(
                "/v1/completions",
                json={"prompt": "many", "n": 8, "max_tokens": 4},
                headers=auth(UNLIMITED_KEY),
            )
        )
        assert stack.wait_for(lambda: len(sick.requests) == 4)  # 4 slots each
        stack.runner.call(gate.set)
        answer = asking.result(10)
    assert answer.status_code == 502
    assert ready_servers(stack)[sick_at] == "ready"  # one failed request is not 2
    client = stack.client()
    for i in range(10):  # the next failed request there makes two: out
        with contextlib.suppress(openai.APIStatusError):
            client.completions.create(model="m", prompt=f"q{i}")
        if len(sick.requests) > 4:
            break
    assert len(sick.requests) == 5
    assert ready_servers(stack)[sick_at] == "ejected"
    assert len(healthy.requests) >= 1


def test_a_refused_generation_does_not_wait_for_an_ejected_server(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """A generation that llama.cpp refused with a 503 head fails over to another server
    only if one takes work: an ejected server is out of rotation for seconds to minutes,
    so the refusal is the answer, at once. Regression: failover counted the ejected server
    as one to wait for, so the request waited its whole --queue-timeout and then got 503
    'No server ... finished loading its model in time', about a server that was loaded."""
    pool = fakes[:2]
    stack = make_gateway(
        llamacpp_server=tuple(f.url for f in pool), eject_after_failures=1, queue_timeout=1.0
    )
    wait_ready(stack, pool)
    sick, healthy = pool
    sick.script.fail_status = 500
    client = stack.client()
    for i in range(4):
        try:
            client.completions.create(model="m", prompt=f"q{i}")
        except openai.APIStatusError as error:
            assert error.status_code == 502
        if sick.requests:
            break
    assert ready_servers(stack)[f"127.0.0.1:{sick.port}"] == "ejected"
    healthy.script.fail_status, healthy.script.fail_prompt = 503, "refuse"
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="m", prompt="refuse me")
    assert caught.value.status_code == 503 and caught.value.code == "upstream_loading"
    assert "llama.cpp is not ready: fake failure" in caught.value.message
    assert len(sick.requests) == 1  # the ejected server got nothing more
    answer = client.completions.create(model="m", prompt="and me?")
    assert answer.choices[0].text == FULL_TEXT


def test_a_generation_llamacpp_may_have_started_is_never_sent_again(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    pool = fakes[:2]
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool))
    wait_ready(stack, pool)
    for fake in pool:
        fake.script.fail_status = 500
    r = chat(stack, [{"role": "user", "content": "hi"}])
    assert r.status_code == 502
    assert sum(len(f.requests) for f in pool) == 1


def test_a_loading_error_inside_a_200_answer_is_never_sent_again(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """Only a 503 status proves llama.cpp refused to start; an error object in a 200 answer
    comes after it took the request (docs/routing.md: "a 503 counts only before any 200
    head"), streamed or not."""
    pool = fakes[:2]
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool))
    wait_ready(stack, pool)
    for fake in pool:
        fake.script.fail_status = 200
        fake.script.fail_body = {"error": {"code": 503, "message": "Loading model"}}
    with pytest.raises(openai.APIStatusError) as caught:
        stack.client().completions.create(model="m", prompt="q")
    assert caught.value.status_code == 503
    assert sum(len(f.requests) for f in pool) == 1


def test_a_server_that_comes_back_is_used_again(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    pool = fakes[:2]
    stack = make_gateway(llamacpp_server=tuple(f.url for f in pool))
    wait_ready(stack, pool)
    port = pool[1].port
    stack.runner.run(pool[1].kill())
    assert stack.wait_for(lambda: ready_servers_on_loop(stack).get(f"127.0.0.1:{port}") == "down")
    revived = FakeLlamaCpp()
    stack.runner.call(lambda: revived.start(port))
    try:
        wait_ready(stack, [revived], timeout=20)  # probed with backoff: 0.5 s, 1, 2, 4 ...
        client = stack.client()
        for i in range(4):
            assert client.completions.create(model="m", prompt=f"q{i}").choices
        assert len(revived.requests) == 2
    finally:
        stack.runner.call(revived.stop)


def ready_servers_on_loop(stack: Stack) -> dict[str, str]:
    return {
        s.display: s.state for r in stack.ctx.routes.pools.values() for s in r.router.statuses()
    }


def one_slot_gateway(
    make_gateway: Callable[..., Stack], fake: FakeLlamaCpp
) -> tuple[Stack, Any, asyncio.Event]:
    """A gateway in front of one server with one slot and room for one waiter; the server
    holds every answer until the returned event is set."""
    fake.script.total_slots = 1
    stack = make_gateway(llamacpp_server=(fake.url,), max_queue=1)
    wait_ready(stack, [fake])
    router = stack.ctx.routes.pools["default"].router
    key = next(iter(router.pool.servers)).key
    assert stack.wait_for(lambda: getattr(router.upstream(key), "total_slots", None) == 1)
    gate = stack.runner.call(asyncio.Event)
    fake.script.gate = gate
    return stack, router, gate


def test_a_full_pool_queues_then_answers_503_server_overloaded(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    fake = fakes[0]
    stack, router, gate = one_slot_gateway(make_gateway, fake)
    with ThreadPoolExecutor(2) as threads:
        running = threads.submit(chat, stack, [{"role": "user", "content": "first"}])
        assert stack.wait_for(lambda: fake.active == 1)
        queued = threads.submit(chat, stack, [{"role": "user", "content": "second"}])
        assert stack.wait_for(lambda: router.waiting == 1)
        refused = chat(stack, [{"role": "user", "content": "third"}])
        assert refused.status_code == 503
        assert_schema(refused.json(), "ErrorResponse")
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert refused.headers["retry-after"] == "1"
        assert fake.active == 1  # llama.cpp never saw more than its one slot
        stack.runner.call(gate.set)
        assert running.result(10).status_code == 200
        assert queued.result(10).status_code == 200
    assert [prompt_text(b["prompt"]).count("third") for b in fake.requests] == [0, 0]


def test_a_wait_for_servers_that_never_finish_loading_ends_as_loading_not_busy(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """A request waits (bounded by the queue timeout) for a server that is loading its
    model. When that wait ends, the answer says the model is loading. Regression: it was
    503 server_overloaded, "All 1 server ... are busy": the operator looked for load that
    was not there."""
    fake = fakes[0]
    fake.script.health_status = 503  # loading, for ever
    stack = make_gateway(llamacpp_server=(fake.url,), queue_timeout=0.5)
    client = stack.client()
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="m", prompt="anyone there?")
        error = caught.value
        assert error.status_code == 503 and error.code == "upstream_loading", error.message
        assert "loading" in error.message and "busy" not in error.message
        assert error.response.headers["Retry-After"] == "1"
    assert not fake.requests


def test_a_client_that_leaves_the_queue_passes_its_turn(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    fake = fakes[0]
    stack, router, gate = one_slot_gateway(make_gateway, fake)
    with ThreadPoolExecutor(1) as threads:
        running = threads.submit(chat, stack, [{"role": "user", "content": "first"}])
        assert stack.wait_for(lambda: fake.active == 1)
        # Its own connection: closing it, once it waits in the queue, is how it leaves.
        body = json.dumps({"prompt": "leaves"}).encode()
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as leaving:
            leaving.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {UNLIMITED_KEY}\r\n".encode()
                + b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert stack.wait_for(lambda: router.waiting == 1)
        assert stack.wait_for(lambda: router.waiting == 0)  # its place is free again
        stack.runner.call(gate.set)
        assert running.result(10).status_code == 200
    assert chat(stack, [{"role": "user", "content": "next"}]).status_code == 200
    assert not any("leaves" in prompt_text(b["prompt"]) for b in fake.requests)


# -- models, aliases, keys ------------------------------------------------------------------


def write_upstreams(path: Path, models: dict[str, dict[str, Any]]) -> None:
    lines = []
    for name, spec in models.items():
        lines.append(f'[models."{name}"]')
        for field, value in spec.items():
            lines.append(f"{field} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def two_models(
    make_gateway: Callable[..., Stack], fakes: Any, tmp_path: Path
) -> tuple[Stack, Path]:
    upstreams = tmp_path / "upstreams.toml"
    write_upstreams(
        upstreams,
        {
            "chat": {"servers": [fakes[0].url, fakes[1].url], "aliases": ["gpt-4o-mini"]},
            "coder": {"servers": [fakes[2].url], "chat_template": "chatml"},
        },
    )
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.intern]\nkey = "{INTERN_KEY}"\nmodels = ["chat"]\n')
    stack = make_gateway(upstreams_file=upstreams, api_keys_file=keys)
    wait_ready(stack, fakes[:3])
    return stack, upstreams


def test_models_lists_every_model_and_alias_a_key_may_use(two_models: Any) -> None:
    stack, _ = two_models
    listed = stack.client().models.list()
    assert [m.id for m in listed.data] == ["chat", "gpt-4o-mini", "coder"]
    assert_schema(
        stack.http.get("/v1/models", headers=auth(UNLIMITED_KEY)).json(), "ListModelsResponse"
    )
    intern = stack.client(key=INTERN_KEY)
    assert [m.id for m in intern.models.list().data] == ["chat", "gpt-4o-mini"]
    assert intern.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError) as missing:
        intern.models.retrieve("coder")
    assert missing.value.code == "model_not_found"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_model_picks_the_pool_and_aliases_name_the_same_pool(
    two_models: Any, fakes: Any
) -> None:
    stack, _ = two_models
    client = stack.client()
    for model in ("chat", "gpt-4o-mini", "chat", "gpt-4o-mini"):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": model}]
        )
        assert answer.model == model
    coder = client.chat.completions.create(
        model="coder", messages=[{"role": "user", "content": "code"}]
    )
    assert coder.choices[0].message.content == FULL_TEXT
    assert [len(f.requests) for f in fakes[:3]] == [2, 2, 1]
    assert served_by(fakes, "code") == {2}


@pytest.mark.parametrize(
    ("key", "model"), [(UNLIMITED_KEY, "nope"), (INTERN_KEY, "coder"), (INTERN_KEY, "nope")]
)
def test_unknown_and_forbidden_models_are_404_model_not_found(
    two_models: Any, fakes: Any, key: str, model: str
) -> None:
    stack, _ = two_models
    r = chat(stack, [{"role": "user", "content": "hi"}], model=model, key=key)
    assert r.status_code == 404
    assert_schema(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    # The same words for "unknown" and "not yours": a key cannot probe which models exist.
    assert (
        error["message"] == f"The model '{model}' does not exist or you do not have access to it."
    )
    assert not any(f.requests for f in fakes)


def test_several_models_need_a_model_name(two_models: Any) -> None:
    stack, _ = two_models
    r = stack.http.post("/v1/completions", json={"prompt": "x"}, headers=auth(UNLIMITED_KEY))
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_a_single_pool_serves_any_or_no_model_name(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    stack = make_gateway(llamacpp_server=(fakes[0].url, fakes[1].url))
    for model in ("whatever", None):
        body: dict[str, Any] = {"prompt": "x"}
        if model:
            body["model"] = model
        r = stack.http.post("/v1/completions", json=body, headers=auth(UNLIMITED_KEY))
        assert r.status_code == 200


# -- readiness and reload --------------------------------------------------------------------


def test_readiness_per_model_and_server(two_models: Any, fakes: Any) -> None:
    stack, _ = two_models
    r = stack.http.get("/health/ready")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert body["models"]["chat"]["servers"] == [
        {"server": f"127.0.0.1:{f.port}", "status": "ready", "slots_busy": 0, "slots_total": 4}
        for f in fakes[:2]
    ]
    fakes[2].script.health_status = 503
    r = stack.http.get("/health/ready")
    assert r.status_code == 503  # the coder model has no ready server
    assert r.json()["models"]["coder"]["servers"][0]["status"] == "loading"
    assert r.json()["models"]["chat"]["status"] == "ready"


def test_a_reload_adds_and_drains_servers_without_dropping_a_stream(
    two_models: Any, fakes: Any
) -> None:
    stack, upstreams = two_models
    old, new = fakes[0], fakes[3]
    mid = stack.runner.call(asyncio.Event)
    old.script.mid_gate = mid
    fakes[1].script.mid_gate = mid
    with ThreadPoolExecutor(1) as threads:

        def stream() -> list[str]:
            with stack.http.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "chat",
                    "messages": [{"role": "user", "content": "long"}],
                    "stream": True,
                },
                headers=auth(UNLIMITED_KEY),
            ) as response:
                assert response.status_code == 200
                return [line for line in response.iter_lines() if line]

        streaming = threads.submit(stream)
        assert stack.wait_for(lambda: old.active + fakes[1].active == 1)
        on = 0 if old.active else 1
        draining, staying = fakes[on], fakes[1 - on]
        write_upstreams(
            upstreams,
            {
                "chat": {"servers": [staying.url, new.url], "aliases": ["gpt-4o-mini"]},
                "coder": {"servers": [fakes[2].url]},
            },
        )
        stack.runner.call(lambda: reload(stack.ctx))
        assert ready_servers(stack)[f"127.0.0.1:{draining.port}"] == "draining"
        wait_ready(stack, [new])
        staying.script.mid_gate = None
        client = stack.client()
        for i in range(4):
            assert client.completions.create(model="chat", prompt=f"after {i}").choices
        assert len(new.requests) >= 1 and len(draining.requests) == 1
        stack.runner.call(mid.set)
        lines = streaming.result(10)
    assert lines[-1] == "data: [DONE]"
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines[:-1]
    )
    assert text == FULL_TEXT
    assert stack.wait_for(lambda: f"127.0.0.1:{draining.port}" not in ready_servers_on_loop(stack))


def test_a_draining_generation_reports_to_its_own_server_not_one_added_back(
    make_gateway: Callable[..., Stack], fakes: Any, tmp_path: Path
) -> None:
    """A reload removes a server while a generation runs there; a later reload adds its
    host:port back (a new server, with a state of its own). Regression: when that
    generation failed, its failure counted toward ejecting the server added back, which
    --eject-after-failures 1 then took out of rotation for a failure it never had."""
    upstreams = tmp_path / "upstreams.toml"
    pool = fakes[:2]
    write_upstreams(upstreams, {"chat": {"servers": [f.url for f in pool]}})
    stack = make_gateway(upstreams_file=upstreams, eject_after_failures=1)
    wait_ready(stack, pool)
    gate = stack.runner.call(asyncio.Event)
    for fake in pool:
        fake.script.gate, fake.script.fail_status = gate, 500
    with ThreadPoolExecutor(1) as threads:
        asking = threads.submit(lambda: chat(stack, [{"role": "user", "content": "long"}]))
        assert stack.wait_for(lambda: pool[0].active + pool[1].active == 1)
        on = 0 if pool[0].active else 1
        removed, staying = pool[on], pool[1 - on]
        staying.script.gate, staying.script.fail_status = None, None
        write_upstreams(upstreams, {"chat": {"servers": [staying.url]}})
        stack.runner.call(lambda: reload(stack.ctx))
        removed_at = f"127.0.0.1:{removed.port}"
        assert ready_servers(stack)[removed_at] == "draining"
        write_upstreams(upstreams, {"chat": {"servers": [staying.url, removed.url]}})
        stack.runner.call(lambda: reload(stack.ctx))
        router = stack.ctx.routes.pools["chat"].router
        added = router.upstream(removed.url)
        assert added is not None  # (the removed one drains apart)
        assert stack.wait_for(lambda: added.usable)
        stack.runner.call(gate.set)
        assert asking.result(10).status_code == 502
    # The draining one is gone; the one added back kept its own (clean) record.
    assert stack.wait_for(lambda: len(ready_servers_on_loop(stack)) == 2)
    assert ready_servers(stack) == {removed_at: "ready", f"127.0.0.1:{staying.port}": "ready"}


def test_a_broken_upstreams_file_keeps_the_old_pools(two_models: Any, fakes: Any) -> None:
    stack, upstreams = two_models
    upstreams.write_text('[models."chat"]\nservers = "not a list"\n')
    stack.runner.call(lambda: reload(stack.ctx))
    answer = stack.client().completions.create(model="coder", prompt="still here")
    assert answer.choices[0].text == FULL_TEXT
    assert served_by(fakes, "still here") == {2}


def test_a_request_to_a_pool_whose_servers_all_look_down_asks_them_again_at_once(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """A one-server gateway must not refuse requests for the prober's backoff (up to 30 s)
    after llama-server came back: a request that finds every server down probes them now
    (at most once a second per pool)."""
    fake = fakes[0]
    stack = make_gateway(llamacpp_server=(fake.url,))
    wait_ready(stack, [fake])
    port = fake.port
    stack.runner.run(fake.kill())
    try:
        assert stack.wait_for(
            lambda: ready_servers_on_loop(stack).get(f"127.0.0.1:{port}") == "down"
        )
        revived = FakeLlamaCpp()
        stack.runner.call(lambda: revived.start(port))
        try:
            reply = stack.client().completions.create(model="m", prompt="back?")
            assert reply.choices[0].text
            assert len(revived.requests) == 1
        finally:
            stack.runner.call(revived.stop)
    finally:
        stack.runner.call(lambda: fake.start(port))  # the session's fake, for later tests


def test_requests_that_find_every_server_down_share_the_probe_in_flight(
    make_gateway: Callable[..., Stack], fakes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama-server came back; the first request that finds every server down has them
    probed. One arriving while that probe is in flight waits for its answer (it costs no
    second probe) rather than being refused. Regression: only the request that started the
    probe could be served; the others got 503 upstream_unavailable at once."""
    import llamacpp_proxy.upstreams as upstreams

    real_policy = upstreams.ProbePolicy
    # The prober leaves a down server alone for an hour: only requests probe it here.
    monkeypatch.setattr(upstreams, "ProbePolicy", lambda: real_policy(backoff_base=3600.0))
    fake = fakes[0]
    stack = make_gateway(llamacpp_server=(fake.url,))
    wait_ready(stack, [fake])
    port = fake.port
    stack.runner.run(fake.kill())
    try:
        with pytest.raises(openai.APIStatusError):
            stack.client().completions.create(model="m", prompt="refused: down")
        assert ready_servers_on_loop(stack).get(f"127.0.0.1:{port}") == "down"
        revived = FakeLlamaCpp()
        gate = stack.runner.call(asyncio.Event)
        revived.script.health_gate = gate
        stack.runner.call(lambda: revived.start(port))
        # As if DEMAND_PROBE_INTERVAL had passed since any probe a request asked for.
        stack.ctx.routes.pools["default"].asked_down_at = -upstreams.DEMAND_PROBE_INTERVAL
        try:
            with ThreadPoolExecutor(2) as threads:
                first = threads.submit(chat, stack, [{"role": "user", "content": "first"}])
                assert stack.wait_for(lambda: revived.health_active == 1)  # its probe
                second = threads.submit(chat, stack, [{"role": "user", "content": "second"}])
                stack.wait_for(lambda: second.done() or stack.ctx.in_flight == 2)
                stack.runner.call(gate.set)
                responses = [first.result(timeout=30), second.result(timeout=30)]
            assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
            assert revived.health_requests == 1
        finally:
            stack.runner.call(gate.set)
            stack.runner.call(revived.stop)
    finally:
        stack.runner.call(lambda: fake.start(port))  # the session's fake, for later tests


# -- outside load -------------------------------------------------------------------------


def held_by_outside_work(
    make_gateway: Callable[..., Stack],
    fakes: Any,
    monkeypatch: pytest.MonkeyPatch,
    queue_timeout: float,
    **overrides: Any,
) -> tuple[Stack, Any, Any, str, Any]:
    """A gateway in front of one fake llama-server whose one slot outside work holds, seen
    by the gateway; probes of a ready server only once an hour, so only the re-reads of
    /slots while requests wait can see the slot free. (stack, fake, router, key, upstream)"""
    import llamacpp_proxy.upstreams as upstreams

    real_policy = upstreams.ProbePolicy
    monkeypatch.setattr(upstreams, "ProbePolicy", lambda: real_policy(ready_interval=3600.0))
    fake = fakes[0]
    fake.script.total_slots = 1
    fake.script.outside_busy = 1
    stack = make_gateway(llamacpp_server=(fake.url,), queue_timeout=queue_timeout, **overrides)
    wait_ready(stack, [fake])
    runtime = stack.ctx.routes.pools["default"]
    router = runtime.router
    [key] = runtime.clients
    upstream = router.upstream(key)
    assert upstream is not None
    assert stack.wait_for(lambda: upstream.total_slots == 1 and upstream.external_busy == 1)
    return stack, fake, router, key, upstream


def test_a_request_held_by_outside_load_goes_once_slots_shows_it_ended(
    make_gateway: Callable[..., Stack], fakes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client of the same llama-server (or another gateway process) held its one
    slot when the prober last read /slots. A request that waits on that reading is served
    once /slots shows the slot free, not at the next probe: the gateway re-reads /slots
    while requests wait on outside load. Regression: the request waited for the next probe
    (a second, with the default interval; here never, so it ran into its queue timeout and
    got a 503)."""
    stack, fake, router, key, upstream = held_by_outside_work(
        make_gateway, fakes, monkeypatch, queue_timeout=20.0
    )
    with ThreadPoolExecutor(1) as threads:
        answer = threads.submit(chat, stack, [{"role": "user", "content": "behind outside work"}])
        assert stack.wait_for(lambda: router.held_by_outside() == [key])  # queued behind it
        assert not fake.requests
        fake.script.outside_busy = 0  # the outside work ended
        response = answer.result(timeout=30)
    assert response.status_code == 200, response.text
    assert "behind outside work" in prompt_text(fake.requests[0]["prompt"])
    assert upstream.external_busy == 0


def test_a_request_that_waits_on_a_stale_outside_reading_has_slots_read_at_once(
    make_gateway: Callable[..., Stack], fakes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside work (another client of the same llama-server) ended after the gateway last
    read /slots, and the re-reads are between two ticks. A request that starts to wait on
    that stale reading has /slots re-read at once, so it (and one already waiting) goes
    without waiting for the next tick. Regression: it waited for the next tick, up to
    OUTSIDE_POLL_INTERVAL (50 ms: about a quarter of the requests through the gateway in
    `scripts/bench ttft`, which shares llama-server's one slot with direct requests, waited
    on it); here the tick is an hour away, so both ran into their queue timeout: 503."""
    import llamacpp_proxy.upstreams as upstreams

    monkeypatch.setattr(upstreams, "OUTSIDE_POLL_INTERVAL", 3600.0)
    stack, fake, router, key, upstream = held_by_outside_work(
        make_gateway, fakes, monkeypatch, queue_timeout=10.0
    )
    reads = fake.slots_reads
    with ThreadPoolExecutor(2) as threads:
        first = threads.submit(chat, stack, [{"role": "user", "content": "queued first"}])
        assert stack.wait_for(lambda: router.held_by_outside() == [key])
        # The re-read this wait asked for saw the outside work still running.
        assert stack.wait_for(lambda: fake.slots_reads > reads)
        assert upstream.external_busy == 1 and not fake.requests
        fake.script.outside_busy = 0  # the outside work ends between two ticks
        second = threads.submit(chat, stack, [{"role": "user", "content": "queued second"}])
        responses = [first.result(timeout=30), second.result(timeout=30)]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    served = {prompt_text(body["prompt"]) for body in fake.requests}
    assert any("queued first" in p for p in served) and any("queued second" in p for p in served)


@pytest.mark.parametrize("answer", ["malformed", "no slots", "silent", "huge"])
def test_outside_load_that_slots_can_no_longer_show_stops_holding_slots(
    make_gateway: Callable[..., Stack], fakes: Any, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """/slots showed outside work on the one slot, then answered no slot list (a broken
    answer, or a llama-server restarted without --slots), or nothing in time. Outside load
    it cannot show is unknown, which counts as none (docs/routing.md). Regression: the last
    reading held the slot for good: every request waited for its queue timeout (503)."""
    import llamacpp_proxy.upstreams as upstreams

    stack, fake, router, key, upstream = held_by_outside_work(
        make_gateway, fakes, monkeypatch, queue_timeout=10.0, upstream_connect_timeout=0.5
    )
    gate = stack.runner.call(asyncio.Event)
    with ThreadPoolExecutor(1) as threads:
        waiting = threads.submit(chat, stack, [{"role": "user", "content": "behind outside"}])
        assert stack.wait_for(lambda: router.held_by_outside() == [key])
        if answer == "malformed":
            fake.script.slots_body = b'[{"id": 0, "is_processing": tr'
        elif answer == "huge":  # a slot list, but read on every probe: bounded, refused
            busy = {"id": 0, "is_processing": True, "pad": "x" * upstreams.PROBE_BODY_LIMIT}
            fake.script.slots_body = json.dumps([busy]).encode()
        elif answer == "silent":
            fake.script.slots_gate = gate  # /slots answers nothing until the test ends
        else:
            fake.script.outside_busy = None  # 404, as without --slots
        response = waiting.result(timeout=30)
    stack.runner.call(gate.set)
    assert response.status_code == 200, response.text
    assert upstream.external_busy == 0
    if answer == "malformed":  # a bad answer is not taken for a server without /slots
        fake.script.slots_body = None
        fake.script.outside_busy = 1
        stack.runner.run(stack.ctx.routes.probe_all())
        assert stack.wait_for(lambda: upstream.external_busy == 1)


def test_readiness_and_requests_do_not_wait_for_a_silent_slots(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """/health/ready probes /health now, and a request that finds every server down has
    them probed; neither needs /props or /slots, which the same probe reads afterwards.
    Regression: both waited for the whole probe, so a /slots that hung (the prober's
    timeout is --upstream-connect-timeout) held the readiness answer (a Kubernetes
    readiness probe, whose default timeout is 1 s, took the gateway for unready)."""
    fake = fakes[0]
    fake.script.outside_busy = 0
    stack = make_gateway(llamacpp_server=(fake.url,), upstream_connect_timeout=60.0)
    wait_ready(stack, [fake])
    gate = stack.runner.call(asyncio.Event)
    fake.script.slots_gate = gate  # /slots answers nothing until the test ends
    try:
        reads = fake.slots_reads
        assert stack.wait_for(lambda: fake.slots_reads > reads)  # a probe waits on it now
        with httpx.Client(base_url=stack.url, timeout=10) as http:
            for _ in range(3):
                ready = http.get("/health/ready")
                assert ready.status_code == 200, ready.text
                assert ready.json()["models"]["default"]["status"] == "ready"
            answer = chat(stack, [{"role": "user", "content": "hi"}])
            assert answer.status_code == 200
    finally:
        stack.runner.call(gate.set)


def test_a_silent_slots_does_not_starve_the_health_probe_of_connections(
    make_gateway: Callable[..., Stack], fakes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prober's reads of one server (/health; /props then /slots; the re-reads of /slots
    while requests wait on outside load) run side by side on the prober's own connections.
    Two /slots reads that hang must leave one for /health, or a server that answers
    /health at once would time out there and be taken down."""
    stack, fake, _, _, upstream = held_by_outside_work(
        make_gateway, fakes, monkeypatch, queue_timeout=0.5, upstream_connect_timeout=60.0
    )
    gate = stack.runner.call(asyncio.Event)
    fake.script.slots_gate = gate  # /slots answers nothing until the test ends
    try:
        reads = fake.slots_reads
        waiting = chat(stack, [{"role": "user", "content": "behind outside"}])
        assert waiting.status_code == 503  # its re-read of /slots hangs on
        assert fake.slots_reads == reads + 1
        with httpx.Client(base_url=stack.url, timeout=10) as http:
            assert http.get("/health/ready").status_code == 200  # its /slots read hangs too
            assert stack.wait_for(lambda: fake.slots_reads == reads + 2)
            ready = http.get("/health/ready")
            assert ready.status_code == 200, ready.text
        assert upstream.health.failures == 0  # no /health timed out
    finally:
        stack.runner.call(gate.set)


def test_a_server_restarted_with_slots_has_its_outside_load_read_again(
    make_gateway: Callable[..., Stack], fakes: Any
) -> None:
    """A llama-server without /slots is not asked again; restarted with --slots (it went
    down and came back), it is. Regression: the gateway never asked again until it was
    itself restarted, so outside load on that server stayed invisible."""
    fake = fakes[0]
    fake.script.outside_busy = None  # 404: no /slots
    stack = make_gateway(llamacpp_server=(fake.url,))
    wait_ready(stack, [fake])
    runtime = stack.ctx.routes.pools["default"]
    [key] = runtime.clients
    assert stack.wait_for(lambda: key in runtime.no_slots)
    port = fake.port
    stack.runner.run(fake.kill())
    try:
        down = f"127.0.0.1:{port}"
        assert stack.wait_for(lambda: ready_servers_on_loop(stack).get(down) == "down")
        revived = FakeLlamaCpp()
        revived.script.total_slots = 1
        revived.script.outside_busy = 1  # with --slots now, and another client on its slot
        stack.runner.call(lambda: revived.start(port))
        try:
            wait_ready(stack, [revived], timeout=20)

            upstream = runtime.router.upstream(key)
            assert upstream is not None
            assert stack.wait_for(lambda: upstream.external_busy == 1)
            (server,) = stack.http.get("/health/ready").json()["models"]["default"]["servers"]
            assert server["slots_busy"] == 1
        finally:
            stack.runner.call(revived.stop)
    finally:
        stack.runner.call(lambda: fake.start(port))  # the session's fake, for later tests


def test_after_a_reload_what_it_replaced_can_be_collected(two_models: Any, fakes: Any) -> None:
    """The server process freezes what start-up built out of the cyclic collector's reach
    (main.freeze_startup_heap). A reload (SIGHUP) replaces some of it: a pool taken out of
    the file must then be freed, not kept for good where it sits in a reference cycle (a
    llama.cpp client holds bound methods of itself, and its cache of tokenized texts)."""
    import gc
    import weakref

    from llamacpp_proxy.main import reload_on_signal

    stack, upstreams = two_models
    wait_ready(stack, fakes[:3])
    coder = stack.ctx.routes.pools["coder"]
    client = weakref.ref(next(iter(coder.clients.values())))
    del coder
    stack.runner.call(gc.collect)
    gc.freeze()  # as the server process does before it serves
    try:
        write_upstreams(upstreams, {"chat": {"servers": [fakes[0].url, fakes[1].url]}})
        stack.runner.call(lambda: reload_on_signal(stack.ctx, None))
        assert stack.wait_for(
            lambda: f"127.0.0.1:{fakes[2].port}" not in ready_servers_on_loop(stack)
        )
        stack.runner.call(gc.collect)
        assert client() is None
        assert stack.client().completions.create(model="chat", prompt="still").choices
    finally:
        gc.unfreeze()


PROBE_ANSWERS = {
    b"/health": b'{"status": "ok"}',
    b"/props": b'{"total_slots": 4, "model_path": "/m.gguf"}',
    b"/slots": b"[]",
}


class VanishingServer:
    """A llama.cpp stand-in on a raw listening socket that answers probes, takes generations
    and never answers them; `vanish()` makes it a machine gone from the network: nothing
    answers on the open connections any more, and a new connection's SYN gets no answer
    (its accept queue is full: Linux drops the SYN), so connecting times out."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.posts = 0
        self.gone = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._fillers: list[socket.socket] = []
        self._accepting: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._accepting = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = asyncio.ensure_future(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buffer = b""
        try:
            while not self.gone:
                data = await loop.sock_recv(conn, 65536)
                if not data or self.gone:
                    break
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, rest = buffer.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(rest) < length:
                        break
                    buffer = rest[length:]
                    path = head.split(b" ")[1]
                    if path == b"/completion":
                        self.posts += 1  # taken, and never answered
                        continue
                    body = PROBE_ANSWERS.get(path, b"{}")
                    await loop.sock_sendall(
                        conn,
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
                    )
            await asyncio.Event().wait()  # gone: the connection stays open, silent
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()

    def hang(self) -> None:
        """A process hung (or too busy to answer): its kernel still takes connections."""
        self.gone = True

    def vanish(self) -> None:
        self.gone = True
        assert self._accepting is not None
        self._accepting.cancel()
        for _ in range(3):  # fill the accept queue (backlog 0 holds one): SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self._fillers.append(filler)

    def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        for filler in self._fillers:
            filler.close()
        self.sock.close()


def gateway_before(
    make_gateway: Callable[..., Stack], server: VanishingServer, first_byte_timeout: float
) -> Stack:
    """A gateway in front of `server` alone (connects time out after 0.5 s), once ready."""
    stack = make_gateway(
        llamacpp_server=(server.url,),
        upstream_connect_timeout=0.5,
        upstream_first_byte_timeout=first_byte_timeout,
    )
    ready = {f"127.0.0.1:{server.port}": "ready"}
    assert stack.wait_for(lambda: ready_servers_on_loop(stack) == ready)
    return stack


@pytest.mark.parametrize("stream", [False, True])
def test_requests_on_a_server_gone_from_the_network_end_when_probes_find_it_unreachable(
    stream: bool, make_gateway: Callable[..., Stack], runner: LoopThread
) -> None:
    """A machine that loses power or its network sends no reset: a request waiting for its
    answer heard nothing until --upstream-first-byte-timeout (600 s by default), even
    after the probes found the server unreachable and took it down. Now a probe that cannot
    connect ends the requests waiting on that server that have heard nothing from it for
    --upstream-connect-timeout, with 502 upstream_unavailable (a stream, with its error
    event). Regression: the request below hung until the client's own 20 s timeout."""
    server = VanishingServer()
    runner.call(server.start)
    try:
        stack = gateway_before(make_gateway, server, first_byte_timeout=60.0)
        client = stack.client()
        with ThreadPoolExecutor(1) as threads:
            if stream:
                waiting = threads.submit(
                    lambda: list(client.completions.create(model="m", prompt="hi", stream=True))
                )
            else:
                waiting = threads.submit(client.completions.create, model="m", prompt="hi")
            assert stack.wait_for(lambda: server.posts == 1)
            runner.call(server.vanish)
            with pytest.raises(openai.APIError) as caught:
                waiting.result(30)
        error = caught.value
        assert "stopped answering" in str(error), error
        if not stream:
            assert isinstance(error, openai.APIStatusError) and error.status_code == 502
            assert error.code == "upstream_unavailable"
        assert ready_servers_on_loop(stack) == {f"127.0.0.1:{server.port}": "down"}
    finally:
        runner.call(server.stop)


def test_a_server_that_still_takes_connections_keeps_its_requests_however_silent(
    make_gateway: Callable[..., Stack], runner: LoopThread
) -> None:
    """A llama-server that answers nothing, not even /health, but whose machine still
    completes a TCP handshake, may be busy with a long prompt: it goes down for routing,
    but the requests waiting on it keep waiting, up to --upstream-first-byte-timeout."""
    server = VanishingServer()
    runner.call(server.start)
    try:
        stack = gateway_before(make_gateway, server, first_byte_timeout=6.0)
        sick = f"127.0.0.1:{server.port}"
        client = stack.client()
        with ThreadPoolExecutor(1) as threads:
            waiting = threads.submit(client.completions.create, model="m", prompt="long")
            assert stack.wait_for(lambda: server.posts == 1)
            runner.call(server.hang)
            assert stack.wait_for(lambda: ready_servers_on_loop(stack) == {sick: "down"})
            with pytest.raises(openai.APIStatusError) as caught:
                waiting.result(30)
        assert caught.value.status_code == 504, caught.value  # its own deadline, not 502
        assert "did not start answering within 6s" in caught.value.message
    finally:
        runner.call(server.stop)


def test_a_deadline_that_ends_during_a_connect_says_so(
    make_gateway: Callable[..., Stack], runner: LoopThread
) -> None:
    """A request whose deadline passes while its connection to llama.cpp is still being
    opened timed out connecting, and says so. Regression: it said "every connection to
    llama.cpp stayed busy (--upstream-max-connections)", sending the operator to a limit
    that had nothing to do with it (seen in --check, whose deadline is the connect's)."""
    server = VanishingServer()
    runner.call(server.start)
    try:
        stack = gateway_before(make_gateway, server, first_byte_timeout=0.3)
        runner.call(server.vanish)  # a new connection's SYN now goes unanswered
        with pytest.raises(openai.APIStatusError) as caught:
            stack.client().completions.create(model="m", prompt="hi")
        assert caught.value.status_code == 504, caught.value
        assert "timed out connecting to llama.cpp" in caught.value.message
        assert "busy" not in caught.value.message
    finally:
        runner.call(server.stop)
