"""Server-sent event framing: the stream terminator, and llama.cpp's events decoded from
arbitrary byte chunks."""

from __future__ import annotations

DONE = b"data: [DONE]\n\n"


class SSEDecoder:
    """Incremental SSE parser.

    Bytes arrive in arbitrary pieces: an event may be split across reads and many events may
    come in one read. `feed` returns the completed events as `(field, payload)` pairs, where
    field is `data`, or `error` for the `error: {...}` lines llama.cpp writes when a stream fails.
    """

    __slots__ = ("_buffer", "_data", "_field")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._field = b"data"

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """Consume a chunk; return every event it completed."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer or self._data:
            return self._feed_lines(buffer)
        # Fast path for what llama.cpp sends: blocks of one `data: {...}` line, each ended
        # by a blank line. Anything else in a block goes through the line parser.
        blocks = buffer.split(b"\n\n")
        self._buffer = blocks.pop()
        events: list[tuple[str, bytes]] = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(("data", block[6:]))
            elif block:
                events.extend(self._feed_lines(block + b"\n\n", keep_buffer=True))
        return events

    def _feed_lines(self, buffer: bytes, keep_buffer: bool = False) -> list[tuple[str, bytes]]:
        """The general parser: CRLF or LF lines, comments, multi-line data, other fields."""
        events: list[tuple[str, bytes]] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
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
                self._field = name
                self._data.append(value)
            # `event:`, `id:` and `retry:` carry nothing llama.cpp uses.
        if not keep_buffer:
            self._buffer = buffer[start:]
        return events

    def _dispatch(self, events: list[tuple[str, bytes]]) -> None:
        if self._data:
            payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            events.append((self._field.decode(), payload))
            self._data = []
            self._field = b"data"

    def close(self) -> list[tuple[str, bytes]]:
        """End of input: flush an event the peer did not terminate with a blank line."""
        events: list[tuple[str, bytes]] = []
        if self._buffer.strip():
            events = self.feed(b"\n\n")
        self._dispatch(events)
        return events

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are buffered."""
        return bool(self._buffer.strip()) or bool(self._data)
