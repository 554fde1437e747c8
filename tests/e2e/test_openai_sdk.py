"""The official `openai` SDK against the proxy in front of a real llama-server (Gemma 3 270M).

Every raw body and stream chunk is checked against OpenAI's published schemas. Generations
are short (a few tokens at ~65 tokens/s on 2 cores) and greedy (temperature 0), so what the
model says is repeatable; `ignore_eos` keeps a generation from ending before max_tokens where
a test counts tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import LIMITED_KEY, assert_schema

from .conftest import MODEL, RATE_LIMIT, Service, http_json, sdk_client

pytestmark = pytest.mark.e2e

HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello in one short sentence."}
]
COUNTING = "1, 2, 3, 4, "  # greedy SmolLM2 goes on "5, 6, 7, 8, 9, 10, ..."
# What SmolLM2's own template (from /props) makes of one user message (llama.cpp adds no BOS
# for this model); written out here so the test does not trust the code under test.
USER_TURN = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def read_sse(lines: Iterable[str]) -> tuple[list[dict[str, Any]], bool]:
    """The JSON chunks of a raw SSE body, and whether it ended with `data: [DONE]`."""
    chunks: list[dict[str, Any]] = []
    done = False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        payload = line.removeprefix("data: ")
        assert not done, f"data after [DONE]: {line!r}"
        if payload == "[DONE]":
            done = True
            continue
        chunks.append(json.loads(payload))
    return chunks, done


def slots(llama_server: Service) -> list[dict[str, Any]]:
    """llama-server's GET /slots."""
    answer = http_json(llama_server.url + "/slots", timeout=5)
    assert isinstance(answer, list) and answer, f"unexpected /slots answer: {answer!r}"
    return answer


def test_models_are_listed(openai_client: openai.OpenAI) -> None:
    raw = openai_client.models.with_raw_response.list()
    body = raw.http_response.json()
    assert_schema(body, "ListModelsResponse")
    # --model-name, never the GGUF's path on the host; the same id when asked for by name.
    assert [model["id"] for model in body["data"]] == [MODEL], body
    assert openai_client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(openai_client: openai.OpenAI) -> None:
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0
    )
    body = raw.http_response.json()
    assert_schema(body, "CreateChatCompletionResponse")
    completion = raw.parse()
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 12


def test_chat_completion_stream(openai_client: openai.OpenAI) -> None:
    with openai_client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        stream=True,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks, done = read_sse(response.iter_lines())
    assert done, "the stream must end with data: [DONE]"
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()
    finishes = [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"][0]["finish_reason"] is not None
    ]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_text_completion(openai_client: openai.OpenAI) -> None:
    raw = openai_client.completions.with_raw_response.create(
        model=MODEL, prompt=COUNTING, max_tokens=8, temperature=0
    )
    body = raw.http_response.json()
    assert_schema(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].startswith("5"), body


