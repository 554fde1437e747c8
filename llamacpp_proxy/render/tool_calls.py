"""Tool calls: the grammar that forces one, and parsing calls back out of model text.

Models write calls in their template's format: Hermes/Qwen `<tool_call>{...}</tool_call>`,
Mistral `[TOOL_CALLS] [...]`, Llama 3 a bare `{"name": ..., "parameters": ...}` (optionally
after `<|python_tag|>`). Anything that parses as calls to the offered tools becomes OpenAI
`tool_calls`; anything else stays content.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .. import fastjson
from ..ids import unique_id
from .schema_limits import NAMED_SCHEMAS

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_CALL_OPEN = "<tool_call>"
_MARKERS = (_CALL_OPEN, "[TOOL_CALLS]", "<|python_tag|>")
_JSON_STARTS = ("{", "[")


def forced_call_schema(tools: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema that makes the model call a tool, when tool_choice demands one. The
    tools' parameters go in as they are: rebase_tool_references then points their
    references where they now sit (it costs as much as the parameters are large, so it runs
    with the constraint's check, off the event loop for a large one)."""
    if tool_choice == "required":
        chosen = tools
    elif isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == name]
    else:
        return None
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for t in chosen
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def rebase_tool_references(forced: dict[str, Any]) -> None:
    """In a schema from forced_call_schema (changed in place: it is the gateway's own, not
    the client's), each tool's parameters with their local references (`#`,
    `#/$defs/...`, as Pydantic writes nested models) pointing where they now sit: nested
    under `arguments`, `#/$defs/X` would name nothing at the new root, and llama.cpp
    refuses a reference it cannot resolve."""
    options = forced.get("anyOf")
    if isinstance(options, list):
        for i, option in enumerate(options):
            _rebase_option(option, f"#/anyOf/{i}/properties/arguments")
    else:
        _rebase_option(forced, "#/properties/arguments")


def _rebase_option(option: dict[str, Any], base: str) -> None:
    properties = option["properties"]
    properties["arguments"] = _rebased(properties["arguments"], base)


_DATA = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are data, not schemas: a `$ref` key in them is not a reference."""


def _rebased(parameters: Any, base: str) -> Any:
    """A tool's parameters with their local references (`#`, `#/$defs/...`, as Pydantic
    writes nested models) pointing where the forced call's schema puts them (`base`):
    nested under `arguments`, `#/$defs/X` would name nothing at the new root, and llama.cpp
    refuses a reference it cannot resolve. A copy, made only when there is a reference: the
    client's tools also go to the chat template as they are."""
    if not isinstance(parameters, dict) or b'"$ref"' not in fastjson.dumps(parameters):
        return parameters
    root: dict[str, Any] = {}
    # `names`: the node maps names to schemas (`properties`, `$defs`): its keys are not
    # keywords, so a property named "default" or "$ref" is a schema like any other.
    stack: list[tuple[Any, dict[str, Any] | list[Any], str | int, bool]] = [
        (parameters, root, "", False)
    ]
    while stack:  # iterative: a schema may nest deeper than Python's recursion limit
        node, parent, key, names = stack.pop()
        if isinstance(node, dict):
            copy: dict[str, Any] = {}
            for name, value in node.items():
                if (
                    not names
                    and name == "$ref"
                    and isinstance(value, str)
                    and value[:2] in ("#", "#/")
                ):
                    copy[name] = base + value[1:]
                else:
                    copy[name] = value  # in its place: a schema's keys keep their order
                    if (names or name not in _DATA) and isinstance(value, dict | list):
                        # replaced by its copy
                        stack.append((value, copy, name, not names and name in NAMED_SCHEMAS))
            parent[key] = copy  # type: ignore[index]
        else:
            items: list[Any] = list(node)
            for i, value in enumerate(items):
                if isinstance(value, dict | list):
                    stack.append((value, items, i, False))
            parent[key] = items  # type: ignore[index]
    return root[""]


