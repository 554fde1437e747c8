"""OpenAI's Responses API (/v1/responses, stateless) through the proxy into the fake
llama.cpp, driven by the official `openai` SDK on kept-alive clients. Every answer and every
streamed event is validated against OpenAI's published schemas (Response.json,
ResponseStreamEvent.json)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from llamacpp_proxy.errors import InvalidRequest
from llamacpp_proxy.frontdoor import responses as door

from .conftest import LIMITED_KEY, UNLIMITED_KEY, Stack, assert_schema, load_schema

HELLO = "Hello, world! How can I help you?"
WEATHER = {
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
QWEN_CALL = [
    "<tool_call>",
    '\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}',
    "\n</tool_call>",
]
AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with stack.client() as c:
        yield c


def post(stack: Stack, body: Any, key: str = UNLIMITED_KEY) -> httpx.Response:
    return stack.http.post(
        "/v1/responses", content=json.dumps(body), headers={"Authorization": f"Bearer {key}"}
    )


_EVENTS = load_schema("ResponseStreamEvent")
# Each event type's own branch of ResponseStreamEvent's anyOf: validating against it is what
# the anyOf asks, and a failure then names the field rather than 60 alternatives.
_EVENT_DEFS = {
    d["properties"]["type"]["enum"][0]: name
    for name, d in _EVENTS["$defs"].items()
    if isinstance(d.get("properties", {}).get("type", {}).get("enum"), list)
    and {"sequence_number", "type"} <= set(d.get("required", []))
}


_VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def assert_event_schema(data: dict[str, Any]) -> None:
    """Fail unless `data` is a valid ResponseStreamEvent of its own type."""
    name = _EVENT_DEFS[data["type"]]
    validator = _VALIDATORS.get(name)
    if validator is None:
        schema = {"$defs": _EVENTS["$defs"], "$ref": f"#/$defs/{name}"}
        validator = _VALIDATORS[name] = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise error


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The data of a raw Responses SSE answer, each checked: its `event:` line names its
    type, it validates against ResponseStreamEvent, sequence numbers count from 0."""
    out: list[dict[str, Any]] = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == name_line[len("event: ") :]
        assert_event_schema(data)
        if data["type"] in (
            "response.created",
            "response.completed",
            "response.incomplete",
            "response.failed",
        ):
            assert_schema(data["response"], "Response")
        assert data["sequence_number"] == len(out)
        out.append(data)
    return out


# -- (1) plain responses ----------------------------------------------------------------------


