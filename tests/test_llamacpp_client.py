"""The upstream client on its own, in the test's event loop (pytest-tornado)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llamacpp_proxy.config import Settings
from llamacpp_proxy.errors import InvalidRequest, UpstreamTimeout, UpstreamUnavailable
from llamacpp_proxy.frontdoor.openai_request import parse_chat_request, parse_text_request
from llamacpp_proxy.upstream.llamacpp import ClientGone, LlamaCppClient

from .fake_llamacpp import DEFAULT_TOKENS, FakeLlamaCpp


@pytest.fixture
def local_fake(io_loop: Any) -> Iterator[FakeLlamaCpp]:
    fake = FakeLlamaCpp()
    fake.start()
    yield fake
    fake.stop()


def make_client(url: str, **kw: Any) -> LlamaCppClient:
    return LlamaCppClient(Settings(llamacpp_server=url, **kw))


@pytest.mark.gen_test
async def test_stream_calls_back_once_per_read_with_every_event(local_fake: FakeLlamaCpp) -> None:
    local_fake.script.mode = "merge"
    client = make_client(local_fake.url)
    reads: list[list[dict[str, Any]]] = []
    opened = []
    await client.stream(
        {"prompt": "x", "stream": True},
        client.new_call(),
        lambda: opened.append(True),
        reads.append,
    )
    events = [e for read in reads for e in read]
    assert opened == [True]
    assert [e["content"] for e in events[:-1]] == DEFAULT_TOKENS
    assert events[-1]["stop"] is True
    assert len(reads) < len(events)  # merged events arrive together
    client.close()


@pytest.mark.gen_test
async def test_abort_closes_the_upstream_connection(local_fake: FakeLlamaCpp) -> None:
    local_fake.script.token_delay = 0.05
    client = make_client(local_fake.url)
    call = client.new_call()

    def on_events(events: list[dict[str, Any]]) -> None:
        call.abort(ClientGone())

    with pytest.raises(ClientGone):
        await client.stream({"prompt": "x", "stream": True}, call, lambda: None, on_events)
    await local_fake.disconnected.wait()
    client.close()


@pytest.mark.gen_test
async def test_connection_refused_and_timeouts(local_fake: FakeLlamaCpp) -> None:
    client = make_client("http://127.0.0.1:9")
    with pytest.raises(UpstreamUnavailable):
        await client.complete({"prompt": "x"}, client.new_call())
    client.close()
    local_fake.script.stall_before = 1
    client = make_client(local_fake.url, upstream_first_byte_timeout=0.2)
    with pytest.raises(UpstreamTimeout):
        await client.complete({"prompt": "x"}, client.new_call())
    client.close()


@pytest.mark.gen_test
async def test_props_are_cached(local_fake: FakeLlamaCpp) -> None:
    client = make_client(local_fake.url)
    first = await client.props()
    local_fake.script.chat_template = "changed"
    assert await client.props() is first
    client.close()


@pytest.mark.gen_test
async def test_llamacpp_400_is_invalid_request(local_fake: FakeLlamaCpp) -> None:
    client = make_client(local_fake.url)
    with pytest.raises(InvalidRequest, match="Failed to parse grammar"):
        await client.complete({"prompt": "x", "grammar": "nope"}, client.new_call())
    client.close()


def test_completion_body_maps_openai_names_to_llamacpp() -> None:
    client = LlamaCppClient(Settings())
    request = parse_chat_request(
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 9,
            "temperature": 0.5,
            "top_p": 0.8,
            "stop": "END",
            "seed": 10,
            "n": 2,
            "presence_penalty": 1,
            "frequency_penalty": 1,
            "logit_bias": {"42": -100},
            "logprobs": True,
            "top_logprobs": 3,
            "grammar": 'root ::= "a"',
            "top_k": 5,
            "min_p": 0.1,
            "repeat_penalty": 1.1,
            "cache_prompt": True,
        }
    )
    body = client.completion_body(request, "PROMPT", 1)
    assert body == {
        "prompt": "PROMPT",
        "stream": False,
        "n_predict": 9,
        "temperature": 0.5,
        "top_p": 0.8,
        "presence_penalty": 1.0,
        "frequency_penalty": 1.0,
        "seed": 11,
        "stop": ["END"],
        "logit_bias": [[42, -100.0]],
        "n_probs": 3,
        "grammar": 'root ::= "a"',
        "top_k": 5,
        "min_p": 0.1,
        "repeat_penalty": 1.1,
        "cache_prompt": True,
    }
    text = parse_text_request(
        {"prompt": "p", "max_tokens": 4, "response_format": {"type": "json_object"}}
    )
    assert client.completion_body(text, "p", 0) == {"prompt": "p", "stream": False, "n_predict": 4}
