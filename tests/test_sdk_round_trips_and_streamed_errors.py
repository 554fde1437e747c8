"""What issue 16's e2e tests do against llama-server, pinned exactly against the fake
llama.cpp: the Responses API's function tool round trip under `--tools-policy describe`
(a forced call, then its output going back), and the typed errors a streaming client gets
before the stream starts (Claude Code and Codex always stream): the Anthropic SDK's
`messages.stream` refused with 429 and with a context overflow, the Responses stream with a
429. Official SDKs on kept-alive clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from .conftest import LIMITED_KEY, UNLIMITED_KEY, Stack
from .fake_llamacpp import prompt_text
from .test_responses import assert_event_schema

FUNCTION: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
ASK = "Weather in Paris?"
HI: Any = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def described(make_stack: Any) -> Stack:
    stack: Stack = make_stack(tools_policy="describe")
    return stack


@pytest.fixture
def gpt(described: Stack) -> Iterator[openai.OpenAI]:
    with described.client() as client:
        yield client


def claude(stack: Stack, key: str = UNLIMITED_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0, timeout=20)


def test_responses_forced_call_then_output_under_describe(
    described: Stack, gpt: openai.OpenAI
) -> None:
    # What the json_schema constraint makes the model write: the bare call object.
    described.fake.script.tokens = ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}']
    kinds: list[str] = []
    with gpt.responses.stream(
        model="m",
        input=ASK,
        tools=[FUNCTION],
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:
        for event in stream:
            assert_event_schema(event.model_dump(mode="json", exclude_unset=True))
            kinds.append(event.type)
        first = stream.get_final_response()
    sent = described.fake.requests[-1]
    assert sent["json_schema"]["properties"]["name"] == {"const": "get_weather"}
    assert "You must call the tool get_weather now" in prompt_text(sent["prompt"])
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Oslo"}
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]

    described.fake.script.tokens = ["It is ", "18 C."]
    raw = gpt.responses.with_raw_response.create(
        model="m",
        tools=[FUNCTION],
        tool_choice="none",
        input=[
            {"role": "user", "content": ASK},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"},
        ],
    )
    second = raw.parse()
    assert second.status == "completed" and second.output_text == "It is 18 C."
    assert [item.type for item in second.output] == ["message"]
    sent = described.fake.requests[-1]
    assert "json_schema" not in sent  # tool_choice none: nothing forced, nothing described
    assert "x-tools-described" not in raw.headers
    prompt = prompt_text(sent["prompt"])
    assert '<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>' in prompt
    assert '<tool_result name="get_weather">\n18 C and sunny\n</tool_result>' in prompt


def test_anthropic_stream_refused_by_the_rate_limit_is_a_typed_429(stack: Stack) -> None:
    with claude(stack, LIMITED_KEY) as client:
        for _ in range(3):  # the limited key's window holds 3 requests
            with client.messages.stream(model="m", max_tokens=5, messages=HI) as stream:
                assert stream.get_final_message().content
        with (
            pytest.raises(anthropic.RateLimitError) as caught,
            client.messages.stream(model="m", max_tokens=5, messages=HI) as stream,
        ):
            stream.get_final_message()
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_anthropic_stream_over_the_context_is_anthropics_400(stack: Stack) -> None:
    stack.fake.script.n_ctx = 8
    long: Any = [{"role": "user", "content": "x" * 200}]
    with claude(stack) as client:
        with (
            pytest.raises(anthropic.BadRequestError) as caught,
            client.messages.stream(model="m", max_tokens=5, messages=long) as stream,
        ):
            stream.get_final_message()
        body: Any = caught.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"].startswith("prompt is too long: ")
        assert "> 8 maximum" in body["error"]["message"]
        stack.fake.script.n_ctx = 4096
        with client.messages.stream(model="m", max_tokens=5, messages=HI) as stream:
            assert stream.get_final_message().content  # the same client goes on


def test_responses_stream_refused_by_the_rate_limit_is_a_typed_429(stack: Stack) -> None:
    with stack.client(key=LIMITED_KEY) as client:
        for _ in range(3):
            with client.responses.stream(model="m", input="x") as stream:
                assert stream.get_final_response().output_text
        with (
            pytest.raises(openai.RateLimitError) as caught,
            client.responses.stream(model="m", input="x") as stream,
        ):
            stream.get_final_response()
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["type"] == "requests"  # type: ignore[index]
