"""Server-sent event framing: the stream terminator, and llama.cpp's events decoded from
arbitrary byte chunks."""

from __future__ import annotations

DONE = b"data: [DONE]\n\n"

# llama.cpp's largest events are a token with n_probs alternatives, a few KiB; anything near
# these sizes is a broken or hostile upstream, and would otherwise be buffered without end.
MAX_LINE = 4 * 1024 * 1024
MAX_EVENT = 4 * 1024 * 1024


class EventTooLarge(ValueError):
    """An SSE line or event is over MAX_LINE / MAX_EVENT bytes."""


class SSEDecoder:
    """Incremental SSE parser, linear in the bytes fed and bounded in what it holds.

    Bytes arrive in arbitrary pieces: an event may be split across reads and many events may
    come in one read. `feed` returns the completed events as `(field, payload)` pairs, where
    field is `data`, or `error` for the `error: {...}` lines llama.cpp writes when a stream fails.
    Only the unfinished last line is held back, as a list of pieces joined once it ends, so
    a long line costs one copy, not one per read. `feed` raises EventTooLarge past the caps.
    """

    __slots__ = ("_data", "_data_size", "_field", "_pending", "_pending_size")

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # pieces of the unfinished last line
        self._pending_size = 0
        self._data: list[bytes] = []  # data lines of the event being read
        self._data_size = 0
        self._field = b"data"

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """Consume a chunk; return every event it completed."""
        if not self._pending and not self._data:
            # Fast path for one whole llama.cpp event per read (a GPU's pace): a single
            # `data: ...` line and its blank line, no CR anywhere.
            end = len(chunk) - 2
            if (
                chunk.startswith(b"data: ")
                and chunk.find(b"\n") == end
                and chunk.endswith(b"\n\n")
                and b"\r" not in chunk
            ):
                if end > MAX_LINE:
                    raise EventTooLarge(f"an SSE line over {MAX_LINE} bytes")
                return [("data", chunk[6:end])]
        if self._pending:
            self._pending.append(chunk)
            self._pending_size += len(chunk)
            if b"\n" not in chunk:  # the line goes on: join it once, when it ends
                if self._pending_size > MAX_LINE:
                    raise EventTooLarge(f"an SSE line over {MAX_LINE} bytes")
                return []
            buffer = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
        else:
            buffer = chunk
        if self._data or b"\r" in buffer:
            return self._feed_lines(buffer)
        # Fast path for what llama.cpp sends: blocks of one `data: {...}` line, each ended
        # by a blank line. Anything else in a block goes through the line parser.
        blocks = buffer.split(b"\n\n")
        rest = blocks.pop()
        events: list[tuple[str, bytes]] = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                if len(block) > MAX_LINE:
                    raise EventTooLarge(f"an SSE line over {MAX_LINE} bytes")
                events.append(("data", block[6:]))
            elif block:
                events.extend(self._feed_lines(block + b"\n\n"))
        if rest:
            if b"\n" in rest:
                events.extend(self._feed_lines(rest))
            else:  # the usual case: half an event, held for the next read
                if len(rest) > MAX_LINE:
                    raise EventTooLarge(f"an SSE line over {MAX_LINE} bytes")
                self._pending = [rest]
                self._pending_size = len(rest)
        return events

    def _feed_lines(self, buffer: bytes) -> list[tuple[str, bytes]]:
        """The general parser: CRLF or LF lines, comments, multi-line data, other fields.
        Complete lines are consumed; an unfinished last one is kept for the next feed."""
        events: list[tuple[str, bytes]] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > MAX_LINE:
                raise EventTooLarge(f"an SSE line over {MAX_LINE} bytes")
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                self._dispatch(events)
                continue
            if line.startswith(b":"):
                continue  # a comment / keep-alive
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            if value.startswith(b" "):
                value = value[1:]
            if name in (b"data", b"error"):
                self._data_size += len(value) + 1
                if self._data_size > MAX_EVENT:
                    raise EventTooLarge(f"an SSE event over {MAX_EVENT} bytes")
                self._field = name
                self._data.append(value)
            # `event:`, `id:` and `retry:` carry nothing llama.cpp uses.
        if start < len(buffer):
            rest = buffer[start:]
            if len(rest) > MAX_LINE:
                raise EventTooLarge(f"an SSE line over {MAX_LINE} bytes")
            self._pending = [rest]
            self._pending_size = len(rest)
        return events

    def _dispatch(self, events: list[tuple[str, bytes]]) -> None:
        if self._data:
            payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            events.append((self._field.decode(), payload))
            self._data = []
            self._data_size = 0
            self._field = b"data"

    def close(self) -> list[tuple[str, bytes]]:
        """End of input: flush an event the peer did not terminate with a blank line."""
        events: list[tuple[str, bytes]] = []
        if self._pending:
            tail = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
            if tail.strip():
                events = self._feed_lines(tail + b"\n")
        self._dispatch(events)
        return events