def test_text_completion_stream_ends_at_max_tokens(openai_client: openai.OpenAI) -> None:
    with openai_client.completions.with_streaming_response.create(
        model=MODEL,
        prompt=COUNTING,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ) as response:
        chunks, done = read_sse(response.iter_lines())
    assert done
    for chunk in chunks:
        assert_schema(chunk, "CreateCompletionStreamResponse")
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    text = "".join(c["choices"][0]["text"] for c in choice_chunks)
    assert text.startswith("5"), text
    assert choice_chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_max_tokens_gives_length(openai_client: openai.OpenAI) -> None:
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to one hundred."}],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    body = raw.http_response.json()
    assert_schema(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_sequence(openai_client: openai.OpenAI, stream: bool) -> None:
    params: dict[str, Any] = {
        "model": MODEL,
        "prompt": COUNTING,
        "max_tokens": 20,
        "temperature": 0,
        "stop": [", 7"],
    }
    if stream:
        with openai_client.completions.with_streaming_response.create(
            stream=True, **params
        ) as response:
            chunks, done = read_sse(response.iter_lines())
        assert done
        for chunk in chunks:
            assert_schema(chunk, "CreateCompletionStreamResponse")
        text = "".join(c["choices"][0]["text"] for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        body = openai_client.completions.with_raw_response.create(**params).http_response.json()
        assert_schema(body, "CreateCompletionResponse")
        text, finish = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
    # Without the stop the model writes "5, 6, 7, 8, ...": it stopped at ", 7", not at eos.
    assert text == "5, 6"
    assert finish == "stop"


def test_grammar_constrains_the_answer(openai_client: openai.OpenAI) -> None:
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        max_tokens=5,
        temperature=0,
        extra_body={"grammar": 'root ::= "yes" | "no"'},
    )
    body = raw.http_response.json()
    assert_schema(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] in ("yes", "no")
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("kind", ["chat", "text", "chat-stream"])
def test_usage_is_what_llamacpp_counted(
    openai_client: openai.OpenAI, llama_server: Service, kind: str
) -> None:
    question = "Name three colours."
    params: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 6,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    if kind == "text":
        body = openai_client.completions.with_raw_response.create(
            prompt=question, **params
        ).http_response.json()
        usage, prompt = body["usage"], question
    elif kind == "chat":
        body = openai_client.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": question}], **params
        ).http_response.json()
        usage, prompt = body["usage"], USER_TURN.format(question)
    else:
        with openai_client.chat.completions.with_streaming_response.create(
            messages=[{"role": "user", "content": question}],
            stream=True,
            stream_options={"include_usage": True},
            **params,
        ) as response:
            chunks, _ = read_sse(response.iter_lines())
        usage, prompt = chunks[-1]["usage"], USER_TURN.format(question)

    direct = http_json(
        llama_server.url + "/completion",
        {"prompt": prompt, "n_predict": 6, "temperature": 0, "ignore_eos": True},
    )
    # A prompt sent with a doubled <bos> would count one token more here.
    assert usage["prompt_tokens"] == direct["tokens_evaluated"]
    assert usage["completion_tokens"] == direct["tokens_predicted"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_wrong_key_is_401(proxy: Service) -> None:
    client = sdk_client(proxy, "sk-not-a-key-of-this-proxy")
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert_schema(info.value.response.json(), "ErrorResponse")


def test_limited_key_is_429_after_its_limit(proxy: Service) -> None:
    client = sdk_client(proxy, LIMITED_KEY)
    for used in range(1, RATE_LIMIT + 1):
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt=COUNTING, max_tokens=1
        )
        assert raw.headers["x-ratelimit-limit-requests"] == str(RATE_LIMIT)
        assert raw.headers["x-ratelimit-remaining-requests"] == str(RATE_LIMIT - used)

    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=1)
    assert info.value.status_code == 429
    assert_schema(info.value.response.json(), "ErrorResponse")
    headers = info.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == str(RATE_LIMIT)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"]


def test_client_disconnect_frees_the_llamacpp_slot(
    openai_client: openai.OpenAI, llama_server: Service
) -> None:
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # the role
    next(chunks)  # the first token
    started = time.monotonic()
    next(chunks)
    next(chunks)
    token_time = (time.monotonic() - started) / 2
    # 400 tokens take ~6 s: llama.cpp is still generating when the client goes away.
    assert any(slot["is_processing"] for slot in slots(llama_server))
    stream.close()

    # llama.cpp notices a cancelled task between two tokens: freed within 1 s (~0.1 s is
    # usual), unless a machine busy with other work makes a few tokens take longer than that.
    # Without cancellation the slot would stay busy for the ~396 tokens left.
    allowed = max(1.0, 5 * token_time)
    closed = time.monotonic()
    while busy := [slot["id"] for slot in slots(llama_server) if slot["is_processing"]]:
        if time.monotonic() - closed > allowed:
            pytest.fail(
                f"llama.cpp slot(s) {busy} still generating {allowed:.1f} s after the client "
                f"disconnected ({token_time:.3f} s per token): the proxy did not cancel the "
                "upstream request"
            )
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_grammar_is_400_and_the_proxy_keeps_serving(
    openai_client: openai.OpenAI, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=5,
            stream=stream,
            extra_body={"grammar": "root ::= ("},
        )
    assert info.value.status_code == 400
    assert "grammar" in info.value.message
    assert_schema(info.value.response.json(), "ErrorResponse")

    again = openai_client.completions.create(
        model=MODEL, prompt=COUNTING, max_tokens=2, temperature=0
    )
    assert again.choices[0].text.startswith("5")


