"""Logging set-up (plain or JSON lines) and the access log.

The access log writes one line per request without going through `logging`: the benchmark
measured a LogRecord, a formatter and a flushed write per request at 8% of a request's CPU.
Lines are formatted directly, with the timestamp text reused within a second, and written
out together once per event-loop iteration.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

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


def configure_logging(level: str, json_lines: bool, stream: TextIO | None = None) -> None:
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
        stream: TextIO,
        json_lines: bool,
        schedule: Callable[[Callable[[], None]], Any],
        now: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream
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
                self._stream.flush()
            except (OSError, ValueError):  # a closed or full stderr must not stop serving
                pass
