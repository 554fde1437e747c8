"""Validation of OpenAI request bodies into typed requests (pure: no I/O).

Every known field is checked for type and range, and a bad one becomes a 400 naming the
`param`. Unknown fields are ignored: clients send vendor extras. What each field maps to in
llama.cpp is in upstream/llamacpp.py and docs/compatibility.md.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .. import fastjson

try:
    from orjson import dumps as _orjson_dumps
except ImportError:  # pragma: no cover - a platform without orjson wheels
    _orjson_dumps = None  # type: ignore[assignment]
from ..errors import InvalidRequest
from ..request import CompletionRequest
from .fields import huge_int

MAX_N = 16  # choices per request: each is a full generation on the GPU
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64
MAX_INT32 = 2**31 - 1  # llama.cpp reads integer parameters as 32-bit
# Bounds on a chat's shape, so one request's validation and template render stay short on
# the event loop (docs/resilience.md, "The client connection", has the measurements). Each
# is far beyond a real conversation: 4096 messages is a long agent session; OpenAI documents
# at most 128 tools.
MAX_MESSAGES = 4096
MAX_TOOL_CALLS = 4096  # over all messages: each is parsed here and serialized by the template
MAX_TOOLS = 128
MAX_JSON_DEPTH = 254
"""Levels of nesting a body (and a tool call's arguments) may have: as deep as orjson
encodes. The gateway re-encodes what clients send (tool schemas and call arguments into the
prompt, json_schema to llama.cpp, the Responses echo), and Python's encoder, orjson's
fallback, fails near its recursion limit (1000) while orjson parses up to 1024 levels: a
body in between was a 500 with a RecursionError."""

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}

# llama.cpp sampling extensions passed through to /completion when present, by expected type.
_EXT_FLOAT = (
    "min_p",
    "typical_p",
    "repeat_penalty",
    "mirostat_tau",
    "mirostat_eta",
    "dynatemp_range",
    "dynatemp_exponent",
    "xtc_probability",
    "xtc_threshold",
    "dry_multiplier",
    "dry_base",
    "top_n_sigma",
)
_EXT_INT = (
    "top_k",
    "repeat_last_n",
    "mirostat",
    "n_keep",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "id_slot",
    "t_max_predict_ms",
    "n_indent",
    "min_keep",
)
_EXT_BOOL = ("cache_prompt", "ignore_eos", "penalize_nl", "return_tokens", "timings_per_token")
# Bounds on what llama-server (b11434) sizes its work by, each far beyond any real use
# (docs/compatibility.md, "llama.cpp extensions", has the measurements):
_EXT_MAX = {
    # A window of past tokens: llama.cpp allocates it whole, for every request (4 bytes a
    # token for repeat_last_n, 8 for DRY's): 2**31-1 is 8 and 17 GB, the server OOM-killed.
    # 2**20 is beyond any context a model has.
    "repeat_last_n": 2**20,
    "dry_penalty_last_n": 2**20,
}
_EXT_MAX_ITEMS = {
    # Each entry is one more sampler run over the whole vocabulary for every token (3000
    # "penalties" took 0.5 s a token): llama.cpp has a dozen kinds, a chain names each once.
    "samplers": 16,
    # Each breaker is a scan of the whole vocabulary when the request starts, on the slot
    # (about 10 ms with a 49k vocabulary, more the more there are: 1000 took 21 s of a core
    # before the first token); llama.cpp's own default is 4.
    "dry_sequence_breakers": 32,
}
_EXT_STR_LIST = tuple(_EXT_MAX_ITEMS)


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def _too_long(param: str, length: int, limit: int) -> InvalidRequest:
    # OpenAI's wording and code for an over-long array.
    return InvalidRequest(
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
        f"but got an array with length {length} instead.",
        param=param,
        code="array_above_max_length",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= 2**63  # a 400-digit integer is no number a sampler takes
    return isinstance(value, float) and math.isfinite(value)


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise _bad(name, f"'{name}' must be a number, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(name, f"'{name}' must be between {lo:g} and {hi:g}, not {value}")
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        value = huge_int(value)
        if value is None:
            raise _bad(name, f"'{name}' must be an integer, not {type(body[name]).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise _bad(name, f"'{name}' must be {bound}, not {value}")
    return int(value)


def _boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be a boolean, not {type(value).__name__}")
    return value


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(name, f"'{name}' must be a string, not {type(value).__name__}")
    return value


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not UTF-8 (byte {exc.start}).", code="invalid_json"
        ) from None
    try:
        body = fastjson.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, not {type(body).__name__}.",
            code="invalid_json",
        )
    # Fewer brackets than the limit cannot nest that deep (a count in C, no walk).
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and too_deep(body):
        raise too_deep_error(None)
    # A lone surrogate can only come from a \uD8xx escape; it is not text and cannot be
    # encoded for llama.cpp. Only bodies with such an escape pay for the walk.
    if has_lone_surrogate_escape(text, body):
        raise lone_surrogate_error(None)
    return body


def has_lone_surrogate_escape(text: str, parsed: Any) -> bool:
    """Whether JSON `text`, parsed as `parsed`, holds an unpaired surrogate (only text with
    a \\uD8xx-\\uDFxx escape is walked)."""
    return _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(parsed)


def lone_surrogate_error(param: str | None) -> InvalidRequest:
    """The 400 for an unpaired UTF-16 surrogate escape (in the body, or in JSON inside one
    of its strings)."""
    where = f"'{param}'" if param else "The request body"
    return InvalidRequest(
        f"{where} contains an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF), which is "
        "not valid Unicode text.",
        param=param,
        code="invalid_json" if param is None else "invalid_value",
    )


def too_deep(value: Any) -> bool:
    """Whether a parsed JSON value nests deeper than MAX_JSON_DEPTH levels."""
    if _orjson_dumps is not None:
        # orjson's encoder stops at exactly this depth, in C: tens of µs for a 90 KB body
        # where a walk in Python takes most of a millisecond.
        try:
            _orjson_dumps(value)
            return False
        except TypeError as exc:
            if "Recursion" in str(exc):
                return True
            # else an integer beyond 64 bits: walk instead
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if type(item) is dict else item if type(item) is list else ()
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth >= MAX_JSON_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def too_deep_error(param: str | None) -> InvalidRequest:
    """The 400 for JSON nested deeper than MAX_JSON_DEPTH."""
    where = f"'{param}'" if param else "The request body"
    return InvalidRequest(
        f"{where} nests JSON more than {MAX_JSON_DEPTH} levels deep.",
        param=param,
        code="invalid_json" if param is None else "invalid_value",
    )


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_chat_request(body: dict[str, Any]) -> CompletionRequest:
    """Validate a chat completion request."""
    request = CompletionRequest(chat=True, model=_model(body))
    request.messages = _messages(body.get("messages"))
    max_tokens = _integer(body, "max_tokens", 1, MAX_INT32)
    max_completion = _integer(body, "max_completion_tokens", 1, MAX_INT32)
    request.max_tokens = max_completion if max_completion is not None else max_tokens
    if _boolean(body, "logprobs"):
        request.logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    elif body.get("top_logprobs") is not None:
        _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    _unsupported_chat_fields(body)
    request.tools, request.tool_choice = _tools(body)
    request.parallel_tool_calls = body.get("parallel_tool_calls") is not False
    request.json_schema = _response_format(body.get("response_format"))
    _common(body, request)
    return request


def parse_text_request(body: dict[str, Any]) -> CompletionRequest:
    """Validate a (legacy) text completion request."""
    request = CompletionRequest(chat=False, model=_model(body))
    request.prompts = _prompts(body.get("prompt"))
    request.max_tokens = _integer(body, "max_tokens", 0, MAX_INT32)
    request.logprobs = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    request.echo = bool(_boolean(body, "echo"))
    if body.get("suffix") not in (None, ""):
        _string(body, "suffix")
        raise _bad(
            "suffix",
            "'suffix' (fill-in-the-middle) is not supported by this endpoint; "
            "use llama.cpp's /infill",
        )
    _common(body, request)
    best_of = _integer(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != request.n:
        raise _bad(
            "best_of",
            "'best_of' other than 'n' is not supported: llama.cpp returns no "
            "sequence score to rank candidates by",
        )
    if request.max_tokens == 0 and not request.echo:
        raise _bad("max_tokens", "'max_tokens': 0 needs 'echo': true")
    return request


def _model(body: dict[str, Any]) -> str | None:
    model = _string(body, "model")
    if model is not None and len(model) > 256:
        raise _bad("model", "'model' must be at most 256 characters")
    return model


def _common(body: dict[str, Any], request: CompletionRequest) -> None:
    request.stream = bool(_boolean(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", "'stream_options' must be an object")
        if not request.stream:
            raise _bad("stream_options", "'stream_options' is only allowed with 'stream': true")
        request.include_usage = bool(_boolean(options, "include_usage"))
    request.n = _integer(body, "n", 1, MAX_N) or 1
    request.temperature = _number(body, "temperature", 0, 2)
    request.top_p = _number(body, "top_p", 0, 1)
    request.presence_penalty = _number(body, "presence_penalty", -2, 2)
    request.frequency_penalty = _number(body, "frequency_penalty", -2, 2)
    request.seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    request.stop = _stop(body.get("stop"))
    request.logit_bias = _logit_bias(body.get("logit_bias"))
    user = _string(body, "user")
    request.user = user
    request.extensions = _extensions(body)


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise InvalidRequest("'messages' is required.", param="messages", code="missing_required")
    if not isinstance(value, list):
        raise _bad("messages", "'messages' must be an array of message objects")
    if not value:
        raise _bad("messages", "'messages' must contain at least one message")
    if len(value) > MAX_MESSAGES:
        raise _too_long("messages", len(value), MAX_MESSAGES)
    messages = []
    tool_calls = 0
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(param, f"'{param}' must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(
                f"{param}.role",
                f"'{param}.role' must be one of {', '.join(sorted(ROLES))}, not {role!r}",
            )
        normalized: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": _content(
                message.get("content"), f"{param}.content", optional=role == "assistant"
            ),
        }
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise _bad(f"{param}.name", f"'{param}.name' must be a string")
            normalized["name"] = name
        if role == "assistant" and message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if isinstance(calls, list):
                tool_calls += len(calls)
                if tool_calls > MAX_TOOL_CALLS:
                    raise InvalidRequest(
                        f"Invalid '{param}.tool_calls': the messages hold more than "
                        f"{MAX_TOOL_CALLS} tool calls in all.",
                        param=f"{param}.tool_calls",
                        code="array_above_max_length",
                    )
            normalized["tool_calls"] = _tool_calls(calls, f"{param}.tool_calls")
        elif role == "assistant" and normalized["content"] is None:
            raise _bad(
                f"{param}.content", f"'{param}.content' is required unless 'tool_calls' is given"
            )
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _bad(f"{param}.tool_call_id", f"'{param}.tool_call_id' must be a string")
            normalized["tool_call_id"] = call_id
        messages.append(normalized)
    return messages


def _content(value: Any, param: str, *, optional: bool) -> str | None:
    if value is None:
        if optional:
            return None
        raise InvalidRequest(f"'{param}' is required.", param=param, code="missing_required")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(param, f"'{param}' must be a string or an array of content parts")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise _bad(f"{param}[{j}]", f"'{param}[{j}]' must be a content part object")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{param}[{j}].text", f"'{param}[{j}].text' must be a string")
            texts.append(text)
        elif kind == "refusal" and optional:
            # An assistant turn (optional content) sent back as the API gave it: OpenAI's
            # schema has text and refusal parts there; the model reads what it said.
            refusal = part.get("refusal")
            if not isinstance(refusal, str):
                raise _bad(f"{param}[{j}].refusal", f"'{param}[{j}].refusal' must be a string")
            texts.append(refusal)
        elif kind in ("image_url", "input_audio", "file", "input_image"):
            raise _bad(
                f"{param}[{j}].type",
                f"content parts of type '{kind}' are not supported: this model takes text",
            )
        else:
            raise _bad(f"{param}[{j}].type", f"unknown content part type {kind!r}")
    return "\n".join(texts)


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad(param, f"'{param}' must be an array")
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{param}[{j}]", f"'{param}[{j}]' must have a function with a name")
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            text = arguments
            try:
                arguments = json.loads(text) if text.strip() else {}
            except (ValueError, RecursionError):
                raise _bad(
                    f"{param}[{j}].function.arguments",
                    "tool call arguments must be a JSON object encoded as a string",
                ) from None
            # Parsed here: the body's own checks never saw inside.
            if too_deep(arguments):
                raise too_deep_error(f"{param}[{j}].function.arguments")
            if has_lone_surrogate_escape(text, arguments):
                raise lone_surrogate_error(f"{param}[{j}].function.arguments")
        if not isinstance(arguments, dict):
            # Templates iterate the mapping (`arguments | items`) or write it with tojson:
            # an array, a number or a string reached them as a 500-shaped template failure
            # or as arguments no tool takes.
            raise _bad(
                f"{param}[{j}].function.arguments",
                "tool call arguments must be a JSON object encoded as a string",
            )
        # Templates (HF convention) expect the arguments as a mapping, not a JSON string.
        calls.append(
            {
                "id": call.get("id") if isinstance(call.get("id"), str) else f"call_{j}",
                "type": "function",
                "function": {"name": fn["name"], "arguments": arguments},
            }
        )
    return calls


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "'tool_choice' needs 'tools'")
        return None, None
    if not isinstance(tools, list):
        raise _bad("tools", "'tools' must be an array")
    if len(tools) > MAX_TOOLS:
        raise _too_long("tools", len(tools), MAX_TOOLS)
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(
                f"tools[{i}]", f'\'tools[{i}]\' must be {{"type": "function", "function": {{...}}}}'
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"tools[{i}].function.name", f"'tools[{i}].function.name' is required")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _bad(
                f"tools[{i}].function.parameters",
                f"'tools[{i}].function.parameters' must be a JSON Schema object",
            )
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return _allowed_tools(tools, choice.get("allowed_tools"))
    if choice is not None and choice not in ("none", "auto", "required"):
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
            raise _bad(
                "tool_choice",
                "'tool_choice' must be 'none', 'auto', 'required' or name one of the tools",
            )
    return (tools or None), choice


def _allowed_tools(
    tools: list[dict[str, Any]], spec: Any
) -> tuple[list[dict[str, Any]] | None, Any]:
    """`tool_choice: {"type": "allowed_tools", ...}`: only the listed tools are offered,
    with the mode as the choice. Offering them all would let `required` force a call of a
    tool the client ruled out."""
    param = "tool_choice.allowed_tools"
    if not isinstance(spec, dict):
        raise _bad(param, f"'{param}' must be an object with 'mode' and 'tools'")
    mode = spec.get("mode")
    if mode not in ("auto", "required"):
        raise _bad(f"{param}.mode", f"'{param}.mode' must be 'auto' or 'required'")
    listed = spec.get("tools")
    if not isinstance(listed, list):
        raise _bad(f"{param}.tools", f"'{param}.tools' must be an array of tools")
    names = {t["function"]["name"] for t in tools}
    wanted = set()
    for i, entry in enumerate(listed):
        fn = entry.get("function") if isinstance(entry, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in names:
            raise _bad(
                f"{param}.tools[{i}]",
                f'\'{param}.tools[{i}]\' must be {{"type": "function", "function": '
                '{"name": ...}} naming one of the tools',
            )
        wanted.add(name)
    allowed = [t for t in tools if t["function"]["name"] in wanted]
    if not allowed:
        if mode == "required":
            raise _bad(f"{param}.tools", f"'{param}.tools' is empty: 'required' needs a tool")
        return None, None
    return allowed, mode


def _unsupported_chat_fields(body: dict[str, Any]) -> None:
    """Reject what cannot be honoured; type-check what is accepted and ignored."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        param = "functions" if body.get("functions") is not None else "function_call"
        raise _bad(
            param, f"'{param}' is deprecated and not supported; use 'tools' and 'tool_choice'"
        )
    if body.get("web_search_options") is not None:
        raise _bad("web_search_options", "web search is not available on a local model")
    modalities = body.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
            raise _bad("modalities", "'modalities' must be an array of strings")
        if set(modalities) - {"text"}:
            raise _bad("modalities", "only the 'text' modality is supported")
    if body.get("audio") is not None:
        raise _bad("audio", "audio output is not supported")
    for name in ("store", "parallel_tool_calls"):
        _boolean(body, name)
    for name in (
        "reasoning_effort",
        "verbosity",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    ):
        _string(body, name)
    for name in ("metadata", "prediction", "prompt_cache_options", "moderation"):
        value = body.get(name)
        if value is not None and not isinstance(value, dict):
            raise _bad(name, f"'{name}' must be an object")


def _prompts(value: Any) -> list[str]:
    if value is None:
        raise InvalidRequest("'prompt' is required.", param="prompt", code="missing_required")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        if len(value) > MAX_PROMPTS:
            raise _bad("prompt", f"at most {MAX_PROMPTS} prompts per request")
        return list(value)
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        raise _bad("prompt", "token-id prompts are not supported; send the prompt as text")
    raise _bad("prompt", "'prompt' must be a string or a non-empty array of strings")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "'stop' must be a string or an array of strings")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"'stop' may hold at most {MAX_STOP} sequences")
    if any(s == "" for s in stops):
        raise _bad("stop", "'stop' sequences must not be empty")
    return list(stops)


