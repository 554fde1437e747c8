"""Parsing tool calls out of model text, in each template family's format."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from llamacpp_proxy.render.grammar_guard import schema_problem
from llamacpp_proxy.render.tool_calls import (
    ToolCallFilter,
    forced_call_schema,
    parse_tool_calls,
    rebase_tool_references,
)

from .conftest import UNLIMITED_KEY, Stack, forced_tool_call

AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}

TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "get_time")
]


def calls_of(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    parsed = parse_tool_calls(text, TOOLS)
    if parsed is None:
        return None
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed[1]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            [("get_weather", {"city": "Oslo"})],
        ),
        (
            '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>',
            [("get_weather", {}), ("get_time", {"tz": "UTC"})],
        ),
        (
            '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}',  # cut before the close tag
            [("get_time", {"tz": "UTC"})],
        ),
        (
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]',
            [("get_weather", {"city": "Rome"})],
        ),
        (
            '{"name": "get_weather", "parameters": {"city": "Lima"}}',  # Llama 3
            [("get_weather", {"city": "Lima"})],
        ),
        ('<|python_tag|>{"name": "get_time", "parameters": {}}', [("get_time", {})]),
        (
            '{"type": "function", "function": {"name": "get_time", "arguments": "{\\"tz\\": \\"X\\"}"}}',
            [("get_time", {"tz": "X"})],
        ),
    ],
)
def test_formats(text: str, expected: list[Any]) -> None:
    assert calls_of(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Just an answer.",
        '{"name": "unknown_tool", "arguments": {}}',
        '{"answer": 42}',
        "<tool_call>not json</tool_call>",
        '[TOOL_CALLS] {"name": "get_time", "arguments": "not json"}',
        '[{"name": "get_time", "arguments": {}}, {"name": "nope", "arguments": {}}]',
    ],
)
def test_text_that_is_not_a_call_stays_content(text: str) -> None:
    assert parse_tool_calls(text, TOOLS) is None


def test_parallel_off_keeps_only_the_first_call() -> None:
    """A client that sent parallel_tool_calls: false (or disable_parallel_tool_use) gets
    one call, whatever the model wrote: in every format, streamed (the filter) or not."""
    two = (
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'
    )
    mistral = '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, {"name": "get_weather"}]'
    for text, first in ((two, "get_weather"), (mistral, "get_time")):
        assert len((parse_tool_calls(text, TOOLS) or (None, []))[1]) == 2
        _, calls = parse_tool_calls(text, TOOLS, parallel=False) or (None, [])
        assert [c["function"]["name"] for c in calls] == [first]
        held = ToolCallFilter(TOOLS, forced=False, parallel=False)
        assert held.feed(text) == ""
        assert [c["function"]["name"] for c in held.finish()[1]] == [first]


def test_content_before_a_hermes_call_is_kept() -> None:
    parsed = parse_tool_calls(
        'Let me check.\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', TOOLS
    )
    assert parsed is not None and parsed[0] == "Let me check."


def test_call_ids_are_unique_and_arguments_are_json_strings() -> None:
    parsed = parse_tool_calls(
        '[{"name": "get_time", "arguments": {"a": "é"}}, {"name": "get_time", "arguments": {}}]',
        TOOLS,
    )
    assert parsed is not None
    ids = {c["id"] for c in parsed[1]}
    assert len(ids) == 2 and all(i.startswith("call_") for i in ids)
    assert parsed[1][0]["function"]["arguments"] == '{"a": "é"}'


def test_filter_releases_plain_text_and_holds_calls() -> None:
    f = ToolCallFilter(TOOLS, forced=False)
    assert f.feed(" ") == ""
    assert f.feed("Hel") == " Hel"  # cannot start a call: released at once
    assert f.feed("lo") == "lo"
    assert f.finish() == ("", [])

    f = ToolCallFilter(TOOLS, forced=False)
    assert f.feed("<tool") == ""  # may become <tool_call>
    assert f.feed('_call>{"name": "get_time", "arguments": {}}') == ""
    rest, calls = f.finish()
    assert rest == "" and calls[0]["function"]["name"] == "get_time"

    f = ToolCallFilter(TOOLS, forced=False)
    assert f.feed("<tool") == ""
    assert f.feed("box>") == "<toolbox>"  # was not a marker after all

    f = ToolCallFilter(TOOLS, forced=False)
    f.feed('{"answer": 1}')
    assert f.finish() == ('{"answer": 1}', [])  # JSON that is not a call is content


def test_forced_call_schemas() -> None:
    named = forced_call_schema(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert named == {
        "type": "object",
        "properties": {"name": {"const": "get_time"}, "arguments": {"type": "object"}},
        "required": ["name", "arguments"],
    }
    required = forced_call_schema(TOOLS, "required")
    assert required is not None and len(required["anyOf"]) == 2
    assert forced_call_schema(TOOLS, "auto") is None


def forced_schema(tools: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any]:
    """The forced call's schema as llama.cpp gets it: Constraint.check rebases the tools'
    references (off the event loop for a large one) before it checks."""
    schema = forced_call_schema(tools, tool_choice)
    assert schema is not None
    rebase_tool_references(schema)
    return schema


def _resolves(schema: Any, ref: str) -> bool:
    node = schema
    for token in ref[2:].split("/") if ref != "#" else []:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False
    return isinstance(node, dict)


def _refs(node: Any, names: bool = False) -> list[str]:
    """The references in a schema (`names`: in a map of names to schemas, `properties`)."""
    if isinstance(node, dict) and names:
        return [r for v in node.values() for r in _refs(v)]
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [
            r
            for k, v in node.items()
            if k not in ("const", "enum")
            for r in _refs(v, k in ("properties", "$defs"))
        ]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


PYDANTIC_NESTED: Any = {
    "$defs": {
        "Place": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "near": {"$ref": "#/$defs/Place"}},
            "required": ["city"],
        }
    },
    "type": "object",
    "properties": {
        "place": {"$ref": "#/$defs/Place"},
        "tree": {"$ref": "#"},
        "fixed": {"const": {"$ref": "#/$defs/Place"}},  # data, not a reference
    },
    "required": ["place"],
}


@pytest.mark.parametrize("count", [1, 2])
def test_a_forced_calls_schema_keeps_the_tools_references_resolvable(count: int) -> None:
    """Regression: the parameters went under the call's `arguments` as they were, so
    Pydantic's `#/$defs/Place` named nothing at the schema's root and llama.cpp refused the
    request ("cannot resolve $ref", tests/e2e/test_tool_round_trips.py)."""
    before = json.dumps(PYDANTIC_NESTED)
    tools = [
        {"type": "function", "function": {"name": f"t{i}", "parameters": PYDANTIC_NESTED}}
        for i in range(count)
    ]
    schema = forced_schema(tools, "required")
    refs = _refs(schema)
    assert len(refs) == 3 * count
    assert all(_resolves(schema, ref) for ref in refs), refs
    arguments = (schema if count == 1 else schema["anyOf"][1])["properties"]["arguments"]
    assert list(arguments) == list(PYDANTIC_NESTED)  # keys keep their order
    assert list(arguments["properties"]) == ["place", "tree", "fixed"]
    assert arguments["properties"]["fixed"] == {"const": {"$ref": "#/$defs/Place"}}
    assert json.dumps(PYDANTIC_NESTED) == before  # the client's tools are not changed


def test_the_guard_reads_what_a_forced_calls_references_name() -> None:
    """With the references resolvable, the limits on what llama.cpp builds follow them into
    the tool's `$defs` (which are built only where referenced): before, the reference named
    nothing and this pattern went unread."""
    parameters = {
        "$defs": {"Bad": {"type": "string", "pattern": "^(a?){0,99}$"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/Bad"}},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    problem = schema_problem(forced_schema(tools, "required"))
    assert problem is not None and "ways at once" in problem, problem


@pytest.mark.parametrize("name", ["default", "enum", "const", "examples"])
def test_a_property_named_like_a_data_keyword_is_rebased(name: str) -> None:
    """Regression: a property (or a `$defs` entry) named "default", "enum", "const" or
    "examples" was taken for that keyword's data and its references left pointing at the
    root, where llama.cpp cannot resolve them: the forced call failed for a tool with a
    Pydantic field `default: Config`."""
    parameters = {
        "$defs": {
            "Config": {"type": "object", "properties": {"a": {"type": "string"}}},
            name: {"type": "object", "properties": {"c": {"$ref": "#/$defs/Config"}}},
        },
        "type": "object",
        "properties": {name: {"$ref": "#/$defs/Config"}, "other": {"$ref": f"#/$defs/{name}"}},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    schema = forced_schema(tools, "required")
    refs = _refs(schema)
    assert len(refs) == 3, refs
    assert all(_resolves(schema, ref) for ref in refs), refs


@pytest.mark.parametrize("extra_fields", [0, 100], ids=["checked-inline", "checked-in-thread"])
def test_the_forced_schema_llamacpp_gets_has_the_references_rebased(
    make_stack: Callable[..., Stack], extra_fields: int
) -> None:
    """Through the gateway, small (checked on the loop) and large (checked in the worker
    thread, where the rebase now runs too): the body llama.cpp gets names the tool's
    `$defs` where they sit."""
    stack = make_stack(chat_template="qwen2.5")  # a template that writes tools
    parameters = json.loads(json.dumps(PYDANTIC_NESTED))
    for i in range(extra_fields):
        parameters["properties"][f"extra{i}"] = {"type": "string"}
    stack.fake.script.tokens = ['{"name": "f", "arguments": {"place": {"city": "Oslo"}}}']
    with httpx.Client(base_url=stack.url, headers=AUTH, timeout=10) as client:
        r = client.post(
            "/v1/chat/completions", json={**forced_tool_call(parameters), "max_tokens": 30}
        )
    assert r.status_code == 200, r.text
    sent = stack.fake.requests[-1]["json_schema"]
    refs = _refs(sent)
    assert refs and all(ref.startswith("#/properties/arguments") for ref in refs), refs
    assert all(_resolves(sent, ref) for ref in refs), refs
