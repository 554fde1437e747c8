"""POST /v1/embeddings against a real llama-server started with `--embeddings --pooling
mean` (SmolLM2: 576-float vectors), behind a gateway whose upstreams file also holds the
chat model; and the session's one-server gateway, whose llama-server computes none."""

from __future__ import annotations

import base64
import math
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import UNLIMITED_KEY, assert_schema

from .conftest import (
    EMBED_MODEL,
    MODEL,
    Service,
    child_env,
    console_script,
    http_json,
    sdk_client,
    start_service,
)

pytestmark = pytest.mark.e2e

SAME = "The cat sat on the mat and looked out of the window."
OTHER = "Quarterly revenue grew by twelve percent in the northern region."


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def floats_of(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def llama_tokens(server: Service, text: str) -> list[int]:
    """llama.cpp's own tokenizer, as its embeddings use it (special tokens added)."""
    answer: Any = http_json(server.url + "/tokenize", {"content": text, "add_special": True})
    return list(answer["tokens"])


@pytest.fixture(scope="module")
def client(embeddings_proxy: Service) -> openai.OpenAI:
    return sdk_client(embeddings_proxy, UNLIMITED_KEY)


def test_vectors_cosines_and_usage_from_llamacpp(
    client: openai.OpenAI, embedding_llama_server: Service
) -> None:
    answer = client.embeddings.create(
        model=EMBED_MODEL, input=[SAME, SAME, OTHER], encoding_format="float"
    )
    assert_schema(answer.model_dump(), "CreateEmbeddingResponse")
    vectors = [d.embedding for d in answer.data]
    assert [len(v) for v in vectors] == [576, 576, 576]
    assert [d.index for d in answer.data] == [0, 1, 2] and answer.model == EMBED_MODEL
    assert cosine(vectors[0], vectors[1]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(vectors[0], vectors[2]) < 0.99
    tokens = sum(len(llama_tokens(embedding_llama_server, t)) for t in (SAME, SAME, OTHER))
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens


def test_base64_decodes_to_the_same_floats(
    client: openai.OpenAI, embeddings_proxy: Service
) -> None:
    floats = client.embeddings.create(model=EMBED_MODEL, input=SAME, encoding_format="float")
    decoded = client.embeddings.create(model=EMBED_MODEL, input=SAME)  # the SDK's base64
    assert decoded.data[0].embedding == floats.data[0].embedding
    with httpx.Client(base_url=embeddings_proxy.url, timeout=60) as http:
        raw = http.post(
            "/v1/embeddings",
            json={"model": EMBED_MODEL, "input": SAME, "encoding_format": "base64"},
            headers={"Authorization": f"Bearer {UNLIMITED_KEY}"},
        )
    assert raw.status_code == 200
    assert floats_of(raw.json()["data"][0]["embedding"]) == floats.data[0].embedding


def test_token_ids_embed_as_their_text_does(
    client: openai.OpenAI, embedding_llama_server: Service
) -> None:
    ids = llama_tokens(embedding_llama_server, OTHER)
    by_text = client.embeddings.create(model=EMBED_MODEL, input=OTHER, encoding_format="float")
    by_ids = client.embeddings.create(model=EMBED_MODEL, input=[ids], encoding_format="float")
    assert by_ids.usage.prompt_tokens == len(ids)
    assert cosine(by_text.data[0].embedding, by_ids.data[0].embedding) == pytest.approx(
        1.0, abs=1e-5
    )


def test_models_route_by_name_and_each_kind_refuses_the_other(
    client: openai.OpenAI, embeddings_proxy: Service
) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=5
    )
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(
            model=EMBED_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model=MODEL, input="hi")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    # The embedding server is probed like any other: ready, with its slots.
    with httpx.Client(base_url=embeddings_proxy.url, timeout=30) as http:
        ready = http.get("/health/ready")
    assert ready.status_code == 200, ready.text
    servers = ready.json()["models"][EMBED_MODEL]["servers"]
    assert [s["status"] for s in servers] == ["ready"]


def test_a_llamacpp_without_embeddings_is_a_clear_400(openai_client: openai.OpenAI) -> None:
    # The session's gateway: --llamacpp-server alone, to a server started without them.
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.embeddings.create(model=MODEL, input="hi")
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "embeddings_not_supported"
    assert "--embeddings" in body["message"]


# -- keys, limits and charges ---------------------------------------------------------------

EMBED_KEY = "sk-e2e-embed-budget-0001"
EMBED_TPM = 300  # tokens a minute for EMBED_KEY


@pytest.fixture(scope="module")
def keyed_embeddings_proxy(
    request: pytest.FixtureRequest, embedding_llama_server: Service, e2e_logs: Path
) -> Iterator[tuple[Service, Path]]:
    """A proxy in front of the embedding server whose key has a tokens-a-minute budget, with
    a usage ledger."""
    upstreams = e2e_logs / "keyed-embeddings-upstreams.toml"
    upstreams.write_text(
        f'[models."{EMBED_MODEL}"]\nkind = "embedding"\n'
        f'servers = ["{embedding_llama_server.url}"]\n'
    )
    keys = e2e_logs / "keyed-embeddings-keys.toml"
    keys.write_text(f'[keys.embed]\nkey = "{EMBED_KEY}"\ntokens_per_minute = {EMBED_TPM}\n')
    ledger = e2e_logs / "keyed-embeddings-usage.db"

    def argv(port: int) -> list[str]:
        return [
            console_script(),
            "--upstreams-file", str(upstreams),
            "--api-keys-file", str(keys),
            "--usage-db", str(ledger),
            "--port", str(port),
            "--host", "127.0.0.1",
            "--shutdown-timeout", "5",
        ]  # fmt: skip

    service = start_service(
        request.config,
        "proxy-embeddings-keyed",
        argv,
        "/health/ready",
        e2e_logs,
        timeout=30,
        env=child_env(),
    )
    yield service, ledger
    service.stop()


def ledger_rows(ledger: Path, wanted: int) -> list[tuple[Any, ...]]:
    """(key, model, endpoint, status, prompt_tokens, completion_tokens) of the ledger, once
    at least `wanted` rows are written (it writes in batches), within 30 s."""
    deadline = time.monotonic() + 30
    rows: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        if ledger.exists():
            with sqlite3.connect(ledger) as db:
                rows = db.execute(
                    "SELECT key, model, endpoint, status, prompt_tokens, completion_tokens "
                    "FROM usage ORDER BY time"
                ).fetchall()
            if len(rows) >= wanted:
                return rows
        time.sleep(0.2)
    return rows


def test_tokens_per_minute_charge_llamacpps_count_and_refuse_with_a_typed_429(
    keyed_embeddings_proxy: tuple[Service, Path], embedding_llama_server: Service
) -> None:
    proxy, ledger = keyed_embeddings_proxy
    with sdk_client(proxy, EMBED_KEY) as client:
        # More token ids than the whole minute's budget: refused at admission, no wait helps.
        with pytest.raises(openai.RateLimitError) as too_large:
            client.embeddings.create(model=EMBED_MODEL, input=[list(range(1, EMBED_TPM + 2))])
        assert "retry-after" not in too_large.value.response.headers

        answer = client.embeddings.create(model=EMBED_MODEL, input=[SAME, OTHER])
        charged = answer.usage.prompt_tokens
        assert charged == sum(len(llama_tokens(embedding_llama_server, t)) for t in (SAME, OTHER))
        # Once the request is in the ledger it is settled: llama.cpp's count, not the estimate.
        rows = ledger_rows(ledger, 2)
        assert rows == [
            ("embed", EMBED_MODEL, "/v1/embeddings", 429, 0, 0),  # refused: charged nothing
            ("embed", EMBED_MODEL, "/v1/embeddings", 200, charged, 0),
        ]

        probe = client.embeddings.with_raw_response.create(model=EMBED_MODEL, input=[[1]])
        assert probe.parse().usage.prompt_tokens == 1
        remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
        assert remaining == EMBED_TPM - charged - 1  # the probe's estimate: its one token id

        # Within the budget alone, over what is left of it: a 429 to retry after a while.
        with pytest.raises(openai.RateLimitError) as spent:
            client.embeddings.create(model=EMBED_MODEL, input=[list(range(1, remaining + 2))])
    assert spent.value.code == "tokens_rate_limit_exceeded"
    # Whole seconds rounded up past the moment the window frees room (never early): a
    # minute's window can say 61 when the refusal comes within a millisecond of the charge.
    assert 1 <= int(spent.value.response.headers["retry-after"]) <= 61
