"""POST /v1/embeddings (issue 16): OpenAI's embeddings API through the gateway's pipeline,
against the fake llama.cpp's /v1/embeddings (the real server's protocol, b11434).

Driven as a user would: the official SDK and one kept-alive httpx client per test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import socket
import sqlite3
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamacpp_proxy.frontdoor.embeddings import (
    MAX_INPUT_CHARS,
    MAX_INPUT_TOKENS,
    MAX_INPUTS,
    estimate_tokens,
    parse_embeddings_request,
)
from llamacpp_proxy.route.pools import UpstreamsFileError, parse_upstreams
from llamacpp_proxy.upstream.llamacpp import EMBEDDING_ITEM_BYTES, EMBEDDING_SLACK

from .conftest import (
    LIMITED_KEY,
    UNLIMITED_KEY,
    LoopThread,
    Stack,
    assert_schema,
    start_stack,
    stop_stack,
)
from .fake_llamacpp import FakeLlamaCpp, count_prompt_tokens, embedding_of

AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}


def post(stack: Stack, body: Any, key: str = UNLIMITED_KEY) -> httpx.Response:
    return stack.http.post(
        "/v1/embeddings", content=json.dumps(body), headers={"Authorization": f"Bearer {key}"}
    )


def floats_of(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# -- the API, with the official SDK -------------------------------------------------------


def test_the_sdk_gets_one_vector_per_input_in_floats_and_base64(stack: Stack) -> None:
    client = stack.client()
    texts = ["hello world", "a different text", "hello world"]
    floats = client.embeddings.create(model="m", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert [d.embedding for d in floats.data] == [embedding_of(t, 8) for t in texts]
    assert floats.model == "m" and floats.object == "list"
    tokens = sum(count_prompt_tokens(t, True) for t in texts)  # llama.cpp's own count
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (tokens, tokens)
    # The SDK's default asks for base64 and decodes it: the same floats.
    one = client.embeddings.create(model="m", input="hello world")
    assert [d.embedding for d in one.data] == [embedding_of("hello world", 8)]
    assert one.usage.prompt_tokens == count_prompt_tokens("hello world", True)
    # llama.cpp is asked once per request, in base64, for every input.
    assert stack.fake.embedding_requests == [
        {"input": texts, "encoding_format": "base64"},
        {"input": ["hello world"], "encoding_format": "base64"},
    ]


def test_answers_and_requests_match_openais_schemas(stack: Stack) -> None:
    for body in (
        {"model": "m", "input": "one"},
        {"model": "m", "input": ["one", "two"], "encoding_format": "float", "user": "u-1"},
        {"model": "m", "input": [1, 2, 3]},
        {"model": "m", "input": [[1, 2], [3]], "dimensions": 8},
    ):
        assert_schema(body, "CreateEmbeddingRequest")
        response = post(stack, body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert_schema(response.json(), "CreateEmbeddingResponse")
    raw = post(stack, {"model": "m", "input": ["one", "two"], "encoding_format": "base64"})
    answer = raw.json()
    assert [floats_of(d["embedding"]) for d in answer["data"]] == [
        embedding_of("one", 8),
        embedding_of("two", 8),
    ]
    # OpenAI's schema types the vector as numbers; in base64 it is that string.
    for item in answer["data"]:
        item["embedding"] = floats_of(item["embedding"])
    assert_schema(answer, "CreateEmbeddingResponse")


def test_token_arrays_go_to_llamacpp_as_token_arrays(stack: Stack) -> None:
    client = stack.client()
    one = client.embeddings.create(model="m", input=[5, 6, 7], encoding_format="float")
    assert one.data[0].embedding == embedding_of([5, 6, 7], 8) and one.usage.prompt_tokens == 3
    many = client.embeddings.create(model="m", input=[[5, 6], [7]], encoding_format="float")
    assert [d.embedding for d in many.data] == [embedding_of([5, 6], 8), embedding_of([7], 8)]
    assert many.usage.prompt_tokens == 3
    assert [r["input"] for r in stack.fake.embedding_requests] == [[[5, 6, 7]], [[5, 6], [7]]]


def test_the_unprefixed_path_is_served_too(stack: Stack) -> None:
    r = stack.http.post("/embeddings", json={"model": "m", "input": "x"}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["data"]) == 1


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "m"}, "input", "'input' is required"),
        ({"model": "m", "input": ""}, "input", "empty string"),
        ({"model": "m", "input": []}, "input", "empty array"),
        ({"model": "m", "input": ["a", ""]}, "input", "'input[1]' is an empty string"),
        ({"model": "m", "input": [[1], []]}, "input", "'input[1]' is an empty array of tokens"),
        ({"model": "m", "input": ["a"] * (MAX_INPUTS + 1)}, "input", f"limit is {MAX_INPUTS}"),
        ({"model": "m", "input": [1] * (MAX_INPUT_TOKENS + 1)}, "input", "limit is 8192"),
        ({"model": "m", "input": "a" * (MAX_INPUT_CHARS + 1)}, "input", "characters"),
        ({"model": "m", "input": ["a", [1]]}, "input", "must not mix"),
        ({"model": "m", "input": [1, "a"]}, "input", "token ids"),
        ({"model": "m", "input": [-1]}, "input", "token ids"),
        ({"model": "m", "input": [2**31]}, "input", "token ids"),
        ({"model": "m", "input": 5}, "input", "not int"),
        ({"model": "m", "input": [True]}, "input", "bool"),
        ({"model": "m", "input": "a", "encoding_format": "int8"}, "encoding_format", "'float'"),
        ({"model": "m", "input": "a", "dimensions": 0}, "dimensions", "positive integer"),
        ({"model": "m", "input": "a", "dimensions": "8"}, "dimensions", "positive integer"),
        ({"model": "m", "input": "a", "user": 5}, "user", "must be a string"),
        ({"model": 5, "input": "a"}, "model", "must be a string"),
    ],
)
def test_bad_bodies_are_400s_naming_the_field_and_cost_llamacpp_nothing(
    stack: Stack, body: dict[str, Any], param: str, words: str
) -> None:
    response = post(stack, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"]
    assert stack.fake.embedding_requests == []
    assert post(stack, {"model": "m", "input": "still serving"}).status_code == 200


def test_dimensions_must_be_the_models_size(stack: Stack) -> None:
    client = stack.client()
    same = client.embeddings.create(model="m", input="a", dimensions=8, encoding_format="float")
    assert len(same.data[0].embedding) == 8
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="m", input="a", dimensions=4)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "dimensions"
    assert "have 8 dimensions" in error["message"] and "must be 8" in error["message"]


def test_the_estimate_counts_text_bytes_and_token_ids() -> None:
    assert estimate_tokens(["abcd", "abcde", "é"]) == 1 + 2 + 1
    assert estimate_tokens([[1, 2, 3], [4]]) == 4
    request = parse_embeddings_request({"input": "x", "model": "m", "extra": True})
    assert request.inputs == ["x"] and request.encoding_format == "float"


# -- what llama.cpp refuses, and answers that are not embeddings ---------------------------


def test_a_server_without_embeddings_is_a_clear_400(stack: Stack) -> None:
    stack.fake.script.embeddings = False  # llama-server started without --embeddings
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().embeddings.create(model="m", input="a")
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "embeddings_not_supported"
    assert "--embeddings --pooling mean" in error["message"]


def test_pooling_none_and_an_input_over_the_batch_are_400s(stack: Stack) -> None:
    stack.fake.script.fail_status = 400
    stack.fake.script.fail_body = {
        "error": {
            "code": 400,
            "message": "Pooling type 'none' is not OAI compatible. Please use a different "
            "pooling type",
            "type": "invalid_request_error",
        }
    }
    r = post(stack, {"model": "m", "input": "a"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "embeddings_not_supported"
    assert "--pooling mean" in r.json()["error"]["message"]
    stack.fake.script.fail_status = None
    stack.fake.script.n_batch = 4  # llama.cpp answers this one with a 500
    r = post(stack, {"model": "m", "input": [1, 2, 3, 4, 5]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert "5 tokens" in error["message"] and "at most 4" in error["message"]


def _item(index: int, embedding: Any) -> dict[str, Any]:
    return {"embedding": embedding, "index": index, "object": "embedding"}


def _b64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


GOOD = _b64([0.5, 0.5])
USAGE = {"prompt_tokens": 2, "total_tokens": 2}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"object": "list", "data": [], "usage": USAGE}, id="too-few"),
        pytest.param(
            {"data": [_item(0, GOOD), _item(1, GOOD), _item(2, GOOD)], "usage": USAGE},
            id="too-many",
        ),
        pytest.param({"data": [_item(0, GOOD), _item(0, GOOD)], "usage": USAGE}, id="same-index"),
        pytest.param({"data": [_item(0, [0.5, 0.5]), _item(1, GOOD)], "usage": USAGE}, id="list"),
        pytest.param(
            {"data": [_item(0, "@@not base64"), _item(1, GOOD)], "usage": USAGE}, id="b64"
        ),
        pytest.param({"data": [_item(0, "AAA="), _item(1, GOOD)], "usage": USAGE}, id="3-bytes"),
        pytest.param(
            {"data": [_item(0, _b64([0.5])), _item(1, GOOD)], "usage": USAGE}, id="widths"
        ),
        pytest.param(
            {"data": [_item(0, _b64([math.nan, 0.5])), _item(1, GOOD)], "usage": USAGE},
            id="nan",
        ),
        pytest.param(
            {"data": [_item(0, _b64([math.inf, 0.5])), _item(1, GOOD)], "usage": USAGE},
            id="inf",
        ),
        pytest.param({"data": [_item(0, GOOD), _item(1, GOOD)]}, id="no-usage"),
        pytest.param(
            {"data": [_item(0, GOOD), _item(1, GOOD)], "usage": {"prompt_tokens": "2"}},
            id="usage-string",
        ),
        pytest.param(b"[1, 2]", id="not-object"),
        pytest.param(b"{not json", id="not-json"),
    ],
)
def test_an_answer_that_is_not_one_vector_per_input_is_a_502(stack: Stack, answer: Any) -> None:
    stack.fake.script.embeddings_answer = answer
    r = post(stack, {"model": "m", "input": ["a", "b"]})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_error"
    assert "/v1/embeddings" in r.json()["error"]["message"]
    stack.fake.script.embeddings_answer = None
    assert post(stack, {"model": "m", "input": ["a", "b"]}).status_code == 200


def test_a_huge_answer_is_a_502_read_no_further_than_the_inputs_allow(stack: Stack) -> None:
    limit = EMBEDDING_SLACK + EMBEDDING_ITEM_BYTES  # one input's worth
    padding = "A" * (limit + 1024)
    stack.fake.script.embeddings_answer = {"data": [_item(0, padding)], "usage": USAGE}
    r = post(stack, {"model": "m", "input": "a"})
    assert r.status_code == 502 and "too large" in r.json()["error"]["message"]
    stack.fake.script.embeddings_answer = None
    assert post(stack, {"model": "m", "input": "a"}).status_code == 200


def test_an_upstream_that_does_not_answer_in_time_is_a_504(make_stack: Any) -> None:
    stack = make_stack(upstream_first_byte_timeout=0.3)
    stack.fake.script.stall_before = 1.0
    r = post(stack, {"model": "m", "input": "a"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"


# -- limits, charges, ledger, metrics -------------------------------------------------------

KEYS = """
[keys.tokens]
key = "sk-embed-tokens-0001"
tokens_per_minute = 100

