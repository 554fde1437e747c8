"""The proxy's own OpenAPI description (llamacpp_proxy/openapi.json): served, valid OpenAPI
3.1, naming every route, and true to the code.

"True to the code" is checked with schemathesis against a running proxy and the fake
llama.cpp: bodies valid by the description must be answered (200, or one of the 400s only the
chat template or llama.cpp can decide), bodies that violate it must be refused with a 4xx,
and every answer - status, content type, headers, JSON body and each server-sent event -
must be one the description documents. Never a 5xx.

More examples: LLAMACPP_PROXY_FUZZ_EXAMPLES=2000 (as for test_fuzz.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from importlib import resources
from typing import Any

import httpx
import openapi_spec_validator
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamacpp_proxy.app import make_app

from .conftest import UNLIMITED_KEY, LoopThread, Stack
from .fake_llamacpp import FakeLlamaCpp
from .test_fuzz import module_stack

SPEC: dict[str, Any] = json.loads(
    resources.files("llamacpp_proxy").joinpath("openapi.json").read_text(encoding="utf-8")
)
AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
ADMIN_KEY = "sk-test-openapi-admin-0123456789"
EXAMPLES = int(os.environ.get("LLAMACPP_PROXY_FUZZ_EXAMPLES", "60"))
SCHEMATHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=os.environ.get("LLAMACPP_PROXY_FUZZ_RANDOM") != "1",
    database=None,
)
# 400s a valid body can still get: what only the chat template or llama.cpp decides.
DECIDED_DOWNSTREAM = {
    "invalid_chat_template_input",  # the template refuses these messages
    "tools_not_supported",  # the template cannot express tools
    "upstream_invalid_request",  # llama.cpp refuses, e.g. a grammar that does not parse
    "context_length_exceeded",
    "max_tokens_above_limit",  # the operator's --max-tokens-limit (the description says so)
    "unsupported_dimensions",  # only the model's own width (known from llama.cpp's answer)
}


@pytest.fixture(scope="module")
def api_stack(runner: LoopThread, fake: FakeLlamaCpp) -> Iterator[Stack]:
    yield from module_stack(runner, fake, admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def schema() -> Any:
    return schemathesis.openapi.from_dict(SPEC)


# -- served and valid ---------------------------------------------------------------------


def test_openapi_json_is_served_without_a_key(api_stack: Stack) -> None:
    response = httpx.get(api_stack.url + "/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    assert response.json() == SPEC


def test_the_description_is_valid_openapi_3_1() -> None:
    assert SPEC["openapi"].startswith("3.1.")
    openapi_spec_validator.validate(SPEC)  # the OpenAPI 3.1 meta-schema plus OpenAPI's own rules


def test_every_route_is_documented_and_every_documented_path_is_routed(api_stack: Stack) -> None:
    routes = {
        rule.matcher.regex.pattern.rstrip("$").replace("(.+)", "{model}")
        for rule in make_app(api_stack.ctx).wildcard_router.rules
    }
    documented = set(SPEC["paths"])
    # The unprefixed aliases (/chat/completions, ...) are named in info.description.
    aliases = {r for r in routes if "/v1" + r in documented}
    assert routes - aliases == documented
    for alias in aliases:
        assert alias in SPEC["info"]["description"]


@pytest.mark.parametrize(
    ("method", "path"),
    [(m.upper(), p) for p, item in SPEC["paths"].items() for m in item],
)
def test_every_documented_operation_answers(api_stack: Stack, method: str, path: str) -> None:
    hi = [{"role": "user", "content": "hi"}]
    body = {
        "/v1/chat/completions": {"messages": hi},
        "/v1/messages": {"model": "m", "max_tokens": 5, "messages": hi},
        "/v1/messages/count_tokens": {"model": "m", "messages": hi},
        "/v1/embeddings": {"model": "m", "input": "hi"},
        "/v1/responses": {"model": "m", "input": "hi"},
    }.get(path, {"prompt": "hi"})
    response = httpx.request(
        method,
        api_stack.url + path.replace("{model}", "fake-model"),
        json=body if method == "POST" else None,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"} if path == "/status" else AUTH,
        timeout=10,
    )
    assert response.status_code == 200, response.text


# -- true to the code (schemathesis) ------------------------------------------------------


def _checks(mode: str) -> list[Any]:
    from schemathesis import checks

    common = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_headers_conformance,
        checks.response_schema_conformance,  # JSON bodies, and every server-sent event
    ]
    if mode == "negative":
        common.append(checks.negative_data_rejection)
    return common


def _integral_floats(value: Any) -> bool:
    """Whether value holds a float with no fraction (2.0)."""
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_integral_floats(v) for v in value.values())
    if isinstance(value, list):
        return any(_integral_floats(v) for v in value)
    return False


def _stated_in_words(error: dict[str, Any], body: Any) -> bool:
    """A refusal for a rule the description states but JSON Schema cannot check."""
    message, param = error["message"], error["param"] or ""
    # JSON Schema counts 2.0 as an integer; the proxy wants integers written as integers.
    if "must be an integer, not float" in message:
        return _integral_floats(body)
    # Tool call arguments given as a string must hold JSON (contentMediaType is no check).
    if param.endswith((".function.arguments", "].arguments")):
        return True
    # Responses: an input of reasoning items only holds no message; two tools of one name.
    if "must hold at least one message" in message or "two tools are named" in message:
        return True
    # tool_choice must name one of the tools; best_of must equal n.
    return param in ("tool_choice", "best_of")


OPERATIONS = [
    pytest.param("POST", "/v1/chat/completions", "positive", id="chat-valid"),
    pytest.param("POST", "/v1/chat/completions", "negative", id="chat-invalid"),
    pytest.param("POST", "/v1/completions", "positive", id="text-valid"),
    pytest.param("POST", "/v1/completions", "negative", id="text-invalid"),
    pytest.param("POST", "/v1/embeddings", "positive", id="embeddings-valid"),
    pytest.param("POST", "/v1/embeddings", "negative", id="embeddings-invalid"),
    pytest.param("POST", "/v1/responses", "positive", id="responses-valid"),
    pytest.param("POST", "/v1/responses", "negative", id="responses-invalid"),
    pytest.param("GET", "/v1/models", "positive", id="models"),
    pytest.param("GET", "/v1/models/{model}", "positive", id="model"),
    pytest.param("GET", "/health", "positive", id="health"),
    pytest.param("GET", "/health/ready", "positive", id="ready"),
]


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
@SCHEMATHESIS
@given(data=st.data())
def test_the_proxy_answers_as_its_description_says(
    api_stack: Stack, schema: Any, method: str, path: str, mode: str, data: st.DataObject
) -> None:
    from schemathesis import GenerationMode

    operation = schema[path][method]
    case = data.draw(operation.as_strategy(GenerationMode(mode)), label="case")
    api_stack.runner.call(api_stack.fake.reset)
    response = case.call(base_url=api_stack.url, headers=AUTH, timeout=30)
    case.validate_response(response, checks=_checks(mode))
    if mode == "positive" and response.status_code == 400:
        error = response.json()["error"]
        assert error["code"] in DECIDED_DOWNSTREAM or _stated_in_words(error, case.body), (
            f"a body valid by the description was refused: {error} for {case.body!r}"
        )
