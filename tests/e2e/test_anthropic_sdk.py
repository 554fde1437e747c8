"""The official `anthropic` SDK against the proxy in front of a real llama-server
(SmolLM2-135M-Instruct, whose own ChatML template cannot express tools).

Generations are short and greedy (temperature 0). The tools test runs a second proxy with
`--tools-policy drop`, the setting a small model behind Claude Code needs: its 24 tool
schemas (about 76 KB) would not fit an 8k context even if the template could render them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.conftest import UNLIMITED_KEY

from .conftest import Service, child_env, console_script, start_service

pytestmark = pytest.mark.e2e

HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def drop_proxy(
    request: pytest.FixtureRequest, llama_server: Service, e2e_logs: Path
) -> Iterator[Service]:
    """A proxy in front of the SmolLM2 server that drops tools its template cannot express."""
    env = child_env(UNLIMITED_API_KEY=UNLIMITED_KEY)

    def argv(port: int) -> list[str]:
        return [
            console_script(),
            "--llamacpp-server",
            llama_server.url,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--tools-policy",
            "drop",
            "--max-tokens-limit",
            "32",  # Claude Code's max_tokens 32000 is capped to it: a short answer
            "--shutdown-timeout",
            "5",
        ]

    service = start_service(
        request.config, "proxy-chatml-drop", argv, "/health/ready", e2e_logs, timeout=30, env=env
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(proxy: Service) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=proxy.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=60
    ) as c:
        yield c


def test_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="smollm2",
        max_tokens=8,
        system="You are terse.",
        messages=HI,  # type: ignore[arg-type]
        extra_body={"temperature": 0},  # the SDK no longer takes it as an argument
    )
    assert message.type == "message" and message.id.startswith("msg_")
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 0 < message.usage.output_tokens <= 8
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 10


def test_message_stream_and_count_tokens(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="smollm2",
        max_tokens=8,
        messages=HI,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason in ("end_turn", "max_tokens")
    counted = client.messages.count_tokens(model="smollm2", messages=HI)  # type: ignore[arg-type]
    total = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == total  # llama.cpp's tokenizer, the same rendered prompt


def test_wrong_key_is_a_typed_401(proxy: Service) -> None:
    wrong = anthropic.Anthropic(base_url=proxy.url, api_key="sk-wrong", max_retries=0)
    with wrong as c, pytest.raises(anthropic.AuthenticationError):
        c.messages.create(model="smollm2", max_tokens=4, messages=HI)  # type: ignore[arg-type]


def test_claude_code_shaped_stream_with_tools_dropped(drop_proxy: Service) -> None:
    """A tool turn as Claude Code sends it (Bearer, ?beta=true, system blocks, tools, a
    tool_result coming back), streamed; the tools are dropped and the model answers."""
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "stream": True,
        "temperature": 0,
        "system": [
            {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}
        ],
        "tools": [
            {
                "name": "Read",
                "description": "Read a file",
                "input_schema": {
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "type": "object",
                    "properties": {"path": {"type": "string"}},
                    "additionalProperties": False,
                },
            }
        ],
        "messages": [
            {"role": "user", "content": "What is in notes.txt?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "Read",
                        "input": {"path": "notes.txt"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "buy milk"}
                ],
            },
        ],
        "thinking": {"type": "adaptive"},
        "metadata": {"user_id": json.dumps({"session_id": "e2e"})},
    }
    headers = {"Authorization": f"Bearer {UNLIMITED_KEY}", "anthropic-version": "2023-06-01"}
    with httpx.Client(base_url=drop_proxy.url, timeout=120) as http:
        response = http.post("/v1/messages?beta=true", json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-tools-dropped"] == "1"
    names = [
        line[len("event: ") :] for line in response.text.splitlines() if line.startswith("event: ")
    ]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