def test_create_plain_on_a_kept_alive_client(stack: Stack, client: openai.OpenAI) -> None:
    for _ in range(2):
        response = client.responses.create(
            model="local-model", instructions="Be brief.", input="Hi", max_output_tokens=64
        )
        assert response.object == "response" and response.id.startswith("resp_")
        assert response.status == "completed" and response.incomplete_details is None
        assert response.model == "local-model"
        assert response.output_text == HELLO
        assert response.instructions == "Be brief." and response.max_output_tokens == 64
        (item,) = response.output
        assert item.type == "message" and item.role == "assistant"
        assert response.usage is not None and response.usage.output_tokens == 10
        assert response.usage.input_tokens > 0
        assert response.usage.total_tokens == response.usage.input_tokens + 10
    sent = stack.fake.requests[-1]
    assert sent["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert sent["n_predict"] == 64
    raw = post(stack, {"model": "m", "input": "Hi"})
    assert raw.status_code == 200
    assert_schema(raw.json(), "Response")


def test_input_items_become_the_conversation(stack: Stack, client: openai.OpenAI) -> None:
    client.responses.create(
        model="m",
        input=[
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "Rules."}],
            },
            {"role": "user", "content": "one"},
            {  # type: ignore[misc, list-item]
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "two", "annotations": []}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "three"}],
            },
        ],
        temperature=0.5,
        top_p=0.9,
    )
    sent = stack.fake.requests[-1]
    assert sent["prompt"] == (
        "<|im_start|>system\nRules.<|im_end|>\n<|im_start|>user\none<|im_end|>\n"
        "<|im_start|>assistant\ntwo<|im_end|>\n<|im_start|>user\nthree<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert sent["temperature"] == 0.5 and sent["top_p"] == 0.9


def test_streamed_events_are_openais_sequence(stack: Stack) -> None:
    response = post(stack, {"model": "m", "input": "Hi", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response)
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 10,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    item_id = got[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in got[3:-2] if "item_id" in e)
    assert "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta") == HELLO
    assert got[-4]["text"] == HELLO
    final = got[-1]["response"]
    assert final["status"] == "completed" and final["id"] == got[0]["response"]["id"]
    assert final["output"][0]["content"][0]["text"] == HELLO
    assert final["usage"]["output_tokens"] == 10 and final["usage"]["input_tokens"] > 0


def test_streamed_with_the_sdk_iterator_and_stream_helper(client: openai.OpenAI) -> None:
    kinds = []
    text = ""
    for event in client.responses.create(model="m", input="Hi", stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert text == HELLO and kinds[0] == "response.created" and kinds[-1] == "response.completed"
    with client.responses.stream(model="m", input="Hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == HELLO
    assert final.output_text == HELLO and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 10


def test_a_response_cut_by_the_token_limit_is_incomplete(
    stack: Stack, client: openai.OpenAI
) -> None:
    cut = client.responses.create(model="m", input="Hi", max_output_tokens=2)
    assert cut.status == "incomplete"
    assert (
        cut.incomplete_details is not None and cut.incomplete_details.reason == "max_output_tokens"
    )
    assert cut.output_text == "Hello," and cut.output[0].status == "incomplete"  # type: ignore[union-attr]
    got = events(post(stack, {"model": "m", "input": "Hi", "stream": True, "max_output_tokens": 2}))
    assert got[-1]["type"] == "response.incomplete"
    assert got[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got[-2]["item"]["status"] == "incomplete"


def test_failure_after_the_start_is_an_error_event_then_response_failed(stack: Stack) -> None:
    """As OpenAI's stream ends a response that fails: the `error` event, then the terminal
    `response.failed` whose response carries the error (Codex reads its message there;
    without it, it saw a stream that just stopped). Regression: only the `error` event."""
    stack.fake.script.drop_after_tokens = 3
    response = post(stack, {"model": "m", "input": "Hi", "stream": True})
    assert response.status_code == 200
    got = events(response)
    assert got[0]["type"] == "response.created"
    assert got[-2]["type"] == "error" and got[-2]["message"]
    failed = got[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": got[-2]["message"]}
    assert failed["response"]["id"] == got[0]["response"]["id"]
    assert not any(e["type"] == "response.completed" for e in got)
    stack.fake.script.drop_after_tokens = None
    assert post(stack, {"model": "m", "input": "Hi"}).status_code == 200  # kept alive


# -- (2) tools --------------------------------------------------------------------------------


def test_function_tool_round_trip(make_stack: Any) -> None:
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = QWEN_CALL
    with stack.client() as client:
        first = client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])
        assert first.status == "completed"
        (call,) = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
        assert call.call_id.startswith("call_") and call.id is not None
        prompt = stack.fake.requests[-1]["prompt"]
        assert "<tools>" in prompt and '"name": "get_weather"' in prompt
        stack.fake.script.tokens = ["It is", " 18C."]
        second = client.responses.create(
            model="m",
            tools=[WEATHER],
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                },
                {
                    "type": "function_call_output",
                    "call_id": call.call_id,
                    "output": "18C and sunny",
                },
            ],
        )
    assert second.output_text == "It is 18C."
    prompt = stack.fake.requests[-1]["prompt"]
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert "<tool_response>\n18C and sunny\n</tool_response>" in prompt


def test_function_call_streamed(make_stack: Any) -> None:
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = QWEN_CALL
    body = {"model": "m", "input": "Weather?", "tools": [WEATHER], "stream": True}
    got = events(post(stack, body))
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, delta, done, item_done = got[2:6]
    assert added["output_index"] == 0 and added["item"]["type"] == "function_call"
    assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
    item_id = added["item"]["id"]
    assert delta["item_id"] == done["item_id"] == item_done["item"]["id"] == item_id
    assert json.loads(done["arguments"]) == {"city": "Paris"} and done["name"] == "get_weather"
    assert delta["delta"] == done["arguments"]
    final = got[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["function_call"]
    assert final["output"][0]["call_id"] == added["item"]["call_id"]
    with (
        stack.client() as client,
        client.responses.stream(model="m", input="Weather?", tools=[WEATHER]) as stream,
    ):
        for _ in stream:
            pass
        result = stream.get_final_response()
    assert result.output[-1].type == "function_call"


def test_text_then_a_function_call_non_streamed(make_stack: Any) -> None:
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = ["Let me check.", *QWEN_CALL]
    response = post(stack, {"model": "m", "input": "Weather?", "tools": [WEATHER]})
    body = response.json()
    assert_schema(body, "Response")
    assert [i["type"] for i in body["output"]] == ["message", "function_call"]
    assert body["output"][0]["content"][0]["text"] == "Let me check."


def test_codex_request_shape(make_stack: Any) -> None:
    """What Codex CLI 0.171 sends: developer and user messages with input_text parts,
    function, namespace and web_search tools, reasoning, store false, include,
    prompt_cache_key, client_metadata; no instructions, no max_output_tokens."""
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = [
        "<tool_call>",
        '\n{"name": "list_dir", "arguments": {"path": "."}}',
        "\n</tool_call>",
    ]
    body = {
        "model": "gpt-5-codex",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "You are Codex."}],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "ls"}]},
        ],
        "tools": [
            {**WEATHER, "strict": False},
            {
                "type": "namespace",
                "name": "mcp__files__",
                "description": "File tools",
                "tools": [
                    {
                        "type": "function",
                        "name": "list_dir",
                        "description": "List a directory",
                        "parameters": {
                            "type": "object",
                            "properties": {"path": {"type": "string"}},
                        },
                        "strict": False,
                    }
                ],
            },
            {"type": "web_search", "external_web_access": False},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "019a-conversation",
        "client_metadata": {"x": "y"},
    }
    got = events(post(stack, body))
    prompt = stack.fake.requests[-1]["prompt"]
    assert "You are Codex." in prompt and '"name": "list_dir"' in prompt
    assert '"name": "get_weather"' in prompt and "web_search" not in prompt
    final = got[-1]["response"]
    assert final["status"] == "completed" and final["store"] is False
    assert final["parallel_tool_calls"] is False
    (call,) = final["output"]
    assert call["type"] == "function_call" and call["name"] == "list_dir"
    assert call["namespace"] == "mcp__files__"
    assert [t["name"] for t in final["tools"]] == ["get_weather", "list_dir"]


