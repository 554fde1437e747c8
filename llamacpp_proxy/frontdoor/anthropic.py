"""Anthropic's Messages API as a front door (pure: no I/O).

The parser turns a `/v1/messages` (or `/count_tokens`) body into the same CompletionRequest
a chat completion becomes; the encoders turn the pipeline's results back into Anthropic's
message object, its streamed events, and its error bodies. Everything between (keys,
limits, template, routing, llama.cpp) is the chat completions pipeline, unchanged.

Bad input is a 400 whose `param` and message name the field the way Anthropic does
(`messages.0.content.1.type`). Fields Anthropic defines that a local model cannot honour
are accepted and ignored where ignoring them is harmless (`thinking`, `cache_control`,
`context_management`, `output_config`, `service_tier`), refused where the answer would be
wrong without them (`image`/`document` blocks, server tools).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ContextLengthExceeded, InvalidRequest, ProxyError, ServerOverloaded
from ..fastjson import dumps
from ..ids import unique_id
from ..request import CompletionRequest
from .fields import MAX_INT32, huge_int, is_int, number, typed
from .openai_request import MAX_MESSAGES, MAX_STOP, MAX_TOOL_CALLS, MAX_TOOLS

ROLES = ("user", "assistant", "system")  # system: Claude Code sends it inside messages
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")  # Anthropic's own rule for tool names

STOP_REASONS = {"eos": "end_turn", "word": "stop_sequence", "limit": "max_tokens"}


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param, code="invalid_value")


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: Field required", param=param, code="missing_required")


def _text_blocks(value: Any, param: str) -> str:
    """A string, or text blocks (their cache_control and citations ignored) joined."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(param, "must be a string or an array of text blocks")
    texts = []
    for i, block in enumerate(value):
        where = f"{param}.{i}"
        if not isinstance(block, dict):
            raise _bad(where, "must be an object")
        kind = block.get("type")
        if kind != "text":
            if kind in ("image", "document"):
                raise _unsupported_media(where, kind)
            raise _bad(f"{where}.type", f"must be 'text', not {kind!r}")
        text = block.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text", "must be a string")
        texts.append(text)
    return "\n".join(texts)


def _unsupported_media(param: str, kind: str) -> InvalidRequest:
    return InvalidRequest(
        f"{param}: '{kind}' blocks are not supported: this model takes text only",
        param=f"{param}.type",
        code="unsupported_content",
    )


@dataclass
class _Turn:
    """What one Anthropic message becomes: template messages, in order."""

    messages: list[dict[str, Any]]
    tool_calls: int


def _user_turn(content: Any, param: str) -> _Turn:
    if isinstance(content, str):
        return _Turn([{"role": "user", "content": content}], 0)
    if not isinstance(content, list):
        raise _bad(param, "must be a string or an array of content blocks")
    # tool_result blocks become the template's tool messages, in the order they came;
    # the text around them stays one user message after them (Anthropic puts results first).
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for i, block in enumerate(content):
        where = f"{param}.{i}"
        if not isinstance(block, dict):
            raise _bad(where, "must be an object")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.text", "must be a string")
            texts.append(text)
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise _bad(f"{where}.tool_use_id", "must be a string")
            result = block.get("content")
            text = "" if result is None else _text_blocks(result, f"{where}.content")
            is_error = block.get("is_error")
            if is_error is not None and not isinstance(is_error, bool):
                raise _bad(f"{where}.is_error", "must be a boolean")
            if is_error:
                # The template has no field for it; the model still has to know.
                text = f"Error: {text}"
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind in ("image", "document"):
            raise _unsupported_media(where, kind)
        else:
            raise _bad(f"{where}.type", f"must be 'text' or 'tool_result' here, not {kind!r}")
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return _Turn(out, 0)