def _logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("logit_bias", "'logit_bias' must map token ids to numbers")
    bias = {}
    for token, weight in value.items():
        # Decimal digits only (int() would also take " +1_0 "), below any vocabulary size.
        if not (token.isascii() and token.isdigit()) or int(token) >= 10**9:
            raise _bad("logit_bias", f"'logit_bias' key {token!r} is not a token id")
        token_id = int(token)
        if not _is_number(weight) or not -100 <= weight <= 100:
            raise _bad(
                "logit_bias", f"'logit_bias' values must be between -100 and 100, not {weight!r}"
            )
        bias[token_id] = float(weight)
    return bias


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad(
                "response_format.json_schema",
                "'response_format.json_schema' needs a 'name' and a 'schema'",
            )
        if schema is None:
            return {"type": "object"}
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema", "the schema must be an object")
        return schema
    raise _bad(
        "response_format.type",
        "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
    )


def apply_max_tokens_limit(request: CompletionRequest, limit: int) -> None:
    """Cap max_tokens: `limit` when absent (so no generation runs to the end of the
    context unasked), a 400 when over it."""
    if request.max_tokens is None:
        request.max_tokens = limit
    elif request.max_tokens > limit:
        raise InvalidRequest(
            f"'max_tokens' is {request.max_tokens}; this server allows at most {limit} "
            "(--max-tokens-limit)",
            param="max_tokens",
            code="max_tokens_above_limit",
        )


