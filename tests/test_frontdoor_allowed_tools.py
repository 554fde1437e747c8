"""`tool_choice: {"type": "allowed_tools"}` (chat completions and Responses, in OpenAI's
schemas): only the listed tools are offered, and `required` forces a call of one of them,
never of a tool the client ruled out. Driven by the official `openai` SDK."""

from __future__ import annotations

from typing import Any

from .conftest import Stack

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}}
NAMES = ("get_weather", "delete_everything")


def forced_names(stack: Stack) -> set[str]:
    """The tool names the forced-call schema llama.cpp received lets the model call."""
    schema = stack.fake.requests[-1]["json_schema"]
    options = schema.get("anyOf", [schema])
    return {option["properties"]["name"]["const"] for option in options}


def test_chat_allowed_tools_offers_and_forces_only_those_listed(make_stack: Any) -> None:
    stack: Stack = make_stack(chat_template="qwen2.5")
    client = stack.client()
    tools: Any = [
        {"type": "function", "function": {"name": n, "parameters": PARAMS}} for n in NAMES
    ]
    choice: Any = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        },
    }
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice=choice
    )
    assert forced_names(stack) == {"get_weather"}
    assert "delete_everything" not in stack.fake.requests[-1]["prompt"]
    # mode auto: the listed tools, offered, nothing forced.
    choice["allowed_tools"]["mode"] = "auto"
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice=choice
    )
    prompt = stack.fake.requests[-1]["prompt"]
    assert "get_weather" in prompt and "delete_everything" not in prompt
    assert "json_schema" not in stack.fake.requests[-1]


def test_responses_allowed_tools_forces_only_those_listed(make_stack: Any) -> None:
    stack: Stack = make_stack(chat_template="qwen2.5")
    tools: Any = [{"type": "function", "name": n, "parameters": PARAMS} for n in NAMES]
    choice: Any = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "get_weather"}],
    }
    response = stack.client().responses.create(
        model="m", input="hi", tools=tools, tool_choice=choice
    )
    assert forced_names(stack) == {"get_weather"}
    assert "delete_everything" not in stack.fake.requests[-1]["prompt"]
    # The answer still echoes the request's tools, as OpenAI's does.
    assert [t.name for t in response.tools if t.type == "function"] == list(NAMES)
