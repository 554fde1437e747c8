"""POST /v1/embeddings against a real llama-server started with `--embeddings --pooling
mean` (SmolLM2: 576-float vectors), behind a gateway whose upstreams file also holds the
chat model; and the session's one-server gateway, whose llama-server computes none."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import UNLIMITED_KEY, assert_schema

from .conftest import EMBED_MODEL, MODEL, Service, http_json, sdk_client

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
