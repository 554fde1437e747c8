"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) through the proxy
into the fake llama.cpp, driven by the official `anthropic` SDK on kept-alive clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from llamacpp_proxy.errors import InvalidRequest
from llamacpp_proxy.frontdoor import anthropic as door

from .conftest import LIMITED_KEY, UNLIMITED_KEY, Stack
from .fake_llamacpp import tokenize

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
QWEN_CALL = [
    "<tool_call>",
    '\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}',
    "\n</tool_call>",
]
HELLO = "Hello, world! How can I help you?"


def sdk(stack: Stack, key: str = UNLIMITED_KEY, **kwargs: Any) -> anthropic.Anthropic:
    """The official SDK pointed at the proxy (it sends the key as x-api-key)."""
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0, timeout=20, **kwargs)


@pytest.fixture
def client(stack: Stack) -> Iterator[anthropic.Anthropic]:
    with sdk(stack) as c:
        yield c


def events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a raw Anthropic SSE response."""
    out = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == name_line[len("event: ") :]
        out.append((data["type"], data))
    return out


def post(stack: Stack, path: str, body: Any, **headers: str) -> httpx.Response:
    sent = {"x-api-key": UNLIMITED_KEY, "anthropic-version": "2023-06-01", **headers}
    return stack.http.post(path, content=json.dumps(body), headers=sent)


# -- (1) plain messages ---------------------------------------------------------------------


def test_message_non_streamed(stack: Stack, client: anthropic.Anthropic) -> None:
    for _ in range(2):  # the same kept-alive client, twice
        message = client.messages.create(
            model="local-model",
            max_tokens=64,
            system="Be brief.",
            messages=[{"role": "user", "content": "Hi"}],
        )
        assert message.type == "message" and message.role == "assistant"
        assert message.id.startswith("msg_")
        assert message.model == "local-model"
        assert [b.type for b in message.content] == ["text"]
        assert message.content[0].text == HELLO  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn" and message.stop_sequence is None
        assert message.usage.output_tokens == 10
        assert message.usage.input_tokens > 0
        assert message.usage.cache_read_input_tokens == 0
    sent = stack.fake.requests[-1]
    assert sent["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert sent["n_predict"] == 64


def test_stop_sequence_and_max_tokens_reasons(stack: Stack, client: anthropic.Anthropic) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    stopped = client.messages.create(model="m", max_tokens=64, messages=hi, stop_sequences=[" How"])  # type: ignore[arg-type]
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " How"
    assert stopped.content[0].text == "Hello, world!"  # type: ignore[union-attr]
    cut = client.messages.create(model="m", max_tokens=2, messages=hi)  # type: ignore[arg-type]
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


def test_max_tokens_over_the_gateway_limit_is_capped(make_stack: Any) -> None:
    stack = make_stack(max_tokens_limit=100)
    with sdk(stack) as client:
        message = client.messages.create(
            model="m", max_tokens=32000, messages=[{"role": "user", "content": "Hi"}]
        )
    assert message.stop_reason == "end_turn"
    assert stack.fake.requests[-1]["n_predict"] == 100


def test_message_streamed_with_the_sdk_helpers(stack: Stack, client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == HELLO
    assert final.content[0].text == HELLO  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 10 and final.usage.input_tokens > 0


def test_streamed_event_sequence_is_anthropics(stack: Stack) -> None:
    body = {
        "model": "m",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    response = post(stack, "/v1/messages", body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response)
    names = [name for name, _ in got]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 10,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = got[0][1]["message"]
    assert (
        start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    )
    assert got[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta") == HELLO
    assert all(d["delta"]["type"] == "text_delta" for n, d in got if n == "content_block_delta")
    delta = got[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 10


def test_failure_after_the_start_is_an_error_event(stack: Stack) -> None:
    stack.fake.script.drop_after_tokens = 3
    body = {
        "model": "m",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    response = post(stack, "/v1/messages", body)
    assert response.status_code == 200
    got = events(response)
    assert got[0][0] == "message_start"
    name, data = got[-1]
    assert name == "error" and data["error"]["type"] == "api_error"
    stack.fake.script.drop_after_tokens = None
    assert post(stack, "/v1/messages", {**body, "stream": False}).status_code == 200  # kept alive


def test_claude_code_request_shape(make_stack: Any) -> None:
    """What Claude Code 2.1 sends: ?beta=true, Bearer auth, system blocks with
    cache_control, a system message inside messages, thinking/context_management/
    output_config, metadata.user_id as a JSON string, tool_result with is_error and
    cache_control, tools with $schema, max_tokens 32000, always streamed."""
    stack = make_stack(tools_policy="drop")
    body = {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "Be helpful."},
        ],
        "messages": [
            {"role": "system", "content": "Reminder: be concise."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "List files", "cache_control": {"type": "ephemeral"}}
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
            },
        ],
        "tools": [WEATHER],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": []},
        "output_config": {"effort": "medium"},
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
    }
    headers = {
        "Authorization": f"Bearer {UNLIMITED_KEY}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "x-app": "cli",
    }
    response = stack.http.post("/v1/messages?beta=true", content=json.dumps(body), headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-tools-dropped"] == "1"
    assert [n for n, _ in events(response)][-1] == "message_stop"
    prompt = stack.fake.requests[-1]["prompt"]
    assert prompt.startswith("<|im_start|>system\nYou are Claude Code.\nBe helpful.<|im_end|>")
    assert "<|im_start|>system\nReminder: be concise.<|im_end|>" in prompt
    assert '[called tool get_weather with {"city": "Oslo"}]' in prompt
    assert "[tool result]\nError: no such city" in prompt
    assert "hmm" not in prompt and "input_schema" not in prompt
    assert stack.fake.requests[-1]["n_predict"] == 4096  # capped at --max-tokens-limit


# -- errors and auth ------------------------------------------------------------------------


def test_typed_errors_401_400_on_one_client(stack: Stack) -> None:
    with sdk(stack, key="sk-wrong") as bad:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            bad.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert caught.value.status_code == 401
        assert caught.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
        }
    with sdk(stack) as client:
        with pytest.raises(anthropic.BadRequestError) as bad_request:
            client.messages.create(
                model="m",
                max_tokens=5,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "AA==",
                                },
                            }
                        ],
                    }
                ],
            )
        error = bad_request.value.body["error"]  # type: ignore[index]
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith("messages.0.content.0: 'image' blocks are not supported")
        # and the same client goes on working
        assert client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        ).content


def test_missing_fields_are_named(stack: Stack) -> None:
    for body, message in [
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}]},
            "max_tokens: Field required",
        ),
        ({"max_tokens": 5, "messages": []}, "model: Field required"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]},
            "messages.0.role",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 1.5,
            },
            "temperature",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "tools.0.type",
        ),
    ]:
        response = post(stack, "/v1/messages", body)
        assert response.status_code == 400, body
        got = response.json()
        assert got["type"] == "error" and got["error"]["type"] == "invalid_request_error"
        assert got["error"]["message"].startswith(message), got


def test_x_api_key_and_bearer_both_authenticate(stack: Stack) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    assert post(stack, "/v1/messages", body).status_code == 200
    bearer = stack.http.post(
        "/v1/messages", json=body, headers={"Authorization": f"Bearer {UNLIMITED_KEY}"}
    )
    assert bearer.status_code == 200
    # x-api-key works on the OpenAI endpoints too (the key lookup is shared)
    chat = stack.http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}]},
        headers={"x-api-key": UNLIMITED_KEY},
    )
    assert chat.status_code == 200
    missing = stack.http.post("/v1/messages", json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"


def test_rate_limit_is_a_typed_429_with_anthropic_headers(stack: Stack) -> None:
    with sdk(stack, key=LIMITED_KEY) as client:
        hi = [{"role": "user", "content": "x"}]
        for _ in range(3):  # the limited key's window holds 3 requests
            raw = client.messages.with_raw_response.create(model="m", max_tokens=5, messages=hi)  # type: ignore[arg-type]
            assert raw.headers["anthropic-ratelimit-requests-limit"] == "3"
            assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.create(model="m", max_tokens=5, messages=hi)  # type: ignore[arg-type]
    response = caught.value.response
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_context_overflow_speaks_anthropics_words(
    stack: Stack, client: anthropic.Anthropic
) -> None:
    stack.fake.script.n_ctx = 8
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x" * 200}]
        )
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("prompt is too long: ")
    assert "> 8 maximum" in error["message"]


def test_token_charges_are_llamacpp_counts(make_stack: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice-secret-1"\ntokens_per_minute = 10000\n')
    stack = make_stack(api_keys_file=keys)
    with sdk(stack, key="sk-alice-secret-1") as client:
        message = client.messages.create(
            model="m", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        )
        assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("alice") == 0)
        raw = client.messages.with_raw_response.create(
            model="m", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        )
    used = message.usage.input_tokens + message.usage.output_tokens
    estimate = raw.http_request.headers.get("content-length")
    assert estimate is not None
    reserved = -(-int(estimate) // 4) + 64
    assert raw.headers["anthropic-ratelimit-tokens-remaining"] == str(10000 - used - reserved)


# -- (2) tools ------------------------------------------------------------------------------


def test_tool_use_then_tool_result_round_trip(make_stack: Any) -> None:
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = QWEN_CALL
    with sdk(stack) as client:
        first = client.messages.create(
            model="m",
            max_tokens=64,
            tools=[WEATHER],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "Weather in Paris?"}],
        )
        assert first.stop_reason == "tool_use"
        (block,) = first.content
        assert block.type == "tool_use" and block.id.startswith("toolu_")
        assert block.name == "get_weather" and block.input == {"city": "Paris"}
        prompt = stack.fake.requests[-1]["prompt"]
        assert "<tools>" in prompt and '"name": "get_weather"' in prompt
        stack.fake.script.tokens = ["It is", " 18C."]
        second = client.messages.create(
            model="m",
            max_tokens=64,
            tools=[WEATHER],  # type: ignore[list-item]
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [b.model_dump() for b in first.content]},  # type: ignore[misc]
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": block.id, "content": "18C and sunny"}
                    ],
                },
            ],
        )
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == "It is 18C."  # type: ignore[union-attr]
    prompt = stack.fake.requests[-1]["prompt"]
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert "<tool_response>\n18C and sunny\n</tool_response>" in prompt


def test_tool_use_streamed(make_stack: Any) -> None:
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = QWEN_CALL
    with (
        sdk(stack) as client,
        client.messages.stream(
            model="m",
            max_tokens=64,
            tools=[WEATHER],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "Weather in Paris?"}],
        ) as stream,
    ):
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (block,) = final.content
    assert block.type == "tool_use" and block.input == {"city": "Paris"}
    body = {
        "model": "m",
        "max_tokens": 64,
        "stream": True,
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    got = events(post(stack, "/v1/messages", body))
    assert [n for n, _ in got] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert got[1][1]["content_block"]["type"] == "tool_use"
    assert got[1][1]["content_block"]["input"] == {}
    assert json.loads(got[3][1]["delta"]["partial_json"]) == {"city": "Paris"}


def test_tool_choice_any_forces_a_call(make_stack: Any) -> None:
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = ['{"name": "get_weather", "arguments": {"city": "Oslo"}}']
    with sdk(stack) as client:
        message = client.messages.create(
            model="m",
            max_tokens=64,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "any"},
            messages=[{"role": "user", "content": "Weather?"}],
        )
    assert message.stop_reason == "tool_use"
    assert stack.fake.requests[-1]["json_schema"]["properties"]["name"] == {"const": "get_weather"}


# -- (3) count_tokens -----------------------------------------------------------------------


def test_count_tokens_is_llamacpps_count_of_the_rendered_prompt(
    stack: Stack, client: anthropic.Anthropic
) -> None:
    messages: Any = [{"role": "user", "content": "Hi there"}]
    counted = client.messages.count_tokens(model="m", system="Be brief.", messages=messages)
    client.messages.create(model="m", max_tokens=5, system="Be brief.", messages=messages)
    rendered = stack.fake.requests[-1]["prompt"]
    assert counted.input_tokens == len(tokenize(rendered, True, True, adds_bos=True))
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="m", messages=[])


def test_count_tokens_needs_a_key(stack: Stack) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    response = stack.http.post("/v1/messages/count_tokens", json=body)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


# -- (4) the tools policy -------------------------------------------------------------------


def test_tools_policy_refuse_is_the_default(stack: Stack, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="m",
            max_tokens=5,
            tools=[WEATHER],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "x"}],
        )
    assert "cannot express tools" in caught.value.body["error"]["message"]  # type: ignore[index]


def test_tools_policy_drop(make_stack: Any) -> None:
    stack = make_stack(tools_policy="drop")
    with sdk(stack) as client:
        raw = client.messages.with_raw_response.create(
            model="m",
            max_tokens=5,
            tools=[WEATHER],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "x"}],
        )
        assert raw.headers["x-tools-dropped"] == "1"
        assert raw.parse().stop_reason == "max_tokens"
        assert "get_weather" not in stack.fake.requests[-1]["prompt"]
        # a call the client forces cannot be dropped
        with pytest.raises(anthropic.BadRequestError):
            client.messages.create(
                model="m",
                max_tokens=5,
                tools=[WEATHER],  # type: ignore[list-item]
                tool_choice={"type": "tool", "name": "get_weather"},
                messages=[{"role": "user", "content": "x"}],
            )
    # the OpenAI door follows the same policy
    chat = stack.http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        },
        headers={"Authorization": f"Bearer {UNLIMITED_KEY}"},
    )
    assert chat.status_code == 200 and chat.headers["x-tools-dropped"] == "1"


def test_tools_policy_per_model_in_the_upstreams_file(
    make_stack: Any, fake: Any, tmp_path: Path
) -> None:
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(
        f'[models.small]\nservers = ["{fake.url}"]\ntools_policy = "drop"\n'
        f'[models.strict]\nservers = ["http://127.0.0.1:9"]\n'
    )
    stack = make_stack(upstreams_file=upstreams)
    body = {"max_tokens": 5, "tools": [WEATHER], "messages": [{"role": "user", "content": "x"}]}
    assert post(stack, "/v1/messages", {**body, "model": "small"}).headers["x-tools-dropped"] == "1"


# -- the pure parser --------------------------------------------------------------------------


def test_parser_maps_blocks_to_template_messages() -> None:
    request = door.parse_messages_request(
        {
            "model": "m",
            "max_tokens": 10,
            "top_k": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "42"},
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "f"},
        }
    )
    assert request.messages == [
        {"role": "user", "content": "a\nb"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
        {"role": "user", "content": "thanks"},
    ]
    assert request.tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert request.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert request.extensions == {"top_k": 5}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "x"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
            "messages.0.content.0.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}],
                    }
                ]
            },
            "messages.0.content.0.input",
        ),
        ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools.0.name"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"metadata": {"user_id": 5}}, "metadata.user_id"),
        ({"thinking": {"type": "maybe"}}, "thinking.type"),
        ({"system": [{"type": "image"}]}, "system.0.type"),
    ],
)
def test_parser_names_the_bad_field(body: dict[str, Any], param: str) -> None:
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(InvalidRequest) as caught:
        door.parse_messages_request({**base, **body})
    assert caught.value.param == param