@pytest.mark.parametrize(
    "constraint",
    [
        {"grammar": 'root ::= "a"{5,2}'},
        {"json_schema": {"type": "string", "minLength": 5, "maxLength": 2}},
        {"json_schema": {"type": "string", "pattern": "^a{5,2}$"}},
    ],
    ids=["grammar", "string-bounds", "pattern"],
)
def test_a_constraint_that_hangs_llamacpps_grammar_builder_never_reaches_it(
    openai_client: openai.OpenAI, llama_server: Service, constraint: dict[str, Any]
) -> None:
    """Sent straight to this llama-server, each of these makes its grammar parser loop and
    take about 300 MB a second until the machine runs out of memory, the client leaving or
    not (render/grammar_guard.py). Through the gateway: a 400, and llama-server unharmed."""
    assert llama_server.process is not None
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(
            model=MODEL, prompt="hi", max_tokens=2, extra_body=constraint, timeout=30
        )
    assert "minimum above its maximum" in info.value.message or (
        "greater than 'maxLength'" in info.value.message
    )
    status = Path(f"/proc/{llama_server.process.pid}/status").read_text()
    rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
    assert rss_kib < 1024 * 1024, f"llama-server holds {rss_kib} KiB"
    again = openai_client.completions.create(
        model=MODEL, prompt=COUNTING, max_tokens=2, temperature=0
    )
    assert again.choices[0].text.startswith("5")


def _ref_chain(n: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def _listed_types(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": ["object", "object"], "properties": {"x": schema}, "required": ["x"]}
    return schema


@pytest.mark.parametrize(
    "extra",
    [
        {"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000},
        {"repeat_last_n": 2**31 - 1, "repeat_penalty": 1.1},
        {"dry_sequence_breakers": [f"b{i}" for i in range(1000)], "dry_multiplier": 0.8},
        # left recursion through a rule that matches nothing (render/gbnf.py): 2 GB in 4 s
        {"grammar": 'root ::= x root "a" | "a"\nx ::= "b"?'},
        # a long literal repeated: llama-server at 855 MB at once, 640 MB kept after
        {"grammar": 'root ::= "' + "a" * 30000 + '"{2000}'},
        # read in many ways at once: no token in 15 s, the core busy after the client left
        {"grammar": 'root ::= ("a"?){0,300}'},
        {"grammar": 'root ::= ("a" | "aa"){0,2000}'},
        {"json_schema": _ref_chain(20000)},
        {"json_schema": _listed_types(20)},
        {"json_schema": {"type": "string", "pattern": "^(a{0,2}){0,300}$"}},
        # each copy may end where the next begins: 49 s of a core for 100 tokens
        {"json_schema": {"type": "string", "pattern": "^((a{1,10}){0,1000})$"}},
        {"json_schema": {"enum": list(range(50000))}},
        # 5000 patterns without `^...$`: 2.2 s of a core before the first token, on after
        # the client left (llama.cpp copies its rules for each, then takes any string)
        {
            "json_schema": {
                "type": "object",
                "properties": {f"p{i}": {"type": "string", "pattern": "a+"} for i in range(5000)},
                "required": [f"p{i}" for i in range(5000)],
            }
        },
    ],
    ids=[
        "nested-grammar",
        "penalty-window",
        "dry-breakers",
        "left-recursive-grammar",
        "repeated-literal-grammar",
        "skippable-grammar",
        "ambiguous-grammar",
        "schema-ref-chain",
        "schema-listed-types",
        "schema-pattern",
        "schema-ambiguous-pattern",
        "schema-enum",
        "schema-unanchored-patterns",
    ],
)
def test_input_that_crashes_or_exhausts_llama_server_never_reaches_it(
    openai_client: openai.OpenAI, llama_server: Service, extra: dict[str, Any]
) -> None:
    """Sent straight to this llama-server: the nested grammar and the `$ref` chain crash it
    (stack overflow), the window allocates 8 GB, the breakers take a core for minutes before
    the first token, the left-recursive grammar takes memory until killed, and the other
    schemas keep a core busy long after the client left. Through the gateway: a 400, and
    llama-server unharmed (tests/test_llamacpp_hazards.py, tests/test_gbnf.py,
    tests/test_schema_limits.py)."""
    assert llama_server.process is not None
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(
            model=MODEL, prompt="hi", max_tokens=2, extra_body=extra, timeout=30
        )
    assert llama_server.process.poll() is None
    again = openai_client.completions.create(
        model=MODEL, prompt=COUNTING, max_tokens=2, temperature=0
    )
    assert again.choices[0].text.startswith("5")


def test_json_schema_response_format_gives_json_that_follows_the_schema(
    openai_client: openai.OpenAI,
) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    reply = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the weather in Paris as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema},
        },
        temperature=0,
        max_tokens=60,
    )
    content = reply.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), schema)  # llama.cpp's constraint held


def test_json_object_response_format_parses(openai_client: openai.OpenAI) -> None:
    reply = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=40,  # enough to see a JSON object begin; 80 took over a minute on a busy host
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still a JSON object's beginning, never free text
        assert (reply.choices[0].message.content or "").lstrip().startswith("{")
