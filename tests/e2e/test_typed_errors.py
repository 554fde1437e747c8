"""Typed errors through the official SDKs against the gateway in front of a real llama-server
(SmolLM2-135M, a 2048-token context shared by 2 slots): 401, 429 with Retry-After, a 400
naming the malformed field, and a prompt longer than llama.cpp's real context answered as a
400 in each protocol's own words (Anthropic's "prompt is too long", OpenAI's
`context_length_exceeded`), streamed or not: Claude Code and Codex always stream. Every
client is kept alive through its errors and must go on working.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import UNLIMITED_KEY

from .conftest import MODEL, Service, child_env, console_script, start_service

pytestmark = pytest.mark.e2e

RPM_KEY = "sk-e2e-one-request-a-minute"  # requests = 1 a minute
TPM_KEY = "sk-e2e-tiny-token-budget-01"  # tokens_per_minute = TPM
TPM = 150
HI: Any = [{"role": "user", "content": "Say hello."}]
# About 3000 tokens: over llama.cpp's context whatever its split into slots.
TOO_LONG = "hello " * 3000


@pytest.fixture(scope="module")
def keyed_proxy(
    request: pytest.FixtureRequest, llama_server: Service, e2e_logs: Path
) -> Iterator[Service]:
    """A proxy in front of the SmolLM2 server with a key file of tiny budgets."""
    keys = e2e_logs / "typed-errors-keys.toml"
    keys.write_text(
        f'[keys.unlimited]\nkey = "{UNLIMITED_KEY}"\n\n'
        f'[keys.rpm]\nkey = "{RPM_KEY}"\nrequests = 1\nwindow = 60\n\n'
        f'[keys.tpm]\nkey = "{TPM_KEY}"\ntokens_per_minute = {TPM}\n'
    )
    env = child_env()

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
            "--api-keys-file",
            str(keys),
            "--shutdown-timeout",
            "5",
        ]

    service = start_service(
        request.config, "proxy-keyed", argv, "/health/ready", e2e_logs, timeout=30, env=env
    )
    yield service
    service.stop()


def claude(proxy: Service, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, timeout=120)


def gpt(proxy: Service, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=120)


# -- Anthropic Messages ---------------------------------------------------------------------


def test_anthropic_401(keyed_proxy: Service) -> None:
    with claude(keyed_proxy, "sk-e2e-not-a-key-000") as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            client.messages.create(model=MODEL, max_tokens=4, messages=HI)
        assert caught.value.status_code == 401
        assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.count_tokens(model=MODEL, messages=HI)


def test_anthropic_429_with_retry_after(keyed_proxy: Service) -> None:
    with claude(keyed_proxy, RPM_KEY) as client:
        raw = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=4, messages=HI, extra_body={"temperature": 0}
        )
        assert raw.parse().content
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "1"
        assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
        # Streamed, as Claude Code asks: the refusal comes before any event.
        with (
            pytest.raises(anthropic.RateLimitError) as caught,
            client.messages.stream(model=MODEL, max_tokens=4, messages=HI) as stream,
        ):
            stream.get_final_message()
    response = caught.value.response
    assert response.status_code == 429
    # Whole seconds rounded up past the moment the window frees room (never early): a
    # minute's window can say 61 when the refusal comes within a millisecond of the charge.
    assert 1 <= int(response.headers["retry-after"]) <= 61
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_anthropic_400_names_the_field_and_overflow_is_anthropics(
    keyed_proxy: Service,
) -> None:
    with claude(keyed_proxy, UNLIMITED_KEY) as client:
        with pytest.raises(anthropic.BadRequestError) as bad_role:
            client.messages.create(
                model=MODEL,
                max_tokens=4,
                messages=[{"role": "tool", "content": "x"}],  # type: ignore[typeddict-item]
            )
        error = bad_role.value.body["error"]  # type: ignore[index]
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith("messages.0.role"), error
        with pytest.raises(anthropic.BadRequestError) as bad_temperature:
            client.messages.create(
                model=MODEL, max_tokens=4, messages=HI, extra_body={"temperature": 1.5}
            )
        assert bad_temperature.value.body["error"]["message"].startswith("temperature")  # type: ignore[index]

        too_long: Any = [{"role": "user", "content": TOO_LONG}]
        counted = client.messages.count_tokens(model=MODEL, messages=too_long).input_tokens
        with pytest.raises(anthropic.BadRequestError) as overflow:
            client.messages.create(model=MODEL, max_tokens=4, messages=too_long)
        with (
            pytest.raises(anthropic.BadRequestError) as streamed,
            client.messages.stream(model=MODEL, max_tokens=4, messages=too_long) as stream,
        ):
            stream.get_final_message()
        for caught in (overflow, streamed):
            error = caught.value.body["error"]  # type: ignore[index]
            assert caught.value.body["type"] == "error"  # type: ignore[index]
            assert error["type"] == "invalid_request_error"
            # Anthropic's words, with llama.cpp's counts: "prompt is too long: N tokens > M maximum"
            assert error["message"].startswith(f"prompt is too long: {counted} tokens > "), error
        # The same client goes on working.
        assert client.messages.create(model=MODEL, max_tokens=4, messages=HI).content


# -- OpenAI Responses -----------------------------------------------------------------------


def test_responses_401(keyed_proxy: Service) -> None:
    with (
        gpt(keyed_proxy, "sk-e2e-not-a-key-000") as client,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=4)
    assert caught.value.status_code == 401


def test_responses_429_with_retry_after(keyed_proxy: Service) -> None:
    # The budget holds one short request: its estimate (body bytes / 4 + max_output_tokens)
    # fits, and what llama.cpp really counted leaves no room for a second one.
    instructions = "You are a helpful assistant. Answer in one short sentence. " * 4
    kwargs: Any = {
        "model": MODEL,
        "instructions": instructions,
        "input": "Say hello.",
        "max_output_tokens": 8,
        "temperature": 0,
    }
    with gpt(keyed_proxy, TPM_KEY) as client:
        raw = client.responses.with_raw_response.create(**kwargs)
        first = raw.parse()
        assert first.usage is not None and first.usage.total_tokens > 0
        assert raw.headers["x-ratelimit-limit-tokens"] == str(TPM)
        with pytest.raises(openai.RateLimitError) as caught:
            for _ in client.responses.create(**kwargs, stream=True):
                pass
    response = caught.value.response
    assert response.status_code == 429
    # Whole seconds rounded up past the moment the window frees room (never early): a
    # minute's window can say 61 when the refusal comes within a millisecond of the charge.
    assert 1 <= int(response.headers["retry-after"]) <= 61
    assert caught.value.code == "tokens_rate_limit_exceeded"


def test_responses_400_names_the_field_and_overflow_is_openais(keyed_proxy: Service) -> None:
    with gpt(keyed_proxy, UNLIMITED_KEY) as client:
        with pytest.raises(openai.BadRequestError) as bad_tokens:
            client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=0)
        assert bad_tokens.value.param == "max_output_tokens"
        with pytest.raises(openai.BadRequestError) as stateful:
            client.responses.create(model=MODEL, input="Say hello.", previous_response_id="r")
        assert stateful.value.param == "previous_response_id"
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as overflow:
                client.responses.create(
                    model=MODEL, input=TOO_LONG, max_output_tokens=4, stream=stream
                )
            assert overflow.value.code == "context_length_exceeded"
            assert "maximum context length" in overflow.value.message
        # The same client goes on working.
        answer = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=4)
        assert answer.output_text
