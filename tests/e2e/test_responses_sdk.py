"""The official `openai` SDK's Responses API (`client.responses`) against the proxy in front
of a real llama-server (SmolLM2-135M-Instruct). Generations are short and greedy."""

from __future__ import annotations

import json

import openai
import pytest

from tests.test_responses import assert_event_schema

from .conftest import MODEL

pytestmark = pytest.mark.e2e


def test_create(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(
        model=MODEL,
        instructions="You are terse.",
        input="Say hello.",
        max_output_tokens=8,
        temperature=0,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.usage is not None and 0 < response.usage.output_tokens <= 8
    assert response.usage.input_tokens > 10


NAME_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}},
    "required": ["name"],
    "additionalProperties": False,
}
NAME_FORMAT = {"format": {"type": "json_schema", "name": "person", "schema": NAME_SCHEMA}}


def test_streamed(openai_client: openai.OpenAI) -> None:
    kinds: list[str] = []
    text = ""
    for event in openai_client.responses.create(
        model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0, stream=True
    ):
        assert_event_schema(event.model_dump(mode="json", exclude_unset=True))
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert text.strip()


def test_streamed_with_the_sdk_helper(openai_client: openai.OpenAI) -> None:
    # The SDK's helper has a final response only once completed, and this small model
    # rambles: the JSON schema makes its answer end (the grammar closes the object).
    with openai_client.responses.stream(
        model=MODEL,
        input="Give a name as JSON.",
        max_output_tokens=40,
        temperature=0,
        text=NAME_FORMAT,  # type: ignore[arg-type]
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == "".join(deltas)
    assert set(json.loads(final.output_text)) == {"name"}


def test_text_format_json_schema(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(
        model=MODEL,
        input="Give a name as JSON.",
        max_output_tokens=40,
        temperature=0,
        text=NAME_FORMAT,  # type: ignore[arg-type]
    )
    assert response.status == "completed", response.incomplete_details
    value = json.loads(response.output_text)
    assert set(value) == {"name"} and isinstance(value["name"], str)
