"""Logging set-up (plain or JSON lines) and the access log.

The access log writes one line per request without going through `logging`: the benchmark
measured a LogRecord, a formatter and a flushed write per request at 8% of a request's CPU.
Lines are formatted directly, with the timestamp text reused within a second, and written
out together once per event-loop iteration.

Nothing here writes to stderr from the event loop: a full pipe (a log reader that stalled, a
journald that is behind) would block the write and with it every request. `BackgroundWriter`
hands the text to one thread that does the writing, and drops (and counts) what does not fit
in its bounded buffer.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TextIO

# Credentials that other code may put in a message: Tornado's own "Invalid header value
# 'Bearer sk-...'" (logger tornado.general), a URL with user:password@, a key in a query
# string, or an OpenAI-style key anywhere. Every log line passes through redact().
_SECRETS = re.compile(
    r"(?P<scheme>\b(?:bearer|basic)\s+)[^\s'\",;]+"
    r"|(?P<url>\b[a-z][a-z0-9+.\-]*://[^\s/@:'\"]*:)[^\s/@'\"]+(?=@)"
    r"|(?P<param>\b(?:api[_-]?key|access[_-]?token|password|secret|key)=)[^\s&'\",;]+"
    r"|\bsk-[A-Za-z0-9_\-]{6,}",
    re.IGNORECASE,
)


def _hide(match: re.Match[str]) -> str:
    prefix = match.group("scheme") or match.group("url") or match.group("param")
    return (prefix or "") + "[redacted]"


def redact(text: str) -> str:
    """`text` with anything that looks like a credential replaced by [redacted]."""
    return _SECRETS.sub(_hide, text)


class PlainFormatter(logging.Formatter):
    """`time level logger: message`, with credentials redacted."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage()
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with credentials redacted."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        out["message"] = redact(record.getMessage())
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class TextSink(Protocol):
    """Where log text goes: a text stream, or a BackgroundWriter in front of one."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


LOG_BUFFER = 4 * 1024 * 1024  # characters waiting for a slow log reader before lines drop
LOG_LINGER = 0.05
"""Seconds the writer thread gathers access log lines after the first one wakes it. Woken
for every event-loop iteration's lines instead, it took the GIL from the loop and cost a
thread switch each time: 4% of the loop's samples at 32 clients went to `Condition.notify`
alone. A `logging` record (a warning, an error) is flushed, which ends the wait at once."""


class BackgroundWriter:
    """A write-only text stream that never blocks its caller: a thread writes to `stream`.

    Text waiting to be written is bounded by `max_chars`; what does not fit is dropped and
    counted, and the count is written as a line of its own once the reader catches up.
    """

    def __init__(
        self, stream: TextIO, max_chars: int = LOG_BUFFER, linger: float = LOG_LINGER
    ) -> None:
        self._stream = stream
        self._max = max_chars
        self._linger = linger
        self._idle = False  # the thread waits for text: the next write wakes it
        self._hurry = 0  # drain() callers waiting: write now, no lingering
        self._urgent = False  # flush() asked for what is queued to go now
        self._pending: deque[str] = deque()
        self._size = 0
        self._dropped = 0
        self._writing = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, text: str) -> int:
        """Queue `text` (whole lines); drop it if the buffer is full."""
        with self._cond:
            if self._closed or self._size + len(text) > self._max:
                self._dropped += text.count("\n") or 1
                return 0
            self._pending.append(text)
            self._size += len(text)
            if self._idle:  # else the thread is busy or lingering: it takes this text too
                self._idle = False
                self._cond.notify_all()
        return len(text)

    def flush(self) -> None:
        """Have what is queued written now, without the linger (the writer thread flushes
        the stream after every batch). `logging` calls it after every record."""
        with self._cond:
            if self._pending and not self._urgent:
                self._urgent = True
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued was written (True), or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()  # cuts a linger short
            try:
                while self._pending or self._writing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._hurry -= 1
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then stop the thread."""
        self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._dropped and not self._closed:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                # Gather what the next iterations log too: one wake-up per linger.
                until = time.monotonic() + self._linger
                while not self._closed and not self._hurry and not self._urgent:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed and not self._pending:
                    return
                self._urgent = False
                text = "".join(self._pending)
                self._pending.clear()
                self._size = 0
                dropped, self._dropped = self._dropped, 0
                self._writing = True
            if dropped:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                text += (
                    f"{stamp}Z WARNING llamacpp_proxy.logs: {dropped} log line(s) dropped: "
                    "the log reader did not keep up\n"
                )
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):  # a closed stderr must not stop the writer
                pass
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def configure_logging(level: str, json_lines: bool, stream: TextSink | None = None) -> None:
    """Route every logger (Tornado's and the libraries' too) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado's own access log would duplicate ours.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


class AccessLog:
    """Buffered access log lines, in the same format as the other log lines."""

    def __init__(
        self,
        stream: TextSink,
        json_lines: bool,
        schedule: Callable[[Callable[[], None]], Any],
        now: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream
        # Lines for a BackgroundWriter are not flushed: it gathers them (LOG_LINGER).
        self._flushes = not isinstance(stream, BackgroundWriter)
        self._json = json_lines
        self._schedule = schedule
        self._now = now
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def write(self, fields: dict[str, Any]) -> None:
        """Queue one request's line; written at the end of this loop iteration."""
        now = self._now()
        if self._json:
            line = json.dumps(
                {
                    "time": round(now, 3),
                    "level": "info",
                    "logger": "llamacpp_proxy.access",
                    **fields,
                },
                ensure_ascii=False,
            )
        else:
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            pairs = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            line = (
                f"{self._stamp}.{int(now * 1000) % 1000:03d}Z INFO llamacpp_proxy.access: {pairs}"
            )
        if not self._lines:
            self._schedule(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        """Write the queued lines."""
        if self._lines:
            text = "\n".join(self._lines) + "\n"
            self._lines.clear()
            try:
                self._stream.write(text)
                if self._flushes:
                    self._stream.flush()
            except (OSError, ValueError):  # a closed or full stderr must not stop serving
                pass