def _assistant_turn(content: Any, param: str) -> _Turn:
    if isinstance(content, str):
        return _Turn([{"role": "assistant", "content": content}], 0)
    if not isinstance(content, list):
        raise _bad(param, "must be a string or an array of content blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        where = f"{param}.{i}"
        if not isinstance(block, dict):
            raise _bad(where, "must be an object")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.text", "must be a string")
            texts.append(text)
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str):
                raise _bad(f"{where}.id", "must be a string")
            if not isinstance(name, str):
                raise _bad(f"{where}.name", "must be a string")
            if not isinstance(arguments, dict):
                raise _bad(f"{where}.input", "must be an object")
            # The HF template convention: arguments as a mapping, not a JSON string.
            function: dict[str, Any] = {"name": name, "arguments": arguments}
            calls.append({"id": call_id, "type": "function", "function": function})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # clients send earlier turns back as they got them; a local model has none
        elif kind in ("image", "document"):
            raise _unsupported_media(where, kind)
        else:
            raise _bad(f"{where}.type", f"must be 'text' or 'tool_use' here, not {kind!r}")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = calls
    return _Turn([message], len(calls))


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    value = body.get("messages")
    if value is None:
        raise _missing("messages")
    if not isinstance(value, list):
        raise _bad("messages", "must be an array of message objects")
    if not value:
        raise _bad("messages", "must contain at least one message")
    if len(value) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages, got {len(value)}")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_blocks(system, "system")})
    tool_calls = 0
    for i, message in enumerate(value):
        param = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(param, "must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{param}.role", f"must be 'user' or 'assistant', not {role!r}")
        content = message.get("content")
        if content is None:
            raise _missing(f"{param}.content")
        if role == "system":
            out.append({"role": "system", "content": _text_blocks(content, f"{param}.content")})
            continue
        turn = (_user_turn if role == "user" else _assistant_turn)(content, f"{param}.content")
        tool_calls += turn.tool_calls
        if tool_calls > MAX_TOOL_CALLS:
            raise _bad(param, f"the messages hold more than {MAX_TOOL_CALLS} tool_use blocks")
        out.extend(turn.messages)
        # Each tool_result block is a message of its own for the template: the bound on
        # what one request makes the template render counts those, not Anthropic's turns.
        if len(out) > MAX_MESSAGES:
            raise _bad(
                param,
                f"the messages hold more than {MAX_MESSAGES} messages and tool_result blocks",
            )
    return out


def system_folded(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation with every system message (the `system` field and the
    `role: "system"` messages inside `messages`) joined into one leading system message, for
    a template that allows a system turn only first (Gemma 3's, Mistral's); None when there
    is nothing to fold. Claude Code sends a system message after the user's (its agents and
    skills), which those templates refuse."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    if len(systems) < 2 and (not systems or messages[0]["role"] == "system"):
        return None
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": "\n\n".join(systems)}, *rest]


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    mapped_choice: Any = None
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "auto":
            mapped_choice = "auto"
        elif kind == "any":
            mapped_choice = "required"
        elif kind == "none":
            mapped_choice = "none"
        elif kind == "tool":
            name = choice.get("name")
            if not isinstance(name, str):
                raise _bad("tool_choice.name", "must be a string")
            mapped_choice = {"type": "function", "function": {"name": name}}
        else:
            raise _bad("tool_choice.type", "must be 'auto', 'any', 'tool' or 'none'")
        if "disable_parallel_tool_use" in choice and not isinstance(
            choice["disable_parallel_tool_use"], bool
        ):
            raise _bad("tool_choice.disable_parallel_tool_use", "must be a boolean")
    if tools is None:
        if mapped_choice not in (None, "auto", "none"):
            raise _bad("tool_choice", "needs 'tools'")
        return None, mapped_choice
    if not isinstance(tools, list):
        raise _bad("tools", "must be an array")
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad(where, "must be an object")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise InvalidRequest(
                f"{where}.type: server tools ({kind!r}) cannot run on this gateway; "
                "send client tools (name, description, input_schema)",
                param=f"{where}.type",
                code="unsupported_tool",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _bad(f"{where}.name", "must match ^[a-zA-Z0-9_-]{1,128}$")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"{where}.input_schema", "must be a JSON Schema object")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad(f"{where}.description", "must be a string")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if description:
            function["description"] = description
        out.append({"type": "function", "function": function})
    if isinstance(mapped_choice, dict):
        wanted = mapped_choice["function"]["name"]
        if wanted not in {t["function"]["name"] for t in out}:
            raise _bad("tool_choice.name", f"names no tool in 'tools': {wanted!r}")
    return (out or None), mapped_choice


