"""The front doors' streams as the official SDKs' stream helpers consume them
(`chat.completions.stream`, `responses.stream`, anthropic's `messages.stream` with
`get_final_message()`), each on one kept-alive client against the fake llama.cpp: what the
helper assembles must be what the same request answers unstreamed."""

from __future__ import annotations

import asyncio

from .conftest import Stack
from .fake_llamacpp import DEFAULT_TOKENS

HELLO = "".join(DEFAULT_TOKENS)
CHAT = [{"role": "user", "content": "Weather in Paris, and the time?"}]


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