CODEX_INPUT = [
    {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "d1"}]},
    {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "d2"}]},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "u1"}]},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "u2"}]},
]


def test_codex_input_renders_with_a_template_that_insists_on_alternating_roles(
    make_stack: Any,
) -> None:
    # Before: Codex's two developer and two user messages in a row were passed as four turns,
    # and Gemma 3's template refused them (400 invalid_chat_template_input).
    stack = make_stack(chat_template="gemma3")
    response = post(stack, {"model": "m", "input": CODEX_INPUT, "instructions": "i"})
    assert response.status_code == 200, response.text
    prompt = stack.fake.requests[-1]["prompt"]
    assert "i\n\nd1\n\nd2\n\nu1\n\nu2" in prompt


def test_tools_policy_drop_applies(make_stack: Any) -> None:
    stack = make_stack(tools_policy="drop")  # the fake's ChatML cannot express tools
    response = post(stack, {"model": "m", "input": "Hi", "tools": [WEATHER]})
    assert response.status_code == 200 and response.headers["x-tools-dropped"] == "1"
    assert response.json()["output"][0]["content"][0]["text"] == HELLO


def test_tools_policy_refuse_is_a_400(stack: Stack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", input="Hi", tools=[WEATHER])  # type: ignore[list-item]
    assert caught.value.code == "tools_not_supported"


# -- (3) text.format ---------------------------------------------------------------------------


def test_text_format_json_schema_reaches_llamacpp(stack: Stack, client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    stack.fake.script.tokens = ['{"a": ', "1}"]
    response = client.responses.create(  # type: ignore[call-overload]
        model="m",
        input="json please",
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
    )
    assert stack.fake.requests[-1]["json_schema"] == schema
    assert json.loads(response.output_text) == {"a": 1}
    assert response.text.format.type == "json_schema"
    client.responses.create(model="m", input="json", text={"format": {"type": "json_object"}})
    assert stack.fake.requests[-1]["json_schema"] == {"type": "object"}
    client.responses.create(model="m", input="plain", text={"format": {"type": "text"}})
    assert "json_schema" not in stack.fake.requests[-1]


def test_a_text_format_llamacpp_cannot_build_is_named_as_this_protocol_names_it(
    stack: Stack, client: openai.OpenAI
) -> None:
    """Regression: the 400 named 'response_format', a field the Responses API does not have."""
    schema = {"type": "string", "minLength": 5, "maxLength": 2}  # hangs llama.cpp's builder
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(  # type: ignore[call-overload]
            model="m",
            input="json please",
            text={"format": {"type": "json_schema", "name": "thing", "schema": schema}},
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["param"], error["code"]) == ("text.format", "invalid_json_schema"), error
    assert error["message"].startswith("'text.format' "), error
    assert not stack.fake.requests


# -- (4) errors, limits, charges ------------------------------------------------------------------


def test_typed_errors_on_one_client(stack: Stack) -> None:
    with (
        stack.client(key="sk-wrong-key-0123456789") as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.responses.create(model="m", input="Hi")
    with stack.client() as client:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"previous_response_id": "resp_1"}, "previous_response_id"),
            ({"input": None}, "input"),
            (
                {
                    "input": [
                        {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_image", "image_url": "x"}],
                        }
                    ]
                },
                "input[0].content[0].type",
            ),
            ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
            ({"max_output_tokens": 0}, "max_output_tokens"),
            ({"max_output_tokens": 10**6}, "max_output_tokens"),
            ({"temperature": 3}, "temperature"),
            ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
            ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
            ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
            ({"store": "yes"}, "store"),
        ]
        for extra, param in cases:
            body = {"model": "m", "input": "Hi", **extra}
            if body["input"] is None:
                del body["input"]
            with pytest.raises(openai.BadRequestError) as caught:
                client.responses.create(**body)
            assert caught.value.param == param, (extra, caught.value.body)
            assert_schema({"error": caught.value.body}, "ErrorResponse")
        # The server keeps serving the same client.
        assert client.responses.create(model="m", input="Hi").output_text == HELLO


