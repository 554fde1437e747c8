"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the chat
completions pipeline.

Only the edges differ from a chat completion: the body is parsed by `anthropic.py` into the
same CompletionRequest, and the results are encoded as Anthropic's message, events and
errors. Key check, limits, template, tool-call parsing, routing, the llama.cpp call and
the streaming relay (one flush per upstream read, backpressure, cancellation, charging)
are CompletionsHandler's (the wrappers around them ProtocolHandler's).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from ..errors import ChatTemplateRejected, ProxyError, UpstreamError
from ..guard.ratelimit import Cost
from ..request import CompletionRequest
from ..route.pools import check_kind
from ..upstream.llamacpp import MixedPrompt
from . import anthropic
from .completions import Generation, _active_tools
from .openai_request import parse_json_body
from .protocol_handler import ProtocolHandler

# The gateway's x-ratelimit-* headers under Anthropic's names.
_RATELIMIT_NAMES = {
    "x-ratelimit-limit-requests": "anthropic-ratelimit-requests-limit",
    "x-ratelimit-remaining-requests": "anthropic-ratelimit-requests-remaining",
    "x-ratelimit-reset-requests": "anthropic-ratelimit-requests-reset",
    "x-ratelimit-limit-tokens": "anthropic-ratelimit-tokens-limit",
    "x-ratelimit-remaining-tokens": "anthropic-ratelimit-tokens-remaining",
    "x-ratelimit-reset-tokens": "anthropic-ratelimit-tokens-reset",
}
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?")


def _reset_time(duration: str, now: float) -> str | None:
    """A `1m30s` reset duration as the RFC 3339 instant Anthropic's headers give."""
    found = _DURATION.fullmatch(duration)
    if found is None or not any(found.groups()):
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in found.groups())
    instant = datetime.fromtimestamp(now + hours * 3600 + minutes * 60 + seconds, UTC)
    return instant.isoformat(timespec="seconds").replace("+00:00", "Z")


class MessagesHandler(ProtocolHandler):
    """POST /v1/messages."""

    chat = True
    prefills_assistant = True  # a last assistant message is the answer's start (prefill)
    endpoint = "/v1/messages"
    records_usage = True

    def set_default_headers(self) -> None:
        super().set_default_headers()
        admission = getattr(self, "admission", None)
        if admission is not None:
            self._ratelimit_headers(admission.headers)

    def _ratelimit_headers(self, headers: dict[str, str]) -> None:
        """The x-ratelimit-* headers again under Anthropic's names."""
        now = time.time()
        for name, value in headers.items():
            alias = _RATELIMIT_NAMES.get(name)
            if alias is None:
                continue
            if alias.endswith("-reset"):
                value = _reset_time(value, now) or ""
            if value:
                self.set_header(alias, value)

    def parse_request(self, body: dict[str, Any]) -> CompletionRequest:
        request = anthropic.parse_messages_request(body)
        # max_tokens is required by Anthropic and clients send their model's maximum
        # (Claude Code: 32000), so over the gateway's --max-tokens-limit it is capped
        # rather than refused; stop_reason "max_tokens" then reports the cap when reached.
        limit = self.ctx.settings.max_tokens_limit
        if request.max_tokens is not None and request.max_tokens > limit:
            request.max_tokens = limit
        return request

    async def _prompts(self, request: CompletionRequest) -> list[str]:
        try:
            return await super()._prompts(request)
        except ChatTemplateRejected:
            # A template that allows a system turn only first (Gemma 3's, Mistral's) refused
            # a system message further on: render once more with the system text folded
            # into the leading one. Templates that take it where it was keep it there.
            folded = anthropic.system_folded(request.messages)
            if folded is None:
                raise
            request.messages = folded
            return await super()._prompts(request)

    def render_error(self, error: ProxyError) -> tuple[int, Any]:
        self._ratelimit_headers(error.headers)  # a 429's, which has no admission
        return anthropic.error_status(error), anthropic.error_body(error)

    async def respond(self, request: CompletionRequest, model: str) -> None:
        message_id = anthropic.new_message_id()
        if request.stream:
            encoder = anthropic.EventEncoder(message_id, model)
            await self._stream_events(lambda g: self._relay(encoder, g), anthropic.error_event)
            return
        result, text, calls = await self._complete_with_calls()
        self.write_json(anthropic.message_response(message_id, model, text, calls, result))

    async def _relay(self, encoder: anthropic.EventEncoder, generation: Generation) -> None:
        """One generation's llama.cpp events as Anthropic's. The message_start event goes
        with the first tokens, not at open: it carries the prompt's count."""

        def stop_frames(event: dict[str, Any], calls: list[dict[str, Any]]) -> list[bytes]:
            # In this order: the encoder closes the open text block before the tool uses.
            frames = [encoder.tool_uses(calls)] if calls else []
            frames.append(encoder.finish(event, bool(calls)))
            return frames

        await self._relay_events(
            generation,
            encoder.text,
            stop_frames,
            first_frame=lambda event: encoder.start(anthropic.usage(event)),
        )


class CountTokensHandler(MessagesHandler):
    """POST /v1/messages/count_tokens: the rendered prompt's tokens, by llama.cpp's own
    tokenizer. Counted as a request by the key's limits; it charges no tokens."""

    endpoint = "/v1/messages/count_tokens"
    records_usage = False

    async def post(self) -> None:
        if self._early_error is not None:
            raise self._early_error
        body = parse_json_body(b"".join(self._body_parts))
        self._body_parts = []
        request = anthropic.parse_messages_request(body, count_only=True)
        self._tools = _active_tools(request)
        self._parallel_tools = request.parallel_tool_calls
        constraint = self._merge_constraints(request)
        assert self.principal is not None
        self._pool = self.ctx.routes.lookup(request.model, self.principal.models)
        check_kind(self._pool.pool, "chat", request.model)
        self.admission = await self.ctx.limiter.admit(self.principal, Cost(1, 0))
        if constraint.found:
            await self.ctx.constraint_checks.check(constraint, self.principal.name)
        self.set_default_headers()
        [prompt] = await self._prompts(request)
        self.write_json({"input_tokens": await self._count(prompt)})

    async def _count(self, prompt: str) -> int:
        assert self._pool is not None
        upstream = self._pool.meta_client()
        if type(prompt) is not MixedPrompt:
            tokens = await upstream.tokenize(prompt, add_special=True)
            if tokens is None:
                raise UpstreamError("llama.cpp has no /tokenize to count the prompt with")
            return len(tokens)
        # Content went as plain-text token ids: count those, tokenize the template text.
        pieces = prompt.pieces
        count = sum(1 for p in pieces if isinstance(p, int))
        for piece in pieces:
            if isinstance(piece, str):
                tokens = await upstream.tokenize(piece)
                if tokens is None:
                    raise UpstreamError("llama.cpp has no /tokenize to count the prompt with")
                count += len(tokens)
        if pieces and isinstance(pieces[0], str) and await upstream.adds_bos():
            count += 1
        return count