[keys.pair]
key = "sk-embed-pair-0002"
max_concurrent = 1
"""
TOKENS_KEY, PAIR_KEY = "sk-embed-tokens-0001", "sk-embed-pair-0002"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return path


def test_requests_per_minute_apply(stack: Stack) -> None:
    # The limited key may send 3 requests a minute (conftest).
    for _ in range(3):
        assert post(stack, {"model": "m", "input": "a"}, LIMITED_KEY).status_code == 200
    refused = post(stack, {"model": "m", "input": "a"}, LIMITED_KEY)
    assert refused.status_code == 429 and "retry-after" in refused.headers


def test_tokens_per_minute_are_estimated_then_settled_with_llamacpps_count(
    make_stack: Any, key_file: Path
) -> None:
    stack = make_stack(api_keys_file=key_file)
    # 1000 token ids: over the minute's 100 at admission, and llama.cpp never asked.
    big = post(stack, {"model": "m", "input": list(range(1, 1001))}, TOKENS_KEY)
    assert big.status_code == 429, big.text
    assert stack.fake.embedding_requests == []
    # Text estimated at bytes / 4 (80), charged llama.cpp's count (the fake's: 80 + BOS).
    text = "x" * 320
    ok = post(stack, {"model": "m", "input": text}, TOKENS_KEY)
    assert ok.status_code == 200
    charged = ok.json()["usage"]["prompt_tokens"]
    assert charged == count_prompt_tokens(text, True) == 81
    assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("tokens") == 0)
    probe = post(stack, {"model": "m", "input": [1]}, TOKENS_KEY)
    assert probe.status_code == 200
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) == 100 - charged - 1


def test_max_concurrent_and_the_fair_queue_hold_embeddings_too(
    make_stack: Any, key_file: Path
) -> None:
    stack = make_stack(api_keys_file=key_file)
    gate = stack.runner.call(asyncio.Event)
    stack.fake.script.gate = gate
    with httpx.Client(base_url=stack.url, timeout=20) as other, ThreadPoolExecutor(1) as pool:
        sent = pool.submit(
            other.post,
            "/v1/embeddings",
            json={"model": "m", "input": "held"},
            headers={"Authorization": f"Bearer {PAIR_KEY}"},
        )
        assert stack.wait_for(lambda: len(stack.fake.embedding_requests) == 1)
        # The key's one concurrent request is in llama.cpp: the next is refused at once.
        second = post(stack, {"model": "m", "input": "next"}, PAIR_KEY)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "concurrency_limit_exceeded"
        stack.runner.call(gate.set)
        assert sent.result(20).status_code == 200


def test_a_full_pool_queues_embeddings_in_the_gateway_then_refuses_503(
    make_stack: Any, fake: FakeLlamaCpp
) -> None:
    fake.script.total_slots = 1
    stack = make_stack(max_queue=1)
    router = stack.ctx.routes.pools["default"].router
    key = next(iter(router.pool.servers)).key
    assert stack.wait_for(lambda: getattr(router.upstream(key), "total_slots", None) == 1)
    gate = stack.runner.call(asyncio.Event)
    fake.script.gate = gate
    try:
        with ThreadPoolExecutor(2) as threads:
            running = threads.submit(post, stack, {"model": "m", "input": "first"})
            assert stack.wait_for(lambda: fake.active == 1)
            with httpx.Client(base_url=stack.url, timeout=20) as other:
                queued = threads.submit(
                    other.post, "/v1/embeddings", json={"input": "second"}, headers=AUTH
                )
                assert stack.wait_for(lambda: router.waiting == 1)
                refused = post(stack, {"model": "m", "input": "third"})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "server_overloaded"
                assert len(fake.embedding_requests) == 1  # llama.cpp saw only its one slot's
                stack.runner.call(gate.set)
                assert running.result(10).status_code == 200
                assert queued.result(10).status_code == 200
    finally:
        stack.runner.call(gate.set)
    assert [r["input"] for r in fake.embedding_requests] == [["first"], ["second"]]


def test_a_daily_budget_is_spent_by_embeddings(make_stack: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.team]\nkey = "sk-embed-budget-0003"\ntokens_per_day = 50\n')
    stack = make_stack(usage_db=tmp_path / "usage.db", api_keys_file=keys)
    ledger = stack.ctx.usage
    assert ledger is not None
    body = {"model": "m", "input": list(range(1, 41))}  # 40 tokens, as llama.cpp counts them
    assert post(stack, body, "sk-embed-budget-0003").status_code == 200
    assert stack.wait_for(lambda: ledger.recorded == 1)
    assert post(stack, body, "sk-embed-budget-0003").status_code == 200  # 80 of 50 now
    assert stack.wait_for(lambda: ledger.recorded == 2)
    spent = post(stack, body, "sk-embed-budget-0003")
    assert spent.status_code == 429 and spent.json()["error"]["code"] == "budget_exceeded"
    assert len(stack.fake.embedding_requests) == 2
    ledger.close()


def test_a_client_that_leaves_cancels_llamacpps_call_and_is_charged_its_estimate(
    make_stack: Any, key_file: Path
) -> None:
    stack = make_stack(api_keys_file=key_file)
    gate = stack.runner.call(asyncio.Event)
    stack.fake.script.gate = gate  # llama.cpp is computing when the client leaves
    raw = json.dumps({"model": "m", "input": "y" * 200}).encode()  # estimated 50 tokens
    try:
        with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {TOKENS_KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
                + raw
            )
            assert stack.wait_for(lambda: len(stack.fake.embedding_requests) == 1)
        # The gateway closes its llama.cpp connection (llama.cpp then drops the work).
        assert stack.wait_for(lambda: stack.fake.client_disconnects >= 1)
    finally:
        stack.runner.call(gate.set)  # never leave the shared fake waiting
    assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("tokens") == 0)
    probe = post(stack, {"model": "m", "input": [1]}, TOKENS_KEY)
    assert probe.status_code == 200
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) == 100 - 50 - 1


def test_the_ledger_and_the_metrics_count_embeddings(make_stack: Any, tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    stack = make_stack(usage_db=db)
    answer = post(stack, {"model": "m", "input": ["one", "two two"]})
    assert answer.status_code == 200
    tokens = answer.json()["usage"]["prompt_tokens"]
    assert post(stack, {"model": "m", "input": ""}).status_code == 400
    ledger = stack.ctx.usage
    assert ledger is not None
    assert stack.wait_for(lambda: ledger.recorded == 2)
    assert ledger.flush()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT endpoint, status, prompt_tokens, completion_tokens, model, server "
            "FROM usage ORDER BY time"
        ).fetchall()
    server = f"127.0.0.1:{stack.fake.port}"
    assert rows == [
        ("/v1/embeddings", 200, tokens, 0, "m", server),
        ("/v1/embeddings", 400, 0, 0, None, None),  # refused before its model was read
    ]
    ledger.close()
    text = stack.http.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = {"key": "unlimited", "model": "default", "endpoint": "/v1/embeddings"}
    requests = "llamacpp_proxy_requests_total"
    assert samples[(requests, tuple(sorted({**labels, "status": "200"}.items())))] == 1
    refused = {**labels, "model": "", "status": "400"}  # before a model was chosen
    assert samples[(requests, tuple(sorted(refused.items())))] == 1
    prompt = tuple(sorted({"key": "unlimited", "model": "default", "kind": "prompt"}.items()))
    assert samples[("llamacpp_proxy_tokens_total", prompt)] == tokens


# -- routing by model: the upstreams file's kind ---------------------------------------------


@pytest.fixture
def routed(runner: LoopThread, fakes: list[FakeLlamaCpp], tmp_path: Path) -> Iterator[Stack]:
    chat, embed = fakes[:2]
    embed.script.embedding_size = 4
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(
        f'[models."chat"]\nservers = ["{chat.url}"]\n\n'
        f'[models."embed"]\nkind = "embedding"\naliases = ["text-embedding-3-small"]\n'
        f'servers = ["{embed.url}"]\n'
    )
    stack = start_stack(runner, chat, upstreams_file=upstreams)
    yield stack
    stop_stack(stack)


def test_embeddings_route_by_model_and_each_kind_refuses_the_other(
    routed: Stack, fakes: list[FakeLlamaCpp]
) -> None:
    chat, embed = fakes[:2]
    client = routed.client()
    for name in ("embed", "text-embedding-3-small"):
        answer = client.embeddings.create(model=name, input="hi", encoding_format="float")
        assert answer.model == name and len(answer.data[0].embedding) == 4
    assert len(embed.embedding_requests) == 2 and chat.embedding_requests == []
    with pytest.raises(openai.BadRequestError) as wrong:
        client.embeddings.create(model="chat", input="hi")
    assert isinstance(wrong.value.body, dict)
    assert wrong.value.body["code"] == "model_kind_mismatch"
    assert 'kind = "embedding"' in wrong.value.body["message"]
    with pytest.raises(openai.BadRequestError) as not_chat:
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "x"}])
    assert isinstance(not_chat.value.body, dict)
    assert "is an embedding model" in not_chat.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="embed", prompt="x")
    r = routed.http.post(
        "/v1/messages",
        json={"model": "embed", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        headers=AUTH,
    )
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nobody", input="hi")
    assert chat.requests == [] and embed.requests == []  # no generation reached either
    listed = {m.id for m in client.models.list()}
    assert listed == {"chat", "embed", "text-embedding-3-small"}
    chat_answer = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "x"}]
    )
    assert chat_answer.choices[0].message.content


def test_the_upstreams_file_kind_is_checked() -> None:
    server = {"servers": ["http://127.0.0.1:1"]}
    routing = parse_upstreams({"models": {"e": {**server, "kind": "embedding"}}}, "u.toml")
    assert routing.pools[0].kind == "embedding"
    assert parse_upstreams({"models": {"c": server}}, "u.toml").pools[0].kind == "chat"
    with pytest.raises(UpstreamsFileError, match=r"kind: must be one of chat, embedding"):
        parse_upstreams({"models": {"e": {**server, "kind": "vector"}}}, "u.toml")
    for field, value in (("chat_template", "chatml"), ("tools_policy", "drop")):
        bad = {**server, "kind": "embedding", field: value}
        with pytest.raises(UpstreamsFileError, match=f"{field}: an embedding model"):
            parse_upstreams({"models": {"e": bad}}, "u.toml")


def test_one_llamacpp_server_takes_embeddings_and_chat(stack: Stack) -> None:
    # --llamacpp-server alone: the one server is asked, whatever the model is called.
    client = stack.client()
    assert client.embeddings.create(model="anything", input="a").data
    assert client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "x"}]
    ).choices
