"""The default model answers like an assistant through the proxy: factual questions get the
right answer, and a short task ends by itself. A broken template, a doubled or missing BOS,
or a model that does not follow chat turns fails here instead of producing gibberish nobody
reads (issue 15: the quickstart's Gemma 3 270M base model answered a haiku request with
"staan\\nThe sea is the land. staan")."""

from __future__ import annotations

import openai
import pytest

from .conftest import MODEL

pytestmark = pytest.mark.e2e

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is the capital of France?", "paris"),
        ("What is the capital of Germany?", "berlin"),
        ("What is the capital of Japan?", "tokyo"),
    ],
)
def test_factual_questions_get_the_right_answer(
    openai_client: openai.OpenAI, question: str, expected: str
) -> None:
    reply = openai_client.chat.completions.create(
        model=MODEL,
        messages=[SYSTEM, {"role": "user", "content": question}],  # type: ignore[list-item]
        max_tokens=48,
        temperature=0,
    )
    answer = reply.choices[0].message.content or ""
    assert expected in answer.lower(), answer
    assert reply.choices[0].finish_reason == "stop", answer  # it ends by itself


def test_the_quickstarts_haiku_request_ends_by_itself(openai_client: openai.OpenAI) -> None:
    reply = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=48,
        temperature=0,
    )
    answer = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop", answer
    assert "sea" in answer.lower() or "ocean" in answer.lower(), answer
    assert "<|im" not in answer and "staan" not in answer, answer
