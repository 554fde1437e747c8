"""OpenAI's Responses API (stateless) as a front door (pure: no I/O).

The parser turns a `/v1/responses` body into the same CompletionRequest a chat completion
becomes; the encoders turn the pipeline's results back into the `response` object and its
streamed events (each with its `sequence_number`). Keys, limits, template, tool-call
parsing, routing and llama.cpp are the chat completions pipeline, unchanged.

Nothing is stored: `store: true` is accepted (and answered `store: false`), and what needs
a stored response (`previous_response_id`, `conversation`, `background`, item references)
is a 400 saying to send the whole input. Hosted tools this gateway cannot run (`web_search`,
`file_search`, ...) are dropped, not refused: Codex sends `web_search` on every request.
Errors are OpenAI's (`{"error": {"message", "type", "param", "code"}}`), as for chat.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest, ProxyError
from ..fastjson import dumps
from ..ids import unique_id
from ..request import CompletionRequest
from .fields import MAX_INT32, huge_int, is_int, number, typed
from .openai_request import (
    MAX_MESSAGES,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    has_lone_surrogate_escape,
    lone_surrogate_error,
    too_deep,
    too_deep_error,
)

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# A message item's role -> the template's (templates know no "developer": it is the system).
MESSAGE_ROLES = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
}
# Hosted tools: OpenAI runs them; a local model cannot. Dropped (docs/compatibility.md).
HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "code_interpreter",
        "image_generation",
        "computer_use_preview",
        "computer",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "custom",
        "tool_search",
    }
)
_TEXT_PARTS = ("input_text", "output_text", "text")


def _bad(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(f"Invalid '{param}': {message}", param=param, code=code)


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required"
    )


def _bounded_array(value: Any, param: str, what: str, limit: int, unit: str) -> None:
    """The 400 for a `value` that is no array (it `must be {what}`) or holds more than
    `limit` entries (OpenAI's code for an over-long array)."""
    if not isinstance(value, list):
        raise _bad(param, f"must be {what}")
    if len(value) > limit:
        raise _bad(param, f"at most {limit} {unit}, got {len(value)}", "array_above_max_length")


@dataclass
class ResponsesRequest:
    """A parsed Responses body: the pipeline's request and what the answer echoes back."""

    request: CompletionRequest
    echo: dict[str, Any] = field(default_factory=dict)
    """The `response` object's request fields (instructions, tools, tool_choice, ...)."""
    namespaces: dict[str, str] = field(default_factory=dict)
    """Flattened function name -> its namespace, to name it again in a function_call."""


# -- input ------------------------------------------------------------------------------------


def _text_content(value: Any, param: str) -> str:
    """A message's content: a string, or text parts (input_text/output_text) joined."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(param, "must be a string or an array of content parts")
    texts = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _bad(where, "must be a content part object")
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.text", "must be a string")
            texts.append(text)
        elif kind == "refusal":
            refusal = part.get("refusal")
            if not isinstance(refusal, str):
                raise _bad(f"{where}.refusal", "must be a string")
            texts.append(refusal)
        elif kind in ("input_image", "input_file", "input_audio"):
            raise _bad(
                f"{where}.type",
                f"content parts of type '{kind}' are not supported: this model takes text",
                "unsupported_content",
            )
        else:
            raise _bad(f"{where}.type", f"unknown content part type {kind!r}")
    return "\n".join(texts)


def _arguments(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, str):
        raise _bad(param, "must be a JSON object encoded as a string")
    try:
        parsed = json.loads(value) if value.strip() else {}
    except (ValueError, RecursionError):
        raise _bad(param, "must be a JSON object encoded as a string") from None
    if not isinstance(parsed, dict):
        raise _bad(param, "must be a JSON object encoded as a string")
    # Parsed here: the body's own checks never saw inside.
    if too_deep(parsed):
        raise too_deep_error(param)
    if has_lone_surrogate_escape(value, parsed):
        raise lone_surrogate_error(param)
    return parsed


def _add_message(out: list[dict[str, Any]], role: str, text: str) -> None:
    """Append a message, merged into the previous one when that is a plain message of the
    same role. Codex sends two developer messages and two user messages in a row, which
    templates that insist on alternating roles (Gemma 3's, Mistral's) refuse."""
    last = out[-1] if out else None
    if last is not None and last["role"] == role and "tool_calls" not in last:
        last["content"] = f"{last['content']}\n\n{text}"
    else:
        out.append({"role": role, "content": text})


def _input(value: Any) -> list[dict[str, Any]]:
    """`input` as the template's messages (function calls as an assistant's tool_calls,
    their outputs as tool messages)."""
    if value is None:
        raise _missing("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    _bounded_array(value, "input", "a string or an array of input items", MAX_MESSAGES, "items")
    out: list[dict[str, Any]] = []
    calls = 0
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(param, "must be an object")
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"  # EasyInputMessage: the type may be left out
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in MESSAGE_ROLES:
                raise _bad(
                    f"{param}.role",
                    f"must be 'user', 'assistant', 'system' or 'developer', not {role!r}",
                )
            content = item.get("content")
            if content is None:
                raise _missing(f"{param}.content")
            _add_message(out, MESSAGE_ROLES[role], _text_content(content, f"{param}.content"))
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{param}.call_id", "must be a non-empty string")
            if not isinstance(name, str) or not name:
                raise _bad(f"{param}.name", "must be a non-empty string")
            calls += 1
            if calls > MAX_TOOL_CALLS:
                raise _bad("input", f"the input holds more than {MAX_TOOL_CALLS} function calls")
            # Templates (HF convention) take the arguments as a mapping.
            call = {
                "id": call_id,
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": _arguments(item.get("arguments"), f"{param}.arguments"),
                },
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{param}.call_id", "must be a non-empty string")
            output = item.get("output")
            if output is None:
                raise _missing(f"{param}.output")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": _text_content(output, f"{param}.output"),
                }
            )
        elif kind == "reasoning":
            continue  # this gateway never emits one; a client's own is not the model's input
        elif kind == "item_reference":
            raise _bad(
                f"{param}.type",
                "item references need stored responses, and this gateway stores none: "
                "send the items themselves",
                "unsupported_parameter",
            )
        else:
            raise _bad(f"{param}.type", f"input items of type {kind!r} are not supported")
    if not out:
        raise _bad("input", "must hold at least one message")
    return out


# -- tools ----------------------------------------------------------------------------------


def _function_tool(tool: dict[str, Any], param: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(f"{param}.name", "must match ^[a-zA-Z0-9_.:-]{1,128}$")
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _bad(f"{param}.parameters", "must be a JSON Schema object")
    description = tool.get("description")
    if description is not None and not isinstance(description, str):
        raise _bad(f"{param}.description", "must be a string")
    strict = tool.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(f"{param}.strict", "must be a boolean")
    function: dict[str, Any] = {
        "name": name,
        "parameters": parameters or {"type": "object", "properties": {}},
    }
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def _tools(body: dict[str, Any], parsed: ResponsesRequest) -> list[dict[str, Any]] | None:
    """Function tools, namespaces flattened into theirs, hosted tools dropped."""
    tools = body.get("tools")
    if tools is None:
        return None
    _bounded_array(tools, "tools", "an array", MAX_TOOLS, "tools")
    out: list[dict[str, Any]] = []
    echoed: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(tool: dict[str, Any], param: str, namespace: str | None) -> None:
        mapped = _function_tool(tool, param)
        name = mapped["function"]["name"]
        if name in seen:
            raise _bad(f"{param}.name", f"two tools are named {name!r}")
        seen.add(name)
        if namespace is not None:
            parsed.namespaces[name] = namespace
        out.append(mapped)

    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(param, "must be an object")
        kind = tool.get("type")
        if kind == "function":
            add(tool, param, None)
            echoed.append(_echo_function(tool))
        elif kind == "namespace":
            namespace = tool.get("name")
            if not isinstance(namespace, str) or not namespace:
                raise _bad(f"{param}.name", "must be a non-empty string")
            inner = tool.get("tools")
            if not isinstance(inner, list):
                raise _bad(f"{param}.tools", "must be an array of function tools")
            for j, nested in enumerate(inner):
                where = f"{param}.tools[{j}]"
                if not isinstance(nested, dict):
                    raise _bad(where, "must be an object")
                if nested.get("type") == "function":
                    add(nested, where, namespace)
                    echoed.append(_echo_function(nested))
                elif not isinstance(nested.get("type"), str):
                    raise _bad(f"{where}.type", "must be a string")
            if len(out) > MAX_TOOLS:
                raise _bad(
                    "tools",
                    f"at most {MAX_TOOLS} functions in all namespaces",
                    "array_above_max_length",
                )
        elif isinstance(kind, str) and kind in HOSTED_TOOLS:
            continue  # run by OpenAI's servers; none here (docs/compatibility.md)
        else:
            raise _bad(f"{param}.type", f"unknown tool type {kind!r}")
    parsed.echo["tools"] = echoed
    return out or None


def _echo_function(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> Any:
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return None if choice is None else "auto"
    if choice in ("none", "required"):
        if choice == "required" and not tools:
            raise _bad("tool_choice", "'required' needs function tools in 'tools'")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        names = {t["function"]["name"] for t in tools or ()}
        if not isinstance(name, str) or name not in names:
            raise _bad("tool_choice", f"names no function tool in 'tools': {name!r}")
        return {"type": "function", "function": {"name": name}}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        mode = choice.get("mode")
        if mode not in ("auto", "required"):
            raise _bad("tool_choice.mode", "must be 'auto' or 'required'")
        return mode
    raise _bad(
        "tool_choice",
        "must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}; hosted "
        "tools cannot run on this gateway",
    )


def _allowed_tools(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> Any:
    """The function tools `tool_choice: {"type": "allowed_tools", "tools": [...]}` leaves
    offered (all of them for any other choice). Offering them all would let `required`
    force a call of a tool the client ruled out."""
    choice = body.get("tool_choice")
    if not (isinstance(choice, dict) and choice.get("type") == "allowed_tools"):
        return tools
    listed = choice.get("tools")
    if not isinstance(listed, list):
        raise _bad("tool_choice.tools", "must be an array of tools")
    wanted = set()
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict):
            raise _bad(f"tool_choice.tools[{i}]", "must be an object")
        if entry.get("type") == "function":
            name = entry.get("name")
            if not isinstance(name, str):
                raise _bad(f"tool_choice.tools[{i}].name", "must be a string")
            wanted.add(name)
        # A hosted tool listed here was dropped with the others: nothing to offer.
    allowed = [t for t in tools or () if t["function"]["name"] in wanted]
    if not allowed and choice.get("mode") == "required":
        raise _bad("tool_choice.tools", "names no function tool in 'tools'")
    return allowed or None


def _text_format(body: dict[str, Any], parsed: ResponsesRequest) -> dict[str, Any] | None:
    """`text.format` as the schema llama.cpp constrains the output with (as response_format)."""
    text = body.get("text")
    if text is None:
        parsed.echo["text"] = {"format": {"type": "text"}}
        return None
    if not isinstance(text, dict):
        raise _bad("text", "must be an object")
    verbosity = text.get("verbosity")
    if verbosity is not None and verbosity not in ("low", "medium", "high"):
        raise _bad("text.verbosity", "must be 'low', 'medium' or 'high'")
    fmt = text.get("format")
    parsed.echo["text"] = {"format": fmt if fmt is not None else {"type": "text"}}
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        name, schema = fmt.get("name"), fmt.get("schema")
        if not isinstance(name, str) or not name:
            raise _bad("text.format.name", "must be a non-empty string")
        if not isinstance(schema, dict):
            raise _bad("text.format.schema", "must be a JSON Schema object")
        strict = fmt.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad("text.format.strict", "must be a boolean")
        return schema
    raise _bad("text.format.type", "must be 'text', 'json_object' or 'json_schema'")


def _stateful(body: dict[str, Any]) -> None:
    """Refuse what needs a stored response; this gateway stores none."""
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise _bad(
                name,
                "this gateway stores no responses (it is stateless): send the whole "
                "conversation in 'input' instead",
                "unsupported_parameter",
            )
    if body.get("background") is True:
        raise _bad(
            "background",
            "background responses need storage; this gateway has none",
            "unsupported_parameter",
        )
    if body.get("prompt") is not None:
        raise _bad(
            "prompt",
            "stored prompt templates are not available on this gateway",
            "unsupported_parameter",
        )


def _accepted_extras(body: dict[str, Any]) -> None:
    """Type-check what is accepted and ignored (Codex's extras among them), so a typo is
    still a clear 400."""
    for name in ("store", "parallel_tool_calls", "background"):
        typed(body, name, bool, "a boolean", _bad)
    for name in (
        "prompt_cache_key",
        "safety_identifier",
        "service_tier",
        "user",
        "prompt_cache_retention",
    ):
        typed(body, name, str, "a string", _bad)
    for name in ("reasoning", "client_metadata", "metadata", "stream_options"):
        typed(body, name, dict, "an object", _bad)
    include = body.get("include")
    if include is not None and (
        not isinstance(include, list) or not all(isinstance(s, str) for s in include)
    ):
        raise _bad("include", "must be an array of strings")
    truncation = body.get("truncation")
    if truncation is not None and truncation not in ("auto", "disabled"):
        raise _bad("truncation", "must be 'auto' or 'disabled'")
    for name in ("top_logprobs", "max_tool_calls"):
        value = body.get(name)
        value = huge_int(value) or value
        if value is not None and not is_int(value):
            raise _bad(name, f"must be an integer, not {type(value).__name__}")
        if value is not None and value < 0:
            raise _bad(name, "must not be negative")
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and not all(isinstance(v, str) for v in metadata.values()):
        raise _bad("metadata", "values must be strings")


def parse_responses_request(body: dict[str, Any]) -> ResponsesRequest:
    """Validate a Responses body into the chat pipeline's request (plus what to echo)."""
    _stateful(body)
    _accepted_extras(body)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > 256):
        raise _bad("model", "must be a string of at most 256 characters")
    request = CompletionRequest(chat=True, model=model or None)
    parsed = ResponsesRequest(request)
    messages = _input(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", "must be a string")
        if messages[0]["role"] == "system":  # one system turn, for the same templates
            messages[0]["content"] = f"{instructions}\n\n{messages[0]['content']}"
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    request.messages = messages
    request.tools = _tools(body, parsed)
    request.tool_choice = _tool_choice(body, request.tools)
    request.tools = _allowed_tools(body, request.tools)
    if request.tools is None and request.tool_choice == "auto":
        request.tool_choice = None  # nothing left to offer
    request.parallel_tool_calls = body.get("parallel_tool_calls") is not False
    max_output = body.get("max_output_tokens")
    max_output = huge_int(max_output) or max_output
    if max_output is not None:
        if not is_int(max_output):
            name = type(max_output).__name__
            raise _bad("max_output_tokens", f"must be an integer, not {name}")
        if not 1 <= max_output <= MAX_INT32:
            raise _bad("max_output_tokens", f"must be between 1 and {MAX_INT32}, not {max_output}")
        request.max_tokens = max_output
    request.temperature = number(body, "temperature", 0, 2, _bad)
    request.top_p = number(body, "top_p", 0, 1, _bad)
    request.json_schema = _text_format(body, parsed)
    stream = typed(body, "stream", bool, "a boolean", _bad)
    request.stream = bool(stream)
    user = body.get("safety_identifier") or body.get("user")
    request.user = user or None  # names the conversation for server affinity
    echo = parsed.echo
    echo["instructions"] = instructions
    echo["max_output_tokens"] = max_output
    echo["temperature"] = request.temperature if request.temperature is not None else 1.0
    echo["top_p"] = request.top_p if request.top_p is not None else 1.0
    echo["parallel_tool_calls"] = body.get("parallel_tool_calls") is not False
    choice = body.get("tool_choice")
    echo["tool_choice"] = choice if choice is not None else "auto"
    echo["metadata"] = body.get("metadata") or {}
    echo.setdefault("tools", [])
    if body.get("prompt_cache_key") is not None:
        echo["prompt_cache_key"] = body["prompt_cache_key"]
    return parsed


# -- answers --------------------------------------------------------------------------------


def new_response_id() -> str:
    """`resp_...`, unique."""
    return unique_id("resp_")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """The Responses usage object (cached tokens are a part of the input tokens)."""
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_object(
    response_id: str,
    created_at: int,
    model: str,
    echo: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `response` object at a given status (in_progress, completed, incomplete, failed)."""
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": echo.get("instructions"),
        "max_output_tokens": echo.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": echo.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,  # nothing is retained, whatever was asked
        "temperature": echo.get("temperature", 1.0),
        "text": echo.get("text", {"format": {"type": "text"}}),
        "tool_choice": echo.get("tool_choice", "auto"),
        "tools": echo.get("tools", []),
        "top_p": echo.get("top_p", 1.0),
        "truncation": "disabled",
        "metadata": echo.get("metadata", {}),
    }
    if usage_ is not None:  # not nullable: absent until the response ends
        response["usage"] = usage_
    return response


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant message output item with one output_text part."""
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call_items(
    calls: list[dict[str, Any]], namespaces: dict[str, str]
) -> list[dict[str, Any]]:
    """Parsed (chat-shaped) tool calls as function_call output items."""
    items = []
    for call in calls:
        fn = call["function"]
        item: dict[str, Any] = {
            "type": "function_call",
            "id": unique_id("fc_"),
            "call_id": call["id"],
            "name": fn["name"],
            "arguments": fn["arguments"],
            "status": "completed",
        }
        namespace = namespaces.get(fn["name"])
        if namespace is not None:
            item["namespace"] = namespace
        items.append(item)
    return items


def status_of(stop_type: str | None, calls: bool) -> str:
    """A response cut by the token limit is incomplete (llama-server's own says completed)."""
    return "incomplete" if stop_type == "limit" and not calls else "completed"


def final_output(
    text: str, calls: list[dict[str, Any]] | None, status: str, namespaces: dict[str, str]
) -> list[dict[str, Any]]:
    """The output items of a finished generation: its text (if any, or if nothing else),
    then its function calls."""
    output: list[dict[str, Any]] = []
    if text or not calls:
        output.append(message_item(unique_id("msg_"), text, status))
    if calls:
        output.extend(function_call_items(calls, namespaces))
    return output


class EventEncoder:
    """Builds the server-sent events of one streamed response, as bytes.

    The text delta is the hot path: everything but the text and the sequence number is
    pre-rendered when the message item opens, so a token costs one JSON encoding of its
    text and one integer, as in ChunkEncoder.
    """

    def __init__(
        self,
        response_id: str,
        created_at: int,
        model: str,
        echo: dict[str, Any],
        namespaces: dict[str, str],
    ) -> None:
        self.response_id = response_id
        self.created_at = created_at
        self.model = model
        self.echo = echo
        self.namespaces = namespaces
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # items done
        self._message_id: str | None = None  # the open message item
        self._texts: list[str] = []
        self._delta_head = b""

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data["sequence_number"] = self.sequence
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, **data}) + b"\n\n"

    def _response(self, status: str, usage_: dict[str, Any] | None = None) -> dict[str, Any]:
        return response_object(
            self.response_id,
            self.created_at,
            self.model,
            self.echo,
            status=status,
            output=list(self.output),
            usage_=usage_,
        )

    def start(self) -> bytes:
        """response.created and response.in_progress."""
        return self._event(
            "response.created", {"response": self._response("in_progress")}
        ) + self._event("response.in_progress", {"response": self._response("in_progress")})

    def _open_message(self) -> bytes:
        message_id = self._message_id = unique_id("msg_")
        index = len(self.output)
        out = self._event(
            "response.output_item.added",
            {
                "output_index": index,
                "item": {
                    "type": "message",
                    "id": message_id,
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                },
            },
        )
        out += self._event(
            "response.content_part.added",
            {
                "item_id": message_id,
                "output_index": index,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            },
        )
        self._delta_head = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"item_id":' + dumps(message_id) + b',"output_index":%d,"content_index":0,'
            b'"logprobs":[],"delta":' % index
        )
        return out

    def text(self, text: str) -> bytes:
        """An output_text delta (opening the message item first when none is open)."""
        head = b"" if self._message_id is not None else self._open_message()
        self._texts.append(text)
        sequence = self.sequence
        self.sequence = sequence + 1
        return b'%s%s%s,"sequence_number":%d}\n\n' % (head, self._delta_head, dumps(text), sequence)

    def _close_message(self, status: str) -> bytes:
        message_id = self._message_id
        if message_id is None:
            return b""
        self._message_id = None
        text = "".join(self._texts)
        self._texts = []
        index = len(self.output)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = message_item(message_id, text, status)
        out = self._event(
            "response.output_text.done",
            {
                "item_id": message_id,
                "output_index": index,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            },
        )
        out += self._event(
            "response.content_part.done",
            {"item_id": message_id, "output_index": index, "content_index": 0, "part": part},
        )
        out += self._event("response.output_item.done", {"output_index": index, "item": item})
        self.output.append(item)
        return out

    def finish(
        self,
        stop_type: str | None,
        calls: list[dict[str, Any]],
        usage_: dict[str, Any],
    ) -> bytes:
        """Close the message, add each function call (arguments whole: a call is parsed
        whole before it can be told apart from text), then response.completed or
        response.incomplete with the usage."""
        status = status_of(stop_type, bool(calls))
        out = b""
        if self._message_id is None and not calls:
            out += self._open_message()  # an empty answer is still a message
        out += self._close_message(status)
        for item in function_call_items(calls, self.namespaces):
            index = len(self.output)
            out += self._event(
                "response.output_item.added",
                {"output_index": index, "item": {**item, "arguments": "", "status": "in_progress"}},
            )
            out += self._event(
                "response.function_call_arguments.delta",
                {"item_id": item["id"], "output_index": index, "delta": item["arguments"]},
            )
            out += self._event(
                "response.function_call_arguments.done",
                {
                    "item_id": item["id"],
                    "output_index": index,
                    "name": item["name"],
                    "arguments": item["arguments"],
                },
            )
            out += self._event("response.output_item.done", {"output_index": index, "item": item})
            self.output.append(item)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._event(kind, {"response": self._response(status, usage_)})

    def error(self, error: ProxyError) -> bytes:
        """What ends a stream that already started with a failure, as OpenAI's does: the
        `error` event, then the terminal `response.failed`, whose response carries the error
        (Codex reads the message there). Its code is one of the Responses API's
        (`rate_limit_exceeded`, else `server_error`); the `error` event has ours."""
        failed = self._response("failed")
        failed["error"] = {
            "code": "rate_limit_exceeded" if error.status == 429 else "server_error",
            "message": error.message,
        }
        return self._event(
            "error",
            {
                "code": error.code or error.error_type,
                "message": error.message,
                "param": error.param,
            },
        ) + self._event("response.failed", {"response": failed})
