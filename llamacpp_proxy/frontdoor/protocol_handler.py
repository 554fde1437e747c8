"""The base of the front doors that are the chat pipeline behind another protocol's edges
(the Responses API, Anthropic's Messages API).

Such a front door runs one generation and either answers it whole or relays it as its own
protocol's events; what it does around that generation is the same in each and lives here,
once, the per-read relay loop included: each front door only says how its events are
framed (a text delta, what opens and what ends the answer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..render.tool_calls import parse_tool_calls
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

    async def _relay_events(
        self,
        generation: Generation,
        text_frame: Callable[[str], bytes],
        stop_frames: Callable[[dict[str, Any], list[dict[str, Any]]], list[bytes]],
        open_frame: Callable[[], bytes] | None = None,
        first_frame: Callable[[dict[str, Any]], bytes] | None = None,
    ) -> None:
        """Relay one generation's llama.cpp events as the protocol's, one chunk and one send
        per read: `open_frame()` once llama.cpp answered, `first_frame(event)` before the
        first read's text (it may carry the prompt's count), `text_frame(text)` per piece of
        text, `stop_frames(final event, tool calls)` at the end."""
        tool_filter = generation.tool_filter

        def on_open() -> None:
            generation.opened = True
            self._start_stream()
            if open_frame is not None:
                self._write(open_frame())

        def on_events(events: list[dict[str, Any]]) -> Awaitable[None] | None:
            if self._client_gone:
                return None
            generation.last_event = events[-1]
            frames: list[bytes] = []
            write = frames.append
            try:
                if self.ttft is None:  # once per request: one test per read, nothing per token
                    self.ttft = self.request.request_time()  # also the ledger's mark of a stream
                    if first_frame is not None:
                        write(first_frame(events[0]))
                for event in events:
                    text = event.get("content") or ""
                    if tool_filter is not None:
                        text = tool_filter.feed(text)
                    if text:
                        write(text_frame(text))
                    if event.get("stop"):
                        self._charge(generation, event)
                        calls: list[dict[str, Any]] = []
                        if tool_filter is not None:
                            rest, calls = tool_filter.finish()
                            if rest:
                                write(text_frame(rest))
                        frames.extend(stop_frames(event, calls))
            finally:  # what came before a failure in this read still goes out first
                wait = self._send(frames[0] if len(frames) == 1 else b"".join(frames))
            return wait

        call, client = generation.call, generation.client
        assert call is not None and client is not None
        await client.stream(generation.body, call, on_open, on_events)