def _call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    nested = obj.get("function")
    fn: dict[str, Any] = nested if isinstance(nested, dict) else obj
    name = fn.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    arguments = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": unique_id("call_"),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _calls_from_json(text: str, names: set[str]) -> list[dict[str, Any]] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def parse_tool_calls(
    text: str, tools: list[dict[str, Any]], parallel: bool = True
) -> tuple[str | None, list[dict[str, Any]]] | None:
    """(content, calls) if the text calls offered tools, else None (it is plain content).
    Not `parallel` (the client asked for one call at most): only the first call is kept;
    the model was told so, and a client that said so may not handle a second."""
    found = _parse_calls(text, tools)
    if found is None or parallel:
        return found
    content, calls = found
    return content, calls[:1]


def _parse_calls(
    text: str, tools: list[dict[str, Any]]
) -> tuple[str | None, list[dict[str, Any]]] | None:
    names = {t["function"]["name"] for t in tools}
    stripped = text.strip()
    if "<tool_call>" in stripped:
        calls = []
        for block in _BLOCK.findall(stripped):
            parsed = _calls_from_json(block, names)
            if parsed is None:
                return None
            calls.extend(parsed)
        content = stripped[: stripped.index("<tool_call>")].strip()
        return (content or None), calls
    for marker in ("[TOOL_CALLS]", "<|python_tag|>"):
        if stripped.startswith(marker):
            parsed = _calls_from_json(stripped[len(marker) :].strip(), names)
            return (None, parsed) if parsed else None
    if stripped.startswith(_JSON_STARTS):
        parsed = _calls_from_json(stripped, names)
        return (None, parsed) if parsed else None
    return None


class ToolCallFilter:
    """Holds back streamed text while it may be (the start of) a tool call.

    Plain answers still stream: as soon as the text cannot begin a call, what was held is
    released and passes through. From then on only a `<tool_call>` (or its first characters
    at the end of a read) is held, since a Hermes/Qwen call may follow text ("Let me check.
    <tool_call>..."): `parse_tool_calls` takes it as a call when the answer is not
    streamed, so the stream must too, or one model output would be a call or text
    depending on `stream`. At the end a held call that parses becomes a tool call, and one
    that does not is sent as the text it was.
    """

    __slots__ = ("_held", "_mode", "_parallel", "_tools")

    def __init__(self, tools: list[dict[str, Any]], forced: bool, parallel: bool = True) -> None:
        self._tools = tools
        self._parallel = parallel
        self._held = ""
        self._mode = "hold" if not forced else "call"  # hold | scan | call

    def feed(self, text: str) -> str:
        """Text to send now ("" while holding)."""
        if self._mode == "scan":
            return self._scan(text)
        self._held += text
        if self._mode == "call":
            return ""
        head = self._held.lstrip()
        if not head:
            return ""
        if head.startswith(_MARKERS + _JSON_STARTS):
            self._mode = "call"
            return ""
        if any(marker.startswith(head) for marker in _MARKERS):
            return ""  # could still become a marker
        # Not a call at the start: from now on, watch for a block after the text.
        self._mode = "scan"
        released, self._held = self._held, ""
        return self._scan(released)

    def _scan(self, text: str) -> str:
        held = self._held
        if not held and "<" not in text:
            return text  # the common token: nothing that could begin a block
        buffer = held + text
        at = buffer.find(_CALL_OPEN)
        if at >= 0:
            self._mode = "call"
            self._held = buffer[at:]
            return buffer[:at]
        # The end of this read may be the first characters of the marker: keep them back.
        cut = buffer.find("<", max(0, len(buffer) - len(_CALL_OPEN) + 1))
        while cut >= 0 and not _CALL_OPEN.startswith(buffer[cut:]):
            cut = buffer.find("<", cut + 1)
        if cut >= 0:
            self._held = buffer[cut:]
            return buffer[:cut]
        self._held = ""
        return buffer

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: (text still to send, tool calls) — calls empty when it was text."""
        held, self._held = self._held, ""
        if self._mode != "call" or not held:
            return held, []
        return self._parsed(held)

    def _parsed(self, held: str) -> tuple[str, list[dict[str, Any]]]:
        """What was held, as (text before the calls, calls), or as (text, []) when it does
        not parse as calls of the offered tools."""
        parsed = parse_tool_calls(held, self._tools, self._parallel)
        if parsed is None:
            return held, []
        content, calls = parsed
        return content or "", calls
