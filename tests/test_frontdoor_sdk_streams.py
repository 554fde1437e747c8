"""The front doors' streams as the official SDKs' stream helpers consume them
(`chat.completions.stream`, `responses.stream`, anthropic's `messages.stream` with
`get_final_message()`), each on one kept-alive client against the fake llama.cpp: what the
helper assembles must be what the same request answers unstreamed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import pytest

from .conftest import UNLIMITED_KEY, Stack
from .fake_llamacpp import DEFAULT_TOKENS

HELLO = "".join(DEFAULT_TOKENS)
CHAT = [{"role": "user", "content": "Weather in Paris, and the time?"}]
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}}
# A Hermes/Qwen answer with text before two calls, split over many events as llama.cpp
# sends it (one piece per token).
TEXT_THEN_CALLS = [
    "Let me",
    " check. <",
    "tool_",
    "call>",
    '\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}',
    "\n</tool_call>\n<tool_call>",
    '{"name": "get_time", "arguments": {}}',
    "</tool_call>",
]
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_n_streamed_choices_assemble_whichever_opens_first(stack: Stack) -> None:
    # Choice 0 (seed 7) is held until choice 1 (seed 8) has streamed text: its first chunk
    # comes first. The SDK's helper appends a choice at its first chunk and indexes it by
    # position, so this crashed it (IndexError) before every role chunk went out in order.
    gate = stack.runner.call(asyncio.Event)
    stack.fake.script.seed_gates[7] = gate
    client = stack.client()
    try:
        with client.chat.completions.stream(
            model="m", messages=CHAT, n=2, seed=7, stream_options={"include_usage": True}
        ) as stream:
            for event in stream:
                if event.type == "chunk" and any(
                    c.index == 1 and c.delta.content for c in event.chunk.choices
                ):
                    stack.runner.call(gate.set)
            final = stream.get_final_completion()
    finally:
        stack.runner.call(gate.set)  # a failure still lets the fake end
    assert gate.is_set()  # choice 1 did stream first
    assert [c.index for c in final.choices] == [0, 1]
    assert [c.message.content for c in final.choices] == [HELLO, HELLO]
    assert [c.finish_reason for c in final.choices] == ["stop", "stop"]
    assert final.usage is not None and final.usage.completion_tokens == 2 * len(DEFAULT_TOKENS)
    # The same client goes on serving.
    assert client.chat.completions.create(model="m", messages=CHAT).choices[0].message.content


def chat_answer(stack: Stack, stream: bool) -> tuple[str, list[tuple[str, Any]], str]:
    client = stack.client()
    tools: Any = [
        {"type": "function", "function": {"name": name, "parameters": PARAMS}} for name, _ in CALLS
    ]
    if stream:
        with client.chat.completions.stream(model="m", messages=CHAT, tools=tools) as s:
            for _ in s:
                pass
            choice = s.get_final_completion().choices[0]
    else:
        choice = client.chat.completions.create(model="m", messages=CHAT, tools=tools).choices[0]
    calls = [
        (c.function.name, json.loads(c.function.arguments))
        for c in choice.message.tool_calls or []
        if c.type == "function"
    ]
    return (choice.message.content or "").strip(), calls, str(choice.finish_reason)


def responses_answer(stack: Stack, stream: bool) -> tuple[str, list[tuple[str, Any]], str]:
    client = stack.client()
    tools: Any = [{"type": "function", "name": name, "parameters": PARAMS} for name, _ in CALLS]
    if stream:
        with client.responses.stream(model="m", input="Weather?", tools=tools) as s:
            for _ in s:
                pass
            response = s.get_final_response()
    else:
        response = client.responses.create(model="m", input="Weather?", tools=tools)
    calls = [
        (item.name, json.loads(item.arguments))
        for item in response.output
        if item.type == "function_call"
    ]
    return response.output_text.strip(), calls, response.status or ""


def messages_answer(stack: Stack, stream: bool) -> tuple[str, list[tuple[str, Any]], str]:
    tools: Any = [{"name": name, "input_schema": PARAMS} for name, _ in CALLS]
    with anthropic.Anthropic(
        base_url=stack.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=20
    ) as client:
        kwargs: Any = {"model": "m", "max_tokens": 64, "messages": CHAT, "tools": tools}
        if stream:
            with client.messages.stream(**kwargs) as s:
                message = s.get_final_message()
        else:
            message = client.messages.create(**kwargs)
    text = "".join(b.text for b in message.content if b.type == "text")
    calls = [(b.name, b.input) for b in message.content if b.type == "tool_use"]
    return text.strip(), calls, str(message.stop_reason)


@pytest.mark.parametrize("answer", [chat_answer, responses_answer, messages_answer])
def test_text_before_a_hermes_call_is_a_call_streamed_as_unstreamed(
    make_stack: Any, answer: Any
) -> None:
    # Unstreamed, the text before a <tool_call> block was already content and the blocks
    # calls; streamed, the calls went out as text (a client, Claude Code, never ran them).
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = TEXT_THEN_CALLS
    unstreamed = answer(stack, stream=False)
    assert unstreamed[0] == "Let me check." and unstreamed[1] == CALLS
    assert answer(stack, stream=True) == unstreamed
