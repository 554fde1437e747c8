"""/v1/models names the model as a client can type it, never by a path on the host:
--model-name, else llama.cpp's alias, else the GGUF file's stem; `created` is stable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llamacpp_proxy.config import Settings
from llamacpp_proxy.model_names import model_display_name

from .conftest import Stack


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        # llama-server -m PATH: the alias is the path itself.
        (
            {
                "model_path": "/home/u/.cache/m/gemma-3-270m-q4_k_m.gguf",
                "model_alias": "/home/u/.cache/m/gemma-3-270m-q4_k_m.gguf",
            },
            "gemma-3-270m-q4_k_m",
        ),
        ({"model_path": "models/x.gguf", "model_alias": "models/x.gguf"}, "x"),
        ({"model_path": "/m/big-00001-of-00003.gguf"}, "big"),
        ({"model_path": "C:\\models\\Win.GGUF"}, "Win"),
        # --alias smollm2, or -hf org/repo: a name, shown as it is.
        ({"model_path": "/m/x.gguf", "model_alias": "smollm2"}, "smollm2"),
        (
            {"model_path": "/c/x.gguf", "model_alias": "ggml-org/gemma-3-270m-GGUF"},
            "ggml-org/gemma-3-270m-GGUF",
        ),
        ({"model_path": "/m/x.gguf", "model_alias": "/other/path/y.gguf"}, "x"),
        ({"model_alias": "/only/alias.gguf"}, "alias"),
        ({}, "llama.cpp"),
    ],
)
def test_display_name(props: dict[str, Any], expected: str) -> None:
    assert model_display_name(props, Settings()) == expected
    assert model_display_name(props, Settings(model_name="mine")) == "mine"


def test_models_lists_no_path_and_a_stable_created(stack: Stack) -> None:
    http = stack.http
    headers = {"Authorization": f"Bearer {stack.ctx.settings.unlimited_api_key}"}
    first = http.get("/v1/models", headers=headers).json()
    assert [m["id"] for m in first["data"]] == ["fake-model"]
    assert "/" not in http.get("/v1/models", headers=headers).text
    again = http.get("/v1/models", headers=headers).json()
    assert again == first
    one = http.get("/v1/models/fake-model", headers=headers)
    assert one.status_code == 200 and one.json() == first["data"][0]
    assert http.get("/v1/models/fake-model.gguf", headers=headers).status_code == 404
    # A chat answer without `model` names the same model.
    chat = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    )
    assert chat.json()["model"] == "fake-model"


def test_model_name_option_and_llamacpp_alias(make_stack: Callable[..., Stack]) -> None:
    named = make_stack(model_name="house-model")
    with named.client() as client:
        assert [m.id for m in client.models.list().data] == ["house-model"]
        assert client.models.retrieve("house-model").id == "house-model"
    aliased = make_stack()
    aliased.fake.script.model_alias = "smollm2"
    with aliased.client() as client:
        assert [m.id for m in client.models.list().data] == ["smollm2"]
