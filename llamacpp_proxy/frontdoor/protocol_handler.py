"""The base of the front doors that are the chat pipeline behind another protocol's edges
(the Responses API, Anthropic's Messages API).

Such a front door runs one generation and either answers it whole or relays it as its own
protocol's events; what it does around that generation is the same in each and lives here,
once. The per-event relay loops stay in each handler: they are the per-token hot path, kept
inlined on purpose.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import ProxyError
from ..render.tool_calls import parse_tool_calls
from ..upstream.llamacpp import ClientGone
from .completions import CompletionsHandler, Generation


class ProtocolHandler(CompletionsHandler):
    """CompletionsHandler with the whole-answer and stream wrappers such front doors share."""

    async def _complete_with_calls(
        self,
    ) -> tuple[dict[str, Any], str, list[dict[str, Any]] | None]:
        """The one generation's llama.cpp result, then its text and the tool calls in it:
        (result, text, None) for plain text, (result, the text around the calls, calls)."""
        [result] = await self._gather(self._complete_one)
        text = str(result.get("content") or "")
        calls = None
        if self._tools:
            found = parse_tool_calls(text, self._tools, self._parallel_tools)
            if found is not None:
                content, calls = found
                text = content or ""
        return result, text, calls

    async def _stream_events(
        self,
        relay: Callable[[Generation], Awaitable[None]],
        error_event: Callable[[ProxyError], bytes],
    ) -> None:
        """Run the relay of the generation, then end the stream: a failure before anything
        was sent is a plain error response (its status); after, `error_event(error)` (the
        protocol's final error event) ends it; a client that left gets nothing more."""
        try:
            await self._gather(relay)
        except ProxyError as error:
            if not self._streaming:
                raise  # nothing sent yet: a plain error response with its status
            self._fail_started_stream(error, error_event(error))
            return
        except ClientGone:
            return
        self.finish()
