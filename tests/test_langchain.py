"""LangChain's ChatOpenAI, unchanged, through the proxy: invoke, stream, tools."""

from __future__ import annotations

from typing import Any

import langchain_openai

from .conftest import UNLIMITED_KEY, Stack
from .test_api import FULL_TEXT
from .test_compat import QWEN_CALL, WEATHER_TOOL


def chat_model(stack: Stack, **kwargs: Any) -> Any:
    return langchain_openai.ChatOpenAI(
        base_url=stack.url + "/v1", api_key=UNLIMITED_KEY, model="local", max_retries=0, **kwargs
    )


def test_invoke_and_stream(stack: Stack) -> None:
    llm = chat_model(stack, temperature=0.3, max_tokens=20)
    reply = llm.invoke([("system", "Be brief."), ("human", "Hi there")])
    assert reply.content == FULL_TEXT
    sent = stack.fake.requests[-1]
    assert sent["temperature"] == 0.3 and sent["n_predict"] == 20
    assert "<|im_start|>system\nBe brief.<|im_end|>" in sent["prompt"]
    pieces = [chunk.content for chunk in llm.stream("Hi")]
    assert "".join(pieces) == FULL_TEXT
    assert len([p for p in pieces if p]) > 1  # really streamed, token by token


def test_bind_tools(make_stack: Any) -> None:
    stack = make_stack(chat_template="qwen2.5")
    stack.fake.script.tokens = QWEN_CALL
    llm = chat_model(stack).bind_tools([WEATHER_TOOL])
    reply = llm.invoke("Weather in Paris?")
    assert reply.tool_calls == [
        {
            "name": "get_weather",
            "args": {"city": "Paris"},
            "id": reply.tool_calls[0]["id"],
            "type": "tool_call",
        }
    ]
    streamed = None
    for chunk in llm.stream("Weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None
    assert streamed.tool_calls[0]["name"] == "get_weather"
    assert streamed.tool_calls[0]["args"] == {"city": "Paris"}