def _stop_sequences(body: dict[str, Any]) -> list[str]:
    value = body.get("stop_sequences")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad("stop_sequences", "must be an array of strings")
    if len(value) > MAX_STOP:
        raise _bad("stop_sequences", f"at most {MAX_STOP} sequences")
    if any(s == "" for s in value):
        raise _bad("stop_sequences", "sequences must not be empty")
    return list(value)


def _ignored_extras(body: dict[str, Any]) -> None:
    """Type-check what is accepted and ignored, so a typo is still a clear 400."""
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled", "adaptive"):
            raise _bad("thinking.type", "must be 'enabled', 'disabled' or 'adaptive'")
    for name in ("context_management", "output_config"):
        typed(body, name, dict, "an object", _bad)
    for name in ("service_tier", "container"):
        typed(body, name, str, "a string", _bad)


def parse_messages_request(body: dict[str, Any], *, count_only: bool = False) -> CompletionRequest:
    """Validate an Anthropic Messages body into the chat pipeline's request.

    `count_only` (count_tokens) needs neither `max_tokens` nor sampling fields."""
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise _bad("model", "must be a non-empty string of at most 256 characters")
    request = CompletionRequest(chat=True, model=model)
    request.messages = _messages(body)
    request.tools, request.tool_choice = _tools(body)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        request.parallel_tool_calls = False
    if count_only:
        return request
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _missing("max_tokens")
    # No upper bound here: the front door caps it at --max-tokens-limit (clients send their
    # model's maximum), so a larger count is capped like any other, never refused.
    max_tokens = huge_int(max_tokens) or max_tokens
    if not is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens", f"must be an integer of at least 1, not {max_tokens!r}")
    request.max_tokens = min(max_tokens, MAX_INT32)
    request.temperature = number(body, "temperature", 0, 1, _bad)
    request.top_p = number(body, "top_p", 0, 1, _bad)
    top_k = body.get("top_k")
    if top_k is not None:
        if not is_int(top_k) or not 0 <= top_k <= MAX_INT32:
            raise _bad("top_k", "must be a non-negative integer")
        request.extensions["top_k"] = top_k
    request.stop = _stop_sequences(body)
    request.stream = bool(typed(body, "stream", bool, "a boolean", _bad))
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata", "must be an object")
        user = metadata.get("user_id")
        if user is not None and not isinstance(user, str):
            raise _bad("metadata.user_id", "must be a string")
        request.user = user or None  # names the conversation for server affinity
    _ignored_extras(body)
    return request


# -- answers --------------------------------------------------------------------------------


def new_message_id() -> str:
    """`msg_...`, unique."""
    return unique_id("msg_")


def stop_reason(stop_type: str | None, tool_use: bool) -> str:
    """llama.cpp's stop_type as Anthropic's stop_reason."""
    if tool_use:
        return "tool_use"
    return STOP_REASONS.get(stop_type or "eos", "end_turn")


