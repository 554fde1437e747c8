"""POST /v1/responses: OpenAI's Responses API (stateless) on the chat completions pipeline.

Only the edges differ from a chat completion: the body is parsed by `responses.py` into the
same CompletionRequest, and the results are encoded as the `response` object and its
streamed events. Key check, limits, template, tools policy, tool-call parsing, routing, the
llama.cpp call and the streaming relay (one flush per upstream read, backpressure,
cancellation, charging) are CompletionsHandler's, the wrappers around them ProtocolHandler's.
Errors are OpenAI's, as for chat.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import InvalidRequest
from ..request import CompletionRequest
from . import responses
from .completions import Generation
from .protocol_handler import ProtocolHandler


class ResponsesHandler(ProtocolHandler):
    """POST /v1/responses."""

    chat = True
    endpoint = "/v1/responses"
    records_usage = True
    constraint_names: ClassVar[Mapping[str, str]] = {"response_format": "text.format"}
    _parsed: responses.ResponsesRequest  # set by parse_request, read by respond

    def parse_request(self, body: dict[str, Any]) -> CompletionRequest:
        parsed = responses.parse_responses_request(body)
        request = parsed.request
        limit = self.ctx.settings.max_tokens_limit
        if request.max_tokens is not None and request.max_tokens > limit:
            # Chat's check would name 'max_tokens', a field this protocol does not have.
            raise InvalidRequest(
                f"'max_output_tokens' is {request.max_tokens}; this server allows at most "
                f"{limit} (--max-tokens-limit)",
                param="max_output_tokens",
                code="max_tokens_above_limit",
            )
        self._parsed = parsed
        return request

    def _response_usage(self) -> dict[str, Any]:
        return responses.usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    async def respond(self, request: CompletionRequest, model: str) -> None:
        parsed = self._parsed
        response_id, created = responses.new_response_id(), int(time.time())
        if request.stream:
            encoder = responses.EventEncoder(
                response_id, created, model, parsed.echo, parsed.namespaces
            )
            await self._stream_events(lambda g: self._relay(encoder, g), encoder.error)
            return
        result, text, calls = await self._complete_with_calls()
        status = responses.status_of(result.get("stop_type"), bool(calls))
        output = responses.final_output(text, calls, status, parsed.namespaces)
        self.write_json(
            responses.response_object(
                response_id,
                created,
                model,
                parsed.echo,
                status=status,
                output=output,
                usage_=self._response_usage(),
            )
        )

    async def _relay(self, encoder: responses.EventEncoder, generation: Generation) -> None:
        """One generation's llama.cpp events as Responses events."""

        def stop_frames(event: dict[str, Any], calls: list[dict[str, Any]]) -> list[bytes]:
            return [encoder.finish(event.get("stop_type"), calls, self._response_usage())]

        await self._relay_events(generation, encoder.text, stop_frames, open_frame=encoder.start)
