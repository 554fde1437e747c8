"""Output constraints that would hang llama.cpp's grammar builder (render/grammar_guard.py):
a GBNF repetition `{m,n}` with m > n, from a raw grammar, a JSON schema's string bounds or
its pattern, is refused with a 400 before it reaches llama.cpp; everything else passes.
tests/e2e/test_openai_sdk.py sends the same through the gateway to a real llama-server."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llamacpp_proxy.render.grammar_guard import grammar_problem, schema_problem

from .conftest import UNLIMITED_KEY, Stack, forced_tool_call

AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}


@pytest.mark.parametrize(
    "grammar",
    ['root ::= "a"{5,2}', 'root ::= x\nx ::= [a-z]{ 3 , 1 } "."', "root ::= ([0-9]{10,9})+"],
)
def test_an_inverted_repetition_in_a_grammar_is_found(grammar: str) -> None:
    problem = grammar_problem(grammar)
    assert problem is not None and "minimum above its maximum" in problem


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= "a"{2,5}',
        'root ::= "a"{5} "b"{3,}',
        'root ::= "{5,2}"',  # inside a string literal: text
        'root ::= "\\"{5,2}"',  # an escaped quote does not end the literal
        "root ::= [{5,2}]",  # inside a character class
        'root ::= "a" # {5,2} in a comment\n',
    ],
)
def test_text_that_only_looks_like_an_inverted_repetition_passes(grammar: str) -> None:
    assert grammar_problem(grammar) is None


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "string", "minLength": 5, "maxLength": 2}, "#"),
        (
            {
                "type": "object",
                "properties": {"a/b": {"type": "string", "minLength": 4, "maxLength": 3}},
            },
            "#/properties/a~1b",
        ),
        (
            {"type": "array", "items": {"anyOf": [{"type": "string", "pattern": "^a{5,2}$"}]}},
            "#/items/anyOf/0",
        ),
        ({"$defs": {"x": {"type": "string", "pattern": "(ab){9, 1}"}}}, "#/$defs/x"),
        (
            {"type": "string", "pattern": "^a\\\\{5,2}$"},
            "#",
        ),  # an escaped backslash, then a quantifier
    ],
)
def test_an_inverted_bound_anywhere_in_a_schema_is_found(schema: Any, where: str) -> None:
    problem = schema_problem(schema)
    assert problem is not None and problem.startswith(f"{where}: "), problem


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "minLength": 2, "maxLength": 5},
        {"type": "string", "minLength": 5},
        {"type": "string", "pattern": "^a{2,5}$"},
        {"type": "string", "pattern": "^[{5,2}]$"},  # braces in a class are text
        {"type": "string", "pattern": "^a\\{5,2}$"},  # an escaped brace is text
        {"type": "array", "minItems": 3, "maxItems": 1},  # llama.cpp answers these
        {"type": "object", "properties": {"minLength": {"type": "integer"}}},
        {"const": {"minLength": 5, "maxLength": 2}},  # data, not a schema
        {"enum": [{"pattern": "a{5,2}"}]},
        {"type": "string", "minLength": True, "maxLength": False},
    ],
)
def test_schemas_llamacpp_can_build_pass(schema: Any) -> None:
    assert schema_problem(schema) is None


def test_a_deep_schema_is_walked_without_recursion() -> None:
    schema: Any = {"type": "string", "minLength": 3, "maxLength": 1}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    assert schema_problem(schema) is not None


INVERTED = {"type": "string", "minLength": 5, "maxLength": 2}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": INVERTED}},
                    },
                },
            },
            "response_format",
            "invalid_json_schema",
        ),
        (
            "/v1/completions",
            {"prompt": "hi", "json_schema": INVERTED},
            "json_schema",
            "invalid_json_schema",
        ),
        (
            "/v1/completions",
            {"prompt": "hi", "grammar": 'root ::= "a"{5,2}'},
            "grammar",
            "invalid_grammar",
        ),
        (
            "/v1/chat/completions",
            forced_tool_call(
                {"type": "object", "properties": {"s": {"type": "string", "pattern": "^x{3,1}$"}}}
            ),
            "tools",
            "invalid_json_schema",
        ),
        (
            "/v1/responses",
            {
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": INVERTED}},
            },
            None,
            "invalid_json_schema",
        ),
    ],
)
def test_a_constraint_that_would_hang_llamacpp_is_a_400_and_never_sent(
    stack: Stack, path: str, body: Any, param: str | None, code: str
) -> None:
    """Regression: these went to llama.cpp, whose grammar builder then took memory until
    none was left (tests/e2e: the real llama-server)."""
    with httpx.Client(base_url=stack.url, headers=AUTH) as client:
        r = client.post(path, content=json.dumps(body))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == code, error
        message = error["message"]
        assert "minimum above its maximum" in message or "greater than 'maxLength'" in message
        if param is not None:
            assert error["param"] == param
        assert not stack.fake.requests  # never reached llama.cpp
        ok = client.post("/v1/completions", content=json.dumps({"prompt": "hi"}))
        assert ok.status_code == 200  # the same connection goes on serving