def usage(result: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage from a llama.cpp result: input_tokens are the prompt tokens it
    evaluated, cache_read_input_tokens those it reused from the slot's cache."""
    timings = result.get("timings")
    cache_n = timings.get("cache_n") if isinstance(timings, dict) else None
    cached = cache_n if isinstance(cache_n, int) and cache_n > 0 else 0
    evaluated = int(result.get("tokens_evaluated") or 0)
    return {
        "input_tokens": max(0, evaluated - cached),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": int(result.get("tokens_predicted") or 0),
    }


def tool_use_blocks(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped parsed tool calls as Anthropic tool_use blocks (fresh toolu_ ids)."""
    return [
        {
            "type": "tool_use",
            "id": unique_id("toolu_"),
            "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"]),
        }
        for call in calls
    ]


def message_response(
    message_id: str,
    model: str,
    text: str,
    calls: list[dict[str, Any]] | None,
    result: dict[str, Any],
) -> dict[str, Any]:
    """A non-streamed Anthropic message."""
    content: list[dict[str, Any]] = []
    if text:
        content.append({"type": "text", "text": text})
    if calls:
        content.extend(tool_use_blocks(calls))
    reason = stop_reason(result.get("stop_type"), bool(calls))
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": _stop_sequence(result, reason),
        "usage": usage(result),
    }


def _stop_sequence(result: dict[str, Any], reason: str) -> str | None:
    word = result.get("stopping_word")
    return word if reason == "stop_sequence" and isinstance(word, str) and word else None


def _event(name: bytes, data: Any) -> bytes:
    return b"event: " + name + b"\ndata: " + dumps(data) + b"\n\n"


class EventEncoder:
    """Builds the server-sent events of one streamed message, as bytes.

    The text delta is the hot path: everything but the block index and the text is
    pre-rendered, so a token costs one JSON encoding of its text, as in ChunkEncoder.
    """

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self.index = -1  # the open content block; -1: none yet
        self.open_kind: str | None = None
        self._pinged = False
        self._delta_head = b""

    def start(self, input_usage: dict[str, int]) -> bytes:
        """message_start: the empty message with the prompt's token counts."""
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**input_usage, "output_tokens": 0},
        }
        return _event(b"message_start", {"type": "message_start", "message": message})

    def _open(self, block: dict[str, Any]) -> bytes:
        out = self.close()
        self.index += 1
        self.open_kind = block["type"]
        out += _event(
            b"content_block_start",
            {"type": "content_block_start", "index": self.index, "content_block": block},
        )
        if not self._pinged:  # Anthropic's order: the first block's start, then a ping
            self._pinged = True
            out += b'event: ping\ndata: {"type":"ping"}\n\n'
        return out

    def close(self) -> bytes:
        """content_block_stop for the open block, if any."""
        if self.open_kind is None:
            return b""
        self.open_kind = None
        return b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n' % (
            self.index
        )

    def text(self, text: str) -> bytes:
        """A text_delta (opening a text block first when none is open)."""
        head = b""
        if self.open_kind != "text":
            head = self._open({"type": "text", "text": ""})
            self._delta_head = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                b'"delta":{"type":"text_delta","text":' % self.index
            )
        return head + self._delta_head + dumps(text) + b"}}\n\n"

    def tool_uses(self, calls: list[dict[str, Any]]) -> bytes:
        """Each call as a tool_use block: start, its whole input as one input_json_delta,
        stop (the model's call is parsed whole before it can be told apart from text)."""
        out = b""
        for block in tool_use_blocks(calls):
            json_text = dumps(block.pop("input")).decode()
            out += self._open({**block, "input": {}})
            out += _event(
                b"content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": self.index,
                    "delta": {"type": "input_json_delta", "partial_json": json_text},
                },
            )
        return out

    def finish(self, result: dict[str, Any], tool_use: bool) -> bytes:
        """The open block's stop, message_delta (stop reason, usage), message_stop."""
        reason = stop_reason(result.get("stop_type"), tool_use)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": _stop_sequence(result, reason)},
            "usage": usage(result),
        }
        return (
            self.close()
            + _event(b"message_delta", delta)
            + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )


# -- errors -----------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_CONTEXT = re.compile(
    r"maximum context length is (\d+) tokens\. However, your messages resulted in (\d+)"
)


def error_status(error: ProxyError) -> int:
    """Anthropic's status for a gateway error: the same, but a full wait queue is 529
    (Anthropic's "overloaded", which its SDKs retry after backing off)."""
    return 529 if isinstance(error, ServerOverloaded) else error.status


def error_body(error: ProxyError) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}` for any gateway error."""
    status = error_status(error)
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = error.message
    if isinstance(error, ContextLengthExceeded):
        # Claude Code recognises an overflow by Anthropic's wording and compacts the
        # conversation; the gateway's own sentence follows.
        found = _CONTEXT.search(message)
        if found:
            message = f"prompt is too long: {found[2]} tokens > {found[1]} maximum. {message}"
        else:
            message = f"prompt is too long: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_event(error: ProxyError) -> bytes:
    """The error as the final `event: error` of a stream that already started."""
    return _event(b"error", error_body(error))