def test_previous_response_id_says_to_send_the_whole_input(stack: Stack) -> None:
    response = post(stack, {"model": "m", "input": "Hi", "previous_response_id": "resp_1"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "previous_response_id"
    assert "send the whole conversation in 'input'" in error["message"]


def test_rate_limit_is_a_typed_429(stack: Stack) -> None:
    with stack.client(key=LIMITED_KEY) as client:
        for _ in range(3):  # the limited key's window holds 3 requests
            client.responses.create(model="m", input="x")
        with pytest.raises(openai.RateLimitError) as caught:
            client.responses.create(model="m", input="x")
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_context_overflow_is_openais_400(stack: Stack, client: openai.OpenAI) -> None:
    stack.fake.script.n_ctx = 8
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="m", input="x" * 200, stream=stream)
        assert caught.value.code == "context_length_exceeded"


def test_charges_ledger_and_metrics(make_stack: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice-secret-1"\ntokens_per_minute = 10000\n')
    db = tmp_path / "usage.db"
    stack = make_stack(api_keys_file=keys, usage_db=db)
    with stack.client(key="sk-alice-secret-1") as client:
        first = client.responses.create(model="m", input="Hi", max_output_tokens=64)
        assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("alice") == 0)
        raw = client.responses.with_raw_response.create(model="m", input="Hi", max_output_tokens=64)
        streamed = [e for e in client.responses.create(model="m", input="Hi", stream=True)]
    assert first.usage is not None
    used = first.usage.total_tokens
    estimate = raw.http_request.headers.get("content-length")
    assert estimate is not None
    reserved = -(-int(estimate) // 4) + 64
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(10000 - used - reserved)
    final = streamed[-1].response
    ledger = stack.ctx.usage
    assert ledger is not None
    assert stack.wait_for(lambda: ledger.recorded == 3)
    assert ledger.flush()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT key, endpoint, status, prompt_tokens, completion_tokens, ttft FROM usage "
            "ORDER BY time"
        ).fetchall()
    assert [r[:3] for r in rows] == [("alice", "/v1/responses", 200)] * 3
    assert rows[0][3:5] == (first.usage.input_tokens, first.usage.output_tokens)
    assert rows[2][3:5] == (final.usage.input_tokens, final.usage.output_tokens)
    assert rows[2][5] is not None  # the streamed one has a time to first token
    metrics = stack.http.get("/metrics").text
    assert (
        'llamacpp_proxy_requests_total{endpoint="/v1/responses",key="alice",model="default",'
        'status="200"} 3.0' in metrics
    )


# -- the parser, without a server ------------------------------------------------------------------


def test_parser_maps_fields() -> None:
    parsed = door.parse_responses_request(
        {
            "model": "m",
            "instructions": "sys",
            "input": [
                {"role": "user", "content": "q"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "a"}],
                },
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": 1}'},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": ""},
                {"type": "function_call_output", "call_id": "c1", "output": "r1"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "r2"}],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": "required",
            "max_output_tokens": 7,
            "store": True,
        }
    )
    request = parsed.request
    assert request.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "a",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                {"id": "c2", "type": "function", "function": {"name": "f", "arguments": {}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
    ]
    assert request.tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert request.tool_choice == "required" and request.max_tokens == 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": 3}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
            "input[0].arguments",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
        ({"input": [{"type": "computer_call_output"}]}, "input[0].type"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "tools": [{"type": "bogus"}]}, "tools[0].type"),
        (
            {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": []}]},
            "tools[0].parameters",
        ),
        (
            {"input": "x", "tools": [{"type": "namespace", "name": "n", "tools": 1}]},
            "tools[0].tools",
        ),
        ({"input": "x", "tools": [WEATHER, WEATHER]}, "tools[1].name"),
        ({"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"input": "x", "include": "all"}, "include"),
        ({"input": "x", "reasoning": "high"}, "reasoning"),
        ({"input": "x", "stream": "yes"}, "stream"),
        ({"input": "x", "instructions": ["a"]}, "instructions"),
    ],
)
def test_parser_names_the_bad_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        door.parse_responses_request(body)
    assert caught.value.param == param
    assert caught.value.status == 400


def test_adjacent_messages_of_one_role_are_merged() -> None:
    parsed = door.parse_responses_request({"input": CODEX_INPUT, "instructions": "i"})
    assert parsed.request.messages == [
        {"role": "system", "content": "i\n\nd1\n\nd2"},
        {"role": "user", "content": "u1\n\nu2"},
    ]
    calls = door.parse_responses_request(
        {
            "input": [
                {"role": "user", "content": "q"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"role": "assistant", "content": "after the call"},
            ]
        }
    )
    assert [m["role"] for m in calls.request.messages] == ["user", "assistant", "assistant"]


def test_hosted_tools_are_dropped_not_refused() -> None:
    parsed = door.parse_responses_request(
        {
            "input": "x",
            "tools": [
                {"type": "web_search"},
                {"type": "file_search", "vector_store_ids": []},
                {"type": "image_generation"},
            ],
        }
    )
    assert parsed.request.tools is None and parsed.echo["tools"] == []
