"""OpenAI response bodies and stream chunks built from llama.cpp results (pure: no I/O).

Streaming is the hot path: a ChunkEncoder pre-renders the bytes every chunk of a response
shares, so each token costs one small JSON encoding of its text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ProxyError
from ..fastjson import dumps
from ..ids import unique_id

FINISH_REASONS = {"eos": "stop", "word": "stop", "limit": "length", "none": "stop"}


def new_id(chat: bool) -> str:
    """`chatcmpl-...` or `cmpl-...`, unique."""
    return unique_id("chatcmpl-" if chat else "cmpl-")


def finish_reason(stop_type: str | None) -> str:
    """llama.cpp's stop_type as OpenAI's finish_reason."""
    return FINISH_REASONS.get(stop_type or "none", "stop")


@dataclass
class Usage:
    """Token counts as llama.cpp reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """OpenAI's usage object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class Choice:
    """One finished choice: text, why it stopped, and its token log-probabilities."""

    index: int
    text: str = ""
    finish_reason: str = "stop"
    logprobs: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    prompt_text: str = ""


def _token_bytes(entry: dict[str, Any]) -> list[int]:
    raw = entry.get("bytes")
    if isinstance(raw, list):
        return raw
    return list(str(entry.get("token", "")).encode("utf-8"))


def chat_logprobs(entries: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """llama.cpp's completion_probabilities as a chat choice's `logprobs` object."""
    content = []
    for entry in entries:
        content.append(
            {
                "token": entry.get("token", ""),
                "logprob": entry.get("logprob", 0.0),
                "bytes": _token_bytes(entry),
                "top_logprobs": [
                    {
                        "token": alt.get("token", ""),
                        "logprob": alt.get("logprob", 0.0),
                        "bytes": _token_bytes(alt),
                    }
                    for alt in (entry.get("top_logprobs") or [])[:top]
                ],
            }
        )
    return {"content": content, "refusal": None}


def text_logprobs(entries: list[dict[str, Any]], top: int, offset: int) -> dict[str, Any]:
    """llama.cpp's completion_probabilities as a text choice's legacy `logprobs` object."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry in entries:
        token = entry.get("token", "")
        tokens.append(token)
        token_logprobs.append(entry.get("logprob", 0.0))
        alts: dict[str, float] = {}
        for alt in (entry.get("top_logprobs") or [])[:top]:
            alts.setdefault(alt.get("token", ""), alt.get("logprob", 0.0))
        top_logprobs.append(alts)
        text_offset.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_response(
    response_id: str, created: int, model: str, choices: list[Choice], usage: Usage
) -> dict[str, Any]:
    """A non-streamed chat.completion."""
    out = []
    for choice in choices:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            message["content"] = choice.text or None
            message["tool_calls"] = choice.tool_calls
        out.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason,
            }
        )
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage.as_dict(),
    }


def text_response(
    response_id: str, created: int, model: str, choices: list[Choice], usage: Usage
) -> dict[str, Any]:
    """A non-streamed text_completion."""
    out = [
        {
            "index": c.index,
            "text": c.prompt_text + c.text,
            "logprobs": c.logprobs,
            "finish_reason": c.finish_reason,
        }
        for c in choices
    ]
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage.as_dict(),
    }


class ChunkEncoder:
    """Builds the `data: ...` frames of one streamed response, as bytes.

    Everything but the index, the text and the logprobs is the same in every chunk of a
    response, so it is rendered once here; a token then costs one JSON encoding of its text.
    """

    def __init__(self, chat: bool, response_id: str, created: int, model: str) -> None:
        self.chat = chat
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = (
            b'data: {"id":'
            + dumps(response_id)
            + b',"object":"'
            + obj
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + dumps(model)
            + b',"choices":['
        )
        # Between the index and the text of a content chunk.
        self._text_key = b',"delta":{"content":' if chat else b',"text":'
        self._text_end = b'},"logprobs":' if chat else b',"logprobs":'
        self._no_logprobs_end = self._text_end + b'null,"finish_reason":null}]}\n\n'
        # Per choice index, everything before a content chunk's text: a token then costs
        # its text's encoding and one concatenation (one entry per choice of the response).
        self._content_heads: dict[int, bytes] = {}

    def _frame(self, choice: bytes) -> bytes:
        return self._head + choice + b"]}\n\n"

    def role(self, index: int) -> bytes:
        """The first chat chunk of a choice: the assistant role, empty content."""
        return self._frame(
            b'{"index":%d,"delta":{"role":"assistant","content":"","refusal":null},'
            b'"logprobs":null,"finish_reason":null}' % index
        )

    def content(self, index: int, text: str, logprobs: dict[str, Any] | None = None) -> bytes:
        """A chunk carrying generated text (and its logprobs when asked for)."""
        head = self._content_heads.get(index)
        if head is None:
            head = self._content_heads[index] = b"".join(
                (self._head, b'{"index":', str(index).encode(), self._text_key)
            )
        if logprobs is None:
            return head + dumps(text) + self._no_logprobs_end
        return b"".join(
            (head, dumps(text), self._text_end, dumps(logprobs), b',"finish_reason":null}]}\n\n')
        )

    def tool_calls(self, index: int, calls: list[dict[str, Any]]) -> bytes:
        """A chat chunk carrying complete tool calls (each with its index)."""
        deltas = [{"index": i, **call} for i, call in enumerate(calls)]
        return self._frame(
            b'{"index":%d,"delta":{"tool_calls":%s},"logprobs":null,"finish_reason":null}'
            % (index, dumps(deltas))
        )

    def finish(self, index: int, reason: str) -> bytes:
        """The last chunk of a choice, with its finish_reason."""
        if self.chat:
            return self._frame(
                b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%s"}'
                % (index, reason.encode())
            )
        return self._frame(
            b'{"index":%d,"text":"","logprobs":null,"finish_reason":"%s"}'
            % (index, reason.encode())
        )

    def usage(self, usage: Usage) -> bytes:
        """The include_usage chunk: no choices, the whole request's usage."""
        return self._head + b'],"usage":' + dumps(usage.as_dict()) + b"}\n\n"


def error_event(error: ProxyError) -> bytes:
    """An OpenAI error object as the final event of a stream that already started."""
    return b"data: " + dumps(error.body()) + b"\n\n"
