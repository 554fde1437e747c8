"""The proxy as an OpenAI client sees it: official SDK in, fake llama.cpp behind."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
from typing import Any

import httpx
import openai
import pytest

from .conftest import LIMITED_KEY, UNLIMITED_KEY, Stack, assert_schema
from .fake_llamacpp import DEFAULT_TOKENS, count_prompt_tokens

FULL_TEXT = "".join(DEFAULT_TOKENS)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
CHATML_PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of a raw SSE response, JSON-decoded ([DONE] kept as a string)."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def post(
    stack: Stack, path: str, body: Any, key: str | None = UNLIMITED_KEY, **kwargs: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return stack.http.post(path, content=content, headers=headers, **kwargs)


# -- chat --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "what",
    ["answer", "stream", "401", "400", "404"],
)
def test_every_answer_has_a_current_date_a_json_type_and_no_server_header(
    stack: Stack, what: str
) -> None:
    """The handlers build their default headers themselves (BaseHandler.clear, with the
    Date formatted once a second), on answers and on errors that clear a response."""
    body: Any = {"messages": CHAT, "stream": what == "stream"}
    if what == "400":
        body = {"messages": "not a list"}
    path = "/v1/nowhere" if what == "404" else "/v1/chat/completions"
    before = time.time()
    r = post(stack, path, body, key=None if what == "401" else UNLIMITED_KEY)
    after = time.time()
    assert r.status_code == (200 if what in ("answer", "stream") else int(what))
    assert "server" not in r.headers
    expected = "text/event-stream" if what == "stream" else "application/json"
    assert r.headers["content-type"].startswith(expected)
    sent = email.utils.parsedate_to_datetime(r.headers["date"]).timestamp()
    assert int(before) <= sent <= after
    assert r.headers["date"].endswith(" GMT")


def test_chat_completion_renders_the_template_and_answers_in_openai_shape(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="my-model",
        messages=CHAT,
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop=["\n\n"],
    )
    body = raw.http_response.json()
    assert_schema(body, "CreateChatCompletionResponse")
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "my-model"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": FULL_TEXT, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    prompt_tokens = count_prompt_tokens(CHATML_PROMPT)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(DEFAULT_TOKENS),
        "total_tokens": prompt_tokens + len(DEFAULT_TOKENS),
    }
    sent = stack.fake.requests[-1]
    assert sent["prompt"] == CHATML_PROMPT  # the model's own template from /props
    assert sent["n_predict"] == 50
    assert sent["temperature"] == 0.2 and sent["top_p"] == 0.9 and sent["seed"] == 7
    assert sent["presence_penalty"] == 0.5 and sent["frequency_penalty"] == -0.5
    assert sent["stop"] == ["\n\n"]
    assert sent["stream"] is False


def test_operator_template_is_used_and_bos_is_not_doubled(make_stack: Any) -> None:
    stack = make_stack(chat_template="gemma3")
    stack.client().chat.completions.create(model="m", messages=CHAT)
    # gemma3 writes {{ bos_token }} first; llama.cpp adds BOS itself, so the proxy drops it.
    assert stack.fake.requests[-1]["prompt"] == (
        "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
    )


def test_content_as_text_parts(stack: Stack) -> None:
    stack.client().chat.completions.create(
        model="m",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            }
        ],
    )
    assert "<|im_start|>user\none\ntwo<|im_end|>" in stack.fake.requests[-1]["prompt"]


def test_max_tokens_gives_finish_reason_length(stack: Stack) -> None:
    r = stack.client().chat.completions.create(model="m", messages=CHAT, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "Hello, world"
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_stop_sequence_string_is_sent_as_a_list_and_cut(stack: Stack) -> None:
    r = stack.client().chat.completions.create(model="m", messages=CHAT, stop=" How")
    assert stack.fake.requests[-1]["stop"] == [" How"]
    assert r.choices[0].message.content == "Hello, world!"
    assert r.choices[0].finish_reason == "stop"


def test_grammar_is_passed_through_untouched(stack: Stack) -> None:
    grammar = 'root ::= "yes" | "no"\n# comment kept\n'
    stack.client().chat.completions.create(
        model="m", messages=CHAT, extra_body={"grammar": grammar}
    )
    assert stack.fake.requests[-1]["grammar"] == grammar


def test_grammar_llamacpp_rejects_is_a_400_with_its_message(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().chat.completions.create(
            model="m", messages=CHAT, extra_body={"grammar": "root = ("}
        )
    assert "Failed to parse grammar" in caught.value.message
    assert_schema(caught.value.response.json(), "ErrorResponse")
    # ...and the proxy keeps serving.
    assert stack.client().chat.completions.create(model="m", messages=CHAT).choices


def test_model_defaults_to_what_llamacpp_serves(stack: Stack) -> None:
    r = post(stack, "/v1/chat/completions", {"messages": CHAT})
    assert r.status_code == 200
    assert r.json()["model"] == "fake-model"


# -- text completions --------------------------------------------------------------------


def test_text_completion(stack: Stack) -> None:
    raw = stack.client().completions.with_raw_response.create(
        model="m", prompt="Once upon a time", max_tokens=4, stop=["?"], seed=3
    )
    body = raw.http_response.json()
    assert_schema(body, "CreateCompletionResponse")
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": "Hello, world!", "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"]["prompt_tokens"] == count_prompt_tokens("Once upon a time")
    sent = stack.fake.requests[-1]
    assert sent["prompt"] == "Once upon a time"  # straight through, no template
    assert sent["n_predict"] == 4 and sent["stop"] == ["?"] and sent["seed"] == 3


# -- streaming ---------------------------------------------------------------------------


def test_chat_stream_with_the_sdk(stack: Stack) -> None:
    stream = stack.client().chat.completions.create(
        model="m", messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == FULL_TEXT
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(DEFAULT_TOKENS)
    assert stack.fake.requests[-1]["stream"] is True


def test_chat_stream_raw_frames_headers_and_schema(stack: Stack) -> None:
    r = post(
        stack,
        "/v1/chat/completions",
        {"model": "m", "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    # One chunk per llama.cpp token event, then the finish chunk, then usage.
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert [c["choices"][0]["delta"]["content"] for c in content] == DEFAULT_TOKENS
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(DEFAULT_TOKENS)


def test_stream_without_include_usage_has_no_usage_chunk(stack: Stack) -> None:
    events = sse_events(
        post(stack, "/v1/chat/completions", {"model": "m", "messages": CHAT, "stream": True})
    )
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])
    assert all("usage" not in e for e in events[:-1])


def test_text_stream(stack: Stack) -> None:
    r = post(
        stack, "/v1/completions", {"model": "m", "prompt": "Say", "stream": True, "max_tokens": 2}
    )
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        assert_schema(chunk, "CreateCompletionStreamResponse")
        assert chunk["object"] == "text_completion"
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == "Hello,"
    assert events[-2]["choices"][0]["finish_reason"] == "length"

    stream = stack.client().completions.create(model="m", prompt="Say", stream=True)
    assert "".join(c.choices[0].text for c in stream) == FULL_TEXT


def test_a_text_stream_answers_200_as_soon_as_llamacpp_does(stack: Stack) -> None:
    """A streamed text completion's head (200, text/event-stream) goes out when llama.cpp
    answers, as a chat stream's role chunk does, not with the first token: the first token's
    write is then one chunk, and the client knows it was accepted while the prompt is still
    being evaluated. (Before, the head waited for the first token.)"""
    gate = stack.runner.call(asyncio.Event)
    stack.fake.script.head_gate = gate
    with httpx.Client(base_url=stack.url, timeout=5) as http, contextlib.ExitStack() as done:
        done.callback(lambda: stack.runner.call(gate.set))  # a failure still lets the fake end
        body = {"model": "m", "prompt": "Say", "stream": True, "max_tokens": 2}
        headers = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            # the head is here while llama.cpp still holds every token back
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert stack.fake.events_sent == 0
            stack.runner.call(gate.set)
            text = "".join(
                json.loads(line[6:])["choices"][0]["text"]
                for line in r.iter_lines()
                if line.startswith("data: {")
            )
        assert text == "Hello,"
        # the same kept-alive connection serves the next request
        again = http.post("/v1/completions", json={**body, "stream": False}, headers=headers)
        assert again.json()["choices"][0]["text"] == "Hello,"


@pytest.mark.parametrize("mode", ["split", "merge"])
def test_events_split_or_merged_across_reads_are_relayed_exactly(stack: Stack, mode: str) -> None:
    stack.fake.script.mode = mode
    events = sse_events(
        post(stack, "/v1/chat/completions", {"model": "m", "messages": CHAT, "stream": True})
    )
    content = [e["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert [c for c in content if c] == DEFAULT_TOKENS
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1] == "[DONE]"


# -- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic abc", "Bearer", "sk-x"])
def test_missing_or_wrong_key_is_401_and_never_reaches_llamacpp(
    stack: Stack, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = post(
        stack, "/v1/chat/completions", {"model": "m", "messages": CHAT}, key=None, headers=headers
    )
    assert r.status_code == 401
    body = r.json()
    assert_schema(body, "ErrorResponse")
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert stack.fake.requests == []


def test_sdk_raises_authentication_error(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        stack.client(key="sk-nope").chat.completions.create(model="m", messages=CHAT)
    with pytest.raises(openai.AuthenticationError):
        stack.client(key="sk-nope").completions.create(model="m", prompt="x")
    assert stack.fake.requests == []


def test_both_keys_work(stack: Stack) -> None:
    for key in (UNLIMITED_KEY, LIMITED_KEY):
        assert stack.client(key).completions.create(model="m", prompt="x").choices


# -- rate limit ----------------------------------------------------------------------------


def test_limited_key_gets_429_after_its_quota_with_headers(make_stack: Any) -> None:
    stack = make_stack(rate_limit_max_requests=2, rate_limit_window=60)
    client = stack.client(LIMITED_KEY)
    first = client.chat.completions.with_raw_response.create(model="m", messages=CHAT)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    second = post(
        stack,
        "/v1/chat/completions",
        {"model": "m", "messages": CHAT, "stream": True},
        key=LIMITED_KEY,
    )
    assert second.headers["x-ratelimit-remaining-requests"] == "0"  # streamed responses too
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=CHAT)
    response = caught.value.response
    assert response.status_code == 429
    assert_schema(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert 59 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(stack.fake.requests) == 2  # the refused request never reached llama.cpp
    # The unlimited key is never limited.
    for _ in range(5):
        stack.client(UNLIMITED_KEY).completions.create(model="m", prompt="x")
    assert (
        "x-ratelimit-limit-requests" not in post(stack, "/v1/completions", {"prompt": "x"}).headers
    )


def test_window_frees_after_its_length(make_stack: Any) -> None:
    clock = {"t": 1000.0}
    stack = make_stack(rate_limit_max_requests=1, rate_limit_window=30)
    stack.ctx.limiter._now = lambda: clock["t"]  # the window's clock, injected
    assert post(stack, "/v1/completions", {"prompt": "x"}, key=LIMITED_KEY).status_code == 200
    clock["t"] += 30
    refused = post(stack, "/v1/completions", {"prompt": "x"}, key=LIMITED_KEY)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    clock["t"] += 0.01
    assert post(stack, "/v1/completions", {"prompt": "x"}, key=LIMITED_KEY).status_code == 200


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "10"}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT, "temperature": 3}, "temperature"),
        ("/v1/chat/completions", {"messages": CHAT, "top_p": -0.1}, "top_p"),
        ("/v1/chat/completions", {"messages": CHAT, "stop": [1, 2]}, "stop"),
        ("/v1/chat/completions", {"messages": CHAT, "seed": 1.5}, "seed"),
        ("/v1/chat/completions", {"messages": CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": CHAT, "grammar": 7}, "grammar"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 0}, "n"),
        ("/v1/chat/completions", {"messages": CHAT, "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": "high"}, "frequency_penalty"),
    ],
)
def test_bad_parameters_are_400_naming_the_param(
    stack: Stack, path: str, body: dict[str, Any], param: str
) -> None:
    r = post(stack, path, body)
    assert r.status_code == 400, r.text
    error = r.json()
    assert_schema(error, "ErrorResponse")
    assert error["error"]["param"] == param
    assert error["error"]["type"] == "invalid_request_error"
    assert stack.fake.requests == []


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[1, 2]", b'{"messages": [', b"\xff\xfe", b'{"messages": NaN}', b"null"],
)
def test_body_that_is_not_a_json_object_is_400(stack: Stack, raw: bytes) -> None:
    r = post(stack, "/v1/chat/completions", raw)
    assert r.status_code == 400
    assert_schema(r.json(), "ErrorResponse")
    assert r.json()["error"]["code"] == "invalid_json"
    assert stack.client().chat.completions.create(model="m", messages=CHAT).choices  # still up


def test_sdk_raises_bad_request_error(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().chat.completions.create(model="m", messages=[])
    assert caught.value.param == "messages" if hasattr(caught.value, "param") else True
    assert caught.value.response.json()["error"]["param"] == "messages"


def test_unknown_fields_are_ignored(stack: Stack) -> None:
    r = post(
        stack,
        "/v1/chat/completions",
        {"messages": CHAT, "vendor_extra": {"x": 1}, "metadata": {"a": "b"}, "store": False},
    )
    assert r.status_code == 200


def test_template_syntax_in_content_is_literal_text(stack: Stack) -> None:
    stack.client().chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "{{ 7*7 }} {% for x in range(3) %}x{% endfor %}"}],
    )
    prompt = stack.fake.requests[-1]["prompt"]
    assert "{{ 7*7 }} {% for x in range(3) %}x{% endfor %}" in prompt
    assert "49" not in prompt


# -- upstream failures -----------------------------------------------------------------------


def test_llamacpp_unreachable_is_502_and_the_proxy_keeps_serving(make_stack: Any) -> None:
    sock_port = _closed_port()
    stack = make_stack(llamacpp_server=f"http://127.0.0.1:{sock_port}")
    with pytest.raises(openai.APIStatusError) as caught:
        stack.client().chat.completions.create(model="m", messages=CHAT)
    assert caught.value.status_code == 502
    body = caught.value.response.json()
    assert_schema(body, "ErrorResponse")
    assert body["error"]["code"] == "upstream_unavailable"
    assert "refused" in body["error"]["message"]
    r = post(stack, "/v1/completions", {"prompt": "x", "stream": True})
    assert r.status_code == 502
    assert stack.http.get("/health").status_code == 200


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


# -- other endpoints -----------------------------------------------------------------------


def test_models_list_and_retrieve(stack: Stack) -> None:
    client = stack.client()
    raw = client.models.with_raw_response.list()
    body = raw.http_response.json()
    assert_schema(body, "ListModelsResponse")
    assert [m["id"] for m in body["data"]] == ["fake-model"]
    model = client.models.retrieve("fake-model")
    assert model.id == "fake-model" and model.owned_by == "llamacpp"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.AuthenticationError):
        stack.client(key="bad").models.list()


def test_health_needs_no_key(stack: Stack) -> None:
    r = stack.http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readiness_reflects_llamacpp(stack: Stack) -> None:
    assert stack.http.get("/health/ready").status_code == 200
    stack.fake.script.health_status = 503
    r = stack.http.get("/health/ready")
    assert r.status_code == 503
    (server,) = r.json()["models"]["default"]["servers"]
    assert server["status"] == "loading" and server["server"] == f"127.0.0.1:{stack.fake.port}"


def test_unknown_url_and_wrong_method_are_openai_errors(stack: Stack) -> None:
    r = stack.http.get("/v1/nope")
    assert r.status_code == 404
    assert_schema(r.json(), "ErrorResponse")
    r = stack.http.get("/v1/chat/completions", headers={"Authorization": f"Bearer {UNLIMITED_KEY}"})
    assert r.status_code == 405
    assert_schema(r.json(), "ErrorResponse")


def test_request_id_is_returned_and_taken_from_the_client(stack: Stack) -> None:
    r = post(stack, "/v1/completions", {"prompt": "x"}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = post(
        stack, "/v1/completions", {"prompt": "x"}, headers={"X-Request-Id": "bad id with spaces"}
    )
    assert r.headers["x-request-id"].startswith("req_")


def test_error_responses_keep_request_id_but_invalid_bodies_are_not_counted(
    stack: Stack,
) -> None:
    r = post(
        stack,
        "/v1/chat/completions",
        {"messages": []},
        key=LIMITED_KEY,
        headers={"X-Request-Id": "err-1"},
    )
    assert r.status_code == 400
    assert r.headers["x-request-id"] == "err-1"
    # A body that fails validation is not admitted: it uses nothing of the key's window.
    assert "x-ratelimit-limit-requests" not in r.headers
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"prompt": "\\ud800"}', None),
        (b'{"prompt": "x", "model": "a\\udfffb"}', None),
        (b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
        (b'{"prompt": "x", "logit_bias": {"1": ' + b"9" * 400 + b"}}", "logit_bias"),
        (b'{"prompt": "x", "max_tokens": 99999999999}', "max_tokens"),
    ],
)
def test_hostile_numbers_and_unicode_are_400(stack: Stack, raw: bytes, param: str | None) -> None:
    r = post(stack, "/v1/completions", raw)
    assert r.status_code == 400, r.text
    # A number beyond float range is refused by the JSON parser (orjson) or, with the
    # standard library's parser, by the parameter's check.
    assert r.json()["error"]["param"] in {param, None}
    assert stack.fake.requests == []


def test_surrogate_pairs_are_real_text_and_pass(stack: Stack) -> None:
    r = post(stack, "/v1/completions", b'{"prompt": "smile \\ud83d\\ude00"}')
    assert r.status_code == 200
    assert stack.fake.requests[-1]["prompt"] == "smile \U0001f600"


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": ["user"], "content": "x"}]},
        {
            "messages": CHAT,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": "f"},
        },
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[" * 100_000}}],
                },
                {"role": "user", "content": "x"},
            ]
        },
    ],
)
def test_malformed_chat_structures_are_400(stack: Stack, body: dict[str, Any]) -> None:
    r = post(stack, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert_schema(r.json(), "ErrorResponse")


def test_413_carries_the_request_id(make_stack: Any) -> None:
    stack = make_stack(max_body_size=100)
    r = post(stack, "/v1/completions", {"prompt": "x" * 200}, headers={"X-Request-Id": "big-1"})
    assert r.status_code == 413 and r.headers["x-request-id"] == "big-1"


@pytest.mark.parametrize("key", [" +1_0 ", "-1", "1e3", "١٢", "1000000000"])
def test_logit_bias_keys_must_be_plain_token_ids(stack: Stack, key: str) -> None:
    r = post(stack, "/v1/completions", {"prompt": "x", "logit_bias": {key: 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
