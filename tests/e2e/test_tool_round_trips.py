"""Tool round trips through the official SDKs against a real llama-server (SmolLM2-135M,
greedy): the model calls a tool, the client runs it, the result goes back, the model answers.

SmolLM2's own ChatML template has no place for tools, so the gateway runs with
`--tools-policy describe` (docs/compatibility.md, "The describe format"). The tiny model will
not choose a tool by itself, so the first turn forces the call (Anthropic `tool_choice`
`{"type": "tool"}`, Responses `{"type": "function"}`): a forced call carries llama.cpp's
`json_schema` constraint, so the answer is a well-formed call whatever the model would say.
The second turn carries the result with no tool to call (`tool_choice` none), so the answer
is text. The model's words are not stable across builds: the tests assert shapes, stop
reasons, usage, and that the result reached llama.cpp's prompt: the same turn sent with a
longer result costs llama.cpp exactly the extra result tokens, counted by its own tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import openai
import pytest

from tests.conftest import UNLIMITED_KEY
from tests.test_responses import assert_event_schema

from .conftest import MODEL, Service, child_env, console_script, http_json, start_service

pytestmark = pytest.mark.e2e

SCHEMA: Any = {
    "type": "object",
    # maxLength bounds the constrained answer, so a short max_tokens always closes the call.
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 16}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": SCHEMA,
}
FUNCTION: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": SCHEMA,
    "strict": True,
}
ASK = "What is the weather in Paris?"
RESULT = "18 degrees and sunny"
PADDING = " sunny" * 12  # what the longer result adds: whole words, so whole tokens


def padding_tokens(server: Service) -> int:
    """How many tokens PADDING is in llama.cpp's own tokenizer."""
    answer: Any = http_json(server.url + "/tokenize", {"content": PADDING})
    return len(answer["tokens"])


@pytest.fixture(scope="module")
def describe_proxy(
    request: pytest.FixtureRequest, llama_server: Service, e2e_logs: Path
) -> Iterator[Service]:
    """A proxy in front of the SmolLM2 server that describes tools in the system prompt."""
    env = child_env(UNLIMITED_API_KEY=UNLIMITED_KEY)

    def argv(port: int) -> list[str]:
        return [
            console_script(),
            "--llamacpp-server",
            llama_server.url,
            "--model-name",
            MODEL,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--tools-policy",
            "describe",
            "--shutdown-timeout",
            "5",
        ]

    service = start_service(
        request.config,
        "proxy-chatml-describe",
        argv,
        "/health/ready",
        e2e_logs,
        timeout=30,
        env=env,
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def claude(describe_proxy: Service) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=describe_proxy.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=120
    ) as client:
        yield client


@pytest.fixture(scope="module")
def gpt(describe_proxy: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=describe_proxy.url + "/v1", api_key=UNLIMITED_KEY, max_retries=0, timeout=120
    ) as client:
        yield client


def test_anthropic_tool_use_then_tool_result(
    claude: anthropic.Anthropic, describe_proxy: Service, llama_server: Service
) -> None:
    ask: Any = [{"role": "user", "content": ASK}]
    raw = claude.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=64,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=ask,
        extra_body={"temperature": 0},
    )
    assert raw.headers["x-tools-described"] == "1"
    first = raw.parse()
    assert first.stop_reason == "tool_use", first.content
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    assert isinstance(call.input, dict) and set(call.input) == {"city"}
    assert isinstance(call.input["city"], str) and 1 <= len(call.input["city"]) <= 16

    def answer(result: str) -> anthropic.types.Message:
        # The stream helpers, as a client reading the answer as it comes would use them.
        with claude.messages.stream(
            model=MODEL,
            max_tokens=16,
            tools=[WEATHER],
            tool_choice={"type": "none"},
            messages=[
                *ask,
                {"role": "assistant", "content": first.content},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}],
                },
            ],
            extra_body={"temperature": 0},
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert [b.type for b in final.content] == ["text"]
        assert final.content[0].text == text and text.strip()  # type: ignore[union-attr]
        assert final.stop_reason in ("end_turn", "max_tokens")
        assert 0 < final.usage.output_tokens <= 16
        return final

    short, long = answer(RESULT), answer(RESULT + PADDING)

    def prompt(message: anthropic.types.Message) -> int:
        return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)

    assert prompt(long) - prompt(short) == padding_tokens(llama_server)


def test_responses_function_call_then_output(gpt: openai.OpenAI, llama_server: Service) -> None:
    # The forced call streamed, through the SDK's stream helper: Codex reads a call this way.
    kinds: list[str] = []
    with gpt.responses.stream(
        model=MODEL,
        input=ASK,
        tools=[FUNCTION],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        temperature=0,
    ) as stream:
        for event in stream:
            assert_event_schema(event.model_dump(mode="json", exclude_unset=True))
            kinds.append(event.type)
        first = stream.get_final_response()
    assert first.status == "completed", first.incomplete_details
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_")
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city"} and 1 <= len(arguments["city"]) <= 16
    assert "response.function_call_arguments.done" in kinds
    assert kinds[-1] == "response.completed"

    def answer(result: str) -> openai.types.responses.Response:
        response = gpt.responses.create(
            model=MODEL,
            tools=[FUNCTION],
            tool_choice="none",
            max_output_tokens=16,
            temperature=0,
            input=[
                {"role": "user", "content": ASK},
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": result},
            ],
        )
        assert response.status in ("completed", "incomplete")
        assert [item.type for item in response.output] == ["message"]
        assert response.output_text.strip()
        assert response.usage is not None and 0 < response.usage.output_tokens <= 16
        return response

    short, long = answer(RESULT), answer(RESULT + PADDING)
    assert short.usage is not None and long.usage is not None
    grown = long.usage.input_tokens - short.usage.input_tokens
    assert grown == padding_tokens(llama_server)


def test_a_forced_tool_whose_parameters_refer_to_their_defs_is_called(
    gpt: openai.OpenAI,
) -> None:
    """Pydantic writes a nested model as `$defs` and `{"$ref": "#/$defs/Name"}`. Forced, the
    tool's parameters sit under the call's `arguments` in llama.cpp's schema, where those
    references named nothing. Regression: llama.cpp refused the request (a 400: cannot
    resolve $ref); now the references point where the parameters are, and the call comes
    back with the nested object."""
    parameters = {
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}},
        "required": ["place"],
        "additionalProperties": False,
    }
    reply = gpt.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": parameters}}],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["weather"], reply
    jsonschema.validate(json.loads(calls[0].function.arguments), parameters)