def _extensions(body: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp's own multiplier of work: one request, n_cmpl generations the limits would
    # not see. OpenAI's 'n' does the same, counted.
    n_cmpl = _integer(body, "n_cmpl", -(2**63), 2**63)
    if n_cmpl is not None and n_cmpl != 1:
        raise _bad("n_cmpl", "'n_cmpl' is not supported; use 'n' for several choices")
    ext: dict[str, Any] = {}
    for name in _EXT_FLOAT:
        if body.get(name) is not None:
            ext[name] = _number(body, name, -1e9, 1e9)
    for name in _EXT_INT:
        if body.get(name) is not None:
            ext[name] = _integer(body, name, -1, _EXT_MAX.get(name, MAX_INT32))
    for name in _EXT_BOOL:
        if body.get(name) is not None:
            ext[name] = _boolean(body, name)
    for name in _EXT_STR_LIST:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise _bad(name, f"'{name}' must be an array of strings")
            if len(value) > _EXT_MAX_ITEMS[name]:
                raise _too_long(name, len(value), _EXT_MAX_ITEMS[name])
            ext[name] = value
    grammar = _string(body, "grammar")
    if grammar:
        ext["grammar"] = grammar
    schema = body.get("json_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise _bad("json_schema", "'json_schema' must be a JSON Schema object")
        ext["json_schema"] = schema
    # Combinations with response_format and tool_choice: render/constraints.py.
    return ext
