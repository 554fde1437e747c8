"""The "describe" tools policy: tools written into the system prompt, calls parsed back
(pure: no I/O).

For a model whose chat template has no place for tools (SmolLM2's, Gemma's), as LiteLLM's
`add_function_to_prompt` does: each tool's name, description and JSON schema go into the
system prompt with an exact instruction for calling one, earlier calls and results in the
conversation are written as text in that same format, and a call the model writes in it
comes back as a real tool call (`tool_calls`, `tool_use`). The format is the one
render/tool_calls.py already parses (Hermes/Qwen's), so the parse-back is the same code:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

and a result goes back to the model in the next user turn as

    <tool_result name="get_weather">
    18 °C, sunny
    </tool_result>

The description is bounded by what the client sent: each schema once, compact (no
indentation), without the `$schema` URL; so the prompt grows with the tools' JSON, never a
multiple of it, and the prompt-size check and llama.cpp's context check answer an
oversized one as a 400 in the front door's shape.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from .tool_calls import ToolCallFilter
from .tools_policy import append_turn

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
DESCRIBED_HEADER = "X-Tools-Described"

_INTRO = (
    "You can call tools (functions) to help answer. Each tool is listed with its name, "
    "what it does, and the JSON schema of its arguments."
)
_HOW = (
    "To call a tool, write exactly one block per call, in this form, with the arguments as "
    "a JSON object that follows the tool's schema:\n"
    '<tool_call>{"name": "TOOL_NAME", "arguments": {"ARGUMENT": "VALUE"}}</tool_call>\n'
    "You may write a short text before the block; write nothing after the last block, and "
    "wait for the results. Each result comes back in the next user message as "
    '<tool_result name="TOOL_NAME">…</tool_result>.'
)
_ONE = "Call at most one tool in each answer: write one block, then wait for its result."
_AUTO = "If no tool is needed, answer in plain text without a block."
_REQUIRED = "You must call one of these tools now: answer with a <tool_call> block."
_NAMED = "You must call the tool {name} now: answer with a <tool_call> block for it."


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _schema(parameters: Any) -> Any:
    """The schema as the model sees it: `$schema` (a URL, draft 2020-12 from Claude Code)
    tells it nothing and costs tokens on every tool."""
    if isinstance(parameters, dict) and "$schema" in parameters:
        return {k: v for k, v in parameters.items() if k != "$schema"}
    return parameters if parameters is not None else {"type": "object"}


def describe_tools(tools: list[dict[str, Any]], tool_choice: Any, parallel: bool = True) -> str:
    """The system prompt text that offers these (OpenAI-shaped) tools to the model; not
    `parallel`: it is told to call one at most."""
    parts = [_INTRO, ""]
    for tool in tools:
        fn = tool["function"]
        parts.append(f"## {fn['name']}")
        description = fn.get("description")
        if description:
            parts.append(str(description).strip())
        parts.append(f"Arguments schema: {_compact(_schema(fn.get('parameters')))}")
        parts.append("")
    parts.append(_HOW)
    if not parallel:
        parts.append(_ONE)
    if tool_choice == "required":
        parts.append(_REQUIRED)
    elif isinstance(tool_choice, dict):
        parts.append(_NAMED.format(name=tool_choice["function"]["name"]))
    else:
        parts.append(_AUTO)
    return "\n".join(parts)


def _call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    arguments = fn.get("arguments")
    if isinstance(arguments, str):  # OpenAI clients send them as a JSON string
        # one that does not parse is written back as the string the client sent
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    return f"{CALL_OPEN}{_compact({'name': fn['name'], 'arguments': arguments})}{CALL_CLOSE}"


def _result_text(name: str | None, content: Any) -> str:
    text = content if isinstance(content, str) else "" if content is None else _compact(content)
    label = f' name="{name}"' if name else ""
    return f"<tool_result{label}>\n{text}\n</tool_result>"


def described_conversation(
    messages: list[dict[str, Any]], description: str | None
) -> list[dict[str, Any]]:
    """The conversation for a template without tools (a copy): the description appended to
    the first system message (or a system message first), assistant tool calls as
    <tool_call> blocks after their text, and tool results as <tool_result> blocks in a user
    message, merged with the user text around them so user and assistant still alternate
    (Gemma's template refuses two user turns in a row)."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    system_done = description is None
    last_has_result = False  # out[-1] is a user message holding a <tool_result>
    for message in messages:
        role = message["role"]
        if role == "system" and not system_done:
            system_done = True
            content = message.get("content") or ""
            out.append({"role": "system", "content": f"{content}\n\n{description}".lstrip()})
            last_has_result = False
            continue
        calls = message.get("tool_calls")
        if calls:
            for call in calls:
                call_id = call.get("id")
                if isinstance(call_id, str):
                    names[call_id] = call["function"]["name"]
            blocks = "\n".join(_call_text(call) for call in calls)
            text = message.get("content") or ""
            out.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
            last_has_result = False
            continue
        is_result = role == "tool"
        if is_result:
            name = message.get("name") or names.get(str(message.get("tool_call_id")))
            message = {"role": "user", "content": _result_text(name, message.get("content"))}
        last_has_result = append_turn(out, message, is_result, last_has_result)
    if not system_done:
        out.insert(0, {"role": "system", "content": description})
    return out


class DescribedCallFilter(ToolCallFilter):
    """The filter for described calls: a described call may follow text, which streams as
    it comes while a possible `<tool_call>` is held (ToolCallFilter's own behaviour, which
    the template formats share since a Hermes/Qwen call may follow text too)."""

    __slots__ = ()
